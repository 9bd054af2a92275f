"""AST Eq. 19 loss terms against hand-computed values: clipped-CE ramp (paper and code schedules), the input-gradient
norms and the gradient penalty (per sample / per pixel, two-sided / one-sided)."""

import math

import pytest
import torch

from ast_core.losses import clipped_ce_scale, gradient_penalty, input_gradient_norms


@pytest.mark.parametrize(("epoch", "expected"), [(0, 0.5), (1, 0.6), (2.5, 0.75), (4, 0.9), (5, 1.0), (10, 1.0)])
def test_clipped_ce_scale_ramps_from_half_to_one_over_five_epochs(epoch: float, expected: float) -> None:
    assert clipped_ce_scale(epoch) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(("epoch", "expected"), [(0, 0.5), (1, 0.55), (4, 0.7), (9, 0.95), (10, 1.0), (30, 1.0)])
def test_code_clip_schedule_steps_by_five_hundredths_over_ten_epochs(epoch: int, expected: float) -> None:
    # The authors' code: 0.5, 0.55, ..., 0.95 in epochs 0-9, whatever warmup/start say.
    assert clipped_ce_scale(epoch, warmup_epochs=2, start=0.9, schedule="code") == pytest.approx(expected, abs=1e-12)


def test_clipped_ce_scale_rejects_unknown_schedule() -> None:
    with pytest.raises(ValueError, match="schedule='cosine'.*paper, code"):
        clipped_ce_scale(0, schedule="cosine")


def test_clipped_ce_scale_custom_ramp_and_no_warmup() -> None:
    assert clipped_ce_scale(5, warmup_epochs=10, start=0.2) == pytest.approx(0.6)
    assert clipped_ce_scale(0, warmup_epochs=0) == 1.0


@pytest.mark.parametrize(("kwargs", "name"), [({"epoch": -1}, "epoch"), ({"epoch": 0, "start": 1.5}, "start"),
                                              ({"epoch": 0, "warmup_epochs": -2}, "warmup_epochs")])
def test_clipped_ce_scale_rejects_bad_arguments(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        clipped_ce_scale(**kwargs)


def _linear_model() -> tuple[torch.Tensor, object]:
    """f(x) = W·vec(x) on 2 x 1 x 2 inputs; Σ_c W_c = [3, 0, 4, 1], i.e. channel 0 = (3, 0), channel 1 = (4, 1)."""
    weight = torch.tensor([[1.0, 0.0, 4.0, 1.0],
                           [2.0, 0.0, 0.0, 0.0],
                           [0.0, 0.0, 0.0, 0.0]], requires_grad=True)
    return weight, lambda x: x.flatten(1) @ weight.T


def test_gradient_penalty_per_sample_equals_hand_value_and_trains_the_weights() -> None:
    weight, model = _linear_model()
    x = torch.randn(5, 2, 1, 2)
    penalty = gradient_penalty(model, x, target_norm=1.0)
    # ∇_x Σ_c f_c = Σ_c W_c = [3, 0, 4, 1] for every sample: norm sqrt(26).
    assert penalty.item() == pytest.approx((math.sqrt(26) - 1) ** 2, rel=1e-6)
    penalty.backward()
    # d/dW_c (‖s‖ - 1)² = 2 (‖s‖ - 1) s / ‖s‖ for every class row c, with s = Σ_c W_c.
    s = torch.tensor([3.0, 0.0, 4.0, 1.0])
    row = 2 * (s.norm() - 1) * s / s.norm()
    torch.testing.assert_close(weight.grad, row.expand(3, 4))
    assert not x.requires_grad


def test_gradient_penalty_per_pixel_equals_hand_value() -> None:
    _, model = _linear_model()
    x = torch.randn(3, 2, 1, 2)
    # Per pixel over the 2 channels: pixel 0 -> |(3, 4)| = 5, pixel 1 -> |(0, 1)| = 1; mean((5-1)², (1-1)²) = 8.
    assert gradient_penalty(model, x, target_norm=1.0, norm="pixel").item() == pytest.approx(8.0, rel=1e-6)
    # Target 0 turns the penalty into the mean squared norm: (25 + 1) / 2 = 13.
    assert gradient_penalty(model, x, target_norm=0.0, norm="pixel").item() == pytest.approx(13.0, rel=1e-6)


def test_gradient_penalty_uses_each_samples_own_gradient() -> None:
    # f(x) = Σ x² has input gradient 2x: sample norms 2|x_i|, here 2 and 6 -> mean((2-1)², (6-1)²) = 13.
    x = torch.zeros(2, 1, 1, 2)
    x[0, 0, 0, 0] = 1.0
    x[1, 0, 0, 1] = 3.0
    penalty = gradient_penalty(lambda z: z.square().flatten(1).sum(1, keepdim=True), x)
    assert penalty.item() == pytest.approx(13.0)


def test_gradient_penalty_rejects_unknown_norm() -> None:
    _, model = _linear_model()
    with pytest.raises(ValueError, match="norm"):
        gradient_penalty(model, torch.randn(1, 2, 1, 2), norm="l1")


def test_pixel_form_penalty_and_norms_on_a_second_linear_model() -> None:
    # f(x) = x00 + 2 x01 - 2 x10 + x11 summed over 2 classes of weights [[1,2,-2,1],[0,0,0,0]]:
    # per pixel over 2 channels: pixel 0 -> |(1, -2)| = √5, pixel 1 -> |(2, 1)| = √5.
    weight = torch.tensor([[1.0, 2.0, -2.0, 1.0], [0.0, 0.0, 0.0, 0.0]], requires_grad=True)
    model = lambda x: x.flatten(1) @ weight.T  # noqa: E731
    x = torch.randn(4, 2, 1, 2)
    norms = input_gradient_norms(model, x, "pixel")
    assert norms.shape == (4, 1, 2)
    torch.testing.assert_close(norms, torch.full((4, 1, 2), math.sqrt(5)))
    penalty = gradient_penalty(model, x, target_norm=1.0, norm="pixel")
    assert penalty.item() == pytest.approx((math.sqrt(5) - 1) ** 2, rel=1e-6)
    penalty.backward()
    # d/dW (√5 - 1)² per pixel: 2 (√5 - 1) w_p / √5 on that pixel's two channel weights, averaged over 2 pixels.
    grad = 2 * (math.sqrt(5) - 1) / math.sqrt(5) * torch.tensor([1.0, 2.0, -2.0, 1.0]) / 2
    torch.testing.assert_close(weight.grad, grad.expand(2, 4))


def test_one_sided_penalty_is_zero_below_target_and_two_sided_is_not() -> None:
    _, model = _linear_model()       # per-sample norm √26 ≈ 5.1
    x = torch.randn(3, 2, 1, 2)
    assert gradient_penalty(model, x, target_norm=6.0, sided="one_sided").item() == 0.0
    assert gradient_penalty(model, x, target_norm=6.0).item() == pytest.approx((6 - math.sqrt(26)) ** 2, rel=1e-6)
    # Above the target both forms agree.
    assert gradient_penalty(model, x, target_norm=1.0, sided="one_sided").item() == pytest.approx(
        gradient_penalty(model, x, target_norm=1.0).item())


def test_one_sided_penalty_counts_only_the_samples_above_target() -> None:
    # Sample norms 2 and 6 (f = Σ x²), K = 3: only the second counts, mean((0, 3²)) = 4.5.
    x = torch.zeros(2, 1, 1, 2)
    x[0, 0, 0, 0] = 1.0
    x[1, 0, 0, 1] = 3.0
    penalty = gradient_penalty(lambda z: z.square().flatten(1).sum(1, keepdim=True), x, 3.0, sided="one_sided")
    assert penalty.item() == pytest.approx(4.5)


def test_gradient_penalty_rejects_unknown_side() -> None:
    _, model = _linear_model()
    with pytest.raises(ValueError, match="sided='both'.*two_sided, one_sided"):
        gradient_penalty(model, torch.randn(1, 2, 1, 2), sided="both")
