"""What a stage does to its output folders before it computes: prove it can write them (a read-only folder
fails in the first second, naming it, not after hours of compute), and keep its DVC-cached outputs listed in
their folders' ``.gitignore``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from ast_core.io import atomic_write_text, nearest_existing
from pipeline.locking import lock_outputs
from pipeline.schema import UsageError


def check_writable(folder: Path) -> None:
    """`folder` can be written, or created and then written, by this user; creates nothing."""
    existing = nearest_existing(folder)
    if not existing.is_dir():
        raise UsageError(f"{folder}: cannot create this output folder, {existing} is a file; move it away")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{folder}: output folder not writable ({existing} is read-only); make it writable, "
                         f"e.g. `chmod u+w {existing}`")


def ignore_in_git(output: Path) -> None:
    """List `output` in its folder's .gitignore as DVC does (``/name``) when the project is a git work tree.

    DVC adds the entry only when it is missing, and when a later stage of the same `dvc repro` fails it removes
    the entries it added, never to restore them (the stage is up to date). An entry already there is neither
    added nor removed by DVC.
    """
    if not Path(".git").exists():
        return
    gitignore = output.parent / ".gitignore"
    lines = gitignore.read_text().splitlines() if gitignore.is_file() else []
    if f"/{output.name}" not in lines:
        atomic_write_text(gitignore, "\n".join([*lines, f"/{output.name}"]) + "\n")


def claim_outputs(cached: Sequence[Path], written: Sequence[Path] = ()) -> None:
    """Before a stage computes: no other process is writing its DVC-cached outputs (`outs` of dvc.yaml without
    ``cache: false``; `pipeline.locking.lock_outputs`), its output folders can be written, and the cached ones are
    git-ignored."""
    lock_outputs(list(cached))
    for folder in (*cached, *written):
        check_writable(folder)
    for output in cached:
        ignore_in_git(output)
