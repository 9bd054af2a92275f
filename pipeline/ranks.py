"""One distillation cell on `distill.devices` processes (docs/method.md section 12).

`ast-dd distill` with `devices > 1` starts the ranks through torchrun (`--standalone`: a free port per cell) and
waits for them; it keeps the project's lock meanwhile, so the ranks do not take it. Each rank joins the process
group (NCCL on its own GPU, gloo on the CPU) and distils with `ast_core.sharded.BatchShard`; rank 0 alone writes
outputs, checkpoints and MLflow records. When a rank fails, torchrun stops the others.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import torch
import torch.distributed as dist

from ast_core.sharded import BatchShard
from pipeline.locking import RANKS_PARENT

log = logging.getLogger(__name__)


def is_rank() -> bool:
    """Whether this process is one of the ranks `launch` started."""
    return RANKS_PARENT in os.environ


def launch(devices: int, argv: list[str]) -> None:
    """Run `ast-dd <argv>` as `devices` ranks and wait; raises RuntimeError when they fail."""
    threads = max(1, int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1) // devices)
    env = {**os.environ, RANKS_PARENT: str(os.getpid()), "OMP_NUM_THREADS": str(threads)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={devices}",
               "-m", "pipeline.cli", *argv]
    log.info("distilling on %d processes: %s", devices, " ".join(command[1:]))
    code = subprocess.run(command, env=env, check=False).returncode
    if code:
        raise RuntimeError(f"the distillation over {devices} processes (distill.devices) failed with exit code "
                           f"{code}: the ranks' errors are above")


def join(device: torch.device) -> tuple[BatchShard, torch.device]:
    """Join the ranks' process group; returns this rank's shard and device (its own GPU under CUDA)."""
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    shard = BatchShard.current()
    assert shard is not None, "launched with one rank"
    return shard, device


def leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
