"""Pictures users look at: synthetic-image grids, curves and 2-D scatter plots, written as PNG atomically."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402
from torchvision.utils import save_image  # noqa: E402

from ast_core.io import atomic_write_with  # noqa: E402


def save_image_grid(images: Tensor, labels: Tensor, path: str | os.PathLike, num_classes: int) -> None:
    """Save images in [0, 1] pixel space as a grid with one row per class (columns = images per class)."""
    order = torch.argsort(labels, stable=True)
    per_class = max(int((labels == c).sum()) for c in range(num_classes))
    grid_images = images[order].detach().float().clamp(0, 1).cpu()
    atomic_write_with(path, lambda tmp: save_image(grid_images, tmp, nrow=per_class, padding=1, format="png"))


def plot_curves(series: Mapping[str, tuple[Sequence[float], Sequence[float]]], path: str | os.PathLike,
                xlabel: str, ylabel: str, title: str = "", logy: bool = False,
                bands: Mapping[str, Sequence[float]] | None = None,
                ranges: Mapping[str, tuple[Sequence[float], Sequence[float]]] | None = None) -> None:
    """Line plot of named (x, y) series; `bands` optionally gives a +- std per series, `ranges` a
    (low, high) pair of curves per series (e.g. quantiles)."""
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for name, (xs, ys) in series.items():
        (line,) = ax.plot(list(xs), list(ys), label=name, marker="o" if len(xs) <= 30 else None, markersize=3)
        shaded = None
        if bands and name in bands:
            shaded = ([y - s for y, s in zip(ys, bands[name], strict=True)],
                      [y + s for y, s in zip(ys, bands[name], strict=True)])
        if ranges and name in ranges:
            shaded = ranges[name]
        if shaded is not None:
            ax.fill_between(list(xs), list(shaded[0]), list(shaded[1]), alpha=0.2, color=line.get_color())
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    if title:
        ax.set_title(title)
    if len(series) > 1:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save_figure(fig, path)


def plot_scatter_2d(points: Tensor, labels: Tensor, path: str | os.PathLike, highlight: Tensor | None = None,
                    title: str = "", highlight_label: str = "selected", extra: Tensor | None = None,
                    extra_label: str = "other") -> None:
    """2-D scatter coloured by label; `highlight` (indices) as large stars, `extra` (indices) as crosses."""
    pts, lab = points.detach().cpu().numpy(), labels.detach().cpu().numpy()
    fig, ax = plt.subplots(figsize=(5.5, 5), dpi=120)
    ax.scatter(pts[:, 0], pts[:, 1], c=lab, cmap="tab10", s=4, alpha=0.35, linewidths=0)
    if highlight is not None and len(highlight):
        idx = highlight.detach().cpu().numpy()
        ax.scatter(pts[idx, 0], pts[idx, 1], c=lab[idx], cmap="tab10", s=140, marker="*", edgecolors="black",
                   linewidths=0.8, label=highlight_label, vmin=lab.min(), vmax=lab.max())
    if extra is not None and len(extra):
        idx = extra.detach().cpu().numpy()
        ax.scatter(pts[idx, 0], pts[idx, 1], c="black", s=40, marker="x", linewidths=1.2, label=extra_label)
    if (highlight is not None and len(highlight)) or (extra is not None and len(extra)):
        ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    _save_figure(fig, path)


def plot_soft_labels(probabilities: Tensor, labels: Tensor, path: str | os.PathLike, title: str = "") -> None:
    """Heat map of soft labels: one row per synthetic image (grouped by its class), one column per class, the
    colour its probability; a set whose labels stayed one-hot shows a bright diagonal of blocks."""
    order = torch.argsort(labels.cpu(), stable=True)
    table = probabilities.detach().float().cpu()[order].numpy()
    fig, ax = plt.subplots(figsize=(5, max(3.0, min(10.0, 0.12 * len(table) + 1.5))), dpi=120)
    image = ax.imshow(table, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_xlabel("class")
    ax.set_ylabel("synthetic image (sorted by its class)")
    ax.set_xticks(range(table.shape[1]))
    fig.colorbar(image, ax=ax, label="probability")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    _save_figure(fig, path)


def _save_figure(fig: plt.Figure, path: str | os.PathLike) -> None:
    try:
        atomic_write_with(path, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)
