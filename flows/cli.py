"""`ast-dd serve`, `ast-dd flow run` and `ast-dd flow study` (registered through the `ast_dd.commands` entry point).

`ast-dd flow ...` runs a flow in this process: against the server in ``PREFECT_API_URL`` when set (e.g. the one
`ast-dd serve` started, which enforces the `gpu` limit), else against Prefect's temporary local API.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from pipeline.cli import add_command
from pipeline.params import Params
from pipeline.schema import ParamsError

log = logging.getLogger("ast-dd")


def quiet_http_logs() -> None:
    """Prefect's HTTP client logs every request at INFO; `ast-dd` logs at INFO."""
    logging.getLogger("httpx").setLevel(logging.WARNING)


def finish(state: Any) -> None:
    """Exit like the other commands: a params error is a usage error (2), any other failure exits 1."""
    if state.is_completed():
        return
    error = state.result(raise_on_failure=False)
    if isinstance(error, ParamsError):
        raise error
    log.error("%s", error)
    sys.exit(1)


def cmd_flow_run(args: argparse.Namespace, params: Params) -> None:
    from flows.pipeline_flow import ast_pipeline
    from pipeline.runner import ensure_params_file, overridden_params, parse_sets  # MLflow: only when run

    ensure_params_file(args.params)
    quiet_http_logs()
    overrides = parse_sets(args.set)
    overridden_params(Path(args.params), overrides)  # a usage error fails here, before Prefect starts
    finish(ast_pipeline(targets=args.targets or None, overrides=overrides, force=args.force,
                        project_dir=str(Path.cwd()), retries=args.retries, return_state=True))


def cmd_flow_study(args: argparse.Namespace, params: Params) -> None:
    from flows.study_flow import study
    from pipeline.runner import ensure_params_file
    from pipeline.studies import plan

    ensure_params_file(args.params)
    plan(args.name, Path(args.params))   # an unknown study or a bad setting fails here, before Prefect starts
    quiet_http_logs()
    finish(study(name=args.name, project_dir=str(Path.cwd()), return_state=True))


def check_ports(port: int, mlflow_port: int | None) -> None:
    """Both servers need a TCP port of their own."""
    for option, value in (("--port", port), ("--mlflow-port", mlflow_port)):
        if value is not None and not 1 <= value <= 65535:
            raise ParamsError(f"{option}: {value} is not a TCP port (1-65535)")
    if port == mlflow_port:
        raise ParamsError(f"--mlflow-port: {mlflow_port} is the Prefect server's --port too; choose another")


def cmd_serve(args: argparse.Namespace, params: Params) -> None:
    from pipeline.runner import ensure_params_file

    ensure_params_file(args.params)
    if args.gpus is not None and args.gpus < 1:
        raise ParamsError(f"--gpus: {args.gpus} must be >= 1")
    check_ports(args.port, None if args.no_mlflow else args.mlflow_port)
    from flows.serve import serve  # imports Prefect: only once the options are known to be usable
    quiet_http_logs()
    serve(Path.cwd(), host=args.host, port=args.port, mlflow_port=args.mlflow_port, cron=args.cron,
          study_cron=args.study_cron, gpus=args.gpus, mlflow=not args.no_mlflow)


def register(sub: argparse._SubParsersAction) -> None:
    """Add `serve` and `flow {run,study}` to the `ast-dd` parser."""
    serve = add_command(sub, "serve", cmd_serve, "Prefect server + UI and MLflow UI on 127.0.0.1, the `gpu` "
                        "concurrency limit, and both flows served as (scheduled) deployments; Ctrl-C stops all")
    serve.add_argument("--host", default="127.0.0.1", help="interface both servers bind to (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=4200, help="Prefect server port (default: 4200)")
    serve.add_argument("--mlflow-port", type=int, default=5000, help="MLflow UI port (default: 5000)")
    serve.add_argument("--no-mlflow", action="store_true", help="do not start the MLflow UI")
    serve.add_argument("--cron", help="schedule of the pipeline deployment, e.g. '0 3 * * *' (default: none)")
    serve.add_argument("--study-cron", help="schedule of the study deployment (default: none)")
    serve.add_argument("--gpus", type=int, help="`gpu` concurrency limit (default: visible GPUs, at least 1)")

    flow = sub.add_parser("flow", help="run a Prefect flow now", description="run a Prefect flow now")
    flows = flow.add_subparsers(dest="flow_command", required=True)
    run = add_command(flows, "run", cmd_flow_run, "the pipeline flow: DVC stages as parallel Prefect tasks")
    run.add_argument("targets", nargs="*", help="DVC stages to reproduce with what they need (default: all)")
    run.add_argument("--set", action="append", help="params override key=value, written to params.yaml (repeatable)")
    run.add_argument("--force", action="store_true", help="rerun stages even if up to date")
    run.add_argument("--retries", type=int, default=2, help="retries of a failed stage (default: 2)")
    study = add_command(flows, "study", cmd_flow_study, "the study flow: a study's DVC experiments under the gpu "
                        "limit, then its page")
    study.add_argument("name", help="a study: a file name in profiles/studies/ without .yaml")
