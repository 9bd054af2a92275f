"""Studies as DVC experiments: the plan a study overlay becomes, its page from a hand-made record (numbers
checked by hand), and end to end on the tiny profile: `ast-dd study run` through DVC, a rerun that recomputes
nothing finished, and a killed study that resumes its unfinished distillation from the checkpoint."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from tiny import init_repository, scratch_env, write_tiny_params

from pipeline.schema import ParamsError
from pipeline.studies import SHARED_STAGES, plan, point_label, uncached_stages
from pipeline.study_report import render

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PAIR = """\
# Two rows of the tiny profile, two seeds.
#   ast-dd study run pair
study:
  title: "A pair of rows"
distill:
  methods: [ast, mtt]
  seeds: [0, 1]
"""


def study_project(path: Path, studies: dict[str, str]) -> Path:
    """A scratch copy of the project on the tiny profile with the given study overlays."""
    for item in ("ast_core", "pipeline", "bin", "dvc.yaml"):
        source = ROOT / item
        (shutil.copytree if source.is_dir() else shutil.copy)(source, path / item)
    write_tiny_params(path)
    (path / "profiles/studies").mkdir(parents=True)
    for name, text in studies.items():
        (path / f"profiles/studies/{name}.yaml").write_text(text)
    return path


def test_a_study_is_a_shared_experiment_then_one_per_row_and_seed(tmp_path: Path) -> None:
    project = study_project(tmp_path, {"pair": PAIR})
    shared, *rows = plan("pair", project / "params.yaml")
    assert shared.name == "pair-shared" and shared.targets == SHARED_STAGES and shared.row is None
    assert shared.overrides["buffer.train"] == ["ast", "sgd"] and shared.overrides["study.name"] == "pair"
    assert [(e.name, e.row, e.seed) for e in rows] == [("pair-ast-s0", "ast", 0), ("pair-ast-s1", "ast", 1),
                                                       ("pair-mtt-s0", "mtt", 0), ("pair-mtt-s1", "mtt", 1)]
    mtt = rows[2].overrides
    assert (mtt["distill.methods"], mtt["distill.seeds"], mtt["study.name"]) == (["mtt"], [0], "pair")
    assert mtt["buffer.train"] == ["ast", "sgd"]   # mtt's own experts and the initialisation's (init.buffer: ast)
    assert rows[0].overrides["buffer.train"] == ["ast"] and rows[0].targets == ()
    assert mtt["study.title"] == "A pair of rows" and mtt["distill.methods"] == ["mtt"]


def test_a_sweep_is_one_experiment_per_point_row_and_seed_scored_on_validation(tmp_path: Path) -> None:
    text = PAIR.replace("study:\n", "study:\n  grid:\n    distill.hyper.lr_img: [10.0, 20.0]\n")
    project = study_project(tmp_path, {"sweep": text})
    shared, *rows = plan("sweep", project / "params.yaml")
    assert "baselines" not in shared.targets and all(e.targets == ("distill",) for e in rows)
    assert len(rows) == 8 and rows[0].name == "sweep-ast-s0-lr_img10.0"
    assert rows[0].overrides["distill.hyper.lr_img"] == 10.0 and rows[-1].overrides["distill.hyper.lr_img"] == 20.0
    assert not any(key.startswith("study.grid") for key in rows[0].overrides)
    assert point_label({"distill.per_ipc.10.max_start_epoch": 4, "distill.hyper.expert_epochs": 2}) == \
        "max_start_epoch4-expert_epochs2"


@pytest.mark.parametrize(("text", "message"), [
    (PAIR.replace("[ast, mtt]", "[ast, nope]"), "distill.methods"),
    (PAIR.replace("  seeds: [0, 1]\n", "  seeds: [0, 1]\n  per_ipc:\n    '1':\n      max_start_epoch: 9\n"),
     "distill.per_ipc.1.max_start_epoch"),
    (PAIR.replace("study:\n", "study:\n  grid:\n    distill.hyper.lr_img: []\n"), "study.grid.distill.hyper.lr_img"),
])
def test_a_bad_study_fails_before_any_experiment_naming_the_key(tmp_path: Path, text: str, message: str) -> None:
    project = study_project(tmp_path, {"bad": text})
    with pytest.raises(ParamsError, match=re.escape(message)):
        plan("bad", project / "params.yaml")
    with pytest.raises(ParamsError, match="study 'nope' is unknown; allowed: bad"):
        plan("nope", project / "params.yaml")


def cell(row: str, seed: int, accuracies: list[float], validation: list[list[float]]) -> dict:
    return {"row": row, "ipc": 1, "seed": seed, "point": {}, "experiment": f"t-{row}-s{seed}", "distilled": True,
            "kept_iteration": 4, "validation": validation, "test": accuracies, "protocol": "a protocol",
            "machine": "a machine"}


def test_the_page_pairs_rows_seed_by_seed(tmp_path: Path) -> None:
    """Row b beats row a by 1, 2 and 3 points on seeds 0-2: +2.00 ± 1.00, t = 2 / (1 / sqrt 3) on 2 degrees of
    freedom, p = 0.0742 (not separated: p >= 0.05). Each seed's mean is over its two test networks."""
    record = {"study": "t", "title": "T", "scored_on": "test", "rows": ["a", "b"], "ipcs": [1], "seeds": [0, 1, 2],
              "grid": {}, "buffers": {}, "missing": ["t-c-s0"],
              "baselines": [{"method": "random", "ipc": 1, "accuracies": [40.0, 42.0], "mean": 41.0}],
              "cells": [cell("a", 0, [50.0, 52.0], [[0, 30.0], [4, 40.0]]),
                        cell("a", 1, [60.0, 60.0], [[0, 30.0], [4, 42.0]]),
                        cell("a", 2, [70.0, 70.0], [[0, 30.0], [4, 44.0]]),
                        cell("b", 0, [51.0, 53.0], [[0, 30.0], [4, 50.0]]),
                        cell("b", 1, [62.0, 62.0], [[0, 30.0], [4, 50.0]]),
                        cell("b", 2, [73.0, 73.0], [[0, 30.0], [4, 50.0]])]}
    page = render(record, tmp_path).read_text()
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[1:-1]]
            for line in page.splitlines() if line.startswith("| ")}
    header = rows["row"]
    a, b = (dict(zip(header, rows[name], strict=True)) for name in ("a", "b"))
    assert (a["test_acc"], a["per_seed"]) == ("60.33 ± 9.50", "51.00 / 60.00 / 70.00")
    assert b["vs_first"] == "+2.00 ± 1.00 (p 0.0742, not separated)"
    assert a["vs_random"] == "+19.33 ± 9.50 (p 0.072, not separated)"   # t = 3.525: 1 - t / sqrt(t² + 2)
    assert dict(zip(header, rows["random (real subset)"], strict=True))["test_acc"] == "41.00 ± 1.41"
    assert "Not finished yet (rerun the command to run them): t-c-s0." in page
    assert (tmp_path / "t-convergence-ipc1.png").stat().st_size > 0 and "(t-convergence-ipc1.png)" in page


@pytest.mark.parametrize("record", sorted((ROOT / "docs/studies").glob("*.json")), ids=lambda path: path.stem)
def test_each_committed_study_page_is_what_its_committed_record_renders(record: Path, tmp_path: Path) -> None:
    """docs/studies/<name>.md holds no hand-typed number: rendering the committed record gives it back."""
    page = render(json.loads(record.read_text()), tmp_path)
    assert page.read_text() == record.with_suffix(".md").read_text()


# ------------------------------------------------------------------------------------------------- end to end
def sh(cmd: list[str], cwd: Path, env: dict[str, str]) -> str:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """The tiny project with the `pair` study as a git + DVC repository, and its environment."""
    path = study_project(tmp_path_factory.mktemp("study"), {"pair": PAIR})
    env = scratch_env(path, BIN)
    init_repository(path, env, "tiny study project")
    return path, env


def ran_stages(output: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", output)


@pytest.mark.slow
def test_study_runs_as_dvc_experiments_and_a_rerun_recomputes_nothing(tiny_study) -> None:
    path, env = tiny_study
    params_before = (path / "params.yaml").read_text()
    output = sh(["ast-dd", "study", "run", "pair", "--jobs", "2"], path, env)
    ran = ran_stages(output)
    assert ran.count("buffer@ast") == 1 and ran.count("baselines") == 1   # shared: once, then the run-cache
    assert sorted(s for s in ran if s.startswith("distill@")) == [f"distill@{m}-1-{s}" for m in ("ast", "mtt")
                                                                  for s in (0, 1)]
    assert (path / "params.yaml").read_text() == params_before   # the workspace is left as it was
    listed = sh(["dvc", "exp", "list", "--name-only"], path, env).split()
    assert {"pair-shared", "pair-ast-s0", "pair-ast-s1", "pair-mtt-s0", "pair-mtt-s1"} <= set(listed)
    page = (path / "docs/studies/pair.md").read_text()
    record = json.loads((path / "docs/studies/pair.json").read_text())
    assert {(c["row"], c["seed"]) for c in record["cells"]} == {(m, s) for m in ("ast", "mtt") for s in (0, 1)}
    assert all(len(c["test"]) == 2 for c in record["cells"]) and not record["missing"]
    assert "| ast " in page and "| mtt " in page and "random (real subset)" in page
    assert "## Expert buffers" in page and "(pair-convergence-ipc1.png)" in page

    import mlflow
    mlflow.set_tracking_uri(f"sqlite:///{path / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["ast-dd-tiny"], filter_string="tags.stage = 'evaluate'")
    assert set(zip(runs["tags.study"], runs["tags.method"], runs["tags.distill_seed"], runs["tags.ipc"],
                   strict=True)) == {("pair", m, str(s), "1") for m in ("ast", "mtt") for s in (0, 1)}

    again = sh(["ast-dd", "study", "run", "pair", "--jobs", "2"], path, env)
    assert "5 experiments, 5 finished, 0 to run" in again and not ran_stages(again)
    sh(["dvc", "exp", "remove", "pair-mtt-s1"], path, env)
    redo = sh(["ast-dd", "study", "run", "pair"], path, env)
    assert "1 to run" in redo and not {s for s in ran_stages(redo) if s.split("@")[0] in ("distill", "evaluate",
                                                                                      "buffer", "baselines")}


@pytest.mark.slow
def test_a_killed_study_resumes_its_distillation_from_the_checkpoint(tiny_study) -> None:
    path, env = tiny_study
    longer = yaml.safe_load(PAIR)
    longer["distill"] |= {"methods": ["ast"], "seeds": [0], "checkpoint_every": 5, "eval_every": 100,
                          "per_ipc": {"1": {"iterations": 300}}}
    (path / "profiles/studies/long.yaml").write_text("#   ast-dd study run long\n" + yaml.safe_dump(longer))
    sh(["git", "add", "-A"], path, env)
    sh(["git", "commit", "-qm", "a long study"], path, env)
    checkpoints = path / "artifacts/checkpoints/distill/ast/ipc1/seed0"
    process = subprocess.Popen(["ast-dd", "study", "run", "long"], cwd=path, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 600
    while not list(checkpoints.glob("*/distill_checkpoint.pt")):
        assert process.poll() is None, "the study finished before it could be killed"
        assert time.monotonic() < deadline, "timed out waiting for the first checkpoint"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)   # the study and every experiment it started, as a lost machine
    process.wait()
    output = sh(["ast-dd", "study", "run", "long"], path, env)
    assert "resumed distillation from" in output
    assert "long-shared" not in re.findall(r"\[([^\]]+)\] Running stage", output)   # it had finished
    assert not list(checkpoints.glob("*/distill_checkpoint.pt"))   # a finished cell drops its checkpoint
    record = json.loads((path / "docs/studies/long.json").read_text())
    assert [(c["row"], c["seed"]) for c in record["cells"]] == [("ast", 0)] and not record["missing"]


def test_uncached_stages_names_lock_outputs_missing_from_the_cache(tmp_path) -> None:
    """A fresh clone has dvc.lock but not its outputs: each temporary experiment would run those stages again
    (DVC trusts the lock before its run-cache), so the study names them before it starts."""
    env = scratch_env(tmp_path, BIN)
    init_repository(tmp_path, env, "empty")
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n"
        "  first:\n    cmd: python -c \"open('a', 'w').write('1')\"\n    outs: [a]\n"
        "  second:\n    cmd: python -c \"open('b', 'w').write(open('a').read())\"\n    deps: [a]\n    outs: [b]\n")
    subprocess.run(["dvc", "repro", "-q"], cwd=tmp_path, env=env, check=True, capture_output=True)
    assert uncached_stages(tmp_path, ["second"]) == []
    shutil.rmtree(tmp_path / ".dvc" / "cache")
    assert uncached_stages(tmp_path, ["second"]) == ["first", "second"]
    assert uncached_stages(tmp_path, ["first"]) == ["first"]
