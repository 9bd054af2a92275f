"""DVC as seen by the flows: the stage graph, params overrides and `dvc` subprocesses.

DVC stays the owner of the pipeline: the graph is DVC's own (`Repo.index.graph`, foreach/matrix stages
expanded to names such as ``buffer@ast`` and ``distill@ast-10``) and every stage runs as
``dvc --wait-for-lock repro --single-item <stage>``, so caching, ``dvc.lock`` and ``dvc status`` behave as after
``dvc repro``. DVC releases its repository lock while a stage command runs and takes it again to hash and
record the outputs; ``--wait-for-lock`` makes a process wait for that lock instead of failing after 3 s,
which is what lets independent stages run at once (see docs/orchestration.md).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator

from pipeline import tracking
from pipeline.runner import stage_environment
from pipeline.stage_graph import StageNode

GPU_TAG = "gpu"
TAIL_LINES = 40


def stage_tags(node: StageNode) -> list[str]:
    """Prefect tags: training stages share the `gpu` concurrency limit."""
    return [GPU_TAG] if node.trains else []


def visible_gpus() -> list[str]:
    """The GPUs this process may use: ``CUDA_VISIBLE_DEVICES`` when set, else all that torch sees."""
    spec = os.environ.get("CUDA_VISIBLE_DEVICES")
    if spec is not None:
        return [device.strip() for device in spec.split(",") if device.strip()]
    import torch

    return [str(index) for index in range(torch.cuda.device_count())]


class GpuPool:
    """The GPUs of this process's training tasks: a task takes all it needs at once or waits, so two
    multi-GPU cells can never each hold part of what they need and wait for each other."""

    def __init__(self, gpus: tuple[str, ...]) -> None:
        self.free = list(gpus)
        self.size = len(gpus)
        self.changed = threading.Condition()

    def take(self, count: int) -> list[str]:
        if count > self.size:
            raise ValueError(f"distill.devices: {count} GPUs asked for but this machine shows {self.size}")
        with self.changed:
            self.changed.wait_for(lambda: len(self.free) >= count)
            taken, self.free = self.free[:count], self.free[count:]
            return taken

    def give_back(self, gpus: list[str]) -> None:
        with self.changed:
            self.free.extend(gpus)
            self.changed.notify_all()


_GPU_POOLS: dict[tuple[str, ...], GpuPool] = {}
_GPU_POOLS_LOCK = threading.Lock()


@contextlib.contextmanager
def pinned_gpu(count: int = 1) -> Iterator[dict[str, str]]:
    """``{"CUDA_VISIBLE_DEVICES": <ids>}`` naming `count` GPUs no other training task of this process holds (waits
    until that many are free, then takes them together), so that concurrent stages use different GPUs; ``{}`` on a
    machine without GPUs."""
    gpus = tuple(visible_gpus())
    if not gpus:
        yield {}
        return
    with _GPU_POOLS_LOCK:
        pool = _GPU_POOLS.setdefault(gpus, GpuPool(gpus))
    taken = pool.take(count)
    try:
        yield {"CUDA_VISIBLE_DEVICES": ",".join(taken)}
    finally:
        pool.give_back(taken)


def stage_env(parent_run_id: str, flow_run_id: str) -> dict[str, str]:
    """The stage environment (this installation's bin/ first on PATH) plus the ids stage runs record:
    MLflow parent run and Prefect flow run."""
    return {**stage_environment(), tracking.PARENT_ENV: parent_run_id, tracking.PREFECT_ENV: flow_run_id}
