"""GGUF block bytes: pack codes + grid into the raw rows llama.cpp reads, and back.

Layouts (``ggml/src/ggml-common.h``; little-endian fp16):

- Q8_0 (32 values, 34 bytes): ``d`` fp16, ``qs[32]`` int8 (= code - 128).
- Q4_0 (32 values, 18 bytes): ``d`` fp16, ``qs[16]``: value j in the low nibble of byte j, value
  j+16 in its high nibble.
- Q4_K (256 values, 144 bytes): ``d``, ``dmin`` fp16, ``scales[12]`` (8 six-bit scales and mins,
  ``kquants.pack_scales_k4``), ``qs[128]``: per 64 values, 32 bytes with values 0..31 in the low and
  32..63 in the high nibbles.
- Q5_K (256, 176 bytes): as Q4_K with ``qh[32]`` before ``qs``: bit 2i (2i+1) of ``qh[l]`` is the
  fifth bit of value 64i+l (64i+32+l).
- Q6_K (256, 210 bytes): ``ql[128]``, ``qh[64]``, ``scales[16]`` int8, ``d`` fp16. Per 128 values:
  ``ql[l]`` low/high nibble = values l / l+64, ``ql[l+32]`` = values l+32 / l+96; ``qh[l]`` holds the
  top two bits of values l, l+32, l+64, l+96 at shifts 0, 2, 4, 6.

``pack(codes, grid, qtype) -> uint8 [N, K/block*type_size]`` (gguf-py's shape for a quantized
tensor), ``unpack(raw, qtype, K) -> (codes, grid)``, ``quantize_reference(W, qtype, importance)``:
llama.cpp's bytes for ``W`` (``quantize_q*`` with or without ``quant_weights``).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..methods import kquants
from ..methods.kquants import Grid
from .gguf_mix import type_size

# qtype -> (values per block, bytes per block), as gguf.GGML_QUANT_SIZES
TYPE_SIZES = {t: type_size(t) for t in kquants.QTYPES}


def _check(qtype: str, k: int) -> tuple[int, int]:
    if qtype not in TYPE_SIZES:
        raise ValueError(f"unsupported GGUF block type {qtype!r}; one of {', '.join(TYPE_SIZES)}")
    block, size = TYPE_SIZES[qtype]
    if k % block:
        raise ValueError(f"{qtype}: row width {k} is not a multiple of the block size {block}")
    return block, size


def _f16_bytes(d: Tensor, nb: int) -> np.ndarray:
    """fp16 [N, ...] -> uint8 [N*nb, 2] little-endian."""
    return d.detach().cpu().to(torch.float16).contiguous().numpy().astype("<f2").view(np.uint8).reshape(nb, 2)


def pack(codes: Tensor, grid: Grid, qtype: str) -> Tensor:
    """Raw GGUF bytes (uint8 [N, K/block*type_size]) of ``codes`` (0..maxq, [N, K]) on ``grid``."""
    if grid.qtype != qtype:
        raise ValueError(f"grid is {grid.qtype}, asked to pack {qtype}")
    n, k = codes.shape
    block, size = _check(qtype, k)
    if grid.shape != (n, k):
        raise ValueError(f"{qtype}: codes {tuple(codes.shape)} do not match the grid {grid.shape}")
    q = codes.detach().cpu().to(torch.int64).numpy()
    if q.min(initial=0) < 0 or q.max(initial=0) > grid.maxq:
        raise ValueError(f"{qtype}: codes outside 0..{grid.maxq}")
    nb = n * (k // block)
    qb = q.reshape(nb, block)
    if qtype == "Q8_0":
        qs = (qb - 128).astype(np.int8).view(np.uint8)
        out = np.concatenate([_f16_bytes(grid.d, nb), qs], axis=1)
    elif qtype == "Q4_0":
        qs = (qb[:, :16] | (qb[:, 16:] << 4)).astype(np.uint8)
        out = np.concatenate([_f16_bytes(grid.d, nb), qs], axis=1)
    elif qtype in ("Q4_K", "Q5_K"):
        sc = grid.sc.cpu().numpy().reshape(nb, 8)
        m = grid.m.cpu().numpy().reshape(nb, 8)
        if sc.max(initial=0) > 63 or m.max(initial=0) > 63:
            raise ValueError(f"{qtype}: sub-block scales/mins must be 6-bit")
        scales = kquants.pack_scales_k4(sc, m)
        q4 = qb.reshape(nb, 4, 2, 32)
        qs = ((q4[:, :, 0] & 0xF) | ((q4[:, :, 1] & 0xF) << 4)).reshape(nb, 128).astype(np.uint8)
        parts = [_f16_bytes(grid.d, nb), _f16_bytes(grid.dmin, nb), scales]
        if qtype == "Q5_K":
            hi = (q4 >> 4) & 1  # [nb, 4, 2, 32]: bit 2i + h
            shifts = (2 * np.arange(4)[:, None] + np.arange(2)[None, :])[None, :, :, None]
            qh = (hi << shifts).sum(axis=(1, 2)).astype(np.uint8)
            parts.append(qh)
        parts.append(qs)
        out = np.concatenate(parts, axis=1)
    elif qtype == "Q6_K":
        q6 = qb.reshape(nb, 2, 4, 32)  # half, quarter (l, l+32, l+64, l+96), l
        ql = np.concatenate([(q6[:, :, 0] & 0xF) | ((q6[:, :, 2] & 0xF) << 4),
                             (q6[:, :, 1] & 0xF) | ((q6[:, :, 3] & 0xF) << 4)], axis=2)  # [nb, 2, 64]
        qh = sum(((q6[:, :, j] >> 4) & 3) << (2 * j) for j in range(4))  # [nb, 2, 32]
        scales = grid.sc.cpu().numpy().astype(np.int8).reshape(nb, 16).view(np.uint8)
        out = np.concatenate([ql.reshape(nb, 128).astype(np.uint8), qh.reshape(nb, 64).astype(np.uint8),
                              scales, _f16_bytes(grid.d, nb)], axis=1)
    else:  # pragma: no cover - _check rejects
        raise AssertionError(qtype)
    return torch.from_numpy(np.ascontiguousarray(out.reshape(n, (k // block) * size)))


def unpack(raw: Tensor | np.ndarray, qtype: str, K: int) -> tuple[Tensor, Grid]:
    """Inverse of ``pack``: uint8 rows [N, K/block*type_size] -> (codes uint8 [N, K], grid).

    The grid carries the stored fields only (no reference ``inv``/fixed codes), so
    ``kquants.quantize_codes`` on it rounds to the nearest stored code."""
    block, size = _check(qtype, K)
    r = np.asarray(raw.detach().cpu().numpy() if isinstance(raw, Tensor) else raw, dtype=np.uint8)
    r = r.reshape(-1, (K // block) * size)
    n = r.shape[0]
    nb = n * (K // block)
    b = np.ascontiguousarray(r.reshape(nb, size))

    def f16(a: np.ndarray, per_row: int) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(a).view("<f2").astype(np.float16).reshape(n, per_row))

    nblk = K // block
    if qtype == "Q8_0":
        codes = b[:, 2:].view(np.int8).astype(np.int64) + 128
        grid = kquants.grid_from_fields(qtype, f16(b[:, :2], nblk))
    elif qtype == "Q4_0":
        qs = b[:, 2:].astype(np.int64)
        codes = np.concatenate([qs & 0xF, qs >> 4], axis=1)
        grid = kquants.grid_from_fields(qtype, f16(b[:, :2], nblk))
    elif qtype in ("Q4_K", "Q5_K"):
        sc, m = kquants.unpack_scales_k4(b[:, 4:16])
        if qtype == "Q4_K":
            qs = b[:, 16:].astype(np.int64).reshape(nb, 4, 1, 32)
            codes = np.concatenate([qs & 0xF, qs >> 4], axis=2)
        else:
            qh = b[:, 16:48].astype(np.int64).reshape(nb, 1, 1, 32)
            qs = b[:, 48:].astype(np.int64).reshape(nb, 4, 1, 32)
            lo = np.concatenate([qs & 0xF, qs >> 4], axis=2)  # [nb, 4, 2, 32]
            shifts = (2 * np.arange(4)[:, None] + np.arange(2)[None, :])[None, :, :, None]
            codes = lo | (((qh >> shifts) & 1) << 4)
        grid = kquants.grid_from_fields(
            qtype, f16(b[:, 0:2], nblk), f16(b[:, 2:4], nblk),
            torch.from_numpy(sc.reshape(n, -1)), torch.from_numpy(m.reshape(n, -1)))
    elif qtype == "Q6_K":
        ql = b[:, :128].astype(np.int64).reshape(nb, 2, 2, 32)  # half, (l | l+32), l
        qh = b[:, 128:192].astype(np.int64).reshape(nb, 2, 1, 32)
        lo = np.concatenate([ql & 0xF, ql >> 4], axis=2)  # [nb, 2, 4, 32]: l, l+32, l+64, l+96
        hi = (qh >> (2 * np.arange(4))[None, None, :, None]) & 3
        codes = lo | (hi << 4)
        sc = b[:, 192:208].view(np.int8).reshape(n, -1)
        grid = kquants.grid_from_fields(qtype, f16(b[:, 208:210], nblk), sc=torch.from_numpy(sc.copy()))
    else:  # pragma: no cover
        raise AssertionError(qtype)
    return torch.from_numpy(codes.reshape(n, K).astype(np.uint8)), grid


def quantize_reference(W: Tensor, qtype: str, importance: Tensor | None = None) -> Tensor:
    """llama.cpp's bytes for ``W`` [N, K]: ``pack(quantize_codes(W, block_grid(W, qtype, importance)))``."""
    grid = kquants.block_grid(W, qtype, importance)
    return pack(kquants.quantize_codes(W, grid), grid, qtype)
