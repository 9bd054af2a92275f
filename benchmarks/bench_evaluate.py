"""Train-on-synthetic evaluation (docs/method.md section 5): K networks one at a time vs at once, ConvNet on
FMNIST-shaped data.

For each ipc (10 classes, 1 x 28 x 28 random images) and each K it times `evaluate_synthetic` with K networks
one at a time (`EvalSpec.batched=False`, the reference) and all at once (one `ConvNetEnsemble`, whatever the
batch), alternating the two in one process. Each is timed at `--iterations` + 1 and at 1 iteration; the
difference removes model construction and the scoring pass, leaving the SGD steps (DSA + forward + backward +
update) of all K networks. Prints a Markdown table: seconds per iteration of the K networks each way, the
speed-up, which way `evaluate_synthetic` takes by default on this device (`networks_at_once`), and the
projected time of the K networks under the pipeline's 300-iteration test protocol that way.

    python benchmarks/bench_evaluate.py [--ipc 1 10 50] [--models 1 3 5 10] [--iterations 20] [--width 16]
                                        [--repeats 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from unittest import mock

import torch

import ast_core.evaluate as evaluate
from ast_core.data import DatasetInfo, DatasetSplits
from ast_core.settings import EvalSpec

NUM_CLASSES = 10
SHAPE = (1, 28, 28)
EVAL_IMAGES = 256
PIPELINE_ITERATIONS = 300  # evaluate.iterations in params.yaml


def fmnist_shaped(generator: torch.Generator) -> DatasetSplits:
    """Random FMNIST-shaped splits (only the evaluation split's size matters here)."""
    info = DatasetInfo(name="fashion_mnist", num_classes=NUM_CLASSES, channels=SHAPE[0], image_size=SHAPE[1],
                       mean=(0.2861,), std=(0.3530,), class_names=tuple(str(c) for c in range(NUM_CLASSES)))
    x = torch.randn(EVAL_IMAGES, *SHAPE, generator=generator)
    y = torch.randint(NUM_CLASSES, (EVAL_IMAGES,), generator=generator)
    return DatasetSplits(info=info, train_x=x, train_y=y, val_x=x, val_y=y, test_x=x, test_y=y)


def seconds(images: torch.Tensor, labels: torch.Tensor, data: DatasetSplits, spec: EvalSpec, device: str) -> float:
    """Wall time of one `evaluate_synthetic` call."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    evaluate.evaluate_synthetic(images, labels, 0.01, data, spec, device=device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def per_iteration(images: torch.Tensor, labels: torch.Tensor, data: DatasetSplits, spec: EvalSpec,
                  args: argparse.Namespace) -> float:
    """Seconds per SGD iteration of the spec's K networks: (time at iterations + 1) - (time at 1)."""
    overhead = seconds(images, labels, data, dataclasses.replace(spec, iterations=1), args.device)
    total = seconds(images, labels, data, dataclasses.replace(spec, iterations=args.iterations + 1), args.device)
    return max(total - overhead, 1e-9) / args.iterations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ipc", type=int, nargs="+", default=[1, 10, 50])
    parser.add_argument("--models", type=int, nargs="+", default=[1, 3, 5, 10], help="K, networks per set")
    parser.add_argument("--iterations", type=int, default=20, help="timed SGD iterations per call")
    parser.add_argument("--repeats", type=int, default=2, help="alternating sequential/batched pairs (min kept)")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    data = fmnist_shaped(generator)
    print(f"device {args.device}, torch threads {torch.get_num_threads()}, ConvNet width {args.width}, batch "
          f"{args.batch_size}, {args.iterations} timed iterations, min of {args.repeats} alternating pairs\n")
    warm_up = EvalSpec(num_models=2, iterations=1, width=args.width, batch_size=args.batch_size)
    seconds(torch.randn(NUM_CLASSES, *SHAPE, generator=generator), torch.arange(NUM_CLASSES), data, warm_up,
            args.device)
    print(f"| ipc | K | one at a time s/it | all at once s/it | speed-up | default | default s for K x "
          f"{PIPELINE_ITERATIONS} it |")
    print("| ---: | ---: | ---: | ---: | ---: | --- | ---: |")
    for ipc in args.ipc:
        images = torch.randn(ipc * NUM_CLASSES, *SHAPE, generator=generator)
        labels = torch.arange(NUM_CLASSES).repeat_interleave(ipc)
        for count in args.models:
            spec = EvalSpec(num_models=count, width=args.width, batch_size=args.batch_size)
            times: dict[bool, list[float]] = {False: [], True: []}
            for _ in range(args.repeats):
                times[False].append(per_iteration(images, labels, data, dataclasses.replace(spec, batched=False), args))
                with mock.patch.object(evaluate, "CPU_ENSEMBLE_BATCH", math.inf):  # all at once, whatever the batch
                    times[True].append(per_iteration(images, labels, data, spec, args))
            sequential, batched = min(times[False]), min(times[True])
            device = torch.device(args.device)
            together = evaluate.networks_at_once(spec, min(args.batch_size, images.shape[0]), device) > 1
            print(f"| {ipc} | {count} | {sequential:.4f} | {batched:.4f} | {sequential / batched:.2f}x | "
                  f"{'all at once' if together else 'one at a time'} | "
                  f"{PIPELINE_ITERATIONS * (batched if together else sequential):,.1f} |")


if __name__ == "__main__":
    main()
