"""Hostile inputs: data that does not suit the settings, missing experts, unwritable outputs, corrupted files,
divergence, wall-clock fields in DVC outputs and .gitignore entries of stage outputs. Each is refused before
compute naming the key or file, repaired, or stops with a clear error."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file
from tiny import tiny_params_text

from ast_core.distill import Distiller
from ast_core.matching import DivergenceError
from ast_core.settings import DistillConfig
from ast_core.trajectory import load_buffer, load_trajectory, save_trajectory
from pipeline.cli import main
from pipeline.outputs import ignore_in_git

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
AS_ROOT = os.geteuid() == 0


def write_params(folder: Path, **changes: object) -> None:
    """folder/params.yaml: the tiny profile with one buffer and one method (ast), plus `changes` (dotted keys)."""
    params = yaml.safe_load(tiny_params_text())
    params["buffer"]["train"], params["distill"]["methods"] = ["ast"], ["ast"]
    for dotted, value in changes.items():
        *parents, last = dotted.split(".")
        node = params
        for key in parents:
            node = node[key]
        node[last] = value
    (folder / "params.yaml").write_text(yaml.safe_dump(params))


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty working directory with the tiny profile and a private MLflow store."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("AST_DD_PARENT_RUN_ID", raising=False)
    write_params(tmp_path)
    return tmp_path


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project with prepare, the AST buffer (2 experts) and init done, made once for this module."""
    folder = tmp_path_factory.mktemp("built")
    write_params(folder)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        patch.delenv("AST_DD_PARENT_RUN_ID", raising=False)
        for stage in ("prepare", "buffer", "init"):
            assert main([stage]) == 0
    return folder


@pytest.fixture
def ready(built: Path, project: Path) -> Path:
    """A private copy of `built` as the working directory."""
    shutil.copytree(built, project, dirs_exist_ok=True)
    return project


def image_folder(folder: Path, classes: int, broken: str | None = None) -> str:
    """An image folder of `classes` sub-folders with 12 random 8x8 PNGs each; `broken` (c0/<name>) is cut short."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        (folder / f"c{c}").mkdir(parents=True)
        for i in range(12):
            Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(folder / f"c{c}" / f"{i:02d}.png")
    if broken:
        path = folder / "c0" / broken
        path.write_bytes(path.read_bytes()[:30])
    return f"imagefolder:{folder}"


# --------------------------------------------------------------------- data that does not suit the settings
@pytest.mark.parametrize(("case", "expected"), [
    ("ipc above the smallest class", "distill.ipcs: [500] asks for more images per class than the smallest class"),
    ("one class", "data.dataset: imagefolder:"),
])
def test_data_unfit_for_the_settings_stops_prepare_naming_the_key(project: Path, caplog, case: str,
                                                                   expected: str) -> None:
    if case == "one class":
        write_params(project, **{"data.dataset": image_folder(project / "images", 1), "data.val_size": 0.2})
    else:
        write_params(project, **{"distill.ipcs": [1, 500]})
    assert main(["prepare"]) == 2
    assert expected in caplog.text
    assert not (project / "artifacts/prepare/info.json").exists()


@pytest.mark.parametrize("stage", ["init", "distill", "baselines"])
def test_ipc_above_the_smallest_class_stops_later_stages_before_compute(ready: Path, caplog, stage: str) -> None:
    write_params(ready, **{"distill.ipcs": [500]})
    assert main([stage]) == 2
    assert "distill.ipcs: [500]" in caplog.text and "use at most" in caplog.text


@pytest.mark.parametrize(("changes", "expected"), [
    ({"buffer.num_experts": 5, "distill.num_experts": 5},
     "distill.num_experts: 5 experts are asked for but artifacts/buffer/ast holds 2; run `ast-dd buffer"),
    ({"buffer.num_experts": 3},
     "distill.num_experts (null: buffer.num_experts): 3 experts are asked for but artifacts/buffer/ast holds 2"),
    ({"distill.configs.ast.mct_anchors": 2, "distill.configs.ast.sampling": "continuous"},
     "artifacts/convex/ast holds 0 mct2 copies; run `ast-dd buffer --variant ast`, then `ast-dd convexify"),
])
def test_fewer_stored_experts_than_requested_stops_distill(ready: Path, caplog, changes: dict, expected: str) -> None:
    write_params(ready, **changes)
    assert main(["distill"]) == 2
    assert expected in caplog.text
    assert not (ready / "artifacts/distill/ast/ipc1/seed0/synthetic.safetensors").exists()


# ------------------------------------------------------------------------------------------ unwritable outputs
@pytest.mark.parametrize(("stage", "folder"), [
    ("distill", "artifacts/distill"),
    ("init", "artifacts/init"),
    ("baselines", "artifacts/baselines"),
])
def test_output_path_taken_by_a_file_fails_before_compute(ready: Path, caplog, stage: str, folder: str) -> None:
    shutil.rmtree(ready / folder, ignore_errors=True)
    (ready / folder).write_text("a file where a folder should be")
    assert main([stage]) == 2
    assert f"{folder}" in caplog.text and "is a file; move it away" in caplog.text


def without_permission_override(command: list[str]) -> list[str]:
    """`command` run so that folder permissions apply (root normally ignores them)."""
    if not AS_ROOT:
        return command
    dropped = "-dac_override,-dac_read_search"
    return ["setpriv", f"--bounding-set={dropped}", f"--inh-caps={dropped}", *command]


@pytest.mark.skipif(AS_ROOT and not shutil.which("setpriv"), reason="root ignores permissions; no setpriv")
@pytest.mark.parametrize(("stage", "folder"), [("distill", "artifacts/distill"), ("buffer", "artifacts/buffer/ast")])
def test_read_only_output_folder_fails_before_compute(ready: Path, stage: str, folder: str) -> None:
    target = ready / folder
    target.mkdir(parents=True, exist_ok=True)
    target.chmod(0o500)
    try:
        result = subprocess.run(without_permission_override([sys.executable, "-m", "pipeline.cli", stage]),
                                capture_output=True, text=True, check=False)
    finally:
        target.chmod(0o700)
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"{folder} is read-only" in result.stderr and "not writable" in result.stderr
    assert len(list((ready / "artifacts/buffer/ast").glob("expert_*"))) == 2


# ------------------------------------------------------------------------------------------ corrupted inputs
def truncate(path: Path, size: int) -> None:
    """Cut `path` to its first `size` bytes, as a new file (tensors read from the old one may map it)."""
    data = path.read_bytes()
    path.unlink()
    path.write_bytes(data[:size])


def test_truncated_prepared_cache_is_rebuilt_by_prepare(project: Path, caplog) -> None:
    assert main(["prepare"]) == 0
    (cache,) = (project / "artifacts/prepare/cache").glob("*.safetensors")
    whole = {name: tensor.clone() for name, tensor in load_file(cache).items()}
    truncate(cache, 1000)
    assert main(["prepare"]) == 0
    assert cache.name in caplog.text and "rebuild" in caplog.text
    assert all(torch.equal(tensor, whole[name]) for name, tensor in load_file(cache).items())


def test_broken_image_is_named(project: Path, caplog) -> None:
    dataset = image_folder(project / "images", 2, broken="05.png")
    write_params(project, **{"data.dataset": dataset, "data.val_size": 0.2})
    assert main(["prepare"]) == 1
    assert "c0/05.png is not a readable image" in caplog.text and "replace or delete" in caplog.text


def test_truncated_expert_is_retrained_by_the_buffer_stage(ready: Path) -> None:
    expert = ready / "artifacts/buffer/ast/expert_000.safetensors"
    trained = load_file(expert)["checkpoints"].clone()
    truncate(expert, 3000)
    assert main(["buffer"]) == 0
    assert torch.equal(load_file(expert)["checkpoints"], trained)  # same seed: bit-identical on the CPU


@pytest.mark.parametrize("stage", ["init", "convexify", "distill"])
def test_truncated_expert_is_named_with_what_to_do(ready: Path, caplog, stage: str) -> None:
    truncate(ready / "artifacts/buffer/ast/expert_000.safetensors", 3000)
    assert main([stage]) == 1
    assert "expert_000.safetensors is not a readable safetensors file" in caplog.text
    assert "delete it and train (or convexify) that expert again" in caplog.text


# --------------------------------------------------------------------------------------------------- divergence
def spoil(expert: Path, value: str = "nan") -> None:
    """Rewrite an expert file with `value` (nan, inf) in five entries of its last checkpoint."""
    trajectory = load_trajectory(expert)
    checkpoints = trajectory.checkpoints.clone()
    checkpoints[-1, :5] = float(value)
    save_trajectory(expert, checkpoints, trajectory.metadata)


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_buffer_with_non_finite_values_is_rejected_when_loaded(ready: Path, value: str) -> None:
    folder = ready / "artifacts/buffer/ast"
    spoil(folder / "expert_001.safetensors", value)
    with pytest.raises(ValueError, match=r"expert_001\.safetensors: `checkpoints` holds NaN or infinite values"):
        load_buffer(folder)


def test_distill_on_a_non_finite_buffer_names_the_file(ready: Path, caplog) -> None:
    spoil(ready / "artifacts/buffer/ast/expert_001.safetensors")
    assert main(["distill"]) == 1
    assert "expert_001.safetensors" in caplog.text and "delete the file and retrain that expert" in caplog.text


def small_distiller(digits, digits_expert, **changes: float) -> Distiller:
    flat_model, trajectory = digits_expert
    config = DistillConfig(**{"ipc": 1, "iterations": 3, "syn_steps": 3, "expert_epochs": 2, "max_start_epoch": 3,
                              "lr_img": 1.0, "lr_lr": 1e-5, "lr_teacher": 0.05, **changes})
    images = torch.stack([digits.train_x[digits.train_y == c][0] for c in range(10)])
    return Distiller(config, [trajectory], flat_model, images, torch.arange(10))


@pytest.mark.parametrize(("changes", "expected"), [
    ({"lr_img": 1e300}, "lr_img=1e+300 is larger than the largest torch.float32"),
    ({"lr_lr": 1e300}, "lr_lr=1e+300 is larger than the largest torch.float32"),
    ({"lr_teacher": 1e39}, "lr_teacher=1e+39 is larger than the largest torch.float32"),
])
def test_learning_rates_that_overflow_are_refused(digits, digits_expert, changes: dict, expected: str) -> None:
    with pytest.raises(DivergenceError, match=re.escape(expected)):
        small_distiller(digits, digits_expert, **changes)


@pytest.mark.parametrize("lr_lr", [1e2, 1e6])
def test_exploding_alpha_stops_with_a_divergence_error(digits, digits_expert, lr_lr: float) -> None:
    with pytest.raises(DivergenceError, match=r"alpha \(syn_lr\) is .* lr_teacher \(limit 1000x\); lower lr_lr"):
        small_distiller(digits, digits_expert, lr_lr=lr_lr).run()


def test_lr_img_1e300_stops_the_distill_stage_with_a_divergence_error(ready: Path, caplog) -> None:
    write_params(ready, **{"distill.hyper.lr_img": 1e300})
    assert main(["distill"]) == 1
    assert "DivergenceError: lr_img=1e+300" in caplog.text and "Traceback" not in caplog.text


# -------------------------------------------------------------------------------- wall-clock fields and reruns
WALL_CLOCK_WORDS = ("second", "time", "duration", "elapsed")


def tracked_fields(cell: Path) -> list[str]:
    """Keys of the cell's result.json and columns of its history.csv (both DVC outputs)."""
    header = (cell / "history.csv").read_text().splitlines()[0].split(",")
    return [*json.loads((cell / "result.json").read_text()), *header]


def test_distill_outputs_hold_no_wall_clock_field_and_a_rerun_reproduces_them(ready: Path) -> None:
    cell = ready / "artifacts/distill/ast/ipc1/seed0"
    assert main(["distill", "--method", "ast", "--ipc", "1"]) == 0
    assert not [f for f in tracked_fields(cell) if any(word in f for word in WALL_CLOCK_WORDS)]
    first = {p.name: p.read_bytes() for p in cell.iterdir() if p.suffix in (".json", ".csv", ".safetensors")}
    assert main(["distill", "--method", "ast", "--ipc", "1"]) == 0
    assert {name: (cell / name).read_bytes() for name in first} == first
    assert json.loads((ready / "artifacts/timing/distill/ast/ipc1/seed0.json").read_text())["seconds_per_iteration"] > 0


# ------------------------------------------------------------------------------------------------- .gitignore
@pytest.fixture
def git_project(project: Path) -> Path:
    """`project` as a git work tree."""
    subprocess.run(["git", "init", "-q"], check=True)
    return project


@pytest.mark.parametrize(("before", "after"), [
    ("", "/sgd\n"),
    ("/ast\n", "/ast\n/sgd\n"),
    ("/ast", "/ast\n/sgd\n"),
    ("/ast\n/sgd\n", "/ast\n/sgd\n"),
])
def test_stage_output_is_listed_in_its_gitignore(git_project: Path, before: str, after: str) -> None:
    gitignore = git_project / "artifacts/buffer/.gitignore"
    if before:
        gitignore.parent.mkdir(parents=True)
        gitignore.write_text(before)
    ignore_in_git(Path("artifacts/buffer/sgd"))
    assert gitignore.read_text() == after
    checked = subprocess.run(["git", "check-ignore", "-q", "artifacts/buffer/sgd"], check=False)
    assert checked.returncode == 0


def test_prepare_lists_its_output_in_the_gitignore(git_project: Path) -> None:
    assert main(["prepare"]) == 0
    assert "/prepare" in (git_project / "artifacts/.gitignore").read_text().splitlines()


STAGE_A = ("import pathlib, sys; from pipeline.outputs import ignore_in_git; out = pathlib.Path('out/a'); "
           "ignore_in_git(out) if sys.argv[1] == 'claim' else None; out.mkdir(parents=True); "
           "(out / 'f').write_text('x')")


@pytest.mark.slow
@pytest.mark.parametrize(("claim", "kept"), [("claim", True), ("none", False)])
def test_gitignore_entry_survives_a_failed_dvc_repro(git_project: Path, claim: str, kept: bool) -> None:
    """DVC 3 removes the entries it added when a later stage fails; one the stage wrote itself stays."""
    dvc = str(BIN / "dvc")
    subprocess.run([dvc, "init", "-q"], check=True)
    stages = {"a": {"cmd": f'{sys.executable} -c "{STAGE_A}" {claim}', "outs": ["out/a"]},
              "b": {"cmd": "false", "deps": ["out/a"]}}
    (git_project / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    assert subprocess.run([dvc, "repro", "-q"], env=env, capture_output=True, check=False).returncode != 0
    gitignore = git_project / "out/.gitignore"
    assert ("/a" in gitignore.read_text().splitlines() if gitignore.is_file() else False) is kept


def test_fewer_expert_images_than_classes_stops_the_buffer_stage_naming_the_key(ready: Path, caplog) -> None:
    write_params(ready, **{"buffer.train_size": 5})
    assert main(["buffer", "--variant", "ast"]) == 2
    assert "buffer.train_size: 5 is fewer than the 10 classes of digits" in caplog.text


class Payload:
    """An object a pickled checkpoint could carry (its code would run on a plain `torch.load`)."""


@pytest.mark.parametrize(("content", "expected"), [("pickled", "holds pickled objects"),
                                                   ("damaged", "it is damaged")])
def test_a_checkpoint_that_is_not_ours_is_refused_with_our_message(tmp_path: Path, content: str,
                                                                    expected: str) -> None:
    from ast_core.checkpoint import CHECKPOINT_NAME, DistillCheckpoint

    path = tmp_path / CHECKPOINT_NAME
    if content == "pickled":
        torch.save({"config": Payload()}, path)
    else:
        path.write_bytes(b"PK\x03\x04 not a checkpoint")
    with pytest.raises(ValueError, match=expected) as error:
        DistillCheckpoint(tmp_path).differing_settings(DistillConfig())
    assert "weights_only" not in str(error.value) and "delete it and rerun" in str(error.value)
    assert str(path) in str(error.value)
