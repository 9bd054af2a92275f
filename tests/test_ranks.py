"""`distill.devices: 2`: the distill stage runs its cell as two torchrun ranks on the CPU (gloo, pipeline.ranks) and
writes what one process writes, to float32 rounding; settings it cannot run are refused by `ast-dd params`."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from pipeline.cli import main
from pipeline.params import load_params
from pipeline.schema import ParamsError

CELL = Path("artifacts/distill/ast/ipc1/seed0")


def distil(tiny: Path, params: dict, devices: int) -> dict[str, torch.Tensor]:
    params["distill"]["devices"] = devices
    (tiny / "params.yaml").write_text(yaml.safe_dump(params))
    shutil.rmtree(tiny / CELL, ignore_errors=True)
    assert main(["distill"]) == 0
    return load_file(str(tiny / CELL / "synthetic.safetensors"))


@pytest.mark.slow
def test_a_cell_on_two_processes_writes_what_one_process_writes(tiny_ready: Path) -> None:
    params = yaml.safe_load((tiny_ready / "params.yaml").read_text())
    one, two = distil(tiny_ready, params, 1), distil(tiny_ready, params, 2)
    assert not torch.equal(two["final_images"], one["final_images"])  # the sums ran in another order ...
    torch.testing.assert_close(two["final_images"], one["final_images"], rtol=1e-4, atol=1e-5)  # ... same set
    torch.testing.assert_close(two["final_syn_lr"], one["final_syn_lr"], rtol=1e-5, atol=0)
    assert torch.equal(two["labels"], one["labels"])


@pytest.mark.parametrize(("change", "message"), [
    ({"model": {"arch": "resnet18_bn"}}, "distill.devices: 2 needs a student without batch norm"),
    ({"device": "cuda"}, "distill.devices: 2 GPUs asked for but"),
    ({"distill": {"devices": 0}}, "distill.devices"),
    ({"distill": {"devices": 3, "hyper": {"batch_syn": 2}}},
     r"distill.hyper.batch_syn \(distill.configs.ast at ipc 1\): 2 images .* distill.devices: 3"),
])
def test_devices_the_run_cannot_use_are_refused_naming_the_key(tiny: Path, change: dict, message: str) -> None:
    if change.get("device") == "cuda" and torch.cuda.device_count() >= 2:
        pytest.skip("two GPUs are visible")
    overlay = tiny / "overlay.yaml"
    overlay.write_text(yaml.safe_dump({"distill": {"devices": 2}} | change))
    with pytest.raises(ParamsError, match=message):
        load_params(tiny / "params.yaml", [overlay])


def test_a_multi_gpu_cell_takes_its_gpus_together_or_waits() -> None:
    """Two 2-GPU cells on 3 GPUs: the second waits for the first's GPUs instead of holding one of them (which
    would let two cells each hold part of what they need and wait forever)."""
    import threading

    from flows.stages import GpuPool

    pool = GpuPool(("0", "1", "2"))
    first = pool.take(2)
    taken: list[list[str]] = []
    waiter = threading.Thread(target=lambda: taken.append(pool.take(2)))
    waiter.start()
    waiter.join(timeout=0.5)
    assert waiter.is_alive() and pool.free == ["2"]  # waiting, and holding nothing
    pool.give_back(first)
    waiter.join(timeout=5)
    assert len(taken[0]) == 2 and set(taken[0]) | set(pool.free) == {"0", "1", "2"}
    with pytest.raises(ValueError, match="distill.devices: 4 GPUs"):
        pool.take(4)
