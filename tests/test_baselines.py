"""Tests for ast_core.baselines (coreset baselines, docs/method.md section 5) against hand-computed picks."""

from __future__ import annotations

import pytest
import torch

from ast_core.baselines import herding_indices, kcenter_indices, random_indices, representative_indices, select_coreset
from ast_core.models import build_model
from ast_core.settings import CORESET_METHODS


def _points(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def _assert_valid_coreset(indices: torch.Tensor, labels: torch.Tensor, ipc: int, num_classes: int) -> None:
    assert indices.dtype == torch.int64
    assert indices.numel() == ipc * num_classes
    assert indices.unique().numel() == indices.numel()
    assert int(indices.min()) >= 0 and int(indices.max()) < labels.numel()
    picked = labels[indices].long()
    assert torch.equal(picked, torch.arange(num_classes).repeat_interleave(ipc))


@pytest.mark.parametrize("method", CORESET_METHODS)
def test_select_coreset_on_digits_pixels(digits, method: str) -> None:
    nc = digits.info.num_classes
    idx = select_coreset(method, digits.train_x, digits.train_y, nc, ipc=3, seed=1)
    _assert_valid_coreset(idx, digits.train_y, 3, nc)
    again = select_coreset(method, digits.train_x, digits.train_y, nc, ipc=3, seed=1)
    assert torch.equal(idx, again)


@pytest.mark.parametrize("method", ["herding", "kcenter", "kmeans"])
def test_select_coreset_uses_feature_fn(digits, method: str) -> None:
    info = digits.info
    torch.manual_seed(0)
    net = build_model("convnet", info.channels, info.num_classes, info.image_size, width=8)
    calls = []

    def embed(x: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape[0])
        assert not torch.is_grad_enabled()
        return net.embed(x)

    idx = select_coreset(method, digits.train_x, digits.train_y, info.num_classes, ipc=2, feature_fn=embed)
    _assert_valid_coreset(idx, digits.train_y, 2, info.num_classes)
    assert sum(calls) == digits.train_x.shape[0]  # every training image embedded exactly once
    # the pick equals the per-class selector applied to the same features
    members = torch.nonzero(digits.train_y == 4).flatten()
    with torch.no_grad():
        feats = net.embed(digits.train_x[members])
    selector = {"herding": herding_indices, "kcenter": kcenter_indices, "kmeans": representative_indices}[method]
    local = selector(feats, 2)
    assert torch.equal(idx[8:10], members[local])


def test_random_indices_changes_with_seed() -> None:
    labels = torch.arange(4).repeat(50)
    a = random_indices(labels, 5, 4, seed=0)
    _assert_valid_coreset(a, labels, 5, 4)
    assert torch.equal(a, random_indices(labels, 5, 4, seed=0))
    assert not torch.equal(a, random_indices(labels, 5, 4, seed=1))


def test_herding_hand_example() -> None:
    # mean (3.5, 3.5): nearest is (4, 4); then target 2*mean - (4, 4) = (3, 3): nearest remaining is (0, 0)
    f = _points([[0, 0], [10, 0], [0, 10], [4, 4]])
    assert herding_indices(f, 2).tolist() == [3, 0]
    assert sorted(herding_indices(f, 4).tolist()) == [0, 1, 2, 3]


def test_kcenter_hand_example() -> None:
    # mean (1.02, -0.58): nearest is (0.1, 0); farthest from it (5, 0); then farthest from both (0, -3)
    f = _points([[0, 0], [0.1, 0], [0, 0.1], [5, 0], [0, -3]])
    assert kcenter_indices(f, 3).tolist() == [1, 3, 4]
    seeded = kcenter_indices(f, 3, seed=7)
    first = int(torch.randint(5, (1,), generator=torch.Generator().manual_seed(7)))
    assert seeded[0] == first and seeded.unique().numel() == 3


def test_kcenter_distinct_with_duplicates() -> None:
    f = _points([[1, 1]] * 4)
    assert sorted(kcenter_indices(f, 4).tolist()) == [0, 1, 2, 3]


def test_kmeans_picks_samples_nearest_the_centroids() -> None:
    offsets = [[0, 0], [1, 0], [-1, 0], [0, 1], [0, -1]]  # centroid of each cluster = its first point
    centres = [[0, 0], [20, 0], [0, 20]]
    f = _points([[cx + dx, cy + dy] for cx, cy in centres for dx, dy in offsets])
    assert sorted(representative_indices(f, 3, seed=0).tolist()) == [0, 5, 10]


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_kmeans_distinct_when_centroids_share_a_sample() -> None:
    f = _points([[0, 0]] * 3 + [[1, 0]])
    picks = representative_indices(f, 3, seed=0)
    assert picks.unique().numel() == 3 and 3 in picks.tolist()  # (1, 0) is a centroid's own sample
    assert representative_indices(f, 4, seed=0).unique().numel() == 4


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"method": "forgetting"}, "method"),
        ({"ipc": 0}, "ipc"),
        ({"ipc": 3}, "ipc"),  # the smallest class has 2 samples
        ({"ipc": 1.5}, "ipc"),
        ({"num_classes": 0}, "num_classes"),
    ],
)
def test_select_coreset_rejects_bad_arguments(kwargs: dict, name: str) -> None:
    args = {"method": "random", "data_x": torch.zeros(6, 1, 2, 2), "data_y": torch.tensor([0, 0, 1, 1, 1, 1]),
            "num_classes": 2, "ipc": 1} | kwargs
    with pytest.raises(ValueError, match=name):
        select_coreset(**args)


def test_selectors_reject_bad_features() -> None:
    with pytest.raises(ValueError, match="features"):
        herding_indices(torch.zeros(5), 1)
    with pytest.raises(ValueError, match="features"):
        kcenter_indices(_points([[0, float("nan")]]), 1)
    with pytest.raises(ValueError, match="ipc"):
        representative_indices(_points([[0, 0], [1, 1]]), 3)
