"""Offline and telemetry defaults applied to every command the project runs (no analytics or update checks
leave the machine); the Makefile reads them from `python pipeline/environment.py` (KEY=VALUE lines), so the
list exists once."""

import os

OFFLINE_DEFAULTS: dict[str, str] = {
    "DO_NOT_TRACK": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    # a tracking server that stops answering costs a stage seconds, not minutes (MLflow: 120 s x 7 retries)
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "15",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
}


def apply_offline_defaults() -> None:
    """Set the telemetry/offline variables unless the user already chose a value."""
    for key, value in OFFLINE_DEFAULTS.items():
        os.environ.setdefault(key, value)


if __name__ == "__main__":
    print("\n".join(f"{key}={value}" for key, value in OFFLINE_DEFAULTS.items()))
