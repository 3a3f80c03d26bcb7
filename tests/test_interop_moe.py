"""Interop: gptqmodel's own loader (GPTQModel.load, with defuser turning transformers 5's fused
experts into per-expert quantized linears) loads our GPTQ and AWQ Mixture-of-Experts checkpoints
(per-expert 2D names; AWQ: routers in ``modules_to_not_convert``), and `quantize check` passes on
them, for every MoE family.

transformers' ``from_pretrained`` with gptqmodel 7.6 does not: it keeps the fused experts and leaves
the per-expert GPTQ/AWQ tensors unloaded (randomly initialised experts), so `quantize check` runs
only gptqmodel on MoE GPTQ/AWQ outputs and reports transformers as unsupported there (asserted below).

Runs in the interop environment (``make interop``: .venv-interop); skipped elsewhere.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")

pytestmark = pytest.mark.interop

pytest.importorskip("gptqmodel", reason="interop tier: needs gptqmodel (.venv-interop: scripts/setup_interop.sh, `make interop`)")

from quantize.check import check_output  # noqa: E402
from quantize.check.runner import run_transformers  # noqa: E402
from quantize.commands.awq import quantize_awq  # noqa: E402
from quantize.testing import MOE_FAMILIES  # noqa: E402

from helpers import CPU, run_gptq  # noqa: E402


# Mixtral: we write the original release's names (block_sparse_moe.experts.{e}.w1/w3/w2: what vLLM's
# Mixtral loader maps and transformers' conversion mapping reads); gptqmodel 7.6 under transformers 5
# looks for its renamed layout (mlp.experts.{e}.gate_proj/up_proj/down_proj.qweight) and refuses them
# (GPTQ), or reports our tensors as "not used" and runs its uninitialised experts (AWQ: non-finite logits).
GPTQMODEL_NAMES = pytest.mark.xfail(strict=True, reason="gptqmodel 7.6 expects transformers 5's renamed Mixtral "
                                    "expert names, not the release's block_sparse_moe.experts.*.w1/w3/w2")
CASES = [pytest.param(f, marks=GPTQMODEL_NAMES) if f == "mixtral" else f for f in MOE_FAMILIES]


@pytest.mark.parametrize("family", CASES)
@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_gptqmodel_loads_our_moe_output_and_check_passes(method, family, tiny_model_dir, calib_for, tmp_path):
    model = tiny_model_dir(family, dtype=torch.bfloat16)
    out = tmp_path / "q"
    if method == "gptq":
        run_gptq(model, calib_for(model), out, static_groups=True)
    else:
        quantize_awq(model_dir=model, calibration=calib_for(model), out=out, exec_cfg=CPU, group_size=32)
    fmt, engines, records = check_output(out, "gptqmodel")  # vLLM: tests/test_interop_vllm.py
    assert (fmt, engines) == (method, ["gptqmodel"])
    (rec,) = records
    assert rec.verdict == "pass", rec
    assert rec.figures.top1 >= 0.9 and rec.figures.rel < 0.02, rec.figures
    status, reason, _ = run_transformers(out, [[5, 17, 300]])
    assert status == "unsupported" and "gptqmodel" in reason
