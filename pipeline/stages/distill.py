"""Stage `distill`: one (method, ipc, seed) cell of the matrix: trajectory matching with the method's AST/MCT
switches, from distillation seed `seed` (one of `distill.seeds`).

The stage never sees the test split: the prepared data it works on has its test split sealed (any access raises
`SealedSplitError`), so the kept set is selected on the validation split by construction. The validation
networks have seeds `Params.validation_seeds`, disjoint from the test networks' (`Params.test_seeds`).

Outputs (``artifacts/distill/<method>/ipc<k>/seed<s>/``): ``synthetic.safetensors`` (best-by-validation and final
images in distillation space, labels, alpha), ``grid.png`` (best set, pixels after inverse ZCA),
``final_grid.png`` (the set after the last iteration), ``soft_labels.png`` (with soft labels: the kept set's
label probabilities per image and class),
``mtt/`` (the kept set as MTT's ``images_best.pt``, ``labels_best.pt``, ``lr_best.pt``, plus
``pixels_best.pt``: `ast_core.field_files.export_mtt_set`), ``images/<class>/<index>.png`` (the kept set as an
ImageFolder), ``history.csv`` (per iteration), ``validation.csv`` (validation accuracy after k updates, k = 0 is the
initial set; AST Fig. 6), ``result.json``. The resumable checkpoint lives in the project's
``artifacts/checkpoints/`` (not a DVC output; `pipeline.layout.checkpoints_dir`, named by the cell's settings),
so a killed run, or a killed experiment in a temporary copy, continues where it stopped; a finished cell
removes it. Wall-clock times go to ``artifacts/timing/`` (not a DVC output either), so rerunning an unchanged
cell by hand reproduces its outputs and DVC does not report them modified.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import statistics
from pathlib import Path

import torch

from ast_core.checkpoint import DistillCheckpoint
from ast_core.data import DatasetSplits
from ast_core.distill import Distiller, DistillResult, Evaluator
from ast_core.evaluate import evaluate_synthetic
from ast_core.field_files import export_image_folder, export_mtt_set
from ast_core.init import SyntheticInit, initial_synthetic_set
from ast_core.io import atomic_write_csv, atomic_write_json, atomic_write_safetensors
from ast_core.models import FlatModel
from ast_core.settings import DistillConfig
from ast_core.sharded import BatchShard
from ast_core.soft_labels import expert_label_logits
from ast_core.trajectory import convex_tag, load_buffer
from ast_core.viz import plot_soft_labels, save_image_grid
from pipeline import ranks, tracking
from pipeline.cells import cell_params, cell_settings_key, cell_tags
from pipeline.checks import check_experts
from pipeline.layout import (
    buffer_dir,
    convex_dir,
    distill_checkpoint_dir,
    distill_dir,
    distill_timing_file,
    init_file,
)
from pipeline.modelling import eval_spec, student
from pipeline.outputs import claim_outputs
from pipeline.params import Params
from pipeline.prepared import Prepared, load_prepared, resolve_device

log = logging.getLogger(__name__)
SERIES = ("loss", "matching_loss", "inner_loss", "inner_loss_balanced", "syn_lr", "start_epoch", "start_bound",
          "threshold_skipped", "image_rms", "seconds")
WALL_CLOCK = ("seconds",)  # history fields a rerun cannot reproduce: MLflow only, never a DVC output


def discard_mismatched_checkpoint(config: DistillConfig, folder: Path) -> None:
    """A checkpoint from other settings cannot be resumed: start this cell over instead of failing."""
    checkpoint = DistillCheckpoint(folder)
    if checkpoint.differing_settings(config):
        log.info("settings changed since %s was written: starting this cell from scratch", checkpoint.path)
        checkpoint.remove()


def check_buffer_matches(trajectories: list, flat_model: FlatModel, folder: Path) -> None:
    """Experts must have the student's parameter count (same dataset shape, architecture and width)."""
    for index, trajectory in enumerate(trajectories):
        if trajectory.num_params != flat_model.num_params:
            raise ValueError(f"expert {index} in {folder} has {trajectory.num_params} parameters but the student "
                             f"({flat_model.num_params}) does not match: the buffer comes from another dataset, "
                             "architecture or width; rerun the buffer stage")


def run(params: Params, method: str, ipc: int, seed: int) -> None:
    """Distil one cell; as one of `distill.devices` ranks (pipeline.ranks), rank 0 alone writes."""
    device = resolve_device(params.device)
    shard, device = ranks.join(device) if ranks.is_rank() else (None, device)
    try:
        if shard is None or shard.rank == 0:
            distil_and_write(params, method, ipc, seed, device, shard)
        else:
            distil_cell(params, method, ipc, seed, device, shard)
    finally:
        ranks.leave()


def distil_cell(params: Params, method: str, ipc: int, seed: int, device: torch.device,
                shard: BatchShard | None) -> tuple[Prepared, DatasetSplits, DistillResult]:
    """The prepared data (test split sealed), and the cell's run from its initial set on its experts."""
    chosen = params.distill.configs[method]
    prepared = load_prepared(params)
    data = prepared.data.without_test("the distill stage selects sets on the validation split only")
    trajectories = [t.to(device) for t in load_trajectories(params, chosen.buffer, chosen.mct_anchors)]
    init = initial_images(params, chosen.init, ipc, seed, data)
    checkpoints = distill_checkpoint_dir(method, ipc, seed, cell_settings_key(params, method, ipc, seed))
    result = distill_set(params, params.distill_config(method, ipc, seed=seed), trajectories, init, data, device,
                         checkpoints, buffer_dir(chosen.buffer), shard=shard)
    return prepared, data, result


def distil_and_write(params: Params, method: str, ipc: int, seed: int, device: torch.device,
                     shard: BatchShard | None) -> None:
    """Distil the cell and write its outputs and MLflow run."""
    config = params.distill_config(method, ipc, seed=seed)
    chosen = params.distill.configs[method]
    out = distill_dir(method, ipc, seed)
    checkpoints = distill_checkpoint_dir(method, ipc, seed, cell_settings_key(params, method, ipc, seed))
    claim_outputs([out], [checkpoints, distill_timing_file(method, ipc, seed).parent])
    with tracking.stage_run("distill", params.tracking.experiment, f"distill-{method}-ipc{ipc}-s{seed}",
                            cell_params(params, method, ipc, seed), cell_tags(params, method, ipc, seed)) as tracker:
        prepared, data, result = distil_cell(params, method, ipc, seed, device, shard)
        best_images = result.best.images if result.best else result.images
        best_lr = result.best.syn_lr if result.best else result.syn_lr
        tensors = {"images": best_images.cpu().contiguous(), "final_images": result.images.cpu().contiguous(),
                   "labels": result.labels.cpu().contiguous(), "syn_lr": torch.tensor([best_lr]),
                   "final_syn_lr": torch.tensor([result.syn_lr])}
        figures = ["grid.png", "final_grid.png"]
        best_logits = None
        if result.label_logits is not None:
            best_logits = result.best.label_logits if result.best else result.label_logits
            tensors |= {"label_logits": best_logits.cpu().contiguous(),
                        "final_label_logits": result.label_logits.cpu().contiguous()}
            plot_soft_labels(torch.softmax(best_logits, dim=1), result.labels, out / "soft_labels.png",
                             f"{method} ipc {ipc} seed {seed}: learned soft labels")
            figures.append("soft_labels.png")
        atomic_write_safetensors(out / "synthetic.safetensors", tensors)
        pixels = prepared.to_pixels(best_images)
        export_mtt_set(out / "mtt", best_images, best_logits if best_logits is not None else result.labels, best_lr,
                       pixels)
        export_image_folder(out / "images", pixels, result.labels.cpu(), data.info.class_names)
        for name, shown in (("grid.png", pixels), ("final_grid.png", prepared.to_pixels(result.images))):
            save_image_grid(shown, result.labels.cpu(), out / name, data.info.num_classes)
        atomic_write_csv(out / "history.csv", untimed(result.history))
        atomic_write_csv(out / "validation.csv", result.validation, columns=("iteration", "val_acc"))
        history = result.history
        distilled = result.best is not None and result.best.distilled
        summary = {"method": method, "ipc": ipc, "seed": seed, "distilled": distilled,
                   "best_iteration": result.best.iteration if result.best else None,
                   "best_val_acc": result.best.val_acc if result.best else None,
                   "initial_val_acc": next((r["val_acc"] for r in result.validation if r["iteration"] == 0), None),
                   "syn_lr": best_lr, "final_syn_lr": result.syn_lr,
                   "iterations": config.iterations, "skipped_iterations": int(sum(r["skipped"] for r in history)),
                   "threshold_skipped_iterations": int(sum(r["threshold_skipped"] for r in history)),
                   "soft_labels": config.soft_labels,
                   "init": chosen.init, "buffer": chosen.buffer, "mct_anchors": chosen.mct_anchors,
                   "validation_seeds": params.validation_seeds}
        atomic_write_json(out / "result.json", summary)
        timing = {"seconds_per_iteration": sum(r["seconds"] for r in history) / len(history)}
        atomic_write_json(distill_timing_file(method, ipc, seed), timing)
        tracker.log_series(result.history, SERIES, "iteration")
        tracker.log_series(result.validation, ["val_acc"], "iteration")
        tracker.log_metrics({**{k: v for k, v in summary.items() if isinstance(v, int | float) and k != "ipc"},
                             **timing})
        tracker.log_artifacts([out / name for name in (*figures, "history.csv", "validation.csv", "result.json")])
        # DVC reruns a finished cell only when a dependency changed: resuming would hand back the old result
        DistillCheckpoint(checkpoints).remove()
        if distilled:
            log.info("distilled %s ipc %d seed %d: best val acc %s at iteration %s", method, ipc, seed,
                     summary["best_val_acc"], summary["best_iteration"])
        else:
            log.warning("NOT distilled: %s ipc %d seed %d kept its initial set (validation %s at iteration 0 was "
                        "never beaten); result.json says distilled: false", method, ipc, seed, summary["best_val_acc"])


def untimed(history: list[dict[str, float]]) -> list[dict[str, float]]:
    """History rows without their wall-clock fields (`WALL_CLOCK`)."""
    return [{k: v for k, v in row.items() if k not in WALL_CLOCK} for row in history]


def validation_evaluator(params: Params, data: DatasetSplits, device: torch.device,
                         shard: BatchShard | None = None) -> Evaluator:
    """Validation accuracy of a synthetic set (model selection; never the test split): networks of seeds
    `Params.validation_seeds`, trained on its hard labels or its soft labels' probabilities. Over several ranks,
    network k trains on rank k mod R and every rank gets the mean of all."""
    spec = eval_spec(params, "val")

    def validation_accuracy(images: torch.Tensor, labels: torch.Tensor, lr: float) -> float:
        if shard is None:
            return evaluate_synthetic(images, labels, lr, data, spec, seed=params.validation_seeds[0],
                                      device=str(device)).mean
        one = dataclasses.replace(spec, num_models=1)
        mine = {network: evaluate_synthetic(images, labels, lr, data, one, seed=network, device=str(device)).mean
                for network in params.validation_seeds[shard.rank::shard.world]}
        return statistics.fmean(value for _, value in sorted(shard.gather(mine).items()))
    return validation_accuracy


def distill_set(params: Params, config: DistillConfig, trajectories: list, init: SyntheticInit,
                data: DatasetSplits, device: torch.device, checkpoints: Path, source: Path,
                progress: bool = True, shard: BatchShard | None = None) -> DistillResult:
    """Run (or resume) one distillation from `init` on `trajectories`, keeping the best set on validation."""
    flat_model = FlatModel(student(params, data.info).to(device))
    check_buffer_matches(trajectories, flat_model, source)
    writer = shard is None or shard.rank == 0
    if writer:
        discard_mismatched_checkpoint(config, checkpoints)
    if shard is not None:  # every rank resumes from the checkpoint rank 0 kept
        shard.barrier()
    logits = (expert_label_logits(flat_model, trajectories, init.images.to(device), init.labels)
              if config.soft_labels else None)
    distiller = Distiller(config, trajectories, flat_model, init.images, init.labels, device=device,
                          checkpoint_dir=checkpoints, checkpoint_every=params.distill.checkpoint_every,
                          evaluator=validation_evaluator(params, data, device, shard),
                          eval_every=params.distill.eval_every, label_logits=logits, shard=shard)
    return distiller.run(progress=progress and writer)


def load_trajectories(params: Params, variant: str, mct_anchors: int | None) -> list:
    """The variant's plain experts, or their `mct_anchors`-anchor convexified copies (convexify stage); as many
    as distill.num_experts asks for (`check_experts`)."""
    check_experts(params, variant, mct_anchors)
    if mct_anchors is None:
        return load_buffer(buffer_dir(variant), None, params.distill.num_experts)
    return load_buffer(convex_dir(variant), convex_tag(mct_anchors, params.buffer.mct_beta), params.distill.num_experts)


def initial_images(params: Params, init: str, ipc: int, seed: int, data: DatasetSplits) -> SyntheticInit:
    """The method's starting set: representative indices from the init stage, random real, or noise."""
    if init == "representative":
        path = init_file(ipc)
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: run the init stage first")
        indices = torch.tensor(json.loads(path.read_text())["indices"], dtype=torch.long)
        return SyntheticInit(data.train_x[indices].clone(), data.train_y[indices], indices)
    return initial_synthetic_set(init, data.train_x, data.train_y, data.info.num_classes, ipc,
                                 seed=seed)
