"""Reports on a buffer folder of experts: ``summary.json``, ``metrics.csv`` and the figures ``accuracy.png``,
``step_sq_norm.png`` (AST Fig. 9) and ``grad_norm.png``, written from the experts' stored metadata only.

Kept apart from training (`ast_core.experts`) so that any way of filling the folder (one process, a process pool,
a Dask cluster) ends with the same reports, and so that the per-epoch curves can be reused (`pipeline.study`).
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ast_core.experts import GRAD_NORM_KEYS, HISTORY_KEYS
from ast_core.io import atomic_write_csv, atomic_write_json
from ast_core.trajectory import list_buffer, read_metadata
from ast_core.viz import plot_curves


def _mean_std(values: Sequence[float | None]) -> dict[str, Any]:
    """Mean and population std of the non-missing values, with the values themselves."""
    present = [v for v in values if v is not None]
    return {"per_expert": list(values), "mean": statistics.fmean(present) if present else None,
            "std": statistics.pstdev(present) if present else None}


def summarize_buffer(folder: str | os.PathLike, num_experts: int | None = None) -> dict[str, Any]:
    """Write summary.json, metrics.csv, accuracy.png, step_sq_norm.png and grad_norm.png for a buffer folder.

    Uses the first `num_experts` plain experts (all when None), reading only their metadata.
    summary.json: Avg_Var per expert with mean ± std, final train/val/test accuracy and input-gradient norm
    (at θ_0 and after the last epoch) mean ± std.
    """
    out = Path(folder)
    paths = list_buffer(out)[:num_experts]
    if not paths:
        raise FileNotFoundError(f"no expert files expert_000.safetensors, ... in {out}")
    metas = [read_metadata(p) for p in paths]
    histories = [m["history"] for m in metas]
    rows = []
    for meta, history in zip(metas, histories, strict=True):
        for e in range(len(history["step_sq_norm"])):
            row = {"expert": meta["expert_index"], "seed": meta["seed"], "epoch": e + 1}
            row.update({key: history[key][e] for key in (*HISTORY_KEYS, "step_sq_norm")})
            rows.append(row)
    atomic_write_csv(out / "metrics.csv", rows)
    summary = {
        "num_experts": len(metas), "dataset": metas[0]["dataset"], "arch": metas[0]["arch"],
        "num_epochs": metas[0]["num_epochs"], "config": metas[0]["config"],
        "seeds": [m["seed"] for m in metas],
        "avg_var": _mean_std([statistics.fmean(h["step_sq_norm"]) for h in histories]),
        **{key: _mean_std([h[key][-1] for h in histories]) for key in ("train_acc", "val_acc", "test_acc")},
        "gp_norm": metas[0]["config"]["gp_norm"],
        "grad_norm_init": _mean_std([h["grad_norm_init"]["grad_norm_mean"] for h in histories]),
        **{key: _mean_std([h[key][-1] for h in histories]) for key in GRAD_NORM_KEYS},
    }
    atomic_write_json(out / "summary.json", summary)
    _plot_buffer(out, histories, metas[0]["config"])
    return summary


def epoch_curve(histories: Sequence[dict[str, Any]], key: str) -> tuple[list[float], list[float]] | None:
    """Per-epoch mean and std of `key` across experts, or None when it was not recorded."""
    columns = list(zip(*(h[key] for h in histories), strict=True))
    if any(v is None for column in columns for v in column):
        return None
    return [statistics.fmean(c) for c in columns], [statistics.pstdev(c) for c in columns]


def _plot_buffer(out: Path, histories: Sequence[dict[str, Any]], config: dict[str, Any]) -> None:
    """accuracy.png (train/val/test per epoch), step_sq_norm.png (AST Fig. 9) and grad_norm.png, mean ± std
    over experts."""
    n = len(histories)
    epochs = list(range(1, len(histories[0]["test_acc"]) + 1))
    series, bands = {}, {}
    for split in ("train", "val", "test"):
        curve = epoch_curve(histories, f"{split}_acc")
        if curve is not None:
            series[split], bands[split] = (epochs, curve[0]), curve[1]
    plot_curves(series, out / "accuracy.png", "epoch", "accuracy (%)",
                title=f"expert accuracy (mean ± std over {n} experts)", bands=bands)
    mean, std = epoch_curve(histories, "step_sq_norm")
    label = "|θ_t − θ_t+1|²"
    plot_curves({label: (list(range(len(mean))), mean)}, out / "step_sq_norm.png", "epoch t", label,
                title=f"parameter change per epoch (AST Fig. 9, {n} experts)", logy=True, bands={label: std})
    _plot_grad_norms(out, histories, config)


def grad_norm_curve(histories: Sequence[dict[str, Any]], key: str) -> list[float]:
    """`key` (grad_norm_mean/q10/q90) at θ_0 and after every epoch, mean over experts (epoch 0 = θ_0)."""
    return [statistics.fmean(h["grad_norm_init"][key] for h in histories), *epoch_curve(histories, key)[0]]


def _plot_grad_norms(out: Path, histories: Sequence[dict[str, Any]], config: dict[str, Any]) -> None:
    """grad_norm.png: input-gradient norm per epoch (epoch 0 = θ_0), mean over experts with the mean 10-90 %
    quantile band, against the penalty's target K when a penalty is in use."""
    epochs = list(range(len(histories[0]["test_acc"]) + 1))
    label = f"per-{config['gp_norm']} norm"
    series = {label: (epochs, grad_norm_curve(histories, "grad_norm_mean"))}
    if config["grad_penalty"]:
        series[f"target K = {config['gp_target']}"] = (epochs, [config["gp_target"]] * len(epochs))
    plot_curves(series, out / "grad_norm.png", "epoch", "‖∇x Σc f(x)c‖ (mean, 10-90 % band)", logy=True,
                title=f"input-gradient norm the penalty constrains ({len(histories)} experts)",
                ranges={label: (grad_norm_curve(histories, "grad_norm_q10"),
                                grad_norm_curve(histories, "grad_norm_q90"))})
