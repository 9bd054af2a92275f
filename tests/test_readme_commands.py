"""The README's shell commands, run as printed in a fresh copy of the project on the tiny profile: a documented
command that fails breaks this test before a user meets it. Every command of a ```bash block is either run here
or named in NOT_RUN with the reason and the test that covers it."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from tiny import init_repository, scratch_env, write_tiny_params

from flows.serve import wait_until_up

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

NOT_RUN = {
    "make run": "installs the environment, then runs `ast-dd run --jobs <cores>`, which is run here",
    "make test": "the command CI runs (.ci/run), this test included",
    "ast-dd study run modules": "16 experiments at the default scale; tests/test_studies.py runs `ast-dd study run` "
                                "on a tiny study",
}
SERVERS = {"mlflow ui": "http://127.0.0.1:5000"}  # started, answered over HTTP, stopped
# The README's cells (`--method mtt_rep --ipc 10 --seed 1`) are the default pipeline's; the tiny profile
# distils `ast` and `mtt` at ipc 1 and one seed, so the copy runs the default rows and cells on the tiny scale.
DEFAULT_CELLS = {"buffer": {"train": ["sgd_strong"]}, "init": {"buffer": "sgd_strong"},
                 "distill": {"methods": ["mtt_rep"], "ipcs": [10], "seeds": [0, 1]}}


def readme_blocks(text: str) -> list[list[str]]:
    """The commands of each ```bash block, without their trailing `  # comment`."""
    blocks = re.findall(r"```bash\n(.*?)```", text, re.DOTALL)
    return [[re.split(r"\s{2,}#\s", line)[0].strip() for line in block.splitlines() if line.strip()]
            for block in blocks]


def test_every_readme_command_is_run_or_says_why_not() -> None:
    commands = [command for block in readme_blocks((ROOT / "README.md").read_text()) for command in block]
    assert "ast-dd run --jobs 2" in commands  # the parser finds the README's blocks
    assert set(NOT_RUN) <= set(commands), "NOT_RUN names a command the README no longer shows"
    assert all(not command.startswith("make ") for command in commands if command not in NOT_RUN)


def fresh_project(path: Path) -> dict[str, str]:
    """A git + DVC project of the pipeline's code on the tiny profile with the default rows and cells, configured as the
    repository's .dvc/config (plots template, remote), with .venv the running environment."""
    for item in ("ast_core", "pipeline", "bin", "profiles", "dvc.yaml"):
        source = ROOT / item
        (shutil.copytree if source.is_dir() else shutil.copy)(source, path / item)
    params = yaml.safe_load(write_tiny_params(path).read_text())
    for section, values in DEFAULT_CELLS.items():
        params[section].update(values)
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (path / ".venv").symlink_to(sys.prefix)
    env = {**scratch_env(path, BIN), "OMP_NUM_THREADS": "1"}
    init_repository(path, env, "tiny project")
    shutil.copy(ROOT / ".dvc" / "config", path / ".dvc" / "config")
    subprocess.run([sys.executable, "-m", "pipeline.plots_template", "--cdn", "--out", str(path / ".vega" /
                    "template.html")], cwd=ROOT, check=True, capture_output=True)
    with (path / ".gitignore").open("a") as ignore:
        ignore.write("/.vega\n")
    subprocess.run(["git", "commit", "-qam", "configured as the repository"], cwd=path, env=env, check=True)
    return env


def serve_briefly(command: str, url: str, cwd: Path, env: dict[str, str]) -> int:
    """Start a server command, wait until `url` answers 200 (0) or 120 s pass or it exits (1), then stop it."""
    server = subprocess.Popen(["bash", "-c", command], cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_until_up(url, server, timeout=120)
        return 0
    except (RuntimeError, TimeoutError):
        return 1
    finally:
        with contextlib.suppress(ProcessLookupError):  # a server that exited has no group left
            os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)


def run_as_printed(command: str, cwd: Path, env: dict[str, str]) -> tuple[int, str]:
    """Exit code and output of a shell command. The output goes through a file, not a pipe: the queue worker that
    `dvc queue start` or `dvc exp run --run-all` starts keeps the descriptors it inherits, so reading a pipe to
    its end would wait for that worker to exit (`dvc queue start` would seem to wait for its experiments)."""
    with tempfile.TemporaryFile("w+") as output:
        completed = subprocess.run(["bash", "-c", command], cwd=cwd, env=env, stdout=output,
                                   stderr=subprocess.STDOUT, text=True, timeout=1200)
        output.seek(0)
        return completed.returncode, output.read()


def wait_for_queue(cwd: Path, env: dict[str, str], timeout: float = 900) -> str:
    """`dvc queue status` once no experiment is queued or running."""
    deadline = time.monotonic() + timeout
    while True:
        status = subprocess.run(["dvc", "queue", "status"], cwd=cwd, env=env, capture_output=True, text=True).stdout
        if not re.search(r"\b(Queued|Running)\b", status) or time.monotonic() > deadline:
            return status
        time.sleep(5)


@pytest.mark.slow
@pytest.mark.skipif(sys.prefix == sys.base_prefix, reason="the README's commands activate the project's .venv")
def test_readme_commands_run_as_printed(tmp_path: Path) -> None:
    path = tmp_path / "ast-dd"
    path.mkdir()
    env = fresh_project(path)
    table, failures = ["| command | rc | seconds |", "| --- | --- | --- |"], []
    queue = "Success"  # `dvc queue status` after the block that queues experiments
    for block in readme_blocks((ROOT / "README.md").read_text()):
        prefix = ""
        for command in block:
            if command in NOT_RUN:
                table.append(f"| `{command}` | not run: {NOT_RUN[command]} | |")
                continue
            start = time.monotonic()
            server = next((url for name, url in SERVERS.items() if command.startswith(name)), None)
            if server:
                rc, output = serve_briefly(prefix + command, server, path, env), ""
            else:
                rc, output = run_as_printed(prefix + command, path, env)
            if command.startswith(". "):  # an activation holds for the rest of its block
                prefix += command + " && "
            table.append(f"| `{command}` | {rc} | {time.monotonic() - start:.0f} |")
            if rc:
                failures.append(f"{command} exited {rc}:\n{output[-3000:]}")
        if any("--queue" in command for command in block):  # every queued experiment ran, and succeeded
            queue = wait_for_queue(path, env)
    print("\n".join(table))
    assert not failures, "\n".join(table) + "\n\n" + "\n\n".join(failures)
    assert "Success" in queue and "Failed" not in queue, queue  # the queued experiment ran
    assert_another_clone_pulls_the_outputs(path, env)


def assert_another_clone_pulls_the_outputs(path: Path, env: dict[str, str]) -> None:
    """The README's promise: a clone next to this one gets what `dvc push` stored with `dvc pull`."""
    subprocess.run(["git", "add", "-A"], cwd=path, env=env, check=True)
    subprocess.run(["git", "commit", "-qm", "the README's runs"], cwd=path, env=env, check=True)
    clone = path.with_name("ast-dd-clone")
    subprocess.run(["git", "clone", "-q", str(path), str(clone)], env=env, check=True)
    (clone / ".venv").symlink_to(sys.prefix)
    pull = subprocess.run(["dvc", "pull"], cwd=clone, env=env, capture_output=True, text=True)
    assert pull.returncode == 0, pull.stdout + pull.stderr
    status = subprocess.run(["dvc", "status"], cwd=clone, env=env, capture_output=True, text=True)
    assert "Data and pipelines are up to date." in status.stdout, status.stdout + status.stderr
