"""Tests for ast_core.augment (DSA, docs/method.md section 1): each family checked separately."""

from __future__ import annotations

import pytest
import torch

from ast_core.augment import DSA, DSAParams
from ast_core.settings import FAMILIES, dsa_strategy_for


def _images(n: int = 8, c: int = 3, h: int = 16, w: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, h, w, generator=g)


def _unique_images(n: int = 8, c: int = 2, h: int = 16, w: int = 16) -> torch.Tensor:
    """Strictly positive, all-distinct values so shifts and zeroed pixels are identifiable."""
    return torch.arange(1, n * c * h * w + 1, dtype=torch.float32).view(n, c, h, w)


@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_reaches_input(family: str) -> None:
    x = _images().requires_grad_(True)
    out = DSA(family)(x, seed=3)
    assert out.shape == x.shape
    (out * torch.randn_like(out)).sum().backward()
    assert x.grad is not None
    assert torch.isfinite(x.grad).all()
    assert x.grad.abs().sum() > 0


@pytest.mark.parametrize("strategy", ["color_crop_cutout_flip_scale_rotate", *FAMILIES])
def test_same_seed_same_output_different_seed_differs(strategy: str) -> None:
    x = _images(n=16)
    dsa = DSA(strategy)
    a, b = dsa(x, seed=11), dsa(x, seed=11)
    assert torch.equal(a, b)
    outs = [dsa(x, seed=s) for s in range(12, 20)]
    assert any(not torch.equal(a, o) for o in outs)


def test_generator_and_global_rng() -> None:
    x = _images()
    dsa = DSA()
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(dsa(x, generator=g1), dsa(x, generator=g2))
    # a generator advances: successive calls differ (over a few draws)
    first = dsa(x, generator=g1)
    assert any(not torch.equal(first, dsa(x, generator=g1)) for _ in range(5))
    torch.manual_seed(123)
    a = dsa(x)
    torch.manual_seed(123)
    assert torch.equal(a, dsa(x))


def test_siamese_same_transform_on_two_batches() -> None:
    """Same seed -> same per-sample parameters for two different batches of the same size."""
    x1, x2 = _images(seed=1), _images(seed=2)
    dsa = DSA("flip")
    o1, o2 = dsa(x1, seed=7), dsa(x2, seed=7)
    flipped1 = [torch.equal(o1[i], x1[i].flip(-1)) for i in range(len(x1))]
    flipped2 = [torch.equal(o2[i], x2[i].flip(-1)) for i in range(len(x2))]
    assert flipped1 == flipped2


def test_brightness_shift_per_sample_in_range() -> None:
    """On constant 1-channel images saturation and contrast do nothing, so out - x is the brightness shift."""
    const = torch.ones(64, 1, 8, 8) * torch.linspace(-1, 1, 64).view(64, 1, 1, 1)
    out = DSA("color")(const, seed=0)
    per_sample = (out - const).flatten(1)
    assert torch.allclose(per_sample, per_sample[:, :1].expand_as(per_sample), atol=1e-6)
    shift = per_sample[:, 0]
    assert shift.min() >= -0.5 - 1e-6 and shift.max() <= 0.5 + 1e-6
    assert shift.min() < -0.3 and shift.max() > 0.3  # spread over the range, per sample


def _color_parts(x: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The three U(0,1) vectors the color family draws for `seed` (brightness, saturation, contrast)."""
    g = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    return torch.rand(n, generator=g), torch.rand(n, generator=g), torch.rand(n, generator=g)


def test_color_matches_independent_formula() -> None:
    """brightness + U(-.5,.5); saturation x U(0,2) about the channel mean; contrast x U(.5,1.5)."""
    x = _images(n=10)
    out = DSA("color")(x, seed=4)
    b, s, c = _color_parts(x, 4)
    ref = x + (b - 0.5).view(-1, 1, 1, 1)
    m = ref.mean(dim=1, keepdim=True)
    ref = (ref - m) * (2.0 * s).view(-1, 1, 1, 1) + m
    m = ref.mean(dim=(1, 2, 3), keepdim=True)
    ref = (ref - m) * (c + 0.5).view(-1, 1, 1, 1) + m
    assert torch.allclose(out, ref, atol=1e-5)


def test_contrast_factor_in_range() -> None:
    """Recover the contrast factor on 1-channel images (saturation is a no-op there)."""
    x = _images(n=64, c=1)
    out = DSA("color")(x, seed=9)
    # brightness shifts by a constant, so the deviation from the per-sample mean is scaled by the factor
    dev_in = x - x.mean(dim=(1, 2, 3), keepdim=True)
    dev_out = out - out.mean(dim=(1, 2, 3), keepdim=True)
    factor = (dev_out * dev_in).flatten(1).sum(1) / dev_in.pow(2).flatten(1).sum(1)
    assert torch.allclose(dev_out, factor.view(-1, 1, 1, 1) * dev_in, atol=1e-5)
    assert factor.min() >= 0.5 - 1e-5 and factor.max() <= 1.5 + 1e-5
    assert factor.max() - factor.min() > 0.5


def test_saturation_noop_on_one_channel_and_range_on_three() -> None:
    # 1 channel: color = brightness + contrast only; compare against that formula directly
    x1 = _images(n=16, c=1)
    out1 = DSA("color")(x1, seed=2)
    b, _, c = _color_parts(x1, 2)
    ref = x1 + (b - 0.5).view(-1, 1, 1, 1)
    m = ref.mean(dim=(1, 2, 3), keepdim=True)
    ref = (ref - m) * (c + 0.5).view(-1, 1, 1, 1) + m
    assert torch.allclose(out1, ref, atol=1e-6)

    # 3 channels: recover saturation x contrast from the deviation from the channel mean, divide by contrast
    x3 = _images(n=64, c=3)
    out3 = DSA("color")(x3, seed=5)
    dev_in = x3 - x3.mean(dim=1, keepdim=True)
    dev_out = out3 - out3.mean(dim=1, keepdim=True)
    total = (dev_out * dev_in).flatten(1).sum(1) / dev_in.pow(2).flatten(1).sum(1)
    assert torch.allclose(dev_out, total.view(-1, 1, 1, 1) * dev_in, atol=1e-4)
    _, _, c = _color_parts(x3, 5)
    sat = total / (c + 0.5)
    assert sat.min() >= -1e-5 and sat.max() <= 2.0 + 1e-5
    assert sat.max() - sat.min() > 1.0


def test_flip_per_sample() -> None:
    x = _images(n=32)
    out = DSA("flip")(x, seed=1)
    flipped = 0
    for i in range(len(x)):
        is_same, is_flip = torch.equal(out[i], x[i]), torch.equal(out[i], x[i].flip(-1))
        assert is_same or is_flip
        flipped += int(is_flip and not is_same)
    assert 4 <= flipped <= 28


def _find_shift(src: torch.Tensor, out: torch.Tensor) -> tuple[int, int]:
    """For unique-valued src (C x H x W) find (dh, dw) such that out[:, h, w] == src[:, h+dh, w+dw]."""
    _, h, w = src.shape
    nz = (out[0] != 0).nonzero()
    r, c = nz[0].tolist()
    pos = (src[0] == out[0, r, c]).nonzero()
    assert len(pos) == 1
    sr, sc = pos[0].tolist()
    return sr - r, sc - c


def test_crop_is_shifted_copy_with_zero_padding() -> None:
    x = _unique_images(n=32, h=16, w=16)
    out = DSA("crop")(x, seed=6)
    max_shift = int(16 * 0.125 + 0.5)
    shifts = set()
    for i in range(len(x)):
        dh, dw = _find_shift(x[i], out[i])
        assert abs(dh) <= max_shift and abs(dw) <= max_shift
        shifts.add((dh, dw))
        ref = torch.zeros_like(x[i])
        for hh in range(16):
            for ww in range(16):
                sh, sw = hh + dh, ww + dw
                if 0 <= sh < 16 and 0 <= sw < 16:
                    ref[:, hh, ww] = x[i, :, sh, sw]
        assert torch.equal(out[i], ref)
    assert len(shifts) > 3


def test_cutout_zeroes_half_side_square() -> None:
    h = w = 16
    side = int(h * 0.5 + 0.5)
    x = _unique_images(n=32, h=h, w=w)
    out = DSA("cutout")(x, seed=8)
    full_squares = 0
    for i in range(len(x)):
        zero = out[i] == 0
        assert torch.equal(zero[0], zero[1])  # same mask for all channels
        rows = zero[0].any(1).nonzero().flatten()
        cols = zero[0].any(0).nonzero().flatten()
        assert len(rows) > 0 and len(cols) > 0
        # zeroed region is a (border-clipped) rectangle of side <= half the image side
        assert rows.max() - rows.min() + 1 == len(rows) <= side
        assert cols.max() - cols.min() + 1 == len(cols) <= side
        assert int(zero[0].sum()) == len(rows) * len(cols)
        # away from the border it is a full square of side exactly half
        if rows.min() > 0 and rows.max() < h - 1 and cols.min() > 0 and cols.max() < w - 1:
            assert len(rows) == len(cols) == side
            full_squares += 1
        assert torch.equal(out[i][~zero], x[i][~zero])
    assert full_squares > 0


@pytest.mark.parametrize("family", ["scale", "rotate"])
def test_scale_rotate_keep_shape_and_centre(family: str) -> None:
    x = _images(n=16, c=3, h=15, w=15)  # odd size: the centre pixel is a grid point
    out = DSA(family)(x, seed=2)
    assert out.shape == x.shape
    assert torch.allclose(out[:, :, 7, 7], x[:, :, 7, 7], atol=1e-5)
    assert not torch.allclose(out, x, atol=1e-3)  # but the images are warped


def test_rotate_ones_keeps_centre() -> None:
    ones = torch.ones(16, 1, 15, 15)
    out = DSA("rotate")(ones, seed=0)
    assert torch.allclose(out[:, :, 4:11, 4:11], torch.ones(16, 1, 7, 7), atol=1e-5)
    assert (out >= -1e-6).all() and (out <= 1 + 1e-6).all()
    lost = 1 - out.flatten(1).mean(1)  # only the corners leave the frame
    assert lost.max() > 1e-3 and lost.max() < 0.2


def test_rotate_angle_range() -> None:
    """Rotated ramp f = x: the centre slopes are (cos a, -sin a) exactly (bilinear is exact on ramps)."""
    w = 33
    ramp = torch.linspace(-1, 1, w).view(1, 1, 1, w).expand(64, 1, w, w).contiguous()
    out = DSA("rotate")(ramp, seed=1)[:, 0]
    c = w // 2
    dx = out[:, c, c + 1] - out[:, c, c - 1]
    dy = out[:, c + 1, c] - out[:, c - 1, c]
    angle = torch.rad2deg(torch.atan2(-dy, dx))
    assert torch.allclose(dx.pow(2) + dy.pow(2), torch.full_like(dx, (4 / (w - 1)) ** 2), rtol=1e-4)
    assert angle.abs().max() <= 15 + 1e-3
    assert angle.min() < -7 and angle.max() > 7


def test_scale_factor_range() -> None:
    """A horizontal ramp scaled along x: the slope ratio is the per-sample factor in [1/1.2, 1.2]."""
    w = 33
    ramp = torch.linspace(-1, 1, w).view(1, 1, 1, w).expand(32, 1, w, w).contiguous()
    out = DSA("scale")(ramp, seed=3)
    centre = out[:, 0, w // 2, w // 2 - 3 : w // 2 + 4]
    slope_in = ramp[0, 0, 0, 1] - ramp[0, 0, 0, 0]
    factor = (centre[:, -1] - centre[:, 0]) / (6 * slope_in)
    assert factor.min() >= 1 / 1.2 - 1e-4 and factor.max() <= 1.2 + 1e-4
    assert factor.max() - factor.min() > 0.1


def test_identity_strategies() -> None:
    x = _images()
    for s in ("none", "None", ""):
        assert DSA(s)(x, seed=1) is x


def test_dsa_strategy_for() -> None:
    for name in ("mnist", "MNIST", "svhn", "digits"):
        s = dsa_strategy_for(name)
        assert "flip" not in s.split("_")
        assert set(s.split("_")) == set(FAMILIES) - {"flip"}
    assert "flip" in dsa_strategy_for("fashion_mnist").split("_")
    assert dsa_strategy_for("cifar10") == "color_crop_cutout_flip_scale_rotate"
    assert dsa_strategy_for("mnist", "flip") == "none"


def test_unknown_family_raises() -> None:
    with pytest.raises(ValueError, match="strategy") as info:
        DSA("color_blur")
    assert "rotate" in str(info.value)  # lists the allowed families
    with pytest.raises(ValueError, match="strategy"):
        dsa_strategy_for("mnist", "crop_jitter")


def test_bad_inputs_raise() -> None:
    with pytest.raises(ValueError, match="x must be"):
        DSA()(torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match="seed or generator"):
        DSA()(torch.zeros(2, 1, 8, 8), seed=1, generator=torch.Generator())
    with pytest.raises(ValueError, match="flip_p"):
        DSAParams(flip_p=1.5)


def test_one_family_per_call_chosen_uniformly() -> None:
    """`cutout_color`: each call is either pure cutout (exact zeros, rest untouched) or pure color."""
    x = _unique_images(n=4)
    dsa = DSA("cutout_color")
    cutouts = 0
    for seed in range(200):
        out = dsa(x, seed=seed)
        zero = out == 0
        if zero.any():
            assert torch.equal(out[~zero], x[~zero])  # no color change on top of the cutout
            cutouts += 1
        else:
            assert not torch.equal(out, x)
    assert 70 <= cutouts <= 130
