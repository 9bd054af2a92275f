"""Stage `report`: results tables (CSV + Markdown) and figures from the pipeline's metrics and from MLflow.

- ``results.{csv,md}``: this workspace's distilled cells over their distillation seeds, each compared with the
  real subsets and full-data training scored on the same test networks; then those baselines; with the protocol.
- ``buffers.{csv,md}``: Avg_Var and expert accuracy per buffer variant (AST Table VII layout).
- ``experiments.{csv,md}``: every DVC experiment recorded in MLflow (latest run per experiment, method, ipc and
  distillation seed).
- ``seeds.{csv,md}``: those runs folded over distillation seeds; ``comparisons.{csv,md}``: paired tests between
  them, the ablation comparison.
- ``figures/``: accuracy vs iteration (AST Fig. 6), alpha, inner loss with/without balancing, Avg_Var per epoch.
- ``curves/``: each (cell, seed)'s distillation curves, ``<method>-ipc<k>-s<seed>.csv``, for `dvc plots show`.
- ``grids/``: each (cell, seed)'s best (kept on validation) and final distilled images.
- ``docs/results.md``: the project's results page, assembled from these tables (`pipeline.results_document`).

Every ± is a sample std (ddof 1), except the buffers table's (population std over experts, as the buffer
stage writes it), and every p a two-sided paired t-test (`ast_core.statistics`).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd

from ast_core.io import atomic_write_text, atomic_write_with
from ast_core.statistics import ALPHA, MIN_PAIRS, PairedDifference, paired_difference, sample_std
from ast_core.viz import plot_curves
from pipeline import tracking
from pipeline.layout import BASELINES, BUFFER, EVALUATE, REPORT, distill_dir
from pipeline.outputs import claim_outputs
from pipeline.params import Params
from pipeline.results_document import RESULTS_DOCUMENT
from pipeline.results_document import render as render_results

log = logging.getLogger(__name__)
FIGURES = REPORT / "figures"
TABLES = REPORT / "tables"
CURVES = REPORT / "curves"
GRIDS = REPORT / "grids"
GRID_FILES = {"best": "grid.png", "final": "final_grid.png"}
COMPARED_SUBSETS = ("kmeans", "random")
RESULT_COLUMNS = ["method", "ipc", "arch", "seeds", "networks", "test_acc", "per_seed", "kept_iterations",
                  *(f"{kind}_{subset}" for subset in COMPARED_SUBSETS for kind in ("vs", "p")), "gap_to_full"]
Cell = tuple[str, int, int]  # (method, ipc, distillation seed)


def pm(mean: float, std: float, sign: str = "") -> str:
    """'mean ± std' to 2 decimals; `sign` '+' writes the mean's sign (a difference)."""
    return f"{mean:{sign}.2f} ± {std:.2f}"


def p_text(difference: PairedDifference) -> str:
    """'p (verdict)', or 'n/a' when the test is undefined (fewer than two seeds, or equal differences)."""
    return "n/a" if math.isnan(difference.p_value) else f"{difference.p_value:.3g} ({difference.verdict})"


def write_table(frame: pd.DataFrame, stem: str, title: str, note: str = "") -> list[Path]:
    """`stem.csv` and `stem.md` (a titled Markdown table with an optional protocol note)."""
    csv_path, md_path = TABLES / f"{stem}.csv", TABLES / f"{stem}.md"
    atomic_write_with(csv_path, lambda tmp: frame.to_csv(tmp, index=False))
    body = frame.to_markdown(index=False) if len(frame) else "(no rows)"
    atomic_write_text(md_path, f"## {title}\n\n{note + chr(10) + chr(10) if note else ''}{body}\n")
    return [csv_path, md_path]


def results_frame(cells: set[Cell] | None = None) -> tuple[pd.DataFrame, str]:
    """One row per distilled (method, ipc, arch) over its distillation seeds (only the cells in `cells` when
    given: outputs of cells since removed from the matrix are left out), each compared with the real subsets
    and full-data training; then those baselines. Returns the table and its protocol note."""
    evaluations = [details for details in map(_read_json, sorted(EVALUATE.glob("*/ipc*/seed*/results.json")))
                   if cells is None or (details["method"], details["ipc"], details["seed"]) in cells]
    baselines = _read_json(BASELINES / "results.json") if (BASELINES / "results.json").is_file() else None
    subsets = {(row["method"], row["ipc"], row["arch"]): row for row in baselines["coresets"]} if baselines else {}
    full = baselines["full_data"] if baselines else None
    by_cell: dict[tuple[str, int, str], dict[int, dict[str, Any]]] = defaultdict(dict)
    for details in evaluations:
        for arch, result in details["results"].items():
            by_cell[details["method"], details["ipc"], arch][details["seed"]] = result
    rows = [(ipc, arch, 0, _distilled_row(method, ipc, arch, dict(sorted(per_seed.items())), subsets, full))
            for (method, ipc, arch), per_seed in by_cell.items()]
    rows += [(row["ipc"], row["arch"], 1, _baseline_row(f"{row['method']} (real subset)", row["ipc"], row))
             for row in subsets.values()]
    if full:
        rows.append((math.inf, full["arch"], 1, _baseline_row(f"full dataset (epochs: {full['iterations']})", "all",
                                                              full)))
    rows.sort(key=lambda row: (*row[:3], -row[3]["mean"]))
    frame = pd.DataFrame([row[3] for row in rows], columns=RESULT_COLUMNS)
    return frame, _results_note(evaluations, baselines)


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def _distilled_row(method: str, ipc: int, arch: str, per_seed: dict[int, dict[str, Any]],
                   subsets: dict[tuple[str, int, str], dict[str, Any]], full: dict[str, Any] | None) -> dict[str, Any]:
    """A cell's row: its seeds' test means folded, kept iterations, and its gains over the baselines."""
    means = [result["mean"] for result in per_seed.values()]
    mean = float(np.mean(means))
    row = {"method": method, "ipc": ipc, "arch": arch, "seeds": len(means), "mean": mean,
           "networks": ", ".join(map(str, sorted({len(result["accuracies"]) for result in per_seed.values()}))),
           "test_acc": pm(mean, sample_std(means)), "per_seed": " / ".join(f"{m:.2f}" for m in means),
           "kept_iterations": " / ".join(_kept_iteration(method, ipc, seed) for seed in per_seed),
           "gap_to_full": f"{full['mean'] - mean:.2f}" if full and full["arch"] == arch else ""}
    for subset in COMPARED_SUBSETS:
        row[f"vs_{subset}"], row[f"p_{subset}"] = _versus(per_seed, subsets.get((subset, ipc, arch)))
    return row


def _kept_iteration(method: str, ipc: int, seed: int) -> str:
    """The distillation iteration whose set was kept on validation; 0 (the initial set) is flagged."""
    path = distill_dir(method, ipc, seed) / "result.json"
    kept = _read_json(path).get("best_iteration") if path.is_file() else None
    return "?" if kept is None else "0 (not distilled)" if kept == 0 else str(kept)


def _versus(per_seed: dict[int, dict[str, Any]], subset: dict[str, Any] | None) -> tuple[str, str]:
    """Gain over a real subset, paired by distillation seed, and its p; blank without the subset, and no
    comparison when the subset was scored on other test networks."""
    if subset is None:
        return "", ""
    if any(result["seeds"] != subset["seeds"] for result in per_seed.values()):
        return "n/a: other test networks", ""
    difference = paired_difference([result["mean"] for result in per_seed.values()], subset["mean"])
    return pm(difference.mean, difference.std, "+"), p_text(difference)


def _baseline_row(method: str, ipc: int | str, result: dict[str, Any]) -> dict[str, Any]:
    """A real subset's or full-data training's row: mean ± sample std over its test networks (the accuracy
    alone for a single network: no spread was measured)."""
    accuracies = result["accuracies"]
    shown = pm(result["mean"], sample_std(accuracies)) if len(accuracies) > 1 else f"{result['mean']:.2f}"
    return {**dict.fromkeys(RESULT_COLUMNS, ""), "method": method, "ipc": ipc, "arch": result["arch"],
            "networks": str(len(accuracies)), "mean": result["mean"], "test_acc": shown}


def _distinct(values: list[Any]) -> str:
    """The value all files agree on, or every value found, flagged, when they disagree."""
    found = list(dict.fromkeys(", ".join(map(str, v)) if isinstance(v, list) else str(v) for v in values))
    return found[0] if len(found) == 1 else "MIXED, do not compare across rows: " + " | ".join(found)


def _results_note(evaluations: list[dict[str, Any]], baselines: dict[str, Any] | None) -> str:
    """The protocol and conventions of the results table, from the files it was built from."""
    if not evaluations and not baselines:
        return ""
    files = [*evaluations, *([baselines] if baselines else [])]
    networks = [len(r["accuracies"]) for details in evaluations for r in details["results"].values()]
    lines = [f"Test protocol: {_distinct([f['protocol'] for f in files])}.",
             f"Test networks: seeds {_distinct([f['test_seeds'] for f in files])}; validation (set selection) "
             f"networks: seeds {_distinct([d['validation_seeds'] for d in evaluations] or ['n/a'])}; "
             f"distillation seeds: {', '.join(map(str, sorted({d['seed'] for d in evaluations}))) or 'n/a'}.",
             f"Machine (test networks trained on): {_distinct([f.get('machine', 'not recorded') for f in files])}.",
             f"Distilled rows: test_acc is the mean ± sample std (ddof 1) over distillation seeds of each seed's "
             f"mean over {_distinct(networks or ['n/a'])} test networks; per_seed and kept_iterations (the "
             f"iteration kept on validation; 0 = the initial set was kept, not distilled) list the seeds in "
             f"ascending order.",
             "Baseline rows: mean ± sample std (ddof 1) over their test networks (`networks`); each baseline is one "
             "subset, scored on the same test networks as the distilled sets.",
             "vs_kmeans / vs_random: gain over the k-means / random real subset at the cell's ipc (vs_random is "
             "DD-Ranking's IOR), mean ± sample std over distillation seeds of (seed's mean − subset's mean). "
             f"p_kmeans / p_random: two-sided paired t-test over distillation seeds (the subset's mean is the same "
             f"for every seed: a one-sample t-test of the gains, the subset's own spread over networks left out). "
             f"A difference is called real (separated) only "
             f"when p < {ALPHA} over >= {MIN_PAIRS} seeds.",
             "gap_to_full: full-data accuracy minus the cell's mean (DD-Ranking's HLR-style gap); blank without a "
             "full-data run."]
    if baselines and baselines["full_data"]:
        full = baselines["full_data"]
        lines.append(f"Full dataset: {len(full['accuracies'])} network(s) trained {full['iterations']} epoch(s) "
                     f"(protocol {full['protocol']}); a bound only as far as that training converged.")
    return "\n".join(f"- {line}" for line in lines)


def buffers_frame() -> pd.DataFrame:
    rows = []
    for path in sorted(BUFFER.glob("*/summary.json")):
        summary = json.loads(path.read_text())
        config = summary["config"]
        rows.append({"variant": path.parent.name, "optimizer": config["optimizer"], "lr": config["lr"],
                     "clip_ce": config["clip_ce"], "grad_penalty": config["grad_penalty"],
                     "experts": summary["num_experts"], "epochs": summary["num_epochs"],
                     "avg_var": pm(summary["avg_var"]["mean"], summary["avg_var"]["std"] or 0.0),
                     "expert_test_acc": pm(summary["test_acc"]["mean"], summary["test_acc"]["std"] or 0.0)})
    return pd.DataFrame(rows)


def experiments_frame(experiment: str) -> pd.DataFrame:
    """Latest evaluate run per (DVC experiment, method, ipc, distillation seed) in MLflow, ConvNet accuracy.
    The seed is the run's `distill_seed` tag; runs from before seeds were tagged have none (<NA>). The runs'
    commits stay in MLflow: a tracked table holding them would change with every commit, not with the results."""
    try:
        tracking.configure(experiment)
        runs = mlflow.search_runs(filter_string="tags.stage = 'evaluate'", output_format="pandas")
    except tracking.TRACKING_ERRORS as error:  # the DVC outputs still give every table but the cross-experiment ones
        log.warning("MLflow store unreachable (%s): the tables across experiments are left out", error)
        return pd.DataFrame()
    if not len(runs) or "metrics.test_acc_convnet_mean" not in runs:
        return pd.DataFrame()
    seed = runs["tags.distill_seed"] if "tags.distill_seed" in runs else pd.Series(None, index=runs.index)
    runs = runs.assign(seed=pd.to_numeric(seed).astype("Int64")).sort_values("start_time")
    runs = runs.groupby(["tags.dvc_exp_name", "tags.method", "tags.ipc", "seed"], dropna=False).tail(1)
    frame = pd.DataFrame({"experiment": runs["tags.dvc_exp_name"], "method": runs["tags.method"],
                          "ipc": runs["tags.ipc"].astype(int), "seed": runs["seed"],
                          "test_acc": [pm(m, s) for m, s in zip(runs["metrics.test_acc_convnet_mean"],
                                                                 runs["metrics.test_acc_convnet_std"], strict=True)],
                          "networks": runs["params.evaluate.num_models"],
                          "eval_iterations": runs["params.evaluate.iterations"],
                          "protocol": runs["params.evaluate.protocol"],
                          "mean": runs["metrics.test_acc_convnet_mean"]})
    return frame.sort_values(["ipc", "experiment", "method", "seed"])


PROTOCOL_KEYS = ["networks", "eval_iterations", "protocol"]  # runs are compared only under the same protocol


def _seeded(experiments: pd.DataFrame) -> pd.DataFrame:
    """The runs of `experiments_frame` with a known distillation seed, in seed order."""
    if not len(experiments):
        return pd.DataFrame()
    return experiments.dropna(subset=["seed"]).astype({"seed": int}).sort_values("seed")


def seeds_frame(experiments: pd.DataFrame) -> pd.DataFrame:
    """Runs with a known distillation seed folded into one row per (experiment, method, ipc, evaluation
    protocol): mean ± sample std over the seeds of each seed's mean test accuracy, the seeds, per-seed means."""
    seeded = _seeded(experiments)
    if not len(seeded):
        return pd.DataFrame()
    keys = ["experiment", "method", "ipc", *PROTOCOL_KEYS]
    rows = []
    for key, part in seeded.groupby(keys, sort=True, dropna=False):
        means = part["mean"].tolist()
        rows.append({**dict(zip(keys, key, strict=True)), "seeds": len(part),
                     "distill_seeds": " / ".join(map(str, part["seed"])),
                     "test_acc": pm(float(np.mean(means)), sample_std(means)),
                     "per_seed": " / ".join(f"{m:.2f}" for m in means)})
    return pd.DataFrame(rows).sort_values(["ipc", "experiment", "method"])


def comparisons_frame(experiments: pd.DataFrame) -> pd.DataFrame:
    """Every pair of `seeds_frame` rows at the same ipc and evaluation protocol sharing at least two seeds,
    paired by distillation seed: the higher-scoring row minus the other, mean ± sample std over the shared
    seeds, with the paired t-test's p and verdict. Every pair rather than each against a reference: the
    ablations have no single reference row (one experiment's methods, and one method across experiments)."""
    seeded = _seeded(experiments)
    if not len(seeded):
        return pd.DataFrame()
    rows = []
    for (ipc, *_), part in seeded.groupby(["ipc", *PROTOCOL_KEYS], sort=True, dropna=False):
        table = part.pivot(index="seed", columns=["experiment", "method"], values="mean")
        for first, second in itertools.combinations(table.columns, 2):
            pair = table[[first, second]].dropna()
            if len(pair) < 2:
                continue
            if pair[first].mean() < pair[second].mean():
                first, second = second, first
            difference = paired_difference(pair[first].tolist(), pair[second].tolist())
            rows.append({"ipc": ipc, "experiment": first[0], "method": first[1], "vs_experiment": second[0],
                         "vs_method": second[1], "seeds": difference.n,
                         "distill_seeds": " / ".join(map(str, pair.index)),
                         "difference": pm(difference.mean, difference.std, "+"), "p": p_text(difference)})
    return pd.DataFrame(rows)


def _label(method: str, ipc: int, seed: int) -> str:
    """'<method> ipc<k> s<seed>': a (cell, seed)'s name in figure legends; with '-' for spaces, its file stem."""
    return f"{method} ipc{ipc} s{seed}"


def _present(cells: set[Cell], name: str) -> dict[str, Path]:
    """Label -> the file `name` of each (cell, seed)'s distill folder, for those that have it."""
    paths = {_label(*cell): distill_dir(*cell) / name for cell in sorted(cells)}
    return {label: path for label, path in paths.items() if path.is_file()}


def _fresh(folder: Path) -> None:
    """An empty `folder`: files of (cells, seeds) no longer in the matrix do not linger."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)


def figures(cells: set[Cell]) -> list[Path]:
    """Distillation curves per (method, ipc, seed) of the matrix and Avg_Var per epoch per buffer variant."""
    _fresh(CURVES)
    out: list[Path] = []
    histories = {label: pd.read_csv(path) for label, path in _present(cells, "history.csv").items()}
    for key, history in histories.items():
        columns = [c for c in ("iteration", "matching_loss", "syn_lr", "inner_loss") if c in history]
        curve = CURVES / f"{key.replace(' ', '-')}.csv"
        atomic_write_with(curve, lambda tmp, h=history[columns]: h.to_csv(tmp, index=False))
        out.append(curve)
    val = {}
    for key, path in _present(cells, "validation.csv").items():
        frame = pd.read_csv(path)
        if len(frame):  # no rows when the cell ran without a validation evaluator
            val[key] = (frame["iteration"], frame["val_acc"])
    if histories:
        specs = [("accuracy_vs_iteration.png", val, "validation accuracy (%)", "accuracy vs iteration (AST Fig. 6)",
                  False),
                 ("syn_lr.png", {k: (h["iteration"], h["syn_lr"]) for k, h in histories.items()}, "alpha",
                  "learned student lr", False),
                 ("matching_loss.png", {k: (h["iteration"], h["matching_loss"].rolling(10, min_periods=1).mean())
                                        for k, h in histories.items()}, "matching loss (10-it. mean)",
                  "matching loss", False)]
        inner = {}
        for key, h in histories.items():
            inner[f"{key} CE"] = (h["iteration"], h["inner_loss"].rolling(10, min_periods=1).mean())
            if (h["inner_loss_balanced"] != h["inner_loss"]).any():
                inner[f"{key} balanced"] = (h["iteration"], h["inner_loss_balanced"].rolling(10, min_periods=1).mean())
        specs.append(("inner_loss.png", inner, "inner-loop loss (10-it. mean)", "inner loss with/without balancing",
                      False))
        for name, series, ylabel, title, logy in specs:
            if series:
                plot_curves(series, FIGURES / name, "iteration", ylabel, title=title, logy=logy)
                out.append(FIGURES / name)
    variance = {}
    for path in sorted(BUFFER.glob("*/metrics.csv")):
        per_epoch = pd.read_csv(path).groupby("epoch")["step_sq_norm"].mean()
        variance[path.parent.name] = (list(per_epoch.index), list(per_epoch.values))
    if variance:
        plot_curves(variance, FIGURES / "avg_var_per_epoch.png", "epoch", "mean |θ_t − θ_t+1|²",
                    title="parameter change per epoch by buffer variant", logy=True)
        out.append(FIGURES / "avg_var_per_epoch.png")
    return out


def grids(cells: set[Cell]) -> list[Path]:
    """The best and final image grids of the matrix's (cell, seed)s, ``grids/<method>-ipc<k>-s<seed>-<kind>.png``."""
    _fresh(GRIDS)
    return [Path(shutil.copyfile(source, GRIDS / f"{label.replace(' ', '-')}-{kind}.png"))
            for kind, name in GRID_FILES.items() for label, source in _present(cells, name).items()]


def run(params: Params) -> None:
    claim_outputs([], [TABLES, FIGURES, CURVES, GRIDS, RESULTS_DOCUMENT.parent])
    with tracking.stage_run("report", params.tracking.experiment, "report",
                            {"experiment": params.tracking.experiment}) as tracker:
        distill = params.distill
        cells = set(itertools.product(distill.methods, distill.ipcs, distill.seeds))
        results, note = results_frame(cells)
        outputs = write_table(results, "results", f"Results on {params.data.dataset}", note)
        outputs += write_table(buffers_frame(), "buffers", "Expert buffers (AST Table VII layout)",
                               "Avg_Var = mean over epochs of |θ_t − θ_t+1|²; mean ± population std (ddof 0) over "
                               "experts.")
        experiments = experiments_frame(params.tracking.experiment)
        outputs += write_table(experiments.drop(columns=["mean"], errors="ignore"),
                               "experiments", "All DVC experiments in MLflow (ConvNet test accuracy)",
                               "Latest run per experiment, method, ipc and distillation seed; ± over the run's test "
                               "networks as the evaluate stage logged it (sample std, ddof 1; runs from before "
                               "distillation seeds were a matrix axis logged the population std). Each row's "
                               "evaluation protocol is in its networks / eval_iterations / protocol columns; sets "
                               "chosen on the validation split.")
        outputs += write_table(seeds_frame(experiments), "seeds", "DVC experiments over distillation seeds",
                               "Runs tagged with their distillation seed: mean ± sample std (ddof 1) over seeds of "
                               "each seed's mean ConvNet test accuracy over `networks` test networks.")
        outputs += write_table(comparisons_frame(experiments), "comparisons", "Paired comparisons of experiments",
                               "Every pair of rows of the seeds table at the same ipc and evaluation protocol that "
                               "share >= 2 distillation seeds: difference = the higher-scoring row minus the other, "
                               "paired by seed, mean ± sample std (ddof 1) over the shared seeds; p: two-sided paired "
                               f"t-test over those seeds; separated only when p < {ALPHA} over >= {MIN_PAIRS} seeds. "
                               "Not corrected for the number of pairs: among many truly equal pairs, about 1 in 20 "
                               "reads separated.")
        atomic_write_text(RESULTS_DOCUMENT, render_results(TABLES))
        outputs += [RESULTS_DOCUMENT, *figures(cells), *grids(cells)]
        tracker.log_folder(REPORT, "report")
        log.info("report written to %s (%d files)", REPORT, len(outputs))
