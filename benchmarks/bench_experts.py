"""Expert-training throughput (docs/method.md section 2): images/s of an epoch with and without AST's gradient penalty.

Times `ast_core.experts.train_epoch` (DSA + forward + backward + step, AST Algorithm 1) on a random subset of
the training split for three loss settings side by side: cross-entropy alone (MTT experts), CE + gradient
penalty with the per-sample norm (Eq. 19, the project default) and with the per-pixel norm (authors' code).
Prints a Markdown table with images/s, the slowdown relative to CE and the projected time of one expert
(`--epochs` epochs over the full training split).

    OMP_NUM_THREADS=2 python benchmarks/bench_experts.py --dataset fashion_mnist [--images 64] [--width 128]
"""

from __future__ import annotations

import argparse
import time

import torch

from ast_core.augment import DSA
from ast_core.data import load_dataset
from ast_core.experts import make_optimizer, train_epoch
from ast_core.models import build_model
from ast_core.settings import ExpertConfig

VARIANTS = {
    "CE (MTT expert)": {"grad_penalty": False},
    "CE + GP, per-sample norm": {"grad_penalty": True, "gp_norm": "sample"},
    "CE + GP, per-pixel norm": {"grad_penalty": True, "gp_norm": "pixel"},
}
DEFAULT_IMAGES = {"digits": 1024, "fashion_mnist": 64}  # under a minute in all on 2 CPU cores
WARMUP_IMAGES = 16


def seconds_per_pass(x: torch.Tensor, y: torch.Tensor, config: ExpertConfig, args: argparse.Namespace,
                     in_channels: int, num_classes: int, strategy: str) -> float:
    """Mean wall time of one `train_epoch` over (x, y) after a small warm-up pass."""
    torch.manual_seed(0)
    model = build_model(config.arch, in_channels, num_classes, x.shape[-1], width=config.width).to(args.device)
    optimizer = make_optimizer(model, config)
    dsa = DSA(strategy)
    shuffle, augment = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)

    def one_pass(images: torch.Tensor, labels: torch.Tensor) -> None:
        train_epoch(model, optimizer, images, labels, config, 0, shuffle, dsa, augment)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    one_pass(x[:WARMUP_IMAGES], y[:WARMUP_IMAGES])
    start = time.perf_counter()
    for _ in range(args.repeats):
        one_pass(x, y)
    return (time.perf_counter() - start) / args.repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="digits", choices=["digits", "fashion_mnist"])
    parser.add_argument("--images", type=int, default=None,
                        help="training images per timed pass (default: 1024 digits, 64 fashion_mnist)")
    parser.add_argument("--repeats", type=int, default=1, help="timed passes per variant")
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=50, help="epochs of the projected full expert")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cache-dir", default=None)
    args = parser.parse_args()
    data = load_dataset(args.dataset, cache_dir=args.cache_dir)
    images = args.images or DEFAULT_IMAGES[args.dataset]
    subset = torch.randperm(data.train_x.shape[0], generator=torch.Generator().manual_seed(0))[:images]
    x, y = data.train_x[subset].to(args.device), data.train_y[subset].to(args.device)
    base = ExpertConfig(width=args.width, batch_size=args.batch_size, epochs=args.epochs)
    strategy = base.dsa_for(data.info.name)
    print(f"{args.dataset}: {x.shape[0]} of {data.train_x.shape[0]} training images {tuple(x.shape[1:])}, "
          f"ConvNet width {args.width}, batch {args.batch_size}, DSA {strategy}, device {args.device}, "
          f"torch threads {torch.get_num_threads()}\n")
    print(f"| loss | images/s | x CE time | min per expert ({args.epochs} epochs, full train split) |")
    print("| --- | ---: | ---: | ---: |")
    reference = None
    for name, overrides in VARIANTS.items():
        config = ExpertConfig(width=args.width, batch_size=args.batch_size, epochs=args.epochs, **overrides)
        elapsed = seconds_per_pass(x, y, config, args, data.info.channels, data.info.num_classes, strategy)
        reference = reference or elapsed
        rate = x.shape[0] / elapsed
        expert_minutes = args.epochs * data.train_x.shape[0] / rate / 60
        print(f"| {name} | {rate:,.0f} | {elapsed / reference:.2f} | {expert_minutes:,.1f} |")


if __name__ == "__main__":
    main()
