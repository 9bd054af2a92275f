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


def scratch_env(folder: Path, bin_dir: Path) -> dict[str, str]:
    """The environment to run `ast-dd`, `dvc` and `git` in a scratch project: this installation first on PATH,
    its own dataset cache and MLflow store, a git identity, no parent run or tracking URI inherited."""
    import os

    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "AST_DD_CACHE": str(folder / "cache"),
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("AST_DD_PARENT_RUN_ID", None)
    return env


def init_repository(folder: Path, env: dict[str, str], message: str) -> None:
    """`folder` as a git + DVC repository with everything in it committed (outputs and caches ignored)."""
    import subprocess

    (folder / ".gitignore").write_text("__pycache__/\n/cache/\nmlflow.db\n/mlartifacts/\n/.venv\n")
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "config", "core.analytics", "false"],
                ["git", "add", "-A"], ["git", "commit", "-qm", message]):
        subprocess.run(cmd, cwd=folder, env=env, check=True, capture_output=True)
