"""Stage `prepare`: decode the dataset once into cached tensors, fit ZCA, save a picture of real images."""

from __future__ import annotations

import logging

import torch

from ast_core.io import atomic_write_json
from ast_core.viz import save_image_grid
from pipeline import tracking
from pipeline.layout import PREPARE
from pipeline.outputs import claim_outputs
from pipeline.params import Params
from pipeline.prepared import Prepared, fit_and_save_zca, load_raw
from pipeline.schema import to_mapping

log = logging.getLogger(__name__)


def run(params: Params) -> None:
    claim_outputs([PREPARE])
    with tracking.stage_run("prepare", params.tracking.experiment, "prepare",
                            {"data": to_mapping(params.data), "seed": params.seed}) as tracker:
        data = load_raw(params, download=True)
        zca = fit_and_save_zca(params, data) if params.data.zca else None
        info = {**to_mapping(data.info), "train": len(data.train_y), "val": len(data.val_y),
                "test": len(data.test_y), "zca": params.data.zca}
        atomic_write_json(PREPARE / "info.json", info)
        per_class = [torch.nonzero(data.train_y == c).flatten()[:10] for c in range(data.info.num_classes)]
        index = torch.cat(per_class)
        grid = PREPARE / "real_samples.png"
        save_image_grid(Prepared(data, None).to_pixels(data.train_x[index]), data.train_y[index], grid,
                        data.info.num_classes)
        tracker.log_metrics({"train_size": info["train"], "val_size": info["val"], "test_size": info["test"]})
        tracker.log_artifacts([PREPARE / "info.json", grid])
        log.info("prepared %s: %d train / %d val / %d test, zca=%s", data.info.name, info["train"], info["val"],
                 info["test"], zca is not None)
