"""Two invocations on one project never write the same artifacts at once.

1. `dvc repro` and `dvc exp run` hold ``.dvc/tmp/lock`` (an exclusive `flock`, via zc.lockfile) while they
   plan and record. A stage command started by hand (`ast-dd distill ...`; DVC sets ``DVC_STAGE`` for the
   commands it runs) and `ast-dd score` take the same lock (`project_lock`), so a second one in another
   terminal, or a `dvc repro` or Prefect deployment (whose stages run through DVC), refuses to start while it runs.
2. DVC releases its lock while a stage command runs (that is how independent stages run at once), so every
   stage also locks the outputs it writes (`lock_outputs`, one lock file per output under ``.dvc/tmp/ast-dd/``):
   a second process about to write the same cell refuses, naming it, whoever started either.
Locks are released when the command ends (`release_output_locks`) or its process dies.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from pipeline.schema import UsageError

LOCK = Path(".dvc") / "tmp" / "lock"
OUTPUT_LOCKS = Path(".dvc") / "tmp" / "ast-dd"
RANKS_PARENT = "AST_DD_RANKS_PARENT"  # set for the ranks of one distillation: the pid of the command holding the lock
_held: list[TextIO] = []   # open lock files of this command's outputs


class ProjectBusyError(UsageError):
    """Another DVC or ast-dd command holds the project's lock."""


@contextlib.contextmanager
def project_lock(root: Path = Path()) -> Iterator[None]:
    """Hold the project's DVC lock (no-op outside a DVC project, under DVC, which holds it already, and in the
    ranks of one distillation, whose `ast-dd distill` holds it: pipeline.ranks)."""
    if "DVC_STAGE" in os.environ or RANKS_PARENT in os.environ or not (root / ".dvc").is_dir():
        yield
        return
    handle = _try_lock(root / LOCK, f"another DVC or ast-dd command is running in this project: {root / LOCK} is "
                                    "held by")
    try:
        yield
    finally:
        _release(handle)


def _try_lock(path: Path, busy: str) -> TextIO:
    """An open file of `path` holding its exclusive lock, with this pid in it; ProjectBusyError(`busy`) if held."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = path.open("a+")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        owner = handle.read().strip() or "unknown"
        handle.close()
        raise ProjectBusyError(f"{busy} process {owner}; wait for it to finish, then run this again") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f" {os.getpid()}\n")
    handle.flush()
    return handle


def lock_outputs(outputs: list[Path], root: Path = Path()) -> None:
    """Lock each output path of this stage for the rest of the command (no-op outside a DVC project)."""
    if not (root / ".dvc").is_dir():
        return
    for output in outputs:
        name = output.as_posix().strip("/").replace("/", "__")
        _held.append(_try_lock(root / OUTPUT_LOCKS / f"{name}.lock",
                               f"another process is writing {output} in this project:"))


def release_output_locks() -> None:
    """Release the output locks this command took."""
    while _held:
        _release(_held.pop())


def _release(handle: TextIO) -> None:
    fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
    handle.close()
