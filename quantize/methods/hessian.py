"""The GPTQ calibration statistic: the layer-input Hessian ``H = 2/n · Σ_t x_t x_tᵀ``.

Scaling: ``n`` counts *rows* (tokens) — every leading dimension of ``x`` is flattened — so ``H`` is
twice the mean outer product of one token's input and ``tr(ΔW H ΔWᵀ) = 2 · mean_t ‖ΔW x_t‖²`` is the
per-token output error of a weight perturbation ``ΔW``. (IST-DASLab/gptq counts *sequences*, which
multiplies H by the sequence length; GPTQ's solution is invariant to that factor because damping is
relative to ``mean(diag H)``, only the reported loss scales.)
"""

from __future__ import annotations

import torch
from torch import Tensor


# Column width of the row panels in ``accumulate_hessian``: measured on 2 CPU cores (T = 2048 rows),
# 256 made the update 1.4-2x faster than one full K x K matmul for K = 384 .. 4096.
PANEL = 256


def accumulate_hessian(x: Tensor, H: Tensor | None, n: int, *, mirror: bool = True) -> tuple[Tensor, int]:
    """Fold the inputs ``x [..., K]`` into the running mean ``H [K, K]`` over ``n`` rows so far.

    ``H <- n/(n+m) * H + 2/(n+m) * X^T X`` with ``X = x.reshape(-1, K)`` in fp32 (``m`` rows).
    ``X^T X`` is symmetric, so only its upper triangle is computed, one ``addmm`` per row panel of
    ``PANEL`` rows (``H[s:e, s:] += X[:, s:e]^T X[:, s:]``: about half the flops of the full
    product for large K), and the lower triangle is mirrored from the upper: the result is exactly
    symmetric. ``H`` is updated in place and returned (a new fp32 tensor on ``x``'s
    device when ``H`` is None); the returned count is ``n + m``. ``x`` is moved to ``H``'s device,
    so ``H`` may live elsewhere (e.g. on the CPU while the layer runs on a GPU).

    ``mirror=False`` leaves the strict lower triangle (outside the diagonal blocks) stale: callers
    folding many batches mirror once at the end (``mirror_upper``); the upper triangle, and so the
    final ``H``, is the same bits either way.
    """
    K = x.shape[-1]
    X = x.detach().reshape(-1, K)
    m = X.shape[0]
    if H is not None and (H.shape != (K, K) or H.dtype != torch.float32):
        raise ValueError(f"Hessian must be fp32 [{K}, {K}] for {K} input features, got {H.dtype} {tuple(H.shape)}")
    if H is None and n:
        raise ValueError("accumulate_hessian: n must be 0 when H is None")
    if m == 0:
        return H, n
    total = n + m
    if H is None:
        X = X.to(dtype=torch.float32)
        H = X.new_empty(K, K)
        beta = 0.0  # the uninitialised H is ignored, NaN bits included
    else:
        X = X.to(device=H.device, dtype=torch.float32)
        beta = n / total
    for s in range(0, K, PANEL):
        H[s : s + PANEL, s:].addmm_(X[:, s : s + PANEL].T, X[:, s:], beta=beta, alpha=2.0 / total)
    if mirror:
        mirror_upper(H)
    return H, total


def mirror_upper(H: Tensor) -> Tensor:
    """Make ``H`` exactly symmetric from its upper triangle (in place; returns ``H``): below each
    ``PANEL`` diagonal block, and inside it."""
    K = H.shape[0]
    for s in range(0, K, PANEL):
        H[s + PANEL :, s : s + PANEL].copy_(H[s : s + PANEL, s + PANEL :].T)
        D = H[s : s + PANEL, s : s + PANEL]
        D.copy_(D.triu() + D.triu(1).T)
    return H


class HessianAccumulator:
    """Running ``H`` for one linear layer; feed it the layer's inputs batch by batch.

    ``acc.add(x)`` (or register ``acc.pre_hook`` with ``module.register_forward_pre_hook``),
    then read ``acc.H`` and ``acc.n``. ``device`` pins where ``H`` lives (default: the first input's).
    """

    def __init__(self, device: torch.device | str | None = None):
        self.device = torch.device(device) if device is not None else None
        self._H: Tensor | None = None
        self._stale = False  # lower triangle not yet mirrored (batches fold into the upper one only)
        self.n = 0

    @property
    def H(self) -> Tensor | None:
        if self._stale:
            mirror_upper(self._H)
            self._stale = False
        return self._H

    def add(self, x: Tensor) -> None:
        if self._H is None and self.device is not None:
            x = x.to(self.device)
        self._H, self.n = accumulate_hessian(x, self._H, self.n, mirror=False)
        self._stale = self._H is not None

    def pre_hook(self, module: torch.nn.Module, args: tuple) -> None:
        """``forward_pre_hook`` signature: accumulates the module's first positional input."""
        self.add(args[0])

    def reset(self) -> None:
        self._H, self._stale, self.n = None, False, 0
