"""GPTQ checkpoint tensors (FORMATS.md §1): pack, unpack, loader-exact dequantization, config.

Per quantized linear ``W [N, K]`` with ``b`` bits and ``G`` groups (§1.3):

- ``qweight`` int32 ``[K·b/32, N]``: for every output column n, the K codes (original k order) as one
  LSB-first bitstream cut into int32 words along dim 0 (3-bit values straddle words);
- ``qzeros`` int32 ``[G, N·b/32]``: per group row, the N stored zero fields as one bitstream along N;
  v1 ``gptq`` stores ``z − 1``, v2 ``gptq_v2`` stores ``z`` (§1.4);
- ``scales`` fp16 ``[G, N]``; ``g_idx`` int32 ``[K]``. (``bias`` is the caller's business.)

Pure tensor functions: no files, no model. ``dequantize_gptq(pack_quant_result(r)) == r.W_hat`` bit for
bit, because the solvers quantize against fp16-exact scales and both sides share
``methods.grid.dequantize_grouped``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from functools import lru_cache
from math import gcd
from typing import Any

import torch
from torch import Tensor

from .. import __version__
from ..errors import InputError
from ..methods.grid import SUPPORTED_BITS, QuantResult, QuantSpec, all_finite, dequantize_grouped

CHECKPOINT_FORMATS = ("gptq", "gptq_v2")
_WORD = 1 << 32


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise InputError(f"GPTQ bits={bits} is not supported; use one of {', '.join(map(str, SUPPORTED_BITS))}")


def _check_format(checkpoint_format: str) -> None:
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise InputError(f"checkpoint_format {checkpoint_format!r} is not supported; use 'gptq' (v1) or 'gptq_v2'")


@lru_cache(maxsize=None)
def _layout(bits: int) -> tuple[int, int, tuple[int, ...], tuple[int, ...]]:
    """The repeating unit of an LSB-first ``bits``-wide stream in int32 words.

    Returns (values per unit, words per unit, word index of each value, bit offset of each value);
    e.g. 4 bits: 8 values in 1 word; 3 bits: 32 values in 3 words.
    """
    unit = gcd(bits, 32)
    n_vals, n_words = 32 // unit, bits // unit
    pos = [i * bits for i in range(n_vals)]
    return n_vals, n_words, tuple(p // 32 for p in pos), tuple(p % 32 for p in pos)


def pack_lsb_bitstream(values: Tensor, bits: int, *, what: str = "values") -> Tensor:
    """Pack the last dim of ``values`` (ints in ``[0, 2^bits)``) as an LSB-first bitstream of int32 words.

    ``[..., L] -> [..., L·bits/32]``; value i occupies bits ``[i·bits, (i+1)·bits)`` of the stream
    ``word0 | word1 << 32 | …`` (FORMATS.md §0.2). L must fill whole words (3-bit: L % 32 == 0).
    """
    n_vals, n_words, word_of, shift = _layout(bits)
    L = values.shape[-1]
    if L % n_vals:
        raise InputError(f"{what}={L} is not a multiple of {n_vals}, so {bits}-bit values do not fill whole int32 words")
    dev = values.device
    word_t = torch.tensor(word_of, device=dev)
    shift_t = torch.tensor(shift, device=dev)
    v = values.to(torch.int64).reshape(*values.shape[:-1], L // n_vals, n_vals)
    out = torch.zeros(*v.shape[:-1], n_words, dtype=torch.int64, device=dev)
    out.index_add_(-1, word_t, (v << shift_t) & (_WORD - 1))  # fields are disjoint: add == or
    spill = shift_t + bits > 32  # values straddling into the next word (3-bit only)
    if bool(spill.any()):
        out.index_add_(-1, word_t[spill] + 1, v[..., spill] >> (32 - shift_t[spill]))
    out = out.reshape(*values.shape[:-1], L // n_vals * n_words)
    return torch.where(out >= (1 << 31), out - _WORD, out).to(torch.int32)


def unpack_lsb_bitstream(words: Tensor, bits: int, *, what: str = "words") -> Tensor:
    """Inverse of ``pack_lsb_bitstream``: ``[..., W]`` int32 -> ``[..., W·32/bits]`` int64 values."""
    n_vals, n_words, word_of, shift = _layout(bits)
    W = words.shape[-1]
    if W % n_words:
        raise InputError(f"{what}: {W} int32 words is not a multiple of {n_words}, so they do not hold whole {bits}-bit values")
    dev = words.device
    word_t = torch.tensor(word_of, device=dev)
    shift_t = torch.tensor(shift, device=dev)
    w = (words.to(torch.int64) & (_WORD - 1)).reshape(*words.shape[:-1], W // n_words, n_words)
    v = w[..., word_t] >> shift_t
    spill = shift_t + bits > 32
    if bool(spill.any()):
        nxt = w[..., (word_t + 1).clamp(max=n_words - 1)] << (32 - shift_t)
        v = v | torch.where(spill, nxt, torch.zeros_like(nxt))
    v = v & ((1 << bits) - 1)
    return v.reshape(*words.shape[:-1], W // n_words * n_vals)


def _within(t: Tensor, lo: int, hi: int) -> bool:
    """Whether every value of the non-empty integer tensor ``t`` lies in ``[lo, hi]`` (one pass)."""
    t_lo, t_hi = torch.aminmax(t)
    return int(t_lo) >= lo and int(t_hi) <= hi


def pack_gptq(
    codes: Tensor,
    scales: Tensor,
    zeros: Tensor,
    g_idx: Tensor,
    *,
    bits: int,
    checkpoint_format: str = "gptq",
    name: str = "weight",
) -> dict[str, Tensor]:
    """GPTQ tensors for one linear: ``{"qweight", "qzeros", "scales", "g_idx"}``.

    ``codes`` int ``[N, K]`` (original column order), ``scales`` ``[G, N]`` (written as fp16),
    ``zeros`` int ``[G, N]`` holding the true zero-point z, ``g_idx`` ``[K]``. InputError when a value
    cannot be stored — notably z = 0 in v1 ``gptq`` (it stores z − 1; §1.4): quantize with
    ``v1_safe_zeros=True`` or write ``gptq_v2``.
    """
    _check_bits(bits)
    _check_format(checkpoint_format)
    maxq = (1 << bits) - 1
    if codes.ndim != 2:
        raise InputError(f"{name}: codes must be [out_features, in_features], got shape {tuple(codes.shape)}")
    N, K = codes.shape
    if scales.ndim != 2 or scales.shape[1] != N or zeros.shape != scales.shape:
        raise InputError(
            f"{name}: scales {tuple(scales.shape)} and zeros {tuple(zeros.shape)} must both be [groups, {N}]"
        )
    G = scales.shape[0]
    if g_idx.shape != (K,):
        raise InputError(f"{name}: g_idx has shape {tuple(g_idx.shape)}, expected [{K}]")
    if K and not _within(g_idx, 0, G - 1):
        raise InputError(f"{name}: g_idx values must lie in [0, {G}) (one per scales row)")
    if codes.numel() and not _within(codes, 0, maxq):
        raise InputError(f"{name}: codes must lie in [0, {maxq}] for {bits}-bit GPTQ")
    stored = zeros.to(torch.int64) - (1 if checkpoint_format == "gptq" else 0)
    if checkpoint_format == "gptq" and stored.numel() and int(stored.min()) < 0:
        raise InputError(
            f"{name}: zero-point 0 cannot be stored in checkpoint_format 'gptq' (v1 stores z-1); "
            "quantize with v1_safe_zeros=True or write checkpoint_format 'gptq_v2'"
        )
    if stored.numel() and not _within(stored, 0, maxq):
        raise InputError(f"{name}: zero-points must lie in [0, {maxq}] for {bits}-bit {checkpoint_format}")
    scales16 = scales.to(torch.float16)
    if not all_finite(scales16):
        raise InputError(f"{name}: scales overflow fp16; leave this module unquantized")
    if not torch.equal(scales16.to(torch.float32), scales.to(torch.float32)):
        raise InputError(f"{name}: scales are not exact in fp16, which this format stores; quantize with --scale-dtype float16")
    return {
        "qweight": pack_lsb_bitstream(codes, bits, what=f"{name}: in_features").T.contiguous(),
        "qzeros": pack_lsb_bitstream(stored, bits, what=f"{name}: out_features").contiguous(),
        "scales": scales16.contiguous(),
        "g_idx": g_idx.to(torch.int32).contiguous(),
    }


def pack_quant_result(result: QuantResult, *, checkpoint_format: str = "gptq", name: str = "weight") -> dict[str, Tensor]:
    """``pack_gptq`` for a GPTQ/RTN ``QuantResult``."""
    return pack_gptq(
        result.codes, result.scales, result.zeros, result.g_idx,
        bits=result.bits, checkpoint_format=checkpoint_format, name=name,
    )


def _get(tensors: Mapping[str, Tensor], key: str, dtype: torch.dtype | None = None) -> Tensor:
    if key not in tensors:
        raise InputError(f"{key}: missing from the checkpoint; every GPTQ linear needs qweight, qzeros and scales")
    t = tensors[key]
    if dtype is not None and t.dtype != dtype:
        raise InputError(f"{key}: dtype {t.dtype} but GPTQ stores {dtype}; the file is not a GPTQ int32 checkpoint")
    return t


def unpack_gptq(
    tensors: Mapping[str, Tensor], bits: int, checkpoint_format: str = "gptq", *, prefix: str = ""
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Read ``prefix + {qweight, qzeros, scales, g_idx}`` back to ``(codes, scales, zeros, g_idx)``.

    ``codes`` int32 ``[N, K]``, ``scales`` fp32 ``[G, N]``, ``zeros`` int32 ``[G, N]`` (true z: the v1
    field + 1, unmasked like vLLM/exllama), ``g_idx`` int32 ``[K]`` (``k // (K/G)`` when absent).
    """
    _check_bits(bits)
    _check_format(checkpoint_format)
    qweight = _get(tensors, prefix + "qweight", torch.int32)
    qzeros = _get(tensors, prefix + "qzeros", torch.int32)
    scales = _get(tensors, prefix + "scales")
    if qweight.ndim != 2 or qzeros.ndim != 2 or scales.ndim != 2:
        raise InputError(f"{prefix}qweight/qzeros/scales: expected 2-D tensors")
    N = qweight.shape[1]
    G = scales.shape[0]
    codes = unpack_lsb_bitstream(qweight.T, bits, what=prefix + "qweight").to(torch.int32).contiguous()
    K = codes.shape[1]
    if scales.shape[1] != N:
        raise InputError(f"{prefix}scales: shape {tuple(scales.shape)} but qweight has {N} output columns")
    if qzeros.shape[0] != G or qzeros.shape[1] * 32 != N * bits:
        raise InputError(f"{prefix}qzeros: shape {tuple(qzeros.shape)}, expected [{G}, {N * bits // 32}] for {bits}-bit")
    stored = unpack_lsb_bitstream(qzeros, bits, what=prefix + "qzeros")
    zeros = (stored + (1 if checkpoint_format == "gptq" else 0)).to(torch.int32)
    key = prefix + "g_idx"
    if key in tensors:
        g_idx = tensors[key]
        if g_idx.shape != (K,) or g_idx.is_floating_point():
            raise InputError(f"{key}: expected an integer [{K}] tensor, got {g_idx.dtype} {tuple(g_idx.shape)}")
        if bool((g_idx < 0).any() or (g_idx >= G).any()):
            raise InputError(f"{key}: values must lie in [0, {G}) (one per scales row)")
        g_idx = g_idx.to(torch.int32)
    else:
        if K % G:
            raise InputError(f"{key}: missing and in_features={K} is not a multiple of the {G} groups; add g_idx")
        g_idx = (torch.arange(K, device=codes.device) // (K // G)).to(torch.int32)
    return codes, scales.to(torch.float32), zeros, g_idx


def dequantize_gptq(
    tensors: Mapping[str, Tensor], bits: int, checkpoint_format: str = "gptq", *, prefix: str = ""
) -> Tensor:
    """``W[n, k] = scales[g, n] · (q[k, n] − z[g, n])`` with ``g = g_idx[k]``, fp32 ``[N, K]`` (§1.7).

    The product of an fp16 scale and a small integer is exact in fp32; an fp16 kernel rounds it once more.
    """
    return dequantize_grouped(*unpack_gptq(tensors, bits, checkpoint_format, prefix=prefix))


def quantization_config(
    spec: QuantSpec,
    *,
    checkpoint_format: str = "gptq",
    true_sequential: bool = True,
    lm_head: bool = False,
    model_file_base_name: str | None = "model",
    dynamic: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """``config.json["quantization_config"]`` (= ``quantize_config.json``) for a GPTQ export (§1.2).

    Carries what vLLM/transformers require (``quant_method``, ``bits``, ``group_size``, ``desc_act``,
    ``sym``), ``checkpoint_format`` plus GPTQModel's aliases (``format``, ``method``, ``pack_dtype``,
    ``meta``) and AutoGPTQ's bookkeeping (``model_file_base_name``: the weights file stem).
    ``dynamic`` is GPTQModel's per-module override map (e.g. ``{"-:.*lm_head": {}}``).
    """
    _check_format(checkpoint_format)
    cfg: dict[str, Any] = {
        "quant_method": "gptq",
        "method": "gptq",
        "bits": spec.bits,
        "group_size": spec.group_size,
        # static ordering (act-order solved, groups on the original columns: a trivial g_idx) is
        # stored as desc_act false, which every loader takes; vLLM refuses desc_act true
        "desc_act": spec.act_order and not spec.static_groups and spec.group_size != -1,
        "sym": spec.sym,
        "static_groups": spec.static_groups,
        "true_sequential": true_sequential,
        "damp_percent": spec.damp,
        "checkpoint_format": checkpoint_format,
        "format": checkpoint_format,
        "pack_dtype": "int32",
        "lm_head": lm_head,
        "model_name_or_path": None,
        "model_file_base_name": model_file_base_name,
        "meta": {
            "quantizer": [f"quantize:{__version__}"],
            "damp_percent": spec.damp,
            "static_groups": spec.static_groups,
            "true_sequential": true_sequential,
            "mse": 2.4 if spec.mse else 0.0,
        },
    }
    if dynamic:
        cfg["dynamic"] = dynamic
    return cfg


def quantize_config_json(spec: QuantSpec, **kwargs: Any) -> str:
    """The text of ``quantize_config.json`` (same payload as ``quantization_config``)."""
    return json.dumps(quantization_config(spec, **kwargs), indent=2) + "\n"
