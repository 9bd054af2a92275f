"""The tiny profile (profiles/tiny.yaml over params.yaml) as a complete params file, for tests that run stages
in a scratch folder (DVC and the stage commands read params.yaml there)."""

from __future__ import annotations

import functools
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@functools.cache
def tiny_params_text() -> str:
    from pipeline.params import load_params, settings_yaml

    return settings_yaml(load_params(ROOT / "params.yaml", ["tiny"]))


def write_tiny_params(folder: Path) -> Path:
    """folder/params.yaml holding every resolved setting of the tiny profile."""
    path = folder / "params.yaml"
    path.write_text(tiny_params_text())
    return path
