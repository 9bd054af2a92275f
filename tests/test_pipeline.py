"""End to end (tiny profile on digits, two distillation seeds): `ast-dd run --jobs 2`, caching, partial reruns,
MLflow runs, DVC experiments."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from tiny import init_repository, scratch_env, write_tiny_params

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


def sh(cmd: list[str], cwd: Path, env: dict[str, str]) -> str:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout + result.stderr


SEED_CELLS = {f"{stage}@{method}-1-{seed}" for stage in ("distill", "evaluate") for method in ("ast", "mtt")
              for seed in (0, 1)}


def ran_stages(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A scratch copy of the project on the tiny profile, with its own git, DVC and MLflow store."""
    path = tmp_path_factory.mktemp("project")
    for item in ("ast_core", "pipeline", "bin", "dvc.yaml"):
        source = ROOT / item
        (shutil.copytree if source.is_dir() else shutil.copy)(source, path / item)
    params = yaml.safe_load(write_tiny_params(path).read_text())
    params["distill"]["seeds"] = [0, 1]
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**scratch_env(path, BIN), "OMP_NUM_THREADS": "2"}
    init_repository(path, env, "tiny project")
    return path, env


@pytest.fixture(scope="module")
def first_run(project) -> str:
    path, env = project
    return sh(["ast-dd", "run", "--jobs", "2"], path, env)


def test_repro_runs_every_stage_and_writes_artifacts(project, first_run) -> None:
    path, _ = project
    expected = {"prepare", "buffer@ast", "buffer@sgd", "convexify@ast", "convexify@sgd", "init", "baselines", "report",
                *SEED_CELLS}
    assert expected <= ran_stages(first_run)
    lock = yaml.safe_load((path / "dvc.lock").read_text())["stages"]
    assert expected <= set(lock)
    for relative in ("artifacts/distill/ast/ipc1/seed0/grid.png", "artifacts/evaluate/ast/ipc1/seed0/metrics.json",
                     "artifacts/init/ipc1_pca.png", "artifacts/buffer/ast/step_sq_norm.png",
                     "artifacts/buffer/ast/grad_norm.png", "artifacts/convex/sgd/expert_000.mct2.safetensors",
                     "artifacts/report/tables/results.md", "artifacts/evaluate/ast/ipc1/seed0/results.json",
                     "artifacts/baselines/results.json", "artifacts/report/grids/ast-ipc1-s0-best.png",
                     "artifacts/report/grids/ast-ipc1-s0-final.png",
                     "artifacts/report/figures/accuracy_vs_iteration.png"):
        assert (path / relative).is_file(), relative
    results = (path / "artifacts/report/tables/results.md").read_text()
    assert "random (real subset)" in results and "±" in results
    table = pd.read_csv(path / "artifacts/report/tables/results.csv")
    distilled = table[table["method"].isin(["ast", "mtt"])]
    assert set(distilled["seeds"]) == {2} and distilled["per_seed"].str.count(" / ").eq(1).all()


def flat(tree: dict, prefix: str = "") -> dict[str, object]:
    """Nested metrics as DVC shows them: ``a.b.c`` -> value."""
    items: dict[str, object] = {}
    for key, value in tree.items():
        items.update(flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return items


def test_every_compared_number_is_its_own_scalar_metric(project, first_run) -> None:
    path, env = project
    files = json.loads(sh(["dvc", "metrics", "show", "--json"], path, env))[""]["data"]
    columns = [key for metrics in files.values() for key in flat(metrics["data"])]
    values = [value for metrics in files.values() for value in flat(metrics["data"]).values()]
    assert len(columns) == len(set(columns)), "a key in two files gets a path prefix in `dvc exp show`"
    assert all(isinstance(value, int | float) and not isinstance(value, bool) for value in values)
    cells = {f"{name}.convnet.{stat}" for name in ("ast_ipc1_s0", "ast_ipc1_s1", "mtt_ipc1_s0", "mtt_ipc1_s1",
                                                    "random_ipc1", "kmeans_ipc1", "herding_ipc1", "kcenter_ipc1")
             for stat in ("mean", "std")}
    assert cells | {"ast_ipc1_s0.syn_lr", "full_data.convnet.mean"} <= set(columns)


def test_second_repro_does_nothing(project, first_run) -> None:
    path, env = project
    output = sh(["dvc", "repro"], path, env)
    assert ran_stages(output) == set()
    assert "up to date" in sh(["dvc", "status"], path, env)


def test_hand_rerun_of_a_finished_cell_leaves_dvc_up_to_date(project, first_run) -> None:
    """Wall-clock times live outside DVC outputs (artifacts/timing/), so rerunning a cell reproduces them."""
    path, env = project
    sh(["ast-dd", "distill", "--method", "ast", "--ipc", "1", "--seed", "0"], path, env)
    assert "up to date" in sh(["dvc", "status"], path, env)
    assert (path / "artifacts/timing/distill/ast/ipc1/seed0.json").is_file()
    for gitignore, entries in (("artifacts", {"/prepare", "/init"}), ("artifacts/buffer", {"/ast", "/sgd"}),
                               ("artifacts/distill/ast/ipc1", {"/seed0", "/seed1"})):
        assert entries <= set((path / gitignore / ".gitignore").read_text().splitlines())


def test_changing_a_distill_parameter_reruns_only_distill_evaluate_report(project, first_run) -> None:
    path, env = project
    params = yaml.safe_load((path / "params.yaml").read_text())
    params["distill"]["hyper"]["lr_img"] = 50.0
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    output = sh(["dvc", "repro"], path, env)
    assert ran_stages(output) == {*SEED_CELLS, "report"}


def test_changing_mct_anchors_reconvexifies_without_retraining_experts(project, first_run) -> None:
    path, env = project
    params = yaml.safe_load((path / "params.yaml").read_text())
    params["buffer"]["mct_anchors"] = [*params["buffer"]["mct_anchors"], 3]
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    output = sh(["dvc", "repro"], path, env)
    ran = ran_stages(output)
    assert {"convexify@ast", "convexify@sgd"} <= ran
    assert not {stage for stage in ran if stage.startswith(("buffer@", "prepare", "init", "baselines"))}
    assert (path / "artifacts/convex/sgd/expert_000.mct3.safetensors").is_file()


def test_mlflow_holds_nested_stage_runs_with_metrics(project, first_run) -> None:
    import mlflow

    path, _ = project
    mlflow.set_tracking_uri(f"sqlite:///{path / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["ast-dd-tiny"], output_format="pandas")
    stages = set(runs["tags.stage"])
    assert {"pipeline", "prepare", "buffer", "init", "distill", "evaluate", "baselines", "report"} <= stages
    parent = runs[runs["tags.stage"] == "pipeline"].sort_values("start_time").iloc[0]["run_id"]
    first = runs[runs["tags.mlflow.parentRunId"] == parent]
    assert {"prepare", "buffer", "distill", "evaluate", "report"} <= set(first["tags.stage"])
    evaluate = first[first["tags.stage"] == "evaluate"]
    assert evaluate["metrics.test_acc_convnet_mean"].between(0, 100).all()
    assert first[first["tags.stage"] == "buffer"]["metrics.avg_var_mean"].notna().all()
    assert set(runs["status"]) == {"FINISHED"}
    distill_id = first[first["tags.stage"] == "distill"].iloc[0]["run_id"]
    history = mlflow.tracking.MlflowClient().get_metric_history(distill_id, "matching_loss")
    assert len(history) == 4  # one point per iteration of the tiny profile


def test_dvc_experiment_lands_in_mlflow_with_its_name(project, first_run) -> None:
    import mlflow

    path, env = project
    output = sh(["dvc", "exp", "run", "-n", "tiny-exp", "-S", "distill.seeds=[3]"], path, env)
    # a distillation seed reuses the split, the experts and the initialisation
    assert ran_stages(output) == {f"{stage}@{method}-1-3" for stage in ("distill", "evaluate")
                                  for method in ("ast", "mtt")} | {"report"}
    mlflow.set_tracking_uri(f"sqlite:///{path / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["ast-dd-tiny"], filter_string="tags.dvc_exp_name = 'tiny-exp'",
                              output_format="pandas")
    assert {"distill", "evaluate", "report"} <= set(runs["tags.stage"])
    assert set(runs[runs["tags.stage"] == "distill"]["tags.distill_seed"]) == {"3"}
    assert "tiny-exp" in sh(["dvc", "exp", "show", "--no-pager", "--csv"], path, env)


@pytest.mark.skipif(sys.prefix == sys.base_prefix, reason="the tests do not run in a virtualenv")
def test_dvc_experiment_runs_with_the_project_venv_off_path(project, first_run) -> None:
    """`.venv/bin/dvc exp run` as the README shows it, with the virtualenv not activated."""
    path, env = project
    (path / ".venv").symlink_to(sys.prefix)
    bare = {**env, "PATH": os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if Path(p) != BIN)}
    output = sh([str(BIN / "dvc"), "exp", "run", "-n", "no-venv", "-S", "distill.hyper.lr_img=300",
                 "-S", "distill.seeds=[0]"], path, bare)
    assert {"distill@ast-1-0", "evaluate@ast-1-0"} <= ran_stages(output)
    header = sh([str(BIN / "dvc"), "exp", "show", "--no-pager", "--csv"], path, bare).splitlines()[0].split(",")
    assert {"ast_ipc1_s0.convnet.mean", "random_ipc1.convnet.mean", "full_data.convnet.mean"} <= set(header)
