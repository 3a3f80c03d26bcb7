"""GPTQ's column loop on a grid fixed before rounding (``gptq_on_fixed_grid``), the solver behind
Hessian-aware formats whose group grids are chosen up front (GGUF K-quants)."""

from __future__ import annotations

import pytest
import torch

from quantize.methods.gptq import gptq_on_fixed_grid, gptq_quantize, prepare_hessian_inverse, weighted_error
from quantize.methods.grid import QuantSpec, find_params_float


def _problem(seed: int, N: int = 24, K: int = 128):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(N, K, generator=g) * 0.05
    X = torch.randn(1024, K, generator=g) @ (torch.eye(K) + 0.3 * torch.randn(K, K, generator=g) / K**0.5)
    X = X * torch.linspace(0.3, 2.0, K)
    return W, 2 * X.T @ X / X.shape[0]


@pytest.mark.parametrize("act_order", [False, True])
def test_on_the_static_gptq_grid_it_is_gptq_bit_for_bit(act_order):
    """Given the grid static-group GPTQ fixes up front and the same rounding, the fixed-grid loop
    returns exactly the codes and weights of ``gptq_quantize(static_groups=True)``."""
    W, H = _problem(1)
    spec = QuantSpec(bits=4, group_size=32, sym=True, act_order=act_order, static_groups=True)
    ref = gptq_quantize(W, H, spec)
    N, K = W.shape
    s, z = find_params_float(W.view(N, K // 32, 32), **spec.grid_params())  # [N, G]

    def column(w, k):
        sc, zc = s[:, k // 32], z[:, k // 32]
        q = torch.clamp(torch.round(w / sc) + zc, 0, spec.maxq)
        return q, (q - zc) * sc

    codes, W_hat, loss = gptq_on_fixed_grid(W, prepare_hessian_inverse(H, spec), column)
    assert torch.equal(codes, ref.codes) and torch.equal(W_hat, ref.W_hat)
    assert loss == pytest.approx(ref.loss, rel=1e-5)


def test_beats_round_to_nearest_on_a_real_valued_affine_grid():
    """On an affine grid with real-valued offsets (``value = d·q − m``, as K-quants store it), the
    error feedback lowers the Hessian-weighted error below rounding each weight to its nearest grid
    point, on every seed."""
    for seed in range(5):
        W, H = _problem(10 + seed)
        N, K = W.shape
        blocks = W.view(N, K // 32, 32)
        lo, hi = blocks.amin(-1), blocks.amax(-1)
        d, m = (hi - lo) / 15, -lo

        def column(w, k):
            dc, mc = d[:, k // 32], m[:, k // 32]
            q = torch.clamp(torch.round((w + mc) / dc), 0, 15)
            return q, dc * q - mc

        spec = QuantSpec(bits=4, group_size=32, act_order=True, static_groups=True)
        codes, W_hat, _ = gptq_on_fixed_grid(W, prepare_hessian_inverse(H, spec), column)
        rtn = torch.stack([column(W[:, k], k)[1] for k in range(K)], dim=1)
        assert codes.min() >= 0 and codes.max() <= 15
        assert weighted_error(W, W_hat, H) < 0.95 * weighted_error(W, rtn, H)
