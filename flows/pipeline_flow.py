"""Prefect flow `ast_pipeline`: the DVC stage graph as Prefect tasks, independent stages in parallel.

Each task is ``dvc --wait-for-lock repro --single-item <stage>`` (DVC decides whether the stage is stale and
records it in dvc.lock); a task starts when the stages it depends on have finished. Training stages carry the
tag ``gpu``, so a Prefect concurrency limit named ``gpu`` (`ast-dd serve` creates it) caps how many train at
once. The flow opens an MLflow parent run; stage runs nest under it and record the Prefect flow run id.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, runtime, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture, wait

from flows.stages import GPU_TAG, pinned_gpu, stage_env, stage_tags
from pipeline import tracking
from pipeline.layout import DISTILL, REPORT
from pipeline.params import load_params
from pipeline.runner import apply_overrides, run_dvc, single_stage_args
from pipeline.stage_graph import StageNode, stage_graph

RETRIES = 2
RETRY_DELAY_SECONDS = 30
RESULTS_TABLE = REPORT / "tables" / "results.md"
ARTIFACT_KEY = "ast-pipeline-results"


@task(retries=RETRIES, retry_delay_seconds=RETRY_DELAY_SECONDS, cache_policy=NO_CACHE)
def run_stage(stage: str, root: str, parent_run_id: str, flow_run_id: str, force: bool = False, gpus: int = 1) -> str:
    """Reproduce one DVC stage (a training stage on `gpus` GPUs of its own); returns ``ran``, ``restored from run
    cache`` (DVC had the outputs of these exact inputs) or ``up to date``. DVC resumes what a failed try left."""
    args = single_stage_args(stage, force)
    gpu = pinned_gpu(gpus) if GPU_TAG in runtime.task_run.tags else contextlib.nullcontext({})
    with gpu as device:
        output = run_dvc(args, Path(root), {**stage_env(parent_run_id, flow_run_id), **device}, get_run_logger())
    if f"Running stage '{stage}'" in output:
        return "ran"
    return "restored from run cache" if f"Stage '{stage}' is cached" in output else "up to date"


def submit_graph(nodes: list[StageNode], root: Path, parent_run_id: str, flow_run_id: str, force: bool,
                 retries: int, distill_devices: int = 1) -> dict[str, PrefectFuture[str]]:
    """Submit every stage after the stages it depends on (`nodes` lists dependencies first); a distill cell
    takes `distill_devices` GPUs at once."""
    futures: dict[str, PrefectFuture[str]] = {}
    for node in nodes:
        stage_task = run_stage.with_options(name=f"stage-{node.group}", task_run_name=node.name, tags=stage_tags(node),
                                            retries=retries)
        gpus = distill_devices if node.group == "distill" else 1
        futures[node.name] = stage_task.submit(node.name, str(root), parent_run_id, flow_run_id, force, gpus,
                                               wait_for=[futures[name] for name in node.upstream])
    return futures


def outcome(future: PrefectFuture[str]) -> str:
    """What `run_stage` returned for a finished stage, else what happened to it."""
    state = future.state
    if state.is_completed():
        return future.result()
    return "failed" if state.is_failed() or state.is_crashed() else "not run (a stage it needs failed)"


def results_markdown(root: Path, outcomes: dict[str, str], parent_run_id: str, experiment: str) -> str:
    """The Prefect artifact: what each stage did, the results table and where the pictures are."""
    lines = [f"# ast_pipeline in `{root}`", "",
             f"MLflow parent run `{parent_run_id}` in experiment `{experiment}` ({tracking.tracking_uri()}).", "",
             "| stage | result |", "| --- | --- |", *(f"| {name} | {result} |" for name, result in outcomes.items()),
             ""]
    table = root / RESULTS_TABLE
    lines.append(table.read_text() if table.is_file() else f"(no `{RESULTS_TABLE}`: the report stage has not run)")
    grids = sorted((root / DISTILL).glob("*/ipc*/seed*/grid.png"))
    figures = sorted((root / REPORT / "figures").glob("*.png"))
    if grids or figures:
        lines += ["", "## Pictures", "", "Also in the MLflow runs' artifacts (distill and report stages).", ""]
        lines += [f"- distilled images {p.parents[2].name} {p.parents[1].name} {p.parent.name}: `{p}`" for p in grids]
        lines += [f"- {p.stem.replace('_', ' ')}: `{p}`" for p in figures]
    return "\n".join(lines) + "\n"


@flow(name="ast_pipeline")
def ast_pipeline(targets: list[str] | None = None, overrides: dict[str, Any] | None = None, force: bool = False,
                 project_dir: str | None = None, retries: int = RETRIES) -> dict[str, str]:
    """Reproduce the DVC pipeline (or the stages `targets` need) as parallel Prefect tasks.

    `overrides` (e.g. ``{"distill.ipcs": [1, 10]}``) are written into params.yaml first, as a workspace
    ``dvc exp run -S`` would, so dvc.lock and params.yaml agree afterwards. A failed stage is retried
    `retries` times (a transient failure; DVC keeps what it finished). Returns each stage's outcome.
    """
    root = Path(project_dir or Path.cwd()).resolve()
    logger = get_run_logger()
    with contextlib.chdir(root):
        apply_overrides(root / "params.yaml", overrides or {})
        params = load_params(root / "params.yaml")
        nodes = stage_graph(root, targets)
        logger.info("stages: %s", ", ".join(node.name for node in nodes))
        with tracking.pipeline_run(params.tracking.experiment, run_name="ast_pipeline") as parent_run_id:
            futures = submit_graph(nodes, root, parent_run_id, str(runtime.flow_run.id or ""), force,
                                   retries, params.distill.devices)
            wait(list(futures.values()))
            outcomes = {name: outcome(future) for name, future in futures.items()}
            create_markdown_artifact(results_markdown(root, outcomes, parent_run_id, params.tracking.experiment),
                                     key=ARTIFACT_KEY, description="ast-dd pipeline results")
            failed = [name for name, result in outcomes.items() if result == "failed"]
            if failed:
                raise RuntimeError(f"stages failed: {', '.join(failed)} (see their task logs)")
    return outcomes
