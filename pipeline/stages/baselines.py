"""Stage `baselines`: coreset baselines (random, herding, k-center, k-means) and full-data training.

Same evaluation protocol and the same test networks (seeds `Params.test_seeds`) as the distilled sets, so each
comparison with a distilled set is paired network by network, with lr = the lr of the experts the features come from
(`buffer.variants.<init.buffer>.lr`: real images are trained like the experts were), features from the init
stage's expert (`init.buffer`, `init.expert_index`). ``metrics.json`` holds one scalar key per subset and
architecture (``<subset>_ipc<k>.<arch>.mean``, ``full_data.<arch>.mean``) for `dvc exp show` and
`dvc metrics diff`; ``results.json`` holds the details for the report.
"""

from __future__ import annotations

import dataclasses
import logging

from tqdm.auto import tqdm

from ast_core.baselines import select_coreset
from ast_core.evaluate import evaluate_synthetic, train_on_real
from ast_core.io import atomic_write_json
from ast_core.machine import describe_machine
from pipeline import tracking
from pipeline.cells import metric_key, protocol_note, scores
from pipeline.layout import BASELINES
from pipeline.modelling import eval_spec, expert_features, final_expert
from pipeline.outputs import claim_outputs
from pipeline.params import Params
from pipeline.prepared import load_prepared, resolve_device
from pipeline.schema import to_mapping

log = logging.getLogger(__name__)


def run(params: Params) -> None:
    claim_outputs([BASELINES / "results.json"], [BASELINES])
    device = resolve_device(params.device)
    ev, arch = params.evaluate, params.model.arch
    with tracking.stage_run("baselines", params.tracking.experiment, "baselines",
                            {"evaluate": to_mapping(ev), "ipcs": list(params.distill.ipcs),
                             "model": to_mapping(params.model)}) as tracker:
        data = load_prepared(params).data
        expert = final_expert(params, data.info, params.init.buffer, params.init.expert_index, device)
        features = expert_features(expert, data.train_x, device, "baselines: expert features")
        lr = params.buffer.variant(params.init.buffer).lr
        spec = eval_spec(params, "test")
        rows, scalars = [], {}
        subsets = tqdm([(method, ipc) for ipc in params.distill.ipcs for method in ev.baselines],
                       desc="baselines", unit="subset")
        for method, ipc in subsets:
            subsets.set_postfix_str(f"{method} ipc{ipc}")
            index = select_coreset(method, data.train_x, data.train_y, data.info.num_classes, ipc,
                                   features=features, seed=params.seed)
            result = evaluate_synthetic(data.train_x[index], data.train_y[index], lr, data, spec,
                                        seed=params.test_seeds[0], device=str(device),
                                        progress=f"baseline {method} ipc{ipc}")
            rows.append({"method": method, "ipc": ipc, **result.as_dict()})
            scalars[metric_key(method, ipc)] = {arch: scores(result)}
            tracker.log_metrics({f"{method}_ipc{ipc}_mean": result.mean, f"{method}_ipc{ipc}_std": result.std})
            log.info("baseline %s ipc %d: %.2f ± %.2f", method, ipc, result.mean, result.std)
        full = None
        if ev.full_data_epochs:
            result = train_on_real(data, dataclasses.replace(spec, num_models=1), epochs=ev.full_data_epochs,
                                   lr=lr, seed=params.test_seeds[0], device=str(device),
                                   progress="full training split")
            full, scalars["full_data"] = result.as_dict(), {arch: scores(result)}
            tracker.log_metrics({"full_data_mean": result.mean})
        details = {"protocol": protocol_note(params), "test_seeds": params.test_seeds,
                   "machine": describe_machine(str(device)), "coresets": rows, "full_data": full}
        atomic_write_json(BASELINES / "results.json", details)
        atomic_write_json(BASELINES / "metrics.json", scalars)
        tracker.log_artifacts([BASELINES / "results.json", BASELINES / "metrics.json"])
