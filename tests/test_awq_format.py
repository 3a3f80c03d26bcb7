"""AWQ GEMM tensors: FORMATS.md §2.6 worked examples bit for bit, round trips, config, read-back."""

from __future__ import annotations

import pytest
import torch

from quantize.errors import InputError
from quantize.formats.awq import (
    ORDER,
    REVERSE,
    AWQFormat,
    awq_spec,
    dequantize_awq,
    pack_awq,
    pack_columns,
    unpack_awq,
    unpack_columns,
)
from quantize.formats.registry import format_from_config
from quantize.methods.awq import awq_quantize

from helpers import EXAMPLE_A_W, format_example, tensor_sha256, u32


def test_worked_example_8x8_bit_for_bit():
    Q, scales, zeros, _ = format_example(8, 8, 2, 256)
    t = pack_awq(Q, scales, zeros)
    assert t["qweight"].dtype == torch.int32 and tuple(t["qweight"].shape) == (8, 1)
    assert u32(t["qweight"]) == [0x71B54E82, 0xC60A93D7, 0x1B5FE82C, 0x60A43D71,
                                  0xB5F982C6, 0x0A4ED71B, 0x5F932C60, 0xA4E871B5]
    assert t["qweight"].reshape(-1).tolist() == [1907707522, -972385321, 459270188, 1621376369,
                                                 -1241939258, 172939035, 1603480672, -1528270411]
    assert tuple(t["qzeros"].shape) == (2, 1)
    assert u32(t["qzeros"]) == [0x86427531, 0xB975A864]
    assert t["scales"].dtype == torch.float16 and torch.equal(t["scales"].float(), scales.float())
    assert torch.equal(dequantize_awq(t), torch.tensor(EXAMPLE_A_W))


def test_worked_example_32x32_bit_for_bit():
    Q, scales, zeros, _ = format_example(32, 32, 2, 1024)
    t = pack_awq(Q, scales, zeros)
    assert tuple(t["qweight"].shape) == (32, 4) and tuple(t["qzeros"].shape) == (2, 4)
    assert u32(t["qweight"][0]) == [0x71B54E82, 0xF93DC60A, 0x71B54E82, 0xF93DC60A]
    assert tensor_sha256(t["qweight"]) == "d93276de82fddbd13e8d3bdaaeaa2c791b14e4eb9a85a40656a81a65d73584be"
    assert u32(t["qzeros"]) == [0x86427531, 0x1ECAFDB9, 0x97538642, 0x2FDB1ECA,
                                 0xB975A864, 0x42FD31EC, 0xCA86B975, 0x531E42FD]
    assert tensor_sha256(t["qzeros"]) == "7331da78a91c084bcc0edef0e5cda5a548d8886007600aaf2e45408d18411a16"
    codes, s, z = unpack_awq(t)
    assert torch.equal(codes, Q.to(torch.int32)) and torch.equal(z, zeros.to(torch.int32))
    assert torch.equal(s, scales.float())


def test_interleave_order_and_single_word():
    assert [REVERSE[c] for c in ORDER] == list(range(8))
    # column c holds value c: nibble i must hold ORDER[i]
    w = u32(pack_columns(torch.arange(8).view(1, 8)))[0]
    assert [(w >> (4 * i)) & 0xF for i in range(8)] == list(ORDER)
    vals = torch.randint(0, 16, (5, 7, 64), generator=torch.Generator().manual_seed(0))
    assert torch.equal(unpack_columns(pack_columns(vals)), vals)


@pytest.mark.parametrize("group_size", [16, 64, -1])
def test_quantize_pack_dequantize_round_trip(group_size):
    W = torch.randn(48, 64, generator=torch.Generator().manual_seed(1)) * 0.05
    W[3, 5] = 2.0  # an outlier group
    r = awq_quantize(W, awq_spec(group_size))
    fmt = AWQFormat(group_size)
    t = fmt.pack(r)
    G = 1 if group_size == -1 else 64 // group_size
    assert tuple(t["qweight"].shape) == (64, 6) and tuple(t["scales"].shape) == (G, 48)
    assert torch.equal(fmt.dequantize(t), r.W_hat)  # bit for bit
    assert fmt.weight_shape({k: tuple(v.shape) for k, v in t.items()}) == (48, 64)
    # the grid covers every group's [min, max]: error at most half a step
    step = r.scales.T.repeat_interleave(64 // G, dim=1)
    assert bool(((r.W_hat - W).abs() <= step / 2 + 1e-7).all())
    assert int(r.zeros.min()) >= 0 and int(r.zeros.max()) <= 15


def test_pack_refuses_unstorable():
    Q = torch.zeros(12, 8, dtype=torch.int32)
    with pytest.raises(InputError, match="multiple of 8"):
        pack_awq(Q, torch.ones(1, 12), torch.zeros(1, 12, dtype=torch.int32))
    Q = torch.zeros(8, 8, dtype=torch.int32)
    with pytest.raises(InputError, match=r"\[0, 15\]"):
        pack_awq(Q + 16, torch.ones(1, 8), torch.zeros(1, 8, dtype=torch.int32))
    with pytest.raises(InputError, match="overflow fp16"):
        pack_awq(Q, torch.full((1, 8), 1e6), torch.zeros(1, 8, dtype=torch.int32))
    with pytest.raises(InputError, match="missing"):
        dequantize_awq({"qweight": torch.zeros(8, 1, dtype=torch.int32)})


def test_config_and_registry():
    qc = AWQFormat(128).quantization_config()
    assert qc == {"quant_method": "awq", "version": "gemm", "bits": 4, "group_size": 128, "zero_point": True,
                  "modules_to_not_convert": None}
    fmt = format_from_config(qc)
    assert isinstance(fmt, AWQFormat) and fmt.group_size == 128 and fmt.suffixes == ("qweight", "qzeros", "scales")
    assert format_from_config({"quant_method": "AWQ", "version": "GEMM", "w_bit": 4, "q_group_size": 64}).group_size == 64
    for bad, needle in [({"version": "gemv"}, "gemv"), ({"bits": 3}, "4-bit"), ({"zero_point": False}, "zero_point"),
                        ({"group_size": 0}, "group_size")]:
        with pytest.raises(InputError, match=needle):
            format_from_config({"quant_method": "awq", **bad}, source="x/config.json")
