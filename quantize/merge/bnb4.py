"""bitsandbytes 4-bit (NF4 / FP4) quantize -> dequantize, in plain torch (QLoRA-exact merges).

A QLoRA adapter was trained against ``dequant(quant4(W))``, not ``W`` (MERGE.md §5.3). This module
reproduces what bitsandbytes 0.50 computes for ``functional.quantize_4bit`` followed by
``functional.dequantize_4bit`` (the path ``bnb.nn.Linear4bit`` takes in every forward), bit for bit,
without importing bitsandbytes (a test oracle only, never a runtime dependency).

What bitsandbytes does (``bitsandbytes/functional.py``, ``backends/default/ops.py`` for the 4-bit
quantizer, ``csrc/cpu_ops.cpp`` for the CPU kernels; read at v0.50.1):

* **4-bit quantize** (``quantize_4bit``, blocksize 64 unless told otherwise): the tensor is
  flattened (row-major) and cut into blocks of ``blocksize`` values; the last block may be short.
  ``absmax`` is the float32 max of ``|x|`` per block. Full blocks are scaled by multiplying with the
  float32 reciprocal ``1 / max(absmax, 1e-38)``; the short last block is *divided* by its (clamped)
  absmax, and its stored absmax is the clamped one. Scaled values are clamped to [-1, 1] and mapped
  to the nearest code by ``bucketize`` against the midpoints of the sorted code book: a value equal
  to a midpoint takes the lower code. FP4's code book is not sorted by index, so the bucket is
  mapped back through ``argsort`` of the code book.
* **Double quantization** (``compress_statistics=True``, QLoRA's "-dq"): ``offset = mean(absmax)``
  (float32), then ``absmax - offset`` is quantized with the 8-bit signed *dynamic* code book
  (``create_dynamic_map``) in blocks of 256 (``quantize_blockwise``'s CPU kernel): per block
  ``a = max|v|``, ``v * (1/a)`` clamped, looked up in a 65536-entry table
  (``index = trunc(((v + 1) * 0.5) * 65535 + 0.5)``; table entry ``i`` is the number of code
  midpoints strictly below ``-1 + 2i/65535``). Dequantized: ``code8[q] * a + offset``.
* **4-bit dequantize**: ``code4[q] * absmax`` in float32, rounded (nearest-even) to the dtype the
  weight had when it was quantized. (FP4 code 8, a zero with the sign bit set, is ``+0.0`` in
  bitsandbytes' code book and its Python and AVX-512 kernels, ``-0.0`` in its scalar C and CUDA
  kernels; ``+0.0`` here. Only the sign of those zeros can differ.)

Known upstream quirk, not reproduced: bitsandbytes 0.50's AVX-512 CPU ``dequantize_4bit`` kernel
indexes ``absmax`` per row (``row * (cols // blocksize) + col // blocksize``), which is wrong when a
row length is a multiple of 16 but not of the block size (e.g. 48 columns with blocksize 64). Real
linear layers have rows of a multiple of 64; the flat-block result here is what the quantizer
produced and what the CUDA kernel (and bitsandbytes on 1-d views) computes.

Work is done in chunks of whole blocks, so memory is about the tensor in its quantization dtype plus
a few float32 chunks (the codes are never packed or kept).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any, Literal

import torch
from torch import Tensor

QuantType = Literal["nf4", "fp4"]

#: bitsandbytes' 4-bit block size (``Params4bit`` / ``quantize_4bit`` default).
BLOCKSIZE = 64
#: Block size of the 8-bit quantization of the absmax statistics (double quantization).
NESTED_BLOCKSIZE = 256
#: Values per chunk of the streamed round trip (a multiple of every valid block size).
CHUNK = 1 << 20
_VALID_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
_ABSMAX_FLOOR = 1e-38  # bitsandbytes clamps absmax before dividing by it

# NF4 (QLoRA, arXiv:2305.14314): quantiles of N(0, 1), as hard-coded in bitsandbytes.
_NF4 = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
# FP4 (1 sign, 2 exponent, 1 mantissa bit; exponent bias 2), in bit-pattern order, divided by its max (12).
_FP4 = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, 0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)


@cache
def code_book(quant_type: QuantType) -> Tensor:
    """The 16 float32 values of a 4-bit code, indexed by the 4-bit code (the dequantization table).

    FP4 code 8 (sign bit, zero magnitude) is ``+0.0``, as in bitsandbytes' code book, its Python
    and AVX-512 kernels (its scalar C and CUDA kernels give ``-0.0``: only the sign of a zero differs).
    """
    if quant_type == "nf4":
        return torch.tensor(_NF4, dtype=torch.float32)
    if quant_type == "fp4":
        data = torch.tensor(_FP4, dtype=torch.float32)
        return data / data.abs().max()
    raise ValueError(f"quant_type must be nf4 or fp4, got {quant_type!r}")


@cache
def _bounds(quant_type: QuantType) -> tuple[Tensor, Tensor]:
    """``(midpoints of the sorted code book, sorted position -> code)`` for the quantizer."""
    code = code_book(quant_type)
    order = torch.argsort(code)
    midpoints = (code[order[:-1]] + code[order[1:]]) / 2
    return midpoints, order


@cache
def dynamic_code() -> Tensor:
    """bitsandbytes' signed 8-bit dynamic code book (``create_dynamic_map()``, 256 sorted values).

    The code for double-quantized absmax statistics (Dettmers, arXiv:1511.04561): for exponent
    ``e = 0..6`` the means of ``2**e + 1`` linearly spaced points in [0.1, 1], times ``10**(e-6)``,
    both signs, plus 0 and 1.
    """
    max_exponent_bits, non_sign_bits = 7, 7
    data: list[float] = []
    for i in range(max_exponent_bits):
        boundaries = torch.linspace(0.1, 1, int(2 ** (i + non_sign_bits - max_exponent_bits) + 1), dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        scale = 10 ** (-(max_exponent_bits - 1) + i)
        data += (scale * means).tolist()
        data += (-scale * means).tolist()
    data += [0, 1.0]
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


@cache
def _dynamic_lut() -> Tensor:
    """The CPU quantizer's 65536-entry table: entry ``i`` is the code nearest ``-1 + 2i/65535``
    (the number of code midpoints strictly below it)."""
    code = dynamic_code()
    midpoints = 0.5 * (code[:-1] + code[1:])
    grid = -1.0 + (2.0 * torch.arange(65536, dtype=torch.float32)) / 65535.0
    return torch.searchsorted(midpoints, grid, right=False).to(torch.uint8)


# ---------------------------------------------------------------------------------------------
# the pieces


def absmax_4bit(flat: Tensor, blocksize: int = BLOCKSIZE) -> Tensor:
    """Per-block float32 absmax of a 1-d tensor (the short last block's is clamped to 1e-38)."""
    x = flat.float()
    n = x.numel()
    full = n - n % blocksize
    am = x[:full].view(-1, blocksize).abs().amax(dim=1)
    if full < n:
        am = torch.cat([am, x[full:].abs().amax().clamp(min=_ABSMAX_FLOOR).reshape(1)])
    return am


def quantize_values(x: Tensor, absmax: Tensor, quant_type: QuantType, blocksize: int, *, last_partial: bool) -> Tensor:
    """4-bit codes (integers, one per value) of a float32 chunk of whole blocks; ``absmax`` per block.

    ``last_partial``: the chunk ends with the tensor's short last block (scaled by division, as
    bitsandbytes does it; full blocks are multiplied by the reciprocal).
    """
    n = x.numel()
    rem = n % blocksize if last_partial else 0
    full = n - rem
    blocks = full // blocksize
    recip = 1.0 / absmax[:blocks].clamp(min=_ABSMAX_FLOOR).view(-1, 1)
    scaled = (x[:full].view(blocks, blocksize) * recip).clamp_(-1, 1).view(-1)
    if rem:
        # absmax[blocks] is clamped already
        scaled = torch.cat([scaled, torch.clamp(x[full:] / absmax[blocks], -1, 1)])
    midpoints, order = _bounds(quant_type)
    # bitsandbytes' bucketize(scaled, midpoints): the number of midpoints strictly below the value (a
    # value on a midpoint takes the lower code), counted with 15 vectorised compares (5x faster here)
    q = torch.zeros(scaled.shape, dtype=torch.uint8)
    for m in midpoints:
        q += scaled > m
    return q if quant_type == "nf4" else order[q.long()]


def double_quantize(absmax: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(q, absmax2, offset)``: the 8-bit double quantization of 4-bit absmax statistics."""
    offset = absmax.mean()
    x = absmax - offset
    n = x.numel()
    blocks = -(-n // NESTED_BLOCKSIZE)
    padded = torch.nn.functional.pad(x, (0, blocks * NESTED_BLOCKSIZE - n)).view(blocks, NESTED_BLOCKSIZE)
    absmax2 = padded.abs().amax(dim=1)  # zero padding never raises a max of |x|
    scaled = torch.clamp(padded * (1.0 / absmax2).view(-1, 1), -1.0, 1.0)
    index = ((scaled + 1.0) * 0.5 * 65535.0 + 0.5).to(torch.int64)  # float32 ops, truncation as in C
    q = _dynamic_lut()[index.clamp_(0, 65535)]
    q[absmax2 == 0] = 0  # an all-zero block: the kernel writes code 0 and absmax 0
    return q.reshape(-1)[:n], absmax2, offset


def dequantize_absmax(q: Tensor, absmax2: Tensor, offset: Tensor) -> Tensor:
    """``code8[q] * absmax2 + offset`` per 256-block, float32 (``dequantize_blockwise`` + offset)."""
    n = q.numel()
    vals = dynamic_code()[q.long()]
    blocks = absmax2.numel()
    padded = torch.nn.functional.pad(vals, (0, blocks * NESTED_BLOCKSIZE - n)).view(blocks, NESTED_BLOCKSIZE)
    return (padded * absmax2.view(-1, 1)).reshape(-1)[:n] + offset


def dequantize_values(q: Tensor, absmax: Tensor, quant_type: QuantType, blocksize: int, dtype: torch.dtype) -> Tensor:
    """``code4[q] * absmax`` (float32) rounded to ``dtype``, for a chunk of whole blocks (1-d)."""
    n = q.numel()
    vals = code_book(quant_type)[q.long()]
    full = n - n % blocksize
    out = torch.empty(n, dtype=dtype)
    blocks = full // blocksize
    out[:full].view(blocks, blocksize).copy_(vals[:full].view(blocks, blocksize) * absmax[:blocks].view(-1, 1))
    if full < n:
        out[full:] = vals[full:] * absmax[blocks]
    return out


# ---------------------------------------------------------------------------------------------
# the round trip


def roundtrip(W: Tensor, quant_type: QuantType = "nf4", *, double_quant: bool = False, dtype: torch.dtype | None = None,
              blocksize: int = BLOCKSIZE, chunk: int = CHUNK) -> Tensor:
    """``dequantize_4bit(quantize_4bit(W.to(dtype)))`` as bitsandbytes computes it, in ``dtype``.

    ``dtype``: the dtype the weight had when bitsandbytes quantized it (the model's load dtype;
    default ``W.dtype``), which is also the dtype it dequantizes to. ``double_quant``:
    ``compress_statistics`` (bnb_4bit_use_double_quant, Lit-GPT's ``-dq``). The result is a new
    tensor of ``W``'s shape.
    """
    if blocksize not in _VALID_BLOCKSIZES:
        raise ValueError(f"invalid blocksize {blocksize}; bitsandbytes takes {_VALID_BLOCKSIZES}")
    dtype = dtype or W.dtype
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"bitsandbytes 4-bit quantizes bf16/fp16/fp32 weights, not {dtype}")
    flat = W.to(dtype).reshape(-1)
    n = flat.numel()
    out = torch.empty(n, dtype=dtype)
    if n == 0:
        return out.view(W.shape)
    step = max(blocksize, chunk - chunk % blocksize)
    # 1. statistics over the whole tensor (double quantization needs their mean)
    absmax = torch.cat([absmax_4bit(flat[s : s + step], blocksize) for s in range(0, n, step)])
    # 2. the absmax the kernel dequantizes with
    scale = dequantize_absmax(*double_quantize(absmax)) if double_quant else absmax
    # 3. codes from the exact absmax, values from the (possibly double-quantized) one
    for s in range(0, n, step):
        e = min(n, s + step)
        b0, b1 = s // blocksize, -(-e // blocksize)
        x = flat[s:e].float()
        q = quantize_values(x, absmax[b0:b1], quant_type, blocksize, last_partial=e == n)
        out[s:e] = dequantize_values(q, scale[b0:b1], quant_type, blocksize, dtype)
    return out.view(W.shape)


# ---------------------------------------------------------------------------------------------
# settings


BASE_QUANTS = ("none", "nf4", "nf4-dq", "fp4", "fp4-dq")
BASE_QUANT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Bnb4Setting:
    """How the base was quantized while the adapter trained."""

    quant_type: QuantType
    double_quant: bool
    dtype: torch.dtype  # the weights' dtype when quantized (= the dtype they dequantize to)
    blocksize: int = BLOCKSIZE

    @classmethod
    def parse(cls, base_quant: str, dtype: str, blocksize: int = BLOCKSIZE) -> Bnb4Setting | None:
        """``base_quant`` in :data:`BASE_QUANTS` (``none`` -> None), ``dtype`` in :data:`BASE_QUANT_DTYPES`."""
        if base_quant not in BASE_QUANTS:
            raise ValueError(f"base quantization {base_quant!r} is not one of {', '.join(BASE_QUANTS)}")
        if base_quant == "none":
            return None
        if dtype not in BASE_QUANT_DTYPES:
            raise ValueError(f"base quantization dtype {dtype!r} is not one of {', '.join(BASE_QUANT_DTYPES)}")
        qt, _, dq = base_quant.partition("-")
        return cls(qt, dq == "dq", BASE_QUANT_DTYPES[dtype], blocksize)  # type: ignore[arg-type]

    @property
    def name(self) -> str:
        return self.quant_type + ("-dq" if self.double_quant else "")

    @property
    def dtype_name(self) -> str:
        return next(k for k, v in BASE_QUANT_DTYPES.items() if v == self.dtype)

    def apply(self, W: Tensor) -> Tensor:
        return roundtrip(W, self.quant_type, double_quant=self.double_quant, dtype=self.dtype, blocksize=self.blocksize)

    def describe(self) -> str:
        return (f"bitsandbytes {self.quant_type.upper()}{' with double quantization' if self.double_quant else ''}, "
                f"blocksize {self.blocksize}, {self.dtype_name}")


@dataclass
class Bnb4RoundTrip:
    """A merge update: replace the base weight by its bitsandbytes 4-bit round trip (first in line,
    before any LoRA delta); float32 result (exactly the ``setting.dtype`` values)."""

    setting: Bnb4Setting

    def apply(self, W: Tensor) -> Tensor:
        return self.setting.apply(W).to(torch.float32)

    def record(self) -> dict[str, Any]:
        s = self.setting
        return {"op": "bnb4_roundtrip", "quant_type": s.quant_type, "double_quant": s.double_quant,
                "dtype": s.dtype_name, "blocksize": s.blocksize}

