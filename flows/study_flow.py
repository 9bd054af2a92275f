"""Prefect flow `study`: a study's DVC experiments (`pipeline.studies`) as Prefect tasks, then its page.

The shared experiment runs first; then each row x seed experiment is one ``dvc exp run --temp`` task tagged
``gpu``, so rows run at once up to the ``gpu`` concurrency limit, each on a GPU of its own, and DVC's run-cache
shares every stage two experiments have in common. Experiments that finished with the same settings from this
commit are skipped, as `ast-dd study run` skips them. The study's page (`pipeline.study_report`) becomes a
Prefect artifact.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from prefect import flow, get_run_logger, runtime, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import wait

from flows.pipeline_flow import RETRIES, RETRY_DELAY_SECONDS, outcome
from flows.stages import GPU_TAG, pinned_gpu, stage_env
from pipeline import tracking
from pipeline.studies import (
    Experiment,
    plan,
    run_experiment,
    study_params,
    unfinished,
    warn_if_uncached,
)
from pipeline.study_report import write_report

DEFAULT_STUDY = "modules"


@task(retries=RETRIES, retry_delay_seconds=RETRY_DELAY_SECONDS, cache_policy=NO_CACHE, tags=[GPU_TAG])
def experiment_task(experiment: Experiment, root: str, parent_run_id: str, flow_run_id: str) -> str:
    """One DVC experiment (`pipeline.studies.run_experiment`) on a GPU of its own."""
    with pinned_gpu() as device:
        run_experiment(experiment, Path(root), {**stage_env(parent_run_id, flow_run_id), **device}, get_run_logger())
    return "ran"


def submit_all(experiments: list[Experiment], root: Path, parent_run_id: str, flow_run_id: str) -> dict[str, str]:
    """Run the experiments as concurrent tasks; each one's outcome."""
    futures = {e.name: experiment_task.with_options(task_run_name=e.name).submit(
        e, str(root), parent_run_id, flow_run_id) for e in experiments}
    wait(list(futures.values()))
    return {name: outcome(future) for name, future in futures.items()}


@flow(name="study")
def study(name: str = DEFAULT_STUDY, project_dir: str | None = None) -> dict[str, str]:
    """Run study `name` (``profiles/studies/<name>.yaml``) as DVC experiments and publish its page."""
    root = Path(project_dir or Path.cwd()).resolve()
    with contextlib.chdir(root):
        experiments = plan(name, root / "params.yaml")   # a bad setting fails here, before any experiment
        todo = unfinished(experiments, root)
        outcomes = {e.name: "finished before" for e in experiments if e not in todo}
        if todo:
            warn_if_uncached(name, root)
        params = study_params(name, root / "params.yaml")
        with tracking.pipeline_run(params.tracking.experiment, run_name=f"study {name}") as parent_run_id:
            flow_run_id = str(runtime.flow_run.id or "")
            shared = [e for e in todo if e.row is None]
            outcomes |= submit_all(shared, root, parent_run_id, flow_run_id)
            if all(outcomes[e.name] == "ran" for e in shared):
                outcomes |= submit_all([e for e in todo if e.row is not None], root, parent_run_id, flow_run_id)
            (page,) = write_report([name], root / "params.yaml")
            create_markdown_artifact(page.read_text(), key=f"study-{name}", description=f"study {name}")
        failed = [experiment for experiment, result in outcomes.items() if result not in ("ran", "finished before")]
        if failed:
            raise RuntimeError(f"experiments failed: {', '.join(failed)} (see their task logs)")
    return outcomes
