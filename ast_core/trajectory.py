"""Expert trajectories: storage, Avg_Var and MCT convexified trajectories (docs/method.md sections 2 and 3).

On-disk format (safetensors only, no pickle)
--------------------------------------------
A *buffer folder* holds one file per expert, ``expert_000.safetensors``, ``expert_001.safetensors``, ...
(see `expert_path`). `convexify_buffer` writes the MCT version of each expert beside it, tagged with the
number of anchors and β mode: ``expert_000.mct2.safetensors``, ``expert_000.mct4.safetensors``,
``expert_000.mct2u.safetensors`` (uniform β); see `convex_tag`.

Every file carries these string entries in the safetensors header metadata:

- ``format`` = ``"ast-dd-trajectory"``, ``format_version`` = ``"1"``, ``kind`` = ``"plain"`` or ``"convex"``;
- ``metadata``: a JSON object. `ast_core.experts.train_experts` writes ``dataset``, ``arch``, ``width``,
  ``depth``, ``param_names``, ``param_shapes``, ``config`` (optimizer settings and loss switches),
  ``seed``, ``expert_index``, ``zca`` and ``history`` (per-epoch ``train_acc``, ``val_acc``, ``test_acc``,
  ``train_loss``, ``lr`` and ``step_sq_norm``). A convexified file keeps its source expert's metadata.

Plain file (``kind="plain"``), the stored expert θ*_0 … θ*_K:

- ``checkpoints``: ``[K+1, P]`` float32 (float16/bfloat16 on request); row e is the flat parameter
  vector after epoch e (row 0 = initialisation) in `ast_core.models.FlatModel` order.

Convex file (``kind="convex"``, MCT section 3), with header entries ``beta_mode`` (``"arclength"`` or
``"uniform"``) and ``smooth_anchors`` (``"0"``/``"1"``) besides the common ones:

- ``anchors``: ``[n, P]`` anchor parameters θ_{a_0} … θ_{a_{n-1}} (after neighbour averaging, if any);
- ``anchor_epochs``: ``[n]`` int64, ``0 = a_0 < a_1 < … < a_{n-1} = K``;
- ``layer_sizes``: ``[L]`` int64, how the flat vector splits into the layers that get their own β;
- ``beta``: ``[K+1, L]`` float32; ``beta[e, l]`` is β_l at epoch e inside the segment that *starts* at
  or before e, so it is 0 at every anchor epoch but the last and 1 at epoch K.

`load_trajectory` checks all of this, and that every value is finite, and raises `FileNotFoundError`/
`ValueError` naming the file.
"""

from __future__ import annotations

import bisect
import json
import math
import numbers
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from ast_core.io import atomic_write_safetensors
from ast_core.settings import BETA_MODES

FORMAT = "ast-dd-trajectory"
FORMAT_VERSION = "1"
KINDS = ("plain", "convex")
STORAGE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def storage_dtype(name: str) -> torch.dtype:
    """The storage dtype a setting names ('float32', 'float16', 'bfloat16')."""
    dtype = getattr(torch, name, None)
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"storage dtype {name!r} is unknown; allowed: "
                         f"{', '.join(str(d).removeprefix('torch.') for d in STORAGE_DTYPES)}")
    return dtype
_TAG = re.compile(r"^[A-Za-z0-9_-]+$")


# ------------------------------------------------------------------------------------------ helpers
def _as_matrix(checkpoints: TrajectoryLike) -> Tensor:
    """A trajectory as a detached ``[K+1, P]`` tensor (flat vectors, a matrix or a trajectory object)."""
    if isinstance(checkpoints, PlainTrajectory):
        return checkpoints.checkpoints
    if isinstance(checkpoints, ConvexTrajectory):
        return torch.stack([checkpoints.at(e) for e in range(checkpoints.num_epochs + 1)])
    if isinstance(checkpoints, Tensor):
        matrix = checkpoints.detach()
    else:
        vectors = [torch.as_tensor(c).detach() for c in checkpoints]
        if any(v.dim() != 1 or v.numel() != vectors[0].numel() for v in vectors):
            raise ValueError("checkpoints must be flat parameter vectors of one length; got shapes "
                             f"{sorted({tuple(v.shape) for v in vectors})}")
        matrix = torch.stack(vectors) if vectors else torch.empty(0, 0)
    if matrix.dim() != 2 or matrix.shape[0] < 2 or matrix.shape[1] < 1:
        raise ValueError(f"checkpoints must hold at least 2 flat parameter vectors (a [K+1, P] matrix); "
                         f"got shape {tuple(matrix.shape)}")
    if not matrix.is_floating_point():
        raise ValueError(f"checkpoints must be floating point, got dtype {matrix.dtype}")
    return matrix


def _check_time(t: float, num_epochs: int) -> float:
    """`t` as a float in [0, K], else ValueError."""
    value = float(t)
    if not math.isfinite(value) or not 0.0 <= value <= num_epochs:
        raise ValueError(f"t={t!r} is outside the trajectory: allowed 0 <= t <= {num_epochs}")
    return value


def _layer_index(layer_sizes: Sequence[int]) -> Tensor:
    """Layer id of every entry of the flat vector."""
    sizes = torch.as_tensor(list(layer_sizes), dtype=torch.long)
    return torch.repeat_interleave(torch.arange(len(sizes)), sizes)


def _check_layer_sizes(layer_sizes: Sequence[int], num_params: int) -> tuple[int, ...]:
    sizes = tuple(int(s) for s in layer_sizes)
    if not sizes or any(s < 1 for s in sizes) or sum(sizes) != num_params:
        shown = ", ".join(map(str, sizes[:8])) + (", ..." if len(sizes) > 8 else "")
        raise ValueError(f"layer_sizes=[{shown}] must be positive and sum to the {num_params} parameters of "
                         f"the trajectory (they sum to {sum(sizes)})")
    return sizes


def step_sq_norms(checkpoints: TrajectoryLike) -> list[float]:
    """‖θ_t − θ_{t+1}‖²₂ for t = 0..K−1 (the dashed curves of AST Fig. 9), computed in float64."""
    matrix = _as_matrix(checkpoints)
    return [float((matrix[t + 1].double() - matrix[t].double()).square().sum())
            for t in range(matrix.shape[0] - 1)]


def avg_var(checkpoints: TrajectoryLike) -> float:
    """Avg_Var = E_t[‖θ_t − θ_{t+1}‖²₂] over a stored trajectory (AST smoothness metric, Table VII)."""
    norms = step_sq_norms(checkpoints)
    return sum(norms) / len(norms)


def layer_step_norms(checkpoints: TrajectoryLike, layer_sizes: Sequence[int]) -> Tensor:
    """``[K, L]`` float64 table of per-layer step lengths ‖θ^l_{t+1} − θ^l_t‖₂."""
    matrix = _as_matrix(checkpoints)
    index = _layer_index(_check_layer_sizes(layer_sizes, matrix.shape[1])).to(matrix.device)
    rows = []
    for t in range(matrix.shape[0] - 1):
        squared = (matrix[t + 1].double() - matrix[t].double()).square()
        totals = torch.zeros(len(layer_sizes), dtype=torch.float64, device=matrix.device)
        rows.append(totals.index_add_(0, index, squared))
    return torch.stack(rows).sqrt().cpu()


def anchor_epochs(num_epochs: int, num_anchors: int) -> list[int]:
    """Evenly spaced anchor epochs as in the MCT authors' code: a_i = i·⌊(K+1)/(n−1)⌋, last = K.

    K=50: 2 anchors -> [0, 50]; 4 anchors -> [0, 17, 34, 50].
    """
    if not isinstance(num_anchors, int) or num_anchors < 2:
        raise ValueError(f"num_anchors={num_anchors!r} must be an integer >= 2")
    step = (num_epochs + 1) // (num_anchors - 1)
    epochs = [i * step for i in range(num_anchors - 1)] + [num_epochs]
    if any(b <= a for a, b in zip(epochs, epochs[1:], strict=False)):
        raise ValueError(f"num_anchors={num_anchors} is too many for a trajectory of {num_epochs} epochs "
                         f"(allowed: 2..{num_epochs + 1})")
    return epochs


# --------------------------------------------------------------------------------------- trajectories
class PlainTrajectory:
    """A stored expert θ*_0 … θ*_K (MTT). `at(t)` is exact at integers and linear in between."""

    def __init__(self, checkpoints: TrajectoryLike, metadata: Mapping[str, Any] | None = None) -> None:
        self.checkpoints = _as_matrix(checkpoints)
        self.metadata: dict[str, Any] = dict(metadata or {})

    @property
    def num_epochs(self) -> int:
        """K: the number of training epochs (checkpoints - 1)."""
        return self.checkpoints.shape[0] - 1

    @property
    def num_params(self) -> int:
        return self.checkpoints.shape[1]

    @property
    def layer_sizes(self) -> tuple[int, ...] | None:
        """Parameter-tensor sizes from the metadata's ``param_shapes``, or None when not recorded."""
        shapes = self.metadata.get("param_shapes")
        return None if shapes is None else tuple(math.prod(shape) for shape in shapes)

    def checkpoint(self, epoch: int) -> Tensor:
        """θ*_epoch as a new float32 vector."""
        valid = isinstance(epoch, numbers.Integral) and not isinstance(epoch, bool)
        if not valid or not 0 <= epoch <= self.num_epochs:
            raise ValueError(f"epoch={epoch!r} must be an integer in 0..{self.num_epochs}")
        return self.checkpoints[epoch].to(torch.float32, copy=True)

    def at(self, t: float) -> Tensor:
        """θ*(t): the checkpoint at integer t, linear interpolation of its two neighbours otherwise."""
        t = _check_time(t, self.num_epochs)
        low = min(int(t), self.num_epochs - 1)
        frac = t - low
        if frac == 0.0:
            return self.checkpoint(low)
        return torch.lerp(self.checkpoints[low].float(), self.checkpoints[low + 1].float(), frac)

    def to(self, device: torch.device | str) -> PlainTrajectory:
        """A copy with the checkpoints on `device`."""
        return PlainTrajectory(self.checkpoints.to(device), self.metadata)

    def save(self, path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> Path:
        return save_trajectory(path, self.checkpoints, self.metadata, dtype=dtype)


class ConvexTrajectory:
    """MCT convexified trajectory (docs/method.md section 3): θ̂(t) = (1 − β(t))·θ_a + β(t)·θ_b per layer.

    Between consecutive anchors a < b, β_l(t) rises from 0 to 1, taken from the `beta` table (see the
    module docstring) and interpolated linearly for fractional t.
    """

    def __init__(self, anchors: Tensor, anchor_epochs: Sequence[int], beta: Tensor,
                 layer_sizes: Sequence[int], metadata: Mapping[str, Any] | None = None,
                 beta_mode: str = "arclength", smooth_anchors: bool = False) -> None:
        anchors = torch.as_tensor(anchors).detach()
        epochs = [int(e) for e in anchor_epochs]
        if anchors.dim() != 2 or anchors.shape[0] < 2 or anchors.shape[0] != len(epochs):
            raise ValueError(f"anchors has shape {tuple(anchors.shape)}; expected [n, P] with n = "
                             f"len(anchor_epochs) = {len(epochs)} >= 2")
        if epochs[0] != 0 or any(b <= a for a, b in zip(epochs, epochs[1:], strict=False)):
            raise ValueError(f"anchor_epochs={epochs} must start at 0 and increase strictly")
        if beta_mode not in BETA_MODES:
            raise ValueError(f"beta_mode={beta_mode!r} is not supported; allowed: {', '.join(BETA_MODES)}")
        self.layer_sizes = _check_layer_sizes(layer_sizes, anchors.shape[1])
        beta = torch.as_tensor(beta).detach().to(torch.float32)
        if beta.shape != (epochs[-1] + 1, len(self.layer_sizes)):
            raise ValueError(f"beta has shape {tuple(beta.shape)}; expected [K+1, L] = "
                             f"[{epochs[-1] + 1}, {len(self.layer_sizes)}]")
        starts = beta[epochs[:-1]]
        if not (bool((starts == 0).all()) and bool((beta[-1] == 1).all())
                and bool(((beta >= 0) & (beta <= 1)).all())):
            raise ValueError("beta must lie in [0, 1], be 0 at every anchor epoch but the last "
                             "and 1 at epoch K")
        self.anchors = anchors.to(torch.float32)
        self.anchor_epochs = tuple(epochs)
        self.beta = beta
        self.metadata: dict[str, Any] = dict(metadata or {})
        self.beta_mode = beta_mode
        self.smooth_anchors = bool(smooth_anchors)
        self._index = _layer_index(self.layer_sizes).to(self.anchors.device)

    @classmethod
    def from_checkpoints(cls, checkpoints: TrajectoryLike, layer_sizes: Sequence[int] | None = None,
                         num_anchors: int = 2, beta: str = "arclength", smooth_anchors: bool | None = None,
                         metadata: Mapping[str, Any] | None = None) -> ConvexTrajectory:
        """Convexify an expert (docs/method.md section 3).

        Anchors: `anchor_epochs(K, num_anchors)`. With `smooth_anchors` (default: on when num_anchors > 2,
        as in the authors' buffer script [C]) every interior anchor a is replaced by (θ_{a−1} + θ_{a+1})/2
        and the final one by (θ_{K−1} + θ_K)/2; θ_0 is kept.

        β ("arclength", [C]): per layer l,
        β_l(e) = Σ_{a<i≤e} ‖θ^l_i − θ^l_{i−1}‖ / Σ_{a<i≤b} ‖θ^l_i − θ^l_{i−1}‖ on the original
        checkpoints; a layer that does not move in a segment gets the uniform ramp.
        "uniform": β(e) = (e − a)/(b − a).

        `layer_sizes` splits the flat vector into layers with their own β; None takes the parameter
        shapes recorded in a `PlainTrajectory`'s metadata, else one layer. `metadata` defaults to the
        `PlainTrajectory`'s.
        """
        if beta not in BETA_MODES:
            raise ValueError(f"beta={beta!r} is not supported; allowed: {', '.join(BETA_MODES)}")
        if isinstance(checkpoints, PlainTrajectory):
            layer_sizes = layer_sizes if layer_sizes is not None else checkpoints.layer_sizes
            metadata = metadata if metadata is not None else checkpoints.metadata
        matrix = _as_matrix(checkpoints)
        num_epochs, num_params = matrix.shape[0] - 1, matrix.shape[1]
        sizes = _check_layer_sizes(layer_sizes if layer_sizes is not None else (num_params,), num_params)
        epochs = anchor_epochs(num_epochs, num_anchors)
        if beta == "uniform":
            steps = torch.ones(num_epochs, len(sizes), dtype=torch.float64)
        else:
            steps = layer_step_norms(matrix, sizes)
        table = torch.ones(num_epochs + 1, len(sizes), dtype=torch.float64)
        for a, b in zip(epochs, epochs[1:], strict=False):
            segment = steps[a:b]
            total = segment.sum(dim=0)
            segment = torch.where(total > 0, segment, torch.ones_like(segment))
            table[a] = 0.0
            table[a + 1:b] = (segment.cumsum(dim=0) / segment.sum(dim=0))[:-1]
        smooth = num_anchors > 2 if smooth_anchors is None else smooth_anchors
        anchors = matrix[epochs].to(torch.float32, copy=True)
        if smooth:
            for j, e in enumerate(epochs[1:], start=1):
                neighbours = (e - 1, e + 1) if e < num_epochs else (e - 1, e)
                anchors[j] = (matrix[neighbours[0]].float() + matrix[neighbours[1]].float()) / 2
        return cls(anchors, epochs, table.clamp(0.0, 1.0).float(), sizes, metadata=metadata,
                   beta_mode=beta, smooth_anchors=smooth)

    @property
    def num_epochs(self) -> int:
        """K: the epoch of the last anchor."""
        return self.anchor_epochs[-1]

    @property
    def num_params(self) -> int:
        return self.anchors.shape[1]

    @property
    def num_anchors(self) -> int:
        return self.anchors.shape[0]

    def beta_at(self, t: float) -> tuple[int, Tensor]:
        """(segment j, β(t) per layer) for a real t in [0, K]; θ̂(t) lies between anchors j and j+1."""
        t = _check_time(t, self.num_epochs)
        segment = min(bisect.bisect_right(self.anchor_epochs, t) - 1, self.num_anchors - 2)
        end = self.anchor_epochs[segment + 1]
        low = min(int(t), end - 1)
        upper = self.beta[low + 1] if low + 1 < end else torch.ones_like(self.beta[low])
        return segment, torch.lerp(self.beta[low], upper, t - low)

    def at(self, t: float) -> Tensor:
        """θ̂(t) as a flat float32 vector; exactly the anchor at anchor epochs."""
        segment, beta = self.beta_at(t)
        weight = beta.to(self.anchors.device)[self._index]
        return torch.lerp(self.anchors[segment], self.anchors[segment + 1], weight)

    def to(self, device: torch.device | str) -> ConvexTrajectory:
        """A copy with the anchors on `device`."""
        return ConvexTrajectory(self.anchors.to(device), self.anchor_epochs, self.beta, self.layer_sizes,
                                self.metadata, self.beta_mode, self.smooth_anchors)

    def save(self, path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> Path:
        """Write the compact form (anchors + β table + metadata), see the module docstring."""
        tensors = {
            "anchors": _storage_cast(self.anchors, dtype),
            "anchor_epochs": torch.tensor(self.anchor_epochs, dtype=torch.int64),
            "beta": self.beta.cpu().contiguous(),
            "layer_sizes": torch.tensor(self.layer_sizes, dtype=torch.int64),
        }
        header = {"beta_mode": self.beta_mode, "smooth_anchors": str(int(self.smooth_anchors))}
        return _write(path, "convex", tensors, self.metadata, header)


Trajectory = PlainTrajectory | ConvexTrajectory
TrajectoryLike = Sequence[Tensor] | Tensor | Trajectory


# --------------------------------------------------------------------------------------------- files
def _storage_cast(matrix: Tensor, dtype: torch.dtype) -> Tensor:
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"dtype={dtype} is not supported for storage; allowed: "
                         f"{', '.join(str(d) for d in STORAGE_DTYPES)}")
    return matrix.detach().to(device="cpu", dtype=dtype).contiguous()


def _write(path: str | os.PathLike, kind: str, tensors: dict[str, Tensor], metadata: Mapping[str, Any],
           header: Mapping[str, str] | None = None) -> Path:
    try:
        text = json.dumps(dict(metadata), sort_keys=True)
    except TypeError as exc:
        raise ValueError(f"metadata must be JSON-serialisable ({exc})") from exc
    full = {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": kind, "metadata": text,
            **(header or {})}
    return atomic_write_safetensors(path, tensors, full)


def save_trajectory(path: str | os.PathLike, checkpoints: TrajectoryLike, metadata: Mapping[str, Any],
                    dtype: torch.dtype = torch.float32) -> Path:
    """Atomically write a plain expert file: a ``[K+1, P]`` tensor in `dtype` plus JSON metadata."""
    return _write(path, "plain", {"checkpoints": _storage_cast(_as_matrix(checkpoints), dtype)}, metadata)


def _read_header(handle: Any, path: Path) -> tuple[str, dict[str, str], dict[str, Any]]:
    """(kind, raw header, parsed user metadata) of an open safetensors file, validated."""
    header = handle.metadata() or {}
    if header.get("format") != FORMAT or header.get("kind") not in KINDS or "metadata" not in header:
        raise ValueError(f"{path} is not an ast-dd trajectory file: header metadata {sorted(header)} lacks "
                         f"format={FORMAT!r}, kind in {KINDS} or metadata")
    if header.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} has format_version={header.get('format_version')!r}; "
                         f"this code reads {FORMAT_VERSION!r}")
    try:
        metadata = json.loads(header["metadata"])
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} has corrupted JSON metadata ({exc})") from exc
    if not isinstance(metadata, dict):
        raise ValueError(f"{path} metadata must be a JSON object, got {type(metadata).__name__}")
    return header["kind"], header, metadata


def _open(path: str | os.PathLike, with_tensors: bool) -> tuple[str, dict[str, str], dict[str, Any],
                                                                   dict[str, Tensor]]:
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"trajectory file {file} does not exist")
    try:
        with safe_open(str(file), framework="pt") as handle:
            kind, header, metadata = _read_header(handle, file)
            names = list(handle.keys()) if with_tensors else []
            tensors = {name: handle.get_tensor(name) for name in names}
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{file} is not a readable safetensors file (corrupted or truncated?): {exc}; delete "
                         "it and train (or convexify) that expert again") from exc
    return kind, header, metadata, tensors


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON metadata of a trajectory file, reading only its header."""
    return _open(path, with_tensors=False)[2]


def _expect_tensors(tensors: Mapping[str, Tensor], names: set[str]) -> None:
    if set(tensors) != names:
        raise ValueError(f"the file holds tensors {sorted(tensors)}; expected {sorted(names)}")


def _check_finite(tensors: Mapping[str, Tensor]) -> None:
    """Every stored value must be finite: a NaN or inf expert would only make distillation skip iterations."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"`{name}` holds NaN or infinite values (a diverged expert or a damaged file); "
                             "delete the file and retrain that expert (with a lower lr if it diverged)")


def load_trajectory(path: str | os.PathLike) -> Trajectory:
    """Load a plain (`PlainTrajectory`) or convexified (`ConvexTrajectory`) expert file, with checks (non-finite
    values are a ValueError naming the file)."""
    file = Path(path)
    kind, header, metadata, tensors = _open(file, with_tensors=True)
    try:
        _check_finite(tensors)
        if kind == "plain":
            _expect_tensors(tensors, {"checkpoints"})
            trajectory = PlainTrajectory(tensors["checkpoints"], metadata)
            layer_sizes = trajectory.layer_sizes
            if layer_sizes is not None:
                _check_layer_sizes(layer_sizes, trajectory.num_params)
            return trajectory
        _expect_tensors(tensors, {"anchors", "anchor_epochs", "beta", "layer_sizes"})
        return ConvexTrajectory(tensors["anchors"], tensors["anchor_epochs"].tolist(), tensors["beta"],
                                tensors["layer_sizes"].tolist(), metadata=metadata,
                                beta_mode=header.get("beta_mode", ""),
                                smooth_anchors=header.get("smooth_anchors") == "1")
    except ValueError as exc:
        raise ValueError(f"{file}: {exc}") from exc


# -------------------------------------------------------------------------------------- buffer folder
def convex_tag(num_anchors: int, beta: str = "arclength") -> str:
    """File tag of a convexified expert: ``mct{n}`` (arclength β) or ``mct{n}u`` (uniform β)."""
    if beta not in BETA_MODES:
        raise ValueError(f"beta={beta!r} is not supported; allowed: {', '.join(BETA_MODES)}")
    return f"mct{num_anchors}" + ("u" if beta == "uniform" else "")


def expert_path(folder: str | os.PathLike, index: int, tag: str | None = None) -> Path:
    """``folder/expert_{index:03d}.safetensors``, or ``expert_{index:03d}.{tag}.safetensors``."""
    if tag is not None and not _TAG.match(tag):
        raise ValueError(f"tag={tag!r} must be letters, digits, '_' or '-'")
    return Path(folder) / f"expert_{index:03d}{'.' + tag if tag else ''}.safetensors"


def list_buffer(folder: str | os.PathLike, tag: str | None = None) -> list[Path]:
    """Expert files of a buffer folder (plain, or those with `tag`), ordered by expert index."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"buffer folder {root} does not exist")
    suffix = re.escape(f".{tag}") if tag else ""
    pattern = re.compile(rf"^expert_(\d+){suffix}\.safetensors$")
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := pattern.match(p.name))]
    return [p for _, p in sorted(found)]


def load_buffer(folder: str | os.PathLike, tag: str | None = None,
                limit: int | None = None) -> list[Trajectory]:
    """Load the (first `limit`) experts of a buffer folder; FileNotFoundError when there are none."""
    paths = list_buffer(folder, tag)[:limit]
    if not paths:
        raise FileNotFoundError(f"no expert files {expert_path(folder, 0, tag).name}, ... in {folder}")
    return [load_trajectory(p) for p in paths]


def convexify_buffer(folder: str | os.PathLike, num_anchors: int = 2, beta: str = "arclength",
                     smooth_anchors: bool | None = None, dtype: torch.dtype = torch.float32,
                     overwrite: bool = False, out_dir: str | os.PathLike | None = None,
                     limit: int | None = None) -> list[Path]:
    """Write ``expert_XXX.<convex_tag>.safetensors`` for every (first `limit`) plain expert of `folder`,
    into `out_dir` (default: beside the experts); returns their paths."""
    tag = convex_tag(num_anchors, beta)
    sources = list_buffer(folder)[:limit]
    if not sources:
        raise FileNotFoundError(f"no expert files expert_000.safetensors, ... in {folder}")
    target_dir = Path(out_dir) if out_dir is not None else Path(folder)
    target_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for source in sources:
        target = target_dir / source.name.replace(".safetensors", f".{tag}.safetensors")
        if overwrite or not target.exists():
            plain = load_trajectory(source)
            convex = ConvexTrajectory.from_checkpoints(plain, num_anchors=num_anchors, beta=beta,
                                                       smooth_anchors=smooth_anchors)
            convex.save(target, dtype=dtype)
        written.append(target)
    return written
