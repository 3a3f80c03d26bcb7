"""Streaming merge: read one base tensor, apply every update that targets it, round once, write.

A merge is planned first (every name, shape and update is known and validated before any tensor
data is read) as a list of *jobs*. Running a job reads the base tensors it needs, applies its
updates in float32 and yields finished output tensors, which go straight to the
:class:`~quantize.io.writer.ShardedWriter`. Only one job's tensors are alive at a time, so peak
memory is about the largest tensor (input + float32 working copy + rounded output) plus the adapter.

Updates (:class:`Update` subclasses) are thin wrappers around :mod:`lora_math`; each also describes
itself for the manifest.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from ..errors import InputError
from ..io.reader import CheckpointReader
from . import lora_math as lm

TensorSource = Callable[[], Tensor]
Lazy = Tensor | TensorSource  # a tensor, or a loader called when the update runs (keeps adapters off the heap)


def _load(x: Lazy | None) -> Tensor | None:
    return x() if callable(x) else x


# ---------------------------------------------------------------------------------------------
# updates


class Update(Protocol):
    def apply(self, W: Tensor) -> Tensor:
        """The updated float32 tensor (``W`` is left untouched)."""

    def record(self) -> dict[str, Any]:
        """A JSON-able description for the manifest."""


@dataclass
class Replace:
    """A full replacement (``modules_to_save``, saved embeddings, trained biases)."""

    source: TensorSource
    origin: str  # where the tensor comes from, for the manifest
    shape: tuple[int, ...] | None = None  # the replacement's shape, when known at plan time

    def apply(self, W: Tensor | None) -> Tensor:
        return self.source().to(lm.MERGE_PRECISION)

    def record(self) -> dict[str, Any]:
        return {"op": "replace", "from": self.origin}


@dataclass
class LinearLora:
    module: str
    A: Lazy
    B: Lazy
    scale: float
    rank: int
    alpha: float
    rslora: bool = False
    magnitude: Lazy | None = None
    fan_in_fan_out: bool = False

    def apply(self, W: Tensor) -> Tensor:
        magnitude = _load(self.magnitude)
        return lm.merge_linear(W, _load(self.A), _load(self.B), self.scale,
                               magnitude=None if magnitude is None else magnitude.reshape(-1),
                               fan_in_fan_out=self.fan_in_fan_out)

    @property
    def fusable(self) -> bool:
        """Plain LoRA on a ``[out, in]`` weight: :func:`lora_math.merge_linear_rounded` applies."""
        return self.magnitude is None and not self.fan_in_fan_out

    def record(self) -> dict[str, Any]:
        rec = {"op": "dora" if self.magnitude is not None else "lora", "module": self.module, "rank": self.rank,
               "alpha": self.alpha, "scale": self.scale, "rslora": self.rslora}
        if self.fan_in_fan_out:
            rec["fan_in_fan_out"] = True
        return rec


@dataclass
class EmbeddingLora:
    module: str
    A: Lazy  # lora_embedding_A [r, vocab]
    B: Lazy  # lora_embedding_B [dim, r]
    scale: float
    rank: int
    alpha: float
    rslora: bool = False
    magnitude: Lazy | None = None

    def apply(self, W: Tensor) -> Tensor:
        magnitude = _load(self.magnitude)
        return lm.merge_embedding(W, _load(self.A), _load(self.B), self.scale,
                                  magnitude=None if magnitude is None else magnitude.reshape(-1))

    def record(self) -> dict[str, Any]:
        return {"op": "embedding_dora" if self.magnitude is not None else "embedding_lora", "module": self.module,
                "rank": self.rank, "alpha": self.alpha, "scale": self.scale, "rslora": self.rslora}


@dataclass
class BiasLora:
    """``lora_bias=True``: ``b + s·lora_B.bias``."""

    module: str
    bias: Lazy
    scale: float

    def apply(self, W: Tensor) -> Tensor:
        return lm.merge_bias(W, _load(self.bias), self.scale)

    def record(self) -> dict[str, Any]:
        return {"op": "lora_bias", "module": self.module, "scale": self.scale}


@dataclass
class SetRows:
    """Trainable tokens: rows ``indices`` are overwritten with new values."""

    indices: list[int]
    rows: TensorSource

    def apply(self, W: Tensor) -> Tensor:
        out = W.to(lm.MERGE_PRECISION, copy=True)
        out[torch.tensor(self.indices, dtype=torch.long)] = self.rows().to(lm.MERGE_PRECISION)
        return out

    def record(self) -> dict[str, Any]:
        return {"op": "trainable_tokens", "rows": len(self.indices)}


@dataclass
class FusedQkvLora:
    """Lit-GPT fused-QKV LoRA: a block-diagonal delta over the q, k, v row blocks (current layout)."""

    module: str
    A: Tensor
    B: Tensor
    scale: float
    rank: int
    alpha: float
    enable: tuple[bool, bool, bool]
    sizes: tuple[int, int, int]

    def apply(self, W: Tensor) -> Tensor:
        return lm.blockdiag_qkv_delta(self.A, self.B, self.scale, self.enable, self.sizes).add_(W)

    def record(self) -> dict[str, Any]:
        return {"op": "lora_qkv", "module": self.module, "rank": self.rank, "alpha": self.alpha, "scale": self.scale,
                "enabled": [p for p, e in zip("qkv", self.enable) if e]}


def apply_updates(W: Tensor | None, updates: Sequence[Update]) -> Tensor:
    """Apply updates in order (a :class:`Replace` starts from the replacement); float32 result."""
    for u in updates:
        W = u.apply(W)
    return W


# ---------------------------------------------------------------------------------------------
# finishing a tensor


def finish(name: str, merged: Tensor, dtype: torch.dtype, *, what: str = "the adapter") -> Tensor:
    """Round a merged float32 tensor once to ``dtype``; refuse NaN/Inf, and values that overflow ``dtype``.

    One ``aminmax`` pass decides both (NaN propagates into it; rounding is monotonic, so the tensor
    overflows ``dtype`` iff its smallest or largest value does).
    """
    lo, hi = torch.aminmax(merged)
    check_merged(name, merged, lo, hi, dtype, what=what)
    return lm.round_to(merged, dtype)


def check_merged(name: str, merged: Tensor, lo: Tensor, hi: Tensor, dtype: torch.dtype, *,
                 what: str = "the adapter") -> None:
    """:func:`finish`'s refusals, given the merged tensor's min ``lo`` and max ``hi``."""
    if not (bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))):
        bad = int((~torch.isfinite(merged)).sum())
        raise InputError(
            f"merged tensor {name}: {bad} of {merged.numel()} values are NaN/Inf after merging; "
            f"{what} is broken (diverged training or corrupt file); re-export it"
        )
    if bool(torch.isinf(lo.to(dtype))) or bool(torch.isinf(hi.to(dtype))):
        raise InputError(
            f"merged tensor {name}: values up to {max(-float(lo), float(hi)):.3g} after merging overflow {dtype} (NaN/Inf "
            "when written); pass --dtype fp32 or bf16"
        )


def output_dtype(base_dtype: torch.dtype, requested: torch.dtype | None) -> torch.dtype:
    """``requested`` for floating tensors, else the base dtype (``auto``; integer tensors always keep theirs)."""
    if requested is None or not base_dtype.is_floating_point:
        return base_dtype
    return requested


# ---------------------------------------------------------------------------------------------
# scratch memory


class Arena:
    """Scratch memory handed from one job to the next (only one job's tensors are alive at a time).

    A fresh multi-megabyte tensor is a new mapping that the kernel page-faults in (and zeroes) on
    first touch: measured here at ~0.6 ms/MB, as much as reading the same bytes from the page cache.
    A job takes all its buffers in one :meth:`take`, so the arena grows only to the largest job's
    total: the same peak as allocating per tensor, held for the whole merge.
    """

    ALIGN = 64  # what torch's CPU allocator gives; MKL picks its GEMM kernel by alignment

    def __init__(self) -> None:
        self._buf = torch.empty(0, dtype=torch.uint8)

    def take(self, *nbytes: int) -> list[Tensor]:
        """Disjoint 1-d uint8 buffers of these sizes (64-byte aligned); valid until the next ``take``."""
        a = self.ALIGN
        sizes = [-(-n // a) * a for n in nbytes]
        if self._buf.numel() < sum(sizes) + a:
            self._buf = torch.empty(0, dtype=torch.uint8)  # release the old buffer before growing
            self._buf = torch.empty(sum(sizes) + a, dtype=torch.uint8)
        offset = -self._buf.data_ptr() % a
        out = []
        for n, size in zip(nbytes, sizes):
            out.append(self._buf[offset : offset + n])
            offset += size
        return out

    @property
    def nbytes(self) -> int:
        return self._buf.numel()


def _typed(buf: Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> Tensor:
    return buf.view(dtype).view(shape)


# ---------------------------------------------------------------------------------------------
# jobs


@dataclass
class Produced:
    """One finished output tensor and, when it differs from a plain copy, what was done to it."""

    name: str
    tensor: Tensor
    ops: list[dict[str, Any]] | None = None  # None: copied (possibly cast), not modified


Entry = tuple[str, torch.dtype, tuple[int, ...]]  # an output tensor: name, dtype, shape


class Job(Protocol):
    outputs: list[str]  # output tensor names (known at plan time)

    # Optional: ``layout(reader) -> list[Entry] | None``, the exact outputs in yield order when known
    # before running (see :func:`planned_layout`).

    def run(self, reader: CheckpointReader, arena: Arena | None = None) -> Iterator[Produced]:
        """Yield the output tensors; each is consumed (written) before the generator resumes, so
        they may live in ``arena``."""


@dataclass
class TensorJob:
    """One output tensor from (at most) one base tensor plus updates."""

    name: str
    source: str | None  # base tensor name (None when the first update is a Replace)
    dtype: torch.dtype  # output dtype
    updates: list[Update] = field(default_factory=list)

    @property
    def outputs(self) -> list[str]:
        return [self.name]

    def layout(self, reader: CheckpointReader) -> list[Entry] | None:
        if self.updates and isinstance(self.updates[0], Replace):
            shape = self.updates[0].shape
            return None if shape is None else [(self.name, self.dtype, shape)]
        return [(self.name, self.dtype, reader.shape(self.source))]  # updates keep the shape

    def run(self, reader: CheckpointReader, arena: Arena | None = None) -> Iterator[Produced]:
        if not self.updates:
            if arena is not None and reader.dtype(self.source) == self.dtype:
                (buf,) = arena.take(reader.nbytes(self.source))
                yield Produced(self.name, reader.get(self.source, out=buf))
            else:
                yield Produced(self.name, reader.get(self.source, dtype=self.dtype))
            return
        u = self.updates[0]
        if arena is not None and len(self.updates) == 1 and isinstance(u, LinearLora) and u.fusable:
            yield self._fused(reader, arena, u)
            return
        base = reader.get(self.source) if self.source is not None and not isinstance(self.updates[0], Replace) else None
        merged = apply_updates(base, self.updates)
        del base
        yield Produced(self.name, finish(self.name, merged, self.dtype), [u.record() for u in self.updates])

    def _fused(self, reader: CheckpointReader, arena: Arena, u: LinearLora) -> Produced:
        """One plain LoRA: read, merge, check and round in arena buffers (bit-identical to the general path)."""
        shape, numel = reader.shape(self.source), math.prod(reader.shape(self.source))
        w_buf, work_buf, out_buf = arena.take(reader.nbytes(self.source), numel * lm.MERGE_PRECISION.itemsize,
                                              numel * self.dtype.itemsize)
        W = reader.get(self.source, out=w_buf)
        rounded, merged, lo, hi = lm.merge_linear_rounded(
            W, _load(u.A), _load(u.B), u.scale, self.dtype,
            work=_typed(work_buf, lm.MERGE_PRECISION, shape), out=_typed(out_buf, self.dtype, shape))
        check_merged(self.name, merged, lo, hi, self.dtype)
        return Produced(self.name, rounded, [u.record()])


@dataclass
class TiedEmbeddingJob:
    """Embedding and head of a model whose config ties them (MERGE.md §2.6, §6.1).

    Both are computed (from their sources plus updates); if they end up bit-identical the model
    stays tied and only the embedding is written, otherwise both are written and the config must
    say ``tie_word_embeddings: false``. :attr:`decision` records the outcome for the config and
    the manifest. A PEFT head starts from the embedding (that is what a tied model computes with);
    a Lit-GPT checkpoint stores its own, possibly trained, ``lm_head``.

    ``identical``: when neither tensor has updates, the caller may have compared the two sources
    already (:func:`first_difference`, chunked, or by shared storage); then the outcome is known
    before running (one tensor, or both), the writer gets the layout up front and only one of the
    two tensors is ever resident. ``decision`` may come pre-filled with the caller's evidence.
    """

    embed: str  # output names
    head: str
    embed_source: str  # input names
    head_source: str
    dtype: torch.dtype
    embed_updates: list[Update] = field(default_factory=list)
    head_updates: list[Update] = field(default_factory=list)
    decision: dict[str, Any] = field(default_factory=dict)
    identical: bool | None = None  # sources equal as ``dtype``, decided before running (no updates only)

    @property
    def outputs(self) -> list[str]:
        return [self.embed, self.head]

    @property
    def _plain(self) -> bool:
        return not self.head_updates and not self.embed_updates

    def layout(self, reader: CheckpointReader) -> list[Entry] | None:
        if self._plain and (self.head_source == self.embed_source or self.identical is True):
            return [(self.embed, self.dtype, reader.shape(self.embed_source))]  # stays tied: one tensor
        if self._plain and self.identical is False:
            return [(self.embed, self.dtype, reader.shape(self.embed_source)),
                    (self.head, self.dtype, reader.shape(self.head_source))]
        return None  # tied or not is decided by comparing the merged tensors

    def _tensor(self, reader: CheckpointReader, name: str, source: str, updates: list[Update]) -> Tensor:
        if not updates:
            return reader.get(source, dtype=self.dtype)
        base = None if isinstance(updates[0], Replace) else reader.get(source)
        return finish(name, apply_updates(base, updates), self.dtype)

    def run(self, reader: CheckpointReader, arena: Arena | None = None) -> Iterator[Produced]:
        emb_ops = [u.record() for u in self.embed_updates] or None
        head_ops = [u.record() for u in self.head_updates] or None
        emb = self._tensor(reader, self.embed, self.embed_source, self.embed_updates)
        if self._plain and self.head_source == self.embed_source:
            self.decision.update(tied=True, reason="the embedding and the head are unchanged")
            yield Produced(self.embed, emb)
            return
        if self._plain and self.identical is True:
            self.decision.update(tied=True, reason="the embedding and the head are identical")
            yield Produced(self.embed, emb)
            return
        if self._plain and self.identical is False:  # known to differ: never hold both
            yield Produced(self.embed, emb)
            del emb
            self.decision.update(
                tied=False, reason=f"{self.head} differs from its tied twin; wrote both and set tie_word_embeddings=false")
            yield Produced(self.head, reader.get(self.head_source, dtype=self.dtype),
                           [{"op": "untie", "from": self.head_source}])
            return
        head = self._tensor(reader, self.head, self.head_source, self.head_updates)
        if emb.shape == head.shape and torch.equal(emb, head):
            self.decision.update(tied=True, reason="the embedding and the head are identical")
            yield Produced(self.embed, emb, emb_ops or head_ops)
            return
        changed = " and ".join(n for n, ops in ((self.embed, emb_ops), (self.head, head_ops)) if ops) or self.head
        self.decision.update(
            tied=False, reason=f"{changed} differs from its tied twin; wrote both and set tie_word_embeddings=false")
        yield Produced(self.embed, emb, emb_ops)
        yield Produced(self.head, head, head_ops or [{"op": "untie", "from": self.head_source}])


COMPARE_CHUNK_BYTES = 32 << 20
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def first_difference(reader: CheckpointReader, a: str, b: str, dtype: torch.dtype,
                     chunk_bytes: int = COMPARE_CHUNK_BYTES) -> int | None:
    """The first row where tensors ``a`` and ``b`` differ bit for bit once cast to ``dtype``, or None
    when they are identical (NaNs and signed zeros compare by their bits, not by value).

    Both must have the same shape. They are read in row chunks of about ``chunk_bytes`` each, so
    only two chunks are ever resident, and the scan stops at the first differing chunk.
    """
    shape = reader.shape(a)
    if reader.shape(b) != shape or not shape:
        raise ValueError(f"first_difference: {a} {list(shape)} and {b} {list(reader.shape(b))} need equal shapes, >= 1-d")
    cols = math.prod(shape[1:])
    if cols == 0 or shape[0] == 0:
        return None
    widest = max(dtype.itemsize, reader.dtype(a).itemsize, reader.dtype(b).itemsize)
    step = max(1, chunk_bytes // (cols * widest))
    bits = _BITS[dtype.itemsize]
    for start in range(0, shape[0], step):
        stop = min(shape[0], start + step)
        x = reader.get_rows(a, start, stop, dtype=dtype).reshape(stop - start, cols).view(bits)
        y = reader.get_rows(b, start, stop, dtype=dtype).reshape(stop - start, cols).view(bits)
        rows = (x != y).any(dim=1).nonzero()
        if rows.numel():
            return start + int(rows[0])
    return None


def planned_layout(jobs: Sequence[Job], reader: CheckpointReader) -> list[Entry] | None:
    """Every output ``(name, dtype, shape)`` in write order, or None when some job only knows after
    running (then the writer spools). With it the writer puts each tensor straight in place."""
    entries: list[Entry] = []
    for job in jobs:
        layout = getattr(job, "layout", None)
        part = layout(reader) if layout is not None else None
        if part is None:
            return None
        entries += part
    return entries


def run_jobs(jobs: Sequence[Job], reader: CheckpointReader, writer, progress=None) -> list[dict[str, Any]]:
    """Run every job, streaming its tensors into ``writer``; returns the manifest records of the
    modified tensors (``{"tensor": name, "ops": [...]}``).

    When every output is known up front the writer is given the layout (each tensor is written
    once, in place, instead of spooled and copied); jobs draw their buffers from one :class:`Arena`.
    """
    modified: list[dict[str, Any]] = []
    layout = planned_layout(jobs, reader)
    if layout is not None and hasattr(writer, "plan"):
        writer.plan(layout)
    arena = Arena()
    it = progress(jobs) if progress is not None else jobs
    for job in it:
        for p in job.run(reader, arena):
            writer.add(p.name, p.tensor)  # writes (and lets go of) the tensor before the job resumes
            if p.ops is not None:
                modified.append({"tensor": p.name, "ops": p.ops})
            del p
    return modified
