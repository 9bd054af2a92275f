"""Representative initialisation (AST IV-C1) against hand-made clustered data."""

import pytest
import torch

from ast_core.baselines import representative_indices
from ast_core.init import initial_synthetic_set


def three_blobs() -> tuple[torch.Tensor, torch.Tensor]:
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    offsets = torch.tensor([[0.0, 0.0], [0.3, 0.0], [-0.3, 0.0], [0.0, 0.3], [0.0, -0.3], [0.4, 0.4]])
    points = (centres[:, None, :] + offsets[None]).reshape(-1, 2)
    return points, centres


def test_one_sample_per_cluster_nearest_its_centroid() -> None:
    points, _ = three_blobs()
    chosen = representative_indices(points, ipc=3)
    # Each blob's centroid is (0.1/6*..): the sample nearest it is the blob's first point (offset 0,0).
    assert sorted(chosen.tolist()) == [0, 6, 12]


def test_large_ipc_takes_five_nearest_per_sub_cluster() -> None:
    torch.manual_seed(0)
    centres = torch.randn(10, 4) * 50
    points = (centres[:, None, :] + torch.randn(10, 12, 4)).reshape(-1, 4)
    chosen = representative_indices(points, ipc=50)
    assert len(chosen) == 50 and len(set(chosen.tolist())) == 50
    per_blob = torch.bincount(chosen // 12, minlength=10)
    assert per_blob.tolist() == [5] * 10


def test_ipc_larger_than_class_is_rejected() -> None:
    with pytest.raises(ValueError, match="ipc=20"):
        representative_indices(torch.randn(10, 2), ipc=20)


@pytest.mark.parametrize("method", ["representative", "real", "noise"])
def test_initial_set_has_ipc_images_per_class_from_the_right_class(digits, method: str) -> None:
    init = initial_synthetic_set(method, digits.train_x, digits.train_y, 10, ipc=3, seed=1,
                                 features=digits.train_x.flatten(1))
    assert init.images.shape == (30, 1, 8, 8)
    assert torch.equal(init.labels, torch.arange(10).repeat_interleave(3))
    if method != "noise":
        assert torch.equal(digits.train_y[init.source_indices], init.labels)
        assert len(set(init.source_indices.tolist())) == 30
        assert torch.equal(init.images, digits.train_x[init.source_indices])


def test_unknown_init_method_names_the_parameter(digits) -> None:
    with pytest.raises(ValueError, match="init='kmeans'"):
        initial_synthetic_set("kmeans", digits.train_x, digits.train_y, 10, ipc=1)
