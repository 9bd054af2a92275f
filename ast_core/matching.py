"""Trajectory matching: the AST/MCT formulas and `MatchingEngine`, one iteration of AST Algorithm 2 (docs/method.md
section 4).

One iteration:
1. sample an expert and a start epoch t: integer U{0..T+-1} (MTT) or real U(0, T+) (MCT, read off a
   convexified or linearly-read trajectory); with DATM's window T+ grows with the iteration
   (`DistillConfig.start_bound`);
2. optionally perturb the starting expert filter-wise (Eq. 23);
3. unroll N student steps on the synthetic set with DSA, loss CE (Eq. 21) or balanced nu * CE (Eq. 20),
   keeping the graph so the final loss reaches the images and the learnable lr alpha (`gradient="unroll"`;
   each step's gradient comes from `ast_core.functional.step_gradient`, a hand-written second-order ConvNet
   step with the same math as autograd's double backward), or with memory constant in N
   (`gradient="tesla"`, `ast_core.tesla`);
4. final matching loss (Eq. 5) plus optional intermediate matching losses (Eq. 22);
5. SGD(momentum 0.5) steps on images and alpha, and on the label logits with DATM's soft labels; with DATM's
   `skip_threshold` an iteration whose matching loss exceeds it updates nothing; with FTD's `image_ema` a moving
   average of the images follows every update (`kept_images`, what validation scores).

Every AST module and the MCT sampling is an independent switch in `DistillConfig`, so each ablation row is
one configuration. The outer loop (validation, checkpoints, divergence checks) is `ast_core.distill.Distiller`.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from typing import Protocol

import torch
from torch import Tensor

from ast_core.augment import DSA
from ast_core.functional import reuse_freed_cpu_memory, step_gradient
from ast_core.models import FlatModel
from ast_core.settings import DistillConfig, check_balance
from ast_core.sharded import BatchShard
from ast_core.tesla import tesla_gradients


class Trajectory(Protocol):
    """What distillation needs of an expert trajectory: flat parameters at a (real) epoch."""

    @property
    def num_epochs(self) -> int: ...

    def at(self, t: float) -> Tensor: ...


# ---------------------------------------------------------------------------------------------------------
# Formulas
# ---------------------------------------------------------------------------------------------------------

def balance_factor(start: float, max_start: float, vartheta: float = 8.0, log_base: float = math.e,
                   middle: str = "half") -> float:
    """nu of the balanced inner-loop loss (Eq. 20), middle m = max_start / 2 ("half", the paper) or
    floor(max_start / 2) ("floor", the authors' code, which also uses log_base 5).

    nu = log(|t - m| + vartheta) for t >= m, else 1 / log(|m - t| + vartheta): late (flat) segments get a
    larger inner loss, early (steep) segments a smaller one.
    """
    check_balance(vartheta, log_base, middle)
    middle = max_start / 2 if middle == "half" else math.floor(max_start / 2)
    value = math.log(abs(start - middle) + vartheta, log_base)
    return value if start >= middle else 1.0 / value


def intermediate_steps(syn_steps: int, expert_epochs: int, spacing: str = "paper") -> list[int]:
    """Student steps at which intermediate losses are taken (Eq. 22), k = 1..M-1: floor(k N / M) ("paper") or
    (N // M) k ("code", the authors' `distill.py`; the two differ when M does not divide N)."""
    if spacing == "code":
        return [(syn_steps // expert_epochs) * k for k in range(1, expert_epochs)]
    return [k * syn_steps // expert_epochs for k in range(1, expert_epochs)]


def intermediate_weight(k: int, expert_epochs: int, scheme: str) -> float:
    """beta_k of Eq. 22: 1 ("equal", the paper's best) or k / M ("varied")."""
    return 1.0 if scheme == "equal" else k / expert_epochs


def perturb_filters(params: dict[str, Tensor], rho: float,
                    generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """Filter-normalised weight perturbation (Eq. 23).

    Every tensor with >= 2 dims gets, per slice j of its first dimension, rho * d_j * ||theta_j|| / ||d_j||
    added, with d_j ~ N(0, I); biases and norm parameters (1-D) are returned unchanged.
    """
    out = {}
    for name, theta in params.items():
        if theta.dim() < 2:
            out[name] = theta
            continue
        direction = torch.randn(theta.shape, generator=generator, dtype=theta.dtype).to(theta.device)
        dims = tuple(range(1, theta.dim()))
        norm = torch.linalg.vector_norm
        scale = norm(theta, dim=dims, keepdim=True) / norm(direction, dim=dims, keepdim=True).clamp_min(1e-12)
        out[name] = theta + rho * direction * scale
    return out


def perturb_layers(params: dict[str, Tensor], rho: float,
                   generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """The authors' code form of the weight perturbation: conv weights only (4-D tensors),
    theta + rho * theta ⊙ d / ||d|| with d ~ N(0, I) normalised over the whole layer.

    Its relative size per layer is about rho / sqrt(numel), 35-100x smaller than Eq. 23 at width 128
    (docs/method.md section 8, item 4); every other tensor is returned unchanged.
    """
    out = {}
    for name, theta in params.items():
        if theta.dim() != 4:
            out[name] = theta
            continue
        direction = torch.randn(theta.shape, generator=generator, dtype=theta.dtype).to(theta.device)
        out[name] = theta + rho * theta * direction / torch.linalg.vector_norm(direction).clamp_min(1e-12)
    return out


PERTURBATIONS = {"paper": perturb_filters, "code": perturb_layers}


def matching_loss(student: Tensor, target: Tensor, start: Tensor) -> Tensor:
    """Normalised parameter distance (Eq. 5): ||student - target||^2 / ||start - target||^2."""
    return (student - target).pow(2).sum() / (start - target).pow(2).sum()


# ---------------------------------------------------------------------------------------------------------
# Engine
# ---------------------------------------------------------------------------------------------------------

class DivergenceError(RuntimeError):
    """The run has diverged: the images' RMS grew past `max_image_growth` times its start, alpha (syn_lr) past
    `ast_core.distill.MAX_SYN_LR_GROWTH` (1000) times `lr_teacher` or became non-finite, or a learning rate
    (lr_img, lr_lr, lr_teacher) is too large for the images' float type, so that alpha or every update would
    overflow."""


def check_representable(config: DistillConfig, dtype: torch.dtype) -> None:
    """lr_img, lr_lr and lr_teacher must fit the images' float type: larger, alpha or every update overflows."""
    largest = torch.finfo(dtype).max
    for key in ("lr_img", "lr_lr", "lr_teacher"):
        value = getattr(config, key)
        if value > largest:
            raise DivergenceError(f"{key}={value:g} is larger than the largest {dtype} ({largest:.3g}) and would "
                                  f"overflow; lower {key}")


class MatchingEngine:
    """The learnable synthetic set and one matching iteration on it (AST Algorithm 2).

    Owns the images, the student lr alpha (`syn_lr`), the label logits when `soft_labels` (initialised from
    `label_logits`, e.g. `ast_core.soft_labels.expert_label_logits`), their SGD optimisers, the images' moving
    average and the random generator every draw comes from (segment, batches, DSA, perturbation), so
    `state_dict` is all a resume needs of it. `labels` are always the hard class labels of the images.
    `trajectories` is a sequence of objects with `.at(t)` and `.num_epochs` (plain or convexified experts).
    With `shard` (`ast_core.sharded.BatchShard.current()` under torch.distributed) each student step computes
    this rank's rows of its batch and the ranks' parts are summed (docs/method.md section 12).
    """

    def __init__(self, config: DistillConfig, trajectories: Sequence[Trajectory], flat_model: FlatModel,
                 init_images: Tensor, labels: Tensor, device: str | torch.device = "cpu",
                 label_logits: Tensor | None = None, shard: BatchShard | None = None) -> None:
        if len(trajectories) == 0:
            raise ValueError("trajectories is empty: train experts first (buffer stage)")
        shortest = min(traj.num_epochs for traj in trajectories)
        needed = config.epochs_needed
        if needed > shortest:
            raise ValueError(f"max_start_epoch + expert_epochs = {needed} exceeds the stored trajectory "
                             f"({shortest} epochs)")
        if init_images.shape[0] != labels.shape[0]:
            raise ValueError(f"init_images ({init_images.shape[0]}) and labels ({labels.shape[0]}) differ")
        if not torch.isfinite(init_images).all():
            raise ValueError("init_images contains non-finite values")
        check_representable(config, init_images.dtype)
        if config.soft_labels and (label_logits is None or label_logits.shape[0] != labels.shape[0]
                                   or label_logits.dim() != 2 or not torch.isfinite(label_logits).all()):
            raise ValueError("soft_labels needs label_logits: a finite [images, classes] matrix (the experts' "
                             "logits, ast_core.soft_labels.expert_label_logits)")
        self.config = config
        self.trajectories = trajectories
        self.flat_model = flat_model
        self.device = torch.device(device)
        self.labels = labels.to(self.device)
        self.images = init_images.detach().clone().to(self.device).requires_grad_(True)
        self.syn_lr = torch.tensor(config.lr_teacher, device=self.device, requires_grad=True)
        self.opt_img = torch.optim.SGD([self.images], lr=config.lr_img, momentum=config.img_momentum)
        self.opt_lr = torch.optim.SGD([self.syn_lr], lr=config.lr_lr, momentum=config.lr_momentum)
        self.label_logits: Tensor | None = None
        self.optimizers = [self.opt_img, self.opt_lr]
        if config.soft_labels:
            self.label_logits = label_logits.detach().clone().to(self.device, init_images.dtype).requires_grad_(True)
            self.optimizers.append(torch.optim.SGD([self.label_logits], lr=config.lr_y,
                                                   momentum=config.label_momentum))
        self.ema = self.images.detach().clone() if config.image_ema else None
        self.iterations_done = 0
        self.generator = torch.Generator().manual_seed(config.seed)
        self.dsa = DSA(config.dsa_strategy)
        self.step_gradient = step_gradient(flat_model)
        self.shard = shard
        if shard is not None:
            shard.check(flat_model.module, len(labels), config.batch_syn)
            self.step_gradient = shard.step(self.step_gradient)
        if self.device.type == "cpu":
            reuse_freed_cpu_memory()

    @property
    def lr(self) -> float:
        """alpha, the learnable student lr, as a number."""
        return float(self.syn_lr.detach())

    def image_rms(self) -> float:
        return float(self.images.detach().pow(2).mean().sqrt())

    def kept_images(self) -> Tensor:
        """The images validation scores and a run keeps: their moving average with `image_ema` (FTD), else the
        images themselves (detached)."""
        return self.ema if self.ema is not None else self.images.detach()

    def training_targets(self) -> Tensor:
        """What a network trained on the set learns from: the soft labels softmax(label logits) (DATM), else the
        hard labels (detached)."""
        if self.label_logits is None:
            return self.labels
        return torch.softmax(self.label_logits.detach(), dim=1)

    # -- sampling ------------------------------------------------------------------------------------------
    def _sample_segment(self, bound: float) -> tuple[int, float]:
        """An expert and a start epoch below `bound` (this iteration's T+)."""
        expert = int(torch.randint(len(self.trajectories), (1,), generator=self.generator))
        if self.config.sampling == "discrete":
            start = float(torch.randint(int(bound), (1,), generator=self.generator))
        else:
            start = float(torch.rand((), generator=self.generator, dtype=torch.float64)) * bound
        return expert, start

    def batches(self) -> list[Tensor]:
        """Index batches for N student steps, reshuffling the set whenever it is used up (as MTT)."""
        size = len(self.labels)
        batch = self.config.batch_syn or size
        batches: list[Tensor] = []
        while len(batches) < self.config.syn_steps:
            perm = torch.randperm(size, generator=self.generator).to(self.device)
            batches.extend(perm.split(batch))
        return batches[: self.config.syn_steps]

    # -- one iteration ---------------------------------------------------------------------------------------
    def unroll_loss(self, start_params: Tensor, targets: dict[int, Tensor], expert_start: Tensor,
                    nu: float, labels: Tensor) -> tuple[Tensor, dict[str, float]]:
        """Unroll N student steps on (images, `labels`) and return the total matching loss (Eq. 5 + Eq. 22) and
        statistics; the denominators come from `expert_start` or, with `matching_denominator: perturbed`, from
        `start_params`."""
        cfg = self.config
        steps = intermediate_steps(cfg.syn_steps, cfg.expert_epochs, cfg.intermediate_spacing)
        checkpoints = {step: k for k, step in enumerate(steps, 1)}
        denominator = start_params if cfg.matching_denominator == "perturbed" else expert_start
        params = start_params
        velocity = torch.zeros_like(params) if cfg.student_momentum else None
        total = torch.zeros((), device=self.device)
        inner_losses = []
        for step, batch in enumerate(self.batches(), 1):
            x = self.dsa(self.images[batch], generator=self.generator)
            grad, ce = self.step_gradient(params, x, labels[batch])
            inner_losses.append(float(ce))
            grad = nu * grad
            if velocity is not None:
                velocity = cfg.student_momentum * velocity + grad
                grad = velocity
            params = params - self.syn_lr * grad
            if cfg.intermediate_matching and step in checkpoints:
                k = checkpoints[step]
                weight = intermediate_weight(k, cfg.expert_epochs, cfg.intermediate_weights)
                total = total + weight * matching_loss(params, targets[k], denominator)
        final = matching_loss(params, targets[cfg.expert_epochs], denominator)
        return total + final, self._stats(final, inner_losses, nu)

    @staticmethod
    def _stats(final: Tensor, inner_losses: list[float], nu: float) -> dict[str, float]:
        mean_inner = sum(inner_losses) / len(inner_losses)
        return {"matching_loss": float(final.detach()), "inner_loss": mean_inner,
                "inner_loss_balanced": nu * mean_inner}

    def loss_and_gradients(self, start_params: Tensor, targets: dict[int, Tensor], expert_start: Tensor,
                           nu: float) -> tuple[Tensor, dict[str, float]]:
        """Total matching loss; when it is finite and not above `skip_threshold`, its gradients are left in
        images.grad, syn_lr.grad and (soft labels) label_logits.grad."""
        cfg = self.config
        # soft labels: a leaf of probabilities collects dL/dp, chained into the logits below (one softmax VJP)
        labels = self.training_targets().requires_grad_(True) if cfg.soft_labels else self.labels
        if cfg.gradient == "tesla":
            denominator = start_params if cfg.matching_denominator == "perturbed" else expert_start
            loss, inner_losses = tesla_gradients(
                self.step_gradient, lambda x, generator: self.dsa(x, generator=generator), self.images,
                labels, self.batches(), start_params, targets[cfg.expert_epochs], denominator,
                self.syn_lr, nu, self.generator)
            stats = self._stats(loss, inner_losses, nu)
        else:
            loss, stats = self.unroll_loss(start_params, targets, expert_start, nu, labels)
            if torch.isfinite(loss) and not self.above_threshold(stats):
                loss.backward()
        if self.shard is not None:  # each rank holds the rows of its shards
            self.shard.combine_gradients([self.images, labels])
        if self.label_logits is not None and labels.grad is not None:
            torch.autograd.backward(torch.softmax(self.label_logits, dim=1), labels.grad)
        return loss, stats

    def above_threshold(self, stats: dict[str, float]) -> bool:
        """DATM's skip: the iteration's matching loss (Eq. 5) exceeds `skip_threshold`."""
        threshold = self.config.skip_threshold
        return threshold is not None and stats["matching_loss"] > threshold

    def step(self) -> dict[str, float]:
        """One iteration: sample a segment, match it, update images and alpha (a non-finite step is rolled back
        and reported as skipped). Returns the iteration's record (expert, start epoch, losses, alpha, ...)."""
        cfg = self.config
        tic = time.perf_counter()
        bound = cfg.start_bound(self.iterations_done)
        self.iterations_done += 1
        expert_index, start = self._sample_segment(bound)
        traj = self.trajectories[expert_index]
        end_epoch = traj.num_epochs
        expert_start = traj.at(start).to(self.device)
        targets = {k: traj.at(min(start + k, end_epoch)).to(self.device) for k in range(1, cfg.expert_epochs + 1)}
        start_params = expert_start
        if cfg.perturb_rho > 0:
            perturb = PERTURBATIONS[cfg.perturb_form]
            perturbed = perturb(self.flat_model.unflatten(expert_start), cfg.perturb_rho, self.generator)
            start_params = torch.cat([perturbed[name].reshape(-1) for name in self.flat_model.names])
        nu = (balance_factor(start, cfg.max_start_epoch, cfg.vartheta, cfg.log_base, cfg.balance_middle)
              if cfg.balanced_loss else 1.0)
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        loss, stats = self.loss_and_gradients(start_params.detach().clone(), targets, expert_start, nu)
        over = self.above_threshold(stats)
        skipped = not over and not (self._gradients_finite(loss) and self._apply_update())
        return {"expert": expert_index, "start_epoch": start, "start_bound": bound, "loss": float(loss.detach()),
                "balance_factor": nu, "syn_lr": self.lr, "skipped": float(skipped), "threshold_skipped": float(over),
                "seconds": time.perf_counter() - tic, **stats}

    def _learnables(self) -> list[Tensor]:
        return [self.images, self.syn_lr] + ([self.label_logits] if self.label_logits is not None else [])

    def _gradients_finite(self, loss: Tensor) -> bool:
        grads = [t.grad for t in self._learnables()]
        return (bool(torch.isfinite(loss)) and all(g is not None for g in grads)
                and all(bool(torch.isfinite(g).all()) for g in grads))

    def _apply_update(self) -> bool:
        """Step images, alpha (and label logits); roll back if the result is non-finite, else move the images'
        moving average. Returns whether the step was kept."""
        learnables = self._learnables()
        saved = ([t.detach().clone() for t in learnables], [copy.deepcopy(o.state_dict()) for o in self.optimizers])
        for optimizer in self.optimizers:
            optimizer.step()
        with torch.no_grad():
            self.syn_lr.clamp_(min=self.config.min_syn_lr)
            if all(bool(torch.isfinite(t).all()) for t in learnables):
                if self.ema is not None:  # ema <- d ema + (1 - d) images
                    self.ema.lerp_(self.images.detach(), 1.0 - self.config.image_ema)
                return True
            for tensor, value in zip(learnables, saved[0], strict=True):
                tensor.copy_(value)
        for optimizer, state in zip(self.optimizers, saved[1], strict=True):
            optimizer.load_state_dict(state)
        return False

    # -- state -----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, object]:
        """Images, alpha, label logits, their optimisers, the moving average, the iteration count and the generator
        (CPU tensors): with them a run continues bit for bit."""
        state: dict[str, object] = {
            "images": self.images.detach().cpu(), "syn_lr": self.syn_lr.detach().cpu(),
            "opt_img": self.opt_img.state_dict(), "opt_lr": self.opt_lr.state_dict(),
            "generator": self.generator.get_state(), "iterations_done": self.iterations_done}
        if self.label_logits is not None:
            state["label_logits"] = self.label_logits.detach().cpu()
            state["opt_y"] = self.optimizers[2].state_dict()
        if self.ema is not None:
            state["ema"] = self.ema.cpu()
        return state

    def load_state_dict(self, state: dict[str, object]) -> None:
        with torch.no_grad():
            self.images.copy_(state["images"].to(self.device))
            self.syn_lr.copy_(state["syn_lr"].to(self.device))
            if self.label_logits is not None:
                self.label_logits.copy_(state["label_logits"].to(self.device))
            if self.ema is not None:
                self.ema.copy_(state["ema"].to(self.device))
        self.opt_img.load_state_dict(state["opt_img"])
        self.opt_lr.load_state_dict(state["opt_lr"])
        if self.label_logits is not None:
            self.optimizers[2].load_state_dict(state["opt_y"])
        self.generator.set_state(state["generator"])
        self.iterations_done = int(state["iterations_done"])
