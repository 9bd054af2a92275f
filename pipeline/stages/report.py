"""Stage `report`: results tables (CSV + Markdown) and figures from the pipeline's metrics and from MLflow.

- ``results.{csv,md}``: this workspace's distilled sets and baselines, mean ± std, with the protocol.
- ``buffers.{csv,md}``: Avg_Var and expert accuracy per buffer variant (AST Table VII layout).
- ``experiments.{csv,md}``: every DVC experiment recorded in MLflow (latest run per experiment, method,
  ipc), the ablation comparison.
- ``figures/``: accuracy vs iteration (AST Fig. 6), alpha, inner loss with/without balancing, Avg_Var per epoch.
- ``grids/``: each cell's best (kept on validation) and final distilled images, for `dvc plots show`.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import mlflow
import pandas as pd

from ast_core.io import atomic_write_text, atomic_write_with
from ast_core.viz import plot_curves
from pipeline import tracking
from pipeline.layout import BASELINES, BUFFER, DISTILL, EVALUATE, REPORT, distill_dir
from pipeline.outputs import claim_outputs
from pipeline.params import Params

log = logging.getLogger(__name__)
FIGURES = REPORT / "figures"
TABLES = REPORT / "tables"
CURVES = REPORT / "curves"
GRIDS = REPORT / "grids"
GRID_FILES = {"best": "grid.png", "final": "final_grid.png"}


def pm(mean: float, std: float) -> str:
    return f"{mean:.2f} ± {std:.2f}"


def write_table(frame: pd.DataFrame, stem: str, title: str, note: str = "") -> list[Path]:
    """`stem.csv` and `stem.md` (a titled Markdown table with an optional protocol note)."""
    csv_path, md_path = TABLES / f"{stem}.csv", TABLES / f"{stem}.md"
    atomic_write_with(csv_path, lambda tmp: frame.to_csv(tmp, index=False))
    body = frame.to_markdown(index=False) if len(frame) else "(no rows)"
    atomic_write_text(md_path, f"## {title}\n\n{note + chr(10) + chr(10) if note else ''}{body}\n")
    return [csv_path, md_path]


def results_frame(cells: set[tuple[str, int]] | None = None) -> tuple[pd.DataFrame, str]:
    """Distilled cells (only the (method, ipc) pairs in `cells` when given: outputs of cells since removed from
    the matrix are left out), then the real-subset baselines and full-data training."""
    rows, note = [], ""
    for path in sorted(EVALUATE.glob("*/ipc*/results.json")):
        details = json.loads(path.read_text())
        if cells is not None and (details["method"], details["ipc"]) not in cells:
            continue
        note = details["protocol"]
        selected = _selected_iteration(details["method"], details["ipc"])
        for arch, result in details["results"].items():
            rows.append({"method": details["method"], "ipc": details["ipc"], "arch": arch,
                         "test_acc": pm(result["mean"], result["std"]), "mean": result["mean"], "std": result["std"],
                         "models": len(result["accuracies"]), "lr": details["syn_lr"], "selected_iteration": selected,
                         "distilled": "" if selected is None else ("yes" if selected else "NO: initial set kept")})
    baseline_file = BASELINES / "results.json"
    if baseline_file.is_file():
        baselines = json.loads(baseline_file.read_text())
        note = note or baselines["protocol"]
        for row in baselines["coresets"]:
            rows.append({"method": f"{row['method']} (real subset)", "ipc": row["ipc"], "arch": row["arch"],
                         "test_acc": pm(row["mean"], row["std"]), "mean": row["mean"], "std": row["std"],
                         "models": len(row["accuracies"]), "lr": row["lr"]})
        if baselines["full_data"]:
            full = baselines["full_data"]
            rows.append({"method": "full dataset", "ipc": "all", "arch": full["arch"],
                         "test_acc": pm(full["mean"], full["std"]), "mean": full["mean"], "std": full["std"],
                         "models": len(full["accuracies"]), "lr": full["lr"]})
    frame = pd.DataFrame(rows)
    if "selected_iteration" in frame:  # real subsets have none
        frame["selected_iteration"] = ["" if pd.isna(v) else str(int(v)) for v in frame["selected_iteration"]]
        frame["distilled"] = frame["distilled"].fillna("")
    if len(frame):
        frame = frame.sort_values(["ipc", "arch", "mean"], ascending=[True, True, False], key=_sort_key)
    return frame, note


def _selected_iteration(method: str, ipc: int) -> int | None:
    """The distillation iteration whose set was kept on validation (0 = the initial set, not improved on)."""
    path = distill_dir(method, ipc) / "result.json"
    return json.loads(path.read_text()).get("best_iteration") if path.is_file() else None


def _sort_key(column: pd.Series) -> pd.Series:
    return column.astype(str) if column.name == "ipc" else column


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
    """Latest evaluate run per (DVC experiment, method, ipc) in MLflow, ConvNet accuracy."""
    tracking.configure(experiment)
    runs = mlflow.search_runs(filter_string="tags.stage = 'evaluate'", output_format="pandas")
    if not len(runs) or "metrics.test_acc_convnet_mean" not in runs:
        return pd.DataFrame()
    runs = runs.sort_values("start_time").groupby(["tags.dvc_exp_name", "tags.method", "tags.ipc"]).tail(1)
    frame = pd.DataFrame({"experiment": runs["tags.dvc_exp_name"], "method": runs["tags.method"],
                          "ipc": runs["tags.ipc"].astype(int),
                          "test_acc": [pm(m, s) for m, s in zip(runs["metrics.test_acc_convnet_mean"],
                                                                 runs["metrics.test_acc_convnet_std"], strict=True)],
                          "networks": runs["params.evaluate.num_models"],
                          "eval_iterations": runs["params.evaluate.iterations"],
                          "protocol": runs["params.evaluate.protocol"],
                          "mean": runs["metrics.test_acc_convnet_mean"], "git_commit": runs["tags.git_commit"].str[:8]})
    return frame.sort_values(["ipc", "experiment", "method"])


SEED_SUFFIX = r"-s\d+$"


def seeds_frame(experiments: pd.DataFrame) -> pd.DataFrame:
    """Experiments named `<name>-s<seed>` (`ast-dd ablate --seeds`) folded into one row per (name, method, ipc):
    mean ± population std over the seeds of each seed's mean test accuracy, and the per-seed means."""
    if not len(experiments):
        return pd.DataFrame()
    seeded = experiments[experiments["experiment"].str.contains(SEED_SUFFIX, regex=True)]
    if not len(seeded):
        return pd.DataFrame()
    seeded = seeded.assign(group=seeded["experiment"].str.replace(SEED_SUFFIX, "", regex=True))
    keys = ["group", "method", "ipc", "networks", "eval_iterations", "protocol"]
    rows = []
    for key, part in seeded.groupby(keys, sort=True):
        rows.append({**dict(zip(keys, key, strict=True)), "seeds": len(part),
                     "test_acc": pm(part["mean"].mean(), part["mean"].std(ddof=0)),
                     "per_seed": " / ".join(f"{m:.2f}" for m in part["mean"])})
    return pd.DataFrame(rows).sort_values(["ipc", "group", "method"])


def _cell(path: Path) -> str:
    """'<method> ipc<k>' from artifacts/distill/<method>/ipc<k>/<file>."""
    return f"{path.parent.parent.name} ipc{path.parent.name[3:]}"


def figures() -> list[Path]:
    """Distillation curves per (method, ipc) and Avg_Var per epoch per buffer variant."""
    out: list[Path] = []
    histories = {_cell(p): pd.read_csv(p) for p in sorted(DISTILL.glob("*/ipc*/history.csv"))}
    for key, history in histories.items():
        columns = [c for c in ("iteration", "matching_loss", "syn_lr", "inner_loss") if c in history]
        curve = CURVES / f"{key.replace(' ', '-')}.csv"
        atomic_write_with(curve, lambda tmp, h=history[columns]: h.to_csv(tmp, index=False))
        out.append(curve)
    val = {}
    for path in sorted(DISTILL.glob("*/ipc*/validation.csv")):
        frame = pd.read_csv(path)
        if len(frame):  # no rows when the cell ran without a validation evaluator
            val[_cell(path)] = (frame["iteration"], frame["val_acc"])
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


def grids(cells: set[tuple[str, int]]) -> list[Path]:
    """The best and final image grids of the current matrix's cells, as ``grids/<method>-ipc<k>-<kind>.png``."""
    shutil.rmtree(GRIDS, ignore_errors=True)
    GRIDS.mkdir(parents=True)
    out = []
    for method, ipc in sorted(cells):
        for kind, name in GRID_FILES.items():
            source = distill_dir(method, ipc) / name
            if source.is_file():
                out.append(Path(shutil.copyfile(source, GRIDS / f"{method}-ipc{ipc}-{kind}.png")))
    return out


def run(params: Params) -> None:
    claim_outputs([], [TABLES, FIGURES, CURVES, GRIDS])
    with tracking.stage_run("report", params.tracking.experiment, "report", {"experiment": params.tracking.experiment}):
        cells = {(m, ipc) for m in params.distill.methods for ipc in params.distill.ipcs}
        results, note = results_frame(cells)
        outputs = write_table(results.drop(columns=["mean", "std"], errors="ignore"), "results",
                              f"Results on {params.data.dataset}", note)
        outputs += write_table(buffers_frame(), "buffers", "Expert buffers (AST Table VII layout)",
                               "Avg_Var = mean over epochs of |θ_t − θ_t+1|²; mean ± std over experts.")
        experiments = experiments_frame(params.tracking.experiment)
        outputs += write_table(experiments.drop(columns=["mean"], errors="ignore"),
                               "experiments", "All DVC experiments in MLflow (ConvNet test accuracy)",
                               "Each row's evaluation protocol is in its networks / eval_iterations / protocol "
                               "columns; sets chosen on the validation split.")
        outputs += write_table(seeds_frame(experiments), "seeds", "Ablations over distillation seeds",
                               "Experiments `<name>-s<seed>` from `ast-dd ablate --seeds`: mean ± std over seeds of "
                               "each seed's mean ConvNet test accuracy (networks per seed in `networks`).")
        outputs += figures() + grids(cells)
        mlflow.log_artifacts(str(REPORT), "report")
        log.info("report written to %s (%d files)", REPORT, len(outputs))
