"""Where each stage writes its artifacts (all under ``artifacts/``, relative to the project root)."""

from __future__ import annotations

from pathlib import Path

ARTIFACTS = Path("artifacts")
PREPARE = ARTIFACTS / "prepare"
BUFFER = ARTIFACTS / "buffer"
CONVEX = ARTIFACTS / "convex"
INIT = ARTIFACTS / "init"
DISTILL = ARTIFACTS / "distill"
EVALUATE = ARTIFACTS / "evaluate"
BASELINES = ARTIFACTS / "baselines"
REPORT = ARTIFACTS / "report"
CHECKPOINTS = ARTIFACTS / "checkpoints"   # resumable state, not a DVC output
TIMING = ARTIFACTS / "timing"             # wall-clock seconds of stage runs: not a DVC output, so reruns match


def buffer_dir(variant: str) -> Path:
    return BUFFER / variant


def convex_dir(variant: str) -> Path:
    return CONVEX / variant


def init_file(ipc: int) -> Path:
    return INIT / f"ipc{ipc}.json"


def distill_dir(method: str, ipc: int, seed: int) -> Path:
    """One distillation seed's set of a (method, ipc) cell: ``distill/<method>/ipc<k>/seed<s>``."""
    return DISTILL / method / f"ipc{ipc}" / f"seed{seed}"


def distill_checkpoint_dir(method: str, ipc: int, seed: int) -> Path:
    return CHECKPOINTS / "distill" / method / f"ipc{ipc}" / f"seed{seed}"


def buffer_timing_file(variant: str) -> Path:
    return TIMING / "buffer" / f"{variant}.json"


def distill_timing_file(method: str, ipc: int, seed: int) -> Path:
    return TIMING / "distill" / method / f"ipc{ipc}" / f"seed{seed}.json"


def evaluate_dir(method: str, ipc: int, seed: int) -> Path:
    return EVALUATE / method / f"ipc{ipc}" / f"seed{seed}"
