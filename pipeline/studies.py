"""Studies: the paper's tables and the sweeps as DVC experiments of the one pipeline (`ast-dd study run`).

A study is one overlay, ``profiles/studies/<name>.yaml``: the settings it runs under, its rows (`distill.methods`,
rows of `distill.configs`), its ipcs and distillation seeds, and for a sweep a `study.grid` (params key ->
values). Nothing else defines it. `ast-dd study run <name>` turns it into DVC experiments of `dvc.yaml`'s stages:

1. ``<name>-shared``: the stages every row needs (experts, MCT copies, initialisation, baselines), once.
2. ``<name>-<row>-s<seed>[-<point>]``: one experiment per row x distillation seed (x grid point), `jobs` at a
   time, each distilling and scoring its row at every ipc. Stages one experiment shares with another (the
   experts, the baselines) come back from DVC's run-cache instead of being computed again.

Each experiment runs in a temporary copy (`dvc exp run --temp`), so the workspace is left as it is. Its MLflow
runs carry the tags ``study``, ``method`` (the row), ``ipc`` and ``distill_seed``. Rerunning the command skips every
experiment that finished with the same settings, and an unfinished distillation resumes from its checkpoint in
the project's ``artifacts/checkpoints``. `ast-dd study report` (`pipeline.study_report`) builds the tables and
figures from the finished experiments.
"""

from __future__ import annotations

import json
import logging
import subprocess
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline import tracking
from pipeline.params import PROFILES, Params, load_params
from pipeline.runner import (
    dvc_command,
    hydra_overrides,
    overridden_params,
    parallel_environment,
    profile_overrides,
    run_dvc,
)
from pipeline.schema import ParamsError

log = logging.getLogger(__name__)
STUDIES = Path(PROFILES) / "studies"
SHARED = "shared"
SHARED_STAGES = ("convexify", "init", "baselines")   # every row needs them; `dvc exp run` adds their upstream


@dataclass(frozen=True)
class Experiment:
    """One DVC experiment of a study: its name, the row, seed and grid point it runs, its `-S` overrides and
    the stages it reproduces (all when empty)."""

    name: str
    overrides: dict[str, Any]
    row: str | None = None
    seed: int | None = None
    point: dict[str, Any] = field(default_factory=dict)
    targets: tuple[str, ...] = ()


def study_names(root: Path | None = None) -> list[str]:
    """Every study overlay's name (``profiles/studies/<name>.yaml``)."""
    return sorted(path.stem for path in ((root or Path.cwd()) / STUDIES).glob("*.yaml"))


def study_file(name: str, root: Path | None = None) -> Path:
    """The overlay of study `name`; an unknown name fails, listing the studies there are."""
    path = (root or Path.cwd()) / STUDIES / f"{name}.yaml"
    if not path.is_file():
        raise ParamsError(f"study {name!r} is unknown; allowed: {', '.join(study_names(root)) or '(none)'} "
                          f"(the files in {STUDIES}/)")
    return path


def study_params(name: str, params_file: Path, profiles: Sequence[str | Path] = ()) -> Params:
    """params.yaml with the `profiles` and then the study's overlay merged on top, validated."""
    return load_params(params_file, [*profiles, study_file(name, params_file.parent)])


def point_label(point: Mapping[str, Any]) -> str:
    """A grid point as a name-safe label: {distill.hyper.lr_img: 30} -> lr_img30."""
    return "-".join(f"{key.rsplit('.', 1)[-1]}{value}" for key, value in point.items())


def buffers_for(params: Params, row: str) -> list[str]:
    """The expert variants one row needs (its own and the initialisation's), in buffer.train's order."""
    needed = {params.distill.configs[row].buffer, params.init.buffer}
    return [variant for variant in params.buffer.train if variant in needed]


def plan(name: str, params_file: Path, profiles: Sequence[str | Path] = ()) -> list[Experiment]:
    """The study's experiments, the shared one first; every one checked as DVC will apply it."""
    params = study_params(name, params_file, profiles)
    overlay = profile_overrides([*profiles, study_file(name, params_file.parent)], params_file.parent)
    base = {**{key: value for key, value in overlay.items() if not key.startswith("study.grid.")},  # -> points
            "study.name": name}
    sweep = bool(params.study.grid)
    shared = Experiment(f"{name}-{SHARED}", {**base, "buffer.train": list(params.buffer.train)},
                        targets=SHARED_STAGES[:-1] if sweep else SHARED_STAGES)
    rows = [Experiment("-".join([name, row, f"s{seed}", *([point_label(point)] if point else [])]),
                       {**base, **point, "distill.methods": [row], "distill.seeds": [seed],
                        "buffer.train": buffers_for(params, row)},
                       row=row, seed=seed, point=point, targets=("distill",) if sweep else ())
            for point in params.study.grid_points() for row in params.distill.methods
            for seed in params.distill.seeds]
    experiments = [shared, *rows]
    for experiment in experiments:
        overridden_params(params_file, experiment.overrides, add=True)   # raises ParamsError naming the key
    return experiments


@dataclass(frozen=True)
class Finished:
    """A finished DVC experiment: its commit and the commit it was run from (its baseline)."""

    commit: str
    baseline: str


def finished_experiments(root: Path) -> dict[str, Finished]:
    """Name -> every DVC experiment in the repository (`dvc exp list --all-commits`), the newest when a name
    was run from several commits."""
    out = subprocess.run(["git", "for-each-ref", "--sort=committerdate", "--format=%(refname) %(objectname)",
                          "refs/exps"], cwd=root, capture_output=True, text=True, check=True).stdout
    found = {}
    for line in out.splitlines():
        ref, commit = line.split()
        parts = ref.split("/")
        if len(parts) == 5:   # refs/exps/<baseline[:2]>/<baseline[2:]>/<name>; not the queue's own refs
            found[parts[-1]] = Finished(commit, parts[2] + parts[3])
    return found


def settings_at(root: Path, commit: str) -> dict[str, Any]:
    """params.yaml as an experiment's commit holds it."""
    text = subprocess.run(["git", "show", f"{commit}:params.yaml"], cwd=root, capture_output=True, text=True,
                          check=True).stdout
    return yaml.safe_load(text)


def dotted(settings: Mapping[str, Any], key: str) -> Any:
    """`settings["a"]["b"]` for key ``a.b``; None where a level is missing."""
    value: Any = settings
    for part in key.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    return value


def is_finished(experiment: Experiment, finished: Mapping[str, Finished], root: Path,
                baseline: str | None = None) -> bool:
    """The experiment exists and ran with exactly these overrides (changed settings run it again), from
    `baseline` when one is given (an experiment of older code runs again; DVC's run-cache hands back every
    stage whose code and settings did not change)."""
    done = finished.get(experiment.name)
    if done is None or baseline not in (None, done.baseline):
        return False
    settings = settings_at(root, done.commit)
    return all(dotted(settings, key) == value for key, value in experiment.overrides.items())


def unfinished(experiments: Sequence[Experiment], root: Path) -> list[Experiment]:
    """The experiments not yet finished from this commit with their settings (`is_finished`)."""
    finished, head = finished_experiments(root), tracking.git_commit(root)
    return [e for e in experiments if not is_finished(e, finished, root, head)]


def run_experiment(experiment: Experiment, root: Path | None = None, env: Mapping[str, str] | None = None,
                   logger: logging.Logger | logging.LoggerAdapter | None = None) -> None:
    """One experiment in a temporary copy (the workspace stays as it is); an older experiment of the same name
    is replaced instead of failing on the conflict."""
    subprocess.run(dvc_command("--wait-for-lock", "exp", "remove", experiment.name), cwd=root, env=env,
                   capture_output=True, check=False)  # fails when there is none, which is fine
    sets = [arg for override in hydra_overrides(experiment.overrides, add=True) for arg in ("-S", override)]
    run_dvc(["--wait-for-lock", "exp", "run", "--temp", "--name", experiment.name, *sets, *experiment.targets],
            root, env, logger)


def uncached_stages(root: Path, targets: Sequence[str] = SHARED_STAGES) -> list[str]:
    """The stages (of `targets` and upstream) whose outputs in the workspace's dvc.lock are not in the DVC cache.

    A temporary experiment starts from that lock, and DVC trusts a lock entry before its run-cache: such a
    stage runs again in every experiment instead of being restored from the shared one (a fresh clone, before
    `make run` or `dvc pull`)."""
    completed = subprocess.run(dvc_command("status", "--with-deps", "--json", *targets), cwd=root,
                               capture_output=True, text=True, check=False)
    try:
        status = json.loads(completed.stdout or "{}")
    except json.JSONDecodeError:
        return []
    return sorted(stage for stage, changes in status.items()
                  if isinstance(changes, list) and "not in cache" in json.dumps(changes))


def warn_if_uncached(name: str, root: Path) -> None:
    """Say which stages every experiment of study `name` will compute again (`uncached_stages`) and how to
    avoid it; `ast-dd study run` and the study flow call it before their first experiment."""
    stale = uncached_stages(root)
    if stale:
        log.warning("study %s: outputs of %s in dvc.lock are not in the DVC cache, so every experiment computes "
                    "them again; `make run` (or `dvc pull`) first lets the experiments share them",
                    name, ", ".join(stale))


class PrefixedLog(logging.LoggerAdapter):
    """Each line of an experiment's output prefixed with its name: two experiments at once stay readable."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        return f"[{self.extra['experiment']}] {msg}", kwargs


def run_study(name: str, params_file: Path, profiles: Sequence[str | Path] = (), jobs: int = 1) -> list[str]:
    """`ast-dd study run`: the shared experiment, then the rows `jobs` at a time; finished ones are skipped.
    Returns the names of the experiments that ran now. A failed experiment fails the study after the others
    finished (rerun the command to retry it)."""
    if jobs < 1:
        raise ParamsError(f"--jobs: {jobs} must be >= 1")
    root = params_file.parent.resolve()
    experiments = plan(name, params_file, profiles)
    todo = unfinished(experiments, root)
    log.info("study %s: %d experiments, %d finished, %d to run", name, len(experiments),
             len(experiments) - len(todo), len(todo))
    if not todo:
        return []
    warn_if_uncached(name, root)
    params = study_params(name, params_file, profiles)
    with tracking.pipeline_run(params.tracking.experiment, run_name=f"ast-dd study run {name}"):
        for experiment in (e for e in todo if e.row is None):   # alone, with every core
            run_experiment(experiment, root, parallel_environment(1), PrefixedLog(log, {"experiment": experiment.name}))
        failed = run_concurrently([e for e in todo if e.row is not None], root, parallel_environment(jobs), jobs)
    if failed:
        raise RuntimeError(f"study {name}: experiments failed: {', '.join(failed)} (rerun to retry them)")
    return [e.name for e in todo]


def run_concurrently(experiments: Sequence[Experiment], root: Path, env: Mapping[str, str], jobs: int) -> list[str]:
    """Run the experiments `jobs` at a time; the names of those that failed."""
    def attempt(experiment: Experiment) -> str | None:
        try:
            run_experiment(experiment, root, env, PrefixedLog(log, {"experiment": experiment.name}))
        except RuntimeError as error:
            log.error("experiment %s failed: %s", experiment.name, error)
            return experiment.name
        return None

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return [name for name in pool.map(attempt, experiments) if name]
