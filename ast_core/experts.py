"""Expert training: MTT buffers and AST smooth experts (docs/method.md section 2, AST Algorithm 1, Eq. 19).

An expert is a network trained on the real data; its parameters at initialisation and after every
epoch form the trajectory θ*_0 … θ*_K that distillation matches. AST's smooth experts use SGD with
momentum, a learning rate halved mid-training and the loss

    L_SC = λ_e · CE + μ · E_x[(‖∇_x W(x)‖₂ − K)²]        (Eq. 19)

with λ_e from `ast_core.losses.clipped_ce_scale` (switch `clip_ce`) and the gradient penalty
`ast_core.losses.gradient_penalty` (switch `grad_penalty`). Every training batch is augmented with DSA;
the penalty is taken on the un-augmented batch. FTD's flat experts (`sam_rho` > 0) take each step with
the sharpness-aware gradient (SAM, or GSAM with `sam_alpha`; `sharpness_aware_gradients`). Randomness
(initialisation, shuffling, DSA) is derived from the expert's seed only, so the same seed gives
bit-identical checkpoints on the CPU.

`train_experts` fills a buffer folder (format: `ast_core.trajectory`), one file per expert, resuming after a kill.
Where the experts train is an `ExpertScheduler`: `LocalScheduler` (this process, or a process pool) here,
`pipeline.distributed.DaskScheduler` on a cluster. The folder's reports are `ast_core.expert_reports`.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from ast_core.augment import DSA
from ast_core.data import DatasetSplits
from ast_core.evaluate import accuracy
from ast_core.losses import clipped_ce_scale, gradient_penalty, input_gradient_norms
from ast_core.models import FlatModel, build_model, default_depth
from ast_core.settings import ExpertConfig
from ast_core.trajectory import STORAGE_DTYPES, expert_path, read_metadata, save_trajectory, step_sq_norms

GRAD_NORM_KEYS = ("grad_norm_mean", "grad_norm_q10", "grad_norm_q90")
HISTORY_KEYS = ("lr", "train_loss", "train_acc", "gp", "val_acc", "test_acc", *GRAD_NORM_KEYS)
PROBE_SIZE = 512   # training images on which the input-gradient norm is measured after every epoch
_WORKER_STATE: dict[str, Any] = {}


def make_optimizer(model: nn.Module, config: ExpertConfig) -> torch.optim.Optimizer:
    """SGD (no momentum), SGD with `config.momentum` (AST Algorithm 1, lines 5-6) or Adam."""
    params = model.parameters()
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    momentum = config.momentum if config.optimizer == "momentum" else 0.0
    return torch.optim.SGD(params, lr=config.lr, momentum=momentum, weight_decay=config.weight_decay)


def train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor,
                config: ExpertConfig, epoch: int, shuffle: torch.Generator, dsa: DSA,
                dsa_generator: torch.Generator) -> dict[str, Any]:
    """One epoch of AST Algorithm 1: per shuffled minibatch, L_SC of Eq. 19 on the DSA batch, one step.

    `x`, `y` sit on the model's device. Returns the mean loss, running train accuracy (%) on the
    augmented batches, and the mean gradient penalty (None when `grad_penalty` is off).
    """
    model.train()
    scale = (clipped_ce_scale(epoch, config.clip_warmup_epochs, config.clip_start, config.clip_schedule)
             if config.clip_ce else 1.0)
    order = torch.randperm(x.shape[0], generator=shuffle).to(x.device)
    loss_sum, gp_sum, correct = (torch.zeros((), device=x.device) for _ in range(3))  # summed on device: no syncs
    for start in range(0, x.shape[0], config.batch_size):
        index = order[start:start + config.batch_size]
        inputs, labels = x[index], y[index]
        augmented = dsa(inputs, generator=dsa_generator)
        batch_loss = functools.partial(expert_loss, model, augmented, inputs, labels, config, scale)
        optimizer.zero_grad(set_to_none=True)
        loss, logits, penalty = batch_loss()
        loss.backward()
        if config.sam_rho:
            sharpness_aware_gradients(model, batch_loss, config.sam_rho, config.sam_alpha)
        optimizer.step()
        if penalty is not None:
            gp_sum += penalty.detach() * index.numel()
        loss_sum += loss.detach() * index.numel()
        correct += (logits.detach().argmax(dim=1) == labels).sum()
    n = x.shape[0]
    return {"train_loss": float(loss_sum) / n, "train_acc": 100.0 * float(correct) / n,
            "gp": float(gp_sum) / n if config.grad_penalty else None}


def expert_loss(model: nn.Module, augmented: Tensor, inputs: Tensor, labels: Tensor, config: ExpertConfig,
                scale: float) -> tuple[Tensor, Tensor, Tensor | None]:
    """(L_SC of Eq. 19, logits, penalty or None) of one batch at the model's current weights: `scale` times the
    CE on the augmented batch, plus the input-gradient penalty on the un-augmented one."""
    logits = model(augmented)
    loss = scale * F.cross_entropy(logits, labels)
    if not config.grad_penalty:
        return loss, logits, None
    penalty = gradient_penalty(model, inputs, config.gp_target, config.gp_norm, config.gp_sided)
    return loss + config.gp_weight * penalty, logits, penalty


def sharpness_aware_gradients(model: nn.Module, loss_fn: Callable[[], tuple[Tensor, ...]], rho: float,
                              alpha: float) -> None:
    """Replace the gradients in `model`'s `.grad` (those of the loss at w) by the sharpness-aware ones;
    `loss_fn()` returns a tuple whose first item is the loss at the model's current weights.

    SAM (Foret et al., ICLR 2021, Eq. 2): g_p = grad L(w + rho g / ||g||), the gradient at the worst nearby point.
    GSAM (Zhuang et al., ICLR 2022, Algorithm 1), which FTD's experts use: g_p - alpha g_perp, where g_perp is
    the part of g orthogonal to g_p; it also lowers the surrogate gap. alpha = 0 is SAM. The weights are back at
    w afterwards; the caller's optimiser steps with the new gradients.
    """
    params = [p for p in model.parameters() if p.grad is not None]
    grads = [p.grad.detach().clone() for p in params]
    scale = rho / torch.sqrt(sum(g.square().sum() for g in grads)).clamp_min(1e-12)
    with torch.no_grad():
        for p, g in zip(params, grads, strict=True):
            p.add_(g, alpha=float(scale))
    perturbed = torch.autograd.grad(loss_fn()[0], params)
    with torch.no_grad():
        for p, g in zip(params, grads, strict=True):
            p.sub_(g, alpha=float(scale))
        along = sum((g * q).sum() for g, q in zip(grads, perturbed, strict=True))
        along = along / sum(q.square().sum() for q in perturbed).clamp_min(1e-24)
        for p, g, q in zip(params, grads, perturbed, strict=True):
            p.grad = q - alpha * (g - along * q)


def epoch_measurements(model: nn.Module, data: DatasetSplits, probe: Tensor, config: ExpertConfig,
                       device: torch.device | str) -> dict[str, Any]:
    """What an expert's history records after every epoch besides training: validation and test accuracy and
    the input-gradient norm on `probe` (the same for trained and imported experts)."""
    return {"val_acc": accuracy(model, data.val_x, data.val_y, device) if len(data.val_x) else None,
            "test_acc": accuracy(model, data.test_x, data.test_y, device),
            **grad_norm_stats(model, probe, config.gp_norm)}


def grad_norm_stats(model: nn.Module, probe: Tensor, norm: str) -> dict[str, float]:
    """Mean and 10/90 % quantiles of the input-gradient norm on `probe` (per sample or per pixel, as `norm`).

    This is the quantity the penalty of Eq. 19 pushes toward K; it is measured for every variant, with or
    without the penalty, so the Table VII rows can be compared on it.
    """
    norms = input_gradient_norms(model, probe, norm).flatten().float()
    q10, q90 = torch.quantile(norms, torch.tensor([0.1, 0.9], device=norms.device)).tolist()
    return {"grad_norm_mean": float(norms.mean()), "grad_norm_q10": q10, "grad_norm_q90": q90}


def _seeds(seed: int) -> tuple[int, int, int]:
    """Independent seeds for initialisation, shuffling and DSA, derived from one expert seed."""
    init, shuffle, dsa = np.random.SeedSequence(seed).generate_state(3)
    return int(init), int(shuffle), int(dsa)


def _build(data: DatasetSplits, config: ExpertConfig) -> nn.Module:
    info = data.info
    return build_model(config.arch, info.channels, info.num_classes, info.image_size, width=config.width,
                       depth=config.depth)


def train_expert(data: DatasetSplits, config: ExpertConfig, seed: int, device: str | torch.device = "cpu",
                 progress: bool = False) -> tuple[list[Tensor], dict[str, Any]]:
    """Train one expert (AST Algorithm 1) and return (checkpoints θ_0 … θ_K on the CPU, history).

    history: per epoch (lists of length K) ``lr``, ``train_loss``, ``train_acc`` (running, augmented
    batches), ``gp``, ``val_acc``, ``test_acc`` (%; val None when the split is empty), ``step_sq_norm``
    (‖θ_e − θ_{e+1}‖²), ``grad_norm_mean/q10/q90`` (input-gradient norm in the form of ``gp_norm`` on a
    fixed probe of the first 512 training images); plus ``grad_norm_init`` (the same at θ_0) and
    ``train_seconds`` (wall clock: returned, never stored, see `expert_metadata`).
    """
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed={seed!r} must be a non-negative integer")
    init_seed, shuffle_seed, dsa_seed = _seeds(seed)
    device = torch.device(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        model = _build(data, config)
    model.to(device)
    flat = FlatModel(model)
    optimizer = make_optimizer(model, config)
    shuffle = torch.Generator().manual_seed(shuffle_seed)
    dsa, dsa_generator = DSA(config.dsa_for(data.info.name)), torch.Generator().manual_seed(dsa_seed)
    x, y = data.train_x.to(device), data.train_y.to(device=device, dtype=torch.long)
    checkpoints = [flat.flatten().cpu()]
    history: dict[str, Any] = {key: [] for key in HISTORY_KEYS}
    probe = x[:PROBE_SIZE]
    history["grad_norm_init"] = grad_norm_stats(model, probe, config.gp_norm)
    started = time.perf_counter()
    epochs = tqdm(range(config.epochs), desc=f"expert seed {seed}", disable=not progress)
    for epoch in epochs:
        if config.lr_decay_rebuild and epoch == config.lr_decay_epoch:
            optimizer = make_optimizer(model, config)  # the authors' code rebuilds it: momentum starts over
        for group in optimizer.param_groups:
            group["lr"] = config.lr_at(epoch)
        stats = train_epoch(model, optimizer, x, y, config, epoch, shuffle, dsa, dsa_generator)
        checkpoints.append(flat.flatten().cpu())
        stats["lr"] = config.lr_at(epoch)
        stats.update(epoch_measurements(model, data, probe, config, device))
        for key in HISTORY_KEYS:
            history[key].append(stats[key])
        epochs.set_postfix(test_acc=f"{stats['test_acc']:.1f}")
    history["train_seconds"] = time.perf_counter() - started
    history["step_sq_norm"] = step_sq_norms(checkpoints)
    return checkpoints, history


WALL_CLOCK_KEYS = ("train_seconds",)  # history fields a retraining cannot reproduce: never stored with the expert


def expert_metadata(data: DatasetSplits, config: ExpertConfig, seed: int | None, index: int,
                    history: dict[str, Any]) -> dict[str, Any]:
    """The JSON metadata stored with an expert (format: `ast_core.trajectory`): the history without its
    wall-clock fields (`WALL_CLOCK_KEYS`), so the same training writes the same file."""
    with torch.device("meta"):
        flat = FlatModel(_build(data, config))
    info = data.info
    return {
        "dataset": info.name, "num_classes": info.num_classes, "channels": info.channels,
        "image_size": info.image_size, "arch": config.arch, "width": config.width,
        "depth": (config.depth or default_depth(info.image_size)) if config.arch == "convnet" else None,
        "param_names": list(flat.names), "param_shapes": [list(shape) for shape in flat.shapes],
        "config": config.to_dict(), "dsa_strategy": config.dsa_for(info.name), "zca": config.zca,
        "seed": seed, "expert_index": index, "num_epochs": config.epochs,
        "history": {key: value for key, value in history.items() if key not in WALL_CLOCK_KEYS},
    }


@dataclass(frozen=True)
class ExpertJob:
    """One expert of a buffer: trained from `config` with `seed`, stored as expert `index` at `path` in `dtype`."""

    config: ExpertConfig
    seed: int
    index: int
    path: Path
    dtype: torch.dtype

    def save(self, data: DatasetSplits, checkpoints: list[Tensor], history: dict[str, Any]) -> Path:
        """Store a trained trajectory with its metadata (atomically; format: `ast_core.trajectory`)."""
        metadata = expert_metadata(data, self.config, self.seed, self.index, history)
        return save_trajectory(self.path, checkpoints, metadata, dtype=self.dtype)

    def run(self, data: DatasetSplits, device: str | torch.device, progress: bool = False) -> Path:
        """Train this expert in this process and store it."""
        checkpoints, history = train_expert(data, self.config, self.seed, device=device, progress=progress)
        return self.save(data, checkpoints, history)


class ExpertScheduler(Protocol):
    """Where experts train: `run` trains every job (in any order, each independent) and stores it (`ExpertJob.save`)."""

    def run(self, data: DatasetSplits, jobs: Sequence[ExpertJob]) -> None: ...


@dataclass(frozen=True)
class LocalScheduler:
    """Experts on this machine: one after another in this process (`workers` 1, or a single job), else in a spawn
    process pool of `workers` processes with max(1, cpus // workers) torch threads each."""

    workers: int = 1
    device: str | torch.device = "cpu"
    progress: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.workers, int) or self.workers < 1:
            raise ValueError(f"workers={self.workers!r} must be a positive integer")

    def run(self, data: DatasetSplits, jobs: Sequence[ExpertJob]) -> None:
        if self.workers == 1 or len(jobs) <= 1:
            for job in jobs:
                job.run(data, self.device, self.progress)
            return
        threads = max(1, (os.cpu_count() or 1) // self.workers)
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=min(self.workers, len(jobs)), mp_context=context,
                                 initializer=_init_worker, initargs=(data, threads)) as pool:
            futures = [pool.submit(_worker_run, job, str(self.device)) for job in jobs]
            for future in tqdm(futures, desc="experts", disable=not self.progress):
                future.result()


def _init_worker(data: DatasetSplits, threads: int) -> None:
    torch.set_num_threads(threads)
    _WORKER_STATE["data"] = data


def _worker_run(job: ExpertJob, device: str) -> Path:
    return job.run(_WORKER_STATE["data"], device)


def _check_existing(path: Path, data: DatasetSplits, config: ExpertConfig, seed: int) -> None:
    """An expert file kept on resume must come from the same dataset, config and seed."""
    meta = read_metadata(path)
    found = {"dataset": meta.get("dataset"), "seed": meta.get("seed"), "config": meta.get("config")}
    wanted = {"dataset": data.info.name, "seed": seed, "config": config.to_dict()}
    if found != wanted:
        diff = [key for key in wanted if found[key] != wanted[key]]
        raise ValueError(f"{path} exists but was trained with a different {', '.join(diff)}; "
                         "use another out_dir or delete the file to retrain it")


def pending_experts(data: DatasetSplits, config: ExpertConfig, out_dir: str | os.PathLike, num_experts: int,
                    seed: int, dtype: torch.dtype) -> list[int]:
    """Validate a buffer request and return the expert indices still to train (resume after a kill).

    Existing files must be the same expert (dataset, config, seed); another one is an error naming the file.
    """
    if not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts={num_experts!r} must be a positive integer")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed={seed!r} must be a non-negative integer")
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"dtype={dtype} is not supported; allowed: {', '.join(map(str, STORAGE_DTYPES))}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    todo = []
    for index in range(num_experts):
        path = expert_path(out, index)
        if path.exists():
            _check_existing(path, data, config, seed + index)
        else:
            todo.append(index)
    return todo


def train_experts(data: DatasetSplits, config: ExpertConfig, out_dir: str | os.PathLike, num_experts: int,
                  seed: int = 0, dtype: torch.dtype = torch.float32, scheduler: ExpertScheduler | None = None) -> None:
    """Fill a buffer folder with experts seed, seed+1, … (expert i has seed + i), trained by `scheduler`
    (default: `LocalScheduler()`, one after another on the CPU).

    Experts whose file exists are kept (resume after a kill; their dataset/config/seed must match).
    Files are written atomically, one per expert, in `dtype` (float32 or float16/bfloat16). The folder's
    reports are `ast_core.expert_reports.summarize_buffer`.
    """
    out = Path(out_dir)
    jobs = [ExpertJob(config, seed + i, i, expert_path(out, i), dtype)
            for i in pending_experts(data, config, out, num_experts, seed, dtype)]
    if jobs:
        (scheduler or LocalScheduler()).run(data, jobs)
