"""`ast-dd run --profile`: an overlay reaches DVC as `dvc exp run -S ++key=value`, which writes exactly the
settings `load_params(params.yaml, [profile])` resolves."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest

from pipeline import runner
from pipeline.params import load_params
from pipeline.schema import ParamsError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("profile", ["tiny", "gpu"])
def test_profile_written_as_dvc_writes_it_resolves_like_the_overlay(tmp_path: Path, profile: str) -> None:
    text = runner.overridden_params(ROOT / "params.yaml", runner.profile_overrides([profile], ROOT), add=True)
    (tmp_path / "params.yaml").write_text(text)
    assert load_params(tmp_path / "params.yaml") == load_params(ROOT / "params.yaml", [profile])
    assert "# Default profile" in text  # DVC keeps params.yaml's comments


def test_run_with_a_profile_is_a_workspace_dvc_experiment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "params.yaml").write_bytes((ROOT / "params.yaml").read_bytes())
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "small.yaml").write_text("distill:\n  ipcs: [1]\n  per_ipc:\n    '1':\n      lr_img: 30\n")
    monkeypatch.chdir(tmp_path)
    calls: list[list[str]] = []
    monkeypatch.setattr(runner, "run_dvc", lambda args, *rest: calls.append(list(args)) or "")
    monkeypatch.setattr(runner.tracking, "pipeline_run", lambda *a, **k: contextlib.nullcontext("run-id"))
    params = load_params("params.yaml", ["small"])
    runner.run_pipeline(params, "params.yaml", targets=["report"], force=True, profiles=["small"])
    runner.run_pipeline(params, "params.yaml")
    runner.run_pipeline(params, "params.yaml", profiles=["small"], name="small")
    runner.run_pipeline(params, "params.yaml", name="baseline")
    monkeypatch.setattr(runner.tracking, "pipeline_run", None)  # a queued experiment opens no MLflow run here
    runner.run_pipeline(params, "params.yaml", profiles=["small"], name="small", queue=True)
    assert calls == [["exp", "run", "--force", "report", "-S", "++distill.ipcs=[1]",
                      "-S", "++distill.per_ipc.1.lr_img=30"], ["repro"],
                     ["exp", "run", "--name", "small", "-S", "++distill.ipcs=[1]",
                      "-S", "++distill.per_ipc.1.lr_img=30"],
                     ["exp", "run", "--name", "baseline"],
                     ["exp", "run", "--queue", "--name", "small", "-S", "++distill.ipcs=[1]",
                      "-S", "++distill.per_ipc.1.lr_img=30"]]
    (tmp_path / "profiles" / "bad.yaml").write_text("distill:\n  ipcs: [0]\n")
    with pytest.raises(ParamsError, match="distill.ipcs"):
        runner.run_pipeline(params, "params.yaml", profiles=["bad"])
    with pytest.raises(ParamsError, match="--name"):
        runner.run_pipeline(params, "params.yaml", name=" ")
    assert len(calls) == 5  # nothing ran


def test_a_progress_bar_redrawn_in_place_is_logged_once_in_its_final_state() -> None:
    assert runner.final_state("eval:  10%|#  | 1/10\reval:  50%|##  | 5/10\reval: 100%|###| 10/10\n") == (
        "eval: 100%|###| 10/10")
    assert runner.final_state("plain line \n") == "plain line"
    assert runner.final_state("bar 3/3\r          \r\n") == ""  # a bar that clears itself (leave=False)


def test_run_stages_starts_each_stage_after_its_inputs_and_at_most_jobs_at_once(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import threading
    import time

    from pipeline.stage_graph import StageNode

    nodes = [StageNode("prepare", ()), StageNode("buffer@a", ("prepare",)), StageNode("init", ("buffer@a",)),
             StageNode("baselines", ("buffer@a",)), StageNode("distill@x-1-0", ("buffer@a", "init")),
             StageNode("distill@x-1-1", ("buffer@a", "init")), StageNode("report", ("baselines", "distill@x-1-0",
                                                                                  "distill@x-1-1"))]
    events, running, lock = [], set(), threading.Lock()
    peak = []

    def fake_dvc(args, root=None, env=None, logger=None) -> str:
        stage = args[-1]
        with lock:
            running.add(stage)
            peak.append(len(running))
            events.append(("start", stage))
        time.sleep(0.05)
        with lock:
            running.discard(stage)
            events.append(("end", stage))
        assert env["OMP_NUM_THREADS"] and args[:3] == ["--wait-for-lock", "repro", "--single-item"]
        return ""

    monkeypatch.setattr(runner, "run_dvc", fake_dvc)
    runner.run_stages(nodes, jobs=2)
    order = {event: index for index, event in enumerate(events)}
    for node in nodes:
        assert all(order[("end", needed)] < order[("start", node.name)] for needed in node.upstream), node.name
    assert max(peak) == 2 and len(events) == 2 * len(nodes)


def test_run_stages_starts_nothing_after_a_failed_stage(monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.stage_graph import StageNode

    started = []

    def fake_dvc(args, root=None, env=None, logger=None) -> str:
        started.append(args[-1])
        if args[-1] == "buffer@a":
            raise runner.StageFailed("buffer@a failed")
        return ""

    monkeypatch.setattr(runner, "run_dvc", fake_dvc)
    with pytest.raises(runner.StageFailed, match="buffer@a failed"):
        runner.run_stages([StageNode("prepare", ()), StageNode("buffer@a", ("prepare",)),
                           StageNode("init", ("buffer@a",))], jobs=2)
    assert started == ["prepare", "buffer@a"]


def test_the_mlflow_parent_run_is_named_after_the_command(monkeypatch: pytest.MonkeyPatch) -> None:
    names = []

    def parent(experiment: str, run_name: str) -> contextlib.AbstractContextManager[str]:
        names.append(run_name)
        return contextlib.nullcontext("run-id")

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(runner.tracking, "pipeline_run", parent)
    monkeypatch.setattr(runner, "run_dvc", lambda *a, **k: "")
    params = load_params(ROOT / "params.yaml")
    runner.run_pipeline(params, "params.yaml", targets=["report"], force=True)
    assert names == ["ast-dd run --force report"]
