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
