"""MLflow tracking: one run per stage execution, nested under the run of the invocation that started it.

Store: ``MLFLOW_TRACKING_URI`` when set (a relative sqlite path is read from the project root), else
``sqlite:///<project root>/mlflow.db``, where the project root is DVC's ``DVC_ROOT`` (set for stages and for
the temporary copies of ``dvc exp run --temp``/``--queue``, so their runs land in the real project) or the
current directory. An experiment created in a database store keeps its artifacts in
``<project root>/mlartifacts`` (absolute), never inside a temporary copy; a tracking server stores its own.

Nesting: an invocation (``ast-dd run``, a Prefect flow, one experiment of ``ast-dd study run``) opens a parent run
and exports ``AST_DD_PARENT_RUN_ID``; stage runs nest under it. The stages of a DVC experiment
(``DVC_EXP_NAME``) nest under one run named after the experiment (the invocation's run itself when it bears that
name). A parent run under which nothing ran is deleted. Each run records the pid and host of the process that
owns it; every start closes the RUNNING runs of this host whose process is gone as KILLED. A run ends FAILED
when its stage raises.

A store that fails during a stage (a tracking server that went away) never stops the stage: the DVC outputs
are the source of truth. From the first failed call on, what the stage would have recorded (params, metrics,
artifact files, the run's end) is kept in ``artifacts/tracking_pending/<run id>/`` of the project (`Journal`)
and a warning names it; the next `ast-dd` command that reaches the same store records it there and deletes the
journal (`replay_pending`). MLflow's HTTP calls time out after ``MLFLOW_HTTP_REQUEST_TIMEOUT`` seconds with
``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` retries (`pipeline.environment`), so no call hangs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import mlflow
import requests
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.tracking.context.registry import resolve_tags
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from pipeline.schema import UsageError, flatten_keys

log = logging.getLogger(__name__)
PARENT_ENV = "AST_DD_PARENT_RUN_ID"
PREFECT_ENV = "AST_DD_PREFECT_FLOW_RUN_ID"
PID_TAG, HOST_TAG, EXP_KEY_TAG = "ast_dd_pid", "ast_dd_host", "ast_dd_exp_key"
DATABASE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
BATCH = 1000
PENDING = Path("artifacts") / "tracking_pending"   # under the project root: journals of unrecorded runs
TRACKING_ERRORS = (MlflowException, OSError, requests.RequestException)


def check_experiment_name(name: str) -> None:
    if not name.strip():
        raise UsageError("tracking.experiment: the MLflow experiment name is empty; give one, e.g. `ast-dd`")


def project_root() -> Path:
    return Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` (a relative sqlite path taken from the project root), else the project's store."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root() / 'mlflow.db'}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{project_root() / uri.removeprefix('sqlite:///')}"
    return uri


def artifact_location(uri: str) -> str | None:
    """Where a new experiment of a database store keeps artifacts; None lets a server choose."""
    if uri.split(":", 1)[0].split("+", 1)[0] in DATABASE_SCHEMES:
        return (project_root() / "mlartifacts").as_uri()
    return None


def git_commit(root: Path | None = None) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root or project_root(), capture_output=True,
                             text=True, timeout=10, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_tags(stage: str) -> dict[str, str]:
    """Tags that let a run be traced back: git commit, DVC stage and experiment, Prefect flow run, owner."""
    return {"git_commit": git_commit(), "dvc_stage": os.environ.get("DVC_STAGE", stage),
            "dvc_exp_name": os.environ.get("DVC_EXP_NAME", "workspace"), "stage": stage,
            "prefect_flow_run_id": os.environ.get(PREFECT_ENV, ""), **owner_tags()}


def owner_tags() -> dict[str, str]:
    """The process that owns a run: if it is gone while the run is RUNNING, the run was killed."""
    return {PID_TAG: str(os.getpid()), HOST_TAG: socket.gethostname()}


def configure(experiment: str) -> str:
    """Point MLflow at the store and select `experiment` (created with its artifacts in the project when the
    store is a database); returns its id. An empty or deleted one is a usage error naming `tracking.experiment`."""
    check_experiment_name(experiment)
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)  # also exports MLFLOW_TRACKING_URI, so it tells nothing about the user's choice
    existing = mlflow.get_experiment_by_name(experiment)
    if existing is not None and existing.lifecycle_stage == "deleted":
        raise UsageError(f"tracking.experiment: {experiment!r} is deleted in {uri}; restore it (`mlflow experiments "
                         f"restore --experiment-id {existing.experiment_id}`) or choose another name")
    location = artifact_location(uri)
    if existing is None and location:
        with contextlib.suppress(MlflowException):  # created meanwhile by a parallel stage
            mlflow.create_experiment(experiment, artifact_location=location)
    return mlflow.set_experiment(experiment).experiment_id


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by another user
        pass
    return True


def all_experiments(client: MlflowClient) -> list[str]:
    """The ids of the store's active experiments (runs of one invocation may span several)."""
    return [experiment.experiment_id for experiment in client.search_experiments()]


def close_dead_runs(client: MlflowClient) -> None:
    """Mark KILLED the RUNNING runs of this host whose owning process no longer exists."""
    query = f"attributes.status = 'RUNNING' and tags.{HOST_TAG} = '{socket.gethostname()}'"
    for run in client.search_runs(all_experiments(client), query, max_results=BATCH):
        pid = run.data.tags.get(PID_TAG, "")
        if pid.isdigit() and not process_alive(int(pid)):
            log.info("MLflow run %s (%s) was left RUNNING by process %s, which is gone: marked KILLED",
                     run.info.run_id, run.info.run_name, pid)
            client.set_terminated(run.info.run_id, "KILLED")


def begin(experiment: str) -> tuple[MlflowClient, str]:
    """Configure MLflow, close the runs of dead processes, record what earlier stages could not; the client
    and the experiment id."""
    experiment_id = configure(experiment)
    client = MlflowClient(mlflow.get_tracking_uri())
    replay_pending(client)
    close_dead_runs(client)
    return client, experiment_id


class Journal:
    """What a stage could not record in its run because the store failed: kept in
    ``<project>/artifacts/tracking_pending/<run id>/`` (``record.json`` and copies of the artifact files, so they
    outlive an experiment's temporary copy) until `replay_pending` records it."""

    def __init__(self, run_id: str) -> None:
        self.folder = project_root() / PENDING / run_id
        self.record: dict[str, Any] = {"run_id": run_id, "tracking_uri": tracking_uri(), "params": {},
                                       "metrics": [], "artifacts": [], "status": None}
        self.folder.mkdir(parents=True, exist_ok=True)
        self.save()

    def save(self) -> None:
        from ast_core.io import atomic_write_json

        atomic_write_json(self.folder / "record.json", self.record)

    def add(self, kind: str, items: list) -> None:
        self.record[kind] += items
        self.save()

    def add_params(self, params: Mapping[str, Any]) -> None:
        self.record["params"].update(params)
        self.save()

    def add_artifact(self, path: Path, artifact_path: str | None) -> None:
        target = self.folder / "files" / str(len(self.record["artifacts"])) / path.name
        target.parent.mkdir(parents=True)
        shutil.copy2(path, target)
        self.add("artifacts", [[str(target.relative_to(self.folder)), artifact_path]])

    def log_folder(self, folder: Path, artifact_path: str) -> None:
        """Every file under `folder`, at the same relative place under `artifact_path`."""
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            self.log_artifacts([path], "/".join((artifact_path, *path.relative_to(folder).parts[:-1])))

    def end(self, status: str) -> None:
        self.record["status"] = status
        self.save()


def replay_pending(client: MlflowClient) -> None:
    """Record the journals of runs of this store (`Journal`) and delete them; one that fails again is kept."""
    root = project_root() / PENDING
    for record_file in sorted(root.glob("*/record.json")) if root.is_dir() else []:
        record = json.loads(record_file.read_text())
        if record["tracking_uri"] != tracking_uri():
            continue
        run_id, folder = record["run_id"], record_file.parent
        try:
            params = [Param(key, str(value)) for key, value in record["params"].items()]
            metrics = [Metric(*row) for row in record["metrics"]]
            for start in range(0, max(len(params), len(metrics)), 100):
                client.log_batch(run_id, metrics=metrics[start:start + 100], params=params[start:start + 100])
            for relative, artifact_path in record["artifacts"]:
                client.log_artifact(run_id, str(folder / relative), artifact_path)
            if record["status"]:
                client.set_terminated(run_id, record["status"])
        except TRACKING_ERRORS as error:
            log.warning("MLflow: the run %s journal %s is still unrecorded (%s)", run_id, folder, error)
            continue
        shutil.rmtree(folder)
        log.info("MLflow: recorded %d params, %d metrics and %d files that run %s had missed", len(params),
                 len(metrics), len(record["artifacts"]), run_id)


def experiment_key(name: str, outer: str | None) -> str:
    """Identifies one execution of DVC experiment `name`: its baseline, working copy (a temporary copy for
    --temp/--queue) and invoking run; a workspace rerun of the same name from the same commit joins its run."""
    parts = [name, os.environ.get("DVC_EXP_BASELINE_REV", ""), str(Path.cwd().resolve()), outer or ""]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:20]


def experiment_run(client: MlflowClient, experiment_id: str, name: str, outer: str | None) -> str:
    """The run named after DVC experiment `name` (found or created, under `outer`), RUNNING for this process."""
    key = experiment_key(name, outer)
    found = client.search_runs([experiment_id], f"tags.{EXP_KEY_TAG} = '{key}'", max_results=1)
    if not found:
        tags = {**run_tags("experiment"), "dvc_stage": "", EXP_KEY_TAG: key,
                "dvc_exp_baseline": os.environ.get("DVC_EXP_BASELINE_REV", "")}
        if outer:
            tags[MLFLOW_PARENT_RUN_ID] = outer
        return client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
    run_id = found[0].info.run_id
    for tag, value in owner_tags().items():  # before RUNNING: a sweep must never see a dead owner
        client.set_tag(run_id, tag, value)
    client.update_run(run_id, status="RUNNING")
    return run_id


@contextlib.contextmanager
def parent_run(client: MlflowClient, experiment_id: str) -> Iterator[str | None]:
    """The run a stage run nests under: its DVC experiment's run (RUNNING while the stage runs, then FINISHED
    or FAILED like the stage; journaled if the store fails by then), else the invocation's run, else none."""
    outer = os.environ.get(PARENT_ENV) or None
    name = os.environ.get("DVC_EXP_NAME")
    if not name or (outer is not None and client.get_run(outer).info.run_name == name):
        yield outer
        return
    run_id = experiment_run(client, experiment_id, name, outer)
    status = "FAILED"
    try:
        yield run_id
        status = "FINISHED"
    finally:
        try:
            client.set_terminated(run_id, status)
        except TRACKING_ERRORS as error:
            warn_unrecorded(run_id, "its end", error)
            Journal(run_id).end(status)


@contextlib.contextmanager
def stage_run(stage: str, experiment: str, run_name: str, params: Mapping[str, Any],
              tags: Mapping[str, str] | None = None) -> Iterator[StageRun]:
    """Open an MLflow run for one stage execution, nested under its experiment's or invocation's run."""
    client, experiment_id = begin(experiment)
    all_tags = {**run_tags(stage), **(tags or {})}
    with parent_run(client, experiment_id) as parent:
        if parent is not None:
            all_tags[MLFLOW_PARENT_RUN_ID] = parent
        run = client.create_run(experiment_id, tags=resolve_tags(all_tags), run_name=run_name)
        tracker = StageRun(run.info.run_id)
        status = "FAILED"
        try:
            tracker.log_params(params)
            yield tracker
            status = "FINISHED"
        finally:
            tracker.end(status)


def warn_unrecorded(run_id: str, what: str, error: BaseException) -> None:
    log.warning("MLflow store %s failed (%s: %s): %s of run %s not recorded; the stage goes on (its DVC outputs "
                "are complete) and the next ast-dd command that reaches the store records it (journal in %s)",
                tracking_uri(), type(error).__name__, str(error).splitlines()[0][:200] if str(error) else "",
                what, run_id, project_root() / PENDING / run_id)


class StageRun:
    """The stage's run: params, batched step metrics and artifacts. After the store's first failure everything
    goes to a `Journal` instead (one warning), so a lost tracking server never stops the stage."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self.client = MlflowClient(tracking_uri())
        self.journal: Journal | None = None

    def _record(self, what: str, call: Callable[[], object], keep: Callable[[Journal], None]) -> None:
        """`call()` against the store; on its first failure (and from then on) `keep` it in the journal."""
        if self.journal is None:
            try:
                call()
                return
            except TRACKING_ERRORS as error:
                warn_unrecorded(self.run_id, what, error)
                self.journal = Journal(self.run_id)
        keep(self.journal)

    def log_params(self, params: Mapping[str, Any]) -> None:
        """The settings as params (nested keys dotted; MLflow params are strings: lists comma-joined)."""
        items = {key: ",".join(map(str, value)) if isinstance(value, list | tuple) else value
                 for key, value in flatten_keys(params).items()}
        batch = [Param(key, str(value)) for key, value in items.items()]
        self._record("its params", lambda: [self.client.log_batch(self.run_id, params=batch[i:i + 100])
                                            for i in range(0, len(batch), 100)],
                     lambda journal: journal.add_params(items))

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        stamp = int(time.time() * 1000)
        self._log([Metric(k, float(v), stamp, step or 0) for k, v in metrics.items() if v is not None])

    def log_series(self, rows: Sequence[Mapping[str, Any]], keys: Sequence[str], step_key: str) -> None:
        """Log per-step metrics (e.g. a distillation history) in batches of 1000."""
        self._log([Metric(key, float(row[key]), 0, int(row[step_key])) for row in rows for key in keys
                   if row.get(key) is not None])

    def _log(self, metrics: list[Metric]) -> None:
        self._record(f"{len(metrics)} metric values",
                     lambda: [self.client.log_batch(self.run_id, metrics=metrics[i:i + BATCH])
                              for i in range(0, len(metrics), BATCH)],
                     lambda journal: journal.add("metrics", [[m.key, m.value, m.timestamp, m.step] for m in metrics]))

    def log_artifacts(self, paths: Sequence[Path], artifact_path: str | None = None) -> None:
        for path in paths:
            if path.is_file():
                self._record(f"artifact {path.name}", lambda p=path: self.client.log_artifact(self.run_id, str(p),
                                                                                              artifact_path),
                             lambda journal, p=path: journal.add_artifact(p, artifact_path))

    def log_folder(self, folder: Path, artifact_path: str) -> None:
        """Every file under `folder`, at the same relative place under `artifact_path`."""
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            self.log_artifacts([path], "/".join((artifact_path, *path.relative_to(folder).parts[:-1])))

    def end(self, status: str) -> None:
        """End the run as `status` (FINISHED or FAILED), or journal the end."""
        self._record("its end", lambda: self.client.set_terminated(self.run_id, status),
                     lambda journal: journal.end(status))


@contextlib.contextmanager
def exported_parent(run_id: str) -> Iterator[None]:
    """``AST_DD_PARENT_RUN_ID=run_id`` for this process and the stage processes it starts."""
    previous = os.environ.get(PARENT_ENV)
    os.environ[PARENT_ENV] = run_id
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(PARENT_ENV, None)
        else:
            os.environ[PARENT_ENV] = previous


def delete_if_empty(client: MlflowClient, run_id: str) -> None:
    """Delete a parent run under which no run was opened (a no-op invocation)."""
    if not client.search_runs(all_experiments(client), f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{run_id}'", max_results=1):
        log.info("nothing ran: MLflow parent run %s deleted", run_id)
        client.delete_run(run_id)


@contextlib.contextmanager
def pipeline_run(experiment: str, run_name: str = "pipeline") -> Iterator[str]:
    """A parent run for one invocation; stage processes started inside inherit its id. Deleted when empty."""
    client, _ = begin(experiment)
    run = mlflow.start_run(run_name=run_name, tags=run_tags("pipeline"))
    try:
        with run, exported_parent(run.info.run_id):
            yield run.info.run_id
    finally:
        delete_if_empty(client, run.info.run_id)
