"""Train-on-synthetic evaluation protocol (docs/method.md section 5).

Fresh randomly initialised networks are trained on a (synthetic or coreset) image set with SGD (momentum
0.9, weight decay 5e-4, batch 256 or the whole set if smaller, DSA on every batch) and scored on the test
split, or on the validation split for model selection without test leakage. Two schedules:

- protocol "ast" [P]: `iterations` SGD steps, learning rate halved at `iterations // 2`;
- protocol "mtt" [C]: `iterations` epochs over the set, learning rate x0.1 at epoch `iterations // 2`.

`train_on_real` gives the full-dataset upper bound with the same optimiser: a few epochs on the whole
training split, learning rate halved at half. Network i is initialised, shuffled and augmented from seed
`seed + i` only, so results are repeatable on the CPU.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ast_core.augment import DSA, dsa_strategy_for
from ast_core.data import DatasetSplits
from ast_core.models import build_model
from ast_core.settings import ARCHITECTURES, PROTOCOLS

__all__ = ["EVAL_SPLITS", "PROTOCOLS", "EvalResult", "evaluate_synthetic", "schedule", "train_on_real"]

EVAL_SPLITS = ("test", "val")
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
EVAL_BATCH = 1024
# protocol -> (does `iterations` count epochs?, learning-rate factor applied at half); "real" = train_on_real.
_SCHEDULES = {"ast": (False, 0.5), "mtt": (True, 0.1), "real": (True, 0.5)}


@dataclass
class EvalResult:
    """Accuracy (%) over `len(seeds)` networks: mean, population std (MTT's np.std), each network's score."""

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


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer")


def _validate(images: Tensor, labels: Tensor, lr: float | Tensor, data: DatasetSplits, arch: str,
              num_models: int, iterations: int, batch_size: int, width: int, eval_split: str) -> float:
    """Check every argument before any compute; return the learning rate as a Python float."""
    try:
        lr_value = float(lr.detach()) if isinstance(lr, Tensor) else float(lr)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"lr={lr!r} must be one finite positive number (float or 1-element tensor)") from exc
    if not math.isfinite(lr_value) or lr_value <= 0:
        raise ValueError(f"lr={lr_value!r} must be a finite positive number")
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch={arch!r} is not supported; allowed: {', '.join(ARCHITECTURES)}")
    if eval_split not in EVAL_SPLITS:
        raise ValueError(f"eval_split={eval_split!r} is unknown; allowed: {', '.join(EVAL_SPLITS)}")
    for name, value in (("num_models", num_models), ("iterations", iterations), ("batch_size", batch_size),
                        ("width", width)):
        _positive_int(name, value)
    info = data.info
    expected = (info.channels, info.image_size, info.image_size)
    if images.dim() != 4 or tuple(images.shape[1:]) != expected or images.shape[0] == 0:
        raise ValueError(f"images has shape {tuple(images.shape)}; expected N x "
                         f"{' x '.join(map(str, expected))}")
    if labels.dim() != 1 or labels.shape[0] != images.shape[0] or labels.is_floating_point():
        raise ValueError(f"labels has shape {tuple(labels.shape)} and dtype {labels.dtype}; expected "
                         f"{images.shape[0]} integer (hard) labels, one per image")
    if labels.min() < 0 or labels.max() >= info.num_classes:
        raise ValueError(f"labels must lie in [0, {info.num_classes}), got [{int(labels.min())}, "
                         f"{int(labels.max())}]")
    if not torch.isfinite(images).all():
        raise ValueError("images contains NaN or infinite values")
    return lr_value


def _new_model(data: DatasetSplits, arch: str, width: int, seed: int, device: torch.device) -> nn.Module:
    """A freshly initialised network whose weights depend only on `seed` (global RNG left untouched)."""
    info = data.info
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(arch, info.channels, info.num_classes, info.image_size, width=width)
    return model.to(device)


def schedule(protocol: str, iterations: int, steps_per_epoch: int) -> tuple[int, int, float]:
    """(total SGD steps, step at which the lr is scaled, factor) of protocol "ast", "mtt" or "real"."""
    counts_epochs, factor = _SCHEDULES[protocol]
    if counts_epochs:
        return iterations * steps_per_epoch, (iterations // 2) * steps_per_epoch, factor
    return iterations, iterations // 2, factor


def _train(model: nn.Module, x: Tensor, y: Tensor, lr: float, protocol: str, iterations: int, batch_size: int,
           dsa: DSA, generator: torch.Generator, progress: bool) -> None:
    """SGD with momentum and weight decay under the protocol's schedule; batches reshuffled every epoch."""
    batch = min(batch_size, x.shape[0])
    steps_per_epoch = math.ceil(x.shape[0] / batch)
    total, milestone, factor = schedule(protocol, iterations, steps_per_epoch)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    model.train()
    order = torch.empty(0, dtype=torch.int64)
    for step in tqdm(range(total), disable=not progress, leave=False):
        if step == milestone:
            for group in optimizer.param_groups:
                group["lr"] = lr * factor
        position = step % steps_per_epoch
        if position == 0:
            order = torch.randperm(x.shape[0], generator=generator).to(x.device)
        idx = order[position * batch:(position + 1) * batch]
        loss = F.cross_entropy(model(dsa(x[idx], generator=generator)), y[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, device: torch.device) -> float:
    """Top-1 accuracy (%) in batches of EVAL_BATCH, no gradients, eval mode."""
    model.eval()
    correct = 0
    for i in range(0, x.shape[0], EVAL_BATCH):
        logits = model(x[i:i + EVAL_BATCH].to(device))
        correct += int((logits.argmax(dim=1).cpu() == y[i:i + EVAL_BATCH].cpu()).sum())
    return 100.0 * correct / x.shape[0]


def _run(images: Tensor, labels: Tensor, lr: float | Tensor, data: DatasetSplits, *, arch: str,
         num_models: int, iterations: int, seed: int, protocol: str, batch_size: int,
         dsa_strategy: str | None, device: str, width: int, eval_split: str, progress: bool | str) -> EvalResult:
    """Validate, then train and score `num_models` networks (seeds seed, seed+1, ...)."""
    lr_value = _validate(images, labels, lr, data, arch, num_models, iterations, batch_size, width,
                         eval_split)
    dsa = DSA(dsa_strategy if dsa_strategy is not None else dsa_strategy_for(data.info.name))
    dev = torch.device(device)
    x = images.detach().to(dev, torch.float32)
    y = labels.detach().to(dev, torch.int64)
    eval_x, eval_y = (data.test_x, data.test_y) if eval_split == "test" else (data.val_x, data.val_y)
    seeds = [int(seed) + i for i in range(num_models)]
    accuracies = []
    label = progress if isinstance(progress, str) else f"eval {arch}/{protocol}"
    for s in tqdm(seeds, disable=not progress, desc=label, unit="network"):
        model = _new_model(data, arch, width, s, dev)
        _train(model, x, y, lr_value, protocol, iterations, batch_size, dsa,
               torch.Generator().manual_seed(s), bool(progress))
        accuracies.append(accuracy(model, eval_x, eval_y, dev))
    return EvalResult(mean=float(np.mean(accuracies)), std=float(np.std(accuracies)), accuracies=accuracies,
                      seeds=seeds, protocol=protocol, arch=arch, iterations=iterations, eval_split=eval_split,
                      lr=lr_value)


def evaluate_synthetic(images: Tensor, labels: Tensor, lr: float | Tensor, data: DatasetSplits,
                       arch: str = "convnet", num_models: int = 5, iterations: int = 1000, seed: int = 0,
                       protocol: str = "ast", batch_size: int = 256, dsa_strategy: str | None = None,
                       device: str = "cpu", width: int = 128, eval_split: str = "test",
                       progress: bool | str = False) -> EvalResult:
    """Score a synthetic set: train `num_models` fresh networks on it with lr = learned α (docs/method.md section 5).

    `dsa_strategy=None` uses `dsa_strategy_for(data.info.name)`; `"none"` disables augmentation. `progress`:
    show progress bars, labelled with it when it is a string.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol={protocol!r} is unknown; allowed: {', '.join(PROTOCOLS)}")
    return _run(images, labels, lr, data, arch=arch, num_models=num_models, iterations=iterations, seed=seed,
                protocol=protocol, batch_size=batch_size, dsa_strategy=dsa_strategy, device=device,
                width=width, eval_split=eval_split, progress=progress)


def train_on_real(data: DatasetSplits, arch: str = "convnet", epochs: int = 10, lr: float = 0.01,
                  num_models: int = 1, seed: int = 0, batch_size: int = 256, dsa_strategy: str | None = None,
                  device: str = "cpu", width: int = 128, eval_split: str = "test",
                  progress: bool | str = False) -> EvalResult:
    """Full-dataset upper bound (docs/method.md section 5): `epochs` epochs on the whole train split, lr halved at half.

    The result has protocol "real" and `iterations` = epochs.
    """
    _positive_int("epochs", epochs)
    return _run(data.train_x, data.train_y, lr, data, arch=arch, num_models=num_models, iterations=epochs,
                seed=seed, protocol="real", batch_size=batch_size, dsa_strategy=dsa_strategy, device=device,
                width=width, eval_split=eval_split, progress=progress)
