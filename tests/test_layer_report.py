"""The per-linear report of the GPTQ/RTN layer methods (``relative_errors``): the weighted relative
errors of candidates, on at most ``REPORT_ROWS`` rows, with RTN quantizing only those rows."""

from __future__ import annotations

import pytest
import torch

from quantize.methods.gptq import weighted_error
from quantize.methods.grid import QuantSpec
from quantize.methods.layer import REPORT_ROWS, relative_errors
from quantize.methods.rtn import rtn_quantize


def _problem(N: int, K: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(4 * K, K, generator=g)
    H = 2.0 / X.shape[0] * X.T @ X
    W = torch.randn(N, K, generator=g)
    return W, H


def test_small_layers_use_every_row_and_match_the_definition():
    W, H = _problem(48, 64)
    noisy = W + 0.01 * torch.randn_like(W)
    errs = relative_errors(W, H, a=noisy, b=torch.zeros_like(W))
    ref = weighted_error(W, torch.zeros_like(W), H)
    assert errs["a"] == pytest.approx(weighted_error(W, noisy, H) / ref, rel=1e-5)
    assert errs["b"] == pytest.approx(1.0, rel=1e-6)  # dW = W


def test_large_layers_report_on_a_row_subset_and_rtn_quantizes_only_those_rows():
    N, K = 3 * REPORT_ROWS + 7, 64
    W, H = _problem(N, K, seed=1)
    spec = QuantSpec(bits=4, group_size=32, sym=False)
    seen: list[int] = []

    def rtn(w):
        seen.append(w.shape[0])
        return rtn_quantize(w, spec).W_hat

    full = rtn_quantize(W, spec).W_hat
    errs = relative_errors(W, H, rtn=rtn, full=full)
    assert seen == [REPORT_ROWS]
    # RTN's rows are independent: quantizing the subset is the subset of quantizing everything
    assert errs["rtn"] == pytest.approx(errs["full"], rel=1e-6)
    rows = torch.linspace(0, N - 1, REPORT_ROWS).round().long()
    expected = weighted_error(W[rows], full[rows], H) / weighted_error(W[rows], torch.zeros_like(W[rows]), H)
    assert errs["full"] == pytest.approx(expected, rel=1e-5)


def test_zero_weights_report_zero():
    W = torch.zeros(8, 16)
    H = torch.eye(16)
    assert relative_errors(W, H, a=torch.ones_like(W)) == {"a": 0.0}
