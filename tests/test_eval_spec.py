"""How sets are scored: `EvalSpec` rejects bad values by name, the pipeline builds it from params in one place
(`pipeline.modelling.eval_spec`), a set `model.depth` reaches every network a run builds, selection never sees
the test split, and test networks never share a seed with the networks that selected the set."""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from ast_core import models
from ast_core.data import SealedSplitError
from ast_core.settings import ARCHITECTURES, EVAL_SPLITS, PROTOCOLS, EvalSpec
from pipeline import tracking
from pipeline.modelling import eval_spec
from pipeline.params import Params
from pipeline.schema import from_mapping
from pipeline.stages import baselines, buffer, distill, evaluate, prepare

DEPTH = 2  # digits are 8 px: the default ConvNet has 1 block, so every network built with 2 got model.depth

# A whole pipeline in a few seconds: one plain-SGD expert of 2 epochs, one distillation iteration, two-step
# evaluations, one coreset baseline and one epoch on the full training split.
TINY: dict[str, Any] = {
    "data": {"dataset": "digits", "val_size": 0.1},
    "model": {"width": 8, "depth": DEPTH},
    "buffer": {"num_experts": 1, "epochs": 2, "batch_size": 128, "mct_anchors": [2], "train": ["sgd"],
               "variants": {"sgd": {"optimizer": "sgd", "lr_decay_epoch": None, "clip_ce": False,
                                    "grad_penalty": False}}},
    "init": {"buffer": "sgd"},
    "distill": {"ipcs": [1], "methods": ["mtt"], "configs": {"mtt": {"buffer": "sgd", "init": "real"}},
                "eval_every": 1, "eval_models": 1, "eval_iterations": 2,
                "hyper": {"iterations": 1, "syn_steps": 2, "expert_epochs": 1, "max_start_epoch": 1}},
    "evaluate": {"num_models": 1, "iterations": 2, "baselines": ["random"], "full_data_epochs": 1},
}


@pytest.mark.parametrize(("field", "value", "allowed"), [
    ("arch", "lenet", "one of " + ", ".join(ARCHITECTURES)),
    ("width", 0, "a positive integer"),
    ("width", True, "a positive integer"),
    ("depth", 0, "None or a positive integer"),
    ("depth", 2.5, "None or a positive integer"),
    ("protocol", "real", "one of " + ", ".join(PROTOCOLS)),  # the full-data schedule is train_on_real's, not a spec's
    ("iterations", 0, "a positive integer"),
    ("num_models", -1, "a positive integer"),
    ("batch_size", 0, "a positive integer"),
    ("eval_split", "train", "one of " + ", ".join(EVAL_SPLITS)),
])
def test_bad_spec_values_are_rejected_naming_the_field(field: str, value: Any, allowed: str) -> None:
    with pytest.raises(ValueError, match=re.escape(f"EvalSpec.{field}={value!r} is invalid")) as error:
        EvalSpec(**{field: value})
    assert str(error.value).endswith(f"allowed: {allowed}")


def test_params_map_to_the_test_and_validation_specs() -> None:
    params = from_mapping(Params, {"model": {"width": 16, "depth": 3},
                                   "distill": {"eval_models": 2, "eval_iterations": 50},
                                   "evaluate": {"num_models": 4, "iterations": 700, "protocol": "mtt",
                                                "batch_size": 64}})
    shared = {"arch": "convnet", "width": 16, "depth": 3, "protocol": "mtt", "batch_size": 64}
    assert eval_spec(params, "test") == EvalSpec(**shared, num_models=4, iterations=700, eval_split="test")
    assert eval_spec(params, "val") == EvalSpec(**shared, num_models=2, iterations=50, eval_split="val")
    assert eval_spec(params, "test", "vgg11").arch == "vgg11"
    with pytest.raises(ValueError, match="EvalSpec.eval_split='train'"):
        eval_spec(params, "train")  # type: ignore[arg-type]


@contextlib.contextmanager
def untracked(run_name: str, *args: Any, **kwargs: Any) -> Iterator[Any]:
    """`tracking.stage_run` without MLflow: the stages' logging calls do nothing."""
    yield type("NoTracker", (), {"__getattr__": lambda self, name: lambda *a, **k: None})()


@pytest.fixture
def built(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """(module that built the network, its number of conv blocks) for every ConvNet constructed."""
    networks: list[tuple[str, int]] = []
    original = models.ConvNet.__init__

    def spy(self: models.ConvNet, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        frame = inspect.currentframe().f_back
        while frame.f_globals["__name__"] in ("ast_core.models", __name__):
            frame = frame.f_back
        networks.append((frame.f_globals["__name__"], sum(isinstance(m, nn.Conv2d) for m in self.features)))

    monkeypatch.setattr(models.ConvNet, "__init__", spy)
    return networks


def test_model_depth_reaches_student_experts_and_every_evaluation_network(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, built: list[tuple[str, int]]) -> None:
    assert models.default_depth(8) != DEPTH
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tracking, "stage_run", untracked)
    params = from_mapping(Params, TINY)
    prepare.run(params)
    stages = {"buffer (experts)": (lambda: buffer.run(params, "sgd"), {"ast_core.experts"}),
              "distill (student, validation)": (lambda: distill.run(params, "mtt", 1, 0),
                                                {"pipeline.modelling", "ast_core.evaluate"}),
              "evaluate (test)": (lambda: evaluate.run(params, "mtt", 1, 0), {"ast_core.evaluate"}),
              "baselines (expert, coresets, full data)": (lambda: baselines.run(params),
                                                          {"pipeline.modelling", "ast_core.evaluate"})}
    for stage, (run, builders) in stages.items():
        built.clear()
        run()
        assert {module for module, _ in built} == builders, stage
        assert {depth for _, depth in built} == {DEPTH}, stage


@pytest.fixture
def tiny_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Params:
    """TINY's data and expert in a scratch folder, stages untracked: ready to distil."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tracking, "stage_run", untracked)
    params = from_mapping(Params, TINY)
    prepare.run(params)
    buffer.run(params, "sgd")
    return params


def test_distill_stage_never_sees_the_test_split(tiny_run: Params, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every scoring during distillation is on validation, and the data it gets has a sealed test split: code
    that tried to read test there would fail, not leak."""
    calls: list[tuple[Any, str]] = []
    score = distill.evaluate_synthetic

    def spy(images: torch.Tensor, labels: torch.Tensor, lr: float, data: Any, spec: EvalSpec, **kwargs: Any) -> Any:
        calls.append((data, spec.eval_split))
        return score(images, labels, lr, data, spec, **kwargs)

    monkeypatch.setattr(distill, "evaluate_synthetic", spy)
    distill.run(tiny_run, "mtt", 1, 0)
    assert calls and {split for _, split in calls} == {"val"}
    for data, _ in calls:
        with pytest.raises(SealedSplitError, match="validation split only"):
            data.test_x.shape  # noqa: B018 (the access itself is what must fail)
        with pytest.raises(SealedSplitError):
            data.test_y[:1]
    def selection_on_test(params: Params, split: str, arch: str | None = None) -> EvalSpec:
        return dataclasses.replace(eval_spec(params, split, arch), eval_split="test")

    monkeypatch.setattr(distill, "eval_spec", selection_on_test)
    with pytest.raises(SealedSplitError):
        distill.run(tiny_run, "mtt", 1, 1)  # a selection pointed at test cannot run


def test_test_networks_never_share_a_seed_with_selection(tiny_run: Params) -> None:
    """The seeds the distill stage selected with and the seeds every reported number was tested with are written
    beside the numbers, and never meet; baselines are tested on the very networks the distilled set was."""
    distill.run(tiny_run, "mtt", 1, 0)
    evaluate.run(tiny_run, "mtt", 1, 0)
    baselines.run(tiny_run)
    selected = json.loads(Path("artifacts/distill/mtt/ipc1/seed0/result.json").read_text())
    tested = json.loads(Path("artifacts/evaluate/mtt/ipc1/seed0/results.json").read_text())
    reference = json.loads(Path("artifacts/baselines/results.json").read_text())
    assert selected["validation_seeds"] == tested["validation_seeds"] == tiny_run.validation_seeds == [0]
    assert tested["test_seeds"] == reference["test_seeds"] == tiny_run.test_seeds == [1000]
    assert not set(selected["validation_seeds"]) & set(tested["test_seeds"])
    network_seeds = [tested["results"]["convnet"]["seeds"], *(row["seeds"] for row in reference["coresets"]),
                     reference["full_data"]["seeds"]]
    assert all(seeds == tested["test_seeds"] for seeds in network_seeds)
