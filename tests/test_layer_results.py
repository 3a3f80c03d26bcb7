"""What a layer's results hold until the layer is written (executor/context.LayerContext.place).

A layer's results live from its solve until its tensors are packed, so their size is part of the
run's peak: with int32 codes and a private fp32 ``W_hat`` per expert they were 8 bytes per weight
(a DeepSeek-V3 MoE layer: 11e9 expert weights, ~90 GB), on the device when it computes. Now codes
are one byte and an expert's ``W_hat`` is the slice of the experts' parameter it was placed in.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from quantize.methods.grid import QuantResult, QuantSpec
from quantize.methods.layer import GPTQMethod, RTNMethod
from quantize.methods.rtn import rtn_quantize

from helpers import CPU, replaced, run_gptq


def _storages(module: torch.nn.Module) -> set[int]:
    return {p.untyped_storage().data_ptr() for p in module.parameters()}


def _checking(method_cls: type, checked: list[str]):
    """A ``process_layer`` that, after the real one, checks every result against the layer's
    modules: uint8 codes; an expert's ``W_hat`` is a view into the experts module's parameters (no
    second copy), and equals the dequantized codes; a dense linear's ``W_hat`` is its weight."""
    from quantize.methods.grid import dequantize_grouped

    orig = method_cls.process_layer

    def process_layer(self, ctx):
        res = orig(self, ctx)
        experts = ctx.module(ctx.experts_module) if ctx.experts_module else None
        for name, r in res.results.items():
            assert r.codes.dtype == torch.uint8, name
            assert torch.equal(r.W_hat, dequantize_grouped(r.codes, r.scales, r.zeros, r.g_idx)), name
            if ctx.arch.expert_slot(name) is not None and experts is not None:
                assert r.W_hat.untyped_storage().data_ptr() in _storages(experts), name
            else:
                assert r.W_hat.data_ptr() == ctx.module(name).weight.data_ptr(), name
            checked.append(ctx.prefix + name)
        return res

    return process_layer


@pytest.mark.parametrize("method_cls,rtn", [(GPTQMethod, False), (RTNMethod, True)], ids=["gptq", "rtn"])
@pytest.mark.parametrize("chunk", [None, 2], ids=["resident", "expert-chunk-2"])
@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "gpt_oss"])
def test_expert_results_share_the_placed_weights(family, chunk, method_cls, rtn, tiny_model_dir, calib_for, tmp_path):
    model = tiny_model_dir(family)
    checked: list[str] = []
    with replaced(method_cls, "process_layer", _checking(method_cls, checked)):
        run_gptq(model, calib_for(model), tmp_path / "out", rtn=rtn,
                 exec_cfg=dataclasses.replace(CPU, expert_chunk=chunk))
    assert any(".experts." in n for n in checked) and any("self_attn" in n for n in checked)


def test_codes_are_one_byte_and_exact():
    """Every grid has at most 8 bits: a result built from int32 codes keeps them as uint8, 8-bit
    codes up to 255 included, and packs the same."""
    from quantize.formats.compressed_tensors import pack_int

    W = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    spec = QuantSpec(bits=8, group_size=32, sym=False)
    r = rtn_quantize(W, spec)
    assert r.codes.dtype == torch.uint8 and int(r.codes.max()) == 255 and int(r.codes.min()) == 0
    wide = dataclasses.replace(r, codes=r.codes.to(torch.int32))
    assert wide.codes.dtype == torch.uint8 and torch.equal(wide.codes, r.codes)
    a = pack_int(r.codes, r.scales, r.zeros, bits=8, sym=False, scale_dtype=torch.float16)
    b = pack_int(r.codes.to(torch.int32), r.scales, r.zeros, bits=8, sym=False, scale_dtype=torch.float16)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert isinstance(r, QuantResult)


def test_plan_counts_the_results_a_run_holds(tiny_model_dir, calib_for, tmp_path):
    """``quantize plan``'s results figure is the largest layer's code bytes (one a weight, every
    linear the run quantizes, experts included) plus its group parameters at group 128."""
    import math

    from quantize.arch import get_arch
    from quantize.io.reader import CheckpointReader
    from quantize.plan import run_memory

    model = tiny_model_dir("qwen3_moe")
    cfg = CheckpointReader(model).config
    arch = get_arch(cfg)
    per_layer: dict[int, int] = {}

    def keep(method_cls):
        orig = method_cls.process_layer

        def process_layer(self, ctx):
            res = orig(self, ctx)
            per_layer[ctx.index] = sum(r.codes.nbytes for r in res.results.values())
            return res
        return process_layer

    with replaced(GPTQMethod, "process_layer", keep(GPTQMethod)):
        run_gptq(model, calib_for(model), tmp_path / "out")
    groups = max(sum(8 * N * math.ceil(K / 128) for N, K in (arch.linear_shape(n, cfg) for n in arch.layer_linears(cfg, i)))
                 for i in per_layer)
    assert run_memory(cfg, arch)["results_bytes_max"] == max(per_layer.values()) + groups
