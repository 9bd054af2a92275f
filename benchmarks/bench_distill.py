"""Seconds and peak memory of one distillation iteration (docs/method.md section 4), one setting per process.

Methods: `reference` (the MTT-style unroll of `benchmarks/reference_step.py`), `ours` (`MatchingEngine`,
`gradient="unroll"`: hand-written ConvNet step + freed-memory reuse), `ours-no-reuse` (the same without
`reuse_freed_cpu_memory`, to attribute the CPU gain), `tesla` (`gradient="tesla"`) and `ours-ast` (`ours`
with every per-iteration AST module on: balanced inner loss, intermediate matching, weight perturbation ρ 0.1;
representative initialisation costs nothing per iteration). `--expert-epochs` sets M (intermediate matching
needs M >= 2; compare `ours` and `ours-ast` at the same M). ConvNet-3 width 128,
10 classes of random images, all images per student step, DSA `color_crop_cutout_flip_scale_rotate`, one
matched expert epoch. One warm-up iteration, then `--repeats` timed ones (the median is reported).

`--count-flops` runs one more iteration under `torch.utils.flop_counter.FlopCounterMode` and adds the dense
FLOPs it counts (convolutions, matrix products; elementwise work is not counted) to the result, so the share of a
device's peak can be computed from a count rather than a guess.

Peak memory: on CUDA `torch.cuda.max_memory_allocated` during the timed iterations; on CPU the process's peak
resident set (`ru_maxrss`) minus the resident set before the first iteration, so run one setting per fresh
process (`run_all.py` does).

    python benchmarks/bench_distill.py --method ours --ipc 10 --channels 1 --size 28 --syn-steps 20
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time
from collections.abc import Callable

import torch
from reference_step import ReparamModule, reference_gradients  # benchmarks/ is on sys.path as the script's folder
from torch.utils.flop_counter import FlopCounterMode

import ast_core.matching as matching
from ast_core.augment import DSA
from ast_core.models import FlatModel, build_model
from ast_core.settings import DistillConfig
from ast_core.trajectory import PlainTrajectory

METHODS = ("reference", "ours", "ours-no-reuse", "tesla", "ours-ast")
NUM_CLASSES = 10
STRATEGY = "color_crop_cutout_flip_scale_rotate"


def _rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _iteration(method: str, ipc: int, channels: int, size: int, syn_steps: int,
               device: torch.device, expert_epochs: int = 1) -> Callable[[], None]:
    """A closure running one full iteration (sampling, DSA, unroll, gradients, image/lr update)."""
    generator = torch.Generator().manual_seed(0)
    module = build_model("convnet", channels, NUM_CLASSES, size).to(device)
    flat_model = FlatModel(module)
    start = flat_model.flatten()
    points = [start]
    for _ in range(expert_epochs):
        points.append(points[-1] + 0.01 * torch.randn(start.shape, generator=generator).to(device))
    target = points[1]
    images = torch.randn(NUM_CLASSES * ipc, channels, size, size, generator=generator).to(device)
    labels = torch.arange(NUM_CLASSES, device=device).repeat_interleave(ipc)
    if method == "reference":
        net, dsa = ReparamModule(module), DSA(STRATEGY)
        syn_lr = torch.tensor(0.01, device=device)

        def reference_iteration() -> None:
            batches = [torch.randperm(len(labels), generator=generator).to(device) for _ in range(syn_steps)]
            _, image_grad, lr_grad = reference_gradients(net, images, labels, batches, start, target, syn_lr,
                                                         lambda x, g: dsa(x, generator=g), generator)
            images.sub_(100.0 * image_grad)
            syn_lr.sub_(1e-5 * lr_grad)

        return reference_iteration
    if method == "ours-no-reuse":
        matching.reuse_freed_cpu_memory = lambda: False
    modules = {"balanced_loss": True, "intermediate_matching": True, "perturb_rho": 0.1} if method == "ours-ast" else {}
    config = DistillConfig(ipc=ipc, syn_steps=syn_steps, expert_epochs=expert_epochs, max_start_epoch=1,
                           lr_teacher=0.01, dsa_strategy=STRATEGY, gradient="tesla" if method == "tesla" else "unroll",
                           **modules)
    return matching.MatchingEngine(config, [PlainTrajectory(points)], flat_model, images, labels, device).step


def count_flops(iteration: Callable[[], None]) -> dict[str, int]:
    """Dense FLOPs of one call of `iteration`: {"flops": all counted ops, "conv_flops": convolutions only}."""
    with FlopCounterMode(display=False) as counter:
        iteration()
    counts = counter.get_flop_counts()["Global"]
    return {"flops": counter.get_total_flops(),
            "conv_flops": sum(flops for op, flops in counts.items() if "convolution" in str(op))}


def run_cell(method: str, ipc: int, channels: int, size: int, syn_steps: int, repeats: int,
             device: str, expert_epochs: int = 1, flops: bool = False) -> dict[str, object]:
    """Time one setting in this process: {"seconds": median s/iteration, "memory_mb": peak, ...}.

    With `flops`, one more (untimed) iteration counts the FLOPs per iteration (`count_flops`).
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not supported; allowed: {', '.join(METHODS)}")
    torch_device = torch.device(device)
    cuda = torch_device.type == "cuda"
    if method == "reference" and expert_epochs != 1:
        raise ValueError("the reference step matches one expert epoch: use --expert-epochs 1")
    iteration = _iteration(method, ipc, channels, size, syn_steps, torch_device, expert_epochs)

    def timed() -> float:
        if cuda:
            torch.cuda.synchronize()
        tic = time.perf_counter()
        iteration()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - tic

    baseline = _rss_mb()
    warm_up = timed()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    seconds = [timed() for _ in range(repeats)]
    memory = torch.cuda.max_memory_allocated() / 2**20 if cuda else _peak_rss_mb() - baseline
    counted = count_flops(iteration) if flops else {}
    return {**counted, "method": method, "ipc": ipc, "channels": channels, "size": size, "syn_steps": syn_steps,
            "expert_epochs": expert_epochs,
            "seconds": statistics.median(seconds), "all_seconds": seconds, "warm_up_seconds": warm_up,
            "memory_mb": memory, "threads": torch.get_num_threads(), "device": device}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=METHODS, required=True)
    parser.add_argument("--ipc", type=int, default=10)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--syn-steps", type=int, default=20)
    parser.add_argument("--expert-epochs", type=int, default=1, help="M, matched expert epochs")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--count-flops", action="store_true", help="add FLOPs per iteration (one more iteration)")
    args = parser.parse_args()
    try:
        result = run_cell(args.method, args.ipc, args.channels, args.size, args.syn_steps, args.repeats,
                          args.device, args.expert_epochs, args.count_flops)
    except torch.cuda.OutOfMemoryError:
        result = {"method": args.method, "error": "out of memory"}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
