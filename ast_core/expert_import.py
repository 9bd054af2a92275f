"""MTT-family expert buffers as this project's expert files (docs/method.md section 11).

`import_mtt_experts` reads ``replay_buffer_<k>.pt`` files (`ast_core.field_files`), checks every checkpoint
against the student network, and writes ``expert_000.safetensors``, ... with the metadata trained experts carry
(format: `ast_core.trajectory`), so that convexify, init and distill use them unchanged. What training recorded
and the files do not hold is measured again on the checkpoints (`imported_history`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ast_core.data import DatasetSplits
from ast_core.experts import HISTORY_KEYS, PROBE_SIZE, epoch_measurements, expert_metadata, grad_norm_stats
from ast_core.field_files import load_mtt_buffer, mtt_expert_matrix
from ast_core.models import FlatModel, build_model
from ast_core.settings import ExpertConfig
from ast_core.trajectory import expert_path, save_trajectory, step_sq_norms


def imported_history(flat_model: FlatModel, matrix: Tensor, data: DatasetSplits, config: ExpertConfig,
                     device: torch.device) -> dict[str, Any]:
    """The history a trained expert stores, measured where it can be on imported checkpoints: validation and
    test accuracy and the input-gradient norm after every epoch, the norm at θ_0 and the step lengths; the
    training-time fields (lr, loss, train accuracy, penalty) are unknown (None)."""
    model = flat_model.module.to(device)
    probe = data.train_x[:PROBE_SIZE].to(device)
    history: dict[str, Any] = {key: [] for key in HISTORY_KEYS}
    flat_model.load_into_module(matrix[0].to(device))
    history["grad_norm_init"] = grad_norm_stats(model, probe, config.gp_norm)
    for row in matrix[1:]:
        flat_model.load_into_module(row.to(device))
        stats = epoch_measurements(model, data, probe, config, device)
        for key in HISTORY_KEYS:
            history[key].append(stats.get(key))
    history["step_sq_norm"] = step_sq_norms(matrix)
    return history


def import_mtt_experts(files: Sequence[Path], data: DatasetSplits, config: ExpertConfig, out_dir: Path,
                       num_experts: int, dtype: torch.dtype, device: torch.device) -> list[Path]:
    """Write the first `num_experts` experts of MTT-format `files` (in order) as this project's expert files
    ``expert_000.safetensors``, ... in `out_dir`, with the metadata trained experts carry (the history measured
    by `imported_history`, seed None) plus ``source`` (file and position). `config` describes the network
    (arch, width, depth, epochs) the checkpoints must fit, and how the experts were trained where known."""
    info = data.info
    flat_model = FlatModel(build_model(config.arch, info.channels, info.num_classes, info.image_size,
                                       width=config.width, depth=config.depth))
    network = (f"{config.arch}, width {config.width}, depth {config.depth or 'from the image size'}, on "
               f"{info.name}: {info.channels} x {info.image_size} x {info.image_size}, {info.num_classes} classes")
    written: list[Path] = []
    for file in files:
        for position, expert in enumerate(load_mtt_buffer(file)):
            if len(written) == num_experts:
                return written
            source = f"{file} expert {position}"
            if len(expert) != config.epochs + 1:
                raise ValueError(f"{source} stores {len(expert) - 1} epochs (+ initialisation); set buffer.epochs "
                                 f"to {len(expert) - 1} (now {config.epochs})")
            matrix = mtt_expert_matrix(expert, flat_model, source, network)
            history = imported_history(flat_model, matrix, data, config, device)
            metadata = {**expert_metadata(data, config, None, len(written), history),
                        "source": {"file": Path(file).name, "expert": position}}
            written.append(save_trajectory(expert_path(out_dir, len(written)), matrix, metadata, dtype=dtype))
    if len(written) < num_experts:
        raise ValueError(f"{', '.join(str(f) for f in files)} hold {len(written)} experts; buffer.num_experts asks "
                         f"for {num_experts}")
    return written
