"""What names and describes a scored set, shared by the distill, evaluate and baselines stages: a distilled
cell's MLflow params and tags, the metrics key of any set, and the note stating the test protocol."""

from __future__ import annotations

import dataclasses
from typing import Any

from ast_core.evaluate import EvalResult
from pipeline.layout import settings_key
from pipeline.params import Params
from pipeline.schema import to_mapping


def cell_params(params: Params, method: str, ipc: int, seed: int) -> dict[str, Any]:
    """Every setting that produces one cell's distilled set (method switches and hyper values under
    ``config.*``, buffer variant, ipc, seed, ...): the params of its distill and evaluate runs in MLflow."""
    chosen = params.distill.configs[method]
    return {"method": method, "ipc": ipc, "seed": seed, "buffer": chosen.buffer, "mct_anchors": chosen.mct_anchors,
            "init": chosen.init, "config": dataclasses.asdict(params.distill_config(method, ipc, seed=seed)),
            "model": to_mapping(params.model),
            "eval": {"every": params.distill.eval_every, "models": params.distill.eval_models,
                     "iterations": params.distill.eval_iterations, "seeds": params.validation_seeds}}


def cell_settings_key(params: Params, method: str, ipc: int, seed: int) -> str:
    """Names everything a cell's distillation depends on (its settings, the data, its buffer's training), so a
    checkpoint is resumed only by the same distillation."""
    chosen = params.distill.configs[method]
    buffer = {"variant": to_mapping(params.buffer.variants[chosen.buffer]), "epochs": params.buffer.epochs,
              "num_experts": params.buffer.num_experts, "train_size": params.buffer.train_size,
              "storage_dtype": params.buffer.storage_dtype, "mct_beta": params.buffer.mct_beta}
    return settings_key({"cell": cell_params(params, method, ipc, seed), "data": to_mapping(params.data),
                         "buffer": buffer, "seed": params.seed})


def cell_tags(params: Params, method: str, ipc: int, seed: int) -> dict[str, str]:
    """MLflow tags of a cell's runs: its row (`method`), ipc and distillation seed, and the study it belongs
    to (`study.name`, set by `ast-dd study run`), so the MLflow UI groups a study's runs in one view."""
    tags = {"method": method, "ipc": str(ipc), "distill_seed": str(seed)}
    return tags | ({"study": params.study.name} if params.study.name else {})


def protocol_note(params: Params) -> str:
    ev = params.evaluate
    unit = "iterations, lr halved at half (AST)" if ev.protocol == "ast" else "epochs, lr x0.1 at half (MTT)"
    return (f"test accuracy of {ev.num_models} fresh networks (seeds {params.test_seeds[0]}-{params.test_seeds[-1]}) "
            f"trained {ev.iterations} {unit}, SGD momentum 0.9, wd 5e-4, batch {ev.batch_size}, DSA; sets chosen "
            f"on the validation split with networks of seeds {params.validation_seeds[0]}-"
            f"{params.validation_seeds[-1]}")


def metric_key(name: str, ipc: int, seed: int | None = None) -> str:
    """The metrics key of a set: ``<subset>_ipc<k>``, or ``<method>_ipc<k>_s<seed>`` for a distilled one."""
    return f"{name}_ipc{ipc}" if seed is None else f"{name}_ipc{ipc}_s{seed}"


def scores(result: EvalResult) -> dict[str, float]:
    """Test accuracy of one evaluation as DVC metrics (scalars only)."""
    return {"mean": result.mean, "std": result.std}
