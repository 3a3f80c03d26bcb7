"""GGUF block math (``quantize.methods.kquants``, ``quantize.formats.gguf_blocks``).

Oracles: gguf-py (``gguf.quants.dequantize`` for every type, ``gguf.quants.quantize`` for Q8_0/Q4_0)
and llama.cpp's own reference quantizers, whose output bytes for one fixed input per type and path
are pinned as sha256 digests in ``LLAMA_CPP_SHA256``.

How those digests were obtained: llama.cpp's ``ggml/src/ggml-quants.c`` from ggml-org/ggml commit
d99724f2b141fed9e1a9f402213506c081433465 (its ``scripts/sync-llama.last``: llama.cpp commit
d3cf1f14a2e16fbd7ebad34b12cb71b8af345c43), compiled as in a release build of ggml-base
(``gcc -O2 -DNDEBUG -std=gnu11 -c ggml-quants.c``, no -march, so no FMA contraction) and linked
with this harness (stubs for the four ggml.c symbols ggml-quants.c references), then run on
``fixed_input()`` written as raw float32 (and ``fixed_importance()`` for the quant_weights path)::

    #include <stdio.h>
    #include <stdlib.h>
    #include <string.h>
    #include <stdarg.h>
    #include "ggml.h"
    #include "ggml-quants.h"
    void ggml_abort(const char * file, int line, const char * fmt, ...) { abort(); }
    static size_t blck(enum ggml_type t) {
        return (t == GGML_TYPE_Q4_K || t == GGML_TYPE_Q5_K || t == GGML_TYPE_Q6_K) ? 256 : 32; }
    size_t ggml_type_size(enum ggml_type t) { switch (t) {
        case GGML_TYPE_Q8_0: return 34; case GGML_TYPE_Q4_0: return 18; case GGML_TYPE_Q4_K: return 144;
        case GGML_TYPE_Q5_K: return 176; case GGML_TYPE_Q6_K: return 210; default: abort(); } }
    size_t ggml_row_size(enum ggml_type t, int64_t ne) { return ggml_type_size(t) * ne / blck(t); }
    const char * ggml_type_name(enum ggml_type t) { return "?"; }
    static void * slurp(const char * p, size_t n) {
        FILE * f = fopen(p, "rb"); void * b = malloc(n); fread(b, 1, n, f); fclose(f); return b; }
    // usage: harness TYPE NROW NCOL in.f32 out.bin [imatrix.f32]
    int main(int argc, char ** argv) {
        long nrow = atol(argv[2]), ncol = atol(argv[3]);
        float * x = slurp(argv[4], 4 * nrow * ncol);
        float * qw = argc > 6 ? slurp(argv[6], 4 * ncol) : NULL;
        const char * tn = argv[1]; enum ggml_type t; size_t n = 0;
        if (!strcmp(tn, "Q8_0")) t = GGML_TYPE_Q8_0; else if (!strcmp(tn, "Q4_0")) t = GGML_TYPE_Q4_0;
        else if (!strcmp(tn, "Q4_K")) t = GGML_TYPE_Q4_K; else if (!strcmp(tn, "Q5_K")) t = GGML_TYPE_Q5_K;
        else t = GGML_TYPE_Q6_K;
        void * out = calloc(nrow, ggml_row_size(t, ncol));
        switch (t) {  // what llama-quantize calls (ggml_quantize_chunk), with or without the imatrix
            case GGML_TYPE_Q8_0: n = quantize_q8_0(x, out, nrow, ncol, qw); break;
            case GGML_TYPE_Q4_0: n = quantize_q4_0(x, out, nrow, ncol, qw); break;
            case GGML_TYPE_Q4_K: n = quantize_q4_K(x, out, nrow, ncol, qw); break;
            case GGML_TYPE_Q5_K: n = quantize_q5_K(x, out, nrow, ncol, qw); break;
            default:             n = quantize_q6_K(x, out, nrow, ncol, qw); break; }
        FILE * f = fopen(argv[5], "wb"); fwrite(out, 1, n, f); fclose(f); return 0; }

The digest is ``sha256(out.bin)``. During development the same harness was compared with our bytes
on 3,750 random 16 x 512 cases (15 seeds x 10 distributions incl. ties, sparse, one-hot, all-negative,
1e-13..1e4 scales x 5 importance kinds incl. none and all-zero x 5 types): identical bytes in all.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from quantize.formats import gguf_blocks
from quantize.methods import kquants

gguf = pytest.importorskip("gguf")

pytestmark = pytest.mark.usefixtures("one_thread")

TYPES = ("Q8_0", "Q4_0", "Q4_K", "Q5_K", "Q6_K")


def _gtype(qtype: str):
    return getattr(gguf.GGMLQuantizationType, qtype)


def _uniform(n: int, salt: int) -> np.ndarray:
    """n uniforms in [0, 1) on a 2^-24 lattice from splitmix64 (integer ops only: no RNG library
    whose stream could change between numpy versions, no libm)."""
    z = np.arange(n, dtype=np.uint64) + np.uint64(salt) * np.uint64(0x100000000)
    z = z * np.uint64(0x9E3779B97F4A7C15) + np.uint64(0x2545F4914F6CDD1D)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(40)).astype(np.float64) / float(1 << 24)


def _gauss(shape: tuple[int, int], salt: int) -> np.ndarray:
    """Irwin-Hall(4) - 2: bell-shaped, exact in float64."""
    u = _uniform(shape[0] * shape[1] * 4, salt).reshape(*shape, 4)
    return u.sum(axis=-1) - 2.0


def fixed_input() -> np.ndarray:
    """The pinned 8 x 512 float32 input (two super-blocks per row): an all-zero row, several scales,
    rows with zeros, outliers, a non-negative row, a tiny half-row, heavy tails, per-16 scales."""
    n, k = 8, 512
    g = _gauss((n, k), 1)
    w = np.zeros((n, k))
    w[1] = g[1] * 0.02
    w[2] = g[2]
    w[2, ::3] = 0.0
    w[3] = g[3] * 0.01
    w[3, 77] = 0.6
    w[3, 300] = -0.45
    w[4] = np.abs(g[4]) * 0.05
    w[5, :256] = g[5, :256] * 1e-6
    w[5, 256:] = g[5, 256:] * 0.05
    w[5, 256:288] = 0.0
    w[6] = g[6] ** 3 * 0.01
    w[7] = g[7] * 0.1 * 2.0 ** -((np.arange(k) // 16) % 12)
    return w.astype(np.float32)


def fixed_importance() -> np.ndarray:
    """Pinned E[x^2] per column: positive, spread over 4 decades, zero on columns 0..31 and every 7th."""
    u = _uniform(512, 2)
    imp = (u * 10.0) ** 4 / 100.0 + 1e-3
    imp[:32] = 0.0
    imp[::7] = 0.0
    return imp.astype(np.float32)


FIXED_INPUT_SHA256 = "25f22613dd0806285e2bb3b6d1147597b64bd248d5d51c222243237f02eb6b5c"
FIXED_IMPORTANCE_SHA256 = "2cd8b8d8fc139a57c9b79aee7f142c77a32d2d07895cf98fe546efc98bdf4d5f"

# sha256 of llama.cpp's bytes for fixed_input() (see the module docstring); "imatrix" = with
# quant_weights = fixed_importance().
LLAMA_CPP_SHA256 = {
    ("Q8_0", "ref"): "d09aa573a34f77682aceba19113226392ff9f44b7266ebf7a29d833f9dd96cad",
    ("Q4_0", "ref"): "5d680508d13c4df20d218145a30d39ae91ca034b3298da6d16e6887311d32237",
    ("Q4_0", "imatrix"): "509f74b9edda47dbc81c100739c7f8725c85b7f9328e0a40ddad3fbdc37ed276",
    ("Q4_K", "ref"): "57a250461ec3bf973bbe3a151cec900476d9bde4088172ce46af0689790d8fc7",
    ("Q4_K", "imatrix"): "a4e2f1995eebe202966328883ed85158d4ea44da36b9f4402ed90d5ea4558ecd",
    ("Q5_K", "ref"): "0271d5df10ce490ab49a82938dff23506ce950d4107524e9967353536509bb09",
    ("Q5_K", "imatrix"): "830011fce960e5f109ca51764a2a6822365cdb3d3907d56bcc73ae5ade61912c",
    ("Q6_K", "ref"): "30d975beb62482493680f0ddab7a23a5c3a8013e7cb037180432cd342ca26d53",
    ("Q6_K", "imatrix"): "1b1e883099d7261a2114304580fb9593adbb5080d401ae6f65ac9e620ddcc60f",
}


def test_fixed_input_is_stable():
    """The pinned digests are only meaningful for the exact input they were computed on."""
    assert hashlib.sha256(fixed_input().tobytes()).hexdigest() == FIXED_INPUT_SHA256
    assert hashlib.sha256(fixed_importance().tobytes()).hexdigest() == FIXED_IMPORTANCE_SHA256


@pytest.mark.parametrize("qtype,path", sorted(LLAMA_CPP_SHA256))
def test_bytes_match_llama_cpp(qtype, path):
    W = torch.from_numpy(fixed_input())
    imp = torch.from_numpy(fixed_importance()) if path == "imatrix" else None
    raw = gguf_blocks.quantize_reference(W, qtype, imp)
    assert raw.dtype == torch.uint8
    assert tuple(raw.shape) == (8, 512 // gguf_blocks.TYPE_SIZES[qtype][0] * gguf_blocks.TYPE_SIZES[qtype][1])
    assert hashlib.sha256(raw.numpy().tobytes()).hexdigest() == LLAMA_CPP_SHA256[(qtype, path)]


def random_rows(seed: int, n: int = 12, k: int = 512) -> np.ndarray:
    """Rows at several scales, with zeros, an all-zero row, outliers, ties, a one-hot row."""
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((n, k)) * rng.choice([1e-4, 0.02, 1.0, 40.0], size=(n, 1))
    W[0] = 0.0
    W[1, rng.random(k) < 0.5] = 0.0
    W[2, :64] = 0.0
    W[3, rng.integers(0, k, 3)] *= 80.0
    W[4] = np.abs(W[4])
    W[5] = np.round(W[5] * 8) / 8
    W[6] = 0.0
    W[6, rng.integers(0, k)] = 0.7
    W[7] *= np.repeat(2.0 ** -rng.integers(0, 14, k // 16), 16)
    W[8] = -np.abs(W[8])
    return W.astype(np.float32)


def random_importance(seed: int, k: int = 512) -> np.ndarray:
    rng = np.random.default_rng(seed + 1000)
    imp = rng.random(k) ** 3 * 5
    imp[rng.random(k) < 0.2] = 0.0
    imp[32:64] = 0.0  # a whole sub-block with no importance
    return imp.astype(np.float32)


def _u32(a) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(a, dtype=np.float32)).view(np.uint32)


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("with_importance", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_dequant_matches_gguf_py_bit_for_bit(qtype, with_importance, seed):
    W = torch.from_numpy(random_rows(seed))
    imp = torch.from_numpy(random_importance(seed)) if with_importance else None
    grid = kquants.block_grid(W, qtype, imp)
    codes = kquants.quantize_codes(W, grid)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= grid.maxq
    raw = gguf_blocks.pack(codes, grid, qtype)
    theirs = gguf.quants.dequantize(raw.numpy(), _gtype(qtype))
    ours = kquants.dequantize(codes, grid)
    assert ours.dtype == torch.float32 and theirs.shape == tuple(ours.shape)
    np.testing.assert_array_equal(_u32(ours), _u32(theirs))
    np.testing.assert_array_equal(_u32(grid.dequant(codes)), _u32(theirs))
    if imp is None:  # a quantization of W, not noise (with importance, zero-weight columns are free)
        err = (ours - W).abs().max(dim=1).values
        assert torch.all(err <= W.abs().max(dim=1).values * 0.6)
    # unpack inverts pack: same codes, same stored fields, same bytes again
    codes2, grid2 = gguf_blocks.unpack(raw, qtype, W.shape[1])
    torch.testing.assert_close(codes2, codes, rtol=0, atol=0)
    np.testing.assert_array_equal(_u32(grid2.scale), _u32(grid.scale))
    assert torch.equal(gguf_blocks.pack(codes2, grid2, qtype), raw)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_q8_0_q4_0_bytes_match_gguf_py(qtype, seed):
    W = random_rows(seed)
    ours = gguf_blocks.quantize_reference(torch.from_numpy(W), qtype)
    theirs = gguf.quants.quantize(W, _gtype(qtype))
    assert theirs.shape == tuple(ours.shape)
    np.testing.assert_array_equal(ours.numpy(), theirs)


@pytest.mark.parametrize("qtype", TYPES)
def test_symmetric_zero_points_and_real_zero(qtype):
    """value = scale*(q - zero): exact for the symmetric types, to rounding for Q4_K/Q5_K."""
    W = torch.from_numpy(random_rows(3))
    grid = kquants.block_grid(W, qtype)
    codes = kquants.quantize_codes(W, grid)
    affine = grid.scale.repeat_interleave(grid.sub, 1) * (codes.float() - grid.zero.repeat_interleave(grid.sub, 1))
    exact = kquants.dequantize(codes, grid)
    if qtype in ("Q4_K", "Q5_K"):
        torch.testing.assert_close(affine, exact, rtol=0, atol=float(exact.abs().max()) * 1e-6)
    else:
        assert grid.zero.unique().tolist() == [{"Q8_0": 128.0, "Q4_0": 8.0, "Q6_K": 32.0}[qtype]]
        np.testing.assert_array_equal(_u32(affine), _u32(exact))


@pytest.mark.parametrize("qtype", TYPES)
def test_column_wise_codes_equal_full(qtype):
    """A GPTQ loop rounds one column at a time on the fixed grid: same codes as the whole matrix."""
    W = torch.from_numpy(random_rows(4, n=10))
    imp = torch.from_numpy(random_importance(4))
    grid = kquants.block_grid(W, qtype, imp)
    full = kquants.quantize_codes(W, grid)
    cols = torch.cat([kquants.quantize_codes(W[:, j], grid, columns=j)[:, :1] for j in range(0, 512, 37)], 1)
    assert torch.equal(cols, full[:, 0:512:37])
    part = kquants.quantize_codes(W[:, 100:300], grid, columns=slice(100, 300))
    assert torch.equal(part, full[:, 100:300])
    deq = kquants.dequantize(full[:, 100:300], grid, columns=slice(100, 300))
    assert torch.equal(deq, kquants.dequantize(full, grid)[:, 100:300])


def test_zero_scale_sub_blocks_keep_reference_codes():
    """A sub-block whose 6-bit scale rounds to 0 is not re-rounded by llama.cpp: its codes stay the
    search's (grid.fixed_codes); values are -dmin*m whatever the codes."""
    W = random_rows(5)
    W[9, :32] *= 1e-4  # tiny sub-block next to normal ones: sc == 0
    W = torch.from_numpy(W)
    grid = kquants.block_grid(W, "Q4_K")
    assert grid.fixed is not None and bool(grid.fixed[9, 0]) and bool(grid.fixed[0].all())
    codes = kquants.quantize_codes(W, grid)
    assert torch.equal(codes[grid.fixed.repeat_interleave(32, 1)],
                       grid.fixed_codes[grid.fixed.repeat_interleave(32, 1)])


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="multiple of the block size 256"):
        kquants.block_grid(torch.zeros(2, 288), "Q4_K")
    with pytest.raises(ValueError, match="unsupported GGUF block type"):
        kquants.block_grid(torch.zeros(2, 256), "Q3_K")
    with pytest.raises(ValueError, match="importance has 10 entries"):
        kquants.block_grid(torch.zeros(2, 256), "Q6_K", torch.ones(10))
    grid = kquants.block_grid(torch.ones(2, 32), "Q8_0")
    with pytest.raises(ValueError, match="outside 0..255"):
        gguf_blocks.pack(torch.full((2, 32), 300, dtype=torch.int32), grid, "Q8_0")


def test_type_sizes_match_gguf():
    for qtype, sizes in gguf_blocks.TYPE_SIZES.items():
        assert gguf.GGML_QUANT_SIZES[_gtype(qtype)] == sizes
