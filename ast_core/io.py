"""Crash-safe file writing: every artifact goes to a temporary name in the same folder, then is renamed.

A reader therefore sees either the old complete file or the new complete one, never a half-written file.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


class DiskFullError(RuntimeError):
    """A write failed for want of space; the previous file at that path is untouched."""


def disk_full_error(target: Path, error: BaseException) -> DiskFullError | None:
    """The error to raise instead of `error` when the disk holding `target` is full, else None. Libraries report
    a full disk their own way (torch: "file write failed"), so a failed write on a disk with no space left counts."""
    full = isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)
    folder = nearest_existing(target.parent)
    free = shutil.disk_usage(folder).free
    if not (full or free == 0):
        return None
    return DiskFullError(f"{target}: no space left to write it ({free} bytes free on the disk of {folder}); the "
                         "previous file there is untouched. Free some space and run the same command again: it "
                         "resumes where it stopped")


def nearest_existing(path: Path) -> Path:
    """`path` itself, else its closest ancestor that exists."""
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is fsynced and renamed onto `path`. A failed write
    leaves the previous file as it was and no temporary file; on a full disk it is a `DiskFullError` naming the
    path and the free space."""
    target = Path(path)
    tmp: Path | None = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, target)
    except Exception as error:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
            tmp = None
        if (full := disk_full_error(target, error)) is not None:
            raise full from error
        raise
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def atomic_write_with(path: str | os.PathLike, writer: Callable[[Path], Any]) -> Path:
    """Call `writer(tmp_path)` and atomically move the result to `path`."""
    with atomic_path(path) as tmp:
        writer(tmp)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_with(path, lambda tmp: tmp.write_text(text))


def atomic_write_json(path: str | os.PathLike, data: Any) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def atomic_write_safetensors(path: str | os.PathLike, tensors: Mapping[str, Tensor],
                             metadata: Mapping[str, str] | None = None) -> Path:
    """Tensors (and string metadata) as a safetensors file, its header in a fixed order: the library writes the
    metadata map in an order that changes from process to process, which would make the same tensors a
    different file (a changed DVC output, a rewritten dvc.lock)."""
    from safetensors.torch import save

    data = save(dict(tensors), metadata=dict(metadata) if metadata is not None else None)
    size = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + size])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    if len(text) > size:  # the same keys and values in another order never grow
        raise RuntimeError(f"{path}: the reordered safetensors header is longer than the original")
    return atomic_write_with(path, lambda tmp: tmp.write_bytes(data[:8] + text.ljust(size) + data[8 + size:]))


def atomic_write_csv(path: str | os.PathLike, rows: Sequence[dict[str, Any]],
                     columns: Sequence[str] = ()) -> Path:
    """Write a list of dicts as CSV; header: `columns`, then the other keys of the rows in first-seen order
    (so a file with no rows still names its columns)."""
    fields: list[str] = list(columns)
    for row in rows:
        fields.extend(key for key in row if key not in fields)

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)

    return atomic_write_with(path, write)
