"""`ast-dd ablate`: the paper's ablations as DVC experiments, then the comparison report from MLflow.

Each group is one `dvc exp run --temp` whose overrides only switch which buffer variants are trained and
which `distill.configs` rows are distilled; DVC's foreach/matrix fans the rows out and its cache reuses
every stage an experiment shares with earlier ones (e.g. the same expert buffer).
"""

from __future__ import annotations

import json
import logging
import subprocess

from pipeline.params import Params, check_seeds
from pipeline.schema import ParamsError

log = logging.getLogger(__name__)

GROUPS: dict[str, dict[str, object]] = {
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


def overrides(group: str, extra: list[str]) -> list[str]:
    """`-S key=value` arguments for one group (values as JSON, which DVC reads as YAML)."""
    args = []
    for key, value in GROUPS[group].items():
        args += ["-S", f"{key}={json.dumps(value)}"]
    for item in extra:
        if "=" not in item:
            raise ParamsError(f"--set: {item!r} must look like key=value")
        args += ["-S", item]
    return args


def experiment_name(group: str, seed: int | None) -> str:
    """`ablation-<group>`, or `ablation-<group>-s<seed>` for one of several distillation seeds."""
    return f"ablation-{group}" if seed is None else f"ablation-{group}-s{seed}"


def run_ablations(params: Params, params_path: str, groups: list[str] | None = None,
                  extra: list[str] | None = None, seeds: list[int] | None = None) -> None:
    """One DVC experiment per group (and per distillation seed when `seeds` is given), then the report."""
    from pipeline import tracking  # MLflow loads here, not when `ast-dd` builds its parser from GROUPS
    from pipeline.runner import dvc_command, ensure_params_file, run_dvc

    ensure_params_file(params_path)
    chosen = groups or list(GROUPS)
    unknown = [g for g in chosen if g not in GROUPS]
    if unknown:
        raise ParamsError(f"--group: {unknown[0]!r} is unknown; allowed: {', '.join(GROUPS)}")
    if seeds is not None:
        check_seeds("--seeds", seeds)
    for group in chosen:
        for seed in seeds or [None]:
            name = experiment_name(group, seed)
            seed_override = [] if seed is None else [f"distill.seed={seed}"]
            # A rerun replaces the previous experiment of the same name instead of failing on the conflict.
            subprocess.run(dvc_command("exp", "remove", name), capture_output=True, check=False)
            with tracking.pipeline_run(params.tracking.experiment, run_name=name):
                run_dvc("exp", "run", "--temp", "--name", name, *overrides(group, (extra or []) + seed_override))
    from pipeline.stages import report

    report.run(params)
