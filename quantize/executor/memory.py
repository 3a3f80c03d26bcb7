"""Host-memory policy of the layer loop (and a cheap garbage collector for it).

Each layer allocates and frees the same large tensors (weights, activations, Hessians, solver
temporaries). Two glibc policies, process-wide, chosen per run (``host_heap``):

* ``flat``: every allocation of 1 MiB or more gets its own mmap and goes back to the OS when freed.
  Peak RSS is the live memory, flat in depth (benchmarks/gptq_rss.py: 1.03x from 4 to 32 layers),
  but every large temporary is page-faulted afresh: on 2 cores the faults cost 15-50% of a GPTQ run
  (kernel time zeroing the pages).
* ``pooled``: allocations up to 32 MiB come from one heap (one arena) and are reused without
  faults. With glibc's heap alone the peak creeps up layer by layer (long-lived blocks pin holes:
  1.2-1.4x from 4 to 32 layers), so (1) what outlives a layer -- parked activations, the next
  layer's prefetched weights -- is placed off the heap, each in its own mapping (``offheap_copy``),
  and (2) after each layer the heap's free pages go back to the OS (``release``): no layer inherits
  the previous one's resident holes. Inside a layer temporaries are reused without faults: faster,
  at a higher peak inside a layer (fragmentation), which still varies from layer to layer with the
  heap's layout.

``flat`` is the default: it is the one whose peak does not move with depth (measured 1.03x from 4 to
32 layers against 1.15-1.17x for ``pooled``, which is ~20-25% faster on 2 cores and peaks ~50% higher).
"""

from __future__ import annotations

import ctypes
import gc
import mmap
import sys
from contextlib import contextmanager
from typing import Iterator

import torch

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8  # glibc mallopt parameters
HEAP_MODES = ("flat", "pooled")
_mode: str | None = None  # the mode applied to this process (None: glibc untouched)
_libc = None


def _glibc():
    global _libc
    if _libc is None:
        _libc = False
        if sys.platform.startswith("linux"):
            try:
                lib = ctypes.CDLL("libc.so.6")
                if hasattr(lib, "mallopt") and hasattr(lib, "malloc_trim"):
                    _libc = lib
            except OSError:  # musl or no glibc: nothing to tune
                pass
    return _libc or None


def host_heap(mode: str = "flat") -> bool:
    """Apply glibc allocation policy ``mode`` (module docstring) to this process; returns whether
    it applied (False where there is no glibc: then nothing is tuned and ``release`` is a no-op)."""
    global _mode
    if mode not in HEAP_MODES:
        raise ValueError(f"unknown host heap mode {mode!r}; one of {', '.join(HEAP_MODES)}")
    libc = _glibc()
    if libc is None:
        _mode = None
        return False
    if mode == "flat":
        ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, 1 << 20)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 128 << 10))
    else:  # the trims are ours (release): glibc's own would hand back pages the next batch faults in again
        ok = all(libc.mallopt(p, v) for p, v in ((_M_MMAP_THRESHOLD, 32 << 20), (_M_ARENA_MAX, 1),
                                                 (_M_TRIM_THRESHOLD, 1 << 30)))
    _mode = mode if ok else None
    return ok


def heap_mode() -> str | None:
    """The mode applied to this process (None: none)."""
    return _mode


def offheap() -> bool:
    """Whether host tensors that outlive a layer should be placed off the heap (``offheap_copy``)."""
    return _mode == "pooled"


def offheap_empty(nbytes: int) -> torch.Tensor:
    """A uint8 CPU tensor of ``nbytes`` in its own anonymous mapping (unmapped when it dies)."""
    if nbytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=torch.uint8)


def offheap_copy(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of the CPU tensor ``t`` in its own mapping (``offheap_empty``)."""
    out = offheap_empty(t.numel() * t.element_size()).view(t.dtype).view(t.shape)
    return out.copy_(t)


def release() -> None:
    """After each layer: hand the heap's free pages back to the OS, so that no layer inherits the
    previous one's resident holes (pooled: the next layer faults its pages in again; flat: the
    heap holds small blocks only, unless a pooled run in this process left free chunks)."""
    if _mode is not None:
        _libc.malloc_trim(0)


@contextmanager
def frozen_gc() -> Iterator[None]:
    """Exclude every object alive now (modules, tokenizer, imports) from the garbage collector's
    scans until the block ends. The layer loop calls ``gc.collect()`` after each layer so that
    reference cycles holding activations die at once; without this each call walked the whole
    heap of Python objects (0.18 s a layer measured on ref-llama, ~8% of a run)."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
