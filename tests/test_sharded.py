"""One matching iteration over two gloo processes (ast_core.sharded) equals the single-process engine in float64:
loss, image gradient, alpha's gradient and label gradient, for the unrolled path with an uneven batch split, with
every AST module and soft labels on, and for TESLA; removing either collective breaks the equality."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import LinearTrajectory

import ast_core.sharded as sharded
from ast_core.matching import MatchingEngine
from ast_core.models import FlatModel, build_model
from ast_core.settings import DistillConfig
from ast_core.sharded import BatchShard

CASES = {
    # 20 images in batches of 7: steps of 7, 7, 6 images, split 3 + 4 and 3 + 3
    "unrolled_uneven": {"syn_steps": 3, "batch_syn": 7},
    # every AST module, DATM's soft labels; batches of 6, 6, 6, 2 (the last split 1 + 1)
    "unrolled_all_modules": {"syn_steps": 4, "batch_syn": 6, "expert_epochs": 2, "max_start_epoch": 2,
                             "intermediate_matching": True, "student_momentum": 0.5, "perturb_rho": 0.1,
                             "balanced_loss": True, "soft_labels": True},
    "tesla": {"syn_steps": 3, "batch_syn": 7, "gradient": "tesla", "balanced_loss": True, "perturb_rho": 0.1},
}


def engine(case: str, shard: BatchShard | None) -> MatchingEngine:
    """A float64 engine on a 28-px 3-block ConvNet (width 4), 2 images per class, a 3-epoch expert."""
    torch.manual_seed(0)
    flat_model = FlatModel(build_model("convnet", 1, 10, 28, width=4).double())
    start = flat_model.flatten()
    points = [start + 0.02 * k * torch.randn(start.shape, dtype=torch.float64) for k in range(4)]
    config = DistillConfig(**{"ipc": 2, "iterations": 1, "expert_epochs": 1, "max_start_epoch": 1,
                              "lr_teacher": 0.05, **CASES[case]})
    images = torch.randn(20, 1, 28, 28, dtype=torch.float64)
    labels = torch.arange(10).repeat_interleave(2)
    logits = torch.randn(20, 10, dtype=torch.float64) if config.soft_labels else None
    return MatchingEngine(config, [LinearTrajectory(points)], flat_model, images, labels, label_logits=logits,
                          shard=shard)


def gradients(engine: MatchingEngine) -> dict[str, torch.Tensor]:
    """One iteration's loss and gradients (`step` leaves the gradients of its update in .grad)."""
    record = engine.step()
    out = {"loss": torch.tensor(record["loss"], dtype=torch.float64), "images": engine.images.grad.clone(),
           "syn_lr": engine.syn_lr.grad.clone()}
    if engine.label_logits is not None:
        out["label_logits"] = engine.label_logits.grad.clone()
    return out


def worker(rank: int, folder: str, case: str, drop: str | None) -> None:
    """One of two gloo ranks: its gradients into folder/rank<r>.pt (`drop` removes a collective)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/init", rank=rank, world_size=2)
    try:
        if drop == "sum":
            sharded._SumOverRanks.forward = staticmethod(lambda ctx, local: local.clone())
        elif drop == "reduce":
            sharded._ReducedParameterGradient.backward = staticmethod(lambda ctx, grad: grad)
        torch.save(gradients(engine(case, BatchShard.current())), os.path.join(folder, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def two_ranks(folder: Path, case: str, drop: str | None = None) -> list[dict[str, torch.Tensor]]:
    mp.spawn(worker, args=(str(folder), case, drop), nprocs=2, join=True)
    return [torch.load(folder / f"rank{rank}.pt", weights_only=True) for rank in range(2)]


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_give_the_single_process_gradients(case: str, tmp_path: Path) -> None:
    single = gradients(engine(case, None))
    ranks = two_ranks(tmp_path, case)
    for result in ranks:
        assert set(result) == set(single)
        assert result["loss"].item() == pytest.approx(single["loss"].item(), rel=1e-12)
        for name in set(single) - {"loss", "syn_lr"}:
            assert relative_error(result[name], single[name]) < 1e-10, name
        # alpha is a float32 tensor (as in MTT): its gradient is rounded to float32
        assert result["syn_lr"].item() == pytest.approx(single["syn_lr"].item(), rel=1e-6)
    assert torch.equal(ranks[0]["images"], ranks[1]["images"])  # every rank updates the same images


@pytest.mark.parametrize("drop", ["sum", "reduce"])
def test_without_either_collective_the_gradients_differ(drop: str, tmp_path: Path) -> None:
    single = gradients(engine("unrolled_uneven", None))
    ranks = two_ranks(tmp_path, "unrolled_uneven", drop)
    assert relative_error(ranks[0]["images"], single["images"]) > 1e-3


def test_a_batch_smaller_than_the_ranks_is_refused_naming_the_settings() -> None:
    with pytest.raises(ValueError, match="batch_syn.*devices"):
        BatchShard(0, 4).bounds(3)
    assert [BatchShard(rank, 3).bounds(7) for rank in range(3)] == [(0, 2), (2, 4), (4, 7)]
