"""Interop: llama.cpp itself runs our Mixture-of-Experts GGUF files (stacked ``ffn_*_exps``).

Runs only where ``llama_cpp`` imports (``.venv-llamacpp``, see tests/test_interop_llamacpp.py):

    .venv-llamacpp/bin/python -m pytest -q -s -p no:cacheprovider tests/test_interop_llamacpp_moe.py

Tiny models of the MoE families llama.cpp runs (tests/test_gguf_moe.py ``moe_kwargs``: hidden 256,
experts 256 wide, 2 layers; Mixtral with 8 experts so that llama.cpp's 8-expert rules -- attn_v/attn_k
Q8_0, attn_output Q5_K -- are exercised; Qwen with 4), written by ``quantize_gguf`` as F16, Q8_0,
Q4_K_M (llama.cpp's reference rounding) and Q4_K_M with calibration (GPTQ per expert on the grid):

1. llama.cpp loads each file and its logits match our read-back's forward. As in the dense tests,
   within ``REL_TOL`` = 2% of the logits' range -- except that in a MoE model llama.cpp's rounding of
   the activations (Q8_K before every K-quant matmul) can flip the router's choice for a token whose
   k-th and (k+1)-th router logits are nearly tied; that token then runs another expert and its
   logits (and, through attention, later ones) differ by more. Measured on these models: one or two
   such positions in 47, router margin (k-th minus (k+1)-th logit) <= 0.07 of the router logits'
   std, against a median margin of ~0.3. So we require: the first position beyond ``REL_TOL`` has
   such a near-tie (``TIE``) in some layer of our read-back; at most ``MAX_DIVERGED`` of the
   positions are beyond ``REL_TOL``; for Q4_K_M ``KL(ours || llama.cpp) <= KL_FRACTION * KL(fp ||
   ours)`` (measured 0.01-0.04; for Q8_0 the weights' rounding is as small as llama.cpp's 8-bit
   activations': measured ratio 0.2-0.55, so only the first two rules); the same argmax wherever our
   top two logits are clear.
   A misplaced expert, block or row breaks the first position already.
2. llama.cpp's own quantizer (``llama_model_quantize``, Q4_K_M) on our BF16 GGUF writes exactly our
   imatrix-free Q4_K_M, tensor for tensor (types: llama.cpp's MoE mix; bytes: its reference rounding
   of each expert's rows);
3. given our imatrix file (one ``[E, K]`` entry per stack), its bytes are our re-implementation's
   ``quantize_reference(W_e, qtype, importance_e)`` for every expert: llama.cpp reads our per-expert
   statistics at the offsets we wrote them.

DeepSeek-V3 (llama.cpp's ``deepseek2``, tests/test_gguf_moe.py ``moe_kwargs``: 3 layers, layer 0
dense, MLA ranks 256, qk_nope 128, 4 experts in 2 groups, one shared expert) runs through the same
three checks: llama.cpp loads our MLA layout (attn_k_b transposed per head, attn_v_b, exp_probs_b,
the converter's keys) with its weight-absorbed MLA graph, its logits match our read-back's (the
router margin here: the k-th vs (k+1)-th selection score -- sigmoid + e_score_correction_bias --
among the chosen group, or the chosen vs the next group's score, whichever is smaller, over the std
of the selection scores); its quantizer writes our Q4_K_M from our BF16 (attn_k_b's 128-wide rows:
its Q5_0 fallback; and for Q8_0, Q4_0, Q6_K, Q5_K_M: Q8_0/Q4_0/Q8_0/Q5_1); and it reads our per-head
attn_v_b imatrix entry. Its logits are also checked with
YaRN as DeepSeek-V3 configures it (``deepseek_v3+yarn``: factor 4 over an original context of 64,
mscale = mscale_all_dim = 1: the converter's yarn keys and ``yarn_log_multiplier``). And all of it on
the same DeepSeek-V3 without ``q_lora_rank`` (``deepseek_v3_noqlora``, Moonlight-style): a plain
``attn_q`` and ``attention.q_lora_rank = 0``, which llama.cpp's deepseek2 reads as "no q LoRA" whatever
the layer count (the converter's file, without the key, loads only at its "lite" layer counts).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.interop

llama_cpp = pytest.importorskip(
    "llama_cpp", reason="interop tier: needs llama-cpp-python (scripts/setup_llamacpp.sh -> .venv-llamacpp)")
gguf = pytest.importorskip("gguf")

from test_gguf_moe import DEEPSEEK, DEEPSEEK_NOQ, DEEPSEEK_YARN, DEEPSEEKS, GGUF_MOE, moe_kwargs  # noqa: E402
from test_interop_llamacpp import (  # noqa: E402, F401  (_quiet_llama_cpp: the module's autouse fixture)
    _dense, _kl, _llama_quantize, _quiet_llama_cpp, _tensors, build_ggufs, llama_cpp_logits)

from quantize.check.routing import MAX_DIVERGED, TIE, forward_with_margins  # noqa: E402  (quantize check's rule)
from quantize.formats import gguf_blocks  # noqa: E402
from quantize.formats.gguf_imatrix import read_imatrix  # noqa: E402
from quantize.io.quantized import load_dequantized_model  # noqa: E402

REL_TOL = 0.02       # max |llama.cpp - ours| / range(ours) at a position without a routing flip
KL_FRACTION = 0.2    # KL(ours || llama.cpp) / KL(fp || ours), quantized files
VARIANTS = ("F16", "Q8_0", "Q4_K_M", "Q4_K_M+cal")
FAMILIES = GGUF_MOE + DEEPSEEKS
YARN = DEEPSEEK + "+yarn"  # the same tiny DeepSeek-V3 with YaRN (factor 4, mscale = mscale_all_dim = 1)


def _kwargs(family: str) -> dict:
    if family == YARN:
        return {**moe_kwargs(DEEPSEEK), "rope_parameters": dict(DEEPSEEK_YARN)}
    kw = moe_kwargs(family)
    if family == "mixtral":
        kw["num_local_experts"] = 8  # llama.cpp's n_expert == 8 rules
    return kw


@pytest.fixture(scope="module")
def built(tiny_model_dir, calib_for, tmp_path_factory):
    cache: dict[str, dict[str, Path]] = {}

    def get(family: str) -> dict[str, Path]:
        if family not in cache:
            src = tiny_model_dir(family.partition("+")[0], **_kwargs(family))
            root = tmp_path_factory.mktemp(f"llamacpp-moe-{family}")
            cache[family] = build_ggufs(src, calib_for(src), root, ("F16", "BF16", "Q8_0", "Q4_K_M", "Q4_K_M+cal"))
        return cache[family]

    return get


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("family", FAMILIES + (YARN,))
def test_llama_cpp_logits_match_our_read_back(built, family, variant):
    from transformers import AutoModelForCausalLM

    d = built(family)
    out = d[variant]
    ids, got = llama_cpp_logits(out, d["src"])
    ours, margin = forward_with_margins(load_dequantized_model(out).eval(), ids)
    with torch.no_grad():
        fp = AutoModelForCausalLM.from_pretrained(d["src"], dtype=torch.float32).eval()(torch.tensor([ids])).logits[0].float()
    assert torch.isfinite(got).all()
    rng = float(ours.max() - ours.min())
    per_pos = (got - ours).abs().max(-1).values
    diverged = (per_pos > REL_TOL * rng).nonzero().flatten().tolist()
    kl_ll, kl_q = _kl(ours, got), _kl(fp, ours)
    print(f"\n[llama.cpp MoE logits] {family:9s} {variant:10s} max|llama.cpp-ours| {float(per_pos.max()):.3e} "
          f"(median {float(per_pos.median()):.3e}) of range {rng:.3f}; beyond {REL_TOL:.0%}: positions {diverged} "
          f"(router margins {[round(float(margin[p]), 3) for p in diverged]}); KL(ours||llama.cpp) {kl_ll:.2e}, "
          f"KL(fp||ours) {kl_q:.2e}")
    if diverged:
        assert float(margin[diverged[0]]) < TIE, (family, variant, diverged, margin[diverged[0]])
    assert len(diverged) <= MAX_DIVERGED * len(ids), (family, variant, diverged)
    if variant.startswith("Q4_K_M"):  # Q8_0's weight rounding is as small as llama.cpp's activation rounding
        assert kl_ll <= KL_FRACTION * kl_q, (family, variant, kl_ll, kl_q)
    top2 = ours.topk(2, -1).values
    clear = ((top2[:, 0] - top2[:, 1]) > 4 * per_pos) & (per_pos <= REL_TOL * rng)
    assert torch.equal(got.argmax(-1)[clear], ours.argmax(-1)[clear])


@pytest.mark.parametrize("family", FAMILIES)
def test_llama_cpp_quantizer_writes_our_bytes(built, family, tmp_path):
    d = built(family)
    theirs = _tensors(_llama_quantize(d["BF16"] / "model.gguf", tmp_path / "q4km.gguf"))
    ours = _tensors(d["Q4_K_M"] / "model.gguf")
    assert sorted(theirs) == sorted(ours)
    stacks = [n for n in ours if "_exps." in n]
    assert len(stacks) == 2 * 3
    type_diff = {n: (ours[n][0], theirs[n][0]) for n in ours if ours[n][0] != theirs[n][0]}
    byte_diff = [n for n in ours if n not in type_diff and not np.array_equal(ours[n][1], theirs[n][1])]
    types = sorted({(n.split(".", 2)[-1] if n.startswith("blk.") else n, ours[n][0]) for n in ours if ours[n][0] != "F32"})
    print(f"\n[llama_model_quantize Q4_K_M] {family}: {len(ours)} tensors; other types {type_diff}, "
          f"other bytes {byte_diff}; our types {types}")
    assert not type_diff and not byte_diff
    if family == "mixtral":  # 8 experts: llama.cpp's bumps, which our mix reproduces
        assert ours["blk.0.attn_v.weight"][0] == ours["blk.0.attn_k.weight"][0] == "Q8_0"
        assert ours["blk.0.attn_output.weight"][0] == "Q5_K"
    if family == DEEPSEEK:  # MLA: attn_k_b's 128-wide rows take llama.cpp's fallback; the rest the default
        assert ours["blk.1.attn_k_b.weight"][0] == "Q5_0" and ours["blk.1.attn_v_b.weight"][0] == "Q4_K"
        assert {ours[f"blk.1.{g}.weight"][0] for g in ("attn_q_a", "attn_q_b", "attn_kv_a_mqa")} == {"Q4_K"}
    if family == DEEPSEEK_NOQ:  # no q LoRA: attn_q (llama.cpp's ATTENTION_Q: the default type here)
        assert ours["blk.1.attn_q.weight"][0] == "Q4_K" and "blk.1.attn_q_a.weight" not in ours
        assert ours["blk.1.attn_k_b.weight"][0] == "Q5_0"


@pytest.mark.parametrize("family", FAMILIES)
def test_llama_cpp_quantizer_reads_our_per_expert_imatrix(built, family, tmp_path):
    d = built(family)
    imx = read_imatrix(d["imatrix"])
    theirs = _tensors(_llama_quantize(d["BF16"] / "model.gguf", tmp_path / "imx.gguf", imatrix=imx))
    dense = _dense(d["BF16"] / "model.gguf")
    checked = 0
    for n, (qtype, raw) in theirs.items():
        if "_exps." not in n and "attn_v_b." not in n:  # DeepSeek's attn_v_b: one imatrix row per head
            continue
        E, K = dense[n].shape[0], dense[n].shape[-1]
        want = np.concatenate([gguf_blocks.quantize_reference(
            torch.from_numpy(dense[n][e]), qtype, imx[n][e * K:(e + 1) * K].to(torch.float32)).numpy().reshape(-1)
            for e in range(E)])
        assert np.array_equal(raw, want), (family, n)
        checked += 1
    assert checked == 2 * 3 + (3 if family in DEEPSEEKS else 0)


# llama_ftype values (llama.h) of the other file types we write
LLAMA_FTYPES = {"Q8_0": 7, "Q4_0": 2, "Q6_K": 18, "Q5_K_M": 17}


@pytest.mark.parametrize("ftype", sorted(LLAMA_FTYPES))
def test_llama_cpp_quantizer_writes_our_deepseek_bytes_for_every_file_type(built, ftype, tmp_path):
    """The other file types on DeepSeek-V3: attn_k_b's 128-wide rows take llama.cpp's other fallbacks
    (Q6_K -> Q8_0, Q5_K -> Q5_1; Q4_0/Q8_0 fit), the MLA tensors the default type; every byte ours."""
    from quantize.commands.gguf import quantize_gguf
    from helpers import CPU

    d = built(DEEPSEEK)
    quantize_gguf(model_dir=d["src"], out=tmp_path / "ours", exec_cfg=CPU, ftype=ftype)
    ours = _tensors(tmp_path / "ours" / "model.gguf")
    theirs = _tensors(_llama_quantize(d["BF16"] / "model.gguf", tmp_path / "theirs.gguf", LLAMA_FTYPES[ftype]))
    assert sorted(theirs) == sorted(ours)
    type_diff = {n: (ours[n][0], theirs[n][0]) for n in ours if ours[n][0] != theirs[n][0]}
    byte_diff = [n for n in ours if n not in type_diff and not np.array_equal(ours[n][1], theirs[n][1])]
    print(f"\n[llama_model_quantize {ftype}] deepseek_v3: attn_k_b {ours['blk.1.attn_k_b.weight'][0]}, "
          f"attn_v_b {ours['blk.1.attn_v_b.weight'][0]}; other types {type_diff}, other bytes {byte_diff}")
    assert not type_diff and not byte_diff
    assert ours["blk.1.attn_k_b.weight"][0] == {"Q8_0": "Q8_0", "Q4_0": "Q4_0", "Q6_K": "Q8_0", "Q5_K_M": "Q5_1"}[ftype]


@pytest.mark.parametrize("variant", ("Q4_K_M", "Q4_K_M+cal"))
@pytest.mark.parametrize("family", FAMILIES)
def test_quantize_check_passes_our_moe_gguf(built, family, variant, monkeypatch):
    """``quantize check --engine llama.cpp`` on our MoE files: the same near-tie rule as above
    (quantize/check/routing.py), so a router flip under llama.cpp's 8-bit activations is reported,
    not failed; the KL gate against the quantization effect still runs."""
    from quantize import manifest as mf
    from quantize.check import check_output

    monkeypatch.delenv("QUANTIZE_LLAMACPP_PYTHON", raising=False)
    out = built(family)[variant]
    fmt, engines, (rec,) = check_output(out, "llama.cpp")
    print(f"\n[quantize check MoE] {family:11s} {variant:10s} {rec.verdict}: rel {rec.figures.rel:.3e}, "
          f"KL {rec.figures.kl:.2e}; {rec.reason}")
    assert (fmt, engines) == ("gguf", ["llama.cpp"])
    assert rec.verdict == "pass", rec.reason
    assert "KL(source||ours)" in rec.reason  # the ratio gate ran
    assert mf.load_manifest(out) is not None
