"""Experts trained on a Dask cluster (2 worker processes, `DaskScheduler`) equal sequential training on the CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ast_core.expert_reports import summarize_buffer
from ast_core.experts import train_experts
from ast_core.settings import ExpertConfig
from ast_core.trajectory import expert_path, load_trajectory
from pipeline.distributed import DaskScheduler

pytestmark = pytest.mark.slow


def test_cluster_buffer_is_identical_to_sequential_training(digits, tmp_path: Path) -> None:
    from dask.distributed import LocalCluster

    config = ExpertConfig(width=8, epochs=2, batch_size=256)
    train_experts(digits, config, tmp_path / "serial", num_experts=2, seed=3)
    serial = summarize_buffer(tmp_path / "serial")
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as cluster:
        dask = DaskScheduler(cluster.scheduler_address)
        train_experts(digits, config, tmp_path / "dask", num_experts=2, seed=3, scheduler=dask)
        distributed = summarize_buffer(tmp_path / "dask")
        expert_path(tmp_path / "dask", 1).unlink()
        train_experts(digits, config, tmp_path / "dask", num_experts=2, seed=3, scheduler=dask)
        resumed = summarize_buffer(tmp_path / "dask")
        with pytest.raises(ValueError, match="expert_000.safetensors exists"):
            train_experts(digits, ExpertConfig(width=8, epochs=2, lr=0.02), tmp_path / "dask", num_experts=1, seed=3,
                          scheduler=dask)
    assert distributed == serial == resumed
    for index in range(2):  # the same files, byte for byte (no wall-clock time is stored with an expert)
        ours, theirs = (expert_path(tmp_path / name, index) for name in ("dask", "serial"))
        assert ours.read_bytes() == theirs.read_bytes()
        assert torch.equal(load_trajectory(ours).checkpoints, load_trajectory(theirs).checkpoints)
    assert (tmp_path / "dask" / "metrics.csv").read_bytes() == (tmp_path / "serial" / "metrics.csv").read_bytes()
    summary = json.loads((tmp_path / "dask" / "summary.json").read_text())
    assert summary["seeds"] == [3, 4] and summary["num_experts"] == 2
    assert (tmp_path / "dask" / "accuracy.png").stat().st_size > 0
