"""Prefect flow `ablation`: a grid of params overrides as DVC experiments, then the comparison report.

Each grid row is one ``dvc exp run --temp -n ablation-<row> -S ...`` task tagged ``gpu``: an experiment runs
in its own temporary copy of the repository (the workspace and params.yaml stay as they are), so rows run at
once up to the ``gpu`` concurrency limit, and DVC's cache shares every stage two rows have in common. The
table of all experiments (`pipeline.stages.report`, read from MLflow) becomes a Prefect artifact.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, runtime, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import wait

from flows.pipeline_flow import RETRIES, RETRY_DELAY_SECONDS, outcome
from flows.stages import GPU_TAG, pinned_gpu, stage_env
from pipeline import tracking
from pipeline.ablation import ablation_rows, check_rows, run_experiment
from pipeline.layout import REPORT
from pipeline.params import load_params

EXPERIMENTS_TABLE = REPORT / "tables" / "experiments.md"
ARTIFACT_KEY = "ablation-results"


@task(retries=RETRIES, retry_delay_seconds=RETRY_DELAY_SECONDS, cache_policy=NO_CACHE, tags=[GPU_TAG])
def experiment_task(name: str, overrides: dict[str, Any], root: str, parent_run_id: str, flow_run_id: str) -> str:
    """One DVC experiment (`pipeline.ablation.run_experiment`) on a GPU of its own."""
    with pinned_gpu() as device:
        run_experiment(name, overrides, Path(root), {**stage_env(parent_run_id, flow_run_id), **device},
                       get_run_logger())
    return "ran"


def comparison_markdown(root: Path, outcomes: dict[str, str], parent_run_id: str) -> str:
    """The Prefect artifact: each experiment's outcome and the table of all experiments in MLflow."""
    table = root / EXPERIMENTS_TABLE
    return "\n".join([f"# ablation in `{root}`", "", f"MLflow parent run `{parent_run_id}`; "
                      "compare in the terminal with `dvc exp show`.", "",
                      "| experiment | result |", "| --- | --- |",
                      *(f"| {name} | {result} |" for name, result in outcomes.items()), "",
                      table.read_text() if table.is_file() else f"(no `{EXPERIMENTS_TABLE}`)"]) + "\n"


@flow(name="ablation")
def ablation(grid: dict[str, dict[str, Any]] | None = None, overrides: dict[str, Any] | None = None,
             project_dir: str | None = None) -> dict[str, str]:
    """Run every row of `grid` (default: the paper's ablations, `pipeline.ablation.GROUPS`) as the DVC
    experiment ``ablation-<row>`` with `overrides` added to each, then publish the comparison table."""
    from pipeline.stages import report

    root = Path(project_dir or Path.cwd()).resolve()
    rows = ablation_rows(grid, overrides)
    with contextlib.chdir(root):
        check_rows(root / "params.yaml", rows)  # a bad row fails here, before any experiment
        params = load_params(root / "params.yaml")
        with tracking.pipeline_run(params.tracking.experiment, run_name="ablation") as parent_run_id:
            flow_run_id = str(runtime.flow_run.id or "")
            futures = {name: experiment_task.with_options(task_run_name=name).submit(
                name, row, str(root), parent_run_id, flow_run_id) for name, row in rows.items()}
            wait(list(futures.values()))
            outcomes = {name: outcome(future) for name, future in futures.items()}
            report.run(params)
            create_markdown_artifact(comparison_markdown(root, outcomes, parent_run_id), key=ARTIFACT_KEY,
                                     description="ablation: all DVC experiments compared")
        failed = [name for name, result in outcomes.items() if result != "ran"]
        if failed:
            raise RuntimeError(f"experiments failed: {', '.join(failed)} (see their task logs)")
    return outcomes
