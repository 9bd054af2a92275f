"""Prefect flows on scratch projects: the tiny profile end to end, the `gpu` limit, failures, a study, serve.

Flows run in this process against Prefect's temporary local API (a throw-away database, PREFECT_HOME under
tmp_path); a toy project with 2-second stages checks parallelism, limits and failure handling quickly.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from tiny import write_tiny_params

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TINY_STAGES = {"prepare", "buffer@ast", "buffer@sgd", "convexify@ast", "convexify@sgd", "init", "distill@ast-1-0",
               "distill@mtt-1-0", "evaluate@ast-1-0", "evaluate@mtt-1-0", "baselines", "report"}
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:_NoneStep.value:DeprecationWarning")]

TOY_STAGE = """\
import os, sys, time
from pathlib import Path
name = sys.argv[1]
if Path(f"fail-{name.split('/')[-1]}").exists():
    sys.exit(3)
time.sleep(2)
out = Path("artifacts") / name
out.mkdir(parents=True, exist_ok=True)
(out / "device.txt").write_text(os.environ.get("CUDA_VISIBLE_DEVICES", "all"))
if name == "report":
    (out / "tables").mkdir()
    (out / "tables" / "results.md").write_text("## Results\\n\\n| method | acc |\\n| --- | --- |\\n| toy | 1 |\\n")
"""
TOY_DVC = {"stages": {
    "prepare": {"cmd": "python stage.py prepare", "outs": ["artifacts/prepare"]},
    "buffer": {"foreach": "${buffer.train}", "do": {"cmd": "python stage.py buffer/${item}",
                                                   "deps": ["artifacts/prepare"], "params": ["init.buffer"],
                                                   "outs": ["artifacts/buffer/${item}"]}},
    "report": {"cmd": "python stage.py report", "deps": ["artifacts/buffer"], "outs": ["artifacts/report"]}}}


def sh(cmd: list[str], cwd: Path) -> str:
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout + result.stderr


def scratch_project(path: Path, files: dict[str, str], copies: tuple[str, ...] = ()) -> Path:
    """A git + DVC repository with the tiny params and the given files, committed."""
    for item in copies:
        source = ROOT / item
        (shutil.copytree if source.is_dir() else shutil.copy)(source, path / item)
    write_tiny_params(path)
    for name, text in {".gitignore": "__pycache__/\n/cache/\nmlflow.db\n/mlartifacts/\n", **files}.items():
        (path / name).write_text(text)
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "config", "core.analytics", "false"],
                ["git", "add", "-A"], ["git", "commit", "-qm", "scratch project"]):
        sh(cmd, path)
    return path


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Prefect's temporary local API (a throw-away database, PREFECT_HOME under tmp_path); the stages' environment."""
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    home = tmp_path_factory.mktemp("prefect")
    with (pytest.MonkeyPatch.context() as patch,
          temporary_settings(updates={PREFECT_HOME: home}, restore_defaults={PREFECT_API_URL}),
          prefect_test_harness(server_startup_timeout=180)):
        patch.setenv("PATH", f"{BIN}{os.pathsep}{os.environ['PATH']}")
        patch.setenv("AST_DD_CACHE", str(home / "data-cache"))
        patch.setenv("OMP_NUM_THREADS", "2")
        for key in ("MLFLOW_TRACKING_URI", "AST_DD_PARENT_RUN_ID", "DVC_ROOT"):
            patch.delenv(key, raising=False)
        for key in ("AUTHOR", "COMMITTER"):
            patch.setenv(f"GIT_{key}_NAME", "t")
            patch.setenv(f"GIT_{key}_EMAIL", "t@t")
        yield


def set_gpu_limit(limit: int) -> None:
    from flows.serve import set_gpu_limit as set_limit

    set_limit(limit)


def task_runs(flow_run_id: Any) -> list[Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))


def peak_gpu_concurrency(runs: list[Any]) -> int:
    """Most `gpu` task runs running at one time (Running -> final state intervals; an end comes before a start)."""
    events: list[tuple[datetime, int]] = []
    for run in runs:
        if "gpu" in run.tags and run.start_time is not None:
            events += [(run.start_time, 1), (run.end_time, -1)]
    peak = current = 0
    for _, step in sorted(events):
        current += step
        peak = max(peak, current)
    return peak


def artifact_markdown(key: str, flow_run_id: Any) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
                                          flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    assert len(artifacts) == 1
    return artifacts[0].data


@pytest.fixture(scope="module")
def tiny_run(prefect_api, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """The tiny profile through `ast_pipeline` with an override; the `gpu` limit lets 3 stages train at once."""
    from flows.pipeline_flow import ast_pipeline

    project = scratch_project(tmp_path_factory.mktemp("tiny"), {}, ("ast_core", "pipeline", "bin", "dvc.yaml"))
    set_gpu_limit(3)
    state = ast_pipeline(overrides={"evaluate.baselines": ["random", "kmeans"]}, project_dir=str(project),
                         return_state=True)
    return project, state


def test_pipeline_flow_runs_every_stage_and_dvc_agrees(tiny_run) -> None:
    project, state = tiny_run
    assert state.is_completed(), state.message
    assert state.result() == dict.fromkeys(TINY_STAGES, "ran")
    assert set(yaml.safe_load((project / "dvc.lock").read_text())["stages"]) == TINY_STAGES
    assert "up to date" in sh(["dvc", "status"], project)
    assert yaml.safe_load((project / "params.yaml").read_text())["evaluate"]["baselines"] == ["random", "kmeans"]
    results = (project / "artifacts/report/tables/results.md").read_text()
    assert "kmeans (real subset)" in results and "herding" not in results


def test_training_stages_are_tagged_gpu_and_independent_stages_overlap(tiny_run) -> None:
    _, state = tiny_run
    runs = task_runs(state.state_details.flow_run_id)
    assert {run.name for run in runs} == TINY_STAGES
    cpu_only = {"prepare", "init", "report", "convexify@ast", "convexify@sgd"}  # convexify: seconds, no training
    assert {run.name for run in runs if "gpu" in run.tags} == TINY_STAGES - cpu_only
    assert 2 <= peak_gpu_concurrency(runs) <= 3


def test_results_artifact_and_mlflow_runs_name_the_flow_run(tiny_run) -> None:
    import mlflow

    project, state = tiny_run
    flow_run_id = state.state_details.flow_run_id
    markdown = artifact_markdown("ast-pipeline-results", flow_run_id)
    assert "random (real subset)" in markdown and "| distill@ast-1-0 | ran |" in markdown
    assert str(project / "artifacts/distill/ast/ipc1/seed0/grid.png") in markdown
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["ast-dd-tiny"], output_format="pandas")
    parent = runs[runs["tags.stage"] == "pipeline"]["run_id"].item()
    stages = runs[runs["tags.mlflow.parentRunId"] == parent]
    assert {"prepare", "buffer", "convexify", "init", "distill", "evaluate", "baselines", "report"} == set(
        stages["tags.stage"])
    assert set(stages["tags.prefect_flow_run_id"]) == {str(flow_run_id)}
    assert set(runs["status"]) == {"FINISHED"}


def test_second_run_of_a_target_leaves_caching_to_dvc(tiny_run) -> None:
    from flows.pipeline_flow import ast_pipeline

    project, _ = tiny_run
    outcomes = ast_pipeline(targets=["evaluate@mtt-1-0"], project_dir=str(project))
    needed = {"prepare", "buffer@ast", "buffer@sgd", "convexify@ast", "convexify@sgd", "init", "distill@mtt-1-0",
              "evaluate@mtt-1-0"}
    assert outcomes == dict.fromkeys(needed, "up to date")


@pytest.fixture()
def toy_project(prefect_api, tmp_path: Path) -> Path:
    """Stages prepare -> buffer@{ast,sgd,momentum} -> report that sleep 2 s; a file fail-<variant> fails one."""
    project = scratch_project(tmp_path, {"stage.py": TOY_STAGE, "dvc.yaml": yaml.safe_dump(TOY_DVC)})
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["buffer"]["train"] = ["ast", "sgd", "momentum"]
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    sh(["git", "commit", "-qam", "three buffers"], project)
    return project


@pytest.mark.parametrize("limit", [1, 2])
def test_gpu_limit_caps_training_stages_and_each_gets_its_own_gpu(toy_project: Path, limit: int,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.pipeline_flow import ast_pipeline

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")  # what a stage sees is what the flow pins, no GPU needed
    set_gpu_limit(limit)
    state = ast_pipeline(project_dir=str(toy_project), return_state=True)
    assert state.is_completed(), state.message
    runs = [run for run in task_runs(state.state_details.flow_run_id) if "gpu" in run.tags]
    assert peak_gpu_concurrency(runs) == limit  # three buffer stages are ready at once
    device = {run.name: (toy_project / "artifacts/buffer" / run.name.split("@")[1] / "device.txt").read_text()
              for run in runs}
    assert set(device.values()) <= {"0", "1"}
    assert (toy_project / "artifacts/prepare/device.txt").read_text() == "0,1"  # not a training stage: not pinned
    for a, b in itertools.combinations(runs, 2):
        if a.start_time < b.end_time and b.start_time < a.end_time:
            assert device[a.name] != device[b.name]
    assert "| toy | 1 |" in artifact_markdown("ast-pipeline-results", state.state_details.flow_run_id)
    assert "up to date" in sh(["dvc", "status"], toy_project)


def test_a_failed_stage_stops_only_what_depends_on_it(toy_project: Path) -> None:
    from flows.pipeline_flow import ast_pipeline

    set_gpu_limit(3)
    (toy_project / "fail-sgd").touch()
    state = ast_pipeline(project_dir=str(toy_project), retries=0, return_state=True)
    assert state.is_failed() and "stages failed: buffer@sgd " in state.message
    statuses = {run.name: run.state_name for run in task_runs(state.state_details.flow_run_id)}
    assert statuses == {"prepare": "Completed", "buffer@ast": "Completed", "buffer@momentum": "Completed",
                        "buffer@sgd": "Failed", "report": "NotReady"}
    assert "| report | not run (a stage it needs failed) |" in artifact_markdown("ast-pipeline-results",
                                                                              state.state_details.flow_run_id)
    lock = yaml.safe_load((toy_project / "dvc.lock").read_text())["stages"]
    assert {"prepare", "buffer@ast", "buffer@momentum"} == set(lock)


STUDY = """\
#   ast-dd study run pair
study:
  title: "A pair of rows"
distill:
  methods: [ast, mtt]
"""


def test_study_flow_runs_a_study_as_dvc_experiments_and_publishes_its_page(tiny_run) -> None:
    from flows.study_flow import study
    from pipeline.schema import ParamsError

    project, _ = tiny_run
    (project / "profiles/studies").mkdir(parents=True)
    (project / "profiles/studies/pair.yaml").write_text(STUDY)
    sh(["git", "add", "-A"], project)
    sh(["git", "commit", "-qm", "a study"], project)
    set_gpu_limit(2)
    state = study(name="pair", project_dir=str(project), return_state=True)
    assert state.is_completed(), state.message
    assert state.result() == {"pair-shared": "ran", "pair-ast-s0": "ran", "pair-mtt-s0": "ran"}
    assert not sh(["git", "diff", "--stat", "--", "params.yaml", "dvc.lock"], project)   # workspace untouched
    page = (project / "docs/studies/pair.md").read_text()
    assert "| ast " in page and "| mtt " in page
    assert artifact_markdown("study-pair", state.state_details.flow_run_id) == page
    again = study(name="pair", project_dir=str(project), return_state=True)
    assert again.result() == dict.fromkeys(state.result(), "finished before")
    with pytest.raises(ParamsError, match="study 'nope' is unknown; allowed: pair"):
        study(name="nope", project_dir=str(project))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get_json(url: str, body: dict | None = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        text = response.read().decode()
    return json.loads(text) if text.strip().startswith(("{", "[")) else text


def test_serve_brings_up_both_uis_the_limit_and_scheduled_deployments(toy_project: Path, tmp_path: Path) -> None:
    port, mlflow_port = free_port(), free_port()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "served-prefect")}
    env.pop("PREFECT_API_URL", None)
    process = subprocess.Popen([str(BIN / "ast-dd"), "serve", "--port", str(port), "--mlflow-port", str(mlflow_port),
                                "--cron", "0 3 * * *", "--gpus", "2"], cwd=toy_project, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    api = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + 300
        deployments: list[dict] = []
        while len(deployments) < 2 and time.monotonic() < deadline:
            assert process.poll() is None, process.stdout.read()
            try:
                deployments = get_json(f"{api}/deployments/filter", {})
            except OSError:
                time.sleep(2)
        by_entrypoint = {d["entrypoint"].rsplit(".", 1)[-1]: d for d in deployments}
        assert set(by_entrypoint) == {"ast_pipeline", "study"}
        assert [s["schedule"]["cron"] for s in by_entrypoint["ast_pipeline"]["schedules"]] == ["0 3 * * *"]
        assert by_entrypoint["study"]["schedules"] == []
        assert by_entrypoint["study"]["parameters"] == {"project_dir": str(toy_project)}
        assert get_json(f"{api}/v2/concurrency_limits/tag:gpu")["limit"] == 2
        assert get_json(f"http://127.0.0.1:{mlflow_port}/health") == "OK"
        assert get_json(f"http://127.0.0.1:{port}/ui-settings")["api_url"] == api
        assert "<html" in urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10).read().decode().lower()
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    for url in (f"{api}/health", f"http://127.0.0.1:{mlflow_port}/health"):
        with pytest.raises(OSError):
            urllib.request.urlopen(url, timeout=5)


def test_prefect_ui_calls_the_api_on_the_chosen_port(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The UI's settings endpoint names the served port, even where PREFECT_API_URL (e.g. from a profile)
    names the default one."""
    from flows.serve import child_processes, prefect_server, wait_until_up

    port = free_port()
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4200/api")
    api = f"http://127.0.0.1:{port}/api"
    with child_processes() as processes:
        processes.append(prefect_server("127.0.0.1", port))
        wait_until_up(f"{api}/health", processes[-1])
        assert get_json(f"http://127.0.0.1:{port}/ui-settings")["api_url"] == api


@pytest.mark.parametrize(("ports", "message"), [(["--port", "0"], "--port: 0 is not a TCP port"),
                                               (["--mlflow-port", "70000"], "--mlflow-port: 70000"),
                                               (["--port", "5000"], "--mlflow-port: 5000 is the Prefect")])
def test_serve_rejects_unusable_ports_before_starting_anything(ports: list[str], message: str, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    from pipeline.cli import main

    write_tiny_params(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main(["serve", *ports]) == 2
    assert message in caplog.text


def test_flow_run_command_rejects_a_bad_override_before_starting_prefect(toy_project: Path) -> None:
    result = subprocess.run([str(BIN / "ast-dd"), "flow", "run", "--set", "distill.ipcs=[0]"], cwd=toy_project,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "distill.ipcs" in result.stderr
    assert "prefect" not in result.stderr.lower()
