"""Stage `init`: representative-initialisation indices per ipc (AST IV-C1) and the 2-D PCA picture (Fig. 10)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from sklearn.decomposition import PCA
from tqdm.auto import tqdm

from ast_core.init import initial_synthetic_set
from ast_core.io import atomic_write_json
from ast_core.viz import plot_scatter_2d
from pipeline import tracking
from pipeline.layout import INIT, init_file
from pipeline.modelling import expert_features, final_expert
from pipeline.outputs import claim_outputs
from pipeline.params import Params
from pipeline.prepared import load_prepared, resolve_device
from pipeline.schema import to_mapping

log = logging.getLogger(__name__)


def run(params: Params) -> None:
    claim_outputs([INIT])
    device = resolve_device(params.device)
    with tracking.stage_run("init", params.tracking.experiment, "init",
                            {"init": to_mapping(params.init), "ipcs": list(params.distill.ipcs)}) as tracker:
        data = load_prepared(params).data
        expert = final_expert(params, data.info, params.init.buffer, params.init.expert_index, device)
        features = expert_features(expert, data.train_x, device, "init: expert features")
        outputs = []
        ipcs = tqdm(params.distill.ipcs, desc="init: k-means per ipc", unit="ipc")
        for ipc in ipcs:
            ipcs.set_postfix_str(f"ipc {ipc}")
            args = (data.train_x, data.train_y, data.info.num_classes, ipc)
            chosen = initial_synthetic_set("representative", *args, seed=params.seed, features=features)
            random = initial_synthetic_set("real", *args, seed=params.seed)
            atomic_write_json(init_file(ipc), {"ipc": ipc, "buffer": params.init.buffer,
                                               "expert_index": params.init.expert_index,
                                               "indices": chosen.source_indices.tolist(),
                                               "random_indices": random.source_indices.tolist()})
            picture = INIT / f"ipc{ipc}_pca.png"
            pca_picture(features, data.train_y, chosen.source_indices, random.source_indices,
                        params.init.plot_classes, picture, ipc)
            outputs += [init_file(ipc), picture]
        tracker.log_artifacts(outputs)
        log.info("representative initialisation written for ipc %s", list(params.distill.ipcs))


def pca_picture(features: torch.Tensor, labels: torch.Tensor, chosen: torch.Tensor, random: torch.Tensor,
                classes: int, path: Path, ipc: int) -> None:
    """Expert features of the first `classes` classes in 2-D (PCA), representative vs random picks."""
    shown = torch.nonzero(labels < classes).flatten()
    points = torch.from_numpy(PCA(n_components=2, random_state=0).fit_transform(features[shown].double().numpy()))
    position = torch.full((len(labels),), -1, dtype=torch.long)
    position[shown] = torch.arange(len(shown))
    picks = position[chosen[labels[chosen] < classes]]
    plot_scatter_2d(points, labels[shown], path, highlight=picks, highlight_label="representative (k-means)",
                    title=f"expert features, PCA (ipc {ipc}); random picks: x",
                    extra=position[random[labels[random] < classes]], extra_label="random real")
