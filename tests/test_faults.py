"""Faults: bad inputs at the CLI, unreachable MLflow, unwritable outputs, kill -9 and resume, FAILED runs."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tiny import tiny_params_text

from pipeline.cells import cell_settings_key
from pipeline.cli import main
from pipeline.layout import distill_checkpoint_dir
from pipeline.params import load_params

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def test_unreachable_mlflow_server_fails_before_compute(tiny: Path, monkeypatch, caplog) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # discard port: nothing listens
    assert main(["prepare"]) == 2
    assert "MLFLOW_TRACKING_URI" in caplog.text and "unreachable" in caplog.text
    assert not (tiny / "artifacts" / "prepare").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write to read-only folders")
def test_unwritable_artifacts_folder_fails_before_compute(tiny: Path, caplog) -> None:
    (tiny / "artifacts").mkdir()
    (tiny / "artifacts").chmod(0o500)
    try:
        assert main(["prepare"]) == 2
    finally:
        (tiny / "artifacts").chmod(0o700)
    assert "artifacts" in caplog.text and "not writable" in caplog.text


def test_unwritable_artifacts_path_fails_before_compute(tiny: Path, caplog) -> None:
    (tiny / "artifacts").write_text("a file where a folder should be")
    assert main(["prepare"]) == 2
    assert "artifacts:" in caplog.text and "not writable" in caplog.text


def test_a_failing_stage_ends_its_mlflow_run_failed(tiny: Path, caplog) -> None:
    import mlflow

    assert main(["prepare"]) == 0
    assert main(["init"]) == 1  # no expert buffer yet
    assert "FileNotFoundError" in caplog.text and "run the buffer stage" in caplog.text
    mlflow.set_tracking_uri(f"sqlite:///{tiny / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["ast-dd-tiny"], output_format="pandas")
    status = dict(zip(runs["tags.stage"], runs["status"], strict=True))
    assert status == {"prepare": "FINISHED", "init": "FAILED"}


@pytest.fixture
def tiny_ready(tiny: Path) -> Path:
    """The tiny profile with prepare, the AST buffer and init done (ipc 1, method ast)."""
    params = yaml.safe_load((tiny / "params.yaml").read_text())
    params["buffer"]["train"] = ["ast"]
    params["distill"]["methods"] = ["ast"]
    (tiny / "params.yaml").write_text(yaml.safe_dump(params))
    for stage in ("prepare", "buffer", "init"):
        assert main([stage]) == 0
    return tiny


def test_corrupted_distill_checkpoint_is_named(tiny_ready: Path, caplog) -> None:
    params = load_params(tiny_ready / "params.yaml")
    folder = distill_checkpoint_dir("ast", 1, 0, cell_settings_key(params, "ast", 1, 0))
    checkpoint = tiny_ready / folder / "distill_checkpoint.pt"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"not a checkpoint")
    assert main(["distill"]) == 1
    assert str(checkpoint.relative_to(tiny_ready)) in caplog.text and "delete it" in caplog.text


def test_buffer_of_another_architecture_is_rejected_before_distilling(tiny_ready: Path, caplog) -> None:
    params = yaml.safe_load((tiny_ready / "params.yaml").read_text())
    params["model"]["width"] = 16
    (tiny_ready / "params.yaml").write_text(yaml.safe_dump(params))
    assert main(["distill"]) == 1
    assert "another dataset, architecture or width" in caplog.text
    assert not (tiny_ready / "artifacts/distill").exists()


def test_corrupted_expert_file_is_named(tiny_ready: Path, caplog) -> None:
    expert = tiny_ready / "artifacts/buffer/ast/expert_000.safetensors"
    expert.write_bytes(expert.read_bytes()[:100])
    assert main(["init"]) == 1
    assert "expert_000.safetensors" in caplog.text


def run_killed(cmd: list[str], cwd: Path, env: dict[str, str], ready: callable, timeout: float = 300) -> None:
    """Start `cmd`, SIGKILL it as soon as `ready()` is true (mid-run), and check it really was cut short."""
    process = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while not ready():
        assert process.poll() is None, "the run finished before it could be killed"
        assert time.monotonic() < deadline, "timed out waiting for the kill point"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()


def stage_env(path: Path) -> dict[str, str]:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "AST_DD_CACHE": str(path / "cache"),
           "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("AST_DD_PARENT_RUN_ID", None)
    return env


def copy_profile(path: Path, **changes) -> None:
    params = yaml.safe_load(tiny_params_text())
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        node = params
        for key in parents:
            node = node[key]
        node[last] = value
    path.mkdir(parents=True, exist_ok=True)
    (path / "params.yaml").write_text(yaml.safe_dump(params))


@pytest.mark.slow
def test_buffer_killed_mid_run_resumes_to_identical_experts(tmp_path: Path) -> None:
    runs = {name: tmp_path / name for name in ("clean", "killed")}
    for path in runs.values():
        copy_profile(path, buffer__num_experts=3)
        subprocess.run(["ast-dd", "prepare"], cwd=path, env=stage_env(path), check=True, capture_output=True)
    command = ["ast-dd", "buffer", "--variant", "ast"]
    subprocess.run(command, cwd=runs["clean"], env=stage_env(runs["clean"]), check=True, capture_output=True)
    folder, work = runs["killed"] / "artifacts/buffer/ast", runs["killed"] / "artifacts/checkpoints/buffer/ast"
    run_killed(command, runs["killed"], stage_env(runs["killed"]),
               ready=lambda: any(work.glob("*/expert_000.safetensors")))
    assert not list(work.glob("*/expert_002.safetensors")) and not list(folder.glob("expert_*"))
    subprocess.run(command, cwd=runs["killed"], env=stage_env(runs["killed"]), check=True, capture_output=True)
    assert not list(work.glob("*/expert_*")), "the finished experts moved into the output folder"
    for index in range(3):
        name = f"expert_{index:03d}.safetensors"
        resumed, clean = folder / name, runs["clean"] / "artifacts/buffer/ast" / name
        assert torch.equal(load_file(resumed)["checkpoints"], load_file(clean)["checkpoints"])
        assert resumed.read_bytes() == clean.read_bytes()  # metadata included: no wall-clock time is stored
    assert not list(folder.glob(".*.tmp")), "a half-written temporary file was left behind"


@pytest.mark.slow
def test_distill_killed_mid_run_resumes_to_identical_images(tmp_path: Path) -> None:
    base = tmp_path / "base"
    copy_profile(base, distill__per_ipc__1__iterations=12, distill__checkpoint_every=2, distill__eval_every=0,
                 distill__methods=["ast"])
    env = stage_env(base)
    for command in (["ast-dd", "prepare"], ["ast-dd", "buffer"], ["ast-dd", "init"]):
        subprocess.run(command, cwd=base, env=env, check=True, capture_output=True)
    runs = {name: tmp_path / name for name in ("clean", "killed")}
    for path in runs.values():
        shutil.copytree(base, path)
    command = ["ast-dd", "distill", "--method", "ast", "--ipc", "1"]
    subprocess.run(command, cwd=runs["clean"], env=stage_env(runs["clean"]), check=True, capture_output=True)
    cell = Path("artifacts/checkpoints/distill/ast/ipc1/seed0")
    assert not list((runs["clean"] / cell).glob("*/distill_checkpoint.pt"))
    run_killed(command, runs["killed"], stage_env(runs["killed"]),
               ready=lambda: any((runs["killed"] / cell).glob("*/distill_checkpoint.pt")))
    (checkpoint,) = (runs["killed"] / cell).glob("*/distill_checkpoint.pt")
    assert not (runs["killed"] / "artifacts/distill/ast/ipc1/seed0/synthetic.safetensors").exists()
    subprocess.run(command, cwd=runs["killed"], env=stage_env(runs["killed"]), check=True, capture_output=True)
    assert not checkpoint.exists()  # a finished cell drops it, so a later rerun starts over
    out = "artifacts/distill/ast/ipc1/seed0/synthetic.safetensors"
    assert (runs["killed"] / out).read_bytes() == (runs["clean"] / out).read_bytes()
