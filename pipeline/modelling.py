"""Networks the stages share: the student architecture and a trained expert's final network."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ast_core.data import DatasetInfo
from ast_core.models import FlatModel, build_model
from ast_core.trajectory import expert_path, load_trajectory
from pipeline.layout import buffer_dir
from pipeline.params import Params


def student(params: Params, info: DatasetInfo) -> nn.Module:
    return build_model(params.model.arch, info.channels, info.num_classes, info.image_size,
                       width=params.model.width, depth=params.model.depth)


def final_expert(params: Params, info: DatasetInfo, variant: str, index: int,
                 device: torch.device, folder: Path | None = None) -> nn.Module:
    """The expert's network at its last epoch, in eval mode on `device` (AST IV-C1's well-trained model).

    `folder` holds the variant's experts (default: the pipeline's `buffer_dir(variant)`)."""
    path = expert_path(folder if folder is not None else buffer_dir(variant), index)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run the buffer stage for variant {variant!r} first")
    trajectory = load_trajectory(path)
    flat_model = FlatModel(student(params, info))
    flat_model.load_into_module(trajectory.at(float(trajectory.num_epochs)).float())
    return flat_model.module.to(device).eval()
