"""`ast-dd study report`: a study's tables and figures from its finished DVC experiments.

`collect` reads each finished experiment's outputs at its commit (DVC's cache: the evaluate stage's per-network
test accuracies, the distill stage's validation series and kept iteration, the shared experiment's baselines
and expert summaries) into ``docs/studies/<name>.json``; `render` writes ``docs/studies/<name>.md`` and its
figures from that file alone, so the page can be rebuilt (and checked by a test) without the experiments.

Statistics (`ast_core.statistics`): each row's test accuracy is the mean ± sample std (ddof 1) over distillation
seeds of each seed's mean over the test networks. Rows are compared seed by seed (same seeds, same experts, same
test networks) with a two-sided paired t-test; a difference is called separated only when p < 0.05 over >= 3
seeds. A sweep is scored on validation only: it chooses settings, so it never sees the test split.
"""

from __future__ import annotations

import csv
import io
import json
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from ast_core.io import atomic_write_json, atomic_write_text
from ast_core.statistics import ALPHA, MIN_PAIRS, paired_difference, sample_std
from ast_core.viz import plot_curves
from pipeline.layout import BASELINES, buffer_dir, distill_dir, evaluate_dir
from pipeline.studies import (
    Experiment,
    finished_experiments,
    is_finished,
    plan,
    study_file,
    study_names,
    study_params,
)

DOCS = Path("docs") / "studies"


def read_text(fs: Any, path: Path) -> str | None:
    """A file of an experiment's commit (from git, or DVC's cache for outputs); None when it has none."""
    try:
        return fs.read_text(path.as_posix())
    except FileNotFoundError:
        return None


def validation_series(text: str) -> list[list[float]]:
    return [[int(row["iteration"]), float(row["val_acc"])] for row in csv.DictReader(io.StringIO(text))]


def collect_cells(experiment: Experiment, fs: Any, ipcs: Sequence[int], scored: bool) -> list[dict[str, Any]]:
    """One record per ipc of a row experiment: its kept iteration, validation series and test accuracies."""
    cells = []
    for ipc in ipcs:
        folder = distill_dir(experiment.row, ipc, experiment.seed)
        summary, series = read_text(fs, folder / "result.json"), read_text(fs, folder / "validation.csv")
        if summary is None or series is None:
            continue
        result = json.loads(summary)
        cell = {"row": experiment.row, "ipc": ipc, "seed": experiment.seed, "point": experiment.point,
                "experiment": experiment.name, "distilled": result["distilled"],
                "kept_iteration": result["best_iteration"], "validation": validation_series(series)}
        if scored:
            evaluated = read_text(fs, evaluate_dir(experiment.row, ipc, experiment.seed) / "results.json")
            if evaluated is None:
                continue
            details = json.loads(evaluated)
            cell["test"] = details["results"]["convnet"]["accuracies"]
            if "hard_label_results" in details:  # soft-label sets: the same images with their hard labels
                cell["test_hard_labels"] = details["hard_label_results"]["convnet"]["accuracies"]
            cell["protocol"], cell["machine"] = details["protocol"], details["machine"]
        cells.append(cell)
    return cells


def collect(name: str, params_file: Path, profiles: Sequence[str | Path] = ()) -> dict[str, Any]:
    """Every finished experiment of the study (with its current settings), as one JSON-ready record."""
    from dvc.api import DVCFileSystem

    root = params_file.parent.resolve()
    params = study_params(name, params_file, profiles)
    scored = not params.study.grid
    finished = finished_experiments(root)
    record: dict[str, Any] = {"study": name, "title": params.study.title or name, "scored_on": "test" if scored
                              else "validation", "rows": params.distill.methods, "ipcs": params.distill.ipcs,
                              "seeds": params.distill.seeds, "grid": params.study.grid, "cells": [],
                              "baselines": [], "buffers": {}, "missing": []}
    for experiment in plan(name, params_file, profiles):
        if not is_finished(experiment, finished, root):
            record["missing"].append(experiment.name)
            continue
        done = finished[experiment.name]
        fs = DVCFileSystem(str(root), rev=done.commit)
        if experiment.row is not None:
            record["cells"] += [{**cell, "baseline": done.baseline}
                                for cell in collect_cells(experiment, fs, params.distill.ipcs, scored)]
            continue
        for variant in params.buffer.train:
            if (summary := read_text(fs, buffer_dir(variant) / "summary.json")) is not None:
                record["buffers"][variant] = json.loads(summary)
        if scored and (baselines := read_text(fs, BASELINES / "results.json")) is not None:
            record["baselines"] = [{key: row[key] for key in ("method", "ipc", "accuracies", "mean")}
                                   for row in json.loads(baselines)["coresets"]]
    return record


def pm(values: Sequence[float]) -> str:
    return f"{statistics.fmean(values):.2f} ± {sample_std(values):.2f}"


def versus(a: Sequence[float], b: Sequence[float] | float) -> str:
    """`a - b` paired seed by seed: mean ± sample std, p and the verdict."""
    diff = paired_difference(a, b)
    return f"{diff.mean:+.2f} ± {diff.std:.2f} (p {diff.p_value:.3g}, {diff.verdict})"


def by_seed(cells: Sequence[Mapping[str, Any]], key: str = "test") -> dict[int, float]:
    """Seed -> that seed's mean test accuracy over the test networks (`key`: "test", or "test_hard_labels" for
    a soft-label set scored with its hard labels)."""
    return {cell["seed"]: statistics.fmean(cell[key]) for cell in cells}


def paired(a: Mapping[int, float], b: Mapping[int, float]) -> tuple[list[float], list[float]]:
    seeds = sorted(set(a) & set(b))
    return [a[s] for s in seeds], [b[s] for s in seeds]


def scored_table(record: Mapping[str, Any]) -> pd.DataFrame:
    """One line per (row, ipc): accuracy over seeds, each seed's, the kept iterations, and paired gains over
    the first row, the row before it, and the k-means and random real subsets; soft-label rows add the same
    images' hard-label accuracy and its paired gain over the first row."""
    lines = []
    for ipc in record["ipcs"]:
        subsets = {b["method"]: b["mean"] for b in record["baselines"] if b["ipc"] == ipc}
        first: dict[int, float] | None = None
        previous: dict[int, float] | None = None
        for row in record["rows"]:
            cells = sorted((c for c in record["cells"] if c["row"] == row and c["ipc"] == ipc),
                           key=lambda c: c["seed"])
            if not cells:
                continue
            means = by_seed(cells)
            line = {"row": row, "ipc": ipc, "seeds": len(cells), "test_acc": pm(list(means.values())),
                    "per_seed": " / ".join(f"{v:.2f}" for v in means.values()),
                    "kept_iterations": " / ".join(str(c["kept_iteration"]) for c in cells),
                    "vs_first": versus(*paired(means, first)) if first and row != record["rows"][0] else "",
                    "vs_previous": versus(*paired(means, previous)) if previous and previous is not first else ""}
            for subset in ("kmeans", "random"):
                line[f"vs_{subset}"] = versus(list(means.values()), subsets[subset]) if subset in subsets else ""
            if all("test_hard_labels" in c for c in cells):
                hard = by_seed(cells, "test_hard_labels")
                line["hard_labels_test_acc"] = pm(list(hard.values()))
                line["hard_labels_vs_first"] = versus(*paired(hard, first)) if first else ""
            lines.append(line)
            first, previous = first or means, means
        for subset in record["baselines"]:
            if subset["ipc"] == ipc:
                lines.append({"row": f"{subset['method']} (real subset)", "ipc": ipc,
                              "test_acc": pm(subset["accuracies"])})
    return pd.DataFrame(lines)


def buffers_table(record: Mapping[str, Any]) -> pd.DataFrame:
    """The experts each row distils from: Avg_Var, accuracy and input-gradient norm (mean ± std over experts)."""
    def stat(summary: Mapping[str, Any], key: str) -> str:
        value = summary.get(key) or {}
        return "" if value.get("mean") is None else f"{value['mean']:.3g} ± {value.get('std') or 0.0:.2g}"

    return pd.DataFrame([{"variant": variant, "experts": summary["num_experts"], "epochs": summary["num_epochs"],
                          "avg_var": stat(summary, "avg_var"), "expert_test_acc": stat(summary, "test_acc"),
                          "input_grad_norm": stat(summary, "grad_norm_mean")}
                         for variant, summary in sorted(record["buffers"].items())])  # as the JSON keeps them


def convergence(record: Mapping[str, Any], ipc: int, label: str = "row"
                ) -> tuple[dict[str, tuple[list[int], list[float]]], dict[str, list[float]]]:
    """Validation accuracy per iteration, mean and sample std over seeds, per row (or grid point)."""
    groups: dict[str, list[dict[int, float]]] = {}
    for cell in record["cells"]:
        if cell["ipc"] == ipc:
            key = cell["row"] if label == "row" else point_text(cell)
            groups.setdefault(key, []).append({int(i): v for i, v in cell["validation"]})
    series, bands = {}, {}
    for key, curves in groups.items():
        iterations = sorted(set.intersection(*(set(curve) for curve in curves)))
        series[key] = (iterations, [statistics.fmean(c[i] for c in curves) for i in iterations])
        bands[key] = [sample_std([c[i] for c in curves]) for i in iterations]
    return series, bands


def point_text(cell: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in cell["point"].items()) + f" ({cell['row']})"


def sweep_table(record: Mapping[str, Any]) -> pd.DataFrame:
    """One line per (grid point, row, ipc): validation accuracy at the start, the best check and the gain."""
    groups: dict[tuple[str, int], list[Mapping[str, Any]]] = {}
    for cell in record["cells"]:
        groups.setdefault((point_text(cell), cell["ipc"]), []).append(cell)
    lines = []
    def order(item: tuple[tuple[str, int], list[Mapping[str, Any]]]) -> tuple[Any, ...]:
        (_, ipc), cells = item   # by ipc, then the grid's values in numeric order, then the row
        return ipc, tuple(cells[0]["point"].values()), cells[0]["row"]

    for (point, ipc), cells in sorted(groups.items(), key=order):
        start = [dict(map(tuple, c["validation"]))[0] for c in cells]
        best = [max(v for _, v in c["validation"]) for c in cells]
        lines.append({"point": point, "ipc": ipc, "seeds": len(cells), "val_start": pm(start), "val_best": pm(best),
                      "gain": versus(best, start), "kept_iterations": " / ".join(str(c["kept_iteration"])
                                                                                  for c in cells)})
    return pd.DataFrame(lines)


def render(record: Mapping[str, Any], out: Path = DOCS) -> Path:
    """``<out>/<study>.md`` and its convergence figures, from the collected record alone."""
    name, scored = record["study"], record["scored_on"] == "test"
    command = f"ast-dd study run {name}"
    parts = [f"# {record['title']}", "",
             f"Written by `ast-dd study report {name}` from the DVC experiments of `{command}` (settings: "
             f"[profiles/studies/{name}.yaml](../../profiles/studies/{name}.yaml)); do not edit by hand.", ""]
    cells = record["cells"]
    seeds = sorted({c["seed"] for c in cells})
    if scored and cells:
        parts += [f"- Protocol: {cells[0]['protocol']}.", f"- Machine: {cells[0]['machine']}.",
                  f"- Distillation seeds: {', '.join(map(str, seeds))}; each row's test_acc is the mean ± sample "
                  "std (ddof 1) over seeds of each seed's mean over the test networks; per_seed and "
                  "kept_iterations (the iteration kept on validation, 0 = the initial set was kept) list the seeds "
                  "in ascending order.",
                  "- vs_first / vs_previous: gain over the table's first row / the row above, paired seed by seed "
                  "(same experts, seeds and test networks); vs_kmeans / vs_random: gain over that real subset "
                  f"(one-sample t-test of the gains). Two-sided t-tests; separated means p < {ALPHA} over >= "
                  f"{MIN_PAIRS} seeds.", ""]
    if not scored:
        parts += ["A sweep chooses settings, so it is scored on the validation split only (the distill stage "
                  "never sees the test split). val_best: the best validation check; gain: val_best - val_start, "
                  f"paired seed by seed (seeds {', '.join(map(str, seeds))}).", ""]
    table = scored_table(record) if scored else sweep_table(record)
    shown = table.astype(object).fillna("").to_markdown(index=False) if len(table) else "(no finished experiments)"
    parts += [shown, ""]
    if record["buffers"]:
        parts += ["## Expert buffers", "", "Avg_Var = mean over epochs of |θ_t − θ_t+1|²; input_grad_norm: the "
                  "experts' input-gradient norm after training; mean ± population std (ddof 0) over experts.", "",
                  buffers_table(record).to_markdown(index=False), ""]
    figures = []
    for ipc in record["ipcs"]:
        series, bands = convergence(record, ipc, "row" if scored else "point")
        if series:
            figure = out / f"{name}-convergence-ipc{ipc}.png"
            plot_curves(series, figure, "distillation iteration", "validation accuracy (%)", bands=bands,
                        title=f"{record['title']}: ipc {ipc}, mean ± std over seeds")
            figures.append(figure)
    if figures:
        parts += ["## Convergence on validation", "",
                  *(f"![{figure.stem}]({figure.name})" for figure in figures), ""]
    if record["missing"]:
        parts += ["Not finished yet (rerun the command to run them): " + ", ".join(record["missing"]) + ".", ""]
    page = out / f"{name}.md"
    atomic_write_text(page, "\n".join(parts))
    return page


def write_report(names: Sequence[str] | None, params_file: Path, profiles: Sequence[str | Path] = ()) -> list[Path]:
    """`ast-dd study report [NAME ...]` (default: every study with an overlay): collect, then render."""
    pages = []
    for name in names or study_names(params_file.parent):
        study_file(name, params_file.parent)
        record = collect(name, params_file, profiles)
        atomic_write_json(DOCS / f"{name}.json", record)
        pages.append(render(record))
    return pages
