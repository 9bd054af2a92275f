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
import queue
import threading
from collections.abc import Iterator

from pipeline import tracking
from pipeline.runner import stage_environment
from pipeline.stage_graph import StageNode

GPU_TAG = "gpu"
TAIL_LINES = 40
_GPU_POOLS: dict[tuple[str, ...], queue.SimpleQueue[str]] = {}
_GPU_POOLS_LOCK = threading.Lock()


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


@contextlib.contextmanager
def pinned_gpu() -> Iterator[dict[str, str]]:
    """``{"CUDA_VISIBLE_DEVICES": <id>}`` naming a GPU no other training task of this process holds (waits for
    one to be free), so that N concurrent stages use N different GPUs; ``{}`` on a machine without GPUs."""
    gpus = tuple(visible_gpus())
    if not gpus:
        yield {}
        return
    with _GPU_POOLS_LOCK:
        if gpus not in _GPU_POOLS:
            _GPU_POOLS[gpus] = queue.SimpleQueue()
            for gpu in gpus:
                _GPU_POOLS[gpus].put(gpu)
        pool = _GPU_POOLS[gpus]
    gpu = pool.get()
    try:
        yield {"CUDA_VISIBLE_DEVICES": gpu}
    finally:
        pool.put(gpu)


def stage_env(parent_run_id: str, flow_run_id: str) -> dict[str, str]:
    """The stage environment (this installation's bin/ first on PATH) plus the ids stage runs record:
    MLflow parent run and Prefect flow run."""
    return {**stage_environment(), tracking.PARENT_ENV: parent_run_id, tracking.PREFECT_ENV: flow_run_id}
