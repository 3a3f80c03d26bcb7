"""EXL2 unit tests: packing and dequantization against FORMATS.md §3.13 bit for bit, the option
tables and cost model against §3.3, the quantizer's fp16 recipe, the loader checks (§3.10), and the
optimizer (budget, determinism, optimality)."""

from __future__ import annotations

import hashlib
import itertools
import math

import pytest
import torch

from quantize.errors import InputError
from quantize.formats.exl2 import (
    EXL2Format,
    check_exl2_tensors,
    dequantize_exl2,
    pack_bitstream,
    pack_exl2,
    pack_result,
    pack_scale_codes,
    unpack_bitstream,
    unpack_scale_codes,
)
from quantize.formats.registry import format_from_config
from quantize.methods.exl2 import (
    ATTN_OPTIONS,
    ATTN_ROLES,
    HEAD_OPTIONS,
    MLP_OPTIONS,
    SLOT_OPTIONS,
    QParams,
    exl2_quantize,
    exllamav2_total_bits,
    find_group_scales,
    fp16_scales,
    linear_slot,
    prepare_exl2_hessian,
    storage_bits,
)
from quantize.methods.exl2_optimize import Slot, optimize
from quantize.methods.gptq import weighted_error


# -- §3.13 worked example --------------------------------------------------------------------------


def _worked_example():
    K, N = 96, 32
    perm = torch.tensor([(37 * j) % 96 for j in range(K)])
    bits = [4 if j < 32 else 3 if j < 64 else 2 for j in range(K)]
    codes = torch.tensor([[(7 * j + 13 * n + (j * n % 11)) % (1 << bits[j]) for n in range(N)] for j in range(K)])
    stored = torch.tensor([[(5 * g + 3 * n) % 16 for n in range(N)] for g in range(3)])
    scale_max = torch.tensor([0.0625, 0.125, 0.25], dtype=torch.float16)
    return pack_exl2(codes, (4, 3, 2), (32, 32, 32), stored + 1, scale_max, perm), codes, perm


def _hex(col) -> list[str]:
    return [f"0x{x & 0xFFFFFFFF:08X}" for x in col.tolist()]


def test_worked_example_packing_bit_for_bit():
    t, _, perm = _worked_example()
    assert t["q_groups"].dtype == torch.int16 and t["q_groups"].tolist() == [4, 0, 3, 4, 2, 7]
    assert t["q_scale_max"].dtype == torch.float16 and t["q_scale_max"].tolist() == [0.0625, 0.125, 0.25]
    assert t["q_invperm"].dtype == torch.int32
    assert t["q_invperm"][:12].tolist() == [0, 13, 26, 39, 52, 65, 78, 91, 8, 21, 34, 47]
    assert torch.equal(t["q_invperm"].long(), torch.argsort(perm))
    assert t["q_scale"].dtype == torch.int32 and tuple(t["q_scale"].shape) == (3, 4)
    assert _hex(t["q_scale"].flatten()) == [
        "0x52FC9630", "0xDA741EB8", "0x52FC9630", "0xDA741EB8",
        "0xA741EB85", "0x2FC9630D", "0xA741EB85", "0x2FC9630D",
        "0xFC9630DA", "0x741EB852", "0xFC9630DA", "0x741EB852"]
    qw = t["q_weight"]
    assert qw.dtype == torch.int32 and tuple(qw.shape) == (9, 32)
    assert _hex(qw[:, 0]) == ["0x1A3C5E70", "0x92B4D6F8", "0x1A3C5E70", "0x92B4D6F8", "0xB829CBB8",
                              "0xCBB829CB", "0x29CBB829", "0x6C6C6C6C", "0x6C6C6C6C"]
    assert _hex(qw[:, 1]) == ["0x5D5D5D5D", "0xA2A2AD5D", "0xF7A2A2A2", "0xF7F7F7F7", "0x24924927",
                              "0x92492499", "0xDB6DB6C4", "0x03FFFFFA", "0x55550000"]
    digest = hashlib.sha256(qw.numpy().astype("<i4").tobytes()).hexdigest()
    assert digest == "e5b93daead2c2687ac0a33e3e61b450970eda1ba226ca97a75e6aa121cde9a27"
    check_exl2_tensors(t, "worked")


def test_worked_example_dequantization():
    t, codes, perm = _worked_example()
    W = dequantize_exl2(t)
    assert W.shape == (32, 96)
    assert W[0, 0].item() == -0.001953125
    assert W[0, 37].item() == -0.000244140625
    assert W[1, 1].item() == 0.0078125
    assert W[5, 74].item() == 0.0625
    assert W[31, 95].item() == 0.0
    # every value is fp16-representable and equals (code - 2^(b-1)) * (c+1)^2 * max/256 exactly here
    assert torch.equal(W, W.half().float())
    j = 70  # a 2-bit row: stored row j is input channel perm[j]
    n = torch.arange(32)
    c = (5 * 2 + 3 * n) % 16 + 1
    want = (codes[j] - 2).float() * c.float() ** 2 * (0.25 / 256)
    assert torch.equal(W[:, perm[j]], want)


# -- bit streams -----------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("rows", [32, 64, 7])
def test_bitstream_roundtrip_and_layout(bits, rows):
    g = torch.Generator().manual_seed(bits * 100 + rows)
    codes = torch.randint(0, 1 << bits, (rows, 40), generator=g)
    words = pack_bitstream(codes, bits)
    assert words.dtype == torch.int32 and words.shape == (math.ceil(rows * bits / 32), 40)
    assert torch.equal(unpack_bitstream(words, bits, rows), codes)
    # LSB-first: value i of column 5 sits at global bits [i*b, (i+1)*b) of the concatenated words
    big = sum((int(w) & 0xFFFFFFFF) << (32 * k) for k, w in enumerate(words[:, 5].tolist()))
    for i in range(rows):
        assert (big >> (i * bits)) & ((1 << bits) - 1) == int(codes[i, 5])


def test_scale_nibbles_roundtrip():
    codes = torch.randint(1, 17, (5, 64), generator=torch.Generator().manual_seed(1))
    packed = pack_scale_codes(codes)
    assert packed.shape == (5, 8) and torch.equal(unpack_scale_codes(packed), codes)
    word = int(packed[2, 3]) & 0xFFFFFFFF
    assert all((word >> (4 * i)) & 15 == int(codes[2, 24 + i]) - 1 for i in range(8))


def test_padding_to_32_columns_dequantizes_to_zero():
    K, N = 64, 40  # padded to 64 columns
    codes = torch.randint(0, 16, (K, N), generator=torch.Generator().manual_seed(2))
    perm = torch.randperm(K, generator=torch.Generator().manual_seed(3))
    t = pack_exl2(codes, (4, 4), (32, 32), torch.randint(1, 17, (2, N)), torch.tensor([0.5, 0.25]).half(), perm)
    assert t["q_weight"].shape == (8, 64) and t["q_scale"].shape == (2, 8)
    check_exl2_tensors(t, "padded")
    W = dequantize_exl2(t)
    assert W.shape == (64, 64) and torch.count_nonzero(W[N:]) == 0 and torch.count_nonzero(W[:N]) > 0


# -- options and cost model (§3.3) -----------------------------------------------------------------


def test_option_tables_match_exllamav2():
    assert len(ATTN_OPTIONS) == 19 and len(MLP_OPTIONS) == 17
    assert all(set(r) == set(ATTN_ROLES) for r in ATTN_OPTIONS)
    assert ATTN_OPTIONS[0]["q"].desc == "0.05:3b_64g/0.95:2b_64g s4"
    assert ATTN_OPTIONS[2]["v"].desc == "0.1:4b_128g/0.9:3b_128g s4"
    assert ATTN_OPTIONS[17]["v"].desc == "1:8b_32g s4"
    assert MLP_OPTIONS[0]["down"].desc == "0.05:6b_32g/0.2:3b_64g/0.75:2b_64g s4"
    assert MLP_OPTIONS[14]["down"].desc == "0.15:8b_128g/0.85:6b_128g s4"
    assert HEAD_OPTIONS[6].desc == "0.15:8b_128g/0.85:6b_128g s4" and HEAD_OPTIONS[8].desc == "1:8b_128g s4"
    assert sorted(HEAD_OPTIONS) == [2, 3, 4, 5, 6, 8]
    assert linear_slot("self_attn.qkv_proj") == ("self_attn", "q") and linear_slot("mlp.down_proj") == ("mlp", "down")


@pytest.mark.parametrize("qp,bpw", [
    (QParams((4,), (1.0,), (128,)), 4.0392), (QParams((4,), (1.0,), (32,)), 4.1332),
    (ATTN_OPTIONS[0]["q"], 2.1330), (ATTN_OPTIONS[4]["q"], 3.1642), (QParams((8,), (1.0,), (128,)), 8.0392),
])
def test_cost_model_examples(qp, bpw):
    assert round(exllamav2_total_bits(qp, 4096, 4096) / 4096**2, 4) == bpw
    assert storage_bits(qp, 4096, 4096) == exllamav2_total_bits(qp, 4096, 4096)  # word-aligned: identical


def test_cost_model_llama2_rows():
    attn = sum(exllamav2_total_bits(ATTN_OPTIONS[0][r], 4096, 4096) for r in ATTN_ROLES)
    m = MLP_OPTIONS[0]
    mlp = (exllamav2_total_bits(m["gate"], 4096, 11008) + exllamav2_total_bits(m["up"], 4096, 11008)
           + exllamav2_total_bits(m["down"], 11008, 4096))
    assert attn == 143_142_912 and mlp == 304_011_760
    assert round(exllamav2_total_bits(HEAD_OPTIONS[6], 4096, 32000) / (4096 * 32000), 2) == 6.34


def test_group_layout():
    qp = MLP_OPTIONS[4]["down"]  # 0.05:8b_32g / 0.1:4b_128g / 0.85:3b_128g
    assert qp.groups(1024) == [(8, 32), (8, 32)] + [(4, 128)] + [(3, 128)] * 6 + [(3, 64)]
    assert QParams((4, 3), (0.1, 0.9), (128, 128)).groups(64) == [(4, 64)]  # K smaller than a group
    for row in itertools.chain(*[o.values() for o in ATTN_OPTIONS + MLP_OPTIONS]):
        for K in (64, 96, 128, 384, 1000):
            layout = row.groups(K)
            assert sum(r for _, r in layout) == K
            assert [b for b, _ in layout] == sorted((b for b, _ in layout), reverse=True)
            assert all(r * b % 32 == 0 for b, r in layout[:-1])


@pytest.mark.parametrize("K,N", [(96, 32), (100, 40), (384, 128), (1024, 96)])
def test_storage_bits_equal_packed_bytes(K, N):
    g = torch.Generator().manual_seed(K + N)
    for qp in [ATTN_OPTIONS[0]["q"], MLP_OPTIONS[0]["down"], MLP_OPTIONS[4]["down"], HEAD_OPTIONS[6], HEAD_OPTIONS[2]]:
        layout = qp.groups(K)
        codes = torch.cat([torch.randint(0, 1 << b, (r, N), generator=g) for b, r in layout])
        t = pack_exl2(codes, [b for b, _ in layout], [r for _, r in layout], torch.randint(1, 17, (len(layout), N), generator=g),
                      torch.rand(len(layout)).half(), torch.randperm(K, generator=g))
        check_exl2_tensors(t, qp.desc)
        assert storage_bits(qp, K, N) == sum(v.numel() * v.element_size() * 8 for v in t.values()), qp.desc


def test_qparams_json_roundtrip_and_validation():
    for qp in [ATTN_OPTIONS[0]["q"], MLP_OPTIONS[0]["down"], HEAD_OPTIONS[8]]:
        assert QParams.from_dict(qp.to_dict()) == qp or QParams.from_dict(qp.to_dict()).desc == qp.desc
    with pytest.raises(InputError):
        QParams.from_dict({"bits": [7], "bits_prop": [1], "group_size": {"7": 32}})
    with pytest.raises(ValueError):
        QParams((3, 4), (0.5, 0.5), (32, 32))  # increasing widths
    with pytest.raises(ValueError):
        QParams((4,), (1.0,), (48,))  # group not a multiple of 32


# -- quantizer (§3.5) ------------------------------------------------------------------------------


def _problem(N=48, K=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(N, K, generator=g) * 0.05
    mix = torch.eye(K) + 0.4 * torch.randn(K, K, generator=g) / K**0.5
    X = torch.randn(2048, K, generator=g) @ mix * torch.linspace(0.2, 3.0, K)
    return W, 2 * X.T @ X / X.shape[0]


def test_scale_search_uses_the_loader_fp16_recipe():
    Wg = torch.randn(64, 96, generator=torch.Generator().manual_seed(4)) * 0.03
    for bits in (2, 3, 4, 5, 6, 8):
        scale, codes, smax = find_group_scales(Wg, bits)
        assert smax.dtype == torch.float16 and codes.min() >= 1 and codes.max() == 16
        assert torch.equal(scale, fp16_scales(codes, smax))
        want = ((codes.double() ** 2).half().double() * (smax.double() / 256).half().double()).half().float()
        assert torch.equal(scale, want)


def test_exl2_quantize_roundtrips_bit_exactly_and_beats_rtn():
    torch.set_num_threads(1)
    W, H = _problem()
    prepared = prepare_exl2_hessian(H)
    base = weighted_error(W, torch.zeros_like(W), H)
    for qp in [ATTN_OPTIONS[0]["q"], ATTN_OPTIONS[6]["q"], MLP_OPTIONS[4]["down"], HEAD_OPTIONS[8]]:
        r = exl2_quantize(W, qp, prepared=prepared)
        t = pack_result(r)
        check_exl2_tensors(t, qp.desc)
        D = dequantize_exl2(t)  # N=48 is padded to 64 columns on disk
        assert torch.equal(D[:48], r.W_hat), qp.desc  # the file reproduces W_hat bit for bit
        assert D.shape == (64, 256) and torch.count_nonzero(D[48:]) == 0
        assert r.storage_bits() == sum(v.numel() * v.element_size() * 8 for v in t.values())
        assert torch.equal(r.perm, torch.argsort(torch.diagonal(H), descending=True, stable=True))
        row = 0
        for b, rows in zip(r.group_bits, r.group_rows):
            assert 0 <= r.codes[row:row + rows].min() and r.codes[row:row + rows].max() < (1 << b)
            row += rows
        rtn = exl2_quantize(W, qp, torch.eye(W.shape[1]))  # same grid, no error feedback
        err, err_rtn = weighted_error(W, r.W_hat, H), weighted_error(W, rtn.W_hat, H)
        assert err < err_rtn, qp.desc
        assert err / base < {2: 0.2, 3: 0.08, 4: 0.03, 8: 0.001}[max(qp.bits) if len(qp.bits) == 1 else qp.bits[-1]]


def test_more_bits_less_error_and_dead_inputs_zeroed():
    W, H = _problem(seed=5)
    errs = [weighted_error(W, exl2_quantize(W, ATTN_OPTIONS[i]["q"], H).W_hat, H) for i in (0, 4, 9, 14, 18)]
    assert errs == sorted(errs, reverse=True)
    H[:, 7] = 0
    H[7, :] = 0
    r = exl2_quantize(W, HEAD_OPTIONS[6], H)
    assert r.dead_columns == 1 and torch.count_nonzero(r.W_hat[:, 7]) == 0
    assert torch.equal(dequantize_exl2(pack_result(r))[:48], r.W_hat)


def test_zero_weights_quantize_to_zero():
    r = exl2_quantize(torch.zeros(32, 64), ATTN_OPTIONS[6]["q"], torch.eye(64))
    assert torch.count_nonzero(r.W_hat) == 0 and torch.isfinite(r.W_hat).all()
    assert torch.equal(dequantize_exl2(pack_result(r)), r.W_hat)


# -- loader checks (§3.10) -------------------------------------------------------------------------


def test_loader_checks_reject_broken_tensors():
    t, _, _ = _worked_example()

    def broken(**change):
        bad = dict(t)
        bad.update(change)
        with pytest.raises(InputError):
            check_exl2_tensors(bad, "x")

    broken(q_weight=t["q_weight"].to(torch.int64))
    broken(q_scale_max=t["q_scale_max"].float())
    broken(q_groups=torch.tensor([2, 0, 3, 2, 4, 4], dtype=torch.int16))  # widths increasing
    broken(q_invperm=torch.zeros(96, dtype=torch.int32))
    broken(q_perm=torch.arange(96, dtype=torch.int16))  # != argsort(q_invperm)
    broken(q_scale=t["q_scale"][:, :3])
    broken(bias=torch.zeros(32, dtype=torch.float32))
    broken(q_weight=t["q_weight"][:, :16], q_scale=t["q_scale"][:, :2])  # 16 columns: not padded to 32
    ok = dict(t, bias=torch.zeros(32, dtype=torch.float16), q_perm=torch.argsort(t["q_invperm"].long()).to(torch.int16))
    check_exl2_tensors(ok, "x")
    with pytest.raises(InputError):
        check_exl2_tensors({k: v for k, v in t.items() if k != "q_groups"}, "x")


def test_format_from_config_and_protocol():
    fmt = format_from_config({"quant_method": "exl2", "version": "0.3.2", "bits": 4.0, "head_bits": 6,
                              "calibration": {"rows": 8, "length": 64, "dataset": "x"}})
    assert isinstance(fmt, EXL2Format) and fmt.bits == 4.0 and fmt.head_bits == 6
    qc = EXL2Format(3.5, 8, {"rows": 1, "length": 2, "dataset": "d"}).quantization_config()
    assert qc == {"quant_method": "exl2", "version": "0.3.2", "bits": 3.5, "head_bits": 8,
                  "calibration": {"rows": 1, "length": 2, "dataset": "d"}}
    t, _, _ = _worked_example()
    assert fmt.weight_shape({k: tuple(v.shape) for k, v in t.items()}) == (32, 96)
    b = fmt.pack_bias(torch.ones(40))
    assert b.dtype == torch.float16 and b.shape == (64,) and b[40:].abs().sum() == 0


# -- optimizer (§3.4) ------------------------------------------------------------------------------


def _random_slots(n_slots=5, n_opts=6, seed=0, unit=1000):
    g = torch.Generator().manual_seed(seed)
    slots = []
    for s in range(n_slots):
        costs = sorted(int(c) * unit for c in torch.randint(10, 100, (n_opts,), generator=g))
        errs = sorted((torch.rand(n_opts, generator=g) * 0.2 + 1e-3).tolist(), reverse=True)
        slots.append(Slot(f"s{s}", tuple(costs), tuple(errs)))
    return slots


def _brute(slots, budget, norm):
    best = None
    for choice in itertools.product(*[range(len(s.costs)) for s in slots]):
        cost = sum(s.costs[j] for s, j in zip(slots, choice))
        if cost <= budget:
            obj = sum(s.errors[j] ** norm for s, j in zip(slots, choice))
            if best is None or obj < best - 1e-12:
                best = obj
    return best


@pytest.mark.parametrize("seed", range(6))
def test_optimizer_meets_budget_and_is_optimal(seed):
    slots = _random_slots(seed=seed)
    lo = sum(min(s.costs) for s in slots)
    hi = sum(max(s.costs) for s in slots)
    for frac in (0.1, 0.35, 0.6, 0.9):
        budget = int(lo + frac * (hi - lo))
        for norm in (1.0, 2.5):
            sol = optimize(slots, budget, norm=norm, resolution=budget // 1000)  # exact units: DP is exact
            assert sol.total_bits <= budget
            assert sol.total_bits == sum(s.costs[j] for s, j in zip(slots, sol.choice))
            assert sol.objective == pytest.approx(_brute(slots, budget, norm), rel=1e-12)
            # default resolution: within budget, and at least as good as the exact optimum for the
            # budget less the rounding slack (one DP unit per slot)
            approx = optimize(slots, budget, norm=norm, resolution=1000)
            slack = len(slots) * budget / 1000
            assert approx.total_bits <= budget
            assert approx.objective <= _brute(slots, budget - slack, norm) + 1e-12


def test_optimizer_is_deterministic_and_refuses_impossible_budgets():
    slots = _random_slots(n_slots=12, n_opts=17, seed=9, unit=12345)
    budget = sum(min(s.costs) for s in slots) * 2
    a = optimize(slots, budget, norm=None)
    b = optimize(slots, budget, norm=None)
    assert a == b and a.total_bits <= budget and 1.5 <= a.norm <= 3.6
    assert optimize(slots, budget) == optimize(slots, budget)
    with pytest.raises(InputError, match="cheapest"):
        optimize(slots, sum(min(s.costs) for s in slots) - 1, target="--bpw 2.0")
    # an unlimited budget takes the lowest-error option everywhere
    top = optimize(slots, sum(max(s.costs) for s in slots))
    assert all(s.errors[j] == min(s.errors) for s, j in zip(slots, top.choice))


def test_slot_tables_cover_every_supported_family():
    from quantize.arch import by_name, dense_families
    from quantize.methods.exl2 import slot_linears

    for fam in dense_families():  # MoE families: tests/test_exl2_moe.py
        slots = slot_linears(by_name(fam))
        assert set(slots) == {"self_attn", "mlp"} and set(slots) < set(SLOT_OPTIONS), fam


def test_an_unreached_input_is_measured_as_it_is_quantized():
    """No calibration signal (an all-zero Hessian, e.g. an expert no token reached): the measurement
    prepares the identity (exl2_layer._hessian_or_eye) and the quantization pass rounds by exl2_rtn in
    the inputs' own order. The identity's act-order is that order and its factor feeds no error
    forward, so the option the measurement scored is exactly what gets written."""
    from quantize.methods.exl2 import QParams, exl2_quantize, exl2_rtn, prepare_exl2_hessian

    K, N = 256, 64
    W = torch.randn(N, K, generator=torch.Generator().manual_seed(0))
    qp = QParams(bits=(6, 4, 3), bits_prop=(0.1, 0.4, 0.5), group_size=(32, 32, 32))
    measured = exl2_quantize(W, qp, prepared=prepare_exl2_hessian(torch.eye(K)))
    written = exl2_rtn(W, qp)
    assert torch.equal(measured.perm, written.perm) and torch.equal(measured.codes, written.codes)
    assert torch.equal(measured.W_hat, written.W_hat)
