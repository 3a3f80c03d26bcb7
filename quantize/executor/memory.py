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
32 layers; ``pooled``, ~15-25% faster on 2 cores, peaks 35-80% higher and its peak still creeps:
1.07-1.15x at 32 layers, 1.28x at 64, as the max of a per-layer peak that varies with the layout).

jemalloc, where installed, does better than both: its size-segregated extents reuse a layer's
temporaries without page faults and without glibc's fragmentation, and a purge after each layer
(``release``) hands the pages back, so the peak is flat in depth *and* the faults are gone
(benchmarks/gptq_rss.py: 1.045x from 4 to 32 layers, 0.76-0.79x ``flat``'s time, 1.3x its peak).
It must be loaded at process start (LD_PRELOAD): the ``quantize`` command re-executes itself with it
when the library is found (``quantize/allocator.py``; ``QUANTIZE_MALLOC=glibc`` turns that off).
Under jemalloc both modes mean the same (decay off, purge per layer); nothing is placed off the heap.
"""

from __future__ import annotations

import ctypes
import gc
import mmap
import sys
from contextlib import contextmanager
from typing import Iterator

import torch

from ..allocator import JEMALLOC

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8  # glibc mallopt parameters
HEAP_MODES = ("flat", "pooled")
_mode: str | None = None  # the mode applied to this process (None: glibc untouched)
_libc = None
_jemalloc = None  # the process's mallctl when jemalloc serves malloc (False: it does not)
_MALLCTL_ARENAS_ALL = 4096  # jemalloc's "every arena" index in arena.<i>.* names


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


def _mallctl():
    global _jemalloc
    if _jemalloc is None:
        _jemalloc = False
        try:
            fn = ctypes.CDLL(None).mallctl  # resolves only when jemalloc is loaded (preloaded or linked)
            fn.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
            fn.restype = ctypes.c_int
            _jemalloc = fn
        except (AttributeError, OSError):
            pass
    return _jemalloc or None


def allocator() -> str | None:
    """The malloc serving this process: ``"jemalloc"``, ``"glibc"``, or None (another one)."""
    if _mallctl() is not None:
        return JEMALLOC
    return "glibc" if _glibc() is not None else None


def _jemalloc_retain() -> bool:
    """jemalloc: no decay (freed pages stay for reuse until ``release`` purges them), in every
    arena made so far (the 8 MiB+ "huge" one included) and every one made later. True if jemalloc
    took the defaults for new arenas (indices not yet initialized refuse the per-arena setting)."""
    mallctl = _mallctl()
    never = ctypes.c_ssize_t(-1)
    n = ctypes.c_uint(0)
    size = ctypes.c_size_t(ctypes.sizeof(n))
    mallctl(b"arenas.narenas", ctypes.byref(n), ctypes.byref(size), None, 0)
    for i in range(n.value):
        for kind in ("dirty", "muzzy"):
            mallctl(f"arena.{i}.{kind}_decay_ms".encode(), None, None, ctypes.byref(never), ctypes.sizeof(never))
    return all(mallctl(f"arenas.{kind}_decay_ms".encode(), None, None, ctypes.byref(never), ctypes.sizeof(never)) == 0
               for kind in ("dirty", "muzzy"))


def host_heap(mode: str = "flat") -> bool:
    """Apply allocation policy ``mode`` (module docstring) to this process: glibc's, or under
    jemalloc its no-decay setting; returns whether it applied (False under another malloc: then
    nothing is tuned and ``release`` is a no-op)."""
    global _mode
    if mode not in HEAP_MODES:
        raise ValueError(f"unknown host heap mode {mode!r}; one of {', '.join(HEAP_MODES)}")
    if _mallctl() is not None:  # jemalloc serves malloc: glibc's settings would change nothing
        ok = _jemalloc_retain()
        _mode = mode if ok else None
        return ok
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
    return _mode == "pooled" and _mallctl() is None


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
    heap holds small blocks only, unless a pooled run in this process left free chunks; jemalloc:
    every arena's unused pages are purged)."""
    if _mode is None:
        return
    mallctl = _mallctl()
    if mallctl is not None:
        mallctl(f"arena.{_MALLCTL_ARENAS_ALL}.purge".encode(), None, None, None, 0)
    else:
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
