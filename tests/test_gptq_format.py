"""GPTQ checkpoint tensors: FORMATS.md §1.8 worked examples bit for bit, round trips, v1/v2, config."""

from __future__ import annotations

import json

import pytest
import torch

from quantize.errors import InputError
from quantize.formats.gptq import (
    dequantize_gptq,
    pack_gptq,
    pack_lsb_bitstream,
    pack_quant_result,
    quantization_config,
    quantize_config_json,
    unpack_gptq,
    unpack_lsb_bitstream,
)
from quantize.methods.gptq import gptq_quantize
from quantize.methods.grid import QuantSpec
from quantize.methods.hessian import accumulate_hessian
from quantize.methods.rtn import rtn_quantize

from helpers import EXAMPLE_A_W, format_example, tensor_sha256, u32

# ---- (a) 8x8, b=4, g=4 ------------------------------------------------------------------------

EX_A_QWEIGHT = [0x50B61C72, 0x83E94FA5, 0xB61C72D8, 0xE94FA50B, 0x1C72D83E, 0x4FA50B61, 0x72D83E94, 0xA50B61C7]
EX_A_QWEIGHT_SIGNED = [1354112114, -2081861723, -1239649576, -380656373, 477288510, 1336216417, 1926774420, -1525980729]


def test_example_a_pack_v1_v2():
    codes, scales, zeros, g_idx = format_example(8, 8, 2, 256)
    v1 = pack_gptq(codes, scales, zeros, g_idx, bits=4)
    v2 = pack_gptq(codes, scales, zeros, g_idx, bits=4, checkpoint_format="gptq_v2")
    for t in (v1, v2):
        assert t["qweight"].dtype == torch.int32 and t["qweight"].shape == (1, 8)
        assert u32(t["qweight"]) == EX_A_QWEIGHT
        assert t["qweight"].flatten().tolist() == EX_A_QWEIGHT_SIGNED
        assert t["scales"].dtype == torch.float16 and torch.equal(t["scales"].float(), scales)
        assert t["g_idx"].dtype == torch.int32 and t["g_idx"].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert v1["qzeros"].shape == (2, 1)
    assert u32(v1["qzeros"]) == [0x76543210, 0xA9876543]
    assert v1["qzeros"].flatten().tolist() == [1985229328, -1450744509]
    assert u32(v2["qzeros"]) == [0x87654321, 0xBA987654]
    assert v2["qzeros"].flatten().tolist() == [-2023406815, -1164413356]


def test_example_a_unpack_and_dequantize():
    codes, scales, zeros, g_idx = format_example(8, 8, 2, 256)
    for fmt in ("gptq", "gptq_v2"):
        t = pack_gptq(codes, scales, zeros, g_idx, bits=4, checkpoint_format=fmt)
        c, s, z, gi = unpack_gptq(t, 4, fmt)
        assert torch.equal(c, codes.int()) and torch.equal(z, zeros.int()) and torch.equal(gi, g_idx.int())
        assert torch.equal(s, scales)
        assert dequantize_gptq(t, 4, fmt).tolist() == EXAMPLE_A_W


def test_example_a_act_order_variant():
    codes, scales, zeros, _ = format_example(8, 8, 2, 256)
    g_idx = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1])
    t = pack_gptq(codes, scales, zeros, g_idx, bits=4, checkpoint_format="gptq_v2")
    assert u32(t["qweight"]) == EX_A_QWEIGHT  # act-order never reorders qweight rows
    assert u32(t["qzeros"]) == [0x87654321, 0xBA987654]
    W = dequantize_gptq(t, 4, "gptq_v2")
    assert W[0].tolist() == [0.00390625, 0.10546875, 0.28125, 0.0, 0.0703125, 0.0390625, -0.00390625, 0.03515625]
    # g_idx is what a §1.6 perm [3,6,0,5,1,7,2,4] with g=4 yields: g_idx[k] = position(k) // 4.
    perm = torch.tensor([3, 6, 0, 5, 1, 7, 2, 4])
    assert torch.equal(torch.argsort(perm) // 4, g_idx)


@pytest.mark.parametrize(
    "bits, v1, v2",
    [
        (4, [0x77777777], [0x88888888]),
        (8, [0x7F7F7F7F], [0x80808080]),
        (2, [0x55555555], [0xAAAAAAAA]),
        (3, [0xDB6DB6DB, 0xB6DB6DB6, 0x6DB6DB6D], [0x24924924, 0x49249249, 0x92492492]),
    ],
)
def test_symmetric_qzeros_words(bits, v1, v2):
    N = 32  # one qzeros row of `bits` words
    zeros = torch.full((1, N), 1 << (bits - 1))
    args = (torch.zeros(N, 32, dtype=torch.int32), torch.ones(1, N), zeros, torch.zeros(32, dtype=torch.int32))
    assert u32(pack_gptq(*args, bits=bits)["qzeros"]) == (v1 * (bits * N // 32 // len(v1)))
    assert u32(pack_gptq(*args, bits=bits, checkpoint_format="gptq_v2")["qzeros"]) == (v2 * (bits * N // 32 // len(v2)))


# ---- (b) legal-size 32x32, g=16 ---------------------------------------------------------------


def test_example_b_hashes_and_spot_values():
    codes, scales, zeros, g_idx = format_example(32, 32, 2, 1024)
    v1 = pack_gptq(codes, scales, zeros, g_idx, bits=4)
    v2 = pack_gptq(codes, scales, zeros, g_idx, bits=4, checkpoint_format="gptq_v2")
    assert v1["qweight"].shape == (4, 32) and v1["qzeros"].shape == (2, 4) and v1["scales"].shape == (2, 32)
    assert u32(v1["qweight"][0, :8]) == EX_A_QWEIGHT
    assert tensor_sha256(v1["qweight"]) == "5881f422212e7bd6f63fe58025c53a10313fbda16380d8878591255f6086d559"
    assert u32(v1["qzeros"]) == [
        0x76543210, 0x0EDCBA98, 0x87654321, 0x10EDCBA9, 0xA9876543, 0x3210EDCB, 0xBA987654, 0x43210EDC,
    ]
    assert tensor_sha256(v1["qzeros"]) == "511d934055992179914b1ee5883bed25230a71ab1c862a372b7313a5de46af78"
    assert u32(v2["qzeros"]) == [
        0x87654321, 0x1FEDCBA9, 0x98765432, 0x21FEDCBA, 0xBA987654, 0x4321FEDC, 0xCBA98765, 0x54321FED,
    ]
    assert tensor_sha256(v2["qzeros"]) == "0095481154486c0df35a5e9fb503b9f4a19b04ff2551978433efd602bbdc2350"
    assert tensor_sha256(v1["scales"]) == "055ffcd8c54fb914e961fce710e7de3c87afa039a69dae2fe807ba3499263c83"
    for t, fmt in ((v1, "gptq"), (v2, "gptq_v2")):
        W = dequantize_gptq(t, 4, fmt)
        assert W[0, 0].item() == 0.0009765625
        assert W[0, 31].item() == 0.2900390625
        assert W[5, 17].item() == -0.111328125
        assert W[31, 16].item() == 0.625
        assert W[17, 3].item() == 0.017578125


# ---- (c) one column, code = k mod 2^b ---------------------------------------------------------


@pytest.mark.parametrize(
    "bits, words",
    [
        (2, [0xE4E4E4E4, 0xE4E4E4E4]),
        (3, [0x88FAC688, 0xC688FAC6, 0xFAC688FA]),
        (4, [0x76543210, 0xFEDCBA98, 0x76543210, 0xFEDCBA98]),
        (8, [0x03020100, 0x07060504, 0x0B0A0908, 0x0F0E0D0C, 0x13121110, 0x17161514, 0x1B1A1918, 0x1F1E1D1C]),
    ],
)
def test_example_c_single_column(bits, words):
    column = torch.arange(32) % (1 << bits)
    packed = pack_lsb_bitstream(column, bits)
    assert packed.dtype == torch.int32 and u32(packed) == words
    assert torch.equal(unpack_lsb_bitstream(packed, bits), column)
    # The same column inside a layer: qweight[:, n] is that column's stream.
    N = 32
    codes = column.unsqueeze(0).expand(N, 32)
    t = pack_gptq(codes, torch.ones(1, N), torch.ones(1, N, dtype=torch.int64), torch.zeros(32, dtype=torch.int32), bits=bits)
    assert t["qweight"].shape == (len(words), N)
    assert all(u32(t["qweight"][:, n]) == words for n in (0, 17, 31))


def test_three_bit_matches_split_word_description():
    """§1.3: word0 = k0..k9 + low 2 bits of k10; word1 = bit 2 of k10, k11..k20, low bit of k21; word2 = rest."""
    g = torch.Generator().manual_seed(3)
    v = torch.randint(0, 8, (32,), generator=g).tolist()
    w0 = sum(v[i] << (3 * i) for i in range(10)) | ((v[10] & 3) << 30)
    w1 = (v[10] >> 2) | sum(v[11 + i] << (1 + 3 * i) for i in range(10)) | ((v[21] & 1) << 31)
    w2 = (v[21] >> 1) | sum(v[22 + i] << (2 + 3 * i) for i in range(10))
    assert u32(pack_lsb_bitstream(torch.tensor(v), 3)) == [w0, w1, w2]


# ---- round trips ------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
def test_round_trip_random(bits, fmt):
    g = torch.Generator().manual_seed(100 + bits)
    maxq = (1 << bits) - 1
    for N, K, G in [(32, 32, 1), (64, 96, 3), (96, 256, 8)]:
        codes = torch.randint(0, maxq + 1, (N, K), generator=g)
        lo = 1 if fmt == "gptq" else 0
        zeros = torch.randint(lo, maxq + 1, (G, N), generator=g)
        scales = (torch.rand(G, N, generator=g) + 2**-10).half().float()
        g_idx = torch.randint(0, G, (K,), generator=g)  # act-order-like
        t = pack_gptq(codes, scales, zeros, g_idx, bits=bits, checkpoint_format=fmt)
        assert t["qweight"].shape == (K * bits // 32, N) and t["qzeros"].shape == (G, N * bits // 32)
        c, s, z, gi = unpack_gptq(t, bits, fmt)
        assert torch.equal(c, codes.int()) and torch.equal(s, scales)
        assert torch.equal(z, zeros.int()) and torch.equal(gi, g_idx.int())
        W = dequantize_gptq(t, bits, fmt)
        expected = scales[g_idx].T * (codes - zeros[g_idx].T).float()
        assert torch.equal(W, expected)


def test_v1_v2_differ_by_one_per_field():
    """A v2 file read as v1 is off by one on every zero (FORMATS.md §5 pitfall 1)."""
    codes, scales, zeros, g_idx = format_example(32, 32, 2, 1024)
    v2 = pack_gptq(codes, scales, zeros, g_idx, bits=4, checkpoint_format="gptq_v2")
    _, _, z_as_v1, _ = unpack_gptq(v2, 4, "gptq")
    assert torch.equal(z_as_v1, zeros.int() + 1)
    # GPTQModel's v1 -> v2 word conversion adds 0x11111111 (no carries when every field < 15).
    v1 = pack_gptq(codes, scales, zeros, g_idx, bits=4)
    assert [(a + 0x11111111) & 0xFFFFFFFF for a in u32(v1["qzeros"])] == u32(v2["qzeros"])


def test_v1_rejects_zero_point_zero():
    codes = torch.zeros(8, 8, dtype=torch.int32)
    zeros = torch.tensor([[0, 5, 5, 5, 5, 5, 5, 5]])
    args = (codes, torch.ones(1, 8), zeros, torch.zeros(8, dtype=torch.int32))
    with pytest.raises(InputError, match="zero-point 0 cannot be stored"):
        pack_gptq(*args, bits=4)
    t = pack_gptq(*args, bits=4, checkpoint_format="gptq_v2")
    assert u32(t["qzeros"]) == [0x55555550]


def test_pack_rejects_bad_inputs():
    ok = dict(
        codes=torch.zeros(32, 32, dtype=torch.int32),
        scales=torch.ones(1, 32),
        zeros=torch.ones(1, 32, dtype=torch.int32),
        g_idx=torch.zeros(32, dtype=torch.int32),
    )
    pack_gptq(**ok, bits=4)
    with pytest.raises(InputError, match="codes must lie"):
        pack_gptq(**{**ok, "codes": torch.full((32, 32), 16)}, bits=4)
    with pytest.raises(InputError, match="g_idx values"):
        pack_gptq(**{**ok, "g_idx": torch.ones(32, dtype=torch.int32)}, bits=4)
    with pytest.raises(InputError, match="scales"):
        pack_gptq(**{**ok, "scales": torch.ones(1, 31)}, bits=4)
    with pytest.raises(InputError, match="in_features=24 is not a multiple of 32"):
        pack_gptq(**{**ok, "codes": torch.zeros(32, 24, dtype=torch.int32), "g_idx": torch.zeros(24, dtype=torch.int32)}, bits=3)
    with pytest.raises(InputError, match="bits=5"):
        pack_gptq(**ok, bits=5)
    with pytest.raises(InputError, match="checkpoint_format"):
        pack_gptq(**ok, bits=4, checkpoint_format="marlin")
    with pytest.raises(InputError, match="overflow fp16"):
        pack_gptq(**{**ok, "scales": torch.full((1, 32), 1e6)}, bits=4)


def test_unpack_validates_and_derives_g_idx():
    codes, scales, zeros, g_idx = format_example(32, 32, 2, 1024)
    t = pack_gptq(codes, scales, zeros, g_idx, bits=4)
    prefixed = {f"model.layers.0.mlp.up_proj.{k}": v for k, v in t.items() if k != "g_idx"}
    c, _, _, gi = unpack_gptq(prefixed, 4, prefix="model.layers.0.mlp.up_proj.")
    assert torch.equal(c, codes.int()) and torch.equal(gi, g_idx.int())
    with pytest.raises(InputError, match="up_proj.qweight: dtype"):
        unpack_gptq({**prefixed, "model.layers.0.mlp.up_proj.qweight": t["qweight"].float()}, 4, prefix="model.layers.0.mlp.up_proj.")
    with pytest.raises(InputError, match="qzeros: missing"):
        unpack_gptq({"qweight": t["qweight"], "scales": t["scales"]}, 4)
    with pytest.raises(InputError, match="qzeros: shape"):
        unpack_gptq(t, 8)  # wrong bit width: qzeros columns no longer match N
    with pytest.raises(InputError, match="g_idx: values"):
        unpack_gptq({**t, "g_idx": torch.full((32,), 2, dtype=torch.int32)}, 4)


# ---- solver output -> checkpoint ---------------------------------------------------------------


def _problem(N=48, K=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(512, K, generator=g) @ (torch.eye(K) + torch.randn(K, K, generator=g) / K**0.5)
    H, _ = accumulate_hessian(X * (1 + 4 * torch.rand(K, generator=g)), None, 0)
    W = torch.randn(N, K, generator=g) * 0.05
    W[:3] = W[:3].abs()  # all-positive rows exercise the asym zero-point-0 path
    return W, H


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym, act_order, static_groups", [(True, False, False), (False, True, False), (False, True, True)])
def test_dequantize_of_packed_solver_output_is_w_hat(bits, sym, act_order, static_groups):
    W, H = _problem(N=64 if bits == 3 else 48)
    spec = QuantSpec(bits=bits, group_size=32, sym=sym, act_order=act_order, static_groups=static_groups)
    for result in (gptq_quantize(W, H, spec), rtn_quantize(W, spec)):
        t = pack_quant_result(result)
        assert torch.equal(dequantize_gptq(t, bits), result.W_hat)
        assert torch.equal(t["g_idx"], result.g_idx)


def test_v2_export_without_v1_safe_zeros():
    W, H = _problem()
    spec = QuantSpec(bits=4, group_size=32, sym=False, v1_safe_zeros=False)
    r = gptq_quantize(W, H, spec)
    assert bool((r.zeros == 0).any())  # all-positive rows get z = 0 ...
    with pytest.raises(InputError, match="zero-point 0"):
        pack_quant_result(r)  # ... which v1 cannot store
    t = pack_quant_result(r, checkpoint_format="gptq_v2")
    assert torch.equal(dequantize_gptq(t, 4, "gptq_v2"), r.W_hat)


# ---- config ------------------------------------------------------------------------------------


def test_quantization_config_fields():
    spec = QuantSpec(bits=4, group_size=128, sym=True, act_order=True, damp=0.01)
    cfg = quantization_config(spec)
    for key, value in {
        "quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": True, "sym": True,
        "static_groups": False, "true_sequential": True, "damp_percent": 0.01,
        "checkpoint_format": "gptq", "format": "gptq", "pack_dtype": "int32", "lm_head": False,
    }.items():
        assert cfg[key] == value, key
    assert json.loads(quantize_config_json(spec)) == cfg
    v2 = quantization_config(QuantSpec(bits=3, group_size=-1, sym=False), checkpoint_format="gptq_v2", dynamic={"-:.*lm_head": {}})
    assert (v2["checkpoint_format"], v2["format"], v2["group_size"], v2["sym"]) == ("gptq_v2", "gptq_v2", -1, False)
    assert v2["dynamic"] == {"-:.*lm_head": {}}
    with pytest.raises(InputError, match="checkpoint_format"):
        quantization_config(spec, checkpoint_format="exl2")


def test_static_activation_ordering_is_stored_as_desc_act_false():
    """Act-order with static groups keeps groups on the original columns (a trivial g_idx): the
    config says desc_act false, which vLLM accepts; dynamic act-order says true."""
    static = quantization_config(QuantSpec(bits=4, group_size=128, act_order=True, static_groups=True))
    assert static["desc_act"] is False and static["static_groups"] is True
    assert quantization_config(QuantSpec(bits=4, group_size=-1, act_order=True))["desc_act"] is False
    assert quantization_config(QuantSpec(bits=4, group_size=128, act_order=False))["desc_act"] is False
