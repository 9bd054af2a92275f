"""Faults: bad inputs at the CLI, unreachable MLflow, unwritable outputs, kill -9 and resume, FAILED runs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tiny import tiny_params_text, write_tiny_params

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


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_mlflow_server(folder: Path, port: int) -> subprocess.Popen:
    """A real `mlflow server` on localhost over a sqlite store in `folder`, ready to answer."""
    import urllib.request

    process = subprocess.Popen([str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
                                "--backend-store-uri", f"sqlite:///{folder / 'server.db'}",
                                "--artifacts-destination", str(folder / "server-artifacts"), "--workers", "1"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as answer:
                if answer.status == 200:
                    return process
        except OSError:
            time.sleep(0.5)
    process.kill()
    raise RuntimeError("mlflow server did not start")


def stop(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)


def test_a_tracking_server_lost_mid_stage_costs_no_compute_and_is_recorded_later(
        tiny: Path, monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    """The server dies after the stage's run opened: the stage still writes its outputs and exits 0, warns
    once naming the journal, and the next command that reaches the restarted server records the missed metrics
    and artifacts and ends the run FINISHED."""
    import mlflow

    import pipeline.stages.prepare as prepare_stage

    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    server = start_mlflow_server(tiny, port)
    loader = prepare_stage.load_raw

    def load_then_lose_the_server(*args, **kwargs):
        stop(server)
        return loader(*args, **kwargs)

    monkeypatch.setattr(prepare_stage, "load_raw", load_then_lose_the_server)
    started = time.time()
    try:
        assert main(["prepare"]) == 0, caplog.text
    finally:
        if server.poll() is None:
            stop(server)
    assert time.time() - started < 300                                   # bounded by the HTTP timeouts
    assert (tiny / "artifacts/prepare/info.json").is_file()
    warnings = [r.message for r in caplog.records if "not recorded" in r.getMessage()]
    assert len(warnings) == 1 and "tracking_pending" in caplog.text
    journals = list((tiny / "artifacts/tracking_pending").glob("*/record.json"))
    assert len(journals) == 1
    record = json.loads(journals[0].read_text())
    assert record["status"] == "FINISHED" and {m[0] for m in record["metrics"]} >= {"train_size", "test_size"}

    monkeypatch.setattr(prepare_stage, "load_raw", loader)
    server = start_mlflow_server(tiny, port)
    try:
        assert main(["prepare"]) == 0, caplog.text                      # any command reaching the store replays
        run = mlflow.MlflowClient(uri).get_run(record["run_id"])
        assert run.info.status == "FINISHED"
        missed = {key: value for key, value, _, _ in record["metrics"]}
        assert {key: run.data.metrics[key] for key in missed} == missed
        files = {f.path for f in mlflow.MlflowClient(uri).list_artifacts(record["run_id"])}
        assert {"info.json", "real_samples.png"} <= files
    finally:
        stop(server)
    assert not journals[0].exists()


def test_two_commands_in_one_project_at_once_refuse_each_other(tiny: Path, monkeypatch: pytest.MonkeyPatch,
                                                               caplog) -> None:
    """DVC's own lock is the project's: while `dvc` holds it an `ast-dd` stage command refuses naming the
    holder; while an `ast-dd` stage runs, a second `ast-dd`, a `dvc repro`, and a stage command as DVC runs it
    (lock released, same output) in other processes refuse."""
    import zc.lockfile

    import pipeline.stages.prepare as prepare_stage

    subprocess.run([str(BIN / "dvc"), "init", "--no-scm", "-q"], cwd=tiny, check=True)
    held = zc.lockfile.LockFile(str(tiny / ".dvc/tmp/lock"))          # what `dvc repro` holds while it runs
    try:
        assert main(["prepare"]) == 2
    finally:
        held.close()
    assert f"is held by process {os.getpid()}" in caplog.text and not (tiny / "artifacts/prepare").exists()
    others = {}
    loader = prepare_stage.load_raw

    def load_while_others_try(*args, **kwargs):
        env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
        for name, command in (("ast-dd", ["ast-dd", "init"]), ("dvc", ["dvc", "repro"])):
            others[name] = subprocess.run(command, cwd=tiny, env=env, capture_output=True, text=True, timeout=300)
        # as DVC runs stages (its lock released meanwhile): the same output is still refused
        others["same output"] = subprocess.run(["ast-dd", "prepare"], cwd=tiny, env={**env, "DVC_STAGE": "prepare"},
                                               capture_output=True, text=True, timeout=300)
        return loader(*args, **kwargs)

    monkeypatch.setattr(prepare_stage, "load_raw", load_while_others_try)
    assert main(["prepare"]) == 0, caplog.text
    assert others["ast-dd"].returncode == 2 and "another DVC or ast-dd command is running" in others["ast-dd"].stderr
    assert others["dvc"].returncode != 0 and "lock" in others["dvc"].stderr.lower()
    assert others["same output"].returncode == 2
    assert "another process is writing artifacts/prepare" in others["same output"].stderr
    assert (tiny / "artifacts/prepare/info.json").is_file()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs mounted for the test (skipped, saying why, where mounting is not permitted)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("the full-disk tests mount a small tmpfs, which needs root and the mount command")
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True,
                            text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {result.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path, leave: int) -> Path:
    """A file taking all of `disk`'s free space but `leave` bytes."""
    filler = disk / "filler"
    with filler.open("wb") as handle:
        handle.write(b"\0" * (shutil.disk_usage(disk).free - leave))
    return filler


def test_a_full_disk_leaves_every_previous_artifact_whole_and_names_the_path(small_disk: Path) -> None:
    import numpy as np

    from ast_core.field_files import export_image_folder, export_mtt_set
    from ast_core.io import DiskFullError, atomic_write_csv, atomic_write_json, atomic_write_safetensors
    from ast_core.viz import save_image_grid

    small = torch.zeros(4, 1, 8, 8)
    big = torch.from_numpy(np.random.default_rng(0).random((64, 3, 32, 32), dtype=np.float32))  # ~800 KB
    writers = {
        "safetensors": lambda x: atomic_write_safetensors(small_disk / "set.safetensors", {"x": x}),
        "json": lambda x: atomic_write_json(small_disk / "result.json", {"x": x.flatten().tolist()}),
        "csv": lambda x: atomic_write_csv(small_disk / "history.csv", [{"v": v} for v in x.flatten().tolist()]),
        "png": lambda x: save_image_grid(x.clamp(0, 1), torch.zeros(len(x), dtype=torch.long),
                                         small_disk / "grid.png", 1),
        "mtt": lambda x: export_mtt_set(small_disk / "mtt", x, torch.zeros(len(x), dtype=torch.long), 0.01, x),
        "imagefolder": lambda x: export_image_folder(small_disk / "images", x.clamp(0, 1),
                                                     torch.zeros(len(x), dtype=torch.long), ["only"]),
    }
    for write in writers.values():
        write(small)
    before = {p: p.read_bytes() for p in small_disk.rglob("*") if p.is_file()}
    filler = fill(small_disk, leave=16 * 1024)
    for kind, write in writers.items():
        with pytest.raises(DiskFullError, match="no space left to write it .* bytes free") as error:
            write(big)
        assert str(small_disk) in str(error.value), kind
    filler.unlink()
    after = {p: p.read_bytes() for p in small_disk.rglob("*") if p.is_file()}
    assert after == before                                    # every previous file whole, no temporary left over


def test_a_stage_stopped_by_a_full_disk_exits_naming_it_and_resumes_to_the_same_bytes(
        small_disk: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    """The buffer stage on a full disk fails with one line (exit 1); after space is freed the same command
    writes experts identical to those of a run that never failed."""
    runs = {}
    for name, folder in (("clean", tmp_path / "clean"), ("full", small_disk / "project")):
        folder.mkdir()
        write_tiny_params(folder)
        monkeypatch.chdir(folder)
        monkeypatch.setenv("AST_DD_CACHE", str(tmp_path / "cache"))
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / (name + '.db')}")  # off the small disk
        assert main(["prepare"]) == 0, caplog.text
        if name == "full":
            filler = fill(small_disk, leave=8 * 1024)
            assert main(["buffer"]) == 1
            assert "DiskFullError" in caplog.text and "bytes free" in caplog.text
            assert not [p for p in folder.rglob("*.tmp")]
            filler.unlink()
        assert main(["buffer"]) == 0, caplog.text
        experts = sorted((folder / "artifacts/buffer").rglob("*.safetensors"))
        runs[name] = {p.relative_to(folder): p.read_bytes() for p in experts}
    assert runs["full"] == runs["clean"] and runs["clean"]


def test_two_fresh_projects_write_byte_identical_artifacts(tmp_path: Path) -> None:
    """The same settings in two folders, every stage in its own process: every DVC output is the same bytes
    (no wall-clock or path in them, metadata in a fixed order, tensors saved through memory)."""
    outputs = {}
    for name in ("first", "second"):
        folder = tmp_path / name
        folder.mkdir()
        write_tiny_params(folder)
        env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "AST_DD_CACHE": str(tmp_path / "cache"),
               "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / (name + '.db')}", "OMP_NUM_THREADS": "1"}
        env.pop("AST_DD_PARENT_RUN_ID", None)
        for stage in (["prepare"], ["buffer"], ["convexify"], ["init"], ["distill", "--method", "mtt"],
                      ["evaluate", "--method", "mtt"]):
            done = subprocess.run(["ast-dd", *stage], cwd=folder, env=env, capture_output=True, text=True, timeout=900)
            assert done.returncode == 0, done.stderr[-2000:]
        outputs[name] = {p.relative_to(folder).as_posix(): p.read_bytes()
                         for p in sorted((folder / "artifacts").rglob("*")) if p.is_file()
                         and p.relative_to(folder / "artifacts").parts[0] not in ("checkpoints", "timing")}
    assert outputs["first"].keys() == outputs["second"].keys()
    differing = sorted(path for path in outputs["first"] if outputs["first"][path] != outputs["second"][path])
    assert not differing, differing
    assert any(path.endswith("images_best.pt") for path in outputs["first"])
