"""`ast-dd serve`: the Prefect server and UI, the MLflow UI, the `gpu` limit and both flows as deployments.

One command brings everything up on 127.0.0.1 (``--host`` to change) and takes it down on Ctrl-C:
``prefect server start`` and ``mlflow server`` run as child processes, the ``gpu`` concurrency limit is set
(default: the number of visible GPUs, at least 1), and this process serves the deployments
``ast_pipeline/ast-dd`` and ``study/ast-dd`` (optionally on cron schedules) until stopped.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

from prefect import serve as prefect_serve
from prefect.client.orchestration import get_client
from prefect.deployments.runner import EntrypointType, RunnerDeployment
from prefect.settings import PREFECT_API_URL, temporary_settings

from flows.pipeline_flow import ast_pipeline
from flows.stages import GPU_TAG, visible_gpus
from flows.study_flow import study
from pipeline import tracking
from pipeline.runner import venv_command

log = logging.getLogger(__name__)
DEPLOYMENT = "ast-dd"
STARTUP_SECONDS = 180
STOP_SECONDS = 20


def set_gpu_limit(limit: int) -> None:
    """Create or update the `gpu` tag concurrency limit on the API this process points at."""
    if limit < 1:
        raise ValueError(f"gpu limit={limit!r} must be a positive integer")
    with get_client(sync_client=True) as client:
        client.create_concurrency_limit(GPU_TAG, limit)


def client_host(host: str) -> str:
    """Where local clients reach a server bound to `host` (a wildcard address is reached on loopback)."""
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def wait_until_up(url: str, process: subprocess.Popen, timeout: float = STARTUP_SECONDS) -> None:
    """Poll `url` until it answers 200; fail early when the server process has exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{' '.join(map(str, process.args))} exited with {process.returncode}")
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=5) as response:
            if response.status == 200:
                return
        time.sleep(1)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")


def api_address(host: str, port: int) -> str:
    """The Prefect API URL of a server bound to `host`:`port`, as local clients and the UI reach it."""
    return f"http://{client_host(host)}:{port}/api"


def prefect_server(host: str, port: int) -> subprocess.Popen:
    """`prefect server start` on `host`:`port` whose UI calls the API there. Without PREFECT_UI_API_URL the UI
    would call PREFECT_API_URL from the profile or the environment, else PREFECT_SERVER_API_PORT (4200), not
    the port given with --port."""
    env = {**os.environ, "PREFECT_SERVER_API_HOST": host, "PREFECT_SERVER_API_PORT": str(port),
           "PREFECT_UI_API_URL": api_address(host, port)}
    return subprocess.Popen(venv_command("prefect", "server", "start", "--host", host, "--port", str(port),
                                         "--analytics-off"), env=env)


@contextlib.contextmanager
def child_processes() -> Iterator[list[subprocess.Popen]]:
    """Processes appended to the yielded list are stopped (SIGTERM, then SIGKILL) on exit, newest first."""
    processes: list[subprocess.Popen] = []
    try:
        yield processes
    finally:
        for process in reversed(processes):
            process.terminate()
            try:
                process.wait(timeout=STOP_SECONDS)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def deployments(root: Path, cron: str | None, study_cron: str | None) -> list[RunnerDeployment]:
    """Both flows as deployments of this project (module entry points: they run wherever ast-dd is installed)."""
    common = {"name": DEPLOYMENT, "parameters": {"project_dir": str(root)},
              "entrypoint_type": EntrypointType.MODULE_PATH}
    return [ast_pipeline.to_deployment(cron=cron, description="reproduce the DVC pipeline", **common),
            study.to_deployment(cron=study_cron, description="a study (profiles/studies/, parameter name) as DVC "
                                "experiments", **common)]


def _stop(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def serve(root: Path, host: str = "127.0.0.1", port: int = 4200, mlflow_port: int = 5000, cron: str | None = None,
          study_cron: str | None = None, gpus: int | None = None, mlflow: bool = True) -> None:
    """Start the servers, set the `gpu` limit and serve the deployments until interrupted (SIGINT/SIGTERM)."""
    root = root.resolve()
    api_url = api_address(host, port)
    signal.signal(signal.SIGTERM, _stop)
    with child_processes() as processes, temporary_settings(updates={PREFECT_API_URL: api_url}):
        processes.append(prefect_server(host, port))
        wait_until_up(f"{api_url}/health", processes[-1])
        set_gpu_limit(gpus or max(1, len(visible_gpus())))  # 1 on a CPU: one at a time
        if mlflow:
            with contextlib.chdir(root):
                store = tracking.tracking_uri()
            processes.append(subprocess.Popen(venv_command("mlflow", "server", "--host", host, "--port",
                                                           str(mlflow_port), "--backend-store-uri", store,
                                                           "--workers", "1"), cwd=root))
            wait_until_up(f"http://{client_host(host)}:{mlflow_port}/health", processes[-1])
        log.info("Prefect UI: http://%s:%d  MLflow UI: %s", client_host(host), port,
                 f"http://{client_host(host)}:{mlflow_port}" if mlflow else "off")
        prefect_serve(*deployments(root, cron, study_cron))
