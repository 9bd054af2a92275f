"""MLflow tracking: the permanent store, one parent run per invocation or DVC experiment, no empty parents,
runs of killed processes closed, cell runs comparable across experiments, the store checked before compute."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient
from tiny import write_tiny_params

from pipeline import tracking
from pipeline.cli import main
from pipeline.params import load_params
from pipeline.preflight import check_tracking_store, preflight
from pipeline.schema import UsageError, flatten_keys

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = "ast-dd-test"
ENVIRONMENT = ("MLFLOW_TRACKING_URI", "DVC_ROOT", "DVC_STAGE", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV",
               tracking.PARENT_ENV, tracking.PREFECT_ENV)


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty project folder as the working directory, its default store, no inherited run or experiment."""
    path = tmp_path / "project"
    path.mkdir()
    monkeypatch.chdir(path)
    for name in ENVIRONMENT:
        monkeypatch.setenv(name, "")  # recorded, so the teardown restores what was there
        monkeypatch.delenv(name)
    yield path
    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


def runs(path: Path) -> list:
    """Every run of the project's store (deleted ones excluded)."""
    client = MlflowClient(f"sqlite:///{path / 'mlflow.db'}")
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def by_name(path: Path) -> dict[str, object]:
    return {run.info.run_name: run for run in runs(path)}


def parent_of(run) -> str | None:
    return run.data.tags.get("mlflow.parentRunId")


def python(code: str, cwd: Path, env: dict[str, str]) -> subprocess.Popen:
    """`code` in a fresh interpreter that imports this working tree's packages."""
    env = {**env, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", code], cwd=cwd, env=env, stdout=subprocess.PIPE, text=True)


def test_a_queued_experiments_artifacts_land_in_the_project_store(project: Path, tmp_path: Path) -> None:
    """The invoking process configures MLflow first (which exports MLFLOW_TRACKING_URI); a stage of a queued
    experiment then runs in a temporary copy with DVC_ROOT naming the project and its own experiment name."""
    tracking.configure(EXPERIMENT)
    copy = tmp_path / "exps" / "tmpcopy"
    copy.mkdir(parents=True)
    env = {**os.environ, "DVC_ROOT": str(project)}
    code = ("import mlflow\nfrom pipeline import tracking\ntracking.configure('queued-own-experiment')\n"
            "print(mlflow.get_experiment_by_name('queued-own-experiment').artifact_location)")
    stage = python(code, copy, env)
    location = stage.communicate(timeout=120)[0].strip().splitlines()[-1]
    assert stage.returncode == 0
    assert location == (project / "mlartifacts").as_uri()
    assert not list(copy.iterdir())


def test_a_relative_sqlite_store_is_read_from_the_project_root(project: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///store/mlflow.db")
    monkeypatch.setenv("DVC_ROOT", str(project))
    monkeypatch.chdir(tmp_path)
    assert tracking.tracking_uri() == f"sqlite:///{project / 'store' / 'mlflow.db'}"


def test_stages_of_a_dvc_experiment_nest_under_one_run_named_after_it(project: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "0" * 40)
    for experiment in ("exp-a", "exp-b"):
        monkeypatch.setenv("DVC_EXP_NAME", experiment)
        for stage in ("distill", "evaluate"):
            with tracking.stage_run(stage, EXPERIMENT, f"{stage}-{experiment}", {"ipc": 1}):
                pass
    found = by_name(project)
    assert set(found) == {"exp-a", "exp-b", "distill-exp-a", "evaluate-exp-a", "distill-exp-b", "evaluate-exp-b"}
    for experiment in ("exp-a", "exp-b"):
        parent = found[experiment]
        assert parent.data.tags["stage"] == "experiment" and parent.info.status == "FINISHED"
        assert parent_of(parent) is None
        for stage in ("distill", "evaluate"):
            assert parent_of(found[f"{stage}-{experiment}"]) == parent.info.run_id


def test_a_failing_stage_fails_its_experiment_run(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DVC_EXP_NAME", "exp-a")
    with pytest.raises(RuntimeError), tracking.stage_run("distill", EXPERIMENT, "distill", {}):
        raise RuntimeError("diverged")
    found = by_name(project)
    assert found["exp-a"].info.status == "FAILED" and found["distill"].info.status == "FAILED"


def test_an_experiment_run_by_ast_dd_study_nests_under_the_run_of_its_name(project: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    with tracking.pipeline_run(EXPERIMENT, run_name="modules-ast-s0") as outer:
        monkeypatch.setenv("DVC_EXP_NAME", "modules-ast-s0")
        with tracking.stage_run("distill", EXPERIMENT, "distill", {}):
            pass
    found = by_name(project)
    assert set(found) == {"modules-ast-s0", "distill"}
    assert parent_of(found["distill"]) == outer


def test_experiments_of_a_flow_nest_under_its_run(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The study flow's run (opened by the flow's process) -> each experiment's run -> its stage runs."""
    outer = MlflowClient().create_run(tracking.configure(EXPERIMENT), run_name="study").info.run_id
    monkeypatch.setenv(tracking.PARENT_ENV, outer)
    monkeypatch.setenv("DVC_EXP_NAME", "mct-mtt-s0")
    with tracking.stage_run("distill", EXPERIMENT, "distill", {}):
        pass
    found = by_name(project)
    assert parent_of(found["mct-mtt-s0"]) == outer
    assert parent_of(found["distill"]) == found["mct-mtt-s0"].info.run_id


def test_a_no_op_invocation_leaves_no_parent_run(project: Path) -> None:
    with tracking.pipeline_run(EXPERIMENT):
        pass  # every stage up to date
    assert runs(project) == []
    with tracking.pipeline_run(EXPERIMENT) as parent, tracking.stage_run("prepare", EXPERIMENT, "prepare", {}):
        pass
    found = by_name(project)
    assert set(found) == {"pipeline", "prepare"} and parent_of(found["prepare"]) == parent


def test_runs_of_a_killed_process_are_marked_killed_at_the_next_start(project: Path) -> None:
    code = (f"import time\nfrom pipeline import tracking\nexperiment = {EXPERIMENT!r}\n"
            "with tracking.pipeline_run(experiment), tracking.stage_run('distill', experiment, 'distill', {}):\n"
            "    print('ready', flush=True)\n    time.sleep(600)\n")
    victim = python(code, project, dict(os.environ))
    try:
        assert victim.stdout.readline().strip() == "ready"
    finally:
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=60)
    assert {run.info.status for run in runs(project)} == {"RUNNING"}
    with tracking.pipeline_run(EXPERIMENT) as own, tracking.stage_run("prepare", EXPERIMENT, "prepare", {}):
        assert MlflowClient().get_run(own).info.status == "RUNNING"  # a live owner's run is left alone
    assert sorted((run.info.run_name, run.info.status) for run in runs(project)) == [
        ("distill", "KILLED"), ("pipeline", "FINISHED"), ("pipeline", "KILLED"), ("prepare", "FINISHED")]


@pytest.fixture
def tiny(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    write_tiny_params(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AST_DD_CACHE", str(tmp_path / "cache"))
    return tmp_path


def test_cell_runs_carry_the_settings_and_both_accuracies(tiny: Path) -> None:
    from pipeline.cells import cell_params
    from pipeline.stages.evaluate import comparison_metrics

    params = load_params(tiny / "params.yaml")
    logged = flatten_keys(cell_params(params, "ast", 1, 0))
    assert {"ipc", "seed", "eval.seeds", "buffer", "mct_anchors", "init", "config.lr_img", "config.balanced_loss",
            "config.intermediate_matching", "config.perturb_rho", "config.syn_steps"} <= set(logged)
    result = tiny / "artifacts" / "distill" / "ast" / "ipc1" / "seed0" / "result.json"
    result.parent.mkdir(parents=True)
    result.write_text(json.dumps({"best_val_acc": 61.5}))
    results = {arch: {"mean": 70.0 + index} for index, arch in enumerate(params.evaluate.archs)}
    assert comparison_metrics(params, "ast", 1, 0, results) == {"test_acc": results[params.model.arch]["mean"],
                                                             "best_val_acc": 61.5}


BAD_STORES = [("htp://127.0.0.1:5000", "unknown scheme 'htp'"),
              ("postgresql://ast:secret@127.0.0.1/mlflow", "database driver `psycopg2` is not installed"),
              ("sqlite:///{tmp}/mistyped/mlflow.db", "does not exist"),
              ("http://127.0.0.1:9", "unreachable"),
              ("file:///{tmp}/mlruns", "MLFLOW_ALLOW_FILE_STORE=true")]


@pytest.mark.parametrize(("uri", "message"), BAD_STORES)
def test_a_bad_tracking_uri_fails_before_compute_naming_the_variable(tiny: Path, uri: str, message: str,
                                                                     monkeypatch, caplog) -> None:
    if "psycopg2" in message and importlib.util.find_spec("psycopg2"):
        pytest.skip("psycopg2 is installed here")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri.format(tmp=tiny))
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    assert main(["prepare"]) == 2
    assert "MLFLOW_TRACKING_URI" in caplog.text and message in caplog.text
    assert "secret" not in caplog.text
    assert not (tiny / "mistyped").exists() and not (tiny / "artifacts" / "prepare").exists()


@pytest.mark.parametrize("name", ["", "   "])
def test_an_empty_experiment_name_is_rejected_naming_the_key(project: Path, name: str) -> None:
    with pytest.raises(UsageError, match="tracking.experiment"):
        preflight(name)
    with pytest.raises(UsageError, match="tracking.experiment"):
        tracking.configure(name)  # stages check it too, before they compute


def test_a_deleted_experiment_is_rejected_naming_the_key(project: Path) -> None:
    MlflowClient().delete_experiment(tracking.configure(EXPERIMENT))
    with pytest.raises(UsageError, match="tracking.experiment: 'ast-dd-test' is deleted"):
        tracking.configure(EXPERIMENT)


def test_a_usable_store_passes(project: Path) -> None:
    check_tracking_store(tracking.tracking_uri())
