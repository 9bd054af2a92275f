"""Networks the stages share: the student architecture, a trained expert's final network, and the spec of the
evaluation networks (validation during distillation, test afterwards), all of `model.width` and `model.depth`."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from ast_core.data import DatasetInfo
from ast_core.models import FlatModel, batched_features, build_model
from ast_core.settings import EvalSpec
from ast_core.trajectory import expert_path, load_trajectory
from pipeline.layout import buffer_dir
from pipeline.params import Params

FEATURE_CHUNK = 4096  # images per progress-bar update of `expert_features`


def student(params: Params, info: DatasetInfo) -> nn.Module:
    return build_model(params.model.arch, info.channels, info.num_classes, info.image_size,
                       width=params.model.width, depth=params.model.depth)


def eval_spec(params: Params, split: Literal["test", "val"], arch: str | None = None) -> EvalSpec:
    """How the pipeline scores a set: every caller of `evaluate_synthetic`/`train_on_real` builds its spec here.

    "val" is model selection during distillation (`distill.eval_models` networks, `distill.eval_iterations`);
    "test" is the reported score (`evaluate.num_models`, `evaluate.iterations`). Both use `evaluate.protocol`
    and `evaluate.batch_size`, and networks of `model.width` and `model.depth`, like the student and the
    experts; `arch` (default `model.arch`) is another architecture for cross-architecture transfer.
    """
    selection = split == "val"
    return EvalSpec(arch=arch or params.model.arch, width=params.model.width, depth=params.model.depth,
                    protocol=params.evaluate.protocol,
                    iterations=params.distill.eval_iterations if selection else params.evaluate.iterations,
                    num_models=params.distill.eval_models if selection else params.evaluate.num_models,
                    batch_size=params.evaluate.batch_size, eval_split=split)


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


def expert_features(expert: nn.Module, images: torch.Tensor, device: torch.device, label: str) -> torch.Tensor:
    """The expert's features (`embed`) of every image, computed in chunks under a labelled progress bar."""
    parts = []
    with tqdm(total=len(images), desc=label, unit="image", unit_scale=True) as bar:
        for chunk in images.split(FEATURE_CHUNK):
            parts.append(batched_features(lambda x: expert.embed(x.to(device)).cpu(), chunk))
            bar.update(len(chunk))
    return torch.cat(parts)
