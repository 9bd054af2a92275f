"""Shared fixtures: a tiny real dataset (scikit-learn digits) and a short real expert trajectory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tiny import write_tiny_params

# One thread: the in-process models are tiny, and more threads only add contention on a 2-core machine.
torch.set_num_threads(1)


class LinearTrajectory:
    """Checkpoints read linearly between neighbours (a minimal stand-in for a stored expert)."""

    def __init__(self, checkpoints: list[torch.Tensor]) -> None:
        self.checkpoints = checkpoints

    @property
    def num_epochs(self) -> int:
        return len(self.checkpoints) - 1

    def at(self, t: float) -> torch.Tensor:
        low = min(int(t), self.num_epochs - 1)
        frac = t - low
        return (1 - frac) * self.checkpoints[low] + frac * self.checkpoints[low + 1]


@pytest.fixture(scope="session")
def digits(tmp_path_factory: pytest.TempPathFactory):
    from ast_core.data import load_dataset

    return load_dataset("digits", val_size=0.1, seed=0, cache_dir=str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="session")
def digits_expert(digits):
    """A ConvNet (width 8) trained 6 epochs on digits with plain SGD: (flat_model, trajectory)."""
    from ast_core.models import FlatModel, build_model

    torch.manual_seed(0)
    model = build_model("convnet", 1, 10, 8, width=8)
    flat_model = FlatModel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    checkpoints = [flat_model.flatten()]
    generator = torch.Generator().manual_seed(0)
    for _ in range(6):
        perm = torch.randperm(len(digits.train_y), generator=generator)
        for batch in perm.split(64):
            optimizer.zero_grad()
            F.cross_entropy(model(digits.train_x[batch]), digits.train_y[batch]).backward()
            optimizer.step()
        checkpoints.append(flat_model.flatten())
    return flat_model, LinearTrajectory(checkpoints)


@pytest.fixture
def tiny(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory with the tiny profile and a private MLflow store and data cache."""
    write_tiny_params(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AST_DD_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("AST_DD_PARENT_RUN_ID", raising=False)
    return tmp_path


@pytest.fixture
def tiny_ready(tiny: Path) -> Path:
    """The tiny profile with prepare, the AST buffer and init done (ipc 1, method ast)."""
    import yaml

    from pipeline.cli import main

    params = yaml.safe_load((tiny / "params.yaml").read_text())
    params["buffer"]["train"] = ["ast"]
    params["distill"]["methods"] = ["ast"]
    (tiny / "params.yaml").write_text(yaml.safe_dump(params))
    for stage in ("prepare", "buffer", "init"):
        assert main([stage]) == 0
    return tiny
