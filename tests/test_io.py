"""Atomic writes: complete file or the old one, never a partial file; normal permissions."""

import os
import stat

import pytest

from ast_core.io import atomic_path, atomic_write_csv, atomic_write_json, atomic_write_text


def test_failed_write_keeps_the_previous_file_and_leaves_no_temp(tmp_path) -> None:
    target = tmp_path / "out.txt"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_written_files_get_umask_permissions(tmp_path) -> None:
    path = atomic_write_json(tmp_path / "a" / "b.json", {"x": 1})
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask
    assert path.read_text() == '{\n  "x": 1\n}\n'


def test_csv_header_is_the_union_of_keys(tmp_path) -> None:
    path = atomic_write_csv(tmp_path / "rows.csv", [{"a": 1}, {"a": 2, "b": 3}])
    assert path.read_text().splitlines() == ["a,b", "1,", "2,3"]


def test_csv_named_columns_come_first_and_survive_no_rows(tmp_path) -> None:
    path = atomic_write_csv(tmp_path / "rows.csv", [{"b": 1, "a": 2, "c": 3}], columns=("a", "b"))
    assert path.read_text().splitlines() == ["a,b,c", "2,1,3"]
    empty = atomic_write_csv(tmp_path / "empty.csv", [], columns=("iteration", "val_acc"))
    assert empty.read_text().splitlines() == ["iteration,val_acc"]


WRITE_TWICE = """
import sys, torch
from ast_core.io import atomic_write_safetensors
from ast_core.trajectory import save_trajectory
out = sys.argv[1]
atomic_write_safetensors(f"{out}/plain.safetensors", {"b": torch.arange(6.0), "a": torch.ones(2, dtype=torch.float16)},
                         {key: str(i) for i, key in enumerate("qwertyuiopasdfgh")})
save_trajectory(f"{out}/expert.safetensors", torch.arange(12.0).reshape(3, 4),
                {"seed": 3, "config": {"lr": 0.01, "optimizer": "sgd"}, "epochs": 2, "note": "x"})
"""


def test_the_same_tensors_give_the_same_bytes_in_every_process(tmp_path) -> None:
    """safetensors writes its metadata map in a per-process order; the project's files do not change with it."""
    import subprocess
    import sys

    from safetensors import safe_open

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    files = {}
    for run in range(3):
        out = tmp_path / str(run)
        out.mkdir()
        subprocess.run([sys.executable, "-c", WRITE_TWICE, str(out)], check=True,
                       env={**os.environ, "PYTHONPATH": root})
        files[run] = {name: (out / name).read_bytes() for name in ("plain.safetensors", "expert.safetensors")}
    assert files[0] == files[1] == files[2]
    with safe_open(tmp_path / "0" / "plain.safetensors", "pt") as handle:
        assert handle.metadata() == {key: str(i) for i, key in enumerate("qwertyuiopasdfgh")}
        assert handle.get_tensor("b").tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
