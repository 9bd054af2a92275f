"""Throughput of the train-on-synthetic evaluation (docs/method.md section 5) for ConvNet on FMNIST-shaped data.

For ipc 1/10/50 (10 classes, 1 x 28 x 28 random images) it times `evaluate_synthetic` with one network at
`--iterations` + 1 and at 1 iteration (after one warm-up call); the difference removes model construction
and the test pass, leaving the cost of the SGD steps (DSA + forward + backward). Prints a Markdown table of
iterations/s, training images/s and the projected time of one network under the paper's 1000-iteration
protocol.

    python benchmarks/bench_evaluate.py [--ipc 1 10 50] [--iterations 3] [--width 128] [--device cpu]
"""

from __future__ import annotations

import argparse
import time

import torch

from ast_core.data import DatasetInfo, DatasetSplits
from ast_core.evaluate import evaluate_synthetic
from ast_core.settings import EvalSpec

NUM_CLASSES = 10
SHAPE = (1, 28, 28)
EVAL_IMAGES = 256
PAPER_ITERATIONS = 1000


def fmnist_shaped(generator: torch.Generator) -> DatasetSplits:
    """Random FMNIST-shaped splits (only the evaluation split's size matters here)."""
    info = DatasetInfo(name="fashion_mnist", num_classes=NUM_CLASSES, channels=SHAPE[0], image_size=SHAPE[1],
                       mean=(0.2861,), std=(0.3530,), class_names=tuple(str(c) for c in range(NUM_CLASSES)))
    x = torch.randn(EVAL_IMAGES, *SHAPE, generator=generator)
    y = torch.randint(NUM_CLASSES, (EVAL_IMAGES,), generator=generator)
    return DatasetSplits(info=info, train_x=x, train_y=y, val_x=x, val_y=y, test_x=x, test_y=y)


def seconds(images: torch.Tensor, labels: torch.Tensor, data: DatasetSplits, iterations: int,
            args: argparse.Namespace) -> float:
    """Wall time of one `evaluate_synthetic` call with a single network."""
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    spec = EvalSpec(num_models=1, iterations=iterations, width=args.width, batch_size=args.batch_size)
    evaluate_synthetic(images, labels, 0.01, data, spec, device=args.device)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ipc", type=int, nargs="+", default=[1, 10, 50])
    parser.add_argument("--iterations", type=int, default=3, help="timed SGD steps per setting")
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    data = fmnist_shaped(generator)
    print(f"device {args.device}, torch threads {torch.get_num_threads()}, ConvNet width {args.width}, "
          f"{args.iterations} timed iterations\n")
    warm_up = torch.randn(NUM_CLASSES, *SHAPE, generator=generator)
    seconds(warm_up, torch.arange(NUM_CLASSES), data, 1, args)
    print("| ipc | images | batch | iterations/s | images/s | s per network (1000 it) |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for ipc in args.ipc:
        images = torch.randn(ipc * NUM_CLASSES, *SHAPE, generator=generator)
        labels = torch.arange(NUM_CLASSES).repeat_interleave(ipc)
        batch = min(args.batch_size, images.shape[0])
        overhead = seconds(images, labels, data, 1, args)
        total = seconds(images, labels, data, args.iterations + 1, args)
        per_step = max(total - overhead, 1e-9) / args.iterations
        print(f"| {ipc} | {images.shape[0]} | {batch} | {1 / per_step:.1f} | {batch / per_step:,.0f} | "
              f"{PAPER_ITERATIONS * per_step:,.0f} |")


if __name__ == "__main__":
    main()
