"""The GGUF type mix (llama.cpp's llama_tensor_get_type for the file types we write)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from quantize.arch import get_arch
from quantize.errors import InputError
from quantize.formats.gguf_mix import ModelShape, gguf_weight_bytes, tensor_type, use_more_bits

ROOT = Path(__file__).resolve().parents[1]
L32 = ModelShape(n_layers=32, n_head=32, n_head_kv=8, tied=False)


def test_use_more_bits_is_llama_cpps_choice():
    # 32 layers: the first and last 4, and every third from layer 6: 16 of 32
    assert [i for i in range(32) if use_more_bits(i, 32)] == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]


def test_q4_k_m_mix_of_a_32_layer_llama():
    kinds = {stem: [tensor_type(f"blk.{i}.{stem}.weight", 4096, "Q4_K_M", L32) for i in range(32)]
             for stem in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")}
    for stem in ("attn_v", "ffn_down"):
        assert kinds[stem].count("Q6_K") == 16 and kinds[stem].count("Q4_K") == 16
        assert [i for i, t in enumerate(kinds[stem]) if t == "Q6_K"] == [i for i in range(32) if use_more_bits(i, 32)]
    for stem in ("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up"):
        assert set(kinds[stem]) == {"Q4_K"}
    assert tensor_type("output.weight", 4096, "Q4_K_M", L32) == "Q6_K"
    assert tensor_type("token_embd.weight", 4096, "Q4_K_M", L32) == "Q4_K"
    assert tensor_type("token_embd.weight", 4096, "Q4_K_M", ModelShape(32, 32, 8, tied=True)) == "Q6_K"
    assert tensor_type("blk.0.attn_norm.weight", 4096, "Q4_K_M", L32, ndim=1) == "F32"
    assert tensor_type("output.weight", 4096, "Q8_0", L32) == "Q8_0"
    assert tensor_type("output.weight", 4096, "Q4_0", L32) == "Q6_K"


def test_fused_qkv_follows_attn_v():
    """phi3's attn_qkv takes attn_v's rule, as llama_model_quantize does (tests/test_interop_llamacpp.py)."""
    for i in range(32):
        assert tensor_type(f"blk.{i}.attn_qkv.weight", 4096, "Q4_K_M", L32) == ("Q6_K" if use_more_bits(i, 32) else "Q4_K")


def test_70b_and_fallbacks():
    s70 = ModelShape(n_layers=80, n_head=64, n_head_kv=8, tied=False)
    v = [tensor_type(f"blk.{i}.attn_v.weight", 8192, "Q4_K_M", s70) for i in range(80)]
    assert set(v) == {"Q5_K", "Q6_K"}  # 70B: the attn_v that do not get Q6_K get Q5_K, not Q4_K
    assert tensor_type("blk.1.attn_q.weight", 64, "Q4_K_M", L32) == "Q5_0"  # width 64: Q4_K -> Q5_0
    assert tensor_type("blk.0.ffn_down.weight", 96, "Q4_K_M", L32) == "Q8_0"  # Q6_K -> Q8_0
    assert tensor_type("blk.1.attn_q.weight", 48, "Q4_K_M", L32) == "F16"  # not even Q5_0
    assert tensor_type("output.weight", 64, "Q4_K_M", L32) == "Q8_0"
    with pytest.raises(InputError, match="Q3_K"):
        tensor_type("blk.0.attn_q.weight", 4096, "Q3_K", L32)


def test_llama3_70b_q4_k_m_bytes():
    """Llama-3-70B as Q4_K_M: the tensor bytes llama.cpp's mix gives (about 4.8 bits per weight)."""
    cfg = json.loads((ROOT / "recipes/configs/llama3-70b.json").read_text())
    b = gguf_weight_bytes(cfg, "Q4_K_M", get_arch(cfg))
    n_params = 70_553_706_496
    assert 4.7 < 8 * b["total"] / n_params < 4.9
    assert b["lm_head"] == 128256 * (8192 // 256) * 210  # output -> Q6_K
    assert b["embeddings"] == 128256 * (8192 // 256) * 144  # token_embd -> Q4_K
    # the published Meta-Llama-3-70B Q4_K_M file is 42.52 GB: 42.51 GB of tensors + metadata and vocabulary
    assert b["total"] == 42_512_531_456


def test_plan_lists_gguf_rows():
    from quantize.plan import DEFAULT_SETTINGS, plan

    cfg = json.loads((ROOT / "recipes/configs/llama3-70b.json").read_text())
    rows = {r["setting"]: r for r in plan(cfg, settings=DEFAULT_SETTINGS)["rows"]}
    assert rows["gguf Q4_K_M"]["weights"] == 42_512_531_456
    assert 4.7 < rows["gguf Q4_K_M"]["effective_bits"] < 4.95
