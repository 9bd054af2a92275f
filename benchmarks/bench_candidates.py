"""Speed-up candidates for the unrolled step (issue 8), measured so that what is kept or dropped has a number.

Parts (one per process, JSON on stdout):

- `conv-share`: one `MatchingEngine` iteration (ours, `gradient="unroll"`), with the time spent inside the step's
  convolution calls (`ast_core.functional._conv` / `_conv_backward`) summed. The reference does the same
  convolutions, so this is the floor both share; the rest is what a faster step can still remove.
- `layout`: each convolution kind of the step (forward, weight gradient, input gradient) at each ConvNet-3
  block shape, contiguous (NCHW) vs `torch.channels_last` (NHWC) inputs, interleaved, minimum of `--repeats`.
- `kernels`: the kernels kept in `ast_core.models` against the library's, at the step's and the evaluation's
  shapes: the first convolution of a grey image (forward, oneDNN vs native) and the 2x2 average pool (forward
  + backward, `F.avg_pool2d` vs `AvgPool2x2`).
- `compile`: one iteration with the step's two passes (`_forward_pass`, `_backward_pass`) compiled by
  `torch.compile` (inductor), against eager in the same process; the first compiled call's time is reported
  apart (it includes compilation).

    python benchmarks/bench_candidates.py conv-share --ipc 10 --syn-steps 20
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from bench_distill import _iteration  # benchmarks/ is on sys.path as the script's folder

import ast_core.functional as functional
from ast_core.models import AvgPool2x2, native_cpu_convolution

PARTS = ("conv-share", "layout", "compile", "kernels")
WIDTH = 128
# where -> (batch, first-layer width): the distillation step (width 128, all images of ipc 1 and 10), the
# evaluation networks (width 16, one batch of ipc 10) and expert training (width 16, batch 256)
KERNEL_SHAPES = {"step ipc 1": (10, WIDTH), "step ipc 10": (100, WIDTH), "evaluation ipc 10": (100, 16),
                 "experts": (256, 16)}


def _seconds(run: Callable[[], object]) -> float:
    tic = time.perf_counter()
    run()
    return time.perf_counter() - tic


def conv_share(ipc: int, channels: int, size: int, syn_steps: int, repeats: int) -> dict[str, object]:
    """Seconds per iteration and the part of it spent in the step's convolutions (min over repeats)."""
    spent = [0.0]

    def timed(function: Callable[..., object]) -> Callable[..., object]:
        def wrapper(*args: object, **kwargs: object) -> object:
            tic = time.perf_counter()
            result = function(*args, **kwargs)
            spent[0] += time.perf_counter() - tic
            return result
        return wrapper

    functional._conv = timed(functional._conv)
    functional._conv_backward = timed(functional._conv_backward)
    iteration = _iteration("ours", ipc, channels, size, syn_steps, torch.device("cpu"))
    iteration()
    rows = []
    for _ in range(repeats):
        spent[0] = 0.0
        rows.append((_seconds(iteration), spent[0]))
    total, conv = min(rows)
    return {"part": "conv-share", "seconds": total, "conv_seconds": conv, "conv_share": conv / total}


def _conv_kinds(batch: int, in_channels: int, in_size: int, padding: int) -> dict[str, Callable[[], object]]:
    """The three convolution calls of one block, NCHW and channels_last, on random tensors."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, in_channels, in_size, in_size, generator=generator)
    weight = torch.randn(WIDTH, in_channels, 3, 3, generator=generator)
    out_size = in_size + 2 * padding - 2
    grad = torch.randn(batch, WIDTH, out_size, out_size, generator=generator)
    calls = {}
    for layout, fmt in (("nchw", torch.contiguous_format), ("channels_last", torch.channels_last)):
        xs, ws, gs = (t.contiguous(memory_format=fmt) for t in (x, weight, grad))
        calls[f"forward/{layout}"] = lambda xs=xs, ws=ws: F.conv2d(xs, ws, padding=padding)
        calls[f"weight_grad/{layout}"] = lambda xs=xs, ws=ws, gs=gs: functional._conv_backward(
            gs, xs, ws, padding, input_grad=False)
        calls[f"input_grad/{layout}"] = lambda xs=xs, ws=ws, gs=gs: functional._conv_backward(
            gs, xs, ws, padding, weight_grad=False)
    return calls


def layout(ipc: int, channels: int, size: int, repeats: int) -> dict[str, object]:
    """Milliseconds per call (min over interleaved repeats) for each block of ConvNet-3 and each layout."""
    batch = 10 * ipc
    padding = 3 if size == 28 else 1
    first = size + 2 * padding - 2
    blocks = {f"block 1 ({channels}->{WIDTH}, {first}px)": (channels, size, padding),
              f"block 2 ({WIDTH}->{WIDTH}, {first // 2}px)": (WIDTH, first // 2, 1),
              f"block 3 ({WIDTH}->{WIDTH}, {first // 4}px)": (WIDTH, first // 4, 1)}
    result: dict[str, object] = {"part": "layout"}
    for name, shape in blocks.items():
        calls = _conv_kinds(batch, *shape)
        for call in calls.values():
            call()
        times: dict[str, list[float]] = {key: [] for key in calls}
        for _ in range(repeats):
            for key, call in calls.items():
                times[key].append(_seconds(call))
        result[name] = {key: 1e3 * min(values) for key, values in times.items()}
    return result


def kernels(repeats: int) -> dict[str, object]:
    """Milliseconds (min over interleaved repeats) of the library's and the kept kernel for each shape."""
    generator = torch.Generator().manual_seed(0)
    result: dict[str, object] = {"part": "kernels"}
    for where, (batch, width) in KERNEL_SHAPES.items():
        x = torch.randn(batch, 1, 28, 28, generator=generator)
        weight = torch.randn(width, 1, 3, 3, generator=generator)
        maps = torch.randn(batch, width, 32, 32, generator=generator, requires_grad=True)
        grad = torch.randn(batch, width, 16, 16, generator=generator)

        def native_conv(x: torch.Tensor = x, weight: torch.Tensor = weight) -> torch.Tensor:
            with native_cpu_convolution(x, weight):
                return F.conv2d(x, weight, padding=3)

        pairs = {
            "first conv forward": (lambda x=x, weight=weight: F.conv2d(x, weight, padding=3), native_conv),
            "pool forward + backward": (
                lambda maps=maps, grad=grad: torch.autograd.grad(F.avg_pool2d(maps, 2), maps, grad),
                lambda maps=maps, grad=grad: torch.autograd.grad(AvgPool2x2()(maps), maps, grad)),
        }
        times: dict[str, tuple[list[float], list[float]]] = {call: ([], []) for call in pairs}
        for library, kept in pairs.values():
            library(), kept()
        for _ in range(repeats):
            for call, (library, kept) in pairs.items():
                times[call][0].append(_seconds(library))
                times[call][1].append(_seconds(kept))
        result[where] = {call: (1e3 * min(lib), 1e3 * min(own)) for call, (lib, own) in times.items()}
    return result


def compile_passes(ipc: int, channels: int, size: int, syn_steps: int, repeats: int) -> dict[str, object]:
    """Median s/it eager vs with both passes compiled by inductor, interleaved in one process."""
    eager_passes = functional._forward_pass, functional._backward_pass
    compiled_passes = (torch.compile(functional._forward_pass, dynamic=False),
                       torch.compile(functional._backward_pass, dynamic=False))
    iteration = _iteration("ours", ipc, channels, size, syn_steps, torch.device("cpu"))

    def use(passes: tuple[Callable[..., object], Callable[..., object]]) -> None:
        functional._forward_pass, functional._backward_pass = passes

    use(eager_passes)
    iteration()
    use(compiled_passes)
    first_compiled = _seconds(iteration)
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    for _ in range(repeats):
        for key, passes in (("eager", eager_passes), ("compiled", compiled_passes)):
            use(passes)
            times[key].append(_seconds(iteration))
    return {"part": "compile", "first_compiled_seconds": first_compiled,
            **{f"{key}_seconds": statistics.median(values) for key, values in times.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=PARTS)
    parser.add_argument("--ipc", type=int, default=10)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--syn-steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    functional.reuse_freed_cpu_memory()
    if args.part == "conv-share":
        result = conv_share(args.ipc, args.channels, args.size, args.syn_steps, args.repeats)
    elif args.part == "layout":
        result = layout(args.ipc, args.channels, args.size, args.repeats)
    elif args.part == "kernels":
        result = kernels(args.repeats)
    else:
        result = compile_passes(args.ipc, args.channels, args.size, args.syn_steps, args.repeats)
    result.update(ipc=args.ipc, channels=args.channels, size=args.size, syn_steps=args.syn_steps,
                  threads=torch.get_num_threads())
    print(json.dumps(result))


if __name__ == "__main__":
    main()
