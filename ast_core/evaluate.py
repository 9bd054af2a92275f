"""Train-on-synthetic evaluation protocol (docs/method.md section 5).

Fresh randomly initialised networks are trained on a (synthetic or coreset) image set with SGD (momentum
0.9, weight decay 5e-4, batch 256 or the whole set if smaller, DSA on every batch) and scored on the test
split, or on the validation split for model selection without test leakage. An `EvalSpec` (declared in
`ast_core.settings`, validated on construction) says which networks (architecture, width, depth), how many,
how long and on which split. Two schedules (`EvalSpec.protocol`):

- protocol "ast" [P]: `iterations` SGD steps, learning rate halved at `iterations // 2`;
- protocol "mtt" [C]: `iterations` epochs over the set, learning rate x0.1 at epoch `iterations // 2`.

`train_on_real` gives the full-dataset upper bound with the same optimiser and the spec's networks: a few
epochs on the whole training split, learning rate halved at half. Network i is initialised, shuffled and
augmented from seed `seed + i` only, so results are repeatable on the CPU.

With `EvalSpec.batched` (the default) ConvNet's K networks train at once as one `ConvNetEnsemble` (one
kernel call per layer for all of them) where that is faster: on a GPU, and on the CPU when one network's batch
is small (at most CPU_ENSEMBLE_BATCH images), where per-call overhead dominates; larger CPU batches are
bandwidth-bound and run faster one network at a time (BENCHMARKS.md, section d). Each network keeps its own
seed, batch order and DSA draws, so the scores equal those of training them one at a time (`batched=False`,
the reference) up to floating-point rounding. Other architectures train one at a time.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ast_core.augment import DSA
from ast_core.data import DatasetSplits
from ast_core.models import ConvNetEnsemble, build_model
from ast_core.settings import EVAL_SPLITS, PROTOCOLS, EvalSpec, dsa_strategy_for, is_positive_int
from ast_core.statistics import sample_std

__all__ = ["EVAL_SPLITS", "PROTOCOLS", "EvalResult", "EvalSpec", "evaluate_synthetic", "schedule", "train_on_real"]

MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
EVAL_BATCH = 1024  # scoring batch of one network; an ensemble of K scores EVAL_BATCH // K images at a time
# protocol -> (does `iterations` count epochs?, learning-rate factor applied at half); "real" = train_on_real.
_SCHEDULES = {"ast": (False, 0.5), "mtt": (True, 0.1), "real": (True, 0.5)}
CPU_ENSEMBLE_BATCH = 16  # images per network batch up to which the CPU trains the networks at once
log = logging.getLogger(__name__)


@dataclass
class EvalResult:
    """Accuracy (%) over `len(seeds)` networks: mean, sample std (ddof 1; 0.0 for one network), each network's
    score and seed."""

    mean: float
    std: float
    accuracies: list[float]
    seeds: list[int]
    protocol: str
    arch: str
    iterations: int
    eval_split: str
    lr: float

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dictionary of every field."""
        return asdict(self)


def _validate(images: Tensor, labels: Tensor, lr: float | Tensor, data: DatasetSplits) -> float:
    """Check the per-call arguments before any compute (the spec checked itself); return lr as a Python float."""
    try:
        lr_value = float(lr.detach()) if isinstance(lr, Tensor) else float(lr)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"lr={lr!r} must be one finite positive number (float or 1-element tensor)") from exc
    if not math.isfinite(lr_value) or lr_value <= 0:
        raise ValueError(f"lr={lr_value!r} must be a finite positive number")
    info = data.info
    expected = (info.channels, info.image_size, info.image_size)
    if images.dim() != 4 or tuple(images.shape[1:]) != expected or images.shape[0] == 0:
        raise ValueError(f"images has shape {tuple(images.shape)}; expected N x "
                         f"{' x '.join(map(str, expected))}")
    if labels.is_floating_point():  # soft labels: one probability row per image (DATM)
        if labels.dim() != 2 or tuple(labels.shape) != (images.shape[0], info.num_classes):
            raise ValueError(f"soft labels have shape {tuple(labels.shape)}; expected {images.shape[0]} x "
                             f"{info.num_classes} (one probability row per image)")
        rows = labels.double().sum(dim=1)
        if not (torch.isfinite(labels).all() and (labels >= 0).all() and torch.allclose(rows, torch.ones_like(rows),
                                                                                       atol=1e-4)):
            raise ValueError("soft labels must be finite, >= 0 and sum to 1 per image (softmax of the logits)")
    elif labels.dim() != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(f"labels has shape {tuple(labels.shape)} and dtype {labels.dtype}; expected "
                         f"{images.shape[0]} integer (hard) labels, one per image, or {images.shape[0]} x "
                         f"{info.num_classes} soft labels")
    elif labels.min() < 0 or labels.max() >= info.num_classes:
        raise ValueError(f"labels must lie in [0, {info.num_classes}), got [{int(labels.min())}, "
                         f"{int(labels.max())}]")
    if not torch.isfinite(images).all():
        raise ValueError("images contains NaN or infinite values")
    return lr_value


def _new_model(data: DatasetSplits, spec: EvalSpec, seed: int, device: torch.device) -> nn.Module:
    """A freshly initialised network of the spec's architecture, width and depth (those of the student and
    experts when the spec comes from params) whose weights depend only on `seed` (global RNG left untouched)."""
    info = data.info
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(spec.arch, info.channels, info.num_classes, info.image_size, width=spec.width,
                            depth=spec.depth)
    return model.to(device)


def schedule(protocol: str, iterations: int, steps_per_epoch: int) -> tuple[int, int, float]:
    """(total SGD steps, step at which the lr is scaled, factor) of protocol "ast", "mtt" or "real"."""
    counts_epochs, factor = _SCHEDULES[protocol]
    if counts_epochs:
        return iterations * steps_per_epoch, (iterations // 2) * steps_per_epoch, factor
    return iterations, iterations // 2, factor


class _Single(nn.Module):
    """One network behind the ensemble interface (1 x B x C x H x W -> 1 x B x classes)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x[0]).unsqueeze(0)


def networks_at_once(spec: EvalSpec, batch: int, device: torch.device) -> int:
    """How many of the spec's networks train together (`ConvNetEnsemble`) when each network's batch holds
    `batch` images: all of them on a GPU or for a small CPU batch, else one."""
    count = spec.num_models
    if not spec.batched or count == 1 or (device.type == "cpu" and batch > CPU_ENSEMBLE_BATCH):
        return 1
    if spec.arch != "convnet":
        log.info("evaluate: %s trains its %d networks one at a time (batched training covers convnet)",
                 spec.arch, count)
        return 1
    return count


def _train(model: nn.Module, x: Tensor, y: Tensor, lr: float, protocol: str, iterations: int, batch_size: int,
           dsa: DSA, generators: list[torch.Generator], progress: bool) -> None:
    """SGD with momentum and weight decay under the protocol's schedule; batches reshuffled every epoch.

    `model` maps K x B x C x H x W to K x B x classes (a `ConvNetEnsemble`, or `_Single` for K = 1);
    network k draws its batch order and DSA parameters from `generators[k]` alone, and the loss is the sum
    of the K networks' mean cross-entropies, so each network trains as it would by itself. Float `y` rows are
    soft labels (probabilities), learned with the soft cross-entropy -sum_c p_c log q_c (DATM's evaluation).
    """
    batch = min(batch_size, x.shape[0])
    steps_per_epoch = math.ceil(x.shape[0] / batch)
    total, milestone, factor = schedule(protocol, iterations, steps_per_epoch)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    model.train()
    orders: list[Tensor] = []
    for step in tqdm(range(total), disable=not progress, leave=False):
        if step == milestone:
            for group in optimizer.param_groups:
                group["lr"] = lr * factor
        position = step % steps_per_epoch
        if position == 0:
            orders = [torch.randperm(x.shape[0], generator=g).to(x.device) for g in generators]
        indices = [order[position * batch:(position + 1) * batch] for order in orders]
        inputs = torch.stack([dsa(x[idx], generator=g) for idx, g in zip(indices, generators, strict=True)])
        targets = torch.stack([y[idx] for idx in indices])
        losses = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten(0, 1), reduction="none")
        loss = losses.view(len(generators), -1).mean(dim=1).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, device: torch.device) -> float:
    """Top-1 accuracy (%) in batches of EVAL_BATCH, no gradients, eval mode."""
    return _accuracies(_Single(model), 1, x, y, device)[0]


@torch.no_grad()
def _accuracies(model: nn.Module, count: int, x: Tensor, y: Tensor, device: torch.device) -> list[float]:
    """Top-1 accuracy (%) of each of the `count` networks behind `model` (K x B x ... -> K x B x classes)."""
    model.eval()
    dtype = next(model.parameters()).dtype
    batch = max(1, EVAL_BATCH // count)
    correct = torch.zeros(count, dtype=torch.int64)
    for i in range(0, x.shape[0], batch):
        images = x[i:i + batch].to(device, dtype)
        logits = model(images.unsqueeze(0).expand(count, *images.shape))
        correct += (logits.argmax(dim=2).cpu() == y[i:i + batch].cpu()).sum(dim=1)
    return [100.0 * int(c) / x.shape[0] for c in correct]


def _run(images: Tensor, labels: Tensor, lr: float | Tensor, data: DatasetSplits, spec: EvalSpec, *,
         protocol: str, iterations: int, seed: int, dsa_strategy: str | None, device: str,
         progress: bool | str) -> EvalResult:
    """Validate, then train `spec.num_models` networks (seeds seed, seed+1, ...) under the schedule of
    (`protocol`, `iterations`) and score them on `spec.eval_split`."""
    lr_value = _validate(images, labels, lr, data)
    dsa = DSA(dsa_strategy if dsa_strategy is not None else dsa_strategy_for(data.info.name))
    dev = torch.device(device)
    x = images.detach().to(dev, torch.get_default_dtype())
    y = labels.detach().to(dev, x.dtype if labels.is_floating_point() else torch.int64)
    eval_x, eval_y = (data.test_x, data.test_y) if spec.eval_split == "test" else (data.val_x, data.val_y)
    seeds = [int(seed) + i for i in range(spec.num_models)]
    label = progress if isinstance(progress, str) else f"eval {spec.arch}/{protocol}"
    together = networks_at_once(spec, min(spec.batch_size, x.shape[0]), dev)
    groups = [seeds[i:i + together] for i in range(0, len(seeds), together)]
    accuracies: list[float] = []
    for group in tqdm(groups, disable=not progress or together > 1, desc=label, unit="network"):
        networks = [_new_model(data, spec, s, dev) for s in group]
        model = ConvNetEnsemble(networks) if len(group) > 1 else _Single(networks[0])
        _train(model, x, y, lr_value, protocol, iterations, spec.batch_size, dsa,
               [torch.Generator().manual_seed(s) for s in group], bool(progress))
        accuracies += _accuracies(model, len(group), eval_x, eval_y, dev)
    return EvalResult(mean=float(np.mean(accuracies)), std=sample_std(accuracies), accuracies=accuracies,
                      seeds=seeds, protocol=protocol, arch=spec.arch, iterations=iterations,
                      eval_split=spec.eval_split, lr=lr_value)


def evaluate_synthetic(images: Tensor, labels: Tensor, lr: float | Tensor, data: DatasetSplits, spec: EvalSpec,
                       seed: int = 0, dsa_strategy: str | None = None, device: str = "cpu",
                       progress: bool | str = False) -> EvalResult:
    """Score a synthetic set (docs/method.md section 5): train `spec.num_models` fresh networks on it with
    lr = learned α, `spec.iterations` long under `spec.protocol`, and score them on `spec.eval_split`.
    `labels`: class indices, or an images x classes matrix of soft labels (probabilities, soft cross-entropy).

    `dsa_strategy=None` uses `dsa_strategy_for(data.info.name)`; `"none"` disables augmentation. `progress`:
    show progress bars, labelled with it when it is a string.
    """
    return _run(images, labels, lr, data, spec, protocol=spec.protocol, iterations=spec.iterations, seed=seed,
                dsa_strategy=dsa_strategy, device=device, progress=progress)


def train_on_real(data: DatasetSplits, spec: EvalSpec, epochs: int = 10, lr: float = 0.01, seed: int = 0,
                  dsa_strategy: str | None = None, device: str = "cpu", progress: bool | str = False) -> EvalResult:
    """Full-dataset upper bound (docs/method.md section 5): the spec's networks, `epochs` epochs on the whole
    train split, lr halved at half.

    The full-data schedule replaces the spec's protocol and iterations: the result has protocol "real" and
    `iterations` = epochs.
    """
    if not is_positive_int(epochs):
        raise ValueError(f"epochs={epochs!r} must be a positive integer")
    return _run(data.train_x, data.train_y, lr, data, spec, protocol="real", iterations=epochs, seed=seed,
                dsa_strategy=dsa_strategy, device=device, progress=progress)
