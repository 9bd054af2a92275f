"""Tests for ast_core.evaluate (train-on-synthetic protocol, docs/method.md section 5) on sklearn digits."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from ast_core.augment import DSA
from ast_core.baselines import random_indices
from ast_core.evaluate import (
    CPU_ENSEMBLE_BATCH,
    _new_model,
    _Single,
    _train,
    evaluate_synthetic,
    networks_at_once,
    schedule,
    train_on_real,
)
from ast_core.models import ConvNetEnsemble
from ast_core.settings import EvalSpec

FAST = EvalSpec(width=32, num_models=2, iterations=100)


@pytest.fixture(scope="module")
def real_subset(digits):
    """10 real training images per class: a 'synthetic' set whose quality is known to be decent."""
    idx = random_indices(digits.train_y, 10, digits.info.num_classes, seed=0)
    return digits.train_x[idx], digits.train_y[idx]


def test_real_subset_far_above_chance(digits, real_subset) -> None:
    baseline = evaluate_synthetic(*real_subset, 0.01, digits, FAST, seed=0)
    assert baseline.mean > 60.0  # chance is 10 %
    assert len(baseline.accuracies) == 2 and baseline.seeds == [0, 1]
    assert baseline.mean == pytest.approx(sum(baseline.accuracies) / 2)
    assert baseline.std == pytest.approx(abs(baseline.accuracies[0] - baseline.accuracies[1]) / 2 ** 0.5)  # ddof 1
    assert (baseline.protocol, baseline.arch, baseline.iterations, baseline.eval_split) == ("ast", "convnet", 100,
                                                                                           "test")
    assert json.loads(json.dumps(baseline.as_dict()))["accuracies"] == baseline.accuracies


def test_same_seed_repeats_and_other_seed_differs(digits, real_subset) -> None:
    short = EvalSpec(num_models=2, iterations=30, width=16)
    first = evaluate_synthetic(*real_subset, 0.01, digits, short, seed=0)
    assert evaluate_synthetic(*real_subset, 0.01, digits, short, seed=0).accuracies == first.accuracies
    other = evaluate_synthetic(*real_subset, 0.01, digits, short, seed=100)
    assert other.seeds == [100, 101]
    assert other.accuracies != first.accuracies
    shifted = evaluate_synthetic(*real_subset, 0.01, digits, dataclasses.replace(short, num_models=1), seed=1)
    assert shifted.accuracies == first.accuracies[1:]  # network i depends on seed + i only


def test_tensor_lr_and_global_rng_untouched(digits, real_subset) -> None:
    state = torch.get_rng_state()
    alpha = torch.tensor(0.01, requires_grad=True)  # a learned α straight from distillation
    spec = EvalSpec(num_models=1, iterations=5, width=8)
    from_tensor = evaluate_synthetic(*real_subset, alpha, digits, spec)
    assert torch.equal(torch.get_rng_state(), state)
    assert from_tensor.accuracies == evaluate_synthetic(*real_subset, 0.01, digits, spec).accuracies
    assert from_tensor.lr == pytest.approx(0.01)


def test_mtt_protocol_and_val_split(digits, real_subset) -> None:
    # with the test images put in the val split, eval_split="val" must score exactly what "test" scores
    swapped = dataclasses.replace(digits, val_x=digits.test_x, val_y=digits.test_y)
    spec = EvalSpec(num_models=1, iterations=3, width=8, protocol="mtt")
    on_val = evaluate_synthetic(*real_subset, 0.01, swapped, dataclasses.replace(spec, eval_split="val"))
    on_test = evaluate_synthetic(*real_subset, 0.01, digits, spec)
    assert (on_val.protocol, on_val.eval_split, on_val.iterations) == ("mtt", "val", 3)
    assert on_val.accuracies == on_test.accuracies


def test_schedules() -> None:
    assert schedule("ast", 1000, 1) == (1000, 500, 0.5)  # AST: steps, halved at 500
    assert schedule("ast", 1000, 2) == (1000, 500, 0.5)  # steps do not depend on the set size
    assert schedule("mtt", 1000, 2) == (2000, 1000, 0.1)  # MTT: epochs, x0.1 at epoch 500
    assert schedule("real", 4, 3) == (12, 6, 0.5)


def test_train_on_real_beats_chance(digits) -> None:
    result = train_on_real(digits, EvalSpec(width=16, batch_size=128, num_models=1), epochs=3, lr=0.05)
    assert result.protocol == "real" and result.iterations == 3 and result.seeds == [0]
    assert result.mean > 60.0


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"lr": 0.0}, "lr"),
        ({"lr": -1.0}, "lr"),
        ({"lr": math.nan}, "lr"),
        ({"lr": math.inf}, "lr"),
        ({"lr": torch.tensor([0.01, 0.02])}, "lr"),
        ({"labels": torch.zeros(3, dtype=torch.int64)}, "labels"),
        ({"labels": torch.zeros(4, 10)}, "labels"),
        ({"labels": torch.full((4,), 10)}, "labels"),
        ({"images": torch.zeros(4, 3, 8, 8)}, "images"),
        ({"images": torch.full((4, 1, 8, 8), math.nan)}, "images"),
    ],
)
def test_rejects_bad_arguments(digits, kwargs: dict, name: str) -> None:
    args = {"images": torch.zeros(4, 1, 8, 8), "labels": torch.arange(4), "lr": 0.01, "data": digits,
            "spec": EvalSpec()} | kwargs
    with pytest.raises(ValueError, match=name):
        evaluate_synthetic(**args)


def test_train_on_real_rejects_bad_epochs(digits) -> None:
    with pytest.raises(ValueError, match="epochs"):
        train_on_real(digits, EvalSpec(), epochs=0)


@pytest.fixture
def float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.mark.parametrize("protocol", ["ast", "mtt"])
def test_batched_training_equals_one_network_at_a_time(digits, real_subset, float64, protocol) -> None:
    """Each network of the ensemble keeps its seed, batch order (partial last batch included) and DSA draws:
    final weights and accuracies equal the sequential reference in float64."""
    spec = EvalSpec(width=8, depth=2, num_models=3, iterations=2 if protocol == "mtt" else 12, batch_size=16,
                    protocol=protocol)
    x, y = real_subset[0].double(), real_subset[1]
    dsa = DSA("color_crop_cutout_flip_scale_rotate")
    seeds = [7, 8, 9]
    ensemble = ConvNetEnsemble([_new_model(digits, spec, s, torch.device("cpu")) for s in seeds])
    _train(ensemble, x, y, 0.05, protocol, spec.iterations, spec.batch_size, dsa,
           [torch.Generator().manual_seed(s) for s in seeds], False)
    for s, trained in zip(seeds, ensemble.split(), strict=True):
        alone = _new_model(digits, spec, s, torch.device("cpu"))
        _train(_Single(alone), x, y, 0.05, protocol, spec.iterations, spec.batch_size, dsa,
               [torch.Generator().manual_seed(s)], False)
        for (name, a), (_, b) in zip(alone.named_parameters(), trained.named_parameters(), strict=True):
            assert a.dtype == torch.float64
            torch.testing.assert_close(b, a, rtol=0, atol=1e-6, msg=name)
            assert not torch.equal(a, _new_model(digits, spec, s, torch.device("cpu")).get_parameter(name))
    batched = evaluate_synthetic(x, y, 0.05, digits, spec, seed=7)
    sequential = evaluate_synthetic(x, y, 0.05, digits, dataclasses.replace(spec, batched=False), seed=7)
    assert batched.accuracies == pytest.approx(sequential.accuracies, abs=1e-6)
    assert batched.seeds == sequential.seeds == seeds


def test_networks_train_together_on_gpus_and_for_small_cpu_batches() -> None:
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    spec = EvalSpec(num_models=5)
    assert networks_at_once(spec, CPU_ENSEMBLE_BATCH, cpu) == 5
    assert networks_at_once(spec, CPU_ENSEMBLE_BATCH + 1, cpu) == 1
    assert networks_at_once(spec, 256, gpu) == 5
    assert networks_at_once(dataclasses.replace(spec, batched=False), 10, gpu) == 1
    assert networks_at_once(dataclasses.replace(spec, num_models=1), 10, gpu) == 1


def test_architectures_without_batching_train_one_by_one_and_say_so(digits, real_subset, caplog) -> None:
    spec = EvalSpec(arch="alexnet", num_models=2, iterations=2, batch_size=16)
    caplog.set_level("INFO", logger="ast_core.evaluate")
    batched = evaluate_synthetic(*real_subset, 0.01, digits, spec)
    assert "alexnet trains its 2 networks one at a time" in caplog.text
    assert batched.accuracies == evaluate_synthetic(*real_subset, 0.01, digits,
                                                    dataclasses.replace(spec, batched=False)).accuracies
