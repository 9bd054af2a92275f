"""DATM, FTD and TESLA switches against hand computations: soft labels (soft cross-entropy and its gradients,
their expert initialisation, evaluation), the growing start window, the loss-threshold skip, the images' moving
average, sharpness-aware experts, and the resume of a run with all of them."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from test_distill import make_distiller, small_config
from torch import nn

from ast_core.evaluate import evaluate_synthetic
from ast_core.experts import sharpness_aware_gradients
from ast_core.functional import _autograd_step, step_gradient
from ast_core.models import FlatModel, build_model
from ast_core.settings import DistillConfig, EvalSpec, ExpertConfig
from ast_core.soft_labels import expert_label_logits


def soft_config(**overrides) -> DistillConfig:
    return small_config(soft_labels=True, lr_y=5.0, **overrides)


def soft_distiller(digits, digits_expert, config: DistillConfig, **kwargs):
    flat_model, trajectory = digits_expert
    logits = torch.randn(10 * config.ipc, 10, generator=torch.Generator().manual_seed(3))
    return make_distiller(digits, digits_expert, config, label_logits=logits, **kwargs)


# -- soft cross-entropy in the student step -------------------------------------------------------------------
def test_soft_step_matches_autograd_and_the_hand_formula_in_float64() -> None:
    """g and the vector-Jacobian products w.r.t. parameters, images and soft labels equal autograd's double
    backward; the classifier-bias part of g is mean_b (softmax(z_b) - p_b), written out by hand."""
    torch.manual_seed(0)
    flat_model = FlatModel(build_model("convnet", 1, 5, 8, width=4, depth=2).double())
    flat = flat_model.flatten().requires_grad_(True)
    x = torch.randn(6, 1, 8, 8, dtype=torch.float64, requires_grad=True)
    p = torch.softmax(torch.randn(6, 5, dtype=torch.float64), 1).requires_grad_(True)
    v = torch.randn(flat_model.num_params, dtype=torch.float64)
    results = []
    for step in (step_gradient(flat_model), _autograd_step(flat_model)):
        grad, ce = step(flat, x, p)
        results.append((grad.detach(), ce, *torch.autograd.grad(grad, (flat, x, p), v)))
    for fast, reference in zip(*results, strict=True):
        torch.testing.assert_close(fast, reference, rtol=1e-9, atol=1e-11)
    logits = flat_model(flat.detach(), x.detach())
    hand = (torch.softmax(logits, 1) - p.detach()).mean(0)
    bias = flat_model.unflatten(results[0][0])[flat_model.names[-1]]
    torch.testing.assert_close(bias, hand, rtol=1e-10, atol=1e-12)
    assert float(results[0][1]) == pytest.approx(float(-(p.detach() * torch.log_softmax(logits, 1)).sum(1).mean()))


def test_one_hot_soft_labels_give_the_hard_label_step() -> None:
    torch.manual_seed(1)
    flat_model = FlatModel(build_model("convnet", 1, 5, 8, width=4, depth=2).double())
    flat = flat_model.flatten()
    x = torch.randn(6, 1, 8, 8, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    step = step_gradient(flat_model)
    torch.testing.assert_close(step(flat, x, F.one_hot(labels, 5).double())[0], step(flat, x, labels)[0])


def test_expert_label_logits_average_the_experts_that_classify_correctly() -> None:
    """Two linear 'experts' on 3 images: image 0 is right for both (mean), image 1 for expert 1 only (its
    logits), image 2 for neither (mean of both)."""
    flat_model = FlatModel(nn.Linear(2, 2, bias=False))
    expert_a = torch.tensor([1.0, 0.0, 0.0, 1.0])        # logits = x
    expert_b = torch.tensor([0.0, 1.0, 1.0, 0.0])        # logits = x swapped
    images = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.5]])
    labels = torch.tensor([0, 0, 1])
    trajectories = [replace_at(expert_a), replace_at(expert_b)]
    logits = expert_label_logits(flat_model, trajectories, images, labels)
    # image 0: a gives [2, 1] (class 0, right), b gives [1, 2] (wrong) -> [2, 1]
    # image 1: a gives [0, 3] (wrong), b gives [3, 0] (right) -> [3, 0]
    # image 2: a gives [1, .5] (class 0, wrong), b gives [.5, 1] (right) -> [.5, 1]
    torch.testing.assert_close(logits, torch.tensor([[2.0, 1.0], [3.0, 0.0], [0.5, 1.0]]))
    other = torch.tensor([1, 0, 0])                      # now b is right on images 0 and 1, a on image 2
    torch.testing.assert_close(expert_label_logits(flat_model, trajectories, images, other),
                               torch.tensor([[1.0, 2.0], [3.0, 0.0], [1.0, 0.5]]))
    none_right = expert_label_logits(flat_model, [replace_at(expert_a)], images, torch.tensor([1, 0, 1]))
    torch.testing.assert_close(none_right, images)    # nobody right: the mean over all (one) experts


def replace_at(flat: torch.Tensor):
    """A one-epoch trajectory ending at `flat`."""
    from conftest import LinearTrajectory
    return LinearTrajectory([torch.zeros_like(flat), flat])


def test_soft_labels_are_learned_and_reach_the_label_logits(digits, digits_expert) -> None:
    distiller = soft_distiller(digits, digits_expert, soft_config(iterations=2))
    before = distiller.engine.label_logits.detach().clone()
    result = distiller.run()
    assert result.label_logits is not None and not torch.equal(result.label_logits, before)
    assert distiller.engine.training_targets().is_floating_point()
    torch.testing.assert_close(distiller.engine.training_targets().sum(1), torch.ones(20))


def test_soft_labels_without_logits_are_rejected(digits, digits_expert) -> None:
    with pytest.raises(ValueError, match="soft_labels needs label_logits"):
        make_distiller(digits, digits_expert, soft_config())


def test_tesla_soft_label_gradient_equals_unrolled_for_one_step(digits, digits_expert) -> None:
    """TESLA's gradient is exact for N = 1, so the label logits' gradient must equal the unrolled one."""
    grads = {}
    for mode in ("unroll", "tesla"):
        engine = soft_distiller(digits, digits_expert, soft_config(syn_steps=1, expert_epochs=1,
                                                                   gradient=mode)).engine
        engine.step()
        grads[mode] = (engine.label_logits.grad.clone(), engine.images.grad.clone())
    torch.testing.assert_close(grads["tesla"][0], grads["unroll"][0], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(grads["tesla"][1], grads["unroll"][1], rtol=1e-4, atol=1e-7)


def test_evaluation_with_one_hot_soft_labels_equals_hard_labels(digits) -> None:
    spec = EvalSpec(width=8, iterations=15, num_models=2, batch_size=32, eval_split="val")
    images, labels = digits.train_x[:40], digits.train_y[:40]
    hard = evaluate_synthetic(images, labels, 0.01, digits, spec)
    soft = evaluate_synthetic(images, F.one_hot(labels, 10).float(), 0.01, digits, spec)
    assert soft.accuracies == pytest.approx(hard.accuracies, abs=1e-9)
    with pytest.raises(ValueError, match="sum to 1"):
        evaluate_synthetic(images, torch.full((40, 10), 0.2), 0.01, digits, spec)
    with pytest.raises(ValueError, match="40 x 10"):
        evaluate_synthetic(images, torch.full((40, 5), 0.2), 0.01, digits, spec)


# -- growing start window, loss-threshold skip ------------------------------------------------------------------
def test_window_bound_per_iteration_by_hand() -> None:
    discrete = DistillConfig(max_start_epoch=10, window_start=4, window_iterations=5)
    # 4 + 6 * min(i / 5, 1), rounded down: 4, 5.2, 6.4, 7.6, 8.8, 10, 10
    assert [discrete.start_bound(i) for i in range(7)] == [4, 5, 6, 7, 8, 10, 10]
    continuous = replace(discrete, sampling="continuous")
    assert [continuous.start_bound(i) for i in range(7)] == pytest.approx([4, 5.2, 6.4, 7.6, 8.8, 10, 10])
    assert DistillConfig(max_start_epoch=10).start_bound(0) == 10


def test_engine_samples_below_the_growing_bound(digits, digits_expert) -> None:
    config = small_config(iterations=6, max_start_epoch=4, window_start=1, window_iterations=4,
                          sampling="continuous")
    result = make_distiller(digits, digits_expert, config).run()
    bounds = [r["start_bound"] for r in result.history]
    assert bounds == pytest.approx([1, 1.75, 2.5, 3.25, 4, 4])
    assert all(r["start_epoch"] < r["start_bound"] for r in result.history)


def test_threshold_skip_updates_nothing_and_is_counted(digits, digits_expert) -> None:
    strict = make_distiller(digits, digits_expert, small_config(iterations=3, skip_threshold=1e-9))
    start = strict.engine.images.detach().clone()
    result = strict.run()
    assert [r["threshold_skipped"] for r in result.history] == [1.0, 1.0, 1.0]
    assert [r["skipped"] for r in result.history] == [0.0, 0.0, 0.0]       # not a non-finite skip
    assert torch.equal(strict.engine.images.detach(), start) and result.syn_lr == pytest.approx(0.05)
    lenient = make_distiller(digits, digits_expert, small_config(iterations=3, skip_threshold=1e9)).run()
    assert [r["threshold_skipped"] for r in lenient.history] == [0.0, 0.0, 0.0]
    assert not torch.equal(lenient.images, start)


# -- images' moving average (FTD) ------------------------------------------------------------------------------
def test_image_ema_after_k_updates_by_hand(digits, digits_expert) -> None:
    """ema_k = d^k x_0 + sum_i (1 - d) d^(k - i) x_i over the images x_i after update i."""
    decay, steps = 0.6, 3
    engine = make_distiller(digits, digits_expert, small_config(image_ema=decay, dsa_strategy="none")).engine
    images = [engine.images.detach().clone()]
    for _ in range(steps):
        engine.step()
        images.append(engine.images.detach().clone())
    hand = decay ** steps * images[0].double()
    for i in range(1, steps + 1):
        hand += (1 - decay) * decay ** (steps - i) * images[i].double()
    torch.testing.assert_close(engine.kept_images().double(), hand, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(engine.kept_images(), engine.images.detach())


# -- resume with every new state -------------------------------------------------------------------------------
def test_resume_with_soft_labels_ema_and_window_is_bit_identical(digits, digits_expert, tmp_path) -> None:
    config = soft_config(iterations=4, image_ema=0.5, window_start=1, window_iterations=3, skip_threshold=10.0)
    straight = soft_distiller(digits, digits_expert, config).run()
    first = soft_distiller(digits, digits_expert, replace(config, iterations=2), checkpoint_dir=tmp_path,
                           checkpoint_every=1)
    first.run()
    resumed = soft_distiller(digits, digits_expert, config, checkpoint_dir=tmp_path).run()
    assert torch.equal(resumed.images, straight.images)
    assert torch.equal(resumed.label_logits, straight.label_logits)
    assert resumed.syn_lr == straight.syn_lr
    assert [r["start_bound"] for r in resumed.history] == [r["start_bound"] for r in straight.history]


# -- sharpness-aware experts (FTD) -----------------------------------------------------------------------------
class Quadratic(nn.Module):
    """L(w) = 1/2 w^T A w."""

    def __init__(self, w: torch.Tensor, a: torch.Tensor) -> None:
        super().__init__()
        self.w, self.a = nn.Parameter(w.clone()), a

    def loss(self) -> torch.Tensor:
        return 0.5 * self.w @ self.a @ self.w


@pytest.mark.parametrize("alpha", [0.0, 0.3])
def test_sam_and_gsam_gradients_on_a_quadratic_by_hand(alpha: float) -> None:
    a = torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
    w = torch.tensor([1.0, -2.0], dtype=torch.float64)
    rho = 0.1
    model = Quadratic(w, a)
    model.loss().backward()
    sharpness_aware_gradients(model, lambda: (model.loss(),), rho, alpha)
    g = a @ w
    g_p = a @ (w + rho * g / g.norm())                                  # gradient at the ascent point
    g_perp = g - (g @ g_p) / (g_p @ g_p) * g_p
    torch.testing.assert_close(model.w.grad, g_p - alpha * g_perp)
    torch.testing.assert_close(model.w.detach(), w)                    # weights back at w


def test_sam_expert_setting_is_validated() -> None:
    with pytest.raises(ValueError, match="sam_rho=-0.1"):
        ExpertConfig(sam_rho=-0.1)
    with pytest.raises(ValueError, match="sam_alpha=2"):
        ExpertConfig(sam_rho=0.05, sam_alpha=2)


@pytest.mark.parametrize(("overrides", "message"), [
    ({"image_ema": 1.0}, "image_ema=1.0 must be in"),
    ({"window_start": 0}, "window_start=0 must be null"),
    ({"window_start": 5}, "window_start=5 must be null"),
    ({"window_start": 1.5}, "window_start=1.5 must be an integer"),
    ({"window_iterations": 0}, "window_iterations=0 must be a positive integer"),
    ({"skip_threshold": -1.0}, "skip_threshold=-1.0 must be null"),
    ({"lr_y": 0.0}, "lr_y=0.0 must be a finite number > 0"),
    ({"soft_labels": "yes"}, "soft_labels='yes' must be true or false"),
    ({"intermediate_spacing": "even"}, "intermediate_spacing='even' is not supported; allowed: paper, code"),
])
def test_bad_switch_values_name_the_key(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        small_config(**overrides)


def test_best_set_keeps_its_label_logits(digits, digits_expert) -> None:
    distiller = soft_distiller(digits, digits_expert, soft_config(iterations=1), evaluator=lambda x, y, lr: 50.0,
                               eval_every=1)
    result = distiller.run()
    assert result.best is not None and result.best.iteration == 0      # 50 % never beaten: the starting set
    start = torch.randn(20, 10, generator=torch.Generator().manual_seed(3))   # soft_distiller's logits
    torch.testing.assert_close(result.best.label_logits, start)



# -- through the pipeline's stages ---------------------------------------------------------------------------
def test_stages_distil_and_score_a_soft_label_set_on_flat_experts(tiny, caplog) -> None:
    """A row with every switch on, from sharpness-aware experts: the kept set stores its label logits and their
    picture, the history the window bound and skips, and the test stage scores soft and hard labels."""
    import csv
    import json

    import yaml
    from safetensors.torch import load_file

    from pipeline.cli import main

    params = yaml.safe_load((tiny / "params.yaml").read_text())
    params["buffer"]["variants"]["flat"] = {"optimizer": "sgd", "lr": 0.02, "lr_decay_epoch": None, "clip_ce": False,
                                            "grad_penalty": False, "sam_rho": 0.05, "sam_alpha": 0.2}
    params["buffer"]["train"] = ["flat"]
    params["init"]["buffer"] = "flat"
    params["distill"]["methods"] = ["everything"]
    params["distill"]["configs"]["everything"] = {
        "buffer": "flat", "init": "representative", "soft_labels": True, "image_ema": 0.5,
        "hyper": {"window_start": 1, "window_iterations": 2, "skip_threshold": 100.0}}
    (tiny / "params.yaml").write_text(yaml.safe_dump(params))
    for stage in ("prepare", "buffer", "init", "distill", "evaluate"):
        assert main([stage]) == 0, caplog.text
    summary = json.loads((tiny / "artifacts/buffer/flat/summary.json").read_text())
    assert summary["avg_var"]["mean"] > 0
    cell = tiny / "artifacts/distill/everything/ipc1/seed0"
    synthetic = load_file(str(cell / "synthetic.safetensors"))
    assert synthetic["label_logits"].shape == (10, 10) and (cell / "soft_labels.png").stat().st_size > 0
    history = list(csv.DictReader((cell / "history.csv").open()))
    assert [float(r["start_bound"]) for r in history] == [1.0, 1.0, 2.0, 2.0]   # 1 + min(i / 2, 1), floored
    assert {r["threshold_skipped"] for r in history} <= {"0.0", "1.0"}
    result = json.loads((cell / "result.json").read_text())
    assert result["soft_labels"] and "threshold_skipped_iterations" in result
    details = json.loads((tiny / "artifacts/evaluate/everything/ipc1/seed0/results.json").read_text())
    assert details["soft_labels"] and set(details["hard_label_results"]) == set(details["results"]) == {"convnet"}
    assert details["results"]["convnet"]["seeds"] == details["hard_label_results"]["convnet"]["seeds"]
    metrics = json.loads((tiny / "artifacts/evaluate/everything/ipc1/seed0/metrics.json").read_text())
    assert set(metrics["everything_ipc1_s0"]) == {"convnet", "convnet_hard_labels", "syn_lr"}
