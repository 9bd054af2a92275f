"""`ast-dd study buffers|modules|sweep` on the tiny profile: tables, figures, resume, bad settings early."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from tiny import write_tiny_params

from pipeline import study
from pipeline.params import load_params
from pipeline.schema import ParamsError
from pipeline.stages import prepare

ROOT = Path(__file__).resolve().parents[1]
OVERLAY = {"buffer": {"num_experts": 1, "epochs": 4}, "distill": {"per_ipc": {"1": {"iterations": 2}}, "eval_every": 1},
           "evaluate": {"num_models": 1, "iterations": 5},
           "study": {"method": "mtt", "rows": ["mtt", "mct2", "rep_init"], "seeds": [0, 1]}}


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory):
    """A scratch folder holding the tiny profile and the overlay; the studies run in it."""
    path = tmp_path_factory.mktemp("study")
    write_tiny_params(path)
    (path / "overlay.yaml").write_text(yaml.safe_dump(OVERLAY))
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.chdir(path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    params = load_params("params.yaml", ["overlay.yaml"])
    prepare.run(params)
    yield path, params
    torch.set_num_threads(threads)
    monkeypatch.undo()


def test_buffers_study_writes_table_vii_and_resumes_without_recomputing(project) -> None:
    path, params = project
    frame = study.run(params, "buffers")
    table = pd.read_csv(path / "artifacts/report/tables/buffers_study.csv")
    assert list(table.columns[:4]) == ["variant", "avg_var", "expert_test_acc", "distilled_test_acc"]
    assert set(table["variant"][:2]) == {"ast", "sgd"} and table["variant"].iloc[-1].startswith("random real")
    assert all(" ± " in value for value in table["distilled_test_acc"])
    assert (table["seeds"] == 2).all() and len(frame) == 3
    for figure in ("buffers_study_grad_norm.png", "buffers_study_step_sq_norm.png"):
        assert (path / "artifacts/report/figures" / figure).is_file()
    cells = sorted((path / "artifacts/study/buffers/cells").glob("*.json"))
    stamps = [cell.stat().st_mtime_ns for cell in cells]
    assert len(cells) == 6  # 2 variants x 2 seeds + 2 starts
    study.run(params, "buffers")
    assert [cell.stat().st_mtime_ns for cell in cells] == stamps
    # A cell distilled with other settings is redone, the others are kept: one table, one protocol.
    changed = path / "artifacts/study/buffers/cells/sgd-ipc1-s0.json"
    cell = json.loads(changed.read_text())
    changed.write_text(json.dumps({**cell, "config": {**cell["config"], "max_start_epoch": 99}}))
    study.run(params, "buffers")
    assert json.loads(changed.read_text())["config"] == cell["config"]
    kept = [(c.stat().st_mtime_ns, s) for c, s in zip(cells, stamps, strict=True) if c != changed]
    assert all(now == before for now, before in kept)


def test_modules_study_writes_rows_and_convergence_curves(project) -> None:
    path, params = project
    study.run(params, "modules")
    table = pd.read_csv(path / "artifacts/report/tables/modules_study.csv")
    assert list(table.columns) == ["row", "ipc", "seeds", "test_acc", "per_seed", "selected_iterations", "lr_img"]
    assert list(table["row"][:3]) == ["mtt", "mct2", "rep_init"]
    curves = pd.read_csv(path / "artifacts/report/tables/convergence_study.csv")
    assert sorted(set(curves["iteration"])) == [0, 1, 2]
    assert set(curves["row"]) == {"mtt", "mct2", "rep_init"}
    protocol = (path / "artifacts/report/tables/modules_study.md").read_text()
    assert "ipc 1: 2 iterations" in protocol  # each ipc's own settings (distill.per_ipc), not distill.hyper's
    assert (path / "artifacts/study/experts/sgd/convex/expert_000.mct2.safetensors").is_file()
    assert (path / "artifacts/report/figures/modules_study_convergence_ipc1.png").is_file()


def test_sweep_scores_every_grid_point_on_validation_only(project) -> None:
    path, params = project
    grid = {"study": {"grid": {"iterations": [1, 2], "lr_img": [10.0]}}}
    (path / "sweep.yaml").write_text(yaml.safe_dump(grid))
    params = load_params("params.yaml", ["overlay.yaml", "sweep.yaml"])
    study.run(params, "sweep")
    table = pd.read_csv(path / "artifacts/report/tables/sweep_study.csv")
    assert list(table.columns[:4]) == ["row", "ipc", "iterations", "lr_img"] and set(table["row"]) == {"mtt"}
    assert len(table) == 2 * len(params.distill.ipcs) and (table["seeds"] == 2).all()
    cells = sorted((path / "artifacts/study/sweep/cells").glob("*.json"))
    assert len(cells) == 2 * 2 * len(params.distill.ipcs)
    for cell in (json.loads(c.read_text()) for c in cells):
        assert "test_mean" not in cell  # selection sweep: the test split is never scored
        assert [p["iteration"] for p in cell["validation"]] == list(range(cell["point"]["iterations"] + 1))
    assert (path / "artifacts/report/figures/sweep_study.png").is_file()


def test_sweep_num_experts_limits_the_trajectories_matched(project, monkeypatch) -> None:
    path, params = project
    (path / "sweep.yaml").write_text(yaml.safe_dump({"buffer": {"num_experts": 2},
                                                     "study": {"seeds": [0], "grid": {"iterations": [1],
                                                                                      "num_experts": [1, 2]}}}))
    params = load_params("params.yaml", ["overlay.yaml", "sweep.yaml"])
    loaded = []
    real_load = study.load_buffer
    monkeypatch.setattr(study, "load_buffer", lambda *args: loaded.append(len(real_load(*args))) or real_load(*args))
    study.run(params, "sweep")
    assert loaded == [1, 2] * len(params.distill.ipcs)
    table = pd.read_csv(path / "artifacts/report/tables/sweep_study.csv")
    assert sorted(table["num_experts"].dropna()) == sorted([1, 2] * len(params.distill.ipcs))


def test_sweep_table_shows_the_settings_of_keys_outside_a_point(tmp_path: Path, monkeypatch) -> None:
    """Points of sweeps with different grids share one table; a key a point did not vary shows the value its cells
    were distilled with (stored in the cell), not a blank that would read as "the current default"."""
    write_tiny_params(tmp_path)
    monkeypatch.chdir(tmp_path)
    cells = tmp_path / "artifacts/study/sweep/cells"
    cells.mkdir(parents=True)
    validation = [{"iteration": 0, "val_acc": 50.0}, {"iteration": 1, "val_acc": 60.0}]
    for name, point, config in [("a", {"lr_img": 10.0}, {"lr_img": 10.0, "max_start_epoch": 4}),
                                ("b", {"max_start_epoch": 5}, {"lr_img": 100.0, "max_start_epoch": 5}),
                                ("c", {"max_start_epoch": 6}, None)]:
        cell = {"row": "mtt", "ipc": 1, "seed": 0, "point": point, "validation": validation, "selected_iteration": 1}
        (cells / f"{name}.json").write_text(json.dumps(cell if config is None else {**cell, "config": config}))
    study.sweep_report(load_params("params.yaml"))
    table = pd.read_csv(tmp_path / "artifacts/report/tables/sweep_study.csv")
    shown = {(row.lr_img, row.max_start_epoch) for row in table.itertuples()}
    assert (10.0, 4) in shown and (100.0, 5) in shown  # filled from each cell's config
    assert any(pd.isna(lr) and start == 6 for lr, start in shown)  # a cell that recorded no settings stays blank


@pytest.mark.parametrize(("change", "message"), [
    ({"study": {"grid": {"lr_image": [1.0]}}}, "study.grid.lr_image: not a distill.hyper key"),
    ({"study": {"grid": {"lr_img": []}}}, "study.grid.lr_img: list at least one value"),
    ({"study": {"grid": {"num_experts": [0]}}}, "study.grid.num_experts: 0 must be a positive integer"),
    ({"study": {"grid": {"num_experts": [99]}}}, "study.grid.num_experts: 99 is more than the buffer.num_experts"),
])
def test_bad_sweep_grid_is_rejected_when_params_load(tmp_path: Path, change: dict, message: str) -> None:
    (tmp_path / "overlay.yaml").write_text(yaml.safe_dump(change))
    with pytest.raises(ParamsError, match=message):
        load_params(ROOT / "params.yaml", ["tiny", tmp_path / "overlay.yaml"])


@pytest.mark.parametrize(("change", "message"), [
    ({"study": {"grid": {}, "method": "mtt"}}, "study.grid: map distill.hyper keys"),
    ({"study": {"grid": {"max_start_epoch": [99]}, "method": "mtt"}}, "study.grid point max_start_epoch=99 "),
    ({"study": {"grid": {"lr_img": [1.0]}, "method": None}}, "study.method"),
])
def test_bad_sweep_settings_fail_before_compute(tmp_path: Path, change: dict, message: str) -> None:
    (tmp_path / "overlay.yaml").write_text(yaml.safe_dump(change))
    params = load_params(ROOT / "params.yaml", ["tiny", tmp_path / "overlay.yaml"])
    with pytest.raises(ParamsError, match=message):
        study.check(params, "sweep")


@pytest.mark.parametrize(("change", "message"), [
    ({"study": {"method": None}}, "study.method"),
    ({"study": {"method": "rep_init"}}, "representative"),
    ({"study": {"rows": []}}, "study.rows"),
    ({"study": {"rows": ["mct4"]}}, "mct_anchors"),
])
def test_bad_study_settings_fail_before_compute(tmp_path: Path, change: dict, message: str) -> None:
    (tmp_path / "overlay.yaml").write_text(yaml.safe_dump(change))
    params = load_params(ROOT / "params.yaml", ["tiny", tmp_path / "overlay.yaml"])
    kind = "buffers" if "method" in change["study"] else "modules"
    with pytest.raises(ParamsError, match=message):
        study.check(params, kind)
