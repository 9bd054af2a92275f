"""Report tables built from MLflow rows, and the ablation command's experiment naming."""

from __future__ import annotations

import pandas as pd
import pytest

from pipeline.ablation import experiment_name, run_ablations
from pipeline.params import Params
from pipeline.schema import ParamsError
from pipeline.stages.report import seeds_frame


def experiments(rows: list[tuple[str, str, float]]) -> pd.DataFrame:
    return pd.DataFrame([{"experiment": name, "method": method, "ipc": 10, "networks": "3", "eval_iterations": "300",
                          "protocol": "ast", "mean": mean} for name, method, mean in rows])


def test_seeds_frame_folds_seeded_experiments_into_mean_and_population_std() -> None:
    frame = seeds_frame(experiments([("ablation-mct-s0", "ast", 70.0), ("ablation-mct-s1", "ast", 72.0),
                                     ("ablation-mct-s2", "ast", 74.0), ("ablation-mct-s0", "mtt", 60.0),
                                     ("ablation-mct-s1", "mtt", 61.0), ("ablation-buffers", "buf_sgd", 50.0)]))
    assert list(frame["method"]) == ["ast", "mtt"]  # the unseeded experiment is not folded in
    ast = frame[frame["method"] == "ast"].iloc[0]
    assert ast["group"] == "ablation-mct" and ast["seeds"] == 3
    assert ast["test_acc"] == "72.00 ± 1.63"  # std of (70, 72, 74) with ddof 0 = sqrt(8/3)
    assert ast["per_seed"] == "70.00 / 72.00 / 74.00"
    assert frame[frame["method"] == "mtt"].iloc[0]["test_acc"] == "60.50 ± 0.50"


def test_seeds_frame_of_unseeded_experiments_is_empty() -> None:
    assert seeds_frame(experiments([("ablation-modules", "ast", 70.0)])).empty
    assert seeds_frame(pd.DataFrame()).empty


def test_experiment_names_carry_the_seed() -> None:
    assert experiment_name("mct", None) == "ablation-mct"
    assert experiment_name("mct", 2) == "ablation-mct-s2"


@pytest.mark.parametrize(("groups", "seeds", "message"), [(["tables"], None, "--group"), (None, [], "--seeds"),
                                                          (None, [1, 1], "--seeds"), (None, [-1], "--seeds")])
def test_ablate_rejects_bad_arguments_before_running(tmp_path, monkeypatch, groups, seeds, message) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("seed: 0\n")
    with pytest.raises(ParamsError, match=message):
        run_ablations(Params(), "params.yaml", groups=groups, seeds=seeds)


def test_results_table_keeps_the_current_matrix_and_says_whether_each_cell_distilled(tmp_path, monkeypatch) -> None:
    import json

    from pipeline.stages import report

    monkeypatch.chdir(tmp_path)
    for method, ipc, kept in (("mtt_rep", 1, 10), ("mtt_rep", 10, 0), ("ast", 10, 40)):
        result = {"mean": 70.0, "std": 1.0, "accuracies": [69.0, 71.0]}
        details = {"method": method, "ipc": ipc, "syn_lr": 0.02, "protocol": "p", "results": {"convnet": result}}
        (tmp_path / f"artifacts/evaluate/{method}/ipc{ipc}").mkdir(parents=True)
        (tmp_path / f"artifacts/evaluate/{method}/ipc{ipc}/results.json").write_text(json.dumps(details))
        (tmp_path / f"artifacts/distill/{method}/ipc{ipc}").mkdir(parents=True)
        (tmp_path / f"artifacts/distill/{method}/ipc{ipc}/result.json").write_text(json.dumps({"best_iteration": kept}))
    frame, _ = report.results_frame({("mtt_rep", 1), ("mtt_rep", 10)})
    assert set(zip(frame["method"], frame["ipc"], strict=True)) == {("mtt_rep", 1), ("mtt_rep", 10)}
    assert dict(zip(frame["ipc"], frame["distilled"], strict=True)) == {1: "yes", 10: "NO: initial set kept"}
