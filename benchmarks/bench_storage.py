"""Bytes on disk and load time of one expert trajectory (docs/method.md sections 2-3): plain vs MCT vs fp16.

One synthetic 51-checkpoint ConvNet-3 trajectory (random walk with shrinking steps, FlatModel order) is saved
with `ast_core.trajectory`: plain float32 (MTT), plain float16, MCT convexified with 2 and 4 anchors
(`ConvexTrajectory.from_checkpoints`), and 2 anchors in float16. Load time = `load_trajectory` plus reading a
start and a target (`.at(t)`, `.at(t + M)`), median of `repeats`, file in the page cache.

    python benchmarks/bench_storage.py [--channels 1 --size 28]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ast_core.models import FlatModel, build_model
from ast_core.trajectory import ConvexTrajectory, PlainTrajectory, load_trajectory

EPOCHS = 50


def synthetic_trajectory(channels: int, size: int, seed: int = 0) -> tuple[torch.Tensor, tuple[int, ...]]:
    """([K+1, P] checkpoints, layer sizes) of a ConvNet-3 with steps shrinking over the epochs."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    flat_model = FlatModel(build_model("convnet", channels, 10, size))
    steps = torch.randn(EPOCHS, flat_model.num_params, generator=generator) * 1e-3
    steps *= torch.linspace(1.0, 0.2, EPOCHS).unsqueeze(1)
    start = flat_model.flatten().unsqueeze(0)
    return torch.cat([start, start + steps.cumsum(0)]), flat_model.layer_sizes


def _load_seconds(path: Path, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        trajectory = load_trajectory(path)
        trajectory.at(10.5)
        trajectory.at(12.5)
        times.append(time.perf_counter() - tic)
    return statistics.median(times)


def storage_rows(channels: int = 1, size: int = 28, repeats: int = 5) -> list[dict[str, object]]:
    """One row per storage format: {"format", "bytes", "load_seconds"}."""
    checkpoints, layer_sizes = synthetic_trajectory(channels, size)
    plain = PlainTrajectory(checkpoints)
    formats = {
        f"plain, {EPOCHS + 1} checkpoints, float32": (plain, torch.float32),
        f"plain, {EPOCHS + 1} checkpoints, float16": (plain, torch.float16),
        "MCT, 2 anchors, float32": (ConvexTrajectory.from_checkpoints(checkpoints, layer_sizes, 2), torch.float32),
        "MCT, 4 anchors, float32": (ConvexTrajectory.from_checkpoints(checkpoints, layer_sizes, 4), torch.float32),
        "MCT, 2 anchors, float16": (ConvexTrajectory.from_checkpoints(checkpoints, layer_sizes, 2), torch.float16),
    }
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for index, (name, (trajectory, dtype)) in enumerate(formats.items()):
            path = trajectory.save(Path(folder) / f"expert_{index}.safetensors", dtype=dtype)
            rows.append({"format": name, "bytes": path.stat().st_size, "load_seconds": _load_seconds(path, repeats)})
    return rows


def markdown(rows: list[dict[str, object]]) -> str:
    plain = rows[0]["bytes"]
    lines = ["| format | bytes | x smaller than plain fp32 | load + 2 reads (ms) |", "| --- | ---: | ---: | ---: |"]
    lines += [f"| {row['format']} | {row['bytes']:,} | {plain / row['bytes']:.1f} | {1e3 * row['load_seconds']:.1f} |"
              for row in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--size", type=int, default=28)
    args = parser.parse_args()
    print(markdown(storage_rows(args.channels, args.size)))


if __name__ == "__main__":
    main()
