"""`ast-dd score PATH`: any distilled set (MTT-format tensors or an ImageFolder) under the project's protocol.

The set is trained on by the test networks of the pipeline (seeds `Params.test_seeds`, every architecture in
`evaluate.archs`, `evaluate.protocol`) and scored on the test split, beside the random and k-means real subsets
of the same size scored by the same networks, so the comparison is paired network by network. A set with soft
labels (float ``labels_best.pt``: logits, as DATM saves them) is also scored with the argmax of its labels.
Results go to ``artifacts/scores/<name>/results.json`` and to MLflow (a `score` run); the set's lr is its
``lr_best.pt``, else `--lr`, else the experts' lr (`buffer.variants.<init.buffer>.lr`, as the baselines use).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import Tensor

from ast_core.baselines import select_coreset
from ast_core.evaluate import evaluate_synthetic
from ast_core.field_files import MTT_SET_FILES, load_image_folder, load_mtt_set
from ast_core.io import atomic_write_json
from ast_core.machine import describe_machine
from pipeline import tracking
from pipeline.cells import protocol_note
from pipeline.layout import ARTIFACTS
from pipeline.modelling import eval_spec, expert_features, final_expert
from pipeline.params import Params
from pipeline.prepared import Prepared, load_prepared, resolve_device

log = logging.getLogger(__name__)
SCORES = ARTIFACTS / "scores"


def read_set(path: Path, prepared: Prepared) -> tuple[Tensor, Tensor, float | None, str]:
    """(images in the networks' input space, labels, lr or None, format) of an MTT folder or an ImageFolder."""
    info = prepared.data.info
    shape = (info.channels, info.image_size, info.image_size)
    if (path / MTT_SET_FILES[0]).is_file():
        images, labels, lr = load_mtt_set(path, info.num_classes, shape)
        return images, labels, lr, "mtt"
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is neither a folder with {', '.join(MTT_SET_FILES)} nor an ImageFolder")
    pixels, labels = load_image_folder(path, info.class_names, shape)
    return prepared.from_pixels(pixels), labels, None, "imagefolder"


def per_class(labels: Tensor, num_classes: int) -> int | None:
    """Images per class when every class has the same number (a subset of that ipc can be drawn), else None."""
    hard = labels.argmax(dim=1) if labels.is_floating_point() else labels
    counts = torch.bincount(hard, minlength=num_classes)
    return int(counts[0]) if bool((counts == counts[0]).all()) and int(counts[0]) > 0 else None


class Scorer:
    """Scores sets on one architecture with the pipeline's test networks, logging each to MLflow."""

    def __init__(self, params: Params, prepared: Prepared, arch: str, device: torch.device,
                 tracker: tracking.StageRun) -> None:
        self.params, self.data, self.arch, self.device, self.tracker = params, prepared.data, arch, device, tracker
        self.spec = eval_spec(params, "test", arch)

    def __call__(self, images: Tensor, labels: Tensor, lr: float, label: str) -> dict:
        result = evaluate_synthetic(images, labels, lr, self.data, self.spec, seed=self.params.test_seeds[0],
                                    device=str(self.device), progress=f"score {label} on {self.arch}")
        self.tracker.log_metrics({f"test_acc_{label}_{self.arch}_mean": result.mean,
                                  f"test_acc_{label}_{self.arch}_std": result.std})
        log.info("%s on %s: %.2f ± %.2f", label, self.arch, result.mean, result.std)
        return result.as_dict()


def run(params: Params, path: Path, name: str, lr: float | None) -> dict:
    device = resolve_device(params.device)
    prepared = load_prepared(params)
    data = prepared.data
    images, labels, stored_lr, kind = read_set(path, prepared)
    experts_lr = params.buffer.variant(params.init.buffer).lr
    set_lr = stored_lr or lr or experts_lr
    ipc = per_class(labels, data.info.num_classes)
    label_sets = {"": labels}
    if labels.is_floating_point():
        label_sets["_hard_labels"] = labels.argmax(dim=1)
    subsets: dict[str, Tensor] = {}
    if ipc is not None:
        subsets["random"] = select_coreset("random", data.train_x, data.train_y, data.info.num_classes, ipc,
                                           seed=params.seed)
        expert = final_expert(params, data.info, params.init.buffer, params.init.expert_index, device)
        features = expert_features(expert, data.train_x, device, "score: expert features")
        subsets["kmeans"] = select_coreset("kmeans", data.train_x, data.train_y, data.info.num_classes, ipc,
                                           features=features, seed=params.seed)
    else:
        log.warning("%s has unequal class counts: no real subset of the same size to compare with", path)
    out = SCORES / name
    with tracking.stage_run("score", params.tracking.experiment, f"score-{name}",
                            {"path": str(path), "format": kind, "images": len(images), "ipc": ipc, "lr": set_lr},
                            {"score": name}) as tracker:
        results: dict[str, dict] = {}
        for arch in params.evaluate.archs:
            score = Scorer(params, prepared, arch, device, tracker)
            results[arch] = {f"set{suffix}": score(images, y, set_lr, f"set{suffix}")
                             for suffix, y in label_sets.items()}
            results[arch] |= {subset: score(data.train_x[index], data.train_y[index], experts_lr, subset)
                              for subset, index in subsets.items()}
        details = {"path": str(path), "format": kind, "images": len(images), "ipc": ipc, "lr": set_lr,
                   "soft_labels": labels.is_floating_point(), "protocol": protocol_note(params),
                   "test_seeds": params.test_seeds, "machine": describe_machine(str(device)), "results": results}
        atomic_write_json(out / "results.json", details)
        tracker.log_artifacts([out / "results.json"])
    return details
