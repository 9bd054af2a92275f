"""Expert training on a Dask cluster: `DaskScheduler`, the `ast_core.experts.ExpertScheduler` of one expert per task.

``train_experts(data, config, out_dir, num_experts, seed, scheduler=DaskScheduler(address))`` gives the same
buffer folder as training here: each worker runs `ast_core.experts.train_expert` for one seed and sends the
trajectory back; this process stores it (`ExpertJob.save`) as soon as it arrives. Trajectories are bit-identical
to sequential training on the CPU (an expert's randomness comes from its seed only), and so are the stored files
(no wall-clock time is stored with an expert). Workers need the package installed, not the buffer folder: the
data travel to them once (scattered) and the checkpoints come back. This module needs only `ast_core`, torch
and dask.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ast_core.data import DatasetSplits
from ast_core.experts import ExpertJob, train_expert
from ast_core.settings import ExpertConfig


def _train_on_worker(data: DatasetSplits, config: ExpertConfig, seed: int, device: str | None
                     ) -> tuple[list[Tensor], dict[str, Any]]:
    """Runs on a Dask worker: `device` None picks the worker's GPU (dask-cuda gives each worker one) or its CPU."""
    chosen = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return train_expert(data, config, seed, device=chosen)


@dataclass(frozen=True)
class DaskScheduler:
    """Experts trained on the Dask scheduler at `address`, one task each, on `device` (None: each worker's GPU,
    else its CPU). `resources` (e.g. ``{"GPU": 1}`` with workers started with ``--resources GPU=1``) is asked
    for per expert."""

    address: str
    device: str | None = None
    resources: dict[str, float] | None = None

    def run(self, data: DatasetSplits, jobs: Sequence[ExpertJob]) -> None:
        from dask.distributed import Client, as_completed

        with Client(self.address) as client:
            shared = client.scatter(data, broadcast=True)
            futures = {client.submit(_train_on_worker, shared, job.config, job.seed, self.device,
                                     resources=self.resources, pure=False): job for job in jobs}
            for future in as_completed(futures):
                futures[future].save(data, *future.result())
