"""The paper's ablations as DVC experiments: one definition for `ast-dd ablate` and the Prefect flow `ablation`.

Each row is one `dvc exp run --temp` whose overrides only switch which buffer variants are trained and which
`distill.configs` rows are distilled; DVC's foreach/matrix fans the rows out and its cache reuses every stage
an experiment shares with earlier ones (e.g. the same expert buffer). Every row is checked before the first
experiment starts.
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline.params import Params, check_seeds
from pipeline.schema import ParamsError

log = logging.getLogger(__name__)

GROUPS: dict[str, dict[str, Any]] = {
    # AST Table VII: distil the same way from SGD / momentum / +GP / +GP+clip experts.
    "buffers": {"buffer.train": ["sgd", "momentum", "momentum_gp", "ast"], "init.buffer": "sgd",
                "distill.methods": ["buf_sgd", "buf_momentum", "buf_momentum_gp", "buf_ast"]},
    # AST Table VIII: base, +representative init, +balanced loss, +intermediate matching, +weight perturbation.
    "modules": {"buffer.train": ["ast"], "init.buffer": "ast",
                "distill.methods": ["base", "rep_init", "balanced", "intermediate", "ast"]},
    # MCT on/off and 2 vs 4 anchors, on MTT's experts and with full AST.
    "mct": {"buffer.train": ["sgd", "ast"], "init.buffer": "ast", "buffer.mct_anchors": [2, 4],
            "distill.methods": ["mtt", "mct2", "mct4", "ast", "ast_mct2"]},
}
PREFIX = "ablation-"


def experiment_name(group: str) -> str:
    """`ablation-<group>`: the DVC experiment (and MLflow parent run) of one group."""
    return f"{PREFIX}{group}"


def select_groups(groups: Sequence[str] | None) -> dict[str, dict[str, Any]]:
    """The named groups of GROUPS (all when none are named); an unknown name fails, listing the allowed ones."""
    unknown = [group for group in groups or [] if group not in GROUPS]
    if unknown:
        raise ParamsError(f"--group: {unknown[0]!r} is unknown; allowed: {', '.join(GROUPS)}")
    return {group: GROUPS[group] for group in groups or GROUPS}


def ablation_rows(grid: Mapping[str, Mapping[str, Any]] | None = None, extra: Mapping[str, Any] | None = None,
                  seeds: Sequence[int] | None = None) -> dict[str, dict[str, Any]]:
    """Experiment name -> its `-S` overrides: each grid row (default: GROUPS) with `extra` added, and its
    distillation seeds (`distill.seeds`, one matrix cell each) when `seeds` is given."""
    return {experiment_name(group): {**values, **(extra or {}), **({} if seeds is None else
                                                                   {"distill.seeds": list(seeds)})}
            for group, values in (grid or GROUPS).items()}


def check_rows(params_file: Path, rows: Mapping[str, Mapping[str, Any]]) -> None:
    """Every row applied to params.yaml as DVC would, validated; a bad key fails here, naming it."""
    from pipeline.runner import overridden_params

    for row in rows.values():
        overridden_params(params_file, row)


def run_experiment(name: str, overrides: Mapping[str, Any], root: Path | None = None,
                   env: Mapping[str, str] | None = None, logger: logging.Logger | logging.LoggerAdapter | None = None
                   ) -> None:
    """One row as the DVC experiment `name` in a temporary copy (the workspace stays as it is); an experiment
    of the same name is replaced instead of failing on the conflict."""
    from pipeline.runner import dvc_command, hydra_overrides, run_dvc

    subprocess.run(dvc_command("--wait-for-lock", "exp", "remove", name), cwd=root, env=env, capture_output=True,
                   check=False)  # fails when there is none, which is fine
    sets = [arg for override in hydra_overrides(overrides) for arg in ("-S", override)]
    run_dvc(["--wait-for-lock", "exp", "run", "--temp", "--name", name, *sets], root, env, logger)


def run_ablations(params: Params, params_path: str, groups: list[str] | None = None,
                  extra: list[str] | None = None, seeds: list[int] | None = None) -> None:
    """`ast-dd ablate`: one DVC experiment per group (each distilling every seed), one after the other, then
    the report."""
    from pipeline import tracking  # MLflow loads here, not when `ast-dd` builds its parser from GROUPS
    from pipeline.runner import ensure_params_file, parse_sets

    ensure_params_file(params_path)
    grid = select_groups(groups)
    if seeds is not None:
        check_seeds("--seeds", seeds)
    rows = ablation_rows(grid, parse_sets(extra), seeds)
    check_rows(Path(params_path), rows)
    for name, row in rows.items():
        with tracking.pipeline_run(params.tracking.experiment, run_name=name):
            run_experiment(name, row)
    from pipeline.stages import report

    report.run(params)
