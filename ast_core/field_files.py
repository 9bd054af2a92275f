"""The field's files (docs/method.md section 11): MTT-family expert buffers in, distilled sets out and back in.

Experts. The official MTT ``buffer.py`` (and FTD's, DATM's, AST's copies of it) saves ``replay_buffer_<k>.pt``:
a list of experts, each a list of per-epoch lists of parameter tensors in ``net.parameters()`` order (epoch 0 =
initialisation). For the ConvNet that order is conv weight, conv bias, norm weight, norm bias per block, then
the classifier's weight and bias, which is `ast_core.models.ConvNet`'s (`FlatModel`) order, so an expert's
checkpoint is the concatenation of its tensors. `mtt_expert_matrix` checks count and shapes against the
student first, so a buffer of another width, depth, dataset or architecture is refused naming both;
`ast_core.expert_import` turns whole buffers into this project's expert files.

Sets. MTT's ``distill.py`` saves ``images_best.pt`` (images in the network's input space: normalised, and
ZCA-whitened when the run used ZCA), ``labels_best.pt`` (int64 class labels; DATM stores its learned label
logits there) and ``lr_best.pt`` (the learned student lr, a 0-d tensor). `export_mtt_set` writes those
three beside ``pixels_best.pt`` (the same images as [0, 1] pixels, ZCA and normalisation undone);
`export_image_folder` writes one PNG per image, one folder per class, for people and other tools.
`load_mtt_set` / `load_image_folder` read them back with checks that name the file. Every file is loaded with
``torch.load(weights_only=True)``: a file carrying code is refused, never executed.
"""

from __future__ import annotations

import io
import os
import pickle
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from ast_core.io import atomic_write_with, disk_full_error
from ast_core.models import FlatModel

MTT_SET_FILES = ("images_best.pt", "labels_best.pt", "lr_best.pt")
PIXELS_FILE = "pixels_best.pt"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def load_tensor_file(path: str | os.PathLike) -> Any:
    """`torch.load(path, weights_only=True)` on the CPU, with the project's errors: missing, damaged, or holding
    pickled objects (refused: loading them could run code)."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{file} does not exist")
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "global" not in str(error).lower():  # damaged bytes, not a refused object (torch names its global)
            raise ValueError(f"{file} is not a readable torch file ({error})") from error
        raise ValueError(f"{file} was not loaded: it holds pickled objects, not only tensors and lists, and "
                         "loading it could run code; re-save it as plain tensors") from error
    except Exception as error:
        raise ValueError(f"{file} is not a readable torch file ({type(error).__name__}: {error})") from error


# ------------------------------------------------------------------------------------------- expert buffers
def load_mtt_buffer(path: str | os.PathLike) -> list[list[list[Tensor]]]:
    """The experts of one ``replay_buffer_<k>.pt``: experts x epochs x parameter tensors, structure checked."""
    buffer = load_tensor_file(path)
    if not isinstance(buffer, list | tuple) or not buffer:
        raise ValueError(f"{path} holds {type(buffer).__name__}; an MTT replay buffer is a non-empty list of experts")
    for index, expert in enumerate(buffer):
        epochs_ok = isinstance(expert, list | tuple) and len(expert) >= 2
        if not epochs_ok or not all(isinstance(epoch, list | tuple) and epoch and all(isinstance(t, Tensor)
                                                                                   for t in epoch)
                                    for epoch in expert):
            raise ValueError(f"{path}: expert {index} is not a list of >= 2 epochs, each a list of parameter "
                             "tensors (MTT's buffer.py layout)")
    return [[list(epoch) for epoch in expert] for expert in buffer]


def _shapes(shapes: Sequence[Sequence[int]]) -> str:
    return "[" + ", ".join("x".join(map(str, s)) for s in shapes) + "]"


def mtt_expert_matrix(expert: Sequence[Sequence[Tensor]], flat_model: FlatModel, source: str,
                      network: str) -> Tensor:
    """An MTT expert as a ``[K+1, P]`` float32 matrix in `flat_model` order, after checking every epoch's
    tensor count and shapes against the student (`network` describes it and the settings that shape it)."""
    expected = [tuple(shape) for shape in flat_model.shapes]
    rows = []
    for epoch, tensors in enumerate(expert):
        found = [tuple(t.shape) for t in tensors]
        if found != expected:
            raise ValueError(
                f"{source}, epoch {epoch}: {len(found)} parameter tensors of shapes {_shapes(found)}, but the "
                f"student ({network}) has {len(expected)} of shapes {_shapes(expected)}; set model.arch, "
                "model.width and model.depth to the experts' network, and data.dataset to their dataset "
                "(channels, image size and classes shape the first and last layers)")
        if not all(torch.isfinite(t).all() for t in tensors):
            raise ValueError(f"{source}, epoch {epoch}: NaN or infinite parameters")
        rows.append(torch.cat([t.detach().reshape(-1).to(torch.float32) for t in tensors]))
    return torch.stack(rows)


# --------------------------------------------------------------------------------------------- sets: out
def _save_tensor(tensor: Tensor, path: Path) -> Path:
    """torch.save through memory, then an atomic write: saved to a path, torch names the archive's folder after
    the (temporary, random) file name, so the same tensor would give different bytes every time."""
    buffer = io.BytesIO()
    torch.save(tensor.detach().cpu().contiguous().clone(), buffer)
    return atomic_write_with(path, lambda tmp: tmp.write_bytes(buffer.getvalue()))


def export_mtt_set(folder: str | os.PathLike, images: Tensor, labels: Tensor, lr: float, pixels: Tensor) -> list[Path]:
    """Write ``images_best.pt``, ``labels_best.pt``, ``lr_best.pt`` (MTT's names and layout) and
    ``pixels_best.pt`` into `folder`; `labels` are class indices or (soft labels) label logits."""
    out = Path(folder)
    return [_save_tensor(images.float(), out / "images_best.pt"), _save_tensor(labels, out / "labels_best.pt"),
            _save_tensor(torch.tensor(float(lr)), out / "lr_best.pt"),
            _save_tensor(pixels.float(), out / PIXELS_FILE)]


def class_folders(class_names: Sequence[str]) -> list[str]:
    """Folder name of each class: its index, zero-padded, and its name made path-safe ("00_T-shirt_top"), so
    that sorting the folders (as torchvision's ImageFolder does to number classes) gives the label order."""
    digits = len(str(len(class_names) - 1))
    return [f"{i:0{digits}d}_{re.sub(r'[^A-Za-z0-9._-]+', '_', name)}" for i, name in enumerate(class_names)]


def export_image_folder(folder: str | os.PathLike, pixels: Tensor, labels: Tensor,
                        class_names: Sequence[str]) -> Path:
    """One PNG per image (``<class folder>/<index>.png``, 8-bit, grey or RGB; `class_folders`) under `folder`,
    replaced as a whole: written beside and renamed into place, so a failed export leaves the previous one."""
    target = Path(folder)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        values = (pixels.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
        folders = class_folders(class_names)
        for index, (image, label) in enumerate(zip(values, labels.tolist(), strict=True)):
            array = image.permute(1, 2, 0).numpy()
            picture = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
            (staging / folders[label]).mkdir(exist_ok=True)
            picture.save(staging / folders[label] / f"{index:05d}.png", format="PNG")
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    except Exception as error:
        if (full := disk_full_error(target, error)) is not None:
            raise full from error
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


# ---------------------------------------------------------------------------------------------- sets: in
def load_mtt_set(folder: str | os.PathLike, num_classes: int, image_shape: tuple[int, int, int]
                 ) -> tuple[Tensor, Tensor, float | None]:
    """(images, labels, lr or None) from an MTT-format folder: `labels` are int64 class indices, or soft
    labels (softmax of the stored logits) when ``labels_best.pt`` is an images x classes float matrix."""
    root = Path(folder)
    images = load_tensor_file(root / "images_best.pt")
    labels = load_tensor_file(root / "labels_best.pt")
    lr_file = root / "lr_best.pt"
    lr = load_tensor_file(lr_file) if lr_file.is_file() else None
    where = root / "images_best.pt"
    if not isinstance(images, Tensor) or images.dim() != 4 or tuple(images.shape[1:]) != image_shape:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"{where} holds {shape}; expected N x {' x '.join(map(str, image_shape))} images of "
                         "this dataset")
    if not torch.isfinite(images).all():
        raise ValueError(f"{where} holds NaN or infinite values")
    where = root / "labels_best.pt"
    if not isinstance(labels, Tensor) or labels.shape[:1] != images.shape[:1]:
        raise ValueError(f"{where} must hold one label per image ({images.shape[0]}); found "
                         f"{tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__}")
    if labels.is_floating_point():
        if tuple(labels.shape) != (images.shape[0], num_classes) or not torch.isfinite(labels).all():
            raise ValueError(f"{where} holds float labels of shape {tuple(labels.shape)}; soft labels must be a "
                             f"finite {images.shape[0]} x {num_classes} matrix of logits")
        labels = torch.softmax(labels.float(), dim=1)
    elif labels.dim() != 1 or int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise ValueError(f"{where}: class labels must be a vector of integers in [0, {num_classes}); found shape "
                         f"{tuple(labels.shape)}, range [{int(labels.min())}, {int(labels.max())}]")
    if lr is not None and not (isinstance(lr, Tensor) and lr.numel() == 1 and float(lr) > 0
                               and np.isfinite(float(lr))):
        raise ValueError(f"{lr_file} must hold one finite positive learning rate")
    return images.float(), labels if labels.is_floating_point() else labels.long(), \
        None if lr is None else float(lr)


def load_image_folder(folder: str | os.PathLike, class_names: Sequence[str], image_shape: tuple[int, int, int]
                      ) -> tuple[Tensor, Tensor]:
    """([0, 1] pixels, class labels) from ``<class folder>/<image>`` files; a folder is a class when named as
    `class_folders` names it or by the class name itself."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder")
    label_of = {**{name: i for i, name in enumerate(class_names)},
                **{name: i for i, name in enumerate(class_folders(class_names))}}
    subfolders = sorted(p for p in root.iterdir() if p.is_dir())
    unknown = [p.name for p in subfolders if p.name not in label_of]
    if unknown:
        raise ValueError(f"{root}: folders {unknown} are not classes of this dataset; name them "
                         f"{', '.join(class_folders(class_names))} (or by class name)")
    loose = sorted(p.name for p in root.iterdir() if p.is_file())
    if loose:
        raise ValueError(f"{root / loose[0]} lies outside a class folder (expected <class folder>/<image>.png)")
    channels, height, width = image_shape
    images, labels = [], []
    for subfolder in subfolders:
        label = label_of[subfolder.name]
        for path in sorted(subfolder.iterdir()):
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                raise ValueError(f"{path} is not an image file ({', '.join(IMAGE_SUFFIXES)})")
            try:
                with Image.open(path) as picture:
                    array = np.asarray(picture.convert("L" if channels == 1 else "RGB"), dtype=np.float32)
            except (UnidentifiedImageError, OSError) as error:
                raise ValueError(f"{path} is not a readable image ({error})") from error
            if array.shape[:2] != (height, width):
                raise ValueError(f"{path} is {array.shape[1]}x{array.shape[0]} pixels; this dataset's images are "
                                 f"{width}x{height}")
            tensor = torch.from_numpy(array).reshape(height, width, channels).permute(2, 0, 1) / 255.0
            images.append(tensor)
            labels.append(label)
    if not images:
        raise ValueError(f"{root} holds no images (expected <class>/<image>.png)")
    return torch.stack(images), torch.tensor(labels, dtype=torch.long)
