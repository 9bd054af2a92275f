"""Stage `convexify`: MCT's convexified copies of one variant's experts (docs/method.md section 3).

Its own stage so that changing `buffer.mct_anchors` or `buffer.mct_beta` re-convexifies the stored experts in
seconds instead of retraining them, and `dvc exp` ablations over anchors reuse the trained experts. Writes
``artifacts/convex/<variant>/expert_XXX.<tag>.safetensors`` (tag ``mct<n>``, ``mct<n>u`` for uniform β) and
``sizes.json`` (bytes of the plain buffer and of each convexified form: the storage claim of MCT).
"""

from __future__ import annotations

import shutil

from ast_core.io import atomic_write_json
from ast_core.trajectory import convex_tag, convexify_buffer, list_buffer, storage_dtype
from pipeline import tracking
from pipeline.layout import buffer_dir, convex_dir
from pipeline.outputs import claim_outputs
from pipeline.params import Params
from pipeline.schema import ParamsError


def run(params: Params, variant: str) -> None:
    if variant not in params.buffer.train:
        raise ParamsError(f"--variant: {variant!r} is not in buffer.train ({', '.join(params.buffer.train)})")
    source, out = buffer_dir(variant), convex_dir(variant)
    claim_outputs([out])
    logged = {"variant": variant, "mct_anchors": list(params.buffer.mct_anchors), "mct_beta": params.buffer.mct_beta,
              "storage_dtype": params.buffer.storage_dtype}
    with tracking.stage_run("convexify", params.tracking.experiment, f"convexify-{variant}", logged,
                            {"variant": variant}) as tracker:
        if not list_buffer(source)[: params.buffer.num_experts]:
            raise FileNotFoundError(f"no experts in {source}: run the buffer stage (ast-dd buffer --variant "
                                    f"{variant}) first")
        shutil.rmtree(out, ignore_errors=True)  # only the forms asked for now, never stale ones
        sizes = {"plain": sum(p.stat().st_size for p in list_buffer(source)[: params.buffer.num_experts])}
        for anchors in params.buffer.mct_anchors:
            written = convexify_buffer(source, num_anchors=anchors, beta=params.buffer.mct_beta,
                                       dtype=storage_dtype(params.buffer.storage_dtype), overwrite=True, out_dir=out,
                                       limit=params.buffer.num_experts)
            sizes[convex_tag(anchors, params.buffer.mct_beta)] = sum(p.stat().st_size for p in written)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "sizes.json", sizes)
        tracker.log_metrics({f"bytes_{key}": value for key, value in sizes.items()})
