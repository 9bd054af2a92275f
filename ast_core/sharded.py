"""One distillation across R processes (torch.distributed): the student steps' batches split between ranks
(docs/method.md section 12).

Every rank holds the whole state (images, alpha, optimisers, the random generator), so every rank draws the same
segment, perturbation, batches and DSA parameters, and keeps a contiguous slice of each step's augmented batch,
by position (a class shard could be empty). With g_r = (b_r / B) grad CE(theta; X_r), the step's gradient is
g = sum_r g_r, exactly the single-process mean over the batch. Two collectives per student step make autograd
through the unroll equal the single-process one:

- `_SumOverRanks` (all-reduce forward, identity backward) gives every rank g; the loss downstream is then the
  same on every rank, and each rank back-propagates dL/dg into its own g_r only.
- `_ReducedParameterGradient` (identity forward, all-reduce backward) on the parameters a step reads: the
  partial Hessian-vector products (d g_r / d theta)^T dL/dg of the ranks add up to the whole one before the
  gradient travels to earlier steps.

After `loss.backward()` each rank's images.grad holds the rows of its shards; `combine_gradients` adds them up
(one all-reduce). alpha's gradient is the same on every rank without it (alpha only meets the summed g).
DDP and FSDP do not fit: they reduce module-parameter gradients through hooks and do not support double backward.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ast_core.functional import StepGradient


class _SumOverRanks(torch.autograd.Function):
    """y = sum over ranks of x (all-reduce); dL/dx = dL/dy (every rank computes the same loss from y)."""

    @staticmethod
    def forward(ctx, local: Tensor) -> Tensor:  # noqa: ANN001 (autograd's context)
        total = local.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # noqa: ANN001
        return grad


class _ReducedParameterGradient(torch.autograd.Function):
    """y = x; dL/dx = sum over ranks of dL/dy (each rank's partial Hessian-vector product of its shard)."""

    @staticmethod
    def forward(ctx, params: Tensor) -> Tensor:  # noqa: ANN001
        return params.view_as(params)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # noqa: ANN001
        total = grad.clone()
        dist.all_reduce(total)
        return total


@dataclass(frozen=True)
class BatchShard:
    """This process's part of every student step: rank `rank` of `world`, the default process group."""

    rank: int
    world: int

    @classmethod
    def current(cls) -> BatchShard | None:
        """The shard of this process when torch.distributed runs with more than one rank, else None."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return cls(dist.get_rank(), dist.get_world_size())
        return None

    def bounds(self, size: int) -> tuple[int, int]:
        """Rows [lo, hi) of a batch of `size` this rank computes: contiguous, sizes differ by at most one."""
        if size < self.world:
            raise ValueError(f"a student step's batch of {size} images cannot be split over {self.world} ranks "
                             "(an empty shard would skip a collective and hang): raise distill.hyper.batch_syn or "
                             "lower distill.devices")
        return size * self.rank // self.world, size * (self.rank + 1) // self.world

    def check(self, module: nn.Module, set_size: int, batch_syn: int | None) -> None:
        """Refuse, before any collective, a student whose samples are coupled (batch norm: SyncBatchNorm has no
        double backward) and batches too small to give every rank a row (the last one of a shuffle included)."""
        if any(isinstance(layer, nn.modules.batchnorm._BatchNorm) for layer in module.modules()):
            raise ValueError(f"a batch-norm student cannot be split over {self.world} ranks (its samples are "
                             "coupled): choose model.arch without batch norm or distill.devices: 1")
        batch = min(batch_syn or set_size, set_size)
        self.bounds(set_size % batch or batch)

    def step(self, step: StepGradient) -> StepGradient:
        """`step` on this rank's rows, returning the whole batch's gradient and mean loss on every rank."""

        def sharded(flat: Tensor, x: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
            lo, hi = self.bounds(x.shape[0])
            weight = (hi - lo) / x.shape[0]
            grad, loss = step(_ReducedParameterGradient.apply(flat), x[lo:hi], labels[lo:hi])
            loss = weight * loss.detach()
            dist.all_reduce(loss)
            return _SumOverRanks.apply(weight * grad), loss

        return sharded

    def gather(self, values: dict[int, float]) -> dict[int, float]:
        """Every rank's entries on every rank (the validation networks are spread over the ranks)."""
        parts: list[dict[int, float]] = [{} for _ in range(self.world)]
        dist.all_gather_object(parts, values)
        return {key: value for part in parts for key, value in part.items()}

    def barrier(self) -> None:
        dist.barrier()

    def combine_gradients(self, tensors: Iterable[Tensor]) -> None:
        """Add up the ranks' partial `.grad` of each tensor that has one (the same tensors on every rank)."""
        for tensor in tensors:
            if tensor.grad is not None:
                dist.all_reduce(tensor.grad)
