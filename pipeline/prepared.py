"""The prepared dataset every stage after `prepare` reads: cached tensors, optional ZCA, device choice."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor

from ast_core.data import DatasetSplits, load_dataset
from ast_core.io import atomic_write_safetensors
from ast_core.zca import ZCA
from pipeline.checks import check_data
from pipeline.layout import PREPARE
from pipeline.params import Params
from pipeline.schema import ParamsError

CACHE = PREPARE / "cache"
ZCA_FILE = PREPARE / "zca.safetensors"


def resolve_device(choice: str) -> torch.device:
    """'auto' -> CUDA when available, else CPU; 'cuda' without a GPU is an error naming the key."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: 'cuda' was requested but no CUDA device is visible; use 'auto' or 'cpu'")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


@dataclass
class Prepared:
    """Dataset splits in the space distillation works in, and the map back to [0, 1] pixels."""

    data: DatasetSplits
    zca: ZCA | None

    def to_pixels(self, x: Tensor) -> Tensor:
        """Inverse ZCA (when used) then inverse mean/std normalisation (identity on raw pixels), for pictures."""
        x = x.detach().cpu()
        if self.zca is not None:
            x = self.zca.inverse(x.to(self.zca.device)).cpu()
        return self.data.denormalize(x).clamp(0, 1)

    def from_pixels(self, x: Tensor) -> Tensor:
        """[0, 1] pixels into the space distillation works in: mean/std normalisation (when used), then ZCA (when
        used); the inverse of `to_pixels` on unclamped values."""
        mean = torch.tensor(self.data.info.mean, dtype=x.dtype).view(-1, 1, 1)
        std = torch.tensor(self.data.info.std, dtype=x.dtype).view(-1, 1, 1)
        x = (x.detach().cpu() - mean) / std
        return self.zca.transform(x.to(self.zca.device)).cpu() if self.zca is not None else x


def zca_on_raw_pixels(params: Params) -> bool:
    """True when ZCA is fitted on and applied to [0, 1] pixels (data.zca_fit: raw, the MTT/AST code form)."""
    return params.data.zca and params.data.zca_fit == "raw"


def load_raw(params: Params, download: bool) -> DatasetSplits:
    """The splits before ZCA: [0, 1] pixels under a raw-pixel ZCA, else mean/std-normalised; checked to suit
    the settings (`check_data`: classes, ipc) before any stage computes with them."""
    data = load_dataset(params.data.dataset, root=params.data.root, val_size=params.data.val_size,
                        seed=params.seed, cache_dir=str(CACHE), download=download,
                        normalize=not zca_on_raw_pixels(params))
    check_data(params, data)
    return data


def fit_and_save_zca(params: Params, data: DatasetSplits) -> ZCA:
    """Fit ZCA on `data.train_x` (from `load_raw`) and save it with the form it was fitted in."""
    zca = ZCA.fit(data.train_x, eps=params.data.zca_eps)
    state = {k: v.contiguous().cpu() for k, v in zca.state_dict().items()}
    meta = {"zca_fit": params.data.zca_fit}
    atomic_write_safetensors(ZCA_FILE, state, meta)
    return zca


def load_zca(params: Params) -> ZCA:
    """The saved ZCA, checked to be fitted with this run's data.zca_fit and data.zca_eps (else stale)."""
    if not ZCA_FILE.is_file():
        raise FileNotFoundError(f"{ZCA_FILE} is missing: run `ast-dd prepare` (or `dvc repro prepare`) first")
    with safe_open(str(ZCA_FILE), framework="pt") as handle:
        fitted_on = (handle.metadata() or {}).get("zca_fit", "normalized")  # files from before the key
    zca = ZCA.from_state_dict(load_file(str(ZCA_FILE)))
    if (fitted_on, zca.eps) != (params.data.zca_fit, params.data.zca_eps):
        raise ValueError(f"{ZCA_FILE} was fitted with data.zca_fit={fitted_on}, zca_eps={zca.eps} but params say "
                         f"{params.data.zca_fit}, {params.data.zca_eps}: run `ast-dd prepare` again")
    return zca


def load_prepared(params: Params) -> Prepared:
    """Read the prepare stage's cache (never downloads) and apply ZCA when params.data.zca is set."""
    data = load_raw(params, download=False)
    if not params.data.zca:
        return Prepared(data, None)
    zca = load_zca(params)
    whitened = {name: zca.transform(getattr(data, name)) for name in ("train_x", "val_x", "test_x")}
    return Prepared(dataclasses.replace(data, **whitened), zca)


def class_balanced_subset(data: DatasetSplits, size: int | None, seed: int) -> DatasetSplits:
    """The same splits with the training part cut to `size` samples, equally many per class (seeded)."""
    if size is None or size >= len(data.train_y):
        return data
    if size < data.info.num_classes:
        raise ParamsError(f"buffer.train_size: {size} is fewer than the {data.info.num_classes} classes of "
                          f"{data.info.name}: the experts need an image of every class; set it to >= "
                          f"{data.info.num_classes} or null (the whole training split)")
    per_class = max(1, size // data.info.num_classes)
    generator = torch.Generator().manual_seed(seed)
    keep = []
    for cls in range(data.info.num_classes):
        members = torch.nonzero(data.train_y == cls).flatten()
        keep.append(members[torch.randperm(len(members), generator=generator)[:per_class]])
    index = torch.cat(keep).sort().values
    return dataclasses.replace(data, train_x=data.train_x[index], train_y=data.train_y[index])
