"""The uniform integer grid shared by GPTQ and RTN (FORMATS.md §1.5), and their common result type.

A weight ``w`` in a group with scale ``s`` and zero-point ``z`` is stored as the code
``q = clamp(round(w / s) + z, 0, 2^b − 1)`` and read back as ``s · (q − z)``.

Scales are rounded to fp16 *here*, before any code is chosen: a GPTQ checkpoint stores fp16 scales,
so quantizing against the fp16 value makes ``dequantize(pack(result)) == result.W_hat`` bit for bit
and the solver's error feedback sees the weights the loader will actually compute.

Range per output row and group (AutoGPTQ/GPTQModel ``find_params``): ``xmin = min(0, min w)``,
``xmax = max(0, max w)``; all-zero rows use ``[-1, 1]``.
- sym: ``xmax = max(|xmin|, xmax)``, ``xmin = −xmax``, ``z = 2^(b−1)``. Unlike the reference we mirror
  the range even when the group is entirely non-negative (the reference keeps ``xmin = 0`` there and
  then clips every value above ``7/15·xmax`` at 4 bits).
- asym: ``s = (xmax − xmin)/(2^b − 1)``, ``z = round(−xmin/s)`` in ``[0, 2^b − 1]``. With
  ``v1_safe_zeros`` a group that would get ``z = 0`` (all weights ≥ −s/2) is given ``z = 1`` and
  ``s = xmax/(2^b − 2)`` instead, which still covers ``[xmin, xmax]``: the v1 ``gptq`` checkpoint
  format stores ``z − 1`` and cannot represent 0 (FORMATS.md §1.4).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from torch import Tensor

from ..errors import InputError, invalid

SUPPORTED_BITS = (2, 3, 4, 8)
_FP16_MIN_SUBNORMAL = 2.0**-24

# MSE clip search (GPTQModel/IST-DASLab ``Quantizer(mse=True)`` defaults): shrink the range by
# p = 1, 0.99, ..., 0.21 and keep, per row, the p with the smallest sum |w − ŵ|^2.4.
_MSE_GRID = 100
_MSE_MAX_SHRINK = 0.8
_MSE_NORM = 2.4


def check_group_size(v: int) -> int:
    if v != -1 and v < 1:
        raise ValueError("group_size must be -1 (one group per row) or a positive number of columns")
    return v


class Settings(BaseModel):
    """Base of the methods' settings: immutable, unknown fields rejected, ``parse`` -> InputError."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @classmethod
    def parse(cls, data: dict[str, Any], source: str = "quantization settings"):
        """Validate ``data``; a bad field raises InputError naming ``source`` and the field."""
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise invalid(source, "setting", e) from None


class QuantSpec(Settings):
    """What to quantize to and how GPTQ should search. Immutable; unknown fields are rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bits: Literal[2, 3, 4, 8] = 4
    group_size: int = Field(128, description="input columns per scale/zero group; -1 = one group per row")
    sym: bool = True
    act_order: bool = Field(False, description="process columns by descending diag(H) (desc_act)")
    static_groups: bool = Field(False, description="group params fixed up front on original columns")
    damp: float = Field(0.01, gt=0.0, le=1.0, description="damping as a fraction of mean(diag H)")
    block_size: int = Field(128, ge=1, description="GPTQ lazy-batch width in columns")
    mse: bool = Field(False, description="search a clipped range minimising |w - w_hat|^2.4")
    full_range: bool = Field(False, description="sym: the largest-magnitude weight of a group on the grid's "
                             "extra level, -2^(b-1)·s, with a signed scale (llama.cpp / AutoRound symmetric)")
    v1_safe_zeros: bool = Field(True, description="asym: never emit zero-point 0 (unstorable in v1 'gptq')")
    scale_dtype: Literal["float16", "bfloat16"] = Field(
        "float16", description="dtype the checkpoint stores scales in; the grid uses scales exact in it")

    _check_group_size = field_validator("group_size")(classmethod(lambda cls, v: check_group_size(v)))

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1

    def group_width(self, in_features: int, name: str = "weight") -> int:
        """Columns per group for a layer with ``in_features`` inputs (``in_features`` when -1)."""
        if self.group_size == -1:
            return in_features
        if in_features % self.group_size:
            raise InputError(
                f"{name}: in_features={in_features} is not a multiple of group_size={self.group_size}; "
                f"choose a group_size that divides {in_features} (or -1)"
            )
        return self.group_size

    def num_groups(self, in_features: int, name: str = "weight") -> int:
        return in_features // self.group_width(in_features, name)

    def grid_params(self) -> dict[str, Any]:
        """Keyword arguments of ``find_params_float`` for this spec."""
        return dict(bits=self.bits, sym=self.sym, mse=self.mse, v1_safe_zeros=self.v1_safe_zeros,
                    scale_dtype=self.scale_dtype, full_range=self.full_range)


@dataclass(frozen=True)
class QuantResult:
    """One quantized linear weight ``W [N, K]`` (N outputs, K inputs), in original column order.

    ``W_hat == dequantize_grouped(codes, scales, zeros, g_idx)`` exactly; ``scales`` hold
    fp16-representable values (so packing them as fp16 is lossless).
    """

    codes: Tensor  # uint8 [N, K], each in [0, 2^bits − 1] (every grid here has <= 8 bits)
    scales: Tensor  # fp32 [G, N], G = K // group width (1 for group_size −1)
    zeros: Tensor  # int32 [G, N], the integer zero-point z (not the v1 stored z − 1)
    g_idx: Tensor  # int32 [K], group of every input column
    perm: Tensor | None  # int64 [K] processing order (act-order), else None
    W_hat: Tensor  # fp32 [N, K], the dequantized weight
    spec: QuantSpec
    loss: float  # solver loss, see the producing function (nan when unknown)
    damp_used: float  # damping fraction actually applied (0.0 for RTN)
    dead_columns: int  # input columns with diag(H) == 0

    def __post_init__(self):
        # one byte a code, not int32's four: a layer's results live until the layer is written, and
        # for a DeepSeek-V3 MoE layer (11e9 expert weights) that is 11 GB instead of 45 GB of host RAM
        if self.codes.dtype != torch.uint8:  # QuantSpec.bits <= 8
            object.__setattr__(self, "codes", self.codes.to(torch.uint8))

    @property
    def bits(self) -> int:
        return self.spec.bits

    def metrics(self, W: Tensor | None = None) -> dict[str, float]:
        """Scalars for logs/manifests; pass the original ``W`` to include the weight MSE."""
        out = {"loss": self.loss, "damp_used": self.damp_used, "dead_columns": float(self.dead_columns)}
        if W is not None:
            out["weight_mse"] = (W.to(self.W_hat) - self.W_hat).square().mean().item()
        return out


_BF16_MIN_SUBNORMAL = 2.0**-133


def _never_zero(rounded: Tensor, scale: Tensor, tiny: float) -> Tensor:
    """``rounded`` with every zero replaced by the smallest ``tiny`` of ``scale``'s sign (a
    full-range grid's scales are signed; the others are positive, where this is ``clamp_min``)."""
    return torch.where(rounded == 0, torch.where(scale < 0, -tiny, tiny), rounded)


def fp16_exact(scale: Tensor) -> Tensor:
    """Round fp32 scales to the nearest fp16 value (kept as fp32), never to zero (sign kept)."""
    return _never_zero(scale.to(torch.float16).to(torch.float32), scale, _FP16_MIN_SUBNORMAL)


def dtype_exact(scale: Tensor, scale_dtype: str = "float16") -> Tensor:
    """Round fp32 scales to the nearest value of ``scale_dtype`` ("float16" or "bfloat16"), kept as
    fp32 and never zero: the scales a checkpoint storing them in that dtype reproduces exactly."""
    if scale_dtype == "float16":
        return fp16_exact(scale)
    if scale_dtype != "bfloat16":
        raise ValueError(f"scale_dtype must be float16 or bfloat16, got {scale_dtype!r}")
    return _never_zero(scale.to(torch.bfloat16).to(torch.float32), scale, _BF16_MIN_SUBNORMAL)


def _range(x: Tensor, sym: bool) -> tuple[Tensor, Tensor]:
    xmin = x.amin(dim=-1).clamp(max=0.0)
    xmax = x.amax(dim=-1).clamp(min=0.0)
    if sym:
        xmax = torch.maximum(-xmin, xmax)
        xmin = -xmax
    flat = xmin == xmax  # only when the whole row/group is 0
    return torch.where(flat, -1.0, xmin), torch.where(flat, 1.0, xmax)


def _grid(xmin: Tensor, xmax: Tensor, bits: int, sym: bool, v1_safe_zeros: bool,
          scale_dtype: str = "float16") -> tuple[Tensor, Tensor]:
    """(scale, zero) as fp32 tensors; scale exact in ``scale_dtype``, zero integer-valued."""
    maxq = (1 << bits) - 1
    scale = dtype_exact((xmax - xmin) / maxq, scale_dtype)
    if sym:
        return scale, torch.full_like(scale, float(1 << (bits - 1)))
    zero = torch.round(-xmin / scale).clamp_(0, maxq)
    if v1_safe_zeros:
        low = zero < 1
        scale = torch.where(low, dtype_exact(xmax / (maxq - 1), scale_dtype), scale)
        zero = torch.where(low, 1.0, zero)
    return scale, zero


def _quantize(x: Tensor, scale: Tensor, zero: Tensor, maxq: int) -> Tensor:
    """Codes as an fp32 tensor of integers (the solver's inner loop works in fp32)."""
    return torch.clamp(torch.round(x / scale) + zero, 0, maxq)


def _full_range_grid(xmin: Tensor, xmax: Tensor, bits: int, scale_dtype: str = "float16") -> tuple[Tensor, Tensor]:
    """The full-range symmetric grid: ``z = 2^(b−1)``, codes ``q − z`` in ``[−2^(b−1), 2^(b−1) − 1]``
    and a SIGNED scale ``s = −m / 2^(b−1)``, ``m`` the group's largest-magnitude value (``xmax`` or
    ``xmin``, whichever is larger in magnitude; ``xmax`` on a tie), so that ``m`` sits exactly on the
    grid's extra level ``−2^(b−1)·s`` and the step is ``|m| / 2^(b−1)`` instead of the mirrored
    grid's ``2|m| / (2^b − 1)`` (25% finer at 2 bits, 12.5% at 3, 6.7% at 4). llama.cpp's Q4_0 /
    AutoRound's ``int_sym``; a GPTQ or compressed-tensors checkpoint stores the scale's sign in its
    fp16/bf16 scale, and every loader computes ``(q − z)·s`` with it."""
    m = torch.where(-xmin > xmax, xmin, xmax)
    flat = m == 0
    half = float(1 << (bits - 1))
    mag = dtype_exact(torch.where(flat, 1.0, m.abs()) / half, scale_dtype)
    scale = torch.where(m > 0, -mag, mag)
    return scale, torch.full_like(scale, half)


def find_params_float(
    x: Tensor, bits: int, sym: bool, *, mse: bool = False, v1_safe_zeros: bool = True, scale_dtype: str = "float16",
    full_range: bool = False,
) -> tuple[Tensor, Tensor]:
    """``find_params`` with the zero-point as an integer-valued fp32 tensor (for the solvers)."""
    x = x.to(torch.float32)
    full = full_range and sym
    if full:
        xmin, xmax = x.amin(dim=-1).clamp(max=0.0), x.amax(dim=-1).clamp(min=0.0)
        scale, zero = _full_range_grid(xmin, xmax, bits, scale_dtype)
    else:
        xmin, xmax = _range(x, sym)
        scale, zero = _grid(xmin, xmax, bits, sym, v1_safe_zeros, scale_dtype)
    if not mse:
        return scale, zero
    return _mse_search(x, xmin, xmax, scale, zero, bits, sym, v1_safe_zeros, scale_dtype, full)


def _clip_error(x: Tensor, s: Tensor, z: Tensor, maxq: int, out: Tensor) -> Tensor:
    """``|s·(clamp(round(x/s) + z, 0, maxq) − z) − x|^2.4`` per element of ``x [M, m]`` into ``out``
    (``s``, ``z``: ``[M, 1]``), in place: the same operations on every element whichever rows are
    passed, so a subset's terms are bit-identical to the full evaluation's."""
    torch.div(x, s, out=out).round_().add_(z).clamp_(0, maxq).sub_(z).mul_(s).sub_(x)
    return out.abs_().pow_(_MSE_NORM)


# a candidate is skipped for a group when a lower bound of its error exceeds the group's best so far
# by this margin (covers float summation order; the bound is a sub-sum of the same non-negative terms)
_MSE_PRUNE_MARGIN = 1e-4
_MSE_BOUND_ELEMS = 8  # largest-|x| elements of each group whose terms make the bound


def _mse_search(x: Tensor, xmin: Tensor, xmax: Tensor, scale: Tensor, zero: Tensor, bits: int, sym: bool,
                v1_safe_zeros: bool, scale_dtype: str, full_range: bool = False) -> tuple[Tensor, Tensor]:
    """The MSE clip search (GPTQModel/IST-DASLab ``Quantizer(mse=True)``): for p = 1, 0.99, ...,
    0.21, the grid of the range ``[p·xmin, p·xmax]``; per row, keep the p with the smallest
    ``Σ |x − x̂|^2.4`` (ties keep the larger p).

    Exact, with most of the work skipped: a group's error at p is at least the sum of the terms of
    its few largest-|x| elements (the ones clipping hurts first), computed by the same element-wise
    operations; once that sub-sum exceeds the group's best error so far the candidate cannot win and
    the group's full evaluation is skipped. The bound grows as p shrinks, so most groups stop being
    evaluated after the first few dozen candidates (the result is the brute-force search's:
    ``tests/test_gptq_solver.py`` compares them)."""
    maxq = (1 << bits) - 1
    shape, m = scale.shape, x.shape[-1]
    xf = x.reshape(-1, m)
    M = xf.shape[0]
    lo, hi = xmin.reshape(M), xmax.reshape(M)
    scale, zero = scale.reshape(M).clone(), zero.reshape(M).clone()
    best = torch.full((M,), float("inf"), device=x.device)
    k = min(m, _MSE_BOUND_ELEMS)
    top = xf.gather(1, xf.abs().topk(k, dim=1, sorted=False).indices) if k < m else None
    top_buf = torch.empty(M, k, device=x.device) if top is not None else None
    buf = torch.empty_like(xf)
    rows = None  # indices of the groups evaluated at this candidate; None: all of them
    for i in range(int(_MSE_MAX_SHRINK * _MSE_GRID)):
        p = 1.0 - i / _MSE_GRID
        s, z = (_full_range_grid(p * lo, p * hi, bits, scale_dtype) if full_range
                else _grid(p * lo, p * hi, bits, sym, v1_safe_zeros, scale_dtype))
        if top is not None and i > 0:
            bound = _clip_error(top, s.unsqueeze(1), z.unsqueeze(1), maxq, top_buf).sum(dim=1)
            live = bound <= best * (1.0 + _MSE_PRUNE_MARGIN)
            n_live = int(live.sum())
            if n_live == 0:
                break
            rows = None if n_live == M else live.nonzero().squeeze(1)
        if rows is None:
            err = _clip_error(xf, s.unsqueeze(1), z.unsqueeze(1), maxq, buf).sum(dim=1)
            better = err < best
            best = torch.where(better, err, best)
            scale = torch.where(better, s, scale)
            zero = torch.where(better, z, zero)
        else:
            sr, zr = s[rows], z[rows]
            err = _clip_error(xf[rows], sr.unsqueeze(1), zr.unsqueeze(1), maxq, buf[: rows.numel()]).sum(dim=1)
            better = err < best[rows]
            idx = rows[better]
            best[idx] = err[better]
            scale[idx] = sr[better]
            zero[idx] = zr[better]
    return scale.reshape(shape), zero.reshape(shape)


def find_params(
    x: Tensor, bits: int, sym: bool, *, mse: bool = False, v1_safe_zeros: bool = True, scale_dtype: str = "float16",
    full_range: bool = False,
) -> tuple[Tensor, Tensor]:
    """Grid for every row of ``x [..., m]`` over its last dim: ``(scale fp32 [...], zero int32 [...])``.

    Pass a group's columns (``W[:, i:i+g]``) for per-group params, or ``W.view(N, G, g)`` for all
    contiguous groups at once.
    """
    scale, zero = find_params_float(x, bits, sym, mse=mse, v1_safe_zeros=v1_safe_zeros, scale_dtype=scale_dtype,
                                    full_range=full_range)
    return scale, zero.to(torch.int32)


def quantize_codes(w: Tensor, scale: Tensor, zero: Tensor, maxq: int) -> Tensor:
    """``clamp(round(w / scale) + zero, 0, maxq)`` as int32 (scale/zero broadcast against ``w``)."""
    return _quantize(w.to(torch.float32), scale.to(torch.float32), zero.to(torch.float32), maxq).to(torch.int32)


def dequantize(q: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    """``scale · (q − zero)`` in fp32 (broadcasting); exact for fp16 scales and small integers."""
    return (q.to(torch.float32) - zero.to(torch.float32)) * scale.to(torch.float32)


def dequantize_grouped(codes: Tensor, scales: Tensor, zeros: Tensor, g_idx: Tensor) -> Tensor:
    """``W[n, k] = scales[g_idx[k], n] · (codes[n, k] − zeros[g_idx[k], n])`` as fp32 ``[N, K]``.

    The one dequantization used by the solvers (``W_hat``) and the GPTQ loader emulation, so the two
    agree bit for bit.
    """
    gi = g_idx.to(device=codes.device, dtype=torch.long)
    s = scales.to(device=codes.device, dtype=torch.float32).index_select(0, gi).T
    z = zeros.to(device=codes.device).index_select(0, gi).T
    return dequantize(codes, s, z)


def all_finite(t: Tensor) -> bool:
    """Whether every value of ``t`` is finite, from one ``aminmax`` pass (NaN propagates into it,
    ±inf is an extreme): on CPU 25-40x faster than ``isfinite(t).all()``, which writes a bool
    tensor (measured on 2 cores; a layer's outputs, Hessians and weights are checked this way)."""
    if t.numel() == 0 or not (t.is_floating_point() or t.is_complex()):
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


def check_weight(W: Tensor, name: str = "weight") -> Tensor:
    """A finite 2-D ``[N, K]`` weight as a fresh fp32 tensor (the caller's tensor is never touched)."""
    if W.ndim != 2:
        raise InputError(f"{name}: expected a 2-D [out_features, in_features] weight, got shape {tuple(W.shape)}")
    W32 = W.detach().to(torch.float32, copy=True)
    if not all_finite(W32):
        raise InputError(f"{name}: weight contains NaN/Inf; fix or re-export the checkpoint before quantizing")
    return W32


def check_scales(scales: Tensor, name: str = "weight") -> None:
    if not all_finite(scales):
        raise InputError(
            f"{name}: a group's range exceeds what fp16 scales can hold (|w| > ~6e4); "
            "this weight cannot be stored as GPTQ, leave the module unquantized"
        )
