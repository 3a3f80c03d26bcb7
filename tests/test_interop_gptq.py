"""Interop: our GPTQ checkpoints load in transformers through GPTQModel/optimum and compute what our
read-back computes.

Runs only in the interop environment (``make interop``: .venv-interop with gptqmodel + optimum);
skipped elsewhere. For each setting a tiny Llama is quantized by our pipeline, loaded with
``AutoModelForCausalLM.from_pretrained(out, device_map="cpu")`` (GPTQModel picks its CPU kernel:
TorchAtenLinear / TorchLinear) and its logits are compared with ``load_dequantized_model`` (our
dense fp32 read-back) on the same tokens.

Tolerance: the kernels run in fp16/bf16 (activations and the dequantized weight are rounded), so
logits cannot match exactly. We require

* ``max |Δ| <= rel_tol * max |logits|`` with rel_tol 2% (fp16) / 4% (bf16) — measured 0.1–0.5% /
  ~0.8%; and
* for <= 4 bits, ``max |Δ|`` below a quarter of the quantization effect itself (max |our read-back −
  fp model|), so a loader that misread zero-points, g_idx or the bit order (an error of the order of
  the quantization error, or far larger) fails.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")

pytestmark = pytest.mark.interop

gptqmodel = pytest.importorskip("gptqmodel", reason="interop tier: needs gptqmodel (.venv-interop: scripts/setup_interop.sh, `make interop`)")
pytest.importorskip("optimum", reason="interop tier: needs optimum (.venv-interop: scripts/setup_interop.sh, `make interop`)")

from quantize.calibration import sample_calibration  # noqa: E402
from quantize.commands.gptq import quantize_gptq  # noqa: E402
from quantize.executor.loop import ExecConfig  # noqa: E402
from quantize.io.quantized import load_dequantized_model  # noqa: E402
from quantize.testing.tiny import build_tiny_model  # noqa: E402

REL_TOL = {torch.float16: 0.02, torch.bfloat16: 0.04}

# (bits, group_size, act_order, sym, checkpoint_format, load dtype)
CASES = [
    (4, 32, True, True, "gptq", torch.float16),
    (4, 32, False, True, "gptq", torch.float16),
    (4, -1, True, True, "gptq", torch.float16),
    (4, -1, False, True, "gptq", torch.float16),
    (4, 32, True, True, "gptq", torch.bfloat16),
    (4, 32, True, False, "gptq", torch.float16),
    (4, 32, True, False, "gptq_v2", torch.float16),
    (3, 32, True, True, "gptq", torch.float16),
    (2, 32, True, True, "gptq", torch.float16),
    (8, 32, True, True, "gptq", torch.float16),
    (8, -1, False, True, "gptq", torch.float16),
]


def _case_id(case) -> str:
    bits, group, act_order, sym, ckpt, dtype = case
    return (f"{bits}bit-g{group}-{'actorder' if act_order else 'noact'}-{'sym' if sym else 'asym'}-{ckpt}"
            f"-{str(dtype).removeprefix('torch.')}")


@pytest.fixture(scope="module")
def model_and_calibration(tmp_path_factory):
    """A 2-layer Llama, hidden 128 (every linear's in/out width a multiple of 32, as GPTQ kernels
    want: q/o 128, k/v 64, gate/up/down 256/128), and 8 x 64 calibration tokens."""
    root = tmp_path_factory.mktemp("interop")
    model = build_tiny_model("llama", root / "model", num_layers=2, hidden=128)
    cal = root / "cal"
    sample_calibration(model, "wikitext2", 8, 64, 0, cal)
    return model, cal


@pytest.fixture(scope="module")
def fp_logits(model_and_calibration, token_ids):
    from transformers import AutoModelForCausalLM

    model, _ = model_and_calibration
    ref = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    with torch.no_grad():
        return ref(token_ids).logits


@pytest.fixture(scope="module")
def token_ids():
    return torch.randint(3, 1024, (2, 48), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_transformers_loads_our_checkpoint(case, model_and_calibration, fp_logits, token_ids, tmp_path):
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    bits, group, act_order, sym, ckpt, dtype = case
    model, cal = model_and_calibration
    out = tmp_path / "q"
    quantize_gptq(model_dir=model, calibration=cal, out=out, bits=bits, group_size=group, act_order=act_order,
                  sym=sym, damp=0.01, static_groups=False, block_size=128, rtn=False,
                  exec_cfg=ExecConfig(device="cpu", dtype=torch.float32, batch_size=4), checkpoint_format=ckpt)

    loaded = AutoModelForCausalLM.from_pretrained(out, device_map="cpu", dtype=dtype).eval()
    kernels = {type(m).__name__ for m in loaded.modules() if isinstance(m, BaseQuantLinear)}
    n_quant = sum(isinstance(m, BaseQuantLinear) for m in loaded.model.layers.modules())
    assert n_quant == 7 * 2, f"expected 14 quantized linears, transformers built {n_quant} ({kernels})"

    ours = load_dequantized_model(out).eval()
    with torch.no_grad():
        theirs_logits = loaded(token_ids).logits.float()
        ours_logits = ours(token_ids).logits
    diff = (theirs_logits - ours_logits).abs().max().item()
    scale = ours_logits.abs().max().item()
    quant_effect = (ours_logits - fp_logits).abs().max().item()
    agree = (theirs_logits.argmax(-1) == ours_logits.argmax(-1)).float().mean().item()
    print(f"\n[interop] {_case_id(case)}: kernel {sorted(kernels)}, max|Δlogits| {diff:.5f} "
          f"(max|logits| {scale:.3f}, quantization effect {quant_effect:.4f}), top-1 agreement {agree:.4f}")

    assert torch.isfinite(theirs_logits).all()
    assert diff <= REL_TOL[dtype] * scale, f"{diff} > {REL_TOL[dtype]} * {scale}"
    if bits <= 4:
        assert diff < 0.25 * quant_effect, f"kernel-vs-read-back {diff} is not small next to the quantization effect {quant_effect}"


def test_mislabelled_zero_points_are_caught(model_and_calibration, token_ids, tmp_path):
    """Negative control for the tolerance above: the same v1 checkpoint labelled ``gptq_v2`` (every
    zero-point then read one too low, FORMATS.md §1.4) must fail the comparison by a wide margin."""
    import json
    import shutil

    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    model, cal = model_and_calibration
    good, bad = tmp_path / "good", tmp_path / "bad"
    quantize_gptq(model_dir=model, calibration=cal, out=good, bits=4, group_size=32, act_order=True, sym=True,
                  damp=0.01, static_groups=False, block_size=128, rtn=False,
                  exec_cfg=ExecConfig(device="cpu", dtype=torch.float32, batch_size=4))
    shutil.copytree(good, bad)
    for name in ("config.json", "quantize_config.json"):
        cfg = json.loads((bad / name).read_text())
        qc = cfg.get("quantization_config", cfg)
        qc["checkpoint_format"] = "gptq_v2"
        if "format" in qc:
            qc["format"] = "gptq_v2"
        (bad / name).write_text(json.dumps(cfg))

    loaded = AutoModelForCausalLM.from_pretrained(bad, device_map="cpu", dtype=torch.float16).eval()
    ours = load_dequantized_model(good).eval()
    with torch.no_grad():
        diff = (loaded(token_ids).logits.float() - ours(token_ids).logits).abs().max().item()
        scale = ours(token_ids).logits.abs().max().item()
    print(f"\n[interop] mislabelled v1-as-v2: max|Δlogits| {diff:.4f} (max|logits| {scale:.3f})")
    assert diff > 5 * REL_TOL[torch.float16] * scale
