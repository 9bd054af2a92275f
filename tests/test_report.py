"""Report tables from fake artifacts and MLflow rows (numbers checked by hand), and the ablation command's
experiment naming."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from pipeline import results_document
from pipeline.stages import report

ROOT = Path(__file__).resolve().parents[1]

TEST_SEEDS = [1000, 1001]


def experiments(rows: list[tuple[str, str, int | None, float]], protocol: str = "ast") -> pd.DataFrame:
    """An `experiments_frame` of (experiment, method, seed, mean) rows at ipc 10."""
    return pd.DataFrame([{"experiment": name, "method": method, "ipc": 10, "seed": seed, "networks": "3",
                          "eval_iterations": "300", "protocol": protocol, "mean": mean}
                         for name, method, seed, mean in rows]).astype({"seed": "Int64"})


def test_seeds_frame_folds_tagged_seeds_into_mean_and_sample_std() -> None:
    frame = report.seeds_frame(experiments([("exp", "ast", 2, 74.0), ("exp", "ast", 0, 70.0), ("exp", "ast", 1, 72.0),
                                            ("exp", "mtt", 0, 60.0), ("exp", "mtt", 1, 61.0),
                                            ("old", "ast", None, 50.0)]))
    assert list(frame["method"]) == ["ast", "mtt"]  # the run of unknown seed is not folded in
    ast = frame[frame["method"] == "ast"].iloc[0]
    assert (ast["experiment"], ast["seeds"], ast["distill_seeds"]) == ("exp", 3, "0 / 1 / 2")
    assert ast["test_acc"] == "72.00 ± 2.00"  # sample std of (70, 72, 74) = sqrt(8 / 2)
    assert ast["per_seed"] == "70.00 / 72.00 / 74.00"  # in seed order
    assert frame[frame["method"] == "mtt"].iloc[0]["test_acc"] == "60.50 ± 0.71"  # sqrt(0.5)


def test_experiments_frame_keeps_the_latest_run_per_seed(monkeypatch) -> None:
    def run(seed: str | None, time: int, mean: float) -> dict:
        return {"tags.dvc_exp_name": "exp", "tags.method": "ast", "tags.ipc": "10", "tags.distill_seed": seed,
                "start_time": time, "metrics.test_acc_convnet_mean": mean, "metrics.test_acc_convnet_std": 1.0,
                "params.evaluate.num_models": "5", "params.evaluate.iterations": "300",
                "params.evaluate.protocol": "ast", "tags.git_commit": "0123456789"}

    runs = pd.DataFrame([run("0", 2, 71.0), run("0", 1, 60.0), run("1", 0, 72.0), run(None, 0, 50.0)])
    monkeypatch.setattr(report.tracking, "configure", lambda experiment: "0")
    monkeypatch.setattr(report.mlflow, "search_runs", lambda **kwargs: runs)
    frame = report.experiments_frame("x")
    assert [(None if pd.isna(s) else s, m) for s, m in zip(frame["seed"], frame["mean"], strict=True)] == [
        (0, 71.0), (1, 72.0), (None, 50.0)]  # the seed-0 rerun replaces the earlier run; the untagged run stays
    assert report.seeds_frame(frame).iloc[0]["test_acc"] == "71.50 ± 0.71"


def test_seeds_frame_of_runs_without_a_seed_is_empty() -> None:
    assert report.seeds_frame(experiments([("ablation-modules", "ast", None, 70.0)])).empty
    assert report.seeds_frame(pd.DataFrame()).empty


def test_comparisons_pair_rows_by_seed_under_the_same_protocol() -> None:
    frame = report.comparisons_frame(pd.concat([
        experiments([("base", "mtt", seed, 70.0) for seed in (0, 1, 2)]
                    + [("exp", "ast", seed, mean) for seed, mean in ((0, 71.0), (1, 72.0), (2, 73.0))]
                    + [("exp", "one_seed", 0, 90.0)]),
        experiments([("other", "ast", seed, 10.0) for seed in (0, 1, 2)], protocol="mtt")]))
    assert len(frame) == 1  # one_seed shares a single seed, `other` was tested under another protocol
    row = frame.iloc[0]
    assert (row["experiment"], row["method"], row["vs_experiment"], row["vs_method"]) == ("exp", "ast", "base", "mtt")
    assert (row["seeds"], row["distill_seeds"], row["difference"]) == (3, "0 / 1 / 2", "+2.00 ± 1.00")
    assert row["p"] == "0.0742 (not separated)"  # t = 2 / (1 / sqrt 3) on 2 dof: p = 1 - t / sqrt(t² + 2)


def write_json(path: str, data: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data))


def scored(accuracies: list[float], seeds: list[int] = TEST_SEEDS, arch: str = "convnet") -> dict:
    """An EvalResult dict of these network accuracies."""
    return {"mean": sum(accuracies) / len(accuracies), "std": 0.0, "accuracies": accuracies, "seeds": seeds,
            "protocol": "ast", "arch": arch, "iterations": 300, "eval_split": "test", "lr": 0.01}


def distilled(method: str, ipc: int, seed: int, accuracies: list[float], kept: int) -> None:
    """One (cell, seed)'s distill result.json and evaluate results.json."""
    write_json(f"artifacts/distill/{method}/ipc{ipc}/seed{seed}/result.json",
               {"best_iteration": kept, "seed": seed, "validation_seeds": [0, 1, 2]})
    write_json(f"artifacts/evaluate/{method}/ipc{ipc}/seed{seed}/results.json",
               {"method": method, "ipc": ipc, "seed": seed, "syn_lr": 0.01, "protocol": "P", "test_seeds": TEST_SEEDS,
                "validation_seeds": [0, 1, 2], "results": {"convnet": scored(accuracies)}})


def baselines(kmeans_seeds: list[int] = TEST_SEEDS) -> None:
    """k-means at 70, random at 65 (ipc 10), full data at 80 after 1 epoch."""
    write_json("artifacts/baselines/results.json", {
        "protocol": "P", "test_seeds": TEST_SEEDS,
        "coresets": [{"method": "kmeans", "ipc": 10, **scored([69.0, 71.0], kmeans_seeds)},
                     {"method": "random", "ipc": 10, **scored([64.0, 66.0])}],
        "full_data": {**scored([80.0], TEST_SEEDS[:1]), "protocol": "real", "iterations": 1}})


def test_results_table_folds_seeds_and_compares_with_the_baselines(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    for seed, accuracies, kept in ((0, [70.0, 72.0], 40), (1, [72.0, 72.0], 0), (2, [73.0, 73.0], 30)):
        distilled("ast", 10, seed, accuracies, kept)
    distilled("ast", 10, 3, [0.0, 0.0], 40)  # a seed, an ipc and a method outside the matrix are left out
    distilled("ast", 1, 0, [0.0, 0.0], 40)
    distilled("mtt", 10, 0, [0.0, 0.0], 40)
    baselines()
    frame, note = report.results_frame({("ast", ipc, seed) for ipc in (10, 50) for seed in (0, 1, 2)})
    assert list(frame["method"]) == ["ast", "kmeans (real subset)", "random (real subset)", "full dataset (epochs: 1)"]
    ast = frame.iloc[0]
    assert (ast["ipc"], ast["seeds"], ast["networks"], ast["test_acc"]) == (10, 3, "2", "72.00 ± 1.00")
    assert (ast["per_seed"], ast["kept_iterations"]) == ("71.00 / 72.00 / 73.00", "40 / 0 (not distilled) / 30")
    # gains 1, 2, 3 over k-means: t = 2 / (1 / sqrt 3) = 3.464 on 2 dof, p = 1 - t / sqrt(t² + 2) = 0.0742
    assert (ast["vs_kmeans"], ast["p_kmeans"]) == ("+2.00 ± 1.00", "0.0742 (not separated)")
    # gains 6, 7, 8 over random: t = 7 sqrt 3 = 12.12, p = 1 - t / sqrt(t² + 2) = 0.00673
    assert (ast["vs_random"], ast["p_random"]) == ("+7.00 ± 1.00", "0.00673 (separated)")
    assert ast["gap_to_full"] == "8.00"
    kmeans = frame.iloc[1]
    assert (kmeans["test_acc"], kmeans["networks"], kmeans["seeds"]) == ("70.00 ± 1.41", "2", "")  # sample std
    for text in ("Test protocol: P.", "Test networks: seeds 1000, 1001;", "validation (set selection) networks: "
                 "seeds 0, 1, 2;", "distillation seeds: 0, 1, 2.", "over 2 test networks",
                 "1 network(s) trained 1 epoch(s) (protocol real)"):
        assert text in note


def test_no_gain_over_a_subset_scored_on_other_test_networks(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    distilled("ast", 10, 0, [71.0, 71.0], 40)
    baselines(kmeans_seeds=[7, 8])
    frame, note = report.results_frame({("ast", 10, 0)})
    ast = frame.iloc[0]
    assert (ast["vs_kmeans"], ast["p_kmeans"]) == ("n/a: other test networks", "")
    assert (ast["vs_random"], ast["p_random"]) == ("+6.00 ± 0.00", "n/a")  # one seed: no test


def test_curves_and_grids_are_named_per_seed(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    history = "iteration,matching_loss,syn_lr,inner_loss,inner_loss_balanced\n0,1.0,0.01,2.0,2.0\n1,0.9,0.01,1.9,1.9\n"
    for seed in (0, 1):
        folder = tmp_path / f"artifacts/distill/ast/ipc10/seed{seed}"
        folder.mkdir(parents=True)
        (folder / "history.csv").write_text(history)
        (folder / "validation.csv").write_text("iteration,val_acc\n0,50.0\n1,60.0\n")
        (folder / "grid.png").write_bytes(b"png")
    (tmp_path / "artifacts/report/curves").mkdir(parents=True)
    (tmp_path / "artifacts/report/curves/ast-ipc10.csv").write_text("stale")
    cells = {("ast", 10, 0), ("ast", 10, 1)}
    report.figures(cells)
    assert sorted(p.name for p in report.CURVES.iterdir()) == ["ast-ipc10-s0.csv", "ast-ipc10-s1.csv"]
    assert (report.FIGURES / "accuracy_vs_iteration.png").is_file()
    assert sorted(p.name for p in report.grids(cells)) == ["ast-ipc10-s0-best.png", "ast-ipc10-s1-best.png"]




def test_the_committed_results_page_is_what_the_committed_tables_render() -> None:
    """docs/results.md holds no hand-typed number: rendering the committed tables gives it back exactly."""
    assert results_document.render(ROOT / "artifacts/report/tables") == (ROOT / "docs/results.md").read_text()


def test_results_page_shows_tables_with_their_origin_and_points_to_the_studies(tmp_path: Path) -> None:
    (tmp_path / "results.md").write_text("## Results on digits\n\n- protocol note\n\n| method |\n|:--|\n| ast |\n")
    (tmp_path / "seeds.md").write_text("## DVC experiments\n\n(no rows)\n")
    page = results_document.render(tmp_path)
    assert "## Default profile\n\n`make run` on `params.yaml`" in page
    assert "- protocol note\n\n| method |\n|:--|\n| ast |\n" in page and "Results on digits" not in page
    assert "DVC experiments over distillation seeds" not in page  # an empty table is left out
    assert "Expert buffers" not in page  # so is a missing one
    assert page.endswith(results_document.STUDIES) and "[docs/studies/](studies/)" in page
