"""Expert training (AST Algorithm 1): accuracy, repeatability, resume, reports and config validation."""

import csv
import json
from pathlib import Path

import pytest
import torch

import ast_core.experts as experts
from ast_core.expert_reports import summarize_buffer
from ast_core.experts import LocalScheduler, make_optimizer, train_expert, train_experts
from ast_core.settings import ExpertConfig
from ast_core.trajectory import avg_var, expert_path, load_trajectory, step_sq_norms

TINY = ExpertConfig(width=16, epochs=2, batch_size=64)


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """One torch thread: CPU sums depend on the thread count, and 2 threads crawl on a busy 2-core host."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(digits, single_thread):
    return train_expert(digits, TINY, seed=0)


def test_train_expert_records_every_epoch_and_learns(trained) -> None:
    checkpoints, history = trained
    assert len(checkpoints) == TINY.epochs + 1
    assert all(c.dim() == 1 and c.numel() == checkpoints[0].numel() for c in checkpoints)
    for key in ("lr", "train_loss", "train_acc", "gp", "val_acc", "test_acc", "step_sq_norm"):
        assert len(history[key]) == TINY.epochs
    assert history["test_acc"][-1] > 50.0  # chance is 10 %
    assert history["step_sq_norm"] == step_sq_norms(checkpoints)
    assert all(gp is not None and gp >= 0 for gp in history["gp"])


def test_same_seed_is_bit_identical_and_another_seed_differs(digits, trained) -> None:
    again, _ = train_expert(digits, TINY, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(trained[0], again, strict=True))
    other, _ = train_expert(digits, ExpertConfig(width=16, epochs=1, batch_size=64), seed=1)
    assert not torch.equal(other[0], trained[0][0])


def test_gradient_penalty_sees_the_unaugmented_batch(digits, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[torch.Tensor] = []

    def recording_penalty(model, x, target_norm, norm, sided):
        seen.append(x.detach().clone())
        return torch.zeros((), requires_grad=True)

    monkeypatch.setattr(experts, "gradient_penalty", recording_penalty)
    train_expert(digits, ExpertConfig(width=8, epochs=1, batch_size=256), seed=0)
    rows = {tuple(row.tolist()) for row in digits.train_x.flatten(1)}
    batch = torch.cat(seen).flatten(1)
    assert batch.shape[0] == digits.train_x.shape[0]
    assert all(tuple(row.tolist()) in rows for row in batch)


def test_learning_rate_schedule_and_optimizers() -> None:
    config = ExpertConfig(lr=0.01, lr_decay_epoch=25)
    assert [config.lr_at(e) for e in (0, 24, 25, 49)] == [0.01, 0.01, 0.005, 0.005]
    assert ExpertConfig(lr_decay_epoch=None).lr_at(49) == 0.01
    model = torch.nn.Linear(2, 2)
    assert make_optimizer(model, ExpertConfig(optimizer="momentum")).defaults["momentum"] == 0.9
    assert make_optimizer(model, ExpertConfig(optimizer="sgd")).defaults["momentum"] == 0.0
    assert isinstance(make_optimizer(model, ExpertConfig(optimizer="adam")), torch.optim.Adam)
    assert ExpertConfig().dsa_for("digits") == "color_crop_cutout_scale_rotate"
    assert ExpertConfig().dsa_for("fashion_mnist") == "color_crop_cutout_flip_scale_rotate"


@pytest.mark.parametrize(("field", "value"), [
    ("optimizer", "rmsprop"), ("lr", 0.0), ("momentum", 1.0), ("gp_norm", "l1"), ("width", 0),
    ("clip_start", 1.5), ("dsa_strategy", "blur"), ("clip_ce", "yes"), ("arch", "mlp"), ("lr_decay_epoch", 0),
    ("epochs", 2.5), ("gp_weight", float("nan")),
])
def test_config_validation_names_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"ExpertConfig\.{field}="):
        ExpertConfig(**{field: value})


def test_train_experts_resumes_and_the_reports_summarise_the_folder(digits, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    config = ExpertConfig(width=8, epochs=2, batch_size=128, optimizer="sgd", clip_ce=False, grad_penalty=False)
    train_experts(digits, config, tmp_path, num_experts=1, seed=7)
    first = load_trajectory(expert_path(tmp_path, 0))
    calls: list[int] = []
    real = experts.train_expert

    def counting(data, cfg, seed, **kwargs):
        calls.append(seed)
        return real(data, cfg, seed, **kwargs)

    monkeypatch.setattr(experts, "train_expert", counting)
    train_experts(digits, config, tmp_path, num_experts=2, seed=7, dtype=torch.float16)
    assert calls == [8]  # expert 0 (seed 7) was kept
    assert torch.equal(load_trajectory(expert_path(tmp_path, 0)).checkpoints, first.checkpoints)
    second = load_trajectory(expert_path(tmp_path, 1))
    assert second.checkpoints.dtype == torch.float16 and second.metadata["seed"] == 8
    assert second.metadata["param_shapes"][0] == [8, 1, 3, 3] and second.metadata["history"]["gp"] == [None] * 2

    summary = summarize_buffer(tmp_path)
    assert summary["num_experts"] == 2 and summary["seeds"] == [7, 8]
    assert summary["avg_var"]["per_expert"][0] == pytest.approx(avg_var(first), rel=1e-9)
    assert json.loads((tmp_path / "summary.json").read_text())["test_acc"]["mean"] == summary["test_acc"]["mean"]
    with open(tmp_path / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["expert"], r["epoch"]) for r in rows] == [("0", "1"), ("0", "2"), ("1", "1"), ("1", "2")]
    assert {"train_acc", "val_acc", "test_acc", "step_sq_norm"} <= set(rows[0])
    assert (tmp_path / "accuracy.png").stat().st_size > 0 and (tmp_path / "step_sq_norm.png").stat().st_size > 0

    with pytest.raises(ValueError, match="expert_000.safetensors.*config"):
        train_experts(digits, ExpertConfig(width=8, epochs=2, lr=0.02), tmp_path, num_experts=1, seed=7)


def test_a_scheduler_gets_only_the_missing_experts(digits, tmp_path: Path) -> None:
    class Recording:
        def __init__(self) -> None:
            self.jobs: list = []

        def run(self, data, jobs) -> None:
            self.jobs.extend(jobs)
            LocalScheduler().run(data, jobs)

    config = ExpertConfig(width=8, epochs=1, batch_size=256)
    train_experts(digits, config, tmp_path, num_experts=1, seed=5)
    scheduler = Recording()
    train_experts(digits, config, tmp_path, num_experts=3, seed=5, scheduler=scheduler)
    assert [(job.index, job.seed, job.path) for job in scheduler.jobs] == [(i, 5 + i, expert_path(tmp_path, i))
                                                                           for i in (1, 2)]
    train_experts(digits, config, tmp_path, num_experts=3, seed=5, scheduler=scheduler)  # nothing left to train
    assert len(scheduler.jobs) == 2
    with pytest.raises(ValueError, match="workers=0"):
        LocalScheduler(workers=0)


@pytest.mark.slow
def test_parallel_workers_match_serial_training(digits, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = ExpertConfig(width=8, epochs=1, batch_size=256)
    monkeypatch.setattr(experts.os, "cpu_count", lambda: 2)  # 2 workers x 1 thread, like this serial run
    train_experts(digits, config, tmp_path / "serial", num_experts=2)
    train_experts(digits, config, tmp_path / "parallel", num_experts=2, scheduler=LocalScheduler(workers=2))
    for index in range(2):
        serial = load_trajectory(expert_path(tmp_path / "serial", index))
        parallel = load_trajectory(expert_path(tmp_path / "parallel", index))
        assert torch.equal(serial.checkpoints, parallel.checkpoints)


def test_history_records_the_input_gradient_norm_per_epoch_and_at_init(trained) -> None:
    _, history = trained
    for key in ("grad_norm_mean", "grad_norm_q10", "grad_norm_q90"):
        assert len(history[key]) == TINY.epochs
        assert all(q10 <= mean <= q90 for q10, mean, q90 in
                   zip(history["grad_norm_q10"], history["grad_norm_mean"], history["grad_norm_q90"], strict=True))
    init = history["grad_norm_init"]
    assert 0 < init["grad_norm_q10"] <= init["grad_norm_mean"] <= init["grad_norm_q90"]


def test_grad_norm_stats_match_a_hand_computation_on_a_linear_model() -> None:
    # f(x) = W vec(x): every sample's input gradient is Σ_c W_c = (3, 4) -> norm 5, so all stats are 5.
    model = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 4.0], [2.0, 0.0]]))
    stats = experts.grad_norm_stats(model, torch.randn(7, 2), "sample")
    assert stats == pytest.approx({"grad_norm_mean": 5.0, "grad_norm_q10": 5.0, "grad_norm_q90": 5.0})


@pytest.mark.parametrize("rebuild", [False, True])
def test_lr_step_rebuilds_the_optimiser_only_when_asked(digits, monkeypatch: pytest.MonkeyPatch, rebuild: bool) -> None:
    built = []
    original = experts.make_optimizer

    def counting(model, config):
        built.append(config)
        return original(model, config)

    monkeypatch.setattr(experts, "make_optimizer", counting)
    config = ExpertConfig(width=8, epochs=2, batch_size=256, lr_decay_epoch=1, lr_decay_factor=0.6,
                          lr_decay_rebuild=rebuild, grad_penalty=False)
    _, history = train_expert(digits, config, seed=0)
    assert len(built) == (2 if rebuild else 1)
    assert history["lr"] == pytest.approx([0.01, 0.006])


def test_summary_and_figure_carry_the_gradient_norms(tmp_path: Path, digits) -> None:
    train_experts(digits, ExpertConfig(width=8, epochs=1, batch_size=256), tmp_path, num_experts=1)
    summary = summarize_buffer(tmp_path, 1)
    assert summary["grad_norm_mean"]["mean"] > 0 and summary["grad_norm_init"]["mean"] > 0
    assert (tmp_path / "grad_norm.png").is_file()
    with open(tmp_path / "metrics.csv") as handle:
        assert {"grad_norm_mean", "grad_norm_q10", "grad_norm_q90"} <= set(next(csv.DictReader(handle)))
