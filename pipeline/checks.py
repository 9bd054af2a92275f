"""Checks a stage runs before it computes, on what the settings alone cannot tell (`pipeline.params` validates
those): the data suit the settings and the experts asked for are stored (`pipeline.outputs`: the output
folders can be written).

Each costs a fraction of a second and fails naming the key, so a bad combination stops in the first second of a
stage, not after the experts are trained.
"""

from __future__ import annotations

import torch

from ast_core.data import DatasetSplits
from ast_core.trajectory import convex_tag, list_buffer
from pipeline.layout import buffer_dir, convex_dir
from pipeline.params import Params
from pipeline.schema import ParamsError

MIN_CLASSES = 2


def check_data(params: Params, data: DatasetSplits) -> None:
    """At least two classes, and no `distill.ipcs` value above the smallest class of the training split (the
    initial sets and the coreset baselines draw ipc real images per class from it)."""
    info = data.info
    if info.num_classes < MIN_CLASSES:
        raise ParamsError(f"data.dataset: {params.data.dataset} has {info.num_classes} class "
                          f"({', '.join(info.class_names)}); distillation needs at least {MIN_CLASSES} (an image "
                          "folder needs one sub-folder of images per class)")
    counts = torch.bincount(data.train_y, minlength=info.num_classes)
    smallest = int(counts.argmin())
    available = int(counts[smallest])
    too_many = [ipc for ipc in params.distill.ipcs if ipc > available]
    if too_many:
        raise ParamsError(f"distill.ipcs: {too_many} asks for more images per class than the smallest class "
                          f"({info.class_names[smallest]!r}) has in the training split of {params.data.dataset} "
                          f"({available} after the data.val_size split); use at most {available}")


def check_experts(params: Params, variant: str, mct_anchors: int | None) -> None:
    """The buffer `variant` (its `mct_anchors`-anchor copies when given) holds the experts distillation will
    sample from: `distill.num_experts`, or all `buffer.num_experts` when it is null."""
    wanted = params.distill.num_experts or params.buffer.num_experts
    key = "distill.num_experts" if params.distill.num_experts else "distill.num_experts (null: buffer.num_experts)"
    if mct_anchors is None:
        folder, tag, remedy = buffer_dir(variant), None, f"`ast-dd buffer --variant {variant}`"
    else:
        folder, tag = convex_dir(variant), convex_tag(mct_anchors, params.buffer.mct_beta)
        remedy = f"`ast-dd buffer --variant {variant}`, then `ast-dd convexify --variant {variant}`"
    stored = len(list_buffer(folder, tag)) if folder.is_dir() else 0
    if stored < wanted:
        raise ParamsError(f"{key}: {wanted} experts are asked for but {folder} holds {stored}"
                          f"{f' {tag} copies' if tag else ''}; run {remedy} to make the missing ones, or lower "
                          "distill.num_experts")
