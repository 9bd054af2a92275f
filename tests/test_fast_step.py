"""The hand-written ConvNet step (ast_core.functional) has the same math as autograd and as the MTT reference."""

from __future__ import annotations

import importlib.util
import platform
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import LinearTrajectory
from torch import nn

from ast_core.distill import Distiller
from ast_core.functional import _autograd_step, convnet_layout, reuse_freed_cpu_memory, step_gradient
from ast_core.models import FlatModel, build_model
from ast_core.settings import DistillConfig

_spec = importlib.util.spec_from_file_location(
    "reference_step", Path(__file__).resolve().parents[1] / "benchmarks" / "reference_step.py")
reference_step = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(reference_step)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


@pytest.mark.parametrize(("channels", "size", "width", "depth"), [
    (1, 8, 6, 1),    # digits-sized
    (1, 28, 4, 3),   # FMNIST layout: first conv padded by 3 to a 32x32 map
    (3, 16, 5, 2),
    (1, 6, 3, 2),    # odd maps (6 -> 3 -> 1): pooling drops the last row and column
])
def test_convnet_step_and_its_vjp_equal_autograd_double_backward(channels, size, width, depth) -> None:
    torch.manual_seed(0)
    flat_model = FlatModel(build_model("convnet", channels, 10, size, width=width, depth=depth).double())
    assert convnet_layout(flat_model) is not None
    flat = (flat_model.flatten() + 0.1 * torch.randn(flat_model.num_params, dtype=torch.float64)).requires_grad_()
    x = torch.randn(7, channels, size, size, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 10, (7,))
    cotangent = torch.randn(flat_model.num_params, dtype=torch.float64)
    fast_grad, fast_loss = step_gradient(flat_model)(flat, x, labels)
    slow_grad, slow_loss = _autograd_step(flat_model)(flat, x, labels)
    assert fast_loss.item() == pytest.approx(slow_loss.item(), rel=1e-12)
    assert relative_error(fast_grad, slow_grad) < 1e-12
    fast_vjp = torch.autograd.grad(fast_grad, [flat, x], cotangent)
    slow_vjp = torch.autograd.grad(slow_grad, [flat, x], cotangent)
    for fast, slow in zip(fast_vjp, slow_vjp, strict=True):
        assert relative_error(fast, slow) < 1e-12
    images_only = torch.autograd.grad(step_gradient(flat_model)(flat.detach(), x, labels)[0], x, cotangent)[0]
    assert relative_error(images_only, slow_vjp[1]) < 1e-12


def test_other_architectures_fall_back_to_autograd() -> None:
    module = nn.Sequential(nn.Flatten(), nn.Linear(12, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    flat_model = FlatModel(module)
    assert convnet_layout(flat_model) is None
    flat = flat_model.flatten().requires_grad_()
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 1])
    grad, loss = step_gradient(flat_model)(flat, x, labels)
    expected = torch.autograd.grad(F.cross_entropy(flat_model(flat, x), labels), flat, create_graph=True)[0]
    assert torch.allclose(grad, expected) and not loss.requires_grad
    assert grad.requires_grad
    with torch.no_grad():
        assert not step_gradient(flat_model)(flat, x, labels)[0].requires_grad


def tiny_problem(syn_steps: int, gradient: str = "unroll", dsa: str = "color_crop_cutout_flip_scale_rotate",
                 lr_teacher: float = 0.05, **overrides) -> tuple[Distiller, torch.Tensor, torch.Tensor]:
    """A float64 Distiller on a 28-px 3-block ConvNet (width 4), with its expert start and target."""
    torch.manual_seed(0)
    flat_model = FlatModel(build_model("convnet", 1, 10, 28, width=4).double())
    start = flat_model.flatten()
    target = start + 0.02 * torch.randn(start.shape, dtype=torch.float64)
    config = DistillConfig(**{"ipc": 2, "iterations": 1, "syn_steps": syn_steps, "expert_epochs": 1,
                              "max_start_epoch": 1, "lr_teacher": lr_teacher, "dsa_strategy": dsa,
                              "gradient": gradient, **overrides})
    images = torch.randn(20, 1, 28, 28, dtype=torch.float64)
    labels = torch.arange(10).repeat_interleave(2)
    distiller = Distiller(config, [LinearTrajectory([start, target])], flat_model, images, labels)
    return distiller, start, target


def distiller_gradients(distiller: Distiller, start: torch.Tensor, target: torch.Tensor,
                        nu: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, images grad, lr grad) of one matching iteration without applying the update."""
    engine = distiller.engine
    loss, _ = engine.loss_and_gradients(start.clone(), {1: target}, start, nu)
    return loss.detach(), engine.images.grad.clone(), engine.syn_lr.grad.clone()


def test_distiller_gradients_equal_the_mtt_reference_step() -> None:
    distiller, start, target = tiny_problem(syn_steps=3, batch_syn=7)
    engine = distiller.engine
    state = engine.generator.get_state()
    loss, image_grad, lr_grad = distiller_gradients(distiller, start, target)
    engine.generator.set_state(state)
    batches = engine.batches()
    ref_loss, ref_image_grad, ref_lr_grad = reference_step.reference_gradients(
        reference_step.ReparamModule(engine.flat_model.module), engine.images, engine.labels, batches,
        start, target, engine.syn_lr, lambda x, g: engine.dsa(x, generator=g), engine.generator)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-10)
    assert relative_error(image_grad, ref_image_grad) < 1e-8
    assert lr_grad.item() == pytest.approx(ref_lr_grad.item(), rel=1e-8)


def test_freed_memory_reuse_applies_exactly_on_glibc() -> None:
    assert reuse_freed_cpu_memory() is (platform.libc_ver()[0] == "glibc")


def test_counted_flops_of_an_iteration_equal_the_hand_count_of_its_convolutions(monkeypatch) -> None:
    """bench_distill's FLOP count (used for the share of a GPU's peak) sees every convolution of the step."""
    benchmarks = Path(__file__).resolve().parents[1] / "benchmarks"
    monkeypatch.syspath_prepend(str(benchmarks))
    bench_distill = importlib.import_module("bench_distill")
    batch, width, steps = 10, 128, 3  # ipc 1, 10 classes; ConvNet-3 on 28 px: maps 32, 16, 8
    counted = bench_distill.count_flops(bench_distill._iteration("ours", 1, 1, 28, steps, torch.device("cpu")))
    blocks = [(1, 32), (width, 16), (width, 8)]  # (input channels, output map side)
    expected = 0
    for step in range(steps):
        for index, (in_channels, side) in enumerate(blocks):
            calls = 2 + (index > 0)            # forward, weight grad, input grad (not for the images)
            calls += 1 + (index > 0)           # tangent forward: conv(x, dW) [+ conv(dx, W)]
            if step > 0:                       # the first step starts from the (constant) expert
                calls += 1 + (index > 0)       # weight grad of the tangent backward
            calls += 2                         # input grad of the tangent backward (images need it too)
            expected += calls * 2 * batch * width * side * side * in_channels * 9
    assert counted["conv_flops"] == expected
    assert counted["flops"] > counted["conv_flops"]  # plus the classifier's matrix products
