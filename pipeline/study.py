"""`ast-dd study buffers`: AST Table VII (which experts to match) at a size a 2-core machine runs.

For every variant in `buffer.train` of the profile: train `buffer.num_experts` experts (resumable, one file
each), then distil the same way from each buffer (the `study.method` row of `distill.configs`, its buffer
swapped for the variant) for every seed in `study.seeds`, and score the set kept on validation on the test
split. Every finished cell is a JSON file under ``artifacts/study/buffers/cells/``, so a killed study resumes
where it stopped and a finished one only rebuilds its tables. The same seeds also score the random real
subset the distillations start from, so each row can be read against it.

Outputs: ``artifacts/report/tables/buffers_study.{csv,md}`` (``variant,avg_var,expert_test_acc,
distilled_test_acc`` as ``mean ± std`` plus the input-gradient norms and the selected iterations) and
``artifacts/report/figures/buffers_study_{grad_norm,step_sq_norm}.png`` (every variant per epoch).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import statistics
from pathlib import Path
from typing import Any

import pandas as pd

from ast_core.evaluate import evaluate_synthetic
from ast_core.experts import train_experts
from ast_core.init import initial_synthetic_set
from ast_core.io import atomic_write_json
from ast_core.trajectory import list_buffer, load_buffer, read_metadata
from ast_core.viz import plot_curves
from pipeline.layout import ARTIFACTS, CHECKPOINTS, REPORT
from pipeline.params import Params
from pipeline.prepared import class_balanced_subset, load_prepared, resolve_device
from pipeline.schema import ParamsError
from pipeline.stages.buffer import DTYPES, expert_config
from pipeline.stages.distill import distill_set
from pipeline.stages.report import write_table

log = logging.getLogger(__name__)
STUDY = ARTIFACTS / "study" / "buffers"
START_ROW = "random real subset (the distillations' start)"


def _cell(name: str) -> Path:
    return STUDY / "cells" / f"{name}.json"


def _test_accuracy(params: Params, images: Any, labels: Any, lr: float, data: Any, device: Any) -> dict[str, Any]:
    result = evaluate_synthetic(images, labels, lr, data, arch=params.model.arch,
                                num_models=params.evaluate.num_models, iterations=params.evaluate.iterations,
                                seed=params.seed, protocol=params.evaluate.protocol,
                                batch_size=params.evaluate.batch_size, device=str(device),
                                width=params.model.width, eval_split="test")
    return {"test_mean": result.mean, "test_std": result.std, "test_per_network": result.accuracies}


def check(params: Params) -> None:
    """Everything the study needs from the settings, before any compute."""
    study = params.study
    if study.method is None:
        raise ParamsError(f"study.method: name the distill.configs row to run on every buffer "
                          f"(defined: {', '.join(params.distill.configs)})")
    if params.distill.configs[study.method].mct_anchors is not None:
        raise ParamsError(f"study.method: {study.method!r} uses convexified experts; the buffer study matches "
                          "the stored trajectories (mct_anchors: null)")
    if params.distill.configs[study.method].init == "representative":
        raise ParamsError(f"study.method: {study.method!r} starts from the representative init, which depends on "
                          "one buffer's expert; use init real or noise so every buffer starts from the same set")
    for ipc in params.distill.ipcs:
        params.distill_config(study.method, ipc)


def run(params: Params) -> pd.DataFrame:
    """Train, distil and score every (variant, seed) cell not yet done; write the tables and figures."""
    check(params)
    device = resolve_device(params.device)
    prepared = load_prepared(params)
    data = prepared.data
    experts = class_balanced_subset(data, params.buffer.train_size, params.seed)
    chosen = params.distill.configs[params.study.method]
    (ipc,) = params.distill.ipcs[:1]
    for variant in params.buffer.train:  # every buffer first: the Avg_Var columns land before any distillation
        log.info("study buffers: experts of %s", variant)
        train_experts(experts, expert_config(params, variant), STUDY / "buffer" / variant, params.buffer.num_experts,
                      seed=params.seed, workers=params.buffer.workers, device=device,
                      dtype=DTYPES[params.buffer.storage_dtype], progress=True)
        write_report(params)
    for seed in params.study.seeds:
        cell = _cell(f"start-ipc{ipc}-s{seed}")
        if not cell.is_file():
            init = initial_synthetic_set(chosen.init, data.train_x, data.train_y, data.info.num_classes, ipc, seed=seed)
            lr = params.distill_config(params.study.method, ipc).lr_teacher
            scored = _test_accuracy(params, init.images, init.labels, lr, data, device)
            atomic_write_json(cell, {"seed": seed, **scored})
    for variant in params.buffer.train:
        folder = STUDY / "buffer" / variant
        trajectories = [t.to(device) for t in load_buffer(folder, None, params.buffer.num_experts)]
        for seed in params.study.seeds:
            cell = _cell(f"{variant}-ipc{ipc}-s{seed}")
            if cell.is_file():
                continue
            log.info("study buffers: distilling from %s, seed %d", variant, seed)
            config = dataclasses.replace(params.distill_config(params.study.method, ipc), seed=seed)
            init = initial_synthetic_set(chosen.init, data.train_x, data.train_y, data.info.num_classes, ipc, seed=seed)
            result = distill_set(params, config, trajectories, init, data, device,
                                 CHECKPOINTS / "study" / "buffers" / cell.stem, folder)
            scored = _test_accuracy(params, result.best["images"], result.labels, float(result.best["syn_lr"]),
                                    data, device)
            atomic_write_json(cell, {"variant": variant, "seed": seed, "selected_iteration": result.best["iteration"],
                                     "validation": result.validation, "syn_lr": float(result.best["syn_lr"]),
                                     **scored})
            write_report(params)
            (CHECKPOINTS / "study" / "buffers" / cell.stem / "distill_checkpoint.pt").unlink(missing_ok=True)
    return write_report(params)


def _mean_std(values: list[float], digits: int = 2) -> str:
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.pstdev(values):.{digits}f}"


def write_report(params: Params) -> pd.DataFrame:
    """buffers_study.csv/.md and the per-epoch figures, from the experts' metadata and the finished cells."""
    rows, grad_curves, step_curves = [], {}, {}
    ipc = params.distill.ipcs[0]
    for variant in params.buffer.train:
        paths = list_buffer(STUDY / "buffer" / variant)[: params.buffer.num_experts]
        histories = [read_metadata(p)["history"] for p in paths]
        cells = [json.loads(_cell(f"{variant}-ipc{ipc}-s{s}").read_text()) for s in params.study.seeds
                 if _cell(f"{variant}-ipc{ipc}-s{s}").is_file()]
        if not histories:
            continue
        seed_means = [c["test_mean"] for c in cells]
        rows.append({
            "variant": variant,
            "avg_var": _mean_std([statistics.fmean(h["step_sq_norm"]) for h in histories], 4),
            "expert_test_acc": _mean_std([h["test_acc"][-1] for h in histories]),
            "distilled_test_acc": _mean_std(seed_means) if seed_means else "",
            "grad_norm_init": _mean_std([h["grad_norm_init"]["grad_norm_mean"] for h in histories], 4),
            "grad_norm_final": _mean_std([h["grad_norm_mean"][-1] for h in histories], 4),
            "grad_norm_q10_q90_final": "{:.3g} / {:.3g}".format(
                statistics.fmean(h["grad_norm_q10"][-1] for h in histories),
                statistics.fmean(h["grad_norm_q90"][-1] for h in histories)),
            "experts": len(histories), "seeds": len(cells),
            "selected_iterations": "/".join(str(c["selected_iteration"]) for c in cells),
        })
        epochs = list(range(len(histories[0]["step_sq_norm"]) + 1))
        grad_curves[variant] = (epochs, [statistics.fmean(h["grad_norm_init"]["grad_norm_mean"] for h in histories),
                                         *(statistics.fmean(v) for v in zip(*(h["grad_norm_mean"] for h in histories),
                                                                              strict=True))])
        step_curves[variant] = (epochs[:-1], [statistics.fmean(v) for v in zip(*(h["step_sq_norm"] for h in histories),
                                                                                strict=True)])
    starts = [json.loads(_cell(f"start-ipc{ipc}-s{s}").read_text())["test_mean"] for s in params.study.seeds
              if _cell(f"start-ipc{ipc}-s{s}").is_file()]
    if starts:
        rows.append({"variant": START_ROW, "distilled_test_acc": _mean_std(starts), "seeds": len(starts)})
    frame = pd.DataFrame(rows)
    b = params.buffer
    note = (f"Fashion-MNIST, ConvNet width {params.model.width}; {b.num_experts} experts x {b.epochs} epochs on "
            f"{b.train_size or 'all'} training images per variant. avg_var and expert_test_acc: mean ± std over "
            f"experts. distilled_test_acc: row `{params.study.method}` of distill.configs on each buffer, ipc "
            f"{params.distill.ipcs[0]}, {params.distill.hyper.iterations} iterations, set kept on validation; mean ± "
            f"std over {len(params.study.seeds)} distillation seeds of the mean over {params.evaluate.num_models} "
            f"test networks ({params.evaluate.iterations} iterations each).")
    write_table(frame, "buffers_study", "AST Table VII at CPU size", note)
    figures = REPORT / "figures"
    if grad_curves:
        plot_curves(grad_curves, figures / "buffers_study_grad_norm.png", "epoch",
                    "input-gradient norm (mean over experts)", logy=True,
                    title="what the penalty constrains, per buffer variant")
        plot_curves(step_curves, figures / "buffers_study_step_sq_norm.png", "epoch t", "|θ_t − θ_t+1|²",
                    logy=True, title="parameter change per epoch (Avg_Var is its mean)")
    return frame
