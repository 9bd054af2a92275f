"""Stage `buffer`: train one variant's expert trajectories (AST Algorithm 1); stage `convexify` makes MCT's copies.

Experts are trained in the project's ``artifacts/checkpoints/buffer/<variant>/<settings>/`` and moved into the
output folder when all are done: finished experts survive a killed run (also one in an experiment's temporary
copy), while the output itself is an ordinary DVC output that DVC's run-cache restores in every experiment
with the same settings instead of training it again.

A variant with `source` (`buffer.variants.<v>.source`: a path or glob of MTT-family ``replay_buffer_*.pt``
files) is imported instead of trained (`ast_core.expert_import.import_mtt_experts`): the same expert files,
reports and metrics, the checkpoints checked against `model` and the dataset. DVC reruns it when the variant's
settings change, not when the files behind an unchanged path do: give new files a new path (or variant).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import shutil
import time
from pathlib import Path

import pandas as pd

from ast_core.expert_import import import_mtt_experts
from ast_core.expert_reports import summarize_buffer
from ast_core.experts import GRAD_NORM_KEYS, ExpertScheduler, LocalScheduler, train_experts
from ast_core.io import atomic_write_json
from ast_core.settings import ExpertConfig
from ast_core.trajectory import list_buffer, read_metadata, storage_dtype
from pipeline import tracking
from pipeline.distributed import DaskScheduler
from pipeline.layout import buffer_dir, buffer_timing_file, expert_work_dir, settings_key
from pipeline.outputs import claim_outputs
from pipeline.params import Params
from pipeline.prepared import class_balanced_subset, load_prepared, resolve_device
from pipeline.schema import ParamsError, to_mapping

log = logging.getLogger(__name__)
SIGNATURE = "data_signature.json"


def expert_config(params: Params, variant: str) -> ExpertConfig:
    """The variant's expert settings with the shared model/buffer/data keys filled in."""
    return dataclasses.replace(params.buffer.variant(variant), arch=params.model.arch, width=params.model.width,
                               depth=params.model.depth, epochs=params.buffer.epochs,
                               batch_size=params.buffer.batch_size, zca=params.data.zca)


def expert_scheduler(params: Params) -> ExpertScheduler:
    """Where experts train: on the Dask scheduler `buffer.cluster` when set (the workers pick their own GPUs; this
    machine may have none), else here with `buffer.workers` processes."""
    if params.buffer.cluster:
        return DaskScheduler(params.buffer.cluster, device=None if params.device == "auto" else params.device)
    return LocalScheduler(workers=params.buffer.workers, device=resolve_device(params.device), progress=True)


def data_signature(params: Params) -> dict:
    """What the experts' training data depends on beyond the expert config (stored beside the experts)."""
    return {"dataset": params.data.dataset, "root": params.data.root, "val_size": params.data.val_size,
            "zca": params.data.zca, "zca_eps": params.data.zca_eps, "zca_fit": params.data.zca_fit,
            "train_size": params.buffer.train_size,
            "seed": params.seed}


def usable_expert(path: Path, config: dict, seed: int) -> bool:
    """The expert file is readable and was trained with `config` and `seed` (else it is retrained)."""
    try:
        meta = read_metadata(path)
    except ValueError as error:  # truncated or damaged (e.g. a killed copy): retrain it rather than stop
        log.warning("%s (retraining it now)", error)  # the error names the file
        return False
    return meta.get("config") == config and meta.get("seed") == seed


def drop_stale_experts(params: Params, folder: Path, config: ExpertConfig) -> None:
    """Keep finished experts in `folder` of this exact data and configuration (resume); delete the rest, and
    unreadable ones."""
    if not folder.is_dir():
        return
    signature_file = folder / SIGNATURE
    same_data = signature_file.is_file() and json.loads(signature_file.read_text()) == data_signature(params)
    wanted = config.to_dict()
    for path in folder.glob("expert_*.safetensors"):
        index = int(path.name.split("_")[1].split(".")[0])
        keep = same_data and index < params.buffer.num_experts and ".mct" not in path.name  # MCT copies: convexify
        if not (keep and usable_expert(path, wanted, params.seed + index)):
            log.info("removing %s (other settings, unreadable or no longer needed)", path)
            path.unlink()


def move_experts(work: Path, folder: Path) -> None:
    """The finished experts (and their data signature) from the work folder into the stage's output folder,
    which DVC emptied before the stage ran; the work folder goes."""
    folder.mkdir(parents=True, exist_ok=True)
    for path in [*list_buffer(work), work / SIGNATURE]:
        path.replace(folder / path.name)
    shutil.rmtree(work)


def source_files(params: Params, variant: str) -> list[Path]:
    """The MTT buffer files an imported variant names, in natural order (replay_buffer_2 before _10)."""
    pattern = params.buffer.source(variant)
    files = sorted(Path().glob(pattern) if not Path(pattern).is_absolute() else Path("/").glob(pattern[1:]),
                   key=lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)])
    if not files:
        raise FileNotFoundError(f"buffer.variants.{variant}.source: {pattern!r} matches no file")
    return files


def import_variant(params: Params, variant: str, folder: Path, tracker: tracking.StageRun) -> None:
    """Fill the output folder from the variant's MTT buffer files (`source`), with the trained buffers' reports."""
    files = source_files(params, variant)
    prepared = load_prepared(params)
    import_mtt_experts(files, prepared.data, expert_config(params, variant), folder, params.buffer.num_experts,
                       storage_dtype(params.buffer.storage_dtype), resolve_device(params.device))
    summary = summarize_buffer(folder, params.buffer.num_experts)
    test_acc = summary["test_acc"]["mean"]
    if test_acc is not None and test_acc < 2 * 100 / prepared.data.info.num_classes:
        log.warning("the imported experts of %s score %.1f %% on the test split, near chance: check that data "
                    "(dataset, zca, normalisation) is what they were trained on", variant, test_acc)
    log_buffer_metrics(tracker, folder, summary, {"plain": sum(p.stat().st_size for p in list_buffer(folder))})
    tracker.log_artifacts(sorted(folder.glob("*.png")) + [folder / "summary.json"])


def run(params: Params, variant: str) -> None:
    if variant not in params.buffer.train:
        raise ParamsError(f"--variant: {variant!r} is not in buffer.train ({', '.join(params.buffer.train)})")
    if params.buffer.source(variant) is not None:
        claim_outputs([buffer_dir(variant)])
        with tracking.stage_run("buffer", params.tracking.experiment, f"buffer-{variant}",
                                {"variant": params.buffer.variants[variant], "data": params.data.dataset},
                                {"variant": variant}) as tracker:
            import_variant(params, variant, buffer_dir(variant), tracker)
        return
    config = expert_config(params, variant)
    folder = buffer_dir(variant)
    work = expert_work_dir(variant, settings_key({"data": data_signature(params), "config": config.to_dict(),
                                                  "storage_dtype": params.buffer.storage_dtype}))
    claim_outputs([folder], [work, buffer_timing_file(variant).parent])
    logged = {"model": to_mapping(params.model), "buffer": {**to_mapping(params.buffer), "variants": None},
              "variant": params.buffer.variants[variant], "seed": params.seed, "data": params.data.dataset}
    with tracking.stage_run("buffer", params.tracking.experiment, f"buffer-{variant}", logged,
                            {"variant": variant}) as tracker:
        drop_stale_experts(params, work, config)
        atomic_write_json(work / SIGNATURE, data_signature(params))
        prepared = load_prepared(params)
        data = class_balanced_subset(prepared.data, params.buffer.train_size, params.seed)
        started = time.perf_counter()
        train_experts(data, config, work, params.buffer.num_experts, seed=params.seed,
                      dtype=storage_dtype(params.buffer.storage_dtype), scheduler=expert_scheduler(params))
        move_experts(work, folder)
        timing = {"train_seconds": time.perf_counter() - started}  # the experts trained now (finished ones are kept)
        atomic_write_json(buffer_timing_file(variant), timing)
        tracker.log_metrics(timing)
        summary = summarize_buffer(folder, params.buffer.num_experts)
        sizes = {"plain": sum(p.stat().st_size for p in list_buffer(folder))}
        log_buffer_metrics(tracker, folder, summary, sizes)
        tracker.log_artifacts(sorted(folder.glob("*.png")) + sorted(folder.glob("*.csv"))
                              + [folder / "summary.json"])


def log_buffer_metrics(tracker: tracking.StageRun, folder: Path, summary: dict, sizes: dict[str, int]) -> None:
    """Avg_Var and expert accuracy (mean, std over experts), per-epoch curves and storage bytes."""
    flat = {f"{key}_{stat}": value[stat] for key, value in summary.items()
            if isinstance(value, dict) and value.get("mean") is not None for stat in ("mean", "std")}
    tracker.log_metrics({**flat, **{f"bytes_{k}": v for k, v in sizes.items()}})
    per_epoch = pd.read_csv(folder / "metrics.csv").groupby("epoch").mean(numeric_only=True).reset_index()
    keys = [k for k in ("train_acc", "val_acc", "test_acc", "step_sq_norm", "gp", *GRAD_NORM_KEYS)
            if per_epoch[k].notna().all()]
    tracker.log_series(per_epoch.to_dict("records"), keys, "epoch")
