"""Initialisation of the synthetic set (AST section IV-C1, docs/method.md section 4).

`representative`: per class, K-Means on an expert's features (before the final linear layer) and the real
samples nearest the centroids (`ast_core.baselines.representative_indices`, with the paper's ipc >= 50
rule). `real`: a random real subset. `noise`: standard-normal images (in normalised space).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ast_core.baselines import check_ipc, representative_indices, select_coreset
from ast_core.settings import INIT_METHODS

__all__ = ["INIT_METHODS", "SyntheticInit", "initial_synthetic_set", "representative_indices"]


@dataclass
class SyntheticInit:
    """Initial synthetic images and labels, and the training-set indices they came from (-1 for noise)."""

    images: Tensor
    labels: Tensor
    source_indices: Tensor


def initial_synthetic_set(method: str, train_x: Tensor, train_y: Tensor, num_classes: int, ipc: int,
                          seed: int = 0, features: Tensor | None = None) -> SyntheticInit:
    """Build the starting synthetic set: ipc images per class, labels sorted by class.

    `features` (one row per training image, e.g. `batched_features(expert.embed, train_x)`) is needed by the
    representative rule.
    """
    if method not in INIT_METHODS:
        raise ValueError(f"init={method!r} is not supported; allowed: {', '.join(INIT_METHODS)}")
    if method == "representative" and features is None:
        raise ValueError("init='representative' needs features with one row per training image")
    labels = torch.arange(num_classes).repeat_interleave(ipc)
    if method == "noise":
        smallest = int(torch.bincount(train_y, minlength=num_classes)[:num_classes].min())
        check_ipc(ipc, smallest, "the smallest class")
        images = torch.randn((len(labels), *train_x.shape[1:]), generator=torch.Generator().manual_seed(seed))
        return SyntheticInit(images, labels, torch.full((len(labels),), -1, dtype=torch.long))
    coreset = "kmeans" if method == "representative" else "random"
    source = select_coreset(coreset, train_x, train_y, num_classes, ipc, seed=seed, features=features)
    return SyntheticInit(train_x[source].clone(), labels, source)
