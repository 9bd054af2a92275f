"""Run every benchmark and write BENCHMARKS.md (issue 8): one command, CPU or GPU (device auto).

    .venv/bin/python benchmarks/run_all.py [--quick] [--device cuda] [--repeats 2] [--out BENCHMARKS.md]

(a) seconds per distillation iteration and peak memory, ConvNet-3 on FMNIST- (1x28x28) and CIFAR-shaped
    (3x32x32) random data: the MTT-style reference vs ours (unroll) vs TESLA, one fresh process per cell
    (`bench_distill.py`); on CPU, cells above a work budget (images x N) are skipped and listed as such;
(b) expert-epoch throughput with and without the gradient penalty (`bench_experts.py`);
(c) trajectory bytes: plain 51 checkpoints vs MCT 2/4 anchors vs fp16, and load time (`bench_storage.py`);
(d) train-on-synthetic evaluation, K networks one at a time vs at once (`bench_evaluate.py`), and loading one
    expert vs one iteration;
(e) plain MTT vs every per-iteration AST module on (`bench_distill.py --method ours|ours-ast`), same N and M;
(f) the headline ratio (FMNIST ipc 10, N 20) from alternating reference/ours processes, and the speed-up
    candidates measured against the step (`bench_candidates.py`: convolution share, channels_last,
    torch.compile);
(g) one distillation on R processes, each a slice of every student step's batch (`bench_ranks.py`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

import torch
from bench_storage import markdown as storage_markdown
from bench_storage import storage_rows

from ast_core.io import atomic_write_text
from ast_core.machine import describe_machine

HERE = Path(__file__).resolve().parent
SHAPES = {"FMNIST 1x28x28": (1, 28), "CIFAR 3x32x32": (3, 32)}
METHODS = ("reference", "ours", "tesla")
QUICK_CELLS = {"FMNIST 1x28x28": [(1, 20), (1, 40), (1, 80), (10, 20)], "CIFAR 3x32x32": [(1, 20), (10, 20)]}
FULL_CELLS = [(ipc, steps) for ipc in (1, 10, 50) for steps in (20, 40, 80)]
CPU_BUDGET = {"reference": 2000, "ours": 4000, "tesla": 8000}  # images x N per iteration on CPU
# the issue's target cell: the headline pairs, `ours-no-reuse` (CPU), expert loading and the candidates run here
HEADLINE = ("FMNIST 1x28x28", 10, 20)
SMALL_STEP = ("FMNIST 1x28x28", 1, 20)  # the small step, where per-call costs weigh most: its own pairs
Cell = dict[str, object]  # one bench_distill.py result
Cells = dict[tuple[str, int, int], dict[str, Cell | None]]  # (data, ipc, N) -> method -> result (None: skipped)




def run_script(script: str, *args: str) -> str:
    """stdout of `python benchmarks/<script> args` (stderr is passed through)."""
    command = [sys.executable, str(HERE / script), *args]
    completed = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=False)
    if completed.returncode:
        return f"(`{shlex.join(command[1:])}` failed with exit code {completed.returncode})"
    return completed.stdout.strip()


def json_result(script: str, *args: str) -> Cell:
    """The JSON object a benchmark script prints last, or {"error": the end of its output}."""
    output = run_script(script, *args)
    try:
        return json.loads(output.splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        return {"error": output[-200:]}


def distill_cell(method: str, channels: int, size: int, ipc: int, steps: int, repeats: int, device: str,
                 expert_epochs: int = 1, count_flops: bool = False) -> Cell:
    return json_result("bench_distill.py", "--method", method, "--ipc", str(ipc), "--channels", str(channels),
                       "--size", str(size), "--syn-steps", str(steps), "--repeats", str(repeats),
                       "--device", device, "--expert-epochs", str(expert_epochs),
                       *(["--count-flops"] if count_flops else []))


def _cell_text(result: Cell | None, key: str, fmt: str) -> str:
    if result is None:
        return "skipped"
    if "error" in result:
        return str(result["error"])
    return format(result[key], fmt)


def _ratio(numerator: Cell | None, denominator: Cell | None, key: str) -> str:
    if not numerator or not denominator or "error" in numerator or "error" in denominator:
        return "-"
    return f"{numerator[key] / denominator[key]:.2f}x"


def distill_table(args: argparse.Namespace) -> tuple[str, Cells]:
    """The Markdown of part (a) and every cell's result, keyed by (data, ipc, N) then method."""
    cpu = not args.device.startswith("cuda")
    rows: list[str] = []
    skipped: list[str] = []
    cells: Cells = {}
    for shape, (channels, size) in SHAPES.items():
        for ipc, steps in (QUICK_CELLS[shape] if args.quick else FULL_CELLS):
            results: dict[str, Cell | None] = cells.setdefault((shape, ipc, steps), {})
            for method in METHODS:
                if cpu and 10 * ipc * steps > CPU_BUDGET[method]:
                    results[method] = None
                    skipped.append(f"{method} {shape} ipc {ipc} N {steps}")
                    continue
                results[method] = distill_cell(method, channels, size, ipc, steps, args.repeats, args.device)
                print(f"{shape} ipc {ipc} N {steps} {method}: {results[method]}", file=sys.stderr, flush=True)
            ref, ours, tesla = (results[m] for m in METHODS)
            rows.append(f"| {shape} | {ipc} | {steps} | {_cell_text(ref, 'seconds', '.2f')} | "
                        f"{_cell_text(ours, 'seconds', '.2f')} | {_cell_text(tesla, 'seconds', '.2f')} | "
                        f"{_ratio(ref, ours, 'seconds')} | {_ratio(ref, tesla, 'seconds')} | "
                        f"{_cell_text(ref, 'memory_mb', ',.0f')} | {_cell_text(ours, 'memory_mb', ',.0f')} | "
                        f"{_cell_text(tesla, 'memory_mb', ',.0f')} | {_ratio(ref, ours, 'memory_mb')} | "
                        f"{_ratio(ref, tesla, 'memory_mb')} |")
    header = ["| data | ipc | N | reference s/it | ours s/it | TESLA s/it | speed-up ours | speed-up TESLA | "
              "reference MB | ours MB | TESLA MB | memory ref/ours | memory ref/TESLA |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    text = "\n".join(header + rows)
    if skipped:
        budget = ", ".join(f"{method} {limit}" for method, limit in CPU_BUDGET.items())
        text += (f"\n\nSkipped on CPU (more image-steps, images x N, per iteration than {budget}): "
                 + "; ".join(skipped) + ".")
    if cpu:
        shape, ipc, steps = HEADLINE
        channels, size = SHAPES[shape]
        plain = distill_cell("ours-no-reuse", channels, size, ipc, steps, args.repeats, args.device)
        text += (f"\n\nAttribution ({shape}, ipc {ipc}, N {steps}): ours without `reuse_freed_cpu_memory` "
                 f"(glibc returns every freed >32 MB block to the OS) takes "
                 f"{_cell_text(plain, 'seconds', '.2f')} s/it, {_cell_text(plain, 'memory_mb', ',.0f')} MB.")
    return text, cells


def load_vs_iteration(args: argparse.Namespace, storage: list[Cell], cells: Cells) -> str:
    iteration = cells.get(HEADLINE, {}).get("ours")
    if iteration is None:
        channels, size = SHAPES["FMNIST 1x28x28"]
        iteration = distill_cell("ours", channels, size, 10, 20, args.repeats, args.device)
    if "error" in iteration:
        return f"One iteration failed: {iteration['error']}"
    lines = [f"One distillation iteration (ours, FMNIST ipc 10, N 20): {iteration['seconds']:.2f} s."]
    lines += [f"Loading one expert ({row['format']}): {1e3 * row['load_seconds']:.1f} ms "
              f"= {100 * row['load_seconds'] / iteration['seconds']:.3f} % of an iteration." for row in storage]
    return "\n".join(f"- {line}" for line in lines)


MODULE_CELLS = [("FMNIST 1x28x28", 10, 20, 2)]  # data, ipc, N, M: AST's intermediate matching needs M >= 2


def modules_table(args: argparse.Namespace) -> str:
    """Part (e): the AST paper says its modules add little time; this measures it, same N and M, side by side."""
    rows = ["| data | ipc | N | M | plain MTT s/it | all AST modules s/it | time ratio | plain MB | AST MB | "
            "memory ratio |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for shape, ipc, steps, epochs in MODULE_CELLS:
        channels, size = SHAPES[shape]
        plain, modules = (distill_cell(method, channels, size, ipc, steps, args.repeats, args.device, epochs)
                          for method in ("ours", "ours-ast"))
        print(f"{shape} ipc {ipc} N {steps} M {epochs}: {plain} / {modules}", file=sys.stderr, flush=True)
        rows.append(f"| {shape} | {ipc} | {steps} | {epochs} | {_cell_text(plain, 'seconds', '.2f')} | "
                    f"{_cell_text(modules, 'seconds', '.2f')} | {_ratio(modules, plain, 'seconds')} | "
                    f"{_cell_text(plain, 'memory_mb', ',.0f')} | {_cell_text(modules, 'memory_mb', ',.0f')} | "
                    f"{_ratio(modules, plain, 'memory_mb')} |")
    return "\n".join(rows)


# convolution calls per student step and block (forward pass + backward pass), first block / the others
CONV_CALLS = {"forward": (2, 3), "weight_grad": (3, 3), "input_grad": (2, 3)}


def headline_pairs(args: argparse.Namespace, cell: tuple[str, int, int] = HEADLINE) -> str:
    """Reference and ours alternated in fresh processes: one ratio per pair, so machine drift hits both alike.
    FLOPs are counted for the headline cell only."""
    shape, ipc, steps = cell
    channels, size = SHAPES[shape]
    rows = ["| pair | reference s/it | ours s/it | speed-up | reference MB | ours MB |",
            "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    ratios, ours_seconds, flops = [], [], None
    for pair in range(1, args.pairs + 1):
        ref, ours = (distill_cell(method, channels, size, ipc, steps, args.repeats, args.device,
                                  count_flops=method == "ours" and pair == 1 and cell == HEADLINE)
                     for method in ("reference", "ours"))
        flops = ours.get("flops", flops)
        print(f"headline pair {pair}: {ref} / {ours}", file=sys.stderr, flush=True)
        if "error" not in ref and "error" not in ours:
            ratios.append(ref["seconds"] / ours["seconds"])
            ours_seconds.append(ours["seconds"])
        rows.append(f"| {pair} | {_cell_text(ref, 'seconds', '.2f')} | {_cell_text(ours, 'seconds', '.2f')} | "
                    f"{_ratio(ref, ours, 'seconds')} | {_cell_text(ref, 'memory_mb', ',.0f')} | "
                    f"{_cell_text(ours, 'memory_mb', ',.0f')} |")
    summary = (f"Median speed-up over {len(ratios)} pairs: {statistics.median(ratios):.2f}x "
               f"(range {min(ratios):.2f}x to {max(ratios):.2f}x)." if ratios else "No pair finished.")
    text = "\n".join(rows) + "\n\n" + summary
    return text + "\n\n" + flops_text(args, flops, ours_seconds) if cell == HEADLINE else text


def flops_text(args: argparse.Namespace, flops: int | None, seconds: list[float]) -> str:
    """FLOPs per iteration (counted by FlopCounterMode), the rate ours reaches, and its share of `--peak-tflops`."""
    if flops is None or not seconds:
        return "FLOPs per iteration: not counted (the counting run failed)."
    median = statistics.median(seconds)
    rate = flops / median / 1e12
    text = (f"Dense FLOPs per iteration of ours, counted (`bench_distill.py --count-flops`, convolutions and matrix "
            f"products): {flops / 1e12:.3f} TFLOP; at the median {median:.2f} s/it that is "
            f"{rate:.3f} TFLOP/s")
    if args.peak_tflops:
        text += f", {100 * rate / args.peak_tflops:.0f} % of the {args.peak_tflops} TFLOP/s dense peak given"
    return text + "."


def candidates(args: argparse.Namespace) -> str:
    """Part (f) after the pairs: convolution share, channels_last per convolution, torch.compile (CPU only)."""
    if args.device.startswith("cuda"):
        return "Not run on GPU (the candidates here are CPU ones; bf16 and CUDA graphs are not implemented)."
    shape, ipc, steps = HEADLINE
    common = ["--ipc", str(ipc), "--syn-steps", str(steps)]
    results = {}
    for part in ("conv-share", "layout", "compile", "kernels"):
        results[part] = json_result("bench_candidates.py", part, *common)
        if "error" in results[part]:
            return f"`bench_candidates.py {part}` gave no result: {results[part]['error']}"
        print(f"candidates {part}: {results[part]}", file=sys.stderr, flush=True)
    share, layouts, compiled, kernels = (results[part] for part in ("conv-share", "layout", "compile", "kernels"))
    rows = ["| block | call | NCHW ms | channels_last ms | channels_last / NCHW |",
            "| --- | --- | ---: | ---: | ---: |"]
    per_step = {"nchw": 0.0, "channels_last": 0.0}
    for position, block in enumerate(name for name in layouts if name.startswith("block")):
        for call, counts in CONV_CALLS.items():
            times = {fmt: layouts[block][f"{call}/{fmt}"] for fmt in per_step}
            for fmt in per_step:
                per_step[fmt] += counts[min(position, 1)] * times[fmt]
            rows.append(f"| {block} | {call} | {times['nchw']:.1f} | {times['channels_last']:.1f} | "
                        f"{times['channels_last'] / times['nchw']:.2f} |")
    left = share["seconds"] - share["conv_seconds"]
    return f"""Convolution share ({shape}, ipc {ipc}, N {steps}, `bench_candidates.py conv-share`): one iteration
of ours takes {share['seconds']:.2f} s, of which {share['conv_seconds']:.2f} s ({100 * share['conv_share']:.0f} %) is
inside the step's convolution calls. The reference makes the same calls (its first layer with oneDNN's kernel,
see the kernels below), so at most {left:.2f} s per iteration is left to any further speed-up of ours that keeps
the math.

channels_last (`bench_candidates.py layout`, batch {10 * ipc}, min of 3 interleaved calls):

{chr(10).join(rows)}

Per student step, weighted by how often the step makes each call: NCHW {per_step['nchw']:.0f} ms, channels_last
{per_step['channels_last']:.0f} ms ({per_step['channels_last'] / per_step['nchw']:.2f}x), before the layout conversions
and the slower strided reductions a channels_last step would add.

torch.compile of both passes (`bench_candidates.py compile`, inductor, median of 3 interleaved iterations):
eager {compiled['eager_seconds']:.2f} s/it, compiled {compiled['compiled_seconds']:.2f} s/it
({compiled['eager_seconds'] / compiled['compiled_seconds']:.2f}x); the first compiled iteration took
{compiled["first_compiled_seconds"]:.0f} s (compilation, or loading inductor's on-disk cache).

Kernels kept (`bench_candidates.py kernels`, min of 3 interleaved calls): the first convolution of a grey image
(forward) with oneDNN vs PyTorch's native kernel (`PixelConv2d`, `native_cpu_convolution`), and the 2x2 average
pool (forward + backward) with `F.avg_pool2d` vs `AvgPool2x2`, at the step's and the evaluation's shapes:

{kernel_table(kernels)}"""


def kernel_table(kernels: Cell) -> str:
    """Markdown rows of `bench_candidates.py kernels`: shape -> library ms, project ms, ratio."""
    rows = ["| where | call | library kernel ms | kept kernel ms | speed-up |", "| --- | --- | ---: | ---: | ---: |"]
    for where, calls in kernels.items():
        if not isinstance(calls, dict):
            continue
        for call, (library, kept) in calls.items():
            rows.append(f"| {where} | {call} | {library:.2f} | {kept:.2f} | {library / kept:.2f}x |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small grid, 1 timed repeat (CPU: ~30 min)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=None, help="timed iterations per cell (default 1 quick, 2)")
    parser.add_argument("--pairs", type=int, default=3, help="alternating reference/ours pairs for the headline")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's dense peak in TFLOP/s at the precision used, for the share of peak")
    parser.add_argument("--out", default=str(HERE.parent / "BENCHMARKS.md"))
    args = parser.parse_args()
    args.repeats = args.repeats or (1 if args.quick else 2)
    started = datetime.datetime.now(datetime.UTC)
    load_start = os.getloadavg()[0]
    distill, cells = distill_table(args)
    experts = run_script("bench_experts.py", "--dataset", "digits", "--device", args.device)
    storage = storage_rows()
    evaluate = run_script("bench_evaluate.py", "--ipc", "1", "10", "50", "--device", args.device)
    loading = load_vs_iteration(args, storage, cells)
    modules = modules_table(args)
    pairs = headline_pairs(args)
    small_pairs = headline_pairs(args, SMALL_STEP)
    tried = candidates(args)
    worlds = ["1", "2"] if args.device == "cpu" or torch.cuda.device_count() > 1 else ["1"]  # NCCL: a GPU per rank
    ranks = run_script("bench_ranks.py", "--ranks", *worlds, "--ipcs", "10", "50", "--repeats", str(args.repeats),
                       "--device", args.device)
    command = shlex.join([os.path.relpath(sys.executable, HERE.parent), "benchmarks/run_all.py", *sys.argv[1:]])
    text = f"""# Benchmarks

Generated by `{command}` on {started:%Y-%m-%d %H:%M} UTC.
Machine: {describe_machine(args.device)}; device `{args.device}`
(OMP_NUM_THREADS={os.environ.get("OMP_NUM_THREADS", "unset")}); 1-minute load average {load_start:.1f} at the start,
{os.getloadavg()[0]:.1f} at the end (other processes share a CPU machine: compare cells of one run only).

## (a) One distillation iteration (sampling, DSA, N student steps, gradients, update)

ConvNet-3 width 128, 10 classes of random images, all images in every student step, DSA on, median of
{args.repeats} timed iteration(s) after one warm-up, one fresh process per cell. *reference*: the MTT-style unroll
(`benchmarks/reference_step.py`: ReparamModule, `create_graph=True` per step); *ours*: `Distiller` with
`gradient="unroll"` (same math: hand-written ConvNet step, `ast_core/functional.py`); *TESLA*: `gradient="tesla"`
(constant memory in N, approximate for N > 1). Memory: peak above the process's resident set before the first
iteration (CPU) or `torch.cuda.max_memory_allocated` (GPU).

{distill}

Reading the table: ours and the reference do the same convolutions (9 per block and step: forward, the
step's backward, and the tangent forward and backward of the outer gradient), so the convolution time is
a floor for both; ours saves the rest (elementwise passes over the large maps, autograd bookkeeping, stored
intermediates) and, on CPU, the page faults of glibc handing every >32 MB tensor back to the OS. TESLA adds
one forward-backward per step and keeps one step's tensors alive instead of N. On a shared CPU, run with
`OMP_NUM_THREADS=1` unless the cores are idle: oversubscribed OpenMP threads distort the ratios.

## (b) Expert training throughput (`benchmarks/bench_experts.py --dataset digits`)

{experts}

## (c) Trajectory storage, ConvNet-3 FMNIST (317,706 parameters), one expert

{storage_markdown(storage)}

## (d) Evaluation throughput (`benchmarks/bench_evaluate.py`) and expert loading

{evaluate}

{loading}

## (e) Plain MTT vs every AST module (`benchmarks/bench_distill.py --method ours|ours-ast --expert-epochs 2`)

Both with `Distiller` (`gradient="unroll"`), same N and M. *All AST modules*: balanced inner loss (Eq. 20),
intermediate matching (Eq. 22, M - 1 extra parameter distances), filter-normalised perturbation of the start
(Eq. 23, ρ 0.1); representative initialisation happens once, before the first iteration, so it is not here.
Ratios are AST / plain (1.00x = no overhead).

{modules}

## (f) Headline ratio and the speed-up candidates

Reference vs ours, {HEADLINE[0]}, ipc {HEADLINE[1]}, N {HEADLINE[2]}, alternated in fresh processes (median of
{args.repeats} timed iteration(s) each): the ratio of a pair is measured under the same machine state.

{pairs}

The same at ipc {SMALL_STEP[1]} ({SMALL_STEP[0]}, N {SMALL_STEP[2]}), where each call does little work:

{small_pairs}

{tried}

## (g) One distillation on R processes (`benchmarks/bench_ranks.py`, `distill.devices`)

R ranks each take a slice of every student step's batch (`ast_core.sharded`, docs/method.md section 12): gloo
on the CPU, where the ranks split the same cores (each gets cores / R threads), NCCL on GPUs, one per rank.
Seconds: the slowest rank's median; memory: the largest rank's peak.

{ranks}
"""
    atomic_write_text(args.out, text)
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
