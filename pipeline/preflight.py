"""Checks that run before any stage computes: the MLflow store and experiment are usable, outputs writable.

A multi-hour run should fail in its first second on a typo in MLFLOW_TRACKING_URI or a read-only disk, not
after the experts are trained. Each failure is one line naming the setting (``MLFLOW_TRACKING_URI``,
``tracking.experiment``) or the folder.
"""

from __future__ import annotations

import tempfile
import urllib.error
import urllib.parse
import urllib.request
from importlib.metadata import entry_points
from pathlib import Path

from pipeline.layout import ARTIFACTS
from pipeline.schema import UsageError

TIMEOUT_SECONDS = 5
DATABASES = ("postgresql", "mysql", "mssql")
OTHER_SCHEMES = ("databricks", "databricks-uc", "uc")


def check_writable(folder: Path, what: str) -> None:
    """Create `folder` if needed and prove a file can be written there."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as error:
        raise UsageError(f"{what}: {folder} is not writable ({error.strerror or error})") from error


def redacted(uri: str) -> str:
    """`uri` with its password (if any) replaced by ***, fit for a log line."""
    parts = urllib.parse.urlsplit(uri)
    if parts.password is None:
        return uri
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@")))


def check_sqlite(uri: str) -> None:
    """The database's folder must already exist (a typo must not create a new store) and be writable."""
    folder = Path(uri.removeprefix("sqlite:///").split("?", 1)[0]).parent
    if not folder.is_dir():
        raise UsageError(f"MLFLOW_TRACKING_URI={uri}: folder {folder} does not exist (a typo? create it first)")
    check_writable(folder, f"MLFLOW_TRACKING_URI={uri}")


def check_server(uri: str) -> None:
    """A tracking server must answer /health."""
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=TIMEOUT_SECONDS) as response:
            if response.status != 200:
                raise UsageError(f"MLFLOW_TRACKING_URI={redacted(uri)} answered /health with status "
                                 f"{response.status}")
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise UsageError(f"MLFLOW_TRACKING_URI={redacted(uri)} is unreachable ({reason}); start the server "
                         "(`ast-dd serve`) or unset the variable to use the local sqlite store") from error


def check_database(uri: str, scheme: str) -> None:
    """A database store needs its Python driver installed and must accept a connection."""
    import sqlalchemy

    shown = redacted(uri)
    timeout = {"connect_timeout": TIMEOUT_SECONDS} if scheme in ("postgresql", "mysql") else {}
    try:
        engine = sqlalchemy.create_engine(uri, connect_args=timeout)
    except ModuleNotFoundError as error:
        raise UsageError(f"MLFLOW_TRACKING_URI={shown}: its database driver `{error.name}` is not installed in "
                         "this environment; install it or use a sqlite:/// store") from error
    except sqlalchemy.exc.ArgumentError as error:
        raise UsageError(f"MLFLOW_TRACKING_URI={shown} is not a valid database URI ({error})") from error
    try:
        with engine.connect():
            pass
    except sqlalchemy.exc.SQLAlchemyError as error:
        reason = str(getattr(error, "orig", None) or error).strip().splitlines()[0]
        raise UsageError(f"MLFLOW_TRACKING_URI={shown}: cannot connect ({reason})") from error
    finally:
        engine.dispose()


def check_file_store(uri: str) -> None:
    """MLflow 3 refuses its file store (a plain path or file://) unless MLFLOW_ALLOW_FILE_STORE=true."""
    from mlflow.environment_variables import MLFLOW_ALLOW_FILE_STORE

    if not MLFLOW_ALLOW_FILE_STORE.get():
        raise UsageError(f"MLFLOW_TRACKING_URI={uri}: MLflow refuses a file store unless MLFLOW_ALLOW_FILE_STORE=true; "
                         "use a database store such as sqlite:///<folder>/mlflow.db")


def check_tracking_store(uri: str) -> None:
    """The store `uri` names is usable: a known scheme, an existing sqlite folder, a reachable server or
    database with its driver installed, a file store only where MLflow allows one."""
    scheme = urllib.parse.urlsplit(uri).scheme.split("+", 1)[0]
    if scheme == "sqlite":
        check_sqlite(uri)
    elif scheme in ("http", "https"):
        check_server(uri)
    elif scheme in DATABASES:
        check_database(uri, scheme)
    elif scheme in ("", "file") and uri != "databricks":
        check_file_store(uri)
    elif scheme and scheme not in (*OTHER_SCHEMES, *entry_points(group="mlflow.tracking_store").names):
        raise UsageError(f"MLFLOW_TRACKING_URI={redacted(uri)}: unknown scheme {scheme!r}; use sqlite:///<path>, "
                         f"http(s)://<server>, {', '.join(f'{name}://' for name in DATABASES)} or databricks")


def preflight(experiment: str | None = None) -> None:
    """Outputs writable, MLflow store usable and (when given) `tracking.experiment` a valid name."""
    from pipeline import tracking  # imports MLflow: only for commands that compute

    check_writable(ARTIFACTS.resolve(), "artifacts")  # stages write relative to the working copy
    if experiment is not None:
        tracking.check_experiment_name(experiment)
    check_tracking_store(tracking.tracking_uri())
