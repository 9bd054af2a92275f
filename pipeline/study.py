"""`ast-dd study buffers|modules|sweep`: ablation tables and the hyperparameter sweep at a size 2 cores run, resumable.

Both kinds train the experts of every variant in `buffer.train` (one file each, kept across runs in
``artifacts/study/experts/<variant>``), then distil cells (row, ipc, distillation seed) and score the set kept on
validation on the test split. Every finished cell is a JSON file under ``artifacts/study/<kind>/cells/``, so a
killed study resumes where it stopped and a finished one only rebuilds its tables.

- ``buffers`` (AST Table VII): the `study.method` row of `distill.configs`, its buffer swapped for each variant
  in turn, from the same random real start. Table ``buffers_study.{csv,md}`` (Avg_Var, expert accuracy, input-
  gradient norms, distilled accuracy) and figures ``buffers_study_{grad_norm,step_sq_norm}.png``.
- ``modules`` (AST Table VIII and MCT's convergence claim): every row of `study.rows`, each on its own buffer
  (MCT rows on convexified copies). Tables ``modules_study.{csv,md}`` and ``convergence_study.{csv,md}``
  (validation accuracy per iteration, mean ± std over seeds) and one figure per ipc,
  ``modules_study_convergence_ipc<ipc>.png``.

- ``sweep`` (how the default settings are chosen): the `study.method` row at every point of `study.grid` (a
  cartesian product over distill.hyper keys), scored on the validation split only, never on test. Table
  ``sweep_study.{csv,md}`` (validation at the start, the best iteration and the last) and figure
  ``sweep_study.png`` (validation accuracy against iteration, one line per point).

The random real subsets the buffers and modules studies start from are scored with the same seeds, so each row
reads against its start.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import statistics
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from ast_core.checkpoint import DistillCheckpoint
from ast_core.data import DatasetSplits
from ast_core.distill import DistillConfig, DistillResult
from ast_core.evaluate import evaluate_synthetic
from ast_core.expert_reports import epoch_curve, grad_norm_curve, summarize_buffer
from ast_core.experts import train_experts
from ast_core.init import SyntheticInit, initial_synthetic_set
from ast_core.io import atomic_write_json
from ast_core.models import batched_features
from ast_core.trajectory import convex_tag, convexify_buffer, list_buffer, load_buffer, read_metadata, storage_dtype
from ast_core.viz import plot_curves
from pipeline.layout import ARTIFACTS, CHECKPOINTS, REPORT
from pipeline.modelling import eval_spec, final_expert
from pipeline.params import Hyper, MethodParams, Params
from pipeline.prepared import class_balanced_subset, load_prepared, resolve_device
from pipeline.schema import ParamsError
from pipeline.stages.buffer import expert_config, expert_scheduler
from pipeline.stages.distill import distill_set
from pipeline.stages.report import write_table

log = logging.getLogger(__name__)
KINDS = ("buffers", "modules", "sweep")
STUDY = ARTIFACTS / "study"
EXPERTS = STUDY / "experts"
FIGURES = REPORT / "figures"


def _cell(kind: str, name: str) -> Path:
    return STUDY / kind / "cells" / f"{name}.json"


def _checkpoints(kind: str, name: str) -> Path:
    return CHECKPOINTS / "study" / kind / name


def _read(kind: str, name: str) -> dict[str, Any] | None:
    path = _cell(kind, name)
    return json.loads(path.read_text()) if path.is_file() else None


def _settings(config: DistillConfig) -> dict[str, Any]:
    """The settings a cell is distilled with, as its file stores them (JSON types)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def _done(kind: str, name: str, config: DistillConfig) -> bool:
    """Whether the cell is finished with exactly these settings. A cell distilled with other settings (or
    written before cells stored them) is redone, so one table never mixes protocols."""
    cell = _read(kind, name)
    if cell is None:
        return False
    if cell.get("config") != _settings(config):
        log.warning("study %s: %s was distilled with other settings (or does not say which); redoing it", kind, name)
        return False
    return True


def _mean_std(values: list[float], digits: int = 2) -> str:
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.pstdev(values):.{digits}f}"


def rows_of(params: Params, kind: str) -> dict[str, MethodParams]:
    """The distillation of every row: buffers -> one per variant (study.method on it); modules -> study.rows."""
    configs = params.distill.configs
    if kind == "buffers":
        return {v: dataclasses.replace(configs[params.study.method], buffer=v) for v in params.buffer.train}
    if kind == "sweep":
        return {params.study.method: configs[params.study.method]}
    return {row: configs[row] for row in params.study.rows}


def check(params: Params, kind: str) -> None:
    """Everything the study needs from the settings, before any compute (the key and the allowed values)."""
    if kind not in KINDS:
        raise ParamsError(f"study kind {kind!r} is unknown; allowed: {', '.join(KINDS)}")
    study, defined = params.study, ", ".join(params.distill.configs)
    if kind in ("buffers", "sweep") and study.method is None:
        raise ParamsError(f"study.method: name the distill.configs row the {kind} study distils ({defined})")
    if kind == "buffers":
        if params.distill.configs[study.method].init == "representative":
            raise ParamsError(f"study.method: {study.method!r} starts from the representative init, which depends "
                              "on one buffer's expert; use init real or noise so every buffer has the same start")
    elif kind == "modules" and not study.rows:
        raise ParamsError(f"study.rows: list the distill.configs rows to compare ({defined})")
    elif kind == "sweep":
        if not study.grid:
            raise ParamsError("study.grid: map distill.hyper keys (or num_experts) to the values to try, e.g. "
                              "{lr_img: [30, 100]}")
        for point in study.grid_points():
            for ipc in params.distill.ipcs:
                params.distill_config(study.method, ipc, study.split_point(point)[0], seed=study.seeds[0])
    for name, row in rows_of(params, kind).items():  # every configs row x ipc is validated when params load
        params.check_runnable(name, row)


def train_buffers(params: Params, data: DatasetSplits) -> None:
    """Every variant's experts (resumable) with their reports, and the convexified copies the MCT rows need."""
    experts = class_balanced_subset(data, params.buffer.train_size, params.seed)
    for variant in params.buffer.train:
        log.info("study: experts of %s", variant)
        train_experts(experts, expert_config(params, variant), EXPERTS / variant, params.buffer.num_experts,
                      seed=params.seed, dtype=storage_dtype(params.buffer.storage_dtype),
                      scheduler=expert_scheduler(params))
        summarize_buffer(EXPERTS / variant, params.buffer.num_experts)
        for anchors in params.buffer.mct_anchors:
            convexify_buffer(EXPERTS / variant, anchors, params.buffer.mct_beta, limit=params.buffer.num_experts,
                             dtype=storage_dtype(params.buffer.storage_dtype), out_dir=EXPERTS / variant / "convex")


def representative_features(params: Params, data: DatasetSplits, device: torch.device) -> torch.Tensor:
    """Features (before the classifier) of `init.buffer`'s expert `init.expert_index` for every training image."""
    model = final_expert(params, data.info, params.init.buffer, params.init.expert_index, device,
                         folder=EXPERTS / params.init.buffer)
    return batched_features(lambda x: model.embed(x.to(device)).cpu(), data.train_x)


def test_accuracy(params: Params, images: torch.Tensor, labels: torch.Tensor, lr: float, data: DatasetSplits,
                  device: torch.device) -> dict[str, Any]:
    result = evaluate_synthetic(images, labels, lr, data, eval_spec(params, "test"), seed=params.test_seeds[0],
                                device=str(device))
    return {"test_mean": result.mean, "test_std": result.std, "test_per_network": result.accuracies}


def run(params: Params, kind: str) -> pd.DataFrame:
    """Train, distil and score every cell not yet done; write the kind's tables and figures."""
    check(params, kind)
    device = resolve_device(params.device)
    data = load_prepared(params).data
    train_buffers(params, data)
    rows = rows_of(params, kind)
    features = None
    if any(row.init == "representative" for row in rows.values()):
        features = representative_features(params, data, device)
    if kind == "sweep":
        return run_sweep(params, rows[params.study.method], features, data, device)
    for ipc in params.distill.ipcs:
        for seed in params.study.seeds:
            name = f"start-ipc{ipc}-s{seed}"
            if _read(kind, name) is None:
                start = initial_synthetic_set("real", data.train_x, data.train_y, data.info.num_classes, ipc, seed=seed)
                scored = test_accuracy(params, start.images, start.labels, params.distill.hyper_for(ipc).lr_teacher,
                                       data, device)
                atomic_write_json(_cell(kind, name), {"seed": seed, "ipc": ipc, **scored})
        for row_name, row in rows.items():
            method = params.study.method if kind == "buffers" else row_name
            for seed in params.study.seeds:
                name = f"{row_name}-ipc{ipc}-s{seed}"
                config = params.distill_config(method, ipc, seed=seed)
                if not _done(kind, name, config):
                    init = initial_synthetic_set(row.init, data.train_x, data.train_y, data.info.num_classes, ipc,
                                                 seed=seed, features=features)
                    _finish(kind, name, distil_cell(params, kind, name, row, config, init, data, device))
                    write_report(params, kind)
    return write_report(params, kind)


def distil(params: Params, kind: str, name: str, row: MethodParams, config: DistillConfig, init: SyntheticInit,
           data: DatasetSplits, device: torch.device, num_experts: int | None = None) -> DistillResult:
    """One distillation, resumable through its checkpoint (removed once the cell is written); `num_experts`
    replaces distill.num_experts (a sweep point)."""
    log.info("study %s: distilling %s", kind, name)
    folder = EXPERTS / row.buffer
    tag = None
    if row.mct_anchors is not None:
        folder, tag = folder / "convex", convex_tag(row.mct_anchors, params.buffer.mct_beta)
    trajectories = [t.to(device) for t in load_buffer(folder, tag, num_experts or params.distill.num_experts)]
    return distill_set(params, config, trajectories, init, data, device, _checkpoints(kind, name), folder)


def _selection(result: DistillResult) -> dict[str, Any]:
    return {"selected_iteration": result.best.iteration, "distilled": result.best.distilled,
            "validation": result.validation, "syn_lr": result.best.syn_lr}


def _finish(kind: str, name: str, cell: dict[str, Any]) -> None:
    """Write the cell, then drop its resume checkpoint (a rerun must not resume a finished cell)."""
    atomic_write_json(_cell(kind, name), cell)
    DistillCheckpoint(_checkpoints(kind, name)).remove()


def distil_cell(params: Params, kind: str, name: str, row: MethodParams, config: DistillConfig,
                init: SyntheticInit, data: DatasetSplits, device: torch.device) -> dict[str, Any]:
    """One distillation and the test accuracy of the set kept on validation."""
    result = distil(params, kind, name, row, config, init, data, device)
    scored = test_accuracy(params, result.best.images, result.labels, result.best.syn_lr, data, device)
    return {"row": name.rsplit("-ipc", 1)[0], "ipc": config.ipc, "seed": config.seed, "config": _settings(config),
            **_selection(result), **scored}


def point_label(point: dict[str, float]) -> str:
    """A grid point as a file-name-safe label: lr_img=30, syn_steps=20 -> lr_img30_syn_steps20."""
    return "_".join(f"{key}{value:g}" for key, value in point.items())


def run_sweep(params: Params, row: MethodParams, features: torch.Tensor | None, data: DatasetSplits,
              device: torch.device) -> pd.DataFrame:
    """Distil the study.method row at every grid point, ipc and seed; validation only (selection, not test)."""
    method = params.study.method
    for ipc in params.distill.ipcs:
        for point in params.study.grid_points():
            for seed in params.study.seeds:
                name = f"{method}-{point_label(point)}-ipc{ipc}-s{seed}"
                hyper, num_experts = params.study.split_point(point)
                config = params.distill_config(method, ipc, hyper, seed=seed)
                if not _done("sweep", name, config):
                    init = initial_synthetic_set(row.init, data.train_x, data.train_y, data.info.num_classes, ipc,
                                                 seed=seed, features=features)
                    result = distil(params, "sweep", name, row, config, init, data, device, num_experts)
                    _finish("sweep", name, {"point": point, "ipc": ipc, "seed": seed, "row": method,
                                            "config": _settings(config), **_selection(result)})
                    sweep_report(params)
    return sweep_report(params)


def write_report(params: Params, kind: str) -> pd.DataFrame:
    return {"buffers": buffers_report, "modules": modules_report, "sweep": sweep_report}[kind](params)


def _cells(kind: str, row: str, ipc: int, seeds: list[int]) -> list[dict[str, Any]]:
    return [c for s in seeds if (c := _read(kind, f"{row}-ipc{ipc}-s{s}")) is not None]


def _start_row(kind: str, ipc: int, seeds: list[int], label: dict[str, Any]) -> dict[str, Any] | None:
    """The random real subsets the distillations start from, scored with the same seeds."""
    starts = [c["test_mean"] for c in _cells(kind, "start", ipc, seeds)]
    if not starts:
        return None
    return {**label, "distilled_test_acc" if kind == "buffers" else "test_acc": _mean_std(starts),
            "seeds": len(starts), "per_seed": " / ".join(f"{v:.2f}" for v in starts)}


def _segments(h: Hyper) -> str:
    return (f"{h.iterations} iterations (N {h.syn_steps}, M {h.expert_epochs}, T+ {h.max_start_epoch:g}, lr_img "
            f"{h.lr_img:g} unless a row sets its own, initial alpha {h.lr_teacher:g})")


def _protocol(params: Params, kind: str) -> str:
    b, d = params.buffer, params.distill
    per_ipc = "; ".join(f"ipc {ipc}: {_segments(d.hyper_for(ipc))}" for ipc in d.ipcs)
    return (f"Fashion-MNIST, ConvNet width {params.model.width}; {b.num_experts} experts x {b.epochs} epochs on "
            f"{b.train_size or 'all'} training images per buffer variant. Distillation: {per_ipc}; set "
            f"kept on validation ({d.eval_models} network x {d.eval_iterations} iterations "
            f"every {d.eval_every}); test accuracy: mean over {params.evaluate.num_models} networks x "
            f"{params.evaluate.iterations} iterations per seed, mean ± std over {len(params.study.seeds)} "
            f"distillation seeds ({kind} study).")


def buffers_report(params: Params) -> pd.DataFrame:
    """buffers_study.csv/.md and the per-epoch figures, from the experts' metadata and the finished cells."""
    rows, grad_curves, step_curves = [], {}, {}
    ipc, seeds = params.distill.ipcs[0], params.study.seeds
    for variant in params.buffer.train:
        folder = EXPERTS / variant
        paths = list_buffer(folder)[: params.buffer.num_experts] if folder.is_dir() else []
        histories = [read_metadata(p)["history"] for p in paths]
        if not histories:
            continue
        cells = _cells("buffers", variant, ipc, seeds)
        rows.append({
            "variant": variant,
            "avg_var": _mean_std([statistics.fmean(h["step_sq_norm"]) for h in histories], 4),
            "expert_test_acc": _mean_std([h["test_acc"][-1] for h in histories]),
            "distilled_test_acc": _mean_std([c["test_mean"] for c in cells]) if cells else "",
            "grad_norm_init": _mean_std([h["grad_norm_init"]["grad_norm_mean"] for h in histories], 4),
            "grad_norm_final": _mean_std([h["grad_norm_mean"][-1] for h in histories], 4),
            "grad_norm_q10_q90_final": "{:.3g} / {:.3g}".format(
                statistics.fmean(h["grad_norm_q10"][-1] for h in histories),
                statistics.fmean(h["grad_norm_q90"][-1] for h in histories)),
            "gp_norm": read_metadata(paths[0])["config"]["gp_norm"],
            "experts": len(histories), "seeds": len(cells),
            "per_seed": " / ".join(f"{c['test_mean']:.2f}" for c in cells),
            "selected_iterations": "/".join(str(c["selected_iteration"]) for c in cells),
        })
        epochs = list(range(len(histories[0]["step_sq_norm"]) + 1))
        grad_curves[variant] = (epochs, grad_norm_curve(histories, "grad_norm_mean"))
        step_curves[variant] = (epochs[:-1], epoch_curve(histories, "step_sq_norm")[0])
    start = _start_row("buffers", ipc, seeds, {"variant": "random real subset (the distillations' start)"})
    frame = pd.DataFrame(rows + ([start] if start else []))
    note = (_protocol(params, "buffers") + f" Row `{params.study.method}` of distill.configs distilled from each "
            "buffer. avg_var, expert_test_acc and the input-gradient norms (per sample or per pixel, as gp_norm): "
            "mean ± std over experts.")
    write_table(frame, "buffers_study", "AST Table VII at CPU size", note)
    if grad_curves:
        plot_curves(grad_curves, FIGURES / "buffers_study_grad_norm.png", "epoch",
                    "input-gradient norm (mean over experts)", logy=True,
                    title="what the penalty constrains, per buffer variant")
        plot_curves(step_curves, FIGURES / "buffers_study_step_sq_norm.png", "epoch t", "|θ_t − θ_t+1|²",
                    logy=True, title="parameter change per epoch (Avg_Var is its mean)")
    return frame


def modules_report(params: Params) -> pd.DataFrame:
    """modules_study.csv/.md, convergence_study.csv/.md and the convergence figure, from the finished cells."""
    rows: list[dict[str, Any]] = []
    curves: list[dict[str, Any]] = []
    series: dict[int, dict[str, tuple[list[int], list[float]]]] = {}
    bands: dict[int, dict[str, list[float]]] = {}
    seeds = params.study.seeds
    for ipc in params.distill.ipcs:
        for row in params.study.rows:
            cells = _cells("modules", row, ipc, seeds)
            if not cells:
                continue
            means = [c["test_mean"] for c in cells]
            rows.append({"row": row, "ipc": ipc, "seeds": len(cells), "test_acc": _mean_std(means),
                         "per_seed": " / ".join(f"{v:.2f}" for v in means),
                         "selected_iterations": "/".join(str(c["selected_iteration"]) for c in cells),
                         "lr_img": params.distill_config(row, ipc, seed=seeds[0]).lr_img})
            by_iteration: dict[int, list[float]] = {}
            for cell in cells:
                for point in cell["validation"]:
                    by_iteration.setdefault(point["iteration"], []).append(point["val_acc"])
            points = sorted((i, v) for i, v in by_iteration.items() if len(v) == len(cells))
            for iteration, values in points:
                curves.append({"row": row, "ipc": ipc, "iteration": iteration, "seeds": len(values),
                               "val_acc": _mean_std(values), "mean": statistics.fmean(values),
                               "std": statistics.pstdev(values)})
            series.setdefault(ipc, {})[row] = ([i for i, _ in points], [statistics.fmean(v) for _, v in points])
            bands.setdefault(ipc, {})[row] = [statistics.pstdev(v) for _, v in points]
        start = _start_row("modules", ipc, seeds, {"row": "random real subset (start of real-init rows)", "ipc": ipc})
        if start:
            rows.append(start)
    frame = pd.DataFrame(rows)
    write_table(frame, "modules_study", "AST Table VIII and MCT at CPU size", _protocol(params, "modules"))
    write_table(pd.DataFrame(curves), "convergence_study", "Validation accuracy per distillation iteration",
                _protocol(params, "modules") + " Iteration 0 is the starting set.")
    for ipc, by_row in series.items():
        plot_curves(by_row, FIGURES / f"modules_study_convergence_ipc{ipc}.png", "distillation iteration",
                    "validation accuracy (%)", bands=bands[ipc],
                    title=f"convergence at ipc {ipc}, mean ± std over {len(seeds)} seeds")
    return frame


def sweep_report(params: Params) -> pd.DataFrame:
    """sweep_study.csv/.md and sweep_study.png from every finished sweep cell on disk (several sweep commands,
    e.g. one per ipc with its own grid, add up to one table; delete the cells folder after changing anything
    outside the grid)."""
    groups: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    for path in sorted((STUDY / "sweep" / "cells").glob("*.json")):
        cell = json.loads(path.read_text())
        groups.setdefault((cell["row"], cell["ipc"], point_label(cell["point"])), []).append(cell)
    ordered = sorted(groups.items(), key=lambda g: (g[0][:2], sorted(g[1][0]["point"].items())))
    keys = list(dict.fromkeys(key for _, cells in ordered for key in cells[0]["point"]))
    rows, series = [], {}
    for (row, ipc, label), cells in ordered:
        point, settings = cells[0]["point"], cells[0].get("config", {})
        curves = [{p["iteration"]: p["val_acc"] for p in c["validation"]} for c in cells]
        best = [max(curve.values()) for curve in curves]
        # a grid key outside this cell's point shows the value the cell was distilled with (its `config`), so
        # points from sweeps run under other defaults stay comparable; blank only where the cell did not record it
        shown = {key: point.get(key, settings.get(key)) for key in keys}
        rows.append({"row": row, "ipc": ipc, **shown, "seeds": len(cells),
                     "val_start": _mean_std([curve[0] for curve in curves]), "val_best": _mean_std(best),
                     "gain": round(statistics.fmean(b - curve[0] for b, curve in zip(best, curves, strict=True)), 2),
                     "val_last": _mean_std([curve[max(curve)] for curve in curves]),
                     "selected_iterations": "/".join(str(c["selected_iteration"]) for c in cells)})
        iterations = sorted(set.intersection(*(set(curve) for curve in curves)))
        series[f"{row}, ipc {ipc}: {label}"] = (iterations, [statistics.fmean(curve[i] for curve in curves)
                                                      for i in iterations])
    frame = pd.DataFrame(rows)
    first = ["row", "ipc", *keys]
    frame = frame[first + [c for c in frame.columns if c not in first]] if rows else frame
    note = ("A distill.configs row at each grid point (a key outside a point's grid shows the value its cells were "
            "distilled with; blank: not recorded, e.g. num_experts, the profile's buffer.num_experts), validation "
            "accuracy "
            f"({params.distill.eval_models} networks x {params.distill.eval_iterations} iterations every "
            f"{params.distill.eval_every}): start, best, gain (best - start) and last, mean ± std over the seeds "
            "run. The test split is not used.")
    write_table(frame, "sweep_study", "Hyperparameter sweep on the validation split", note)
    if series:
        plot_curves(series, FIGURES / "sweep_study.png", "distillation iteration", "validation accuracy (%)",
                    title="sweep: validation accuracy per grid point")
    return frame
