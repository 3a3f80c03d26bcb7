"""GGUF block grids: the scales/mins llama.cpp's reference quantizers choose, as pure functions.

Types: ``Q8_0``, ``Q4_0`` (blocks of 32), ``Q4_K``, ``Q5_K`` (super-blocks of 256, sub-blocks of 32,
6-bit scales and mins), ``Q6_K`` (super-blocks of 256, sub-blocks of 16, int8 scales). Rows are
quantized independently along the last dim; K must be a multiple of the block size.

This is a re-implementation of ``ggml/src/ggml-quants.c`` (``quantize_row_*_ref`` without an
importance vector, ``quantize_q4_0/q4_K/q5_K/q6_K`` with ``quant_weights``), reproducing its float32
arithmetic operation by operation (same order of every sum, ``nearest_int``'s bit trick, the uint8
and int8 wrap of its stores), so the bytes are identical to llama.cpp's, not merely close: checked
against llama.cpp's own C code in ``tests/test_gguf_blocks.py``. The arithmetic runs in numpy
float32 (whose scalar/array semantics are IEEE and predictable); inputs and outputs are torch.

Three functions:

- ``block_grid(W, qtype, importance=None) -> Grid``: the grid of every row and sub-block. Without
  ``importance`` the imatrix-free reference path; with it (``importance[k] = E[x_k^2]``, llama.cpp's
  ``in_sum2 / counts``) the ``quant_weights`` path. (Q8_0 ignores ``importance``, as llama.cpp does.)
- ``quantize_codes(W, grid, columns=None) -> uint8 codes``: the codes llama.cpp picks on that grid
  (``quantize_codes(W, block_grid(W, t, imp))`` are llama.cpp's codes, bit for bit).
- ``dequantize(codes, grid) -> fp32`` (= ``grid.dequant(codes)``): bit for bit what
  ``gguf.quants.dequantize`` returns on the packed bytes.

**Codes are unsigned, 0..maxq, for every type** (``value = scale*(q - zero)``): Q8_0 ``zero = 128``
(the stored int8 is ``q - 128``), Q4_0 ``zero = 8``, Q6_K ``zero = 32``; Q4_K/Q5_K have a real-valued
``zero = dmin*m / (d*sc)``. **For W_hat a solver must use ``grid.dequant(codes)``** (or
``dequantize``): for Q4_K/Q5_K gguf-py and llama.cpp compute ``(d*sc)*q - dmin*m`` in float32, which
``scale*(q - zero)`` does not reproduce bit for bit (``grid.offset`` holds ``dmin*m``). For the
other types ``dequant`` is ``scale*(q - zero)``, exact.

How llama.cpp picks codes once the grid is fixed (``quantize_codes`` follows it):

- Q4_K/Q5_K: after rounding the 8 scales/mins to 6 bits and d/dmin to fp16, it recomputes every code
  against the stored values: ``q = clamp(nearest_int((x + dmin*m) / (d*sc)), 0, maxq)``; Q6_K likewise
  ``q = clamp(nearest_int(x / (d*sc)), -32, 31) + 32``. A sub-block whose ``d*sc`` is 0 is skipped
  and keeps the codes of the search (``grid.fixed`` / ``grid.fixed_codes``); its values are ``-dmin*m``
  (0 for Q6_K) whatever its codes, so a solver may leave them at ``fixed_codes``.
- Q8_0 / Q4_0 (reference path): codes are chosen against the *float32* scale before it is rounded to
  fp16 (``grid.inv`` = 1/d32): Q8_0 ``roundf(x*inv)``, Q4_0 ``trunc(x*inv + 8.5)``.
- Q4_0 with importance: the codes of ``make_qx_quants``' best trial scale, ``nearest_int(inv*x) + 8``
  (``grid.inv`` = that trial's inverse scale; never recomputed against the stored fp16 d).

A grid without ``inv`` (e.g. one read back by ``gguf_blocks.unpack``) rounds to the nearest code on
the stored grid. ``quantize_codes(..., columns=slice(j, j+1))`` rounds single columns (a GPTQ loop).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

QK_K = 256
GROUP_MAX_EPS = np.float32(1e-15)
F32 = np.float32

# qtype -> (sub-block columns, super-block columns, maxq)
LAYOUT = {
    "Q8_0": (32, 32, 255),
    "Q4_0": (32, 32, 15),
    "Q4_K": (32, QK_K, 15),
    "Q5_K": (32, QK_K, 31),
    "Q6_K": (16, QK_K, 63),
}
QTYPES = tuple(LAYOUT)

# rows per chunk: bounds the float32 temporaries of the searches ([sub, rows*K/sub] each)
_CHUNK_ELEMS = 1 << 18


@dataclass
class Grid:
    """Per row and sub-block grid of one GGUF type; ``value = scale*(q - zero)``, q in 0..maxq.

    ``scale``/``zero`` fp32 ``[N, K/sub]``; ``d`` fp16 ``[N, K/block]`` (per block for Q8_0/Q4_0,
    per super-block for the K types); ``dmin`` fp16 ``[N, K/256]``, ``sc``/``m`` uint8 ``[N, K/sub]``
    (6-bit) for Q4_K/Q5_K; ``sc`` int8 ``[N, K/16]`` for Q6_K; ``offset`` = ``dmin*m`` fp32 (Q4_K/Q5_K);
    ``inv`` fp32 ``[N, K/32]``: the multiplier the reference picks Q8_0/Q4_0 codes with;
    ``fixed`` bool ``[N, K/sub]`` / ``fixed_codes`` uint8 ``[N, K]``: sub-blocks whose codes the
    reference does not recompute (zero effective scale), with the codes it keeps there.
    """

    qtype: str
    sub: int
    maxq: int
    scale: Tensor
    zero: Tensor
    d: Tensor
    dmin: Tensor | None = None
    sc: Tensor | None = None
    m: Tensor | None = None
    offset: Tensor | None = None
    inv: Tensor | None = None
    code_rule: str = "div"  # "div" | "q8_0" | "q4_0_ref" | "q4_0_qw"
    fixed: Tensor | None = None
    fixed_codes: Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return self.scale.shape[0], self.scale.shape[1] * self.sub

    def dequant(self, codes: Tensor, columns=None) -> Tensor:
        """fp32 weights of ``codes`` ([N, K], or only ``columns``), bit for bit what gguf-py (and
        llama.cpp) dequantize from the packed bytes. The W_hat a solver should use."""
        return dequantize(codes, self, columns)


# --------------------------------------------------------------------------------------------
# float32 primitives with ggml-quants.c's exact semantics


def _nearest_int(v: np.ndarray) -> np.ndarray:
    """ggml's nearest_int: add 1.5*2^23 in float32 and read the mantissa (round half to even for
    |v| < 2^22; the same garbage as C beyond). Returns int64."""
    with np.errstate(all="ignore"):
        t = (np.asarray(v, dtype=F32) + F32(12582912.0)).astype(F32)
    return (t.view(np.int32).astype(np.int64) & 0x007FFFFF) - 0x00400000


def _nearest_f(v: np.ndarray) -> np.ndarray:
    """``float(nearest_int(v))`` as float32: ``rint`` where the C trick is exact (|v| < 2^22), the
    trick itself elsewhere (and for NaN)."""
    r = np.rint(v)
    if not (np.abs(r).max(initial=0) <= F32(4194303.0)):  # also catches NaN
        odd = ~(np.abs(v) <= F32(4194303.0))
        r[odd] = _nearest_int(v[odd]).astype(F32)
    return r


def _seqsum(terms: np.ndarray, first: bool = False) -> np.ndarray:
    """Sequential float32 sum over axis 0, as a C loop ``acc += t[i]`` (``first``: acc = t[0])."""
    if first:
        acc = terms[0].copy()
        rest = terms[1:]
    else:
        acc = np.zeros(terms.shape[1:], dtype=F32)
        rest = terms
    for t in rest:
        acc += t
    return acc


def _fp16_to_f32(h: np.ndarray) -> np.ndarray:
    return h.astype(np.float32)


def _wrap_u8(v: np.ndarray) -> np.ndarray:
    return v & 0xFF


def _wrap_i8(v: np.ndarray) -> np.ndarray:
    return ((v + 128) & 0xFF) - 128


# --------------------------------------------------------------------------------------------
# the searches (each works on [n, B]: n values of B independent blocks)


def make_qkx_quants(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int):
    """``make_qkx2_quants`` / ``make_qkx3_quants`` (identical when weights are given): weighted
    least-squares search of ``x ~ scale*L - the_min`` over ``nstep+1`` trial inverse scales.
    Returns (scale [B], the_min [B], L int64 [n, B])."""
    with np.errstate(all="ignore"):
        mn = x.min(axis=0)
        mx = x.max(axis=0)
        sum_w = _seqsum(w, first=True)
        sum_x = _seqsum(w * x, first=True)
        mn = np.where(mn > 0, F32(0), mn).astype(F32)
        degenerate = mx <= mn
        rng = np.where(degenerate, F32(1), mx - mn).astype(F32)
        xm = x - mn
        iscale = F32(nmax) / rng
        scale = F32(1) / iscale
        L = np.clip(_nearest_f(iscale * xm), F32(0), F32(nmax))
        diff = scale * L + mn - x
        best = _seqsum(w * (diff * diff))
        for i in range(nstep + 1):
            # llama.cpp updates ``min`` in place: later trials use the best min so far
            c = F32(F32(rmin) + F32(rdelta) * F32(i)) + F32(nmax)
            isc = c / rng
            lf = _nearest_f(isc * xm)
            np.clip(lf, F32(0), F32(nmax), out=lf)
            wl = w * lf
            sum_l = _seqsum(wl)
            tmp = wl * lf
            sum_l2 = _seqsum(tmp)
            np.multiply(wl, x, out=tmp)
            sum_xl = _seqsum(tmp)
            D = sum_w * sum_l2 - sum_l * sum_l
            ok = D > 0
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            pos = this_min > 0
            this_min = np.where(pos, F32(0), this_min).astype(F32)
            this_scale = np.where(pos, sum_xl / sum_l2, this_scale).astype(F32)
            np.multiply(this_scale, lf, out=tmp)  # diff = this_scale*l + this_min - x
            tmp += this_min
            tmp -= x
            tmp *= tmp
            tmp *= w
            cur = _seqsum(tmp)
            upd = ok & (cur < best)
            if upd.any():
                L = np.where(upd, lf, L)
                best = np.where(upd, cur, best)
                scale = np.where(upd, this_scale, scale)
                mn = np.where(upd, this_min, mn)
                rng = np.where(degenerate, F32(1), mx - mn).astype(F32)
                xm = x - mn
        scale = np.where(degenerate, F32(0), scale).astype(F32)
        L = np.where(degenerate, 0, L.astype(np.int64))
        return scale, (-mn).astype(F32), L


def make_qx_quants(x: np.ndarray, nmax: int, qw: np.ndarray | None):
    """``make_qx_quants(n, nmax, x, L, rmse_type=1, qw)``: symmetric search over 19 trial inverse
    scales, weights ``qw`` or ``x^2``. Returns (scale [B], L int64 [n, B] in 0..2*nmax-1,
    inv [B] (the chosen trial inverse scale; 0 for an all-zero block), zero_block [B])."""
    with np.errstate(all="ignore"):
        ax = np.abs(x)
        idx = ax.argmax(axis=0)
        cols = np.arange(x.shape[1])
        amax = ax[idx, cols]
        mx = x[idx, cols]
        zero = amax < GROUP_MAX_EPS
        mx = np.where(zero, F32(1), mx).astype(F32)
        w = qw if qw is not None else x * x
        wx = w * x

        def trial(isc):
            lf = np.clip(_nearest_f(isc * x), F32(-nmax), F32(nmax - 1))
            return lf, _seqsum(wx * lf), _seqsum(w * lf * lf)

        inv = F32(-nmax) / mx
        L, sumlx, suml2 = trial(inv)
        scale = np.where(suml2 != 0, sumlx / suml2, F32(0)).astype(F32)
        best = scale * sumlx
        for i in range(-9, 10):
            if i == 0:
                continue
            isc = -(F32(nmax) + F32(0.1) * F32(i)) / mx
            l, slx, sl2 = trial(isc)
            upd = (sl2 > 0) & (slx * slx > best * sl2)
            if upd.any():
                L = np.where(upd, l, L)
                inv = np.where(upd, isc, inv).astype(F32)
                scale = np.where(upd, slx / sl2, scale).astype(F32)
                best = np.where(upd, scale * slx, best).astype(F32)
        L = np.where(zero, 0, L.astype(np.int64) + nmax)
        return np.where(zero, F32(0), scale).astype(F32), L, np.where(zero, F32(0), inv).astype(F32), zero


def make_qp_quants(x: np.ndarray, nmax: int, qw: np.ndarray):
    """``make_qp_quants``: the 8 non-negative sub-block scales (or mins) of a super-block to
    ``nmax``-level integers, weighted by ``qw``, then 5 greedy coordinate passes. Returns
    (scale [B], L int64 [n, B] as stored in uint8)."""
    n = x.shape[0]
    with np.errstate(all="ignore"):
        mx = np.maximum(x.max(axis=0), F32(0))
        zero = mx < GROUP_MAX_EPS
        mx = np.where(zero, F32(1), mx).astype(F32)
        iscale = F32(nmax) / mx
        L = _wrap_u8(_nearest_int(iscale * x))
        scale = F32(1) / iscale
        diff = x - scale * L.astype(F32)
        best = _seqsum(qw * diff * diff)
        for i in range(-4, 5):
            if i == 0:
                continue
            isc = (F32(0.1) * F32(i) + F32(nmax)) / mx
            sci = F32(1) / isc
            l = np.minimum(_nearest_int(isc * x), nmax)
            diff = x - sci * l.astype(F32)
            mse = _seqsum(qw * diff * diff)
            upd = mse < best
            best = np.where(upd, mse, best)
            iscale = np.where(upd, isc, iscale).astype(F32)
        l = np.minimum(_nearest_int(iscale * x), nmax)
        lf = l.astype(F32)
        sumlx = _seqsum(qw * x * lf)
        suml2 = _seqsum(qw * lf * lf)
        L = _wrap_u8(l)
        for _ in range(5):
            changed = np.zeros(x.shape[1], dtype=bool)
            for i in range(n):
                w, xi, li = qw[i], x[i], L[i].astype(F32)
                slx = sumlx - w * xi * li
                sl2 = suml2 - w * li * li
                cond = (slx > 0) & (sl2 > 0)
                new_l = np.minimum(_nearest_int(xi * sl2 / slx), nmax)
                ch = cond & (new_l != L[i])
                nf = new_l.astype(F32)
                slx = slx + w * xi * nf
                sl2 = sl2 + w * nf * nf
                acc = ch & (slx * slx * suml2 > sumlx * sumlx * sl2)
                L[i] = np.where(acc, _wrap_u8(new_l), L[i])
                sumlx = np.where(acc, slx, sumlx).astype(F32)
                suml2 = np.where(acc, sl2, suml2).astype(F32)
                changed |= acc
            if not changed.any():
                break
        out = np.where(suml2 > 0, sumlx / suml2, F32(0)).astype(F32)
        return np.where(zero, F32(0), out).astype(F32), np.where(zero, 0, L)


# --------------------------------------------------------------------------------------------
# Q4_K/Q5_K 6-bit scale packing (llama.cpp's store order, uint8 semantics)


def pack_scales_k4(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """[..., 8] sub-block scales and mins (as the reference stores them, uint8) -> [..., 12] bytes,
    with the reference's exact bit operations."""
    ls = ls.astype(np.int64)
    lm = lm.astype(np.int64)
    s = np.zeros(ls.shape[:-1] + (12,), dtype=np.int64)
    s[..., 0:4] = ls[..., 0:4] & 0xFF
    s[..., 4:8] = lm[..., 0:4] & 0xFF
    s[..., 8:12] = ((ls[..., 4:8] & 0xF) | ((lm[..., 4:8] & 0xF) << 4)) & 0xFF
    s[..., 0:4] = (s[..., 0:4] | ((ls[..., 4:8] >> 4) << 6)) & 0xFF
    s[..., 4:8] = (s[..., 4:8] | ((lm[..., 4:8] >> 4) << 6)) & 0xFF
    return s.astype(np.uint8)


def unpack_scales_k4(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``get_scale_min_k4`` for all 8 sub-blocks: [..., 12] bytes -> (sc, m) uint8 [..., 8]."""
    s = s.astype(np.int64)
    sc = np.concatenate([s[..., 0:4] & 63, (s[..., 8:12] & 0xF) | ((s[..., 0:4] >> 6) << 4)], axis=-1)
    m = np.concatenate([s[..., 4:8] & 63, (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)], axis=-1)
    return sc.astype(np.uint8), m.astype(np.uint8)


# --------------------------------------------------------------------------------------------
# per-type grid builders on numpy float32 [n, K] -> dict of numpy fields


def _blocks_t(x: np.ndarray, size: int) -> np.ndarray:
    """[n, K] -> [size, n*K/size] (column b = block b in row-major block order)."""
    return np.ascontiguousarray(x.reshape(-1, size).T)


def _grid_q8_0(x, qw):
    xb = x.reshape(-1, 32)
    amax = np.abs(xb).max(axis=1)
    d32 = (amax / F32(127)).astype(F32)
    with np.errstate(divide="ignore"):
        inv = np.where(d32 != 0, F32(1) / d32, F32(0)).astype(F32)
    d = d32.astype(np.float16)
    n = x.shape[0]
    return dict(d=d.reshape(n, -1), inv=inv.reshape(n, -1), code_rule="q8_0")


def _grid_q4_0(x, qw):
    n, k = x.shape
    if qw is None:
        xb = x.reshape(-1, 32)
        idx = np.abs(xb).argmax(axis=1)
        mx = xb[np.arange(xb.shape[0]), idx]
        d32 = (mx / F32(-8)).astype(F32)
        with np.errstate(divide="ignore"):
            inv = np.where(d32 != 0, F32(1) / d32, F32(0)).astype(F32)
        return dict(d=d32.astype(np.float16).reshape(n, -1), inv=inv.reshape(n, -1), code_rule="q4_0_ref")
    sum_x2 = _seqsum(np.ascontiguousarray((x * x).T))
    sigma2 = (sum_x2 / F32(k)).astype(F32)
    weight = qw[None, :] * np.sqrt(sigma2[:, None] + x * x)
    scale, L, inv, zero = make_qx_quants(_blocks_t(x, 32), 8, _blocks_t(weight.astype(F32), 32))
    fixed = zero.reshape(n, -1)
    out = dict(d=scale.astype(np.float16).reshape(n, -1), inv=inv.reshape(n, -1), code_rule="q4_0_qw")
    if fixed.any():
        out["fixed"] = fixed
        out["fixed_codes"] = L.T.reshape(n, k)
    return out


def _grid_k45(x, qw, maxq):
    n, k = x.shape
    nsb = k // QK_K
    xt = _blocks_t(x, 32)  # [32, n*k/32]
    if qw is None:
        sum_x2 = _seqsum(xt * xt)
        av_x = np.sqrt(sum_x2 / F32(32))
        w = av_x[None, :] + np.abs(xt)
        rmin, rdelta, nstep = (-1.0, 0.1, 20) if maxq == 15 else (-0.5, 0.1, 15)
        scales, mins, L = make_qkx_quants(xt, w, maxq, rmin, rdelta, nstep)
        scales = scales.reshape(n, nsb, 8)
        mins = mins.reshape(n, nsb, 8)
        max_scale = scales.max(axis=-1)
        max_scale = np.where(max_scale > 0, max_scale, F32(0)).astype(F32)
        max_min = mins.max(axis=-1)
        max_min = np.where(max_min > 0, max_min, F32(0)).astype(F32)
        with np.errstate(divide="ignore"):
            inv_scale = np.where(max_scale > 0, F32(63) / max_scale, F32(0)).astype(F32)
            inv_min = np.where(max_min > 0, F32(63) / max_min, F32(0)).astype(F32)
        ls = np.minimum(_wrap_u8(_nearest_int(inv_scale[..., None] * scales)), 63)
        lm = np.minimum(_wrap_u8(_nearest_int(inv_min[..., None] * mins)), 63)
        d = (max_scale / F32(63)).astype(F32).astype(np.float16)
        dmin = (max_min / F32(63)).astype(F32).astype(np.float16)
    else:
        x256 = _blocks_t(x, QK_K)  # [256, n*nsb]
        sum_x2 = _seqsum(x256 * x256)
        sigma2 = (F32(2) * sum_x2 / F32(QK_K)).astype(F32)
        sig = np.repeat(sigma2.reshape(n, nsb), 8, axis=1).reshape(1, -1)  # per 32-block
        qwt = _blocks_t(np.broadcast_to(qw[None, :], (n, k)), 32)
        w = qwt * np.sqrt(sig + xt * xt)
        sw = _seqsum(w)
        scales, mins, L = make_qkx_quants(xt, w, maxq, -0.9, 0.05, 36)
        sw8 = np.ascontiguousarray(sw.reshape(n * nsb, 8).T)
        d_block, Ls = make_qp_quants(np.ascontiguousarray(scales.reshape(n * nsb, 8).T), 63, sw8)
        m_block, Lm = make_qp_quants(np.ascontiguousarray(mins.reshape(n * nsb, 8).T), 63, sw8)
        ls = Ls.T.reshape(n, nsb, 8)
        lm = Lm.T.reshape(n, nsb, 8)
        if maxq == 31:  # quantize_row_q5_K_impl clamps, q4_K's does not (the bytes decide)
            ls = np.minimum(ls, 63)
            lm = np.minimum(lm, 63)
        d = d_block.reshape(n, nsb).astype(np.float16)
        dmin = m_block.reshape(n, nsb).astype(np.float16)
    sc, m = unpack_scales_k4(pack_scales_k4(ls, lm))
    scale = _fp16_to_f32(d)[..., None] * sc.astype(F32)
    fixed = (scale == 0).reshape(n, -1)
    out = dict(d=d, dmin=dmin, sc=sc.reshape(n, -1), m=m.reshape(n, -1), code_rule="div")
    if fixed.any():
        out["fixed"] = fixed
        out["fixed_codes"] = L.T.reshape(n, k)
    return out


def _grid_q6_k(x, qw):
    n, k = x.shape
    nsb = k // QK_K
    xt = _blocks_t(x, 16)
    qwt = None if qw is None else _blocks_t(np.broadcast_to(qw[None, :], (n, k)), 16)
    scales, L, _, _ = make_qx_quants(xt, 32, qwt)
    scales = scales.reshape(n, nsb, 16)
    ab = np.abs(scales)
    idx = ab.argmax(axis=-1)
    max_abs = np.take_along_axis(ab, idx[..., None], -1)[..., 0]
    max_scale = np.take_along_axis(scales, idx[..., None], -1)[..., 0]
    zero = max_abs < GROUP_MAX_EPS
    with np.errstate(all="ignore"):
        iscale = (F32(-128) / np.where(zero, F32(1), max_scale)).astype(F32)
        d = np.where(zero, F32(0), F32(1) / iscale).astype(F32).astype(np.float16)
        sc = _wrap_i8(np.minimum(_nearest_int(iscale[..., None] * scales), 127))
    sc = np.where(zero[..., None], 0, sc).astype(np.int8)
    scale = _fp16_to_f32(d)[..., None] * sc.astype(F32)
    fixed = (scale == 0).reshape(n, -1)
    out = dict(d=d, sc=sc.reshape(n, -1), code_rule="div")
    if fixed.any():
        codes = L.T.reshape(n, nsb, QK_K)
        codes = np.where(zero[..., None], 0, codes)  # an all-zero super-block is memset to 0
        out["fixed"] = fixed
        out["fixed_codes"] = codes.reshape(n, k)
    return out


def _check(W: Tensor, qtype: str) -> None:
    if qtype not in LAYOUT:
        raise ValueError(f"unsupported GGUF block type {qtype!r}; one of {', '.join(QTYPES)}")
    if W.dim() != 2:
        raise ValueError(f"{qtype}: expected a 2-D weight [rows, in_features], got shape {tuple(W.shape)}")
    block = LAYOUT[qtype][1]
    if W.shape[1] % block:
        raise ValueError(f"{qtype}: row width {W.shape[1]} is not a multiple of the block size {block}")


def _finish(qtype: str, parts: list[dict], n: int, k: int) -> Grid:
    sub, _, maxq = LAYOUT[qtype]
    s = k // sub

    def cat(key, default=None):
        vals = [p.get(key) for p in parts]
        if all(v is None for v in vals):
            return None
        return np.concatenate([v if v is not None else default(p) for v, p in zip(vals, parts)], axis=0)

    d = cat("d")
    rows = [p["d"].shape[0] for p in parts]
    fixed = cat("fixed", lambda p: np.zeros((p["d"].shape[0], s), dtype=bool))
    fixed_codes = cat("fixed_codes", lambda p: np.zeros((p["d"].shape[0], k), dtype=np.int64))
    assert sum(rows) == n
    g = Grid(qtype=qtype, sub=sub, maxq=maxq, scale=None, zero=None, d=torch.from_numpy(d),
             code_rule=parts[0]["code_rule"])
    if qtype in ("Q4_K", "Q5_K"):
        g.dmin = torch.from_numpy(cat("dmin"))
        g.sc = torch.from_numpy(cat("sc"))
        g.m = torch.from_numpy(cat("m"))
    elif qtype == "Q6_K":
        g.sc = torch.from_numpy(cat("sc"))
    inv = cat("inv")
    g.inv = None if inv is None else torch.from_numpy(inv)
    if fixed is not None:
        g.fixed = torch.from_numpy(fixed)
        g.fixed_codes = torch.from_numpy(fixed_codes.astype(np.uint8))
    return _derive(g)


def _derive(g: Grid) -> Grid:
    """Fill ``scale``/``zero``/``offset`` from the stored fields (as gguf-py computes them)."""
    d = g.d.float()
    if g.qtype in ("Q8_0", "Q4_0"):
        g.scale = d.clone()
        g.zero = torch.full_like(g.scale, 128.0 if g.qtype == "Q8_0" else 8.0)
        return g
    per = g.sc.shape[1] // g.d.shape[1]
    scale = torch.mul(d.repeat_interleave(per, dim=1), g.sc.float())
    g.scale = scale
    if g.qtype == "Q6_K":
        g.zero = torch.full_like(scale, 32.0)
        return g
    off = torch.mul(g.dmin.float().repeat_interleave(per, dim=1), g.m.float())
    g.offset = off
    g.zero = torch.where(scale != 0, off / torch.where(scale != 0, scale, torch.ones_like(scale)),
                         torch.zeros_like(scale))
    return g


def grid_from_fields(qtype: str, d: Tensor, dmin: Tensor | None = None, sc: Tensor | None = None,
                     m: Tensor | None = None) -> Grid:
    """A Grid from stored fields alone (what ``gguf_blocks.unpack`` reads): no ``inv``, no fixed
    codes, so ``quantize_codes`` rounds to the nearest code on the stored grid."""
    sub, _, maxq = LAYOUT[qtype]
    g = Grid(qtype=qtype, sub=sub, maxq=maxq, scale=None, zero=None, d=d.to(torch.float16),
             dmin=None if dmin is None else dmin.to(torch.float16), sc=sc, m=m, code_rule="div")
    return _derive(g)


def block_grid(W: Tensor, qtype: str, importance: Tensor | None = None) -> Grid:
    """The grid llama.cpp's reference quantizer stores for every row and sub-block of ``W``
    ([N, K] float32; rows independent). ``importance`` [K] (E[x^2] per input column) selects the
    ``quant_weights`` path (ignored for Q8_0, as in llama.cpp)."""
    _check(W, qtype)
    x = W.detach().to("cpu", torch.float32).contiguous().numpy()
    n, k = x.shape
    qw = None
    if importance is not None:
        qw = importance.detach().to("cpu", torch.float32).reshape(-1).contiguous().numpy()
        if qw.shape[0] != k:
            raise ValueError(f"{qtype}: importance has {qw.shape[0]} entries for {k} columns")
    if n == 0 or k == 0:
        raise ValueError(f"{qtype}: empty weight of shape {tuple(W.shape)}")
    rows = max(1, _CHUNK_ELEMS // k)
    parts = []
    for r0 in range(0, n, rows):
        xc = x[r0:r0 + rows]
        if qtype == "Q8_0":
            parts.append(_grid_q8_0(xc, qw))
        elif qtype == "Q4_0":
            parts.append(_grid_q4_0(xc, qw))
        elif qtype == "Q4_K":
            parts.append(_grid_k45(xc, qw, 15))
        elif qtype == "Q5_K":
            parts.append(_grid_k45(xc, qw, 31))
        else:
            parts.append(_grid_q6_k(xc, qw))
    return _finish(qtype, parts, n, k)


def _expand(t: Tensor, sub: int, cols: Tensor | None) -> Tensor:
    full = t.repeat_interleave(sub, dim=1) if cols is None else t[:, cols // sub]
    return full


def _columns(columns, k: int) -> Tensor | None:
    if columns is None:
        return None
    if isinstance(columns, slice):
        return torch.arange(k)[columns]
    if isinstance(columns, int):
        return torch.tensor([columns])
    return torch.as_tensor(columns, dtype=torch.long)


def quantize_codes(W: Tensor, grid: Grid, columns=None) -> Tensor:
    """uint8 codes (0..maxq) of ``W`` on ``grid``, chosen exactly as llama.cpp's reference does
    (see the module docstring). ``columns`` (slice, int or index tensor): ``W`` holds only those
    columns of the matrix the grid was built for (e.g. one GPTQ column)."""
    n, k = grid.shape
    cols = _columns(columns, k)
    x = W.detach().to("cpu", torch.float32).contiguous().numpy()
    if x.ndim == 1:
        x = x[:, None]
    if x.shape != (n, k if cols is None else len(cols)):
        raise ValueError(f"{grid.qtype}: weights of shape {tuple(x.shape)} do not match the grid")

    def ex(t):
        return _expand(t, grid.sub, cols).numpy()

    with np.errstate(all="ignore"):
        if grid.code_rule == "q8_0":
            v = x * ex(grid.inv)
            a = np.abs(v)
            fl = np.floor(a)
            r = np.sign(v) * (fl + np.floor(F32(2) * (a - fl)))  # roundf: half away from zero
            q = np.clip(np.nan_to_num(r, nan=0.0), -128, 127).astype(np.int64) + 128
        elif grid.code_rule == "q4_0_ref":
            v = (x * ex(grid.inv) + F32(8.5)).astype(F32)
            q = np.clip(np.nan_to_num(np.trunc(v), nan=8.0), 0, 15).astype(np.int64)
        elif grid.code_rule == "q4_0_qw":
            q = np.clip(_nearest_int(ex(grid.inv) * x), -8, 7) + 8
        else:
            scale = ex(grid.scale)
            if grid.qtype in ("Q4_K", "Q5_K"):
                l = _nearest_int((x + ex(grid.offset)) / scale)
                q = np.clip(l, 0, grid.maxq)
            elif grid.qtype == "Q6_K":
                q = np.clip(_nearest_int(x / scale), -32, 31) + 32
            else:  # Q8_0 / Q4_0 read back from bytes: nearest on the stored grid
                zero = ex(grid.zero).astype(np.int64)
                q = np.clip(_nearest_int(x / scale) + zero, 0, grid.maxq)
            dead = scale == 0
            if dead.any():  # no reference value: keep the zero point (values are -offset anyway)
                q = np.where(dead, np.clip(np.rint(ex(grid.zero)), 0, grid.maxq).astype(np.int64), q)
    if grid.fixed is not None:
        fixed = ex(grid.fixed)
        fc = (grid.fixed_codes if cols is None else grid.fixed_codes[:, cols]).numpy()
        q = np.where(fixed, fc, q)
    return torch.from_numpy(q.astype(np.uint8))


def dequantize(codes: Tensor, grid: Grid, columns=None) -> Tensor:
    """fp32 weights, bit for bit gguf-py's ``dequantize`` of the packed bytes: Q4_K/Q5_K
    ``(d*sc)*q - dmin*m``; the others ``scale*(q - zero)`` (``q - zero`` is an exact integer)."""
    n, k = grid.shape
    cols = _columns(columns, k)
    q = codes.to(torch.float32)
    scale = _expand(grid.scale, grid.sub, cols)
    if grid.offset is not None:
        return torch.sub(torch.mul(scale, q), _expand(grid.offset, grid.sub, cols))
    return torch.mul(scale, torch.sub(q, _expand(grid.zero, grid.sub, cols)))
