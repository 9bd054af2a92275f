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
