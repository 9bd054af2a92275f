"""Distillation engine: AST formulas against hand values, gradients, learning, resume, NaN recovery."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from ast_core.checkpoint import CHECKPOINT_NAME
from ast_core.distill import Distiller, NonFiniteError
from ast_core.matching import (
    DivergenceError,
    balance_factor,
    intermediate_steps,
    matching_loss,
    perturb_filters,
    perturb_layers,
)
from ast_core.settings import DistillConfig


def test_balance_factor_matches_eq_20_by_hand() -> None:
    # m = T+/2 = 10, vartheta = 8
    assert balance_factor(10, 20) == pytest.approx(math.log(8))
    assert balance_factor(14, 20) == pytest.approx(math.log(12))
    assert balance_factor(4, 20) == pytest.approx(1 / math.log(14))
    assert balance_factor(14, 20, log_base=5) == pytest.approx(math.log(12) / math.log(5))
    with pytest.raises(ValueError, match="vartheta"):
        balance_factor(1, 20, vartheta=1.0)


def test_balance_factor_code_middle_is_floor_of_half() -> None:
    # T+ = 5: paper m = 2.5, code m = 2. At t = 2: paper 1/log(0.5 + 8), code log(0 + 8) (t >= m).
    assert balance_factor(2, 5) == pytest.approx(1 / math.log(8.5))
    assert balance_factor(2, 5, middle="floor") == pytest.approx(math.log(8))
    assert balance_factor(4, 5, log_base=5, middle="floor") == pytest.approx(math.log(10) / math.log(5))
    with pytest.raises(ValueError, match="balance_middle='mean'.*half, floor"):
        balance_factor(2, 5, middle="mean")
    with pytest.raises(ValueError, match="vartheta=nan"):
        balance_factor(2, 5, vartheta=float("nan"))


def test_intermediate_steps_are_floor_k_n_over_m() -> None:
    assert intermediate_steps(20, 4) == [5, 10, 15]
    assert intermediate_steps(20, 2) == [10]
    assert intermediate_steps(10, 3) == [3, 6]
    assert intermediate_steps(30, 1) == []


def test_intermediate_steps_code_spacing_is_n_div_m_times_k() -> None:
    assert intermediate_steps(10, 4, "code") == [2, 4, 6]       # paper: floor(10 k / 4) = [2, 5, 7]
    assert intermediate_steps(10, 4) == [2, 5, 7]
    assert intermediate_steps(20, 4, "code") == intermediate_steps(20, 4) == [5, 10, 15]   # M divides N


def test_perturb_filters_scales_each_filter_by_rho_times_its_norm() -> None:
    weight = torch.arange(24, dtype=torch.float32).reshape(4, 2, 3) - 5
    bias = torch.ones(4)
    out = perturb_filters({"w": weight, "b": bias}, rho=0.1, generator=torch.Generator().manual_seed(3))
    added = out["w"] - weight
    for j in range(4):
        assert added[j].norm().item() == pytest.approx(0.1 * weight[j].norm().item(), rel=1e-5)
    assert torch.equal(out["b"], bias)
    again = perturb_filters({"w": weight, "b": bias}, rho=0.1, generator=torch.Generator().manual_seed(3))
    assert torch.equal(again["w"], out["w"])


def test_perturbation_forms_by_hand_norms() -> None:
    """paper: ||Δ_j|| = ρ ||θ_j|| for every filter j of every >= 2-D weight; code: only 4-D (conv) weights,
    Δ = ρ θ ⊙ d / ||d||, so with a constant θ = c the layer's ||Δ|| = ρ c exactly."""
    conv = torch.full((3, 2, 3, 3), 0.5)
    linear = torch.arange(12, dtype=torch.float32).reshape(3, 4) - 4
    bias = torch.ones(3)
    params = {"conv": conv, "linear": linear, "bias": bias}
    paper = perturb_filters(params, rho=0.1, generator=torch.Generator().manual_seed(0))
    for name in ("conv", "linear"):
        for j in range(3):
            assert (paper[name] - params[name])[j].norm().item() == pytest.approx(0.1 * params[name][j].norm().item(),
                                                                                  rel=1e-5)
    code = perturb_layers(params, rho=1.0, generator=torch.Generator().manual_seed(0))
    assert (code["conv"] - conv).norm().item() == pytest.approx(0.5, rel=1e-5)
    assert torch.equal(code["linear"], linear) and torch.equal(code["bias"], bias)
    # The code form is ~sqrt(numel) times smaller relative to the layer than the paper form at equal rho.
    relative_code = (code["conv"] - conv).norm() / conv.norm()
    assert relative_code.item() == pytest.approx(1 / math.sqrt(conv.numel()), rel=1e-5)


def test_matching_denominator_from_perturbed_or_unperturbed_start(digits, digits_expert) -> None:
    """With one intermediate point the total is final + L_1; the perturbed denominator (the authors' code) rescales
    both terms by the ratio of the squared distances of the two starts to each term's target."""
    config = small_config(intermediate_matching=True, perturb_rho=0.1, dsa_strategy="none")
    losses = {}
    for form in ("unperturbed", "perturbed"):
        engine = make_distiller(digits, digits_expert, replace(config, matching_denominator=form)).engine
        trajectory = engine.trajectories[0]
        start = trajectory.at(1.0)
        perturbed = start + 0.05 * torch.randn(start.shape, generator=torch.Generator().manual_seed(1))
        targets = {1: trajectory.at(2.0), 2: trajectory.at(3.0)}
        torch.manual_seed(0)
        engine.generator.manual_seed(5)
        total, stats = engine.unroll_loss(perturbed, targets, start, 1.0, engine.labels)
        losses[form] = (total.item(), stats["matching_loss"])

    def ratio(k: int) -> float:  # same numerator; denominators ||start - θ*_{t+k}||² and ||perturbed - θ*_{t+k}||²
        return ((start - targets[k]).pow(2).sum() / (perturbed - targets[k]).pow(2).sum()).item()

    final_u, final_p = losses["unperturbed"][1], losses["perturbed"][1]
    assert final_p == pytest.approx(final_u * ratio(2), rel=1e-4)
    assert ratio(2) != pytest.approx(1.0, rel=1e-3)
    inter_u = losses["unperturbed"][0] - final_u
    inter_p = losses["perturbed"][0] - final_p
    assert inter_p == pytest.approx(inter_u * ratio(1), rel=1e-4)


def test_exploding_images_stop_with_a_clear_error(digits, digits_expert) -> None:
    distiller = make_distiller(digits, digits_expert, small_config(lr_img=1e12, iterations=3))
    with pytest.raises(DivergenceError, match="lower lr_img"):
        distiller.run()
    calm = make_distiller(digits, digits_expert, small_config(iterations=2)).run()
    assert all(row["image_rms"] > 0 for row in calm.history)


def test_matching_loss_by_hand() -> None:
    student, target, start = torch.tensor([1.0, 2.0]), torch.tensor([0.0, 0.0]), torch.tensor([3.0, 4.0])
    assert matching_loss(student, target, start).item() == pytest.approx(5 / 25)


def small_config(**overrides) -> DistillConfig:
    base = dict(ipc=2, iterations=4, syn_steps=4, expert_epochs=2, max_start_epoch=3, lr_img=10.0, lr_lr=1e-4,
                lr_teacher=0.05, dsa_strategy="color_crop_cutout_flip_scale_rotate")
    base.update(overrides)
    return DistillConfig(**base)


def make_distiller(digits, digits_expert, config: DistillConfig, **kwargs) -> Distiller:
    flat_model, trajectory = digits_expert
    torch.manual_seed(0)
    labels = torch.arange(10).repeat_interleave(config.ipc)
    images = torch.stack([digits.train_x[digits.train_y == c][:config.ipc] for c in range(10)]).flatten(0, 1)
    return Distiller(config, [trajectory, trajectory], flat_model, images, labels, **kwargs)


def test_gradients_reach_images_and_learning_rate(digits, digits_expert) -> None:
    engine = make_distiller(digits, digits_expert, small_config()).engine
    engine.step()
    assert engine.images.grad.abs().sum() > 0
    assert engine.syn_lr.grad.abs() > 0


@pytest.mark.parametrize("overrides", [
    {},
    {"balanced_loss": True, "intermediate_matching": True, "perturb_rho": 0.1, "student_momentum": 0.5},
    {"sampling": "continuous", "max_start_epoch": 2.5, "intermediate_matching": True,
     "intermediate_weights": "varied", "expert_epochs": 3, "batch_syn": 7},
])
def test_every_module_combination_runs_and_records_history(digits, digits_expert, overrides) -> None:
    result = make_distiller(digits, digits_expert, small_config(**overrides)).run()
    assert len(result.history) == 4
    assert result.images.shape == (20, 1, 8, 8) and torch.isfinite(result.images).all()
    assert result.syn_lr > 0
    for key in ("matching_loss", "inner_loss", "inner_loss_balanced", "syn_lr", "seconds", "start_epoch"):
        assert key in result.history[0]


def test_distillation_lowers_the_matching_loss_on_a_fixed_segment(digits, digits_expert) -> None:
    config = small_config(iterations=25, max_start_epoch=1, dsa_strategy="none", lr_img=30.0)
    distiller = make_distiller(digits, digits_expert, config)
    result = distiller.run()
    losses = [row["matching_loss"] for row in result.history]
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5


def test_resume_equals_uninterrupted_run_bit_for_bit(digits, digits_expert, tmp_path) -> None:
    config = small_config(iterations=6, balanced_loss=True, perturb_rho=0.1, sampling="continuous")
    full = make_distiller(digits, digits_expert, config, checkpoint_dir=tmp_path / "a", checkpoint_every=2).run()
    make_distiller(digits, digits_expert, replace(config, iterations=4), checkpoint_dir=tmp_path / "b",
                   checkpoint_every=2).run()
    resumed = make_distiller(digits, digits_expert, config, checkpoint_dir=tmp_path / "b", checkpoint_every=2)
    result = resumed.run()
    assert torch.equal(result.images, full.images)
    assert result.syn_lr == full.syn_lr
    assert [r["loss"] for r in result.history] == [r["loss"] for r in full.history]


def test_resume_refuses_a_checkpoint_made_with_other_settings(digits, digits_expert, tmp_path) -> None:
    make_distiller(digits, digits_expert, small_config(iterations=2), checkpoint_dir=tmp_path).run()
    with pytest.raises(ValueError, match="lr_img"):
        make_distiller(digits, digits_expert, small_config(lr_img=5.0), checkpoint_dir=tmp_path).run()


# Fingerprints (sum and norm of the final images, alpha, kept iteration, norm and alpha of the kept set) of two
# 3-iteration runs on this CPU's kernels (oneDNN, and PyTorch's native kernel for the first convolution of grey
# images). The same seeds must give the same numbers, run straight through or resumed; the tolerance only
# absorbs float summation order on other CPUs (a changed step moves them by >1e-3; a different convolution
# kernel by ~1e-4, and tests/test_fast_step.py checks the step's math in float64).
REFERENCE_TORCH = "2.14.1"
REFERENCE = {
    "unroll": (dict(balanced_loss=True, intermediate_matching=True, perturb_rho=0.1, sampling="continuous",
                    max_start_epoch=2.5, student_momentum=0.5),
               (5.4915663986466825, 35.826076134307904, 0.05327066779136658, 2, 35.81032677977541,
                0.051573995500802994)),
    "tesla": (dict(gradient="tesla"),
              (6.50022398494184, 35.80467824008582, 0.05136270076036453, 2, 35.8038853042533,
               0.05076024681329727)),
}


@pytest.mark.skipif(not torch.__version__.startswith(REFERENCE_TORCH),
                    reason=f"reference computed with torch {REFERENCE_TORCH}")
@pytest.mark.parametrize("resumed", [False, True])
@pytest.mark.parametrize("mode", sorted(REFERENCE))
def test_a_short_run_reproduces_the_stored_reference(digits, digits_expert, tmp_path, mode: str,
                                                     resumed: bool) -> None:
    overrides, expected = REFERENCE[mode]
    scores = iter([5.0, 10.0, 30.0, 20.0])  # validation after 0..3 updates: iteration 2 is kept

    def run(iterations: int):
        return make_distiller(digits, digits_expert, small_config(iterations=iterations, **overrides),
                              evaluator=lambda images, labels, lr: next(scores), eval_every=1,
                              checkpoint_dir=tmp_path, checkpoint_every=2).run()

    if resumed:
        run(2)
    result = run(3)
    found = (result.images.double().sum().item(), result.images.double().norm().item(), result.syn_lr,
             result.best.iteration, result.best.images.double().norm().item(), result.best.syn_lr)
    assert found[3] == expected[3]
    assert found == pytest.approx(expected, rel=1e-5)


def test_the_checkpoint_file_keeps_its_format(digits, digits_expert, tmp_path) -> None:
    """The documented keys (ast_core/checkpoint.py), the best set a plain dict; soft labels and the moving average
    add their own keys only when on."""
    make_distiller(digits, digits_expert, small_config(iterations=1), evaluator=lambda images, labels, lr: 1.0,
                   eval_every=1, checkpoint_dir=tmp_path).run()
    state = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    assert set(state) == {"config", "iteration", "images", "syn_lr", "opt_img", "opt_lr", "generator", "history",
                          "best", "validation", "nonfinite_streak", "initial_rms", "iterations_done"}
    assert set(state["best"]) == {"iteration", "val_acc", "images", "syn_lr", "label_logits"}


class NaNAt:
    """Wraps a trajectory so that reads fail (NaN) on chosen calls."""

    def __init__(self, trajectory, bad_calls: set[int]) -> None:
        self.trajectory, self.bad_calls, self.calls = trajectory, bad_calls, 0

    @property
    def num_epochs(self) -> int:
        return self.trajectory.num_epochs

    def at(self, t: float) -> torch.Tensor:
        self.calls += 1
        value = self.trajectory.at(t)
        return value * float("nan") if self.calls in self.bad_calls else value


def test_nan_injection_is_skipped_without_corrupting_images(digits, digits_expert) -> None:
    flat_model, trajectory = digits_expert
    config = small_config(iterations=3)
    distiller = make_distiller(digits, (flat_model, trajectory), config)
    distiller.engine.trajectories = [NaNAt(trajectory, bad_calls={4, 5, 6})]  # second iteration reads calls 4-6
    result = distiller.run()
    assert [row["skipped"] for row in result.history] == [0.0, 1.0, 0.0]
    assert torch.isfinite(result.images).all()


def test_persistent_nan_stops_with_a_clear_error(digits, digits_expert) -> None:
    flat_model, trajectory = digits_expert
    distiller = make_distiller(digits, digits_expert, small_config(iterations=10, max_nonfinite=3))
    distiller.engine.trajectories = [NaNAt(trajectory, bad_calls=set(range(1, 100)))]
    before = distiller.engine.images.detach().clone()
    with pytest.raises(NonFiniteError, match="consecutive"):
        distiller.run()
    assert torch.equal(distiller.engine.images.detach(), before)


def test_evaluator_keeps_the_best_set_by_validation_accuracy(digits, digits_expert) -> None:
    scores = iter([5.0, 10.0, 30.0, 20.0])
    distiller = make_distiller(digits, digits_expert, small_config(iterations=3),
                               evaluator=lambda images, labels, lr: next(scores), eval_every=1)
    result = distiller.run()
    assert result.best.val_acc == 30.0 and result.best.iteration == 2 and result.best.distilled
    assert [row["iteration"] for row in result.validation] == [0, 1, 2, 3]
    assert [row["val_acc"] for row in result.validation] == [5.0, 10.0, 30.0, 20.0]


def test_the_initial_set_is_a_selection_candidate(digits, digits_expert) -> None:
    scores = iter([50.0, 10.0, 20.0])
    seen = []

    def evaluator(images, labels, lr):
        seen.append(images.clone())
        return next(scores)

    distiller = make_distiller(digits, digits_expert, small_config(iterations=2), evaluator=evaluator,
                               eval_every=1)
    initial = distiller.engine.images.detach().clone()
    result = distiller.run()
    assert result.best.iteration == 0 and result.best.val_acc == 50.0 and not result.best.distilled
    assert torch.equal(result.best.images, initial) and torch.equal(seen[0], initial)
    assert not torch.equal(result.images, initial)  # the images did move; selection kept the start


@pytest.mark.parametrize(("key", "value"), [("ipc", 0), ("lr_img", -1.0), ("sampling", "random"),
                                            ("intermediate_weights", "odd"), ("batch_syn", 0),
                                            ("img_momentum", 1.5), ("max_start_epoch", 2.5),
                                            ("perturb_form", "layer"), ("matching_denominator", "mean"),
                                            ("balance_middle", "round"), ("perturb_rho", float("nan")),
                                            ("perturb_rho", -0.1), ("vartheta", float("nan")), ("vartheta", 1.0),
                                            ("student_momentum", 1.0), ("student_momentum", float("nan")),
                                            ("max_image_growth", 0.0)])
def test_config_errors_name_the_key(key: str, value) -> None:
    with pytest.raises(ValueError, match=key):
        small_config(**{key: value})


def test_segment_beyond_the_stored_trajectory_is_rejected(digits, digits_expert) -> None:
    with pytest.raises(ValueError, match="max_start_epoch \\+ expert_epochs"):
        make_distiller(digits, digits_expert, small_config(max_start_epoch=6))


def test_epochs_needed_counts_the_last_start_epoch_and_the_segment() -> None:
    assert DistillConfig(max_start_epoch=4, expert_epochs=2).epochs_needed == 5  # starts 0..3, then 2 epochs
    assert DistillConfig(max_start_epoch=2.5, expert_epochs=2, sampling="continuous").epochs_needed == 4.5


def test_the_final_set_is_a_candidate_when_the_last_iteration_is_not_a_check(digits, digits_expert) -> None:
    """Checks every 2 iterations of 3: the set after iteration 3 is scored too, so no update goes unjudged."""
    scores = iter([5.0, 10.0, 30.0])
    distiller = make_distiller(digits, digits_expert, small_config(iterations=3),
                               evaluator=lambda images, labels, lr: next(scores), eval_every=2)
    result = distiller.run()
    assert [row["iteration"] for row in result.validation] == [0, 2, 3]
    assert result.best.iteration == 3 and torch.equal(result.best.images, result.images)
    assert distiller.run().validation == result.validation  # a finished run asked again scores nothing more
