"""Coreset baselines: random real subset, herding, k-center, k-means (docs/method.md section 5, "Baselines").

Each selector picks `ipc` distinct real samples per class. `herding_indices`, `kcenter_indices` and
`representative_indices` (k-means) work on the features of ONE class and return int64 positions into that
feature matrix; `random_indices` and the dispatcher `select_coreset` return global int64 indices into the training set,
ordered by class. Features usually come from a trained expert's `.embed` (the DC benchmark's setting);
without a feature function the flattened pixels are used.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from sklearn.cluster import KMeans
from torch import Tensor

from ast_core.models import batched_features
from ast_core.settings import CORESET_METHODS

__all__ = [
    "CORESET_METHODS",
    "check_ipc",
    "herding_indices",
    "kcenter_indices",
    "random_indices",
    "representative_indices",
    "select_coreset",
]

LARGE_IPC = 50
POINTS_PER_CLUSTER_AT_LARGE_IPC = 5


def check_ipc(ipc: int, available: int, what: str) -> None:
    """`ipc` must be a positive integer no larger than the number of samples available."""
    if isinstance(ipc, bool) or not isinstance(ipc, int) or ipc < 1:
        raise ValueError(f"ipc={ipc!r} must be a positive integer")
    if ipc > available:
        raise ValueError(f"ipc={ipc} is larger than {what} ({available} samples)")


def _check_features(features: Tensor, ipc: int) -> Tensor:
    """Validate an N x D feature matrix of one class and return it as float64 on the CPU."""
    if not isinstance(features, Tensor) or features.dim() != 2 or features.shape[0] == 0:
        shape = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
        raise ValueError(f"features must be a non-empty N x D tensor, got {shape}")
    if not torch.isfinite(features).all():
        raise ValueError("features contains NaN or infinite values")
    check_ipc(ipc, features.shape[0], "the number of feature rows")
    return features.detach().to("cpu", torch.float64)


def random_indices(labels: Tensor, ipc: int, num_classes: int, seed: int = 0) -> Tensor:
    """`ipc` distinct random samples of each class (a seeded permutation per class), global indices."""
    labels = labels.detach().cpu()
    generator = torch.Generator().manual_seed(int(seed))
    chosen = []
    for c in range(num_classes):
        members = torch.nonzero(labels == c).flatten()
        check_ipc(ipc, members.numel(), f"class {c}")
        chosen.append(members[torch.randperm(members.numel(), generator=generator)[:ipc]])
    return torch.cat(chosen).to(torch.int64)


def herding_indices(features: Tensor, ipc: int) -> Tensor:
    """Greedy herding (Welling 2009, as in the DC benchmark): keep the running mean close to the class mean.

    Step k picks the unused sample nearest to (k+1) * mean - sum(selected), so the first pick is the sample
    nearest the class mean.
    """
    feats = _check_features(features, ipc)
    target = feats.mean(dim=0)
    used = torch.zeros(feats.shape[0], dtype=torch.bool)
    total = torch.zeros_like(target)
    picks = []
    for k in range(ipc):
        dist = torch.linalg.vector_norm(feats - ((k + 1) * target - total), dim=1)
        dist[used] = math.inf
        idx = int(torch.argmin(dist))
        picks.append(idx)
        used[idx] = True
        total += feats[idx]
    return torch.tensor(picks, dtype=torch.int64)


def kcenter_indices(features: Tensor, ipc: int, seed: int | None = None) -> Tensor:
    """K-center greedy: repeatedly add the sample farthest from all chosen centres.

    The first centre is the sample nearest the class mean (`seed=None`, deterministic) or a random sample
    drawn with `seed`.
    """
    feats = _check_features(features, ipc)
    if seed is None:
        first = int(torch.argmin(torch.linalg.vector_norm(feats - feats.mean(dim=0), dim=1)))
    else:
        first = int(torch.randint(feats.shape[0], (1,), generator=torch.Generator().manual_seed(int(seed))))
    picks = [first]
    min_dist = torch.linalg.vector_norm(feats - feats[first], dim=1)
    min_dist[first] = -math.inf
    for _ in range(ipc - 1):
        idx = int(torch.argmax(min_dist))
        picks.append(idx)
        min_dist = torch.minimum(min_dist, torch.linalg.vector_norm(feats - feats[idx], dim=1))
        min_dist[picks] = -math.inf
    return torch.tensor(picks, dtype=torch.int64)


def representative_indices(features: Tensor, ipc: int, seed: int = 0) -> Tensor:
    """AST's representative samples of one class (IV-C1): K-Means on the features, nearest real sample per centroid.

    ipc < 50: K = ipc clusters, one sample each. ipc >= 50: K = ceil(ipc / 5) sub-clusters and the 5 nearest
    samples of each (the paper's "10 sub-clusters, each with 4 extra points" at ipc = 50). Centroids are
    served in order and skip samples already taken, so the indices are always distinct.
    """
    feats = _check_features(features, ipc)
    per_cluster = POINTS_PER_CLUSTER_AT_LARGE_IPC if ipc >= LARGE_IPC else 1
    num_clusters = math.ceil(ipc / per_cluster)
    kmeans = KMeans(n_clusters=num_clusters, n_init=10, random_state=int(seed)).fit(feats.numpy())
    order = torch.cdist(torch.from_numpy(kmeans.cluster_centers_), feats).argsort(dim=1)
    picks: list[int] = []
    for row in order.tolist():
        picks += [index for index in row if index not in picks][:per_cluster]
    return torch.tensor(picks[:ipc], dtype=torch.int64)


def _class_features(x: Tensor, members: Tensor, feature_fn: Callable[[Tensor], Tensor] | None,
                    features: Tensor | None) -> Tensor:
    """Features of one class: precomputed rows, else `feature_fn` in batches without gradients, else pixels."""
    if features is not None:
        return features[members].flatten(1)
    rows = x[members.to(x.device)]
    return rows.flatten(1) if feature_fn is None else batched_features(feature_fn, rows).flatten(1)


def select_coreset(method: str, data_x: Tensor, data_y: Tensor, num_classes: int, ipc: int,
                   feature_fn: Callable[[Tensor], Tensor] | None = None, seed: int = 0,
                   features: Tensor | None = None) -> Tensor:
    """Global int64 indices into (data_x, data_y) of an `ipc`-per-class coreset chosen by `method`.

    Herding, k-center (first centre nearest the class mean) and k-means (the representative rule) run per
    class on `features` (precomputed, one row per sample) or on `feature_fn(x)` (e.g. an expert's `.embed`);
    `seed` drives `random` and the k-means initialisation.
    """
    if features is not None and len(features) != len(data_x):
        raise ValueError(f"features has {len(features)} rows for {len(data_x)} samples")
    if method not in CORESET_METHODS:
        raise ValueError(f"method={method!r} is unknown; allowed: {', '.join(CORESET_METHODS)}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes={num_classes!r} must be a positive integer")
    if data_y.dim() != 1 or data_x.shape[0] != data_y.shape[0]:
        raise ValueError(f"data_x has shape {tuple(data_x.shape)} and data_y {tuple(data_y.shape)}: "
                         "expected N samples and N integer labels")
    counts = torch.bincount(data_y.detach().cpu().long(), minlength=num_classes)[:num_classes]
    check_ipc(ipc, int(counts.min()), "the smallest class")
    if method == "random":
        return random_indices(data_y, ipc, num_classes, seed)
    selectors: dict[str, Callable[[Tensor], Tensor]] = {
        "herding": lambda f: herding_indices(f, ipc),
        "kcenter": lambda f: kcenter_indices(f, ipc),
        "kmeans": lambda f: representative_indices(f, ipc, seed),
    }
    labels = data_y.detach().cpu()
    chosen = []
    for c in range(num_classes):
        members = torch.nonzero(labels == c).flatten()
        local = selectors[method](_class_features(data_x, members, feature_fn, features))
        chosen.append(members[local])
    return torch.cat(chosen).to(torch.int64)
