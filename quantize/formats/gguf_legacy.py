"""GGUF's legacy 32-value block types that llama.cpp's mixes fall back to (Q5_0 for Q4_K, Q5_1 for
Q5_K, Q4_1) on widths that are not a multiple of 256: the grid read from gguf-py's reference bytes
(llama.cpp's imatrix-free rounding, which gguf-py reproduces), and the same blocks re-packed with
other codes, so GPTQ can round on that grid as it does for the K types.

Blocks (ggml-common.h): Q5_0 ``d`` fp16, ``qh`` u32 (fifth bits), ``qs[16]`` (value ``d·(q − 16)``);
Q5_1 ``d``, ``m`` fp16, ``qh``, ``qs[16]`` (``d·q + m``); Q4_1 ``d``, ``m``, ``qs[16]`` (``d·q + m``).
In ``qs`` byte j holds value j in its low nibble and value j + 16 in its high nibble; bit j of
``qh`` is value j's fifth bit.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

# qtype -> (bytes before qs, has m, bits, code offset)
LEGACY = {"Q5_0": (6, False, 5, 16), "Q5_1": (8, True, 5, 0), "Q4_1": (4, True, 4, 0)}
BLOCK = 32


def _gguf_type(qtype: str):
    import gguf

    return getattr(gguf.GGMLQuantizationType, qtype)


def reference(W: Tensor, qtype: str) -> np.ndarray:
    """llama.cpp's (imatrix-free) bytes of ``W [N, K]`` through gguf-py: uint8 ``[N, K/32·size]``."""
    import gguf

    return np.ascontiguousarray(gguf.quants.quantize(W.detach().to(torch.float32).cpu().numpy(), _gguf_type(qtype)))


def dequantize(raw: np.ndarray, qtype: str) -> Tensor:
    import gguf

    return torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(raw, _gguf_type(qtype)), dtype=np.float32))


def grid(raw: np.ndarray, qtype: str, N: int, K: int) -> tuple[Tensor, Tensor]:
    """(d, m) fp32 ``[N, K/32]`` of the blocks (m = 0 for Q5_0)."""
    head, has_m, _, _ = LEGACY[qtype]
    size = raw.shape[1] // (K // BLOCK)
    blocks = raw.reshape(N, K // BLOCK, size)
    d = blocks[..., 0:2].copy().view(np.float16).astype(np.float32)[..., 0]
    m = blocks[..., 2:4].copy().view(np.float16).astype(np.float32)[..., 0] if has_m else np.zeros_like(d)
    return torch.from_numpy(d), torch.from_numpy(m)


def round_column(w: Tensor, d: Tensor, m: Tensor, qtype: str) -> tuple[Tensor, Tensor]:
    """(codes, values) of one column on its blocks' grid (nearest grid point)."""
    _, _, bits, offset = LEGACY[qtype]
    maxq = (1 << bits) - 1
    safe = torch.where(d == 0, torch.ones_like(d), d)
    q = torch.clamp(torch.round((w - m) / safe) + offset, 0, maxq)
    q = torch.where(d == 0, torch.full_like(q, float(offset)), q)
    return q, d * (q - offset) + m


def repack(raw: np.ndarray, codes: Tensor, qtype: str) -> np.ndarray:
    """``raw`` with its codes replaced by ``codes [N, K]`` (headers -- d, m -- kept)."""
    head, _, bits, _ = LEGACY[qtype]
    N, K = codes.shape
    size = raw.shape[1] // (K // BLOCK)
    out = raw.reshape(N, K // BLOCK, size).copy()
    q = codes.to(torch.uint8).numpy().reshape(N, K // BLOCK, BLOCK)
    qs = (q[..., :16] & 0x0F) | ((q[..., 16:] & 0x0F) << 4)
    out[..., head:head + 16] = qs
    if bits == 5:
        qh = np.packbits((q >> 4) & 1, axis=-1, bitorder="little")  # [N, B, 4]: bit j = value j's fifth bit
        out[..., head - 4:head] = qh
    return out.reshape(N, -1)
