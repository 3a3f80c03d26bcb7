"""Round-to-nearest (RTN): the calibration-free baseline on the same grid as GPTQ."""

from __future__ import annotations

import torch
from torch import Tensor

from .gptq import weighted_error
from .grid import (QuantResult, QuantSpec, _quantize, check_scales, check_weight, dequantize, dequantize_grouped,
                   find_params_float)


def rtn_quantize(W: Tensor, spec: QuantSpec, H: Tensor | None = None, *, name: str = "weight") -> QuantResult:
    """Quantize every contiguous group of ``W [N, K]`` to its nearest grid point.

    ``spec.act_order``/``static_groups``/``damp``/``block_size`` are ignored (no Hessian is used);
    ``g_idx`` is ``k // group``. ``loss`` is ``weighted_error(W, W_hat, H)`` when ``H`` is given,
    else nan. ``W`` is not modified.
    """
    W32 = check_weight(W, name)
    N, K = W32.shape
    g = spec.group_width(K, name)
    G = K // g
    groups = W32.view(N, G, g)
    scale, zero = find_params_float(groups, **spec.grid_params())
    check_scales(scale, name)
    codes = _quantize(groups, scale.unsqueeze(-1), zero.unsqueeze(-1), spec.maxq).view(N, K).to(torch.uint8)
    g_idx = (torch.arange(K, device=W32.device) // g).to(torch.int32)
    scales, zeros = scale.T.contiguous(), zero.T.to(torch.int32).contiguous()
    W_hat = dequantize_grouped(codes, scales, zeros, g_idx)
    loss = weighted_error(W32, W_hat, H) if H is not None else float("nan")
    return QuantResult(
        codes=codes, scales=scales, zeros=zeros, g_idx=g_idx, perm=None, W_hat=W_hat,
        spec=spec, loss=loss, damp_used=0.0, dead_columns=0,
    )


def rtn_on_grid(W: Tensor, scales: Tensor, zeros: Tensor, spec: QuantSpec) -> Tensor:
    """``W [N, K]`` rounded to the nearest point of a given grid of contiguous groups (``scales``,
    ``zeros`` ``[G, N]``, as in a ``QuantResult``): the dequantized weight, fp32. With the grid
    ``rtn_quantize`` would choose for ``W`` this is its ``W_hat`` exactly, without searching the grid again."""
    W32 = W.to(device=scales.device, dtype=torch.float32)
    N, K = W32.shape
    G = scales.shape[0]
    s, z = scales.to(torch.float32).T.unsqueeze(-1), zeros.to(torch.float32).T.unsqueeze(-1)
    return dequantize(_quantize(W32.view(N, G, K // G), s, z, spec.maxq), s, z).view(N, K)
