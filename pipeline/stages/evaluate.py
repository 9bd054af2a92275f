"""Stage `evaluate`: test accuracy of one distilled set (mean ± sample std over fresh networks, docs/method.md
section 5).

The set evaluated is the one selected on the validation split during distillation; the test split is used
here only, for the final report, by networks of seeds `Params.test_seeds` (`evaluate.seed` onwards), which no
selection network shares, and which also score every baseline (so each comparison is paired network by
network). Every architecture in `evaluate.archs` is trained on the same set
(cross-architecture transfer, AST Table IV). ``metrics.json`` holds only the numbers to compare, under keys
unique across the pipeline (``<method>_ipc<k>_s<seed>.<arch>.mean``), so `dvc exp show` and `dvc metrics diff` list
them as plain columns; ``results.json`` holds the details (each network's accuracy, the protocol) for the report.

A set with learned soft labels (DATM) is scored twice on the same networks: with its soft labels (soft
cross-entropy, the method's own evaluation: ``results``) and with the hard class labels of the same images
(``hard_label_results``, metric ``<arch>_hard_labels``), because soft labels carry information that a
hard-label baseline does not get (DD-Ranking's fairness point).
"""

from __future__ import annotations

import json
import logging

import torch
from safetensors.torch import load_file

from ast_core.evaluate import evaluate_synthetic
from ast_core.io import atomic_write_json
from ast_core.machine import describe_machine
from pipeline import tracking
from pipeline.cells import cell_params, cell_tags, metric_key, protocol_note, scores
from pipeline.layout import distill_dir, evaluate_dir
from pipeline.modelling import eval_spec
from pipeline.outputs import claim_outputs
from pipeline.params import Params
from pipeline.prepared import load_prepared, resolve_device
from pipeline.schema import to_mapping

log = logging.getLogger(__name__)


def comparison_metrics(params: Params, method: str, ipc: int, seed: int,
                       results: dict[str, dict]) -> dict[str, float | None]:
    """The same names in every experiment: ``test_acc`` (the student architecture's, else the first evaluated)
    and the distilled set's ``best_val_acc`` (from the distill stage's result.json)."""
    arch = params.model.arch if params.model.arch in results else params.evaluate.archs[0]
    summary = distill_dir(method, ipc, seed) / "result.json"
    val_acc = json.loads(summary.read_text()).get("best_val_acc") if summary.is_file() else None
    return {"test_acc": results[arch]["mean"], "best_val_acc": val_acc}


def run(params: Params, method: str, ipc: int, seed: int) -> None:
    device = resolve_device(params.device)
    source = distill_dir(method, ipc, seed) / "synthetic.safetensors"
    if not source.is_file():
        raise FileNotFoundError(f"{source} is missing: run `ast-dd distill --method {method} --ipc {ipc} "
                                f"--seed {seed}` first")
    out = evaluate_dir(method, ipc, seed)
    claim_outputs([out / "results.json"], [out])
    with tracking.stage_run("evaluate", params.tracking.experiment, f"evaluate-{method}-ipc{ipc}-s{seed}",
                            {**cell_params(params, method, ipc, seed), "evaluate": to_mapping(params.evaluate)},
                            cell_tags(params, method, ipc, seed)) as tracker:
        data = load_prepared(params).data
        synthetic = load_file(str(source))
        lr = float(synthetic["syn_lr"][0])
        label_sets = {"": synthetic["labels"]}
        if "label_logits" in synthetic:  # soft first (the method's own score), then the hard labels
            label_sets = {"": torch.softmax(synthetic["label_logits"], dim=1), "_hard_labels": synthetic["labels"]}
        results: dict[str, dict[str, dict]] = {suffix: {} for suffix in label_sets}
        scalars = {}
        for arch in params.evaluate.archs:
            for suffix, labels in label_sets.items():
                result = evaluate_synthetic(synthetic["images"], labels, lr, data, eval_spec(params, "test", arch),
                                            seed=params.test_seeds[0], device=str(device),
                                            progress=f"evaluate {method} ipc{ipc} s{seed} on {arch}{suffix}")
                results[suffix][arch], scalars[arch + suffix] = result.as_dict(), scores(result)
                tracker.log_metrics({f"test_acc_{arch}{suffix}_mean": result.mean,
                                     f"test_acc_{arch}{suffix}_std": result.std})
                log.info("%s ipc %d seed %d on %s%s: %.2f ± %.2f", method, ipc, seed, arch, suffix, result.mean,
                         result.std)
        tracker.log_metrics(comparison_metrics(params, method, ipc, seed, results[""]))
        details = {"method": method, "ipc": ipc, "seed": seed, "syn_lr": lr, "protocol": protocol_note(params),
                   "test_seeds": params.test_seeds, "validation_seeds": params.validation_seeds,
                   "machine": describe_machine(str(device)), "soft_labels": len(label_sets) > 1,
                   "results": results[""]}
        if "_hard_labels" in results:
            details["hard_label_results"] = results["_hard_labels"]
        atomic_write_json(out / "results.json", details)
        atomic_write_json(out / "metrics.json", {metric_key(method, ipc, seed): {**scalars, "syn_lr": lr}})
        tracker.log_artifacts([out / "results.json", out / "metrics.json"])
