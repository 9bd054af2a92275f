"""Where each stage writes its artifacts (all under ``artifacts/``, relative to the project root).

Resumable state (unfinished experts and distillations) lives under the *project's* ``artifacts/checkpoints``:
DVC sets ``DVC_ROOT`` to the project root for stages, also for experiments that run in a temporary copy
(`dvc exp run --temp`/`--queue`), so a killed experiment resumes in the next one instead of starting over.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ARTIFACTS = Path("artifacts")
PREPARE = ARTIFACTS / "prepare"
BUFFER = ARTIFACTS / "buffer"
CONVEX = ARTIFACTS / "convex"
INIT = ARTIFACTS / "init"
DISTILL = ARTIFACTS / "distill"
EVALUATE = ARTIFACTS / "evaluate"
BASELINES = ARTIFACTS / "baselines"
REPORT = ARTIFACTS / "report"


def buffer_dir(variant: str) -> Path:
    return BUFFER / variant


def convex_dir(variant: str) -> Path:
    return CONVEX / variant


def init_file(ipc: int) -> Path:
    return INIT / f"ipc{ipc}.json"


def distill_dir(method: str, ipc: int, seed: int) -> Path:
    """One distillation seed's set of a (method, ipc) cell: ``distill/<method>/ipc<k>/seed<s>``."""
    return DISTILL / method / f"ipc{ipc}" / f"seed{seed}"


def project_artifacts() -> Path:
    """``artifacts/`` of the project root, also when a stage runs in an experiment's temporary copy."""
    return Path(os.environ.get("DVC_ROOT") or ".") / ARTIFACTS


def checkpoints_dir() -> Path:
    """Resumable state (not a DVC output)."""
    return project_artifacts() / "checkpoints"


def timing_dir() -> Path:
    """Wall-clock seconds of stage runs: not a DVC output, so a rerun writes the same outputs."""
    return project_artifacts() / "timing"


def settings_key(settings: Mapping[str, Any]) -> str:
    """A short name for a set of settings (JSON, keys sorted): equal settings, equal key."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def expert_work_dir(variant: str, settings_key: str) -> Path:
    """Where one variant's experts are trained before the buffer stage moves them into its output."""
    return checkpoints_dir() / "buffer" / variant / settings_key


def distill_checkpoint_dir(method: str, ipc: int, seed: int, settings_key: str) -> Path:
    """One cell's resumable checkpoint; `settings_key` names the settings, so two experiments that distil
    the same cell differently never share one."""
    return checkpoints_dir() / "distill" / method / f"ipc{ipc}" / f"seed{seed}" / settings_key


def buffer_timing_file(variant: str) -> Path:
    return timing_dir() / "buffer" / f"{variant}.json"


def distill_timing_file(method: str, ipc: int, seed: int) -> Path:
    return timing_dir() / "distill" / method / f"ipc{ipc}" / f"seed{seed}.json"


def evaluate_dir(method: str, ipc: int, seed: int) -> Path:
    return EVALUATE / method / f"ipc{ipc}" / f"seed{seed}"
