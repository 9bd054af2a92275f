"""Dataset loading: decoded once into a uint8 cache, then split, normalised and returned as tensors.

Every dataset ends up as float32 `N x C x H x W` tensors normalised with per-channel mean/std (docs/method.md
section 1; the fixed statistics follow the MTT reference code), or left as [0, 1] pixels (`normalize=False`,
what the MTT/AST code feeds its ZCA), and int64 labels. A validation split is carved from the training set
per class with an explicit seed, so splits are disjoint and repeatable.

Decoding (IDX files, torchvision archives, JPEG folders) is the slow part, so its result (uint8 images,
labels, class names) is stored once per dataset name + source + image size as a safetensors file in the
cache folder (`cache_dir`, else `$AST_DD_CACHE`, else `~/.cache/ast-dd`). Later loads read that file only;
an unreadable one (truncated, foreign) is decoded again and rewritten. An image file that cannot be decoded is a
ValueError naming it.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import logging
import math
import os
import struct
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import Tensor

from ast_core.io import atomic_write_safetensors
from ast_core.settings import DATASETS, IMAGENET_SUBSETS

_WNID_NAMES: dict[str, str] = {
    "n01440764": "tench", "n02102040": "English springer", "n02979186": "cassette player",
    "n03000684": "chain saw", "n03028079": "church", "n03394916": "French horn",
    "n03417042": "garbage truck", "n03425413": "gas pump", "n03445777": "golf ball",
    "n03888257": "parachute",
    "n02096294": "Australian terrier", "n02093754": "Border terrier", "n02111889": "Samoyed",
    "n02088364": "beagle", "n02086240": "Shih-Tzu", "n02089973": "English foxhound",
    "n02087394": "Rhodesian ridgeback", "n02115641": "dingo", "n02099601": "golden retriever",
    "n02105641": "Old English sheepdog",
    "n07753275": "pineapple", "n07753592": "banana", "n07745940": "strawberry", "n07747607": "orange",
    "n07749582": "lemon", "n07768694": "pomegranate", "n07753113": "fig", "n07720875": "bell pepper",
    "n07718472": "cucumber", "n07742313": "Granny Smith",
    "n02123045": "tabby cat", "n02123159": "tiger cat", "n02123394": "Persian cat",
    "n02123597": "Siamese cat", "n02124075": "Egyptian cat", "n02129165": "lion", "n02129604": "tiger",
    "n02128925": "jaguar", "n02128757": "snow leopard", "n02127052": "lynx",
    "n01806143": "peacock", "n02007558": "flamingo", "n01818515": "macaw", "n02051845": "pelican",
    "n02056570": "king penguin", "n01614925": "bald eagle", "n01843383": "toucan", "n01518878": "ostrich",
    "n01860187": "black swan", "n01819313": "sulphur-crested cockatoo",
    "n02206856": "bee", "n12057211": "yellow lady's slipper", "n12144580": "corn",
    "n04146614": "school bus", "n03530642": "honeycomb", "n01773157": "black and gold garden spider",
    "n01531178": "goldfinch",
}

FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
CARVED_TEST_FRACTION = 0.2  # test split carved (seed 0) where a dataset has no official one

_IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "fashion_mnist": ((0.2861,), (0.3530,)),
    "mnist": ((0.1307,), (0.3081,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": ((0.5071, 0.4866, 0.4409), (0.2673, 0.2564, 0.2762)),
    "svhn": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
    "tiny_imagenet": _IMAGENET_STATS,
    **{subset: _IMAGENET_STATS for subset in IMAGENET_SUBSETS},
}
_FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_DIGIT_CLASSES = tuple(str(d) for d in range(10))
_FIXED_CLASS_NAMES = {"fashion_mnist": _FASHION_CLASSES, "mnist": _DIGIT_CLASSES, "svhn": _DIGIT_CLASSES}
_IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
              "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
_TORCHVISION_CLASSES = {"fashion_mnist": "FashionMNIST", "mnist": "MNIST", "cifar10": "CIFAR10",
                        "cifar100": "CIFAR100", "svhn": "SVHN"}
_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_GRAYSCALE_MODES = ("1", "L", "LA", "I", "I;16", "F")
_CACHE_FORMAT = "1"  # part of every cache key: bump it when the cached content changes meaning
_FOLDER_PREFIX = "imagefolder:"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a dataset: shape, classes and the normalisation in use.

    `mean`/`std` are 0 and 1 per channel when the images are left as [0, 1] pixels (no normalisation).
    """

    name: str
    num_classes: int
    channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...]


class SealedSplitError(RuntimeError):
    """Raised when code that must select on validation only (distillation) touches the test split."""


class SealedSplit:
    """Stands in for the test tensors where they must not be read: any use raises `SealedSplitError`."""

    def __init__(self, reason: str) -> None:
        self._reason = reason

    def _refuse(self, *_: object) -> None:
        raise SealedSplitError(f"the test split is sealed here: {self._reason}")

    def __getattr__(self, name: str) -> None:
        self._refuse()

    __getitem__ = __len__ = __iter__ = __array__ = _refuse


@dataclass
class DatasetSplits:
    """Float32 `N x C x H x W` images (normalised with `info.mean`/`std`) and int64 labels per split."""

    info: DatasetInfo
    train_x: Tensor
    train_y: Tensor
    val_x: Tensor
    val_y: Tensor
    test_x: Tensor
    test_y: Tensor

    def denormalize(self, x: Tensor) -> Tensor:
        """Undo the mean/std normalisation of `C x H x W` or `N x C x H x W` images: [0, 1] pixels.

        Not clamped, so it is the exact inverse; clamp before saving if `x` may leave the pixel range.
        """
        mean = torch.tensor(self.info.mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        std = torch.tensor(self.info.std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        return x * std + mean

    def without_test(self, reason: str) -> DatasetSplits:
        """The same splits with the test split sealed (`SealedSplit`): for model selection, which must never
        read test; `reason` goes into the error a stray access raises."""
        return replace(self, test_x=SealedSplit(reason), test_y=SealedSplit(reason))  # type: ignore[arg-type]


@dataclass
class _Source:
    """Where a dataset's files are: `kind` picks the decoder; `key` identifies the content for the cache."""

    name: str
    kind: str  # "idx" | "torchvision" | "digits" | "files"
    key: str
    path: Path | None = None
    download: bool = False
    size: int | None = None
    train_files: list[tuple[Path, int]] = field(default_factory=list)
    test_files: list[tuple[Path, int]] = field(default_factory=list)
    class_names: tuple[str, ...] = ()


@dataclass
class _Raw:
    """Decoded dataset as cached: uint8 images in [0, pixel_max], int64 labels, class names."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    class_names: tuple[str, ...]
    pixel_max: int


def load_dataset(
    name: str,
    root: str | os.PathLike | None = None,
    val_size: float | int = 0.1,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    download: bool = True,
    image_size: int | None = None,
    normalize: bool = True,
) -> DatasetSplits:
    """Load `name` (one of `DATASETS` or `imagefolder:PATH`) as normalised tensors with a seeded val split.

    `root` is where the raw files are (torchvision datasets default to `<cache_dir>/raw`). `val_size` is a
    fraction in (0, 1) or a count (0: empty val split), carved per class from the training set with `seed`.
    `image_size` resizes (shorter side, then centre crop); default: native size, 64 for Tiny ImageNet, 128
    for the ImageNet subsets, the first image's shorter side for image folders. Mean/std are MTT's fixed
    values, or for `digits` and image folders computed on the whole official training set. `normalize=False`
    keeps [0, 1] pixels (mean 0, std 1 recorded), the input the MTT/AST code fits its ZCA on.
    """
    _check_arguments(name, val_size, seed, image_size)
    cache = Path(cache_dir or os.environ.get("AST_DD_CACHE") or Path.home() / ".cache" / "ast-dd")
    source = _resolve_source(name, None if root is None else Path(root), cache, download, image_size)
    raw = _cached_raw(source, cache)
    train_idx, val_idx = stratified_split(raw.train_y.numpy(), val_size, seed)
    train = torch.from_numpy(train_idx)
    train_x = raw.train_x[train]
    mean, std = _normalisation(name, raw, normalize)
    info = DatasetInfo(name=name, num_classes=len(raw.class_names), channels=raw.train_x.shape[1],
                       image_size=raw.train_x.shape[-1], mean=mean, std=std, class_names=raw.class_names)

    def normalise(x: Tensor) -> Tensor:
        out = x.to(torch.float32).div_(raw.pixel_max)
        return out.sub_(torch.tensor(mean).view(-1, 1, 1)).div_(torch.tensor(std).view(-1, 1, 1))

    val = torch.from_numpy(val_idx)
    return DatasetSplits(info=info, train_x=normalise(train_x), train_y=raw.train_y[train],
                         val_x=normalise(raw.train_x[val]), val_y=raw.train_y[val],
                         test_x=normalise(raw.test_x), test_y=raw.test_y)


def _normalisation(name: str, raw: _Raw, normalize: bool) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel (mean, std) to normalise with: MTT's fixed values, computed ones, or the identity."""
    if not normalize:
        channels = raw.train_x.shape[1]
        return (0.0,) * channels, (1.0,) * channels
    return _STATS[name] if name in _STATS else _pixel_stats(raw.train_x, raw.pixel_max)


def stratified_split(labels: np.ndarray, val_size: float | int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices `0..len(labels)-1` into sorted, disjoint (keep, held_out) arrays, per class.

    `val_size` is a fraction in (0, 1) (held-out count rounded up, as in scikit-learn) or an int count.
    Each class gives its share of the held-out count (largest remainders get the leftovers), so class
    proportions are kept; the choice inside a class is a seeded permutation, hence reproducible.
    """
    labels = np.asarray(labels)
    n = len(labels)
    n_val = math.ceil(val_size * n) if isinstance(val_size, float) and val_size > 0 else int(val_size)
    if not 0 <= n_val < n:
        raise ValueError(f"val_size={val_size!r} asks for {n_val} of {n} training samples; "
                         f"at least one must stay in the training split")
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * n_val / n
    per_class = np.floor(exact).astype(int)
    leftovers = np.argsort(-(exact - per_class), kind="stable")[: n_val - per_class.sum()]
    per_class[leftovers] += 1
    rng = np.random.default_rng(seed)
    keep, held = [], []
    for cls, k in zip(classes, per_class, strict=True):
        members = rng.permutation(np.flatnonzero(labels == cls))
        held.append(members[:k])
        keep.append(members[k:])
    return np.sort(np.concatenate(keep)), np.sort(np.concatenate(held))


def _check_arguments(name: object, val_size: object, seed: object, image_size: object) -> None:
    """Reject bad arguments with a message naming the parameter, its value and what is allowed."""
    is_folder = isinstance(name, str) and name.startswith(_FOLDER_PREFIX) and name != _FOLDER_PREFIX
    if not (is_folder or name in DATASETS):
        raise ValueError(f"name={name!r} is not a known dataset; allowed: {', '.join(DATASETS)}, "
                         f"or 'imagefolder:PATH' for a folder of class sub-folders")
    fraction_ok = isinstance(val_size, float) and (0 < val_size < 1 or val_size == 0)
    count_ok = isinstance(val_size, int) and not isinstance(val_size, bool) and val_size >= 0
    if not (fraction_ok or count_ok):
        raise ValueError(f"val_size={val_size!r} must be a fraction in (0, 1) or a non-negative int count")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed={seed!r} must be a non-negative int")
    if image_size is not None and (not isinstance(image_size, int) or isinstance(image_size, bool)
                                   or image_size < 1):
        raise ValueError(f"image_size={image_size!r} must be None (dataset default) or a positive int")


def _resolve_source(name: str, root: Path | None, cache: Path, download: bool, size: int | None) -> _Source:
    """Find the raw files for `name` (cheap: paths and listings only) or say where to put them."""
    if name == "digits":
        return _Source(name, "digits", key="sklearn.datasets.load_digits", size=size)
    if name in ("fashion_mnist", "mnist"):
        candidates = [FASHION_MNIST_SYSTEM_DIR] if name == "fashion_mnist" else []
        for folder in candidates + ([root] if root else []):
            if all(_idx_file(folder, stem) for stem in _IDX_FILES):
                return _Source(name, "idx", key=f"idx:{folder.resolve()}", path=folder, size=size)
    if name in _TORCHVISION_CLASSES:
        folder = root or cache / "raw"
        return _Source(name, "torchvision", key=f"torchvision:{folder.resolve()}", path=folder,
                       download=download, size=size)
    if name == "tiny_imagenet":
        return _tiny_imagenet_source(root, size or 64)
    if name in IMAGENET_SUBSETS:
        return _imagenet_subset_source(name, root, size or 128)
    return _image_folder_source(name, Path(name.removeprefix(_FOLDER_PREFIX)), size)


def _tiny_imagenet_source(root: Path | None, size: int) -> _Source:
    """List Tiny ImageNet's train images and its official val set (used as the test split)."""
    folder = root / "tiny-imagenet-200" if root and (root / "tiny-imagenet-200").is_dir() else root
    annotations = folder / "val" / "val_annotations.txt" if folder else None
    if folder is None or not (folder / "train").is_dir() or not annotations.is_file():
        raise FileNotFoundError(
            f"tiny_imagenet: no 'tiny-imagenet-200' folder at root={root} (expected "
            f"train/<wnid>/images/*.JPEG and val/val_annotations.txt); download and unzip "
            f"{TINY_IMAGENET_URL}, then pass root=<that folder>")
    wnids = sorted(p.name for p in (folder / "train").iterdir() if p.is_dir())
    label = {wnid: i for i, wnid in enumerate(wnids)}
    train = [(path, label[wnid]) for wnid in wnids
             for path in _image_files(folder / "train" / wnid / "images")]
    test = []
    for line in annotations.read_text().splitlines():
        if line.strip():
            file_name, wnid = line.split("\t")[:2]
            test.append((folder / "val" / "images" / file_name, label[wnid]))
    words = folder / "words.txt"
    names = {}
    if words.is_file():
        names = dict(line.split("\t", 1) for line in words.read_text().splitlines() if "\t" in line)
    class_names = tuple(names.get(wnid, wnid).split(",")[0].strip() for wnid in wnids)
    return _files_source("tiny_imagenet", f"tiny:{folder.resolve()}", size, train, test, class_names)


def _imagenet_subset_source(name: str, root: Path | None, size: int) -> _Source:
    """List the 10 classes of an MTT ImageNet subset from `root/{train,val}/<wnid>/`."""
    wnids = IMAGENET_SUBSETS[name]
    missing = [str(Path(split) / wnid) for split in ("train", "val") for wnid in wnids
               if root is None or not (root / split / wnid).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"{name}: ImageNet class folders missing under root={root}: {', '.join(missing[:4])}"
            f"{' ...' if len(missing) > 4 else ''}; pass root=<ImageNet folder> holding train/<wnid>/*.JPEG "
            f"and val/<wnid>/*.JPEG (val sorted into class folders, as torchvision.datasets.ImageNet does)")
    train = [(path, i) for i, wnid in enumerate(wnids) for path in _image_files(root / "train" / wnid)]
    test = [(path, i) for i, wnid in enumerate(wnids) for path in _image_files(root / "val" / wnid)]
    class_names = tuple(_WNID_NAMES[wnid] for wnid in wnids)
    return _files_source(name, f"imagenet:{root.resolve()}", size, train, test, class_names)


def _image_folder_source(name: str, folder: Path, size: int | None) -> _Source:
    """List an ImageFolder tree: `train/` (+ optional `test/`), or one folder to carve a test split from."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{name}: folder {folder} does not exist; expected class sub-folders of "
                                f"images, directly or under {folder}/train (and optionally {folder}/test)")
    train_dir = folder / "train" if (folder / "train").is_dir() else folder
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir() and _image_files(p))
    if not classes:
        raise FileNotFoundError(f"{name}: no class sub-folders with images ({', '.join(_IMAGE_EXTENSIONS)}) "
                                f"in {train_dir}")
    train = [(path, i) for i, cls in enumerate(classes) for path in _image_files(train_dir / cls)]
    test_dir = folder / "test"
    test = []
    if train_dir != folder and test_dir.is_dir():
        unknown = sorted({p.name for p in test_dir.iterdir() if p.is_dir()} - set(classes))
        if unknown:
            raise ValueError(f"{name}: test classes {unknown} have no training folder in {train_dir}")
        test = [(path, i) for i, cls in enumerate(classes) for path in _image_files(test_dir / cls)]
    if size is None:
        with _opened(train[0][0]) as first:
            size = min(first.size)
    return _files_source(name, f"imagefolder:{folder.resolve()}", size, train, test, tuple(classes))


def _files_source(name: str, where: str, size: int, train: list[tuple[Path, int]],
                  test: list[tuple[Path, int]], class_names: tuple[str, ...]) -> _Source:
    """A source of image files; its cache key covers each file's name, size and mtime, so edits invalidate."""
    digest = hashlib.sha256()
    for split, files in (("train", train), ("test", test)):
        for path, label in files:
            stat = path.stat()
            digest.update(f"{split}\t{path}\t{label}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return _Source(name, "files", key=f"{where}:{digest.hexdigest()}", size=size,
                   train_files=train, test_files=test, class_names=class_names)


def _image_files(folder: Path) -> list[Path]:
    """Image files directly inside `folder`, sorted by name (empty if it does not exist)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in _IMAGE_EXTENSIONS and p.is_file())


def _cached_raw(source: _Source, cache: Path) -> _Raw:
    """Read the decoded dataset from the cache, decoding and storing it first if absent or unreadable."""
    key = f"{_CACHE_FORMAT}|{source.name}|{source.key}|{source.size}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    slug = "imagefolder" if source.name.startswith(_FOLDER_PREFIX) else source.name
    path = cache / f"{slug}-{source.size or 'native'}-{digest}.safetensors"
    if path.is_file():
        try:
            return _read_cache(path)
        except (SafetensorError, OSError, KeyError, TypeError, ValueError) as error:  # truncated or foreign
            log.warning("cached dataset %s is unreadable (%s): decoding the dataset again to rebuild it", path, error)
    raw = _decode(source)
    tensors = {k: getattr(raw, k).contiguous() for k in ("train_x", "train_y", "test_x", "test_y")}
    meta = {"class_names": json.dumps(list(raw.class_names)), "pixel_max": str(raw.pixel_max),
            "source": source.key}  # `source` is for people inspecting the file
    atomic_write_safetensors(path, tensors, meta)
    return raw


def _read_cache(path: Path) -> _Raw:
    """The decoded dataset stored at `path` by `_cached_raw`."""
    tensors = load_file(path)
    with safe_open(path, framework="pt") as handle:
        meta = handle.metadata()
    return _Raw(tensors["train_x"], tensors["train_y"], tensors["test_x"], tensors["test_y"],
                tuple(json.loads(meta["class_names"])), int(meta["pixel_max"]))


def _decode(source: _Source) -> _Raw:
    """Decode a source's raw files into uint8 tensors (the slow step that the cache skips)."""
    if source.kind == "idx":
        arrays = [_read_idx(_idx_file(source.path, stem)) for stem in _IDX_FILES]
        tensors = (torch.from_numpy(a.astype(np.int64) if a.ndim == 1 else a[:, None].copy()) for a in arrays)
        raw = _Raw(*tensors, class_names=_FIXED_CLASS_NAMES[source.name], pixel_max=255)
    elif source.kind == "torchvision":
        raw = _decode_torchvision(source)
    elif source.kind == "digits":
        raw = _decode_digits()
    else:
        train_x = _read_images([p for p, _ in source.train_files], source.size)
        train_y = torch.tensor([y for _, y in source.train_files], dtype=torch.int64)
        if source.test_files:
            test_x = _read_images([p for p, _ in source.test_files], source.size, mode=_mode_of(train_x))
            test_y = torch.tensor([y for _, y in source.test_files], dtype=torch.int64)
            raw = _Raw(train_x, train_y, test_x, test_y, source.class_names, pixel_max=255)
        else:
            raw = _carve_test(train_x, train_y, source.class_names, pixel_max=255)
    if source.size is not None and source.kind != "files" and raw.train_x.shape[-1] != source.size:
        raw.train_x, raw.test_x = _resize(raw.train_x, source.size), _resize(raw.test_x, source.size)
    return raw


def _idx_file(folder: Path, stem: str) -> Path | None:
    """The IDX file `stem` in `folder`, gzipped or not, if present."""
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    return None


def _read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (the MNIST format: 0, 0, dtype 0x08 = uint8, ndim, big-endian uint32 dims, data)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (header {data[:4]!r})")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    if len(data) - 4 - 4 * ndim != math.prod(dims):
        raise ValueError(f"{path}: IDX header says {dims} but {len(data) - 4 - 4 * ndim} data bytes follow")
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _decode_torchvision(source: _Source) -> _Raw:
    """Read (downloading if allowed) a torchvision dataset and take its uint8 arrays."""
    import torchvision.datasets as tvd

    cls = getattr(tvd, _TORCHVISION_CLASSES[source.name])
    try:
        if source.name == "svhn":
            train, test = (cls(str(source.path), split=s, download=source.download)
                           for s in ("train", "test"))
        else:
            train, test = (cls(str(source.path), train=t, download=source.download) for t in (True, False))
    except (RuntimeError, OSError) as exc:
        hint = (f" or `apt-get install dataset-fashion-mnist` (IDX .gz files in {FASHION_MNIST_SYSTEM_DIR})"
                if source.name == "fashion_mnist" else "")
        action = "download failed (no network?)" if source.download else "files not found and download=False"
        raise FileNotFoundError(
            f"{source.name}: {action} in torchvision's layout under root={source.path}; pass download=True, "
            f"or root=<folder already holding the {_TORCHVISION_CLASSES[source.name]} files>{hint}. "
            f"torchvision said: {exc}") from exc

    def arrays(dataset: Any) -> tuple[Tensor, Tensor]:
        images = torch.as_tensor(np.asarray(dataset.data))
        if images.ndim == 3:  # MNIST-style N x H x W
            images = images[:, None]
        elif images.shape[-1] == 3:  # CIFAR stores N x H x W x C
            images = images.permute(0, 3, 1, 2)
        labels = dataset.labels if source.name == "svhn" else dataset.targets
        return images.contiguous(), torch.as_tensor(np.asarray(labels), dtype=torch.int64)

    class_names = _FIXED_CLASS_NAMES.get(source.name) or tuple(train.classes)
    return _Raw(*arrays(train), *arrays(test), class_names=class_names, pixel_max=255)


def _decode_digits() -> _Raw:
    """scikit-learn's 8x8 digits (values 0..16) with a fixed stratified test split carved with seed 0."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.uint8))[:, None]
    return _carve_test(images, torch.from_numpy(digits.target.astype(np.int64)), _DIGIT_CLASSES, pixel_max=16)


def _carve_test(x: Tensor, y: Tensor, class_names: tuple[str, ...], pixel_max: int) -> _Raw:
    """Split a dataset without an official test set: `CARVED_TEST_FRACTION` per class, seed 0."""
    keep, test = (torch.from_numpy(i) for i in stratified_split(y.numpy(), CARVED_TEST_FRACTION, seed=0))
    return _Raw(x[keep], y[keep], x[test], y[test], class_names, pixel_max)


def _mode_of(images: Tensor) -> str:
    return "L" if images.shape[1] == 1 else "RGB"


def _read_images(paths: Sequence[Path], size: int, mode: str | None = None) -> Tensor:
    """Decode image files (threads: PIL releases the GIL) into a uint8 `N x C x size x size` tensor.

    `mode` defaults to grayscale if the first image is, else RGB; every image is converted to it.
    """
    if mode is None:
        with _opened(paths[0]) as first:
            mode = "L" if first.mode in _GRAYSCALE_MODES else "RGB"

    def read(path: Path) -> np.ndarray:
        with _opened(path) as img:
            return np.asarray(_square(img.convert(mode), size))

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        arrays = list(pool.map(read, paths))
    stacked = torch.from_numpy(np.stack(arrays))
    return stacked[:, None] if mode == "L" else stacked.permute(0, 3, 1, 2).contiguous()


@contextlib.contextmanager
def _opened(path: Path) -> Iterator[Image.Image]:
    """`Image.open(path)`; a file PIL cannot decode (broken, truncated, not an image) is a ValueError naming it."""
    try:
        with Image.open(path) as img:
            yield img
    except (OSError, SyntaxError) as error:  # PIL: UnidentifiedImageError, "image file is truncated", ...
        raise ValueError(f"{path} is not a readable image ({error}); replace or delete the file") from error


def _square(img: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to `size` (bilinear, antialiased) and centre-crop a square, as MTT does."""
    width, height = img.size
    if min(width, height) != size:
        scale = size / min(width, height)
        img = img.resize((max(size, round(width * scale)), max(size, round(height * scale))),
                         Image.Resampling.BILINEAR)
        width, height = img.size
    left, top = round((width - size) / 2), round((height - size) / 2)
    return img.crop((left, top, left + size, top + size))


def _resize(images: Tensor, size: int) -> Tensor:
    """Resize square uint8 images to `size` x `size` (bilinear, antialiased), staying uint8."""
    out = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def _pixel_stats(images: Tensor, pixel_max: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of [0, 1] pixels, for datasets without published statistics.

    Taken over the whole official training set (before the val split), so the normalisation is a property
    of the dataset and does not change with `seed` or `val_size`. Computed exactly from per-channel
    histograms of the uint8 values, which needs no float copy of the images.
    """
    values = torch.arange(256, dtype=torch.float64) / pixel_max
    means, stds = [], []
    for channel in range(images.shape[1]):
        counts = torch.bincount(images[:, channel].flatten(), minlength=256).to(torch.float64)
        counts /= counts.sum()
        mean = float((counts * values).sum())
        means.append(mean)
        # A constant channel (std 0) would divide by zero; the floor keeps it finite (it holds no signal).
        stds.append(max(float((counts * (values - mean) ** 2).sum()) ** 0.5, 1e-6))
    return tuple(means), tuple(stds)
