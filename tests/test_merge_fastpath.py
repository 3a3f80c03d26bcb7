"""The merge's fast paths give the same bytes as the plain ones.

* ``ShardedWriter.plan`` (tensors written straight to their final offsets) vs the spool;
  ``sha256=True`` digests vs hashing the files;
* ``CheckpointReader.get(out=...)`` (read into a reused buffer) vs a fresh tensor;
* ``lora_math.merge_linear_rounded`` (one GEMM + a blocked elementwise pass) vs
  ``round_to(merge_linear(...))`` and ``aminmax``;
* ``stream.Arena`` buffers: aligned and disjoint.
"""

from __future__ import annotations

import hashlib

import pytest
import torch

from quantize.io.reader import CheckpointReader
from quantize.io.writer import ShardedWriter
from quantize.merge import lora_math as lm
from quantize.merge.stream import Arena


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "b.bf16": torch.randn(16, 8, generator=g).to(torch.bfloat16),
        "a.fp32": torch.randn(40, generator=g),  # added after a bf16 tensor: layout order differs in its shard
        "c.scalar": torch.tensor(3.5),
        "d.empty": torch.zeros(0, 3, dtype=torch.float16),
        "e.big": torch.randn(64, 16, generator=g).to(torch.bfloat16),  # larger than a shard: one of its own
        "f.int": torch.arange(10, dtype=torch.int32),
        "g.fp16": torch.randn(6, 5, generator=g).to(torch.float16),
    }


def _write(directory, tensors, planned: bool, shard_bytes: int = 500) -> ShardedWriter:
    with ShardedWriter(directory, max_shard_bytes=shard_bytes, sha256=True) as w:
        if planned:
            w.plan([(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()])
        for n, t in tensors.items():
            w.add(n, t)
        w.close()
    return w


def _files(d) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_planned_writer_is_byte_identical_to_the_spool(tmp_path):
    tensors = _tensors()
    _write(tmp_path / "spool", tensors, planned=False)
    w = _write(tmp_path / "planned", tensors, planned=True)
    spooled, planned = _files(tmp_path / "spool"), _files(tmp_path / "planned")
    assert len([n for n in planned if n.endswith(".safetensors")]) >= 3
    assert planned == spooled
    r = CheckpointReader(tmp_path / "planned")
    for n, t in tensors.items():
        assert torch.equal(r.get(n), t)
    # digests only for shards written front to back, and they are the files' digests
    assert w.sha256
    for name, digest in w.sha256.items():
        assert digest == hashlib.sha256(planned[name]).hexdigest()
    first_shard = [n for n in planned if n.startswith("model-00001")][0]
    assert first_shard not in w.sha256  # b.bf16 then a.fp32: written out of file order


def test_planned_writer_refuses_a_different_tensor_and_a_short_run(tmp_path):
    tensors = _tensors()
    entries = [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    with pytest.raises(ValueError, match="not the next planned tensor"):
        with ShardedWriter(tmp_path / "a", max_shard_bytes=500) as w:
            w.plan(entries)
            w.add("a.fp32", tensors["a.fp32"])
    assert not any((tmp_path / "a").iterdir())  # aborted: nothing left
    with pytest.raises(ValueError, match="planned tensors were not added"):
        with ShardedWriter(tmp_path / "b", max_shard_bytes=500) as w:
            w.plan(entries)
            w.add("b.bf16", tensors["b.bf16"])
            w.close()
    assert not any((tmp_path / "b").iterdir())


def test_read_into_a_reused_buffer(tmp_path):
    tensors = _tensors()
    _write(tmp_path / "m", tensors, planned=False)
    r = CheckpointReader(tmp_path / "m")
    buf = torch.empty(8192, dtype=torch.uint8)
    for n, t in tensors.items():
        got = r.get(n, out=buf)
        assert got.dtype == t.dtype and torch.equal(got, t)
        assert got.numel() == 0 or got.data_ptr() == buf.data_ptr()
    with pytest.raises(ValueError, match="out must be"):
        r.get("e.big", out=torch.empty(10, dtype=torch.uint8))
    with pytest.raises(ValueError, match="aligned"):
        r.get("a.fp32", out=buf[1:])


@pytest.mark.parametrize("w_dtype,out_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                                               (torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("shape,rank", [((300, 77), 8), ((64, 4096), 16), ((1, 5), 1)])
def test_fused_merge_matches_the_unfused_one(w_dtype, out_dtype, shape, rank):
    g = torch.Generator().manual_seed(1)
    W = (0.02 * torch.randn(shape, generator=g)).to(w_dtype)
    A, B = torch.randn(rank, shape[1], generator=g), torch.randn(shape[0], rank, generator=g)
    scale = 0.37
    merged = lm.merge_linear(W, A, B, scale)
    lo, hi = torch.aminmax(merged)
    for block in (lm.FUSED_BLOCK, 1000):
        rounded, work, f_lo, f_hi = lm.merge_linear_rounded(W, A, B, scale, out_dtype, block=block)
        assert torch.equal(rounded.view(torch.uint8), lm.round_to(merged, out_dtype).view(torch.uint8))
        assert torch.equal(work, merged) and f_lo == lo and f_hi == hi


def test_fused_merge_reports_nan():
    W = torch.zeros(4, 8, dtype=torch.bfloat16)
    A, B = torch.ones(2, 8), torch.ones(4, 2)
    B[1, 0] = float("nan")
    _, _, lo, hi = lm.merge_linear_rounded(W, A, B, 1.0, torch.bfloat16, block=8)
    assert torch.isnan(lo) and torch.isnan(hi)


def test_arena_buffers_are_aligned_and_disjoint():
    arena = Arena()
    a, b, c = arena.take(10, 100, 7)
    assert [x.numel() for x in (a, b, c)] == [10, 100, 7]
    assert all(x.data_ptr() % Arena.ALIGN == 0 for x in (a, b, c))
    assert a.data_ptr() + 10 <= b.data_ptr() and b.data_ptr() + 100 <= c.data_ptr()
    size = arena.nbytes
    arena.take(50)
    assert arena.nbytes == size  # reused, not grown
