"""Stage `evaluate`: test accuracy of one distilled set (mean ± std over fresh networks, docs/method.md section 5).

The set evaluated is the one selected on the validation split during distillation; the test split is used
here only, for the final report. Every architecture in `evaluate.archs` is trained on the same set
(cross-architecture transfer, AST Table IV). ``metrics.json`` holds only the numbers to compare, under keys
unique across the pipeline (``<method>_ipc<k>.<arch>.mean``), so `dvc exp show` and `dvc metrics diff` list
them as plain columns; ``results.json`` holds the details (each network's accuracy, the protocol) for the report.
"""

from __future__ import annotations

import json
import logging

from safetensors.torch import load_file

from ast_core.evaluate import EvalResult, evaluate_synthetic
from ast_core.io import atomic_write_json
from pipeline import tracking
from pipeline.layout import distill_dir, evaluate_dir
from pipeline.modelling import eval_spec
from pipeline.outputs import claim_outputs
from pipeline.params import Params
from pipeline.prepared import load_prepared, resolve_device
from pipeline.schema import to_mapping
from pipeline.stages.distill import cell_params, cell_tags

log = logging.getLogger(__name__)


def protocol_note(params: Params) -> str:
    ev = params.evaluate
    unit = "iterations, lr halved at half (AST)" if ev.protocol == "ast" else "epochs, lr x0.1 at half (MTT)"
    return (f"test accuracy, mean ± std over {ev.num_models} fresh networks trained {ev.iterations} {unit}, "
            f"SGD momentum 0.9, wd 5e-4, batch {ev.batch_size}, DSA; set chosen on the validation split")


def comparison_metrics(params: Params, method: str, ipc: int, results: dict[str, dict]) -> dict[str, float | None]:
    """The same names in every experiment: ``test_acc`` (the student architecture's, else the first evaluated)
    and the distilled set's ``best_val_acc`` (from the distill stage's result.json)."""
    arch = params.model.arch if params.model.arch in results else params.evaluate.archs[0]
    summary = distill_dir(method, ipc) / "result.json"
    val_acc = json.loads(summary.read_text()).get("best_val_acc") if summary.is_file() else None
    return {"test_acc": results[arch]["mean"], "best_val_acc": val_acc}


def metric_key(name: str, ipc: int) -> str:
    """The metrics key of a set: ``<method or subset>_ipc<k>``."""
    return f"{name}_ipc{ipc}"


def scores(result: EvalResult) -> dict[str, float]:
    """Test accuracy of one evaluation as DVC metrics (scalars only)."""
    return {"mean": result.mean, "std": result.std}


def run(params: Params, method: str, ipc: int) -> None:
    device = resolve_device(params.device)
    source = distill_dir(method, ipc) / "synthetic.safetensors"
    if not source.is_file():
        raise FileNotFoundError(f"{source} is missing: run `ast-dd distill --method {method} --ipc {ipc}` first")
    claim_outputs([evaluate_dir(method, ipc) / "results.json"], [evaluate_dir(method, ipc)])
    with tracking.stage_run("evaluate", params.tracking.experiment, f"evaluate-{method}-ipc{ipc}",
                            {**cell_params(params, method, ipc), "evaluate": to_mapping(params.evaluate)},
                            cell_tags(params, method, ipc)) as tracker:
        data = load_prepared(params).data
        synthetic = load_file(str(source))
        lr = float(synthetic["syn_lr"][0])
        results, scalars = {}, {}
        for arch in params.evaluate.archs:
            result = evaluate_synthetic(synthetic["images"], synthetic["labels"], lr, data,
                                        eval_spec(params, "test", arch), seed=params.seed, device=str(device),
                                        progress=f"evaluate {method} ipc{ipc} on {arch}")
            results[arch], scalars[arch] = result.as_dict(), scores(result)
            tracker.log_metrics({f"test_acc_{arch}_mean": result.mean, f"test_acc_{arch}_std": result.std})
            log.info("%s ipc %d on %s: %.2f ± %.2f", method, ipc, arch, result.mean, result.std)
        tracker.log_metrics(comparison_metrics(params, method, ipc, results))
        details = {"method": method, "ipc": ipc, "syn_lr": lr, "protocol": protocol_note(params), "results": results}
        out = evaluate_dir(method, ipc)
        atomic_write_json(out / "results.json", details)
        atomic_write_json(out / "metrics.json", {metric_key(method, ipc): {**scalars, "syn_lr": lr}})
        tracker.log_artifacts([out / "results.json", out / "metrics.json"])
