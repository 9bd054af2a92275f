"""Tests for ast_core.data: shapes, splits, normalisation, caching, folder layouts and error messages."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from ast_core import data
from ast_core.data import DatasetSplits, load_dataset, stratified_split
from ast_core.settings import DATASETS, IMAGENET_SUBSETS

HAS_FMNIST = all((data.FASHION_MNIST_SYSTEM_DIR / f"{stem}.gz").is_file() for stem in data._IDX_FILES)


@pytest.fixture(scope="module")
def fmnist(tmp_path_factory: pytest.TempPathFactory) -> DatasetSplits:
    if not HAS_FMNIST:
        pytest.skip(f"Fashion-MNIST not installed in {data.FASHION_MNIST_SYSTEM_DIR}")
    return load_dataset("fashion_mnist", cache_dir=tmp_path_factory.mktemp("cache"))


def _no_decode(source: object) -> None:
    raise AssertionError("decoded although a cache file should have been used")


def _write_png(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def test_fashion_mnist_sizes_and_shapes(fmnist: DatasetSplits) -> None:
    assert len(fmnist.train_x) + len(fmnist.val_x) == 60_000
    assert len(fmnist.val_x) == 6_000  # val_size=0.1
    assert fmnist.test_x.shape == (10_000, 1, 28, 28)
    assert fmnist.train_x.shape[1:] == (1, 28, 28)
    assert (fmnist.info.channels, fmnist.info.image_size, fmnist.info.num_classes) == (1, 28, 10)
    assert fmnist.train_x.dtype == torch.float32 and fmnist.train_y.dtype == torch.int64
    assert fmnist.info.class_names[0] == "T-shirt/top" and len(fmnist.info.class_names) == 10
    # Stratified: every class keeps 600 of its 6000 training images for validation.
    assert torch.bincount(fmnist.val_y).tolist() == [600] * 10


def test_fashion_mnist_normalisation_gives_zero_mean_unit_std(fmnist: DatasetSplits) -> None:
    assert fmnist.info.mean == (0.2861,) and fmnist.info.std == (0.3530,)
    assert abs(fmnist.train_x.mean().item()) < 0.01
    assert abs(fmnist.train_x.std().item() - 1.0) < 0.01


def test_fashion_mnist_split_follows_seed(fmnist: DatasetSplits, tmp_path: Path) -> None:
    cache = tmp_path
    again = load_dataset("fashion_mnist", cache_dir=cache, seed=0)
    other = load_dataset("fashion_mnist", cache_dir=cache, seed=1)
    assert torch.equal(again.val_x, fmnist.val_x) and torch.equal(again.val_y, fmnist.val_y)
    assert not torch.equal(other.val_x, fmnist.val_x)


def test_stratified_split_is_disjoint_complete_reproducible_and_balanced() -> None:
    labels = np.repeat(np.arange(4), [10, 20, 30, 40])
    keep, held = stratified_split(labels, 0.1, seed=3)
    assert len(np.intersect1d(keep, held)) == 0
    assert np.array_equal(np.sort(np.concatenate([keep, held])), np.arange(100))
    assert np.bincount(labels[held]).tolist() == [1, 2, 3, 4]
    same_keep, same_held = stratified_split(labels, 0.1, seed=3)
    assert np.array_equal(keep, same_keep) and np.array_equal(held, same_held)
    assert not np.array_equal(held, stratified_split(labels, 0.1, seed=4)[1])
    # An int count; leftovers go to the classes with the largest remainders (exact shares 0.7/1.4/2.1/2.8).
    assert np.bincount(stratified_split(labels, 7, seed=0)[1], minlength=4).sum() == 7
    assert np.bincount(labels[stratified_split(labels, 7, seed=0)[1]]).tolist() == [1, 1, 2, 3]
    assert len(stratified_split(labels, 0, seed=0)[1]) == 0


def test_digits_shapes_classes_and_carved_test_split(tmp_path: Path) -> None:
    splits = load_dataset("digits", cache_dir=tmp_path)
    assert splits.test_x.shape == (360, 1, 8, 8)  # ceil(0.2 * 1797), per class, seed 0
    assert len(splits.train_x) + len(splits.val_x) == 1797 - 360
    assert len(splits.val_x) == 144  # ceil(0.1 * 1437)
    assert splits.info.num_classes == 10 and splits.info.channels == 1 and splits.info.image_size == 8
    assert set(splits.test_y.tolist()) == set(range(10))
    # Statistics come from the whole official training set (train + val), independent of the val seed.
    digits = load_digits()
    train_pixels = digits.images[stratified_split(digits.target, 0.2, seed=0)[0]] / 16
    assert splits.info.mean == pytest.approx((train_pixels.mean(),)) and splits.info.std == pytest.approx(
        (train_pixels.std(),))
    assert abs(splits.train_x.mean().item()) < 0.05 and abs(splits.train_x.std().item() - 1) < 0.05


def test_denormalize_inverts_normalisation_to_unit_pixels(tmp_path: Path) -> None:
    splits = load_dataset("digits", cache_dir=tmp_path, val_size=0)
    digits = load_digits()
    keep, test = stratified_split(digits.target, 0.2, seed=0)
    expected = torch.from_numpy(digits.images[keep] / 16.0).float()[:, None]
    assert torch.allclose(splits.denormalize(splits.train_x), expected, atol=1e-5)
    first_test = torch.from_numpy(digits.images[test[0]] / 16).float()
    assert torch.allclose(splits.denormalize(splits.test_x[0]), first_test, atol=1e-5)  # C x H x W too
    assert torch.equal(splits.train_y, torch.from_numpy(digits.target[keep]))
    assert len(splits.val_x) == 0 and splits.val_x.shape[1:] == (1, 8, 8)


def test_unnormalised_load_keeps_unit_pixels(tmp_path: Path) -> None:
    """`normalize=False` (the input of a raw-pixel ZCA): [0, 1] pixels, identity statistics recorded."""
    splits = load_dataset("digits", cache_dir=tmp_path, val_size=0, normalize=False)
    digits = load_digits()
    keep, test = stratified_split(digits.target, 0.2, seed=0)
    assert torch.equal(splits.train_x, torch.from_numpy(digits.images[keep] / 16).float()[:, None])
    assert torch.equal(splits.test_x, torch.from_numpy(digits.images[test] / 16).float()[:, None])
    assert splits.info.mean == (0.0,) and splits.info.std == (1.0,)
    assert torch.equal(splits.denormalize(splits.train_x), splits.train_x)


def test_splits_reproducible_with_seed_and_different_with_another(tmp_path: Path) -> None:
    a = load_dataset("digits", cache_dir=tmp_path, seed=5, val_size=100)
    b = load_dataset("digits", cache_dir=tmp_path, seed=5, val_size=100)
    c = load_dataset("digits", cache_dir=tmp_path, seed=6, val_size=100)
    assert len(a.val_x) == 100
    assert torch.equal(a.val_x, b.val_x) and torch.equal(a.train_x, b.train_x)
    assert not torch.equal(a.val_x, c.val_x)
    assert torch.equal(a.test_x, c.test_x)  # the test split never depends on the val seed


def test_image_size_resizes(tmp_path: Path) -> None:
    splits = load_dataset("digits", cache_dir=tmp_path, image_size=16)
    assert splits.train_x.shape[1:] == (1, 16, 16) and splits.info.image_size == 16


def test_cache_is_reused_without_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = load_dataset("digits", cache_dir=tmp_path)
    assert len(list(tmp_path.glob("digits-*.safetensors"))) == 1
    monkeypatch.setattr(data, "_decode", _no_decode)
    second = load_dataset("digits", cache_dir=tmp_path)
    assert torch.equal(first.train_x, second.train_x) and torch.equal(first.test_y, second.test_y)
    assert first.info == second.info
    with pytest.raises(AssertionError, match="decoded"):  # another image size is another cache entry
        load_dataset("digits", cache_dir=tmp_path, image_size=9)


def test_cache_dir_defaults_to_environment_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AST_DD_CACHE", str(tmp_path / "env-cache"))
    load_dataset("digits")
    assert len(list((tmp_path / "env-cache").glob("digits-*.safetensors"))) == 1


def test_imagefolder_with_train_and_test(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    pixels = {}
    for split, count in (("train", 3), ("test", 2)):
        for cls in ("cat", "dog"):
            for i in range(count):
                pixels[split, cls, i] = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
                _write_png(tmp_path / "images" / split / cls / f"{i}.png", pixels[split, cls, i])
    splits = load_dataset(f"imagefolder:{tmp_path / 'images'}", cache_dir=tmp_path / "cache", val_size=0)
    assert splits.info.class_names == ("cat", "dog") and splits.info.channels == 3
    assert splits.train_x.shape == (6, 3, 6, 6) and splits.test_x.shape == (4, 3, 6, 6)
    assert splits.train_y.tolist() == [0, 0, 0, 1, 1, 1] and splits.test_y.tolist() == [0, 0, 1, 1]
    # Mean/std come from the training images; denormalising gives back the PNG pixels exactly.
    train = np.stack([pixels["train", cls, i] for cls in ("cat", "dog") for i in range(3)])
    assert np.allclose(splits.info.mean, (train / 255).mean(axis=(0, 1, 2)))
    restored = (splits.denormalize(splits.train_x) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
    assert np.array_equal(restored.numpy(), train)


def test_imagefolder_single_folder_carves_test(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for cls in ("a", "b"):
        for i in range(10):
            _write_png(tmp_path / "imgs" / cls / f"{i}.png", np.full((12, 16), 20 * i, dtype=np.uint8))
    name = f"imagefolder:{tmp_path / 'imgs'}"
    splits = load_dataset(name, cache_dir=tmp_path / "cache", val_size=2)
    assert splits.info.channels == 1 and splits.info.image_size == 12  # shorter side of the first image
    assert splits.test_x.shape == (4, 1, 12, 12) and splits.test_y.tolist() == [0, 0, 1, 1]
    assert splits.val_y.tolist() == [0, 1] and len(splits.train_x) == 14
    assert load_dataset(name, cache_dir=tmp_path / "cache", image_size=5).train_x.shape[-2:] == (5, 5)
    # Editing the folder changes the cache key, so the new image is decoded rather than missed.
    monkeypatch.setattr(data, "_decode", _no_decode)
    _write_png(tmp_path / "imgs" / "a" / "new.png", np.zeros((12, 16), dtype=np.uint8))
    with pytest.raises(AssertionError, match="decoded"):
        load_dataset(name, cache_dir=tmp_path / "cache")


def test_fashion_mnist_from_root_idx_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "not-installed")
    rng = np.random.default_rng(0)
    train_x, test_x = rng.integers(0, 256, (20, 28, 28)), rng.integers(0, 256, (5, 28, 28))
    train_y, test_y = np.arange(20) % 10, np.arange(5)
    for stem, array in zip(data._IDX_FILES, (train_x, train_y, test_x, test_y), strict=True):
        _write_idx(tmp_path / f"{stem}.gz", array)
    splits = load_dataset("fashion_mnist", root=tmp_path, cache_dir=tmp_path / "cache", val_size=0,
                          download=False)
    assert splits.test_y.tolist() == test_y.tolist() and splits.train_y.tolist() == train_y.tolist()
    restored = (splits.denormalize(splits.test_x) * 255).round()[:, 0]
    assert np.array_equal(restored.numpy().astype(np.int64), test_x)


def test_mnist_from_torchvision_layout(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(1)
    test_x = rng.integers(0, 256, (4, 28, 28))
    arrays = (rng.integers(0, 256, (10, 28, 28)), np.arange(10), test_x, np.array([3, 1, 4, 1]))
    for stem, array in zip(data._IDX_FILES, arrays, strict=True):
        _write_idx(raw / f"{stem}.gz", array)
        # torchvision reads the uncompressed files.
        (raw / stem).write_bytes(gzip.decompress((raw / f"{stem}.gz").read_bytes()))
    splits = load_dataset("mnist", root=tmp_path, cache_dir=tmp_path / "cache", val_size=0, download=False)
    assert splits.info.class_names == tuple("0123456789") and splits.info.mean == (0.1307,)
    assert splits.test_y.tolist() == [3, 1, 4, 1] and splits.train_x.shape == (10, 1, 28, 28)
    restored = (splits.denormalize(splits.test_x) * 255).round()[:, 0]
    assert np.array_equal(restored.numpy().astype(np.int64), test_x)


def test_tiny_imagenet_layout(tmp_path: Path) -> None:
    root = tmp_path / "tiny-imagenet-200"
    wnids = ("n01443537", "n01629819")
    for wnid in wnids:
        folder = root / "train" / wnid / "images"
        folder.mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (64, 64), (i * 40, 0, 0)).save(folder / f"{wnid}_{i}.JPEG")
    (root / "val" / "images").mkdir(parents=True)
    lines = []
    for i, wnid in enumerate((wnids[1], wnids[0], wnids[1])):
        Image.new("RGB", (64, 64)).save(root / "val" / "images" / f"val_{i}.JPEG")
        lines.append(f"val_{i}.JPEG\t{wnid}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    (root / "words.txt").write_text("n01443537\tgoldfish, Carassius auratus\n"
                                    "n01629819\tEuropean fire salamander\n")
    splits = load_dataset("tiny_imagenet", root=tmp_path, cache_dir=tmp_path / "cache", val_size=0)
    assert splits.info.class_names == ("goldfish", "European fire salamander")
    assert splits.train_x.shape == (6, 3, 64, 64) and splits.train_y.tolist() == [0, 0, 0, 1, 1, 1]
    assert splits.test_y.tolist() == [1, 0, 1]
    assert splits.info.mean == (0.485, 0.456, 0.406)


def test_imagenet_subset_layout_and_label_order(tmp_path: Path) -> None:
    wnids = IMAGENET_SUBSETS["imagewoof"]
    for split in ("train", "val"):
        for i, wnid in enumerate(wnids):
            (tmp_path / split / wnid).mkdir(parents=True)
            Image.new("RGB", (40, 30), (i * 20, 0, 0)).save(tmp_path / split / wnid / f"{wnid}_0.JPEG")
    splits = load_dataset("imagewoof", root=tmp_path, cache_dir=tmp_path / "cache", val_size=0,
                          image_size=16)
    assert splits.train_x.shape == (10, 3, 16, 16) and splits.test_x.shape == (10, 3, 16, 16)
    assert splits.train_y.tolist() == list(range(10))  # label i is the i-th wnid of MTT's list
    assert splits.info.class_names[0] == "Australian terrier"


def test_imagenet_subsets_are_ten_distinct_wnids_matching_torchvision_imagenette() -> None:
    from torchvision.datasets import Imagenette

    assert all(len(set(w)) == 10 and all(x.startswith("n") and len(x) == 9 for x in w)
               for w in IMAGENET_SUBSETS.values())
    assert set(IMAGENET_SUBSETS["imagenette"]) == set(Imagenette._WNID_TO_CLASS)
    assert set(IMAGENET_SUBSETS) <= set(DATASETS)


def test_unknown_name_lists_allowed_names(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"name='cifar11'.*fashion_mnist.*imagefolder:PATH"):
        load_dataset("cifar11", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="name='imagefolder:'"):
        load_dataset("imagefolder:", cache_dir=tmp_path)


@pytest.mark.parametrize("val_size", [-1, 1.0, 1.5, -0.1, True, "0.1", None])
def test_bad_val_size_is_rejected(val_size: object, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="val_size"):
        load_dataset("digits", cache_dir=tmp_path, val_size=val_size)


def test_val_size_count_too_large_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"val_size=1437 .* at least one must stay"):
        load_dataset("digits", cache_dir=tmp_path, val_size=1437)


def test_missing_files_say_where_and_how(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "empty"
    with pytest.raises(FileNotFoundError, match=r"files not found and download=False.*pass download=True"):
        load_dataset("cifar10", root=empty, cache_dir=tmp_path, download=False)
    monkeypatch.setattr(data, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "not-installed")
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion_mnist", root=empty, cache_dir=tmp_path, download=False)
    with pytest.raises(FileNotFoundError, match=r"tiny-imagenet-200\.zip"):
        load_dataset("tiny_imagenet", root=empty, cache_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match=r"train/n01440764.*pass root="):
        load_dataset("imagenette", cache_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset(f"imagefolder:{empty}", cache_dir=tmp_path)
    assert not list(tmp_path.glob("*.safetensors"))
