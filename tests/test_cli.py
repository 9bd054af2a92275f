"""The project as a user meets it: DVC stage commands without an active virtualenv, an unknown study,
output piped into a reader that stops early, and the README's library example."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.cli import main

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = ROOT / "bin" / "ast-dd"
SYSTEM_PATH = "/usr/bin:/bin"  # no virtualenv, no `ast-dd`


def stage_commands() -> dict[str, str]:
    """Every stage's `cmd` in dvc.yaml (foreach stages keep theirs under `do`)."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    return {name: stage.get("cmd") or stage["do"]["cmd"] for name, stage in stages.items()}


def fake_program(path: Path, says: str) -> None:
    """An executable that prints `says` and its arguments."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'#!/bin/sh\necho {says} "$@"\n')
    path.chmod(0o755)


def launch(dvc_root: Path, path: str = SYSTEM_PATH, cwd: Path = ROOT, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": path, "DVC_ROOT": str(dvc_root)}
    return subprocess.run([str(LAUNCHER), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_every_stage_command_runs_through_the_launcher() -> None:
    commands = stage_commands()
    assert {"prepare", "buffer", "init", "distill", "evaluate", "baselines", "report"} <= set(commands)
    assert all(cmd.startswith("bin/ast-dd ") for cmd in commands.values()), commands
    assert os.access(LAUNCHER, os.X_OK)


@pytest.mark.parametrize("where", [".", ".dvc/tmp/exps/tmpab12cd"])  # the project, a --temp/queued copy
def test_launcher_runs_the_project_venv_without_it_on_path(tmp_path: Path, where: str) -> None:
    fake_program(tmp_path / ".venv" / "bin" / "python", "venv-python")
    result = launch(tmp_path / where, SYSTEM_PATH, ROOT, "distill", "--ipc", "1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("venv-python -c ") and result.stdout.rstrip().endswith("distill --ipc 1")


def test_launcher_without_a_project_venv_runs_ast_dd_from_path(tmp_path: Path) -> None:
    fake_program(tmp_path / "env" / "bin" / "ast-dd", "installed-ast-dd")
    result = launch(tmp_path, f"{tmp_path / 'env' / 'bin'}:{SYSTEM_PATH}", ROOT, "report")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "installed-ast-dd report"


@pytest.mark.skipif(sys.prefix == sys.base_prefix, reason="the tests do not run in a virtualenv")
def test_launcher_runs_this_installation_with_a_bare_path(tmp_path: Path) -> None:
    (tmp_path / ".venv").symlink_to(sys.prefix)
    result = launch(tmp_path, SYSTEM_PATH, ROOT, "params", "--profile", "tiny")
    assert result.returncode == 0, result.stderr
    assert "dataset: digits" in result.stdout


def test_an_unknown_study_is_named_with_the_studies_there_are(caplog: pytest.LogCaptureFixture,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    assert main(["study", "run", "tables"]) == 2
    studies = ", ".join(sorted(path.stem for path in (ROOT / "profiles/studies").glob("*.yaml")))
    assert f"study 'tables' is unknown; allowed: {studies} (the files in profiles/studies/)" in caplog.text
    assert "modules, sweep-lr-img" in studies


def test_output_into_a_closed_pipe_ends_without_a_traceback() -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader has gone, as after `ast-dd params | head -1`
    try:
        result = subprocess.run([sys.executable, "-m", "pipeline.cli", "params", "--profile", "tiny"],
                                cwd=ROOT, stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=300)
    finally:
        os.close(write_end)
    assert result.returncode == 0  # `ast-dd params | head` succeeds, also under `set -o pipefail`
    assert "Traceback" not in result.stderr and "BrokenPipeError" not in result.stderr, result.stderr


def readme_python(section: str) -> str:
    """The first ```python block of a README section."""
    text = (ROOT / "README.md").read_text()
    body = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", body, re.DOTALL).group(1)


@pytest.mark.slow
def test_readme_library_example_runs_and_distils_above_its_start(tmp_path: Path) -> None:
    (tmp_path / "example.py").write_text(readme_python("Library use"))
    env = {**os.environ, "AST_DD_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    scores = dict(re.findall(r"^(.+): test accuracy ([\d.]+) ±", result.stdout, re.MULTILINE))
    assert set(scores) == {"k-means start", "distilled"}, result.stdout
    assert float(scores["distilled"]) > 50.0  # far above chance (10 %): the distillation did not collapse


def test_make_exports_the_one_list_of_offline_settings(tmp_path: Path) -> None:
    """The Makefile takes pipeline/environment.py's list (no copy); a value the user set is kept."""
    from pipeline.environment import OFFLINE_DEFAULTS

    (tmp_path / "show.mk").write_text("show:\n\t@env\n")
    env = {key: value for key, value in os.environ.items() if key not in OFFLINE_DEFAULTS}
    shown = subprocess.run(["make", "-s", "-f", "Makefile", "-f", str(tmp_path / "show.mk"), "show"], cwd=ROOT,
                           env={**env, "DVC_NO_ANALYTICS": "user"}, capture_output=True, text=True, check=True)
    exported = dict(line.split("=", 1) for line in shown.stdout.splitlines() if "=" in line)
    assert {key: exported.get(key) for key in OFFLINE_DEFAULTS} == {**OFFLINE_DEFAULTS, "DVC_NO_ANALYTICS": "user"}
