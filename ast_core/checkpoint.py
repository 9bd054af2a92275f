"""The resume file of a distillation run: written atomically, read back only under the settings that made it.

One file per run, ``<folder>/distill_checkpoint.pt`` (`CHECKPOINT_NAME`): a `torch.save`d dict of plain values
and CPU tensors (loadable with ``weights_only=True``) holding ``config`` (`dataclasses.asdict` of the run's
`DistillConfig`) and the state `ast_core.distill.Distiller` saves: ``iteration``, ``images``, ``syn_lr``,
``opt_img``, ``opt_lr``, ``generator``, ``iterations_done``, ``history``, ``best`` (``{}`` or
iteration/val_acc/images/syn_lr/label_logits), ``validation``, ``nonfinite_streak``, ``initial_rms``; with soft
labels also ``label_logits`` and ``opt_y``, with `image_ema` also ``ema``. A kill while writing leaves the
previous file.
"""

from __future__ import annotations

import pickle
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ast_core.io import atomic_path
from ast_core.settings import DistillConfig

CHECKPOINT_NAME = "distill_checkpoint.pt"


def changed_settings(saved: dict[str, object], config: DistillConfig) -> list[str]:
    """Settings in which a checkpoint's config differs from `config` (the iteration count may grow on resume)."""
    current = asdict(config)
    return sorted(k for k in current if k != "iterations" and saved.get(k) != current[k])


class DistillCheckpoint:
    """The checkpoint file of the run kept in `folder`."""

    def __init__(self, folder: str | Path) -> None:
        self.path = Path(folder) / CHECKPOINT_NAME

    def save(self, config: DistillConfig, state: dict[str, object]) -> None:
        with atomic_path(self.path) as tmp:
            torch.save({"config": asdict(config), **state}, tmp)

    def load(self, config: DistillConfig) -> dict[str, Any] | None:
        """The saved state, or None when there is no file; a file made with other settings is an error naming them."""
        state = self._read()
        if state is not None and (differing := changed_settings(state["config"], config)):
            raise ValueError(f"checkpoint {self.path} was made with other settings ({', '.join(differing)}); "
                             "delete it or restore those settings")
        return state

    def differing_settings(self, config: DistillConfig) -> list[str]:
        """Settings in which the saved run differs from `config` (none when there is no file)."""
        state = self._read()
        return changed_settings(state["config"], config) if state is not None else []

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)

    def _read(self) -> dict[str, Any] | None:
        if not self.path.is_file():
            return None
        try:
            return torch.load(self.path, weights_only=True, map_location="cpu")
        except pickle.UnpicklingError as error:  # torch's own text would suggest weights_only=False: running it
            raise ValueError(f"checkpoint {self.path} was not loaded: it holds pickled objects, not the tensors "
                             "and plain values this project writes, and loading it could run code; delete it "
                             "and rerun to start this cell over") from error
        except Exception as error:  # a damaged file: say which one, never guess
            raise ValueError(f"checkpoint {self.path} was not loaded: it is damaged ({type(error).__name__}); "
                             "delete it and rerun to start this cell over") from error
