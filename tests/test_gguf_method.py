"""GGUF tensors from the layer plug-in: llama.cpp's reference bytes without calibration; with a
Hessian, GPTQ on the grid of llama.cpp's importance-weighted search, beating that search."""

from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from quantize.formats import gguf_blocks  # noqa: E402
from quantize.methods.gguf_layer import importance, quantize_tensor  # noqa: E402
from quantize.methods.gptq import weighted_error  # noqa: E402


def _problem(seed: int, N: int = 32, K: int = 512):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(N, K, generator=g) * 0.05
    W[3, :40] *= 8  # outliers in one row
    X = torch.randn(1024, K, generator=g) @ (torch.eye(K) + 0.5 * torch.randn(K, K, generator=g) / K**0.5)
    X = X * torch.linspace(0.3, 2.0, K)
    return W, 2 * X.T @ X / X.shape[0]


@pytest.mark.parametrize("qtype", ["Q4_K", "Q5_K", "Q6_K", "Q8_0", "Q4_0"])
def test_hessian_aware_bytes_beat_llama_cpp_with_and_without_imatrix(qtype):
    W, H = _problem(7)
    ref = quantize_tensor(W, qtype)
    assert ref.solver == "reference" and torch.equal(ref.raw, gguf_blocks.quantize_reference(W, qtype))
    ours = quantize_tensor(W, qtype, H)
    assert ours.solver == "gptq" and ours.raw.dtype == torch.uint8 and ours.raw.shape == ref.raw.shape
    # gguf-py (llama.cpp's own package), not our code, reads our bytes back to the solver's weights
    dq = gguf.quants.dequantize(ours.raw.numpy(), getattr(gguf.GGMLQuantizationType, qtype))
    assert np.array_equal(dq, ours.W_hat.numpy())
    imatrix_raw = gguf_blocks.quantize_reference(W, qtype, importance(H))  # llama.cpp with our imatrix
    imatrix = torch.from_numpy(gguf.quants.dequantize(imatrix_raw.numpy(), getattr(gguf.GGMLQuantizationType, qtype)))
    e_ours, e_ref, e_imx = (weighted_error(W, w, H) for w in (ours.W_hat, ref.W_hat, imatrix))
    assert e_ours < 0.8 * e_ref, (e_ours, e_ref)
    assert e_ours < 0.9 * e_imx or qtype == "Q8_0", (e_ours, e_imx)  # Q8_0 ignores the imatrix
    assert e_ours < e_imx


def test_float_and_fallback_types():
    W, _ = _problem(1, K=96)
    f16 = quantize_tensor(W, "F16")
    assert f16.raw.shape == (32, 192) and torch.equal(f16.W_hat, W.half().float())
    q50 = quantize_tensor(W, "Q5_0")  # llama.cpp's fallback for Q4_K at widths not a multiple of 256
    assert q50.solver == "gguf-py" and q50.raw.shape == (32, 96 // 32 * 22)
    assert float((q50.W_hat - W).abs().max()) < 0.05 * float(W.abs().max())


def test_imatrix_file_round_trips_through_gguf_py(tmp_path):
    from quantize.formats.gguf_imatrix import read_imatrix, write_imatrix

    _, H = _problem(3, K=256)
    n = 1024
    path = write_imatrix(tmp_path / "imatrix.gguf", {"blk.0.attn_q.weight": (importance(H) * n, n)},
                         datasets=["wikitext2"], chunk_count=4, chunk_size=256)
    r = gguf.GGUFReader(str(path))
    fields = {f.name: f for f in r.fields.values()}
    assert "general.architecture" not in fields
    assert bytes(fields["general.type"].parts[-1]).decode() == "imatrix"
    assert int(fields["imatrix.chunk_count"].parts[-1][0]) == 4
    assert {t.name for t in r.tensors} == {"blk.0.attn_q.weight.in_sum2", "blk.0.attn_q.weight.counts"}
    back = read_imatrix(path)["blk.0.attn_q.weight"]
    assert torch.allclose(back, importance(H), rtol=1e-6)


@pytest.mark.parametrize("qtype", ["Q5_0", "Q5_1", "Q4_1"])
def test_legacy_fallback_types_repack_exactly_and_beat_the_reference(qtype):
    """llama.cpp's shape fallbacks: re-packing the reference codes gives the reference bytes; GPTQ
    on their grid lowers the output error; gguf-py reads the bytes back to our weights."""
    from quantize.formats import gguf_legacy

    W, H = _problem(5, K=384)
    ref = gguf_legacy.reference(W, qtype)
    N, K = W.shape
    d, m = gguf_legacy.grid(ref, qtype, N, K)
    W_ref = gguf_legacy.dequantize(ref, qtype)
    codes = torch.stack([gguf_legacy.round_column(W_ref[:, k], d[:, k // 32], m[:, k // 32], qtype)[0]
                         for k in range(K)], dim=1)
    assert np.array_equal(gguf_legacy.repack(ref, codes, qtype), ref)
    ours = quantize_tensor(W, qtype, H)
    assert ours.solver == "gptq" and ours.raw.shape == tuple(ref.shape)
    assert torch.equal(ours.W_hat, gguf_legacy.dequantize(ours.raw.numpy(), qtype))
    assert weighted_error(W, ours.W_hat, H) < 0.9 * weighted_error(W, W_ref, H)
