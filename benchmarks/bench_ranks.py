"""Seconds per distillation iteration and peak memory per rank when one distillation runs on R processes
(`ast_core.sharded`, docs/method.md section 12): gloo on the CPU, NCCL on GPUs (one per rank).

Each setting runs in fresh processes: R ranks of `MatchingEngine.step` (unrolled ConvNet-3, 10 classes of random
FMNIST-shaped images, all images per student step, DSA), one warm-up iteration, then `--repeats` timed ones
(median). Peak memory per rank: on CUDA `max_memory_allocated`, on the CPU the rank's peak resident set minus its
resident set before the first iteration (the largest over ranks is reported). On a CPU the ranks share the cores:
each gets cores / R threads, so R > 1 pays only where the collectives cost less than the idle cores they use.

    python benchmarks/bench_ranks.py --ranks 1 2 --ipcs 10 50 --width 16 --syn-steps 10
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from bench_distill import NUM_CLASSES, STRATEGY, _peak_rss_mb, _rss_mb  # benchmarks/ is on sys.path

from ast_core.matching import MatchingEngine
from ast_core.models import FlatModel, build_model
from ast_core.settings import DistillConfig
from ast_core.sharded import BatchShard
from ast_core.trajectory import PlainTrajectory


def rank_main(rank: int, world: int, folder: str, setting: dict[str, object]) -> None:
    """One rank: time `repeats` iterations after a warm-up; write its result to folder/rank<r>.json."""
    cuda = setting["device"] == "cuda"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, int(setting["cores"]) // world))
    shard = None
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{folder}/init", rank=rank,
                                world_size=world)
        shard = BatchShard.current()
    generator = torch.Generator().manual_seed(0)
    flat_model = FlatModel(build_model("convnet", 1, NUM_CLASSES, 28, width=int(setting["width"])).to(device))
    start = flat_model.flatten()
    target = start + 0.01 * torch.randn(start.shape, generator=generator).to(device)
    ipc = int(setting["ipc"])
    images = torch.randn(NUM_CLASSES * ipc, 1, 28, 28, generator=generator).to(device)
    labels = torch.arange(NUM_CLASSES, device=device).repeat_interleave(ipc)
    config = DistillConfig(ipc=ipc, syn_steps=int(setting["syn_steps"]), expert_epochs=1, max_start_epoch=1,
                           lr_teacher=0.01, dsa_strategy=STRATEGY)
    engine = MatchingEngine(config, [PlainTrajectory([start, target])], flat_model, images, labels, device,
                            shard=shard)

    def timed() -> float:
        if cuda:
            torch.cuda.synchronize()
        tic = time.perf_counter()
        engine.step()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - tic

    baseline = _rss_mb()
    timed()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    seconds = [timed() for _ in range(int(setting["repeats"]))]
    memory = torch.cuda.max_memory_allocated() / 2**20 if cuda else _peak_rss_mb() - baseline
    Path(folder, f"rank{rank}.json").write_text(json.dumps({"seconds": statistics.median(seconds),
                                                            "memory_mb": memory}))
    if world > 1:
        dist.destroy_process_group()


def run_setting(world: int, setting: dict[str, object]) -> dict[str, object]:
    """R ranks of one setting in fresh processes: the slowest rank's median seconds, the largest peak memory."""
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(rank_main, args=(world, folder, setting), nprocs=world, join=True)
        ranks = [json.loads(Path(folder, f"rank{rank}.json").read_text()) for rank in range(world)]
    return {**setting, "ranks": world, "seconds": max(r["seconds"] for r in ranks),
            "memory_mb_per_rank": max(r["memory_mb"] for r in ranks)}


def markdown(rows: list[dict[str, object]]) -> str:
    lines = ["| ipc | images | ranks | s / iteration | vs 1 rank | peak MB per rank |",
             "| --- | --- | --- | --- | --- | --- |"]
    single = {row["ipc"]: row["seconds"] for row in rows if row["ranks"] == 1}
    for row in rows:
        ratio = single.get(row["ipc"])
        lines.append(f"| {row['ipc']} | {NUM_CLASSES * int(row['ipc'])} | {row['ranks']} | {row['seconds']:.2f} | "
                     f"{(ratio / row['seconds']) if ratio else float('nan'):.2f}x | {row['memory_mb_per_rank']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--ipcs", type=int, nargs="+", default=[10, 50])
    parser.add_argument("--syn-steps", type=int, default=20)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    rows = [run_setting(world, {"ipc": ipc, "syn_steps": args.syn_steps, "width": args.width,
                                "repeats": args.repeats, "device": args.device, "cores": cores})
            for ipc in args.ipcs for world in args.ranks]
    print(f"{args.device}, {cores} cores, ConvNet-3 width {args.width}, N {args.syn_steps}\n")
    print(markdown(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
