"""Distillation runs: AST Algorithm 2's outer loop with model selection on validation (docs/method.md section 4).

`Distiller` repeats `ast_core.matching.MatchingEngine.step` (one matching iteration on the synthetic set) for
`config.iterations` iterations, keeps the best set by validation accuracy (`BestSet`), stops diverged or
persistently non-finite runs with a clear error, and checkpoints atomically (`ast_core.checkpoint`) so a killed
run resumes bit-exactly on the CPU.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ast_core.checkpoint import DistillCheckpoint
from ast_core.matching import DivergenceError, MatchingEngine, Trajectory
from ast_core.models import FlatModel
from ast_core.settings import DistillConfig
from ast_core.sharded import BatchShard

log = logging.getLogger(__name__)

MAX_SYN_LR_GROWTH = 1000.0  # alpha past this multiple of lr_teacher (or non-finite) is a diverged run

Evaluator = Callable[[Tensor, Tensor, float], float]


class NonFiniteError(RuntimeError):
    """Raised when non-finite losses or gradients keep occurring and the run cannot make progress."""


@dataclass(frozen=True)
class BestSet:
    """The synthetic set kept by validation accuracy (model selection, never test): the one after `iteration`
    updates (0 is the starting set), with its `images` (on the CPU), alpha `syn_lr` and, with soft labels, its
    `label_logits`."""

    iteration: int
    val_acc: float
    images: Tensor
    syn_lr: float
    label_logits: Tensor | None = None

    @property
    def distilled(self) -> bool:
        """Whether an update beat the starting set (else distillation kept the initial images)."""
        return self.iteration > 0


@dataclass
class DistillResult:
    """The final set (the images' moving average with `image_ema`), its hard labels, alpha and label logits (soft
    labels only), the per-iteration history, and the best set by validation (None without an evaluator) with the
    validation curve ({"iteration": updates done, "val_acc"} per evaluation)."""

    images: Tensor
    labels: Tensor
    syn_lr: float
    history: list[dict[str, float]]
    best: BestSet | None = None
    validation: list[dict[str, float]] = field(default_factory=list)
    label_logits: Tensor | None = None


class Distiller:
    """Learns synthetic images and the student lr alpha by matching expert trajectory segments.

    `trajectories` is a sequence of objects with `.at(t)` and `.num_epochs` (plain or convexified experts);
    `label_logits` start the learnable labels when `config.soft_labels`;
    `evaluator(images, targets, lr) -> validation accuracy` (targets: the hard labels, or the soft labels'
    probabilities) is called on the initial set, every `eval_every`
    iterations and at the end, to keep the best synthetic set (model selection on validation, never on test;
    the initial set is a candidate too, so distillation can never be reported better than it really is).
    With `eval_every=0` only the final set is evaluated. With `checkpoint_dir` the run is saved there every
    `checkpoint_every` iterations and at the end, and `run` resumes from it. With `shard` (one of several
    torch.distributed ranks, docs/method.md section 12) every rank resumes from the checkpoint and rank 0 alone
    writes it; `evaluator` must then return the same accuracy on every rank.
    """

    def __init__(self, config: DistillConfig, trajectories: Sequence[Trajectory], flat_model: FlatModel,
                 init_images: Tensor, labels: Tensor, device: str | torch.device = "cpu",
                 checkpoint_dir: str | Path | None = None, checkpoint_every: int = 100,
                 evaluator: Evaluator | None = None, eval_every: int = 0,
                 label_logits: Tensor | None = None, shard: BatchShard | None = None) -> None:
        if checkpoint_every < 1:
            raise ValueError(f"checkpoint_every={checkpoint_every} must be >= 1")
        self.config = config
        self.engine = MatchingEngine(config, trajectories, flat_model, init_images, labels, device, label_logits,
                                     shard)
        self.checkpoint = DistillCheckpoint(checkpoint_dir) if checkpoint_dir is not None else None
        self.writes_checkpoint = shard is None or shard.rank == 0
        self.checkpoint_every = checkpoint_every
        self.evaluator = evaluator
        self.eval_every = eval_every
        self.iteration = 0
        self.history: list[dict[str, float]] = []
        self.best: BestSet | None = None
        self.validation: list[dict[str, float]] = []
        self.nonfinite_streak = 0
        self.initial_rms = self.engine.image_rms()

    def run(self, progress: bool = False) -> DistillResult:
        """Run (or resume) until `config.iterations`; returns final and best-by-validation sets."""
        self._resume()
        if self.evaluator and self.eval_every and self.iteration == 0 and not self.validation:
            self._evaluate()  # the starting set (iteration 0): the first point of the accuracy curve
        bar = tqdm(total=self.config.iterations, initial=self.iteration, disable=not progress, desc="distill")
        while self.iteration < self.config.iterations:
            record = {"iteration": self.iteration, **self.engine.step()}
            self._track_nonfinite(record)
            self._check_growth(record)
            self.iteration += 1
            if self.evaluator and self.eval_every and self.iteration % self.eval_every == 0:
                self._evaluate()
            self.history.append(record)
            bar.update(1)
            bar.set_postfix(loss=f"{record['matching_loss']:.4f}", lr=f"{record['syn_lr']:.2e}")
            if self.iteration % self.checkpoint_every == 0 or self.iteration == self.config.iterations:
                self._save()
        bar.close()
        if self.evaluator and (not self.validation or self.validation[-1]["iteration"] != self.iteration):
            self._evaluate()  # the final set is a candidate too, also when the last iteration was not a check
        logits = self.engine.label_logits
        return DistillResult(self.engine.kept_images().clone(), self.engine.labels.clone(), self.engine.lr,
                             self.history, self.best, self.validation,
                             None if logits is None else logits.detach().clone())

    def _track_nonfinite(self, record: dict[str, float]) -> None:
        if not record["skipped"]:
            self.nonfinite_streak = 0
            return
        self.nonfinite_streak += 1
        log.warning("iteration %d: non-finite loss or update (loss=%s); images left unchanged",
                    self.iteration, record["loss"])
        if self.nonfinite_streak >= self.config.max_nonfinite:
            raise NonFiniteError(f"{self.nonfinite_streak} consecutive iterations were non-finite; lower lr_img "
                                 "or lr_lr, or check the expert buffer. The last good images are in the checkpoint.")

    def _check_growth(self, record: dict[str, float]) -> None:
        """Record the images' RMS; stop with a clear error when it or alpha has grown by orders of magnitude."""
        record["image_rms"] = self.engine.image_rms()
        growth = record["image_rms"] / self.initial_rms
        if growth > self.config.max_image_growth:  # the last checkpoint (before this) stays the resume point
            raise DivergenceError(
                f"distillation diverged at iteration {self.iteration}: the images' RMS is {record['image_rms']:.3g}, "
                f"{growth:.3g}x its start (limit max_image_growth = {self.config.max_image_growth:g}); lower "
                f"lr_img (now {self.config.lr_img:g}) or lr_lr")
        lr_growth = record["syn_lr"] / self.config.lr_teacher
        if not lr_growth <= MAX_SYN_LR_GROWTH:  # also true for NaN
            raise DivergenceError(
                f"distillation diverged at iteration {self.iteration}: alpha (syn_lr) is {record['syn_lr']:.3g}, "
                f"{lr_growth:.3g}x lr_teacher (limit {MAX_SYN_LR_GROWTH:g}x); lower lr_lr (now "
                f"{self.config.lr_lr:g})")

    def _evaluate(self) -> None:
        """Validation accuracy of the current set, appended to `validation`; keeps the best set so far."""
        assert self.evaluator is not None
        images = self.engine.kept_images()
        accuracy = float(self.evaluator(images.clone(), self.engine.training_targets(), self.engine.lr))
        self.validation.append({"iteration": self.iteration, "val_acc": accuracy})
        if self.best is None or accuracy > self.best.val_acc:
            logits = self.engine.label_logits
            self.best = BestSet(self.iteration, accuracy, images.cpu().clone(), self.engine.lr,
                                None if logits is None else logits.detach().cpu().clone())

    # -- checkpoints -------------------------------------------------------------------------------------------
    def _save(self) -> None:
        if self.checkpoint is None or not self.writes_checkpoint:
            return
        self.checkpoint.save(self.config, {
            "iteration": self.iteration, **self.engine.state_dict(), "history": self.history,
            "best": asdict(self.best) if self.best else {}, "validation": self.validation,
            "nonfinite_streak": self.nonfinite_streak, "initial_rms": self.initial_rms})

    def _resume(self) -> None:
        state = self.checkpoint.load(self.config) if self.checkpoint is not None else None
        if state is None:
            return
        self.engine.load_state_dict(state)
        self.iteration = int(state["iteration"])
        self.history = list(state["history"])
        self.best = BestSet(**state["best"]) if state["best"] else None
        self.validation = list(state.get("validation", []))
        self.nonfinite_streak = int(state["nonfinite_streak"])
        self.initial_rms = float(state.get("initial_rms", self.initial_rms))
        log.info("resumed distillation from %s at iteration %d", self.checkpoint.path, self.iteration)
