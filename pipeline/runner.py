"""How the CLI and the Prefect flows call DVC: one `run_dvc`, one way to write and check `-S` overrides, and
`ast-dd run` (the product's main job: `dvc repro`, its stages `--jobs N` at a time, or a workspace `dvc exp run`
with profile overlays)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

from ast_core.io import atomic_write_text
from pipeline import tracking
from pipeline.params import Params, load_params, overlay_file, read_overlays
from pipeline.schema import ParamsError, flatten_keys
from pipeline.stage_graph import StageNode, stage_graph

log = logging.getLogger(__name__)
TAIL_LINES = 40


class StageFailed(RuntimeError):
    """A DVC command of the pipeline exited non-zero (its output says why)."""


def venv_command(name: str, *args: str) -> list[str]:
    """`name` from this environment (next to the running Python) so the venv need not be activated."""
    candidate = Path(sys.executable).with_name(name)
    return [str(candidate) if candidate.exists() else name, *args]


def dvc_command(*args: str) -> list[str]:
    return venv_command("dvc", *args)


def stage_environment() -> dict[str, str]:
    """This process's environment with its own `bin/` first on PATH, so DVC's `ast-dd <stage>` commands
    find this installation even when the virtualenv is not activated."""
    env = os.environ.copy()
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def run_dvc(args: Sequence[str], root: Path | None = None, env: Mapping[str, str] | None = None,
            logger: logging.Logger | logging.LoggerAdapter | None = None) -> str:
    """Run ``dvc <args>`` in `root` (default: here) with `env` (default: `stage_environment()`).

    Without `logger` the output goes to this terminal (progress bars intact); with one, each line is logged
    and the output returned. Raises StageFailed (with the last lines of output when logged) on failure.
    """
    command = dvc_command(*args)
    (logger or log).info("running %s", " ".join(command))
    env = dict(env) if env is not None else stage_environment()
    if logger is None:
        if subprocess.run(command, cwd=root, env=env, check=False).returncode:
            raise StageFailed(f"`{' '.join(command[1:])}` failed (see above)")
        return ""
    lines: list[str] = []
    with subprocess.Popen(command, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as process:
        assert process.stdout is not None
        for raw in process.stdout:  # split on newlines only: a progress bar's redraws end in carriage returns
            if line := final_state(raw.decode(errors="replace")):
                lines.append(line)
                logger.info("%s", line)
    if process.returncode:
        tail = "\n".join(lines[-TAIL_LINES:])
        raise StageFailed(f"`{' '.join(command)}` exited with {process.returncode}:\n{tail}")
    return "\n".join(lines)


def final_state(line: str) -> str:
    """What a terminal would show of an output line: the text after its last carriage return (a progress bar
    redrawn in place logs once, in its final state), right-stripped."""
    return line.rstrip("\r\n").rsplit("\r", 1)[-1].rstrip()


def parse_sets(items: list[str] | None) -> dict[str, Any]:
    """``key=value`` options as a dict, values read as `dvc exp run -S` reads them (Hydra's override syntax:
    ``distill.ipcs=[1,10]`` is a list, ``distill.hyper.lr_img=1e3`` a float)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    overrides = {}
    for item in items or []:
        try:
            override = parser.parse_overrides([item])[0]
        except HydraException as error:
            raise ParamsError(f"--set: {item!r} must look like key=value ({error})") from error
        if override.is_sweep_override() or override.value_type is None:
            raise ParamsError(f"--set: {item!r} must give one value (sweeps: a study's `study.grid`, "
                              "`ast-dd study run`)")
        overrides[override.key_or_group] = override.value()
    return overrides


def hydra_overrides(overrides: Mapping[str, Any], add: bool = False) -> list[str]:
    """``key=value`` strings in the syntax of `dvc exp run -S` (values as JSON, which Hydra parses);
    `add` writes ``++key=value``, which also adds keys params.yaml lacks (a profile's new row)."""
    prefix = "++" if add else ""
    return [f"{prefix}{key}={json.dumps(value)}" for key, value in overrides.items()]


def profile_overrides(profiles: Sequence[str | Path], root: Path | None = None) -> dict[str, Any]:
    """The overlays' settings (later profiles win) as dotted keys, ready for `dvc exp run -S ++key=value`."""
    return flatten_keys(read_overlays([overlay_file(profile, root) for profile in profiles]))


def overridden_params(params_file: Path, overrides: Mapping[str, Any], add: bool = False) -> str:
    """params.yaml's text with `overrides` applied as `dvc exp run -S` applies them (comments kept), checked
    by `load_params`: a bad key or value raises ParamsError naming it."""
    from dvc.exceptions import DvcException
    from dvc.utils.hydra import apply_overrides as dvc_apply_overrides

    with tempfile.TemporaryDirectory(prefix="ast-dd-params-") as tmp:
        candidate = Path(tmp) / "params.yaml"
        candidate.write_bytes(params_file.read_bytes())
        try:
            dvc_apply_overrides(candidate, hydra_overrides(overrides, add))
        except DvcException as error:  # Hydra's own message is the cause
            raise ParamsError(f"overrides: {dict(overrides)!r} do not fit {params_file}: "
                              f"{error.__cause__ or error}") from error
        load_params(candidate)
        return candidate.read_text()


def apply_overrides(params_file: Path, overrides: Mapping[str, Any]) -> None:
    """Write `overrides` into params.yaml, as a workspace `dvc exp run -S` does; nothing changes on error."""
    if overrides:
        atomic_write_text(params_file, overridden_params(params_file, overrides))


def ensure_params_file(params_path: str) -> None:
    """DVC tracks params.yaml in the project root; another file would silently not be what runs."""
    if Path(params_path).resolve() != (tracking.project_root() / "params.yaml").resolve():
        raise ParamsError(f"--params: the pipeline reads params.yaml; copy {params_path} there first "
                          f"(cp {params_path} params.yaml), or use --profile or `dvc exp run -S key=value`")


def parallel_environment(jobs: int) -> dict[str, str]:
    """The stage environment for `jobs` stages at once: each stage's torch gets its share of the CPU cores
    (`OMP_NUM_THREADS`; a value the user exported is kept, and a stage rerun by hand reproduces the same bytes
    only with the same thread count)."""
    env = stage_environment()
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))
    return env


def single_stage_args(stage: str, force: bool = False) -> list[str]:
    """`dvc` arguments reproducing one stage of the graph (waiting for DVC's lock while another stage holds it)."""
    return ["--wait-for-lock", "repro", "--single-item", *(["--force"] if force else []), stage]


def run_stages(nodes: Sequence[StageNode], jobs: int, force: bool = False) -> None:
    """Each stage as ``dvc --wait-for-lock repro --single-item <stage>`` once the stages it needs are done, at
    most `jobs` at a time. DVC decides whether a stage is stale and records it in dvc.lock, as in `dvc repro`
    (its lock is released while stage commands run, so independent stages overlap). After a failure no new
    stage starts, the running ones finish, and StageFailed names the stage."""
    env = parallel_environment(jobs)

    def reproduce(stage: str) -> None:
        started = time.monotonic()
        run_dvc(single_stage_args(stage, force), env=env,
                logger=logging.getLogger(f"{__name__}.{stage}"))
        log.info("%s finished in %.0f s", stage, time.monotonic() - started)

    pending, done = list(nodes), set()
    running: dict[Future[None], str] = {}
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        while pending or running:
            for node in [n for n in pending if done.issuperset(n.upstream)][:jobs - len(running)]:
                pending.remove(node)
                running[pool.submit(reproduce, node.name)] = node.name
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                name = running.pop(future)
                future.result()  # a failed stage raises here; the pool lets the running ones finish
                done.add(name)


def run_pipeline(params: Params, params_path: str, targets: list[str] | None = None, force: bool = False,
                 profiles: Sequence[str | Path] = (), jobs: int = 1, name: str | None = None,
                 queue: bool = False) -> None:
    """`dvc repro [targets]` with stage runs nested under one MLflow run for this execution; with `jobs` > 1
    the stages run `jobs` at a time (`run_stages`). With profiles or a `name`, a workspace `dvc exp run`
    (named `name`) that writes the overlays' settings into params.yaml (as `-S ++key=value`), so DVC records
    them and every stage reads them (one stage at a time: an experiment is one DVC command). With `queue`,
    that experiment is queued instead (`dvc exp run --queue`): `dvc exp run --run-all` runs it in a temporary copy,
    so the workspace keeps its outputs (a workspace experiment with other cells leaves its cells' outputs
    beside them, since `dvc exp apply` restores only what the applied experiment tracks)."""
    ensure_params_file(params_path)
    if jobs < 1:
        raise ParamsError(f"--jobs: {jobs} must be a positive integer")
    if name is not None and not name.strip():
        raise ParamsError("--name: give the experiment a name, e.g. -n tiny")
    options = [*(["--force"] if force else []), *(targets or [])]
    experiment = bool(profiles or name or queue)
    if experiment:
        overrides = profile_overrides(profiles, Path(params_path).resolve().parent)
        overridden_params(Path(params_path), overrides, add=True)  # what DVC will write, checked first
        args = ["exp", "run", *(["--queue"] if queue else []), *(["--name", name] if name else []), *options,
                *(arg for o in hydra_overrides(overrides, add=True) for arg in ("-S", o))]
    else:
        args = ["repro", *options]
    command = " ".join(["ast-dd run", *(f"--profile {profile}" for profile in profiles),
                        *([f"-n {name}"] if name else []), *(["--queue"] if queue else []), *options])
    if queue:
        run_dvc(args)
        log.info("queued %s: `dvc exp run --run-all` runs the queue and waits, `dvc queue start` runs it in the "
                 "background (`dvc queue status` follows it)", command)
        return
    with tracking.pipeline_run(params.tracking.experiment, run_name=command) as run_id:
        log.info("MLflow parent run %s (%s)", run_id, command)
        if jobs > 1 and not experiment:
            run_stages(stage_graph(tracking.project_root(), targets), jobs, force)
        else:
            run_dvc(args)
