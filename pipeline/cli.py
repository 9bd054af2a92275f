"""`ast-dd`: the project's single command-line entry point.

Stage subcommands (what `dvc.yaml` runs) validate `--params` before any compute and exit with status 2 on a
usage or params error, naming the key that is wrong.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

from pipeline.locking import project_lock, release_output_locks
from pipeline.params import Params, load_params
from pipeline.preflight import preflight
from pipeline.schema import ParamsError, UsageError

log = logging.getLogger("ast-dd")
USAGE_ERROR = 2
# commands that write the project's artifacts themselves (not through DVC) run one at a time (pipeline.locking)
LOCKED_COMMANDS = ("prepare", "buffer", "convexify", "init", "distill", "evaluate", "baselines", "report", "score")


def _stage(name: str) -> Callable[..., None]:
    """Import a stage lazily so that `ast-dd --help` and params errors stay instant."""
    module = __import__(f"pipeline.stages.{name}", fromlist=["run"])
    return module.run


def cmd_params(args: argparse.Namespace, params: Params) -> None:
    from pipeline.params import settings_yaml

    for key in params.shadowed_hyper_keys():
        log.warning("distill.hyper.%s has no effect: distill.per_ipc sets it for every ipc in distill.ipcs %s",
                    key, list(params.distill.ipcs))
    print(settings_yaml(params))


def cmd_prepare(args: argparse.Namespace, params: Params) -> None:
    _stage("prepare")(params)


def cmd_buffer(args: argparse.Namespace, params: Params) -> None:
    for variant in args.variant or list(params.buffer.train):
        _stage("buffer")(params, variant)


def cmd_convexify(args: argparse.Namespace, params: Params) -> None:
    for variant in args.variant or list(params.buffer.train):
        _stage("convexify")(params, variant)


def cmd_init(args: argparse.Namespace, params: Params) -> None:
    _stage("init")(params)


def _cells(args: argparse.Namespace, params: Params) -> list[tuple[str, int, int]]:
    """The (method, ipc, seed) cells selected by --method/--ipc/--seed (default: the whole matrix)."""
    if args.method is not None and args.method not in params.distill.methods:
        raise ParamsError(f"--method: {args.method!r} is not in distill.methods ({', '.join(params.distill.methods)})")
    if args.ipc is not None and args.ipc not in params.distill.ipcs:
        raise ParamsError(f"--ipc: {args.ipc} is not in distill.ipcs ({list(params.distill.ipcs)})")
    if args.seed is not None and args.seed not in params.distill.seeds:
        raise ParamsError(f"--seed: {args.seed} is not in distill.seeds ({list(params.distill.seeds)})")
    methods = [args.method] if args.method else list(params.distill.methods)
    ipcs = [args.ipc] if args.ipc else list(params.distill.ipcs)
    seeds = [args.seed] if args.seed is not None else list(params.distill.seeds)
    return [(m, i, s) for m in methods for i in ipcs for s in seeds]


def cmd_distill(args: argparse.Namespace, params: Params) -> None:
    from pipeline import ranks

    devices = params.distill.devices
    for method, ipc, seed in _cells(args, params):
        if devices > 1 and not ranks.is_rank():  # the cell as `devices` ranks of this very command
            profiles = [option for profile in args.profile or () for option in ("--profile", str(profile))]
            ranks.launch(devices, ["distill", "--params", str(args.params), *profiles, "--method", method,
                                   "--ipc", str(ipc), "--seed", str(seed)])
        else:
            _stage("distill")(params, method, ipc, seed)


def cmd_evaluate(args: argparse.Namespace, params: Params) -> None:
    for cell in _cells(args, params):
        _stage("evaluate")(params, *cell)


def cmd_baselines(args: argparse.Namespace, params: Params) -> None:
    _stage("baselines")(params)


def cmd_report(args: argparse.Namespace, params: Params) -> None:
    _stage("report")(params)


def cmd_run(args: argparse.Namespace, params: Params) -> None:
    from pipeline.runner import run_pipeline

    run_pipeline(params, args.params, targets=args.targets, force=args.force, profiles=args.profile or (),
                 jobs=args.jobs, name=args.name, queue=args.queue)


def cmd_study(args: argparse.Namespace, params: Params) -> None:
    from pathlib import Path

    from pipeline.runner import ensure_params_file
    from pipeline.studies import run_study
    from pipeline.study_report import write_report

    ensure_params_file(args.params)
    if args.action == "run":
        if len(args.names) != 1:
            raise ParamsError("study run: name one study (ast-dd study run NAME)")
        run_study(args.names[0], Path(args.params), args.profile or (), jobs=args.jobs)
    for page in write_report(args.names, Path(args.params), args.profile or ()):
        print(page)


def cmd_score(args: argparse.Namespace, params: Params) -> None:
    from pathlib import Path

    from pipeline.scoring import run as score

    path = Path(args.path)
    details = score(params, path, args.name or path.resolve().name, args.lr)
    for arch, rows in details["results"].items():
        for label, result in rows.items():
            print(f"{arch:10s} {label:16s} {result['mean']:6.2f} ± {result['std']:.2f}  "
                  f"({len(result['seeds'])} networks, {details['protocol']})")


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace, Params], Any], str]] = {
    "params": (cmd_params, "validate params.yaml and print the resolved settings"),
    "prepare": (cmd_prepare, "stage: decode the dataset into cached tensors, fit ZCA"),
    "buffer": (cmd_buffer, "stage: train expert trajectories (AST smooth and/or plain SGD)"),
    "convexify": (cmd_convexify, "stage: MCT convexified copies of the experts (buffer.mct_anchors, mct_beta)"),
    "init": (cmd_init, "stage: representative (k-means) initialisation indices and PCA picture"),
    "distill": (cmd_distill, "stage: trajectory-matching distillation for a (method, ipc, seed) cell"),
    "evaluate": (cmd_evaluate, "stage: test accuracy of a distilled set over fresh networks"),
    "baselines": (cmd_baselines, "stage: coreset baselines and full-data training"),
    "report": (cmd_report, "stage: results tables and figures (also from MLflow)"),
    "run": (cmd_run, "the main job: `dvc repro` of the pipeline inside one MLflow parent run"),
    "score": (cmd_score, "test accuracy of any set (MTT images_best.pt/labels_best.pt/lr_best.pt folder or "
                         "ImageFolder) beside random and k-means real subsets of its size, same test networks"),
    "study": (cmd_study, "`run NAME`: a study of profiles/studies/ (paper tables, sweeps) as DVC experiments, "
                         "resumable, then its page; `report [NAME ...]`: the pages docs/studies/<name>.md"),
}


PLUGIN_GROUP = "ast_dd.commands"


def add_command(sub: argparse._SubParsersAction, name: str, handler: Callable[[argparse.Namespace, Params], Any],
                help_text: str) -> argparse.ArgumentParser:
    """A subcommand with the common `--params` option; `handler(args, params)` runs after validation."""
    cmd = sub.add_parser(name, help=help_text, description=help_text)
    cmd.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    cmd.add_argument("--profile", action="append",
                     help="overlay YAML holding only the settings it changes, merged over --params (repeatable): "
                          "a file, or a name in profiles/ (gpu, tiny); `run` writes it into params.yaml as a DVC "
                          "experiment")
    cmd.set_defaults(handler=handler)
    return cmd


def build_parser() -> argparse.ArgumentParser:
    """Built-in stage commands plus those other packages register under the `ast_dd.commands` entry points
    (e.g. the Prefect flows), so this module never imports its dependents."""
    parser = argparse.ArgumentParser(prog="ast-dd", description="Dataset distillation: MTT + AST + MCT.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (handler, help_text) in COMMANDS.items():
        cmd = add_command(sub, name, handler, help_text)
        if name in ("buffer", "convexify"):
            cmd.add_argument("--variant", action="append", help="buffer variant (repeatable; default: all)")
        if name in ("distill", "evaluate"):
            cmd.add_argument("--method", help="a name from distill.methods (default: all)")
            cmd.add_argument("--ipc", type=int, help="a value from distill.ipcs (default: all)")
            cmd.add_argument("--seed", type=int, help="a value from distill.seeds (default: all)")
        if name == "run":
            cmd.add_argument("targets", nargs="*", help="DVC stages to reproduce (default: all)")
            cmd.add_argument("--force", action="store_true", help="rerun stages even if up to date")
            cmd.add_argument("-n", "--name", help="run as the DVC experiment NAME (with --profile: the profile's "
                                                  "settings, recorded under that name in DVC and MLflow)")
            cmd.add_argument("--queue", action="store_true",
                             help="queue the experiment (`dvc exp run --queue`) for `dvc exp run --run-all` or "
                                  "`dvc queue start`, which run it in a temporary copy and leave the workspace's "
                                  "outputs as they are")
            cmd.add_argument("--jobs", type=int, default=1,
                             help="stages run at once, each with its share of the CPU cores (default 1: `dvc repro` "
                                  "with progress bars; `make run` uses every core)")
        if name == "score":
            cmd.add_argument("path", help="a folder with images_best.pt and labels_best.pt (lr_best.pt optional), "
                                          "or an ImageFolder (<class folder>/<image>.png)")
            cmd.add_argument("--name", help="name of the result (artifacts/scores/NAME; default: the folder's name)")
            cmd.add_argument("--lr", type=float, help="training lr when the set has no lr_best.pt (default: the "
                                                      "experts' lr)")
        if name == "study":
            cmd.add_argument("action", choices=("run", "report"), help="run a study's experiments, or only write pages")
            cmd.add_argument("names", nargs="*", help="studies: file names in profiles/studies/ without .yaml "
                                                      "(report: default all)")
            cmd.add_argument("--jobs", type=int, default=max(1, os.cpu_count() or 1),
                             help="experiments at once, each with its share of the CPU cores (default: every core)")
    for entry in entry_points(group=PLUGIN_GROUP):
        entry.load()(sub)
    return parser


def silence_stdout() -> None:
    """Send what is left of the output nowhere: its reader has gone (`ast-dd params | head`)."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        params = load_params(args.params, args.profile or ())
        if args.command != "params":
            preflight(params.tracking.experiment)
        with project_lock() if args.command in LOCKED_COMMANDS else contextlib.nullcontext():
            try:
                args.handler(args, params)
            finally:
                release_output_locks()
        sys.stdout.flush()
    except BrokenPipeError:  # a reader that stopped reading (`| head`) got what it wanted: no traceback, status 0
        silence_stdout()
        return 0
    except UsageError as error:
        log.error("%s", error)
        return USAGE_ERROR
    except (FileNotFoundError, ValueError, RuntimeError) as error:  # known failures: one clear line, no traceback
        if args.verbose:
            raise
        log.error("%s: %s", type(error).__name__, error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
