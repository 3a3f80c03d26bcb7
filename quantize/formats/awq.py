"""AWQ "GEMM" checkpoint tensors (FORMATS.md §2): pack, unpack, loader-exact dequantization, config.

Per quantized linear ``W [N, K]`` (4 bits, group ``g``, ``G = K / g`` groups, asymmetric):

- ``qweight`` int32 ``[K, N/8]``: row k holds the N codes ``q[n, k]`` packed along **N**, eight per
  word, in the AWQ interleave: nibble ``i`` of word ``j`` holds column ``8j + ORDER[i]``
  (``ORDER = [0, 2, 4, 6, 1, 3, 5, 7]``, §2.3);
- ``qzeros`` int32 ``[G, N/8]``: the integer zero-points, same interleave, stored raw (no −1);
- ``scales`` fp16 ``[G, N]``. (``bias`` is the caller's business.)

The loader computes ``W[n, k] = (q[k, n] − z[k // g, n]) · scales[k // g, n]`` (§2.4). Groups are
always contiguous: no ``g_idx``, no act-order. Pure tensor functions: no files, no model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ..errors import InputError
from ..methods.grid import QuantResult, QuantSpec, dequantize
from .gptq import pack_lsb_bitstream, unpack_lsb_bitstream

BITS = 4
PACK = 32 // BITS  # codes per int32 word
ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of a word holds column 8j + ORDER[i]
REVERSE = (0, 4, 1, 5, 2, 6, 3, 7)  # column 8j + c lives in nibble REVERSE[c]
SUFFIXES = ("qweight", "qzeros", "scales")
_MAXQ = (1 << BITS) - 1


def awq_spec(group_size: int, scale_dtype: str = "float16") -> QuantSpec:
    """The grid AWQ GEMM stores: 4-bit, asymmetric, zero-point 0 allowed (stored raw); fp16 scales
    (another ``scale_dtype`` for formats that store the same grid otherwise: compressed-tensors)."""
    return QuantSpec(bits=BITS, group_size=group_size, sym=False, act_order=False, v1_safe_zeros=False,
                     scale_dtype=scale_dtype)


def _interleave(values: Tensor) -> Tensor:
    """Reorder the last dim (columns) into nibble order: out[..., 8j + i] = values[..., 8j + ORDER[i]]."""
    n = values.shape[-1]
    idx = (torch.arange(n // PACK).unsqueeze(1) * PACK + torch.tensor(ORDER)).reshape(-1).to(values.device)
    return values.index_select(-1, idx)


def _deinterleave(nibbles: Tensor) -> Tensor:
    """Inverse of :func:`_interleave`: out[..., 8j + c] = nibbles[..., 8j + REVERSE[c]]."""
    n = nibbles.shape[-1]
    idx = (torch.arange(n // PACK).unsqueeze(1) * PACK + torch.tensor(REVERSE)).reshape(-1).to(nibbles.device)
    return nibbles.index_select(-1, idx)


def pack_columns(values: Tensor, *, what: str = "values") -> Tensor:
    """``[..., N]`` 4-bit ints -> ``[..., N/8]`` int32 words in the AWQ interleave (N % 8 == 0)."""
    if values.shape[-1] % PACK:
        raise InputError(f"{what}={values.shape[-1]} is not a multiple of {PACK}; AWQ GEMM packs 8 output columns per int32")
    return pack_lsb_bitstream(_interleave(values.to(torch.int64)), BITS, what=what)


def unpack_columns(words: Tensor, *, what: str = "words") -> Tensor:
    """Inverse of :func:`pack_columns`: ``[..., W]`` int32 -> ``[..., 8W]`` int64 codes in column order."""
    return _deinterleave(unpack_lsb_bitstream(words, BITS, what=what))


def pack_awq(codes: Tensor, scales: Tensor, zeros: Tensor, *, name: str = "weight") -> dict[str, Tensor]:
    """AWQ GEMM tensors for one linear: ``{"qweight", "qzeros", "scales"}``.

    ``codes`` int ``[N, K]`` (like ``W``), ``scales`` ``[G, N]`` (written as fp16; pass fp16-exact
    values for a lossless round trip), ``zeros`` int ``[G, N]`` (the true zero-point). Groups are the
    contiguous column blocks ``k // (K / G)``.
    """
    if codes.ndim != 2:
        raise InputError(f"{name}: codes must be [out_features, in_features], got shape {tuple(codes.shape)}")
    N, K = codes.shape
    if scales.ndim != 2 or scales.shape[1] != N or tuple(zeros.shape) != tuple(scales.shape):
        raise InputError(f"{name}: scales {tuple(scales.shape)} and zeros {tuple(zeros.shape)} must both be [groups, {N}]")
    G = scales.shape[0]
    if G < 1 or K % G:
        raise InputError(f"{name}: in_features={K} is not a multiple of the group count {G}; AWQ groups are contiguous")
    if N % PACK:
        raise InputError(f"{name}: out_features={N} is not a multiple of {PACK}; AWQ GEMM cannot store it, leave it unquantized")
    if bool((codes < 0).any() or (codes > _MAXQ).any()):
        raise InputError(f"{name}: codes must lie in [0, {_MAXQ}] for 4-bit AWQ")
    if bool((zeros < 0).any() or (zeros > _MAXQ).any()):
        raise InputError(f"{name}: zero-points must lie in [0, {_MAXQ}] for 4-bit AWQ")
    scales16 = scales.to(torch.float16)
    if not bool(torch.isfinite(scales16).all()):
        raise InputError(f"{name}: scales overflow fp16; leave this module unquantized")
    if not torch.equal(scales16.to(torch.float32), scales.to(torch.float32)):
        raise InputError(f"{name}: scales are not exact in fp16, which this format stores; quantize with --scale-dtype float16")
    return {
        "qweight": pack_columns(codes.T, what=f"{name}: out_features").contiguous(),
        "qzeros": pack_columns(zeros, what=f"{name}: out_features").contiguous(),
        "scales": scales16.contiguous(),
    }


def unpack_awq(tensors: Mapping[str, Tensor], *, name: str = "weight") -> tuple[Tensor, Tensor, Tensor]:
    """``(codes int32 [N, K], scales fp32 [G, N], zeros int32 [G, N])`` from the packed tensors."""
    missing = [s for s in SUFFIXES if s not in tensors]
    if missing:
        raise InputError(f"{name}: AWQ tensors {missing} are missing; the checkpoint is incomplete")
    qweight, qzeros, scales = tensors["qweight"], tensors["qzeros"], tensors["scales"]
    K, words = qweight.shape
    N = words * PACK
    G = qzeros.shape[0]
    if tuple(scales.shape) != (G, N) or qzeros.shape[1] != words or G < 1 or K % G:
        raise InputError(
            f"{name}: inconsistent AWQ shapes qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)}, "
            f"scales {tuple(scales.shape)}; expected [K, N/8], [G, N/8], [G, N] with K % G == 0"
        )
    codes = unpack_columns(qweight, what=f"{name}.qweight").T.to(torch.int32).contiguous()
    zeros = unpack_columns(qzeros, what=f"{name}.qzeros").to(torch.int32)
    return codes, scales.to(torch.float32), zeros


def dequantize_awq(tensors: Mapping[str, Tensor], *, name: str = "weight") -> Tensor:
    """What an AWQ GEMM loader computes: the dense fp32 weight ``[N, K]``."""
    codes, scales, zeros = unpack_awq(tensors, name=name)
    N, K = codes.shape
    g = K // scales.shape[0]
    gi = torch.arange(K, device=codes.device) // g
    return dequantize(codes, scales.index_select(0, gi).T, zeros.index_select(0, gi).T)


def quantization_config(group_size: int, modules_to_not_convert: list[str] | None = None) -> dict[str, Any]:
    """config.json ``quantization_config`` as AutoAWQ ≥ 0.2 writes it (§2.1)."""
    return {"quant_method": "awq", "version": "gemm", "bits": BITS, "group_size": group_size,
            "zero_point": True, "modules_to_not_convert": modules_to_not_convert or None}


def not_converted(arch, config: Mapping[str, Any]) -> list[str]:
    """``modules_to_not_convert`` of a Mixture-of-Experts model: every sparse layer's routers and
    shared-expert gates by full on-disk name (``model.layers.1.mlp.gate``). Loaders match these as
    substrings of a module's name (vLLM ``is_layer_skipped_awq``), so a bare ``mlp.gate`` would also
    skip a dense layer's ``mlp.gate_proj``; a sparse layer's full router name matches only the router."""
    if arch is None or arch.moe is None:
        return []
    return [arch.layer_prefix(i) + arch.disk_name(m.name) for i in range(arch.num_layers(config))
            if arch.is_sparse_layer(config, i) for m in arch.moe.never_quantized]


class AWQFormat:
    """The AWQ GEMM checkpoint as the pipeline's ``Format``."""

    name = "awq"
    suffixes = SUFFIXES

    def __init__(self, group_size: int = 128):
        if group_size != -1 and group_size < 1:
            raise InputError(f"AWQ group_size={group_size}: use a positive number of columns (e.g. 128) or -1")
        self.group_size = group_size
        self.spec = awq_spec(group_size)
        self.skipped: list[str] = []  # modules_to_not_convert (an MoE model's routers), set by preflight

    @classmethod
    def from_quantization_config(cls, qc: Mapping[str, Any], source: str = "config.json") -> "AWQFormat":
        version = str(qc.get("version", "gemm")).lower()
        if version != "gemm":
            raise InputError(f"{source}: AWQ version {version!r} is not readable by this version; only 'gemm' is")
        bits = qc.get("bits", qc.get("w_bit", BITS))
        if bits != BITS:
            raise InputError(f"{source}: AWQ bits={bits!r}; the GEMM layout is 4-bit only")
        if qc.get("zero_point", True) is not True:
            raise InputError(f"{source}: AWQ zero_point={qc.get('zero_point')!r}; the GEMM layout always stores zero-points")
        group = qc.get("group_size", qc.get("q_group_size", 128))
        if not isinstance(group, int) or isinstance(group, bool) or (group != -1 and group < 1):
            raise InputError(f"{source}: AWQ group_size={group!r} is not a positive integer or -1")
        return cls(group)

    def preflight(self, arch, config: Mapping[str, Any]) -> None:
        """Before any heavy work: every layer linear must be storable as AWQ GEMM (InputError)."""
        self.skipped = not_converted(arch, config)
        for name in arch.linear_kinds(config):
            N, _ = arch.linear_shape(name, config)
            if N % PACK:
                raise InputError(f"{arch.layer_prefix(0)}{name}: out_features={N} is not a multiple of {PACK}, which AWQ "
                                 f"GEMM cannot store; use --format compressed-tensors or `quantize gptq` for this model")

    def pack(self, result: QuantResult) -> dict[str, Tensor]:
        g_idx = result.g_idx.to(torch.int64)
        K = g_idx.numel()
        width = K // result.scales.shape[0]
        if result.perm is not None or not torch.equal(g_idx, torch.arange(K, device=g_idx.device) // width):
            raise InputError("AWQ GEMM stores contiguous groups only; quantize without act-order")
        return pack_awq(result.codes, result.scales, result.zeros)

    def dequantize(self, tensors: dict[str, Tensor]) -> Tensor:
        return dequantize_awq(tensors)

    def weight_shape(self, shapes: dict[str, tuple[int, ...]]) -> tuple[int, int]:
        K, words = shapes["qweight"]
        return (words * PACK, K)

    def quantization_config(self) -> dict[str, Any]:
        return quantization_config(self.group_size, self.skipped)

    def extra_files(self) -> dict[str, bytes]:
        return {}
