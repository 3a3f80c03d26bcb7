"""LoRA merge math as pure functions (MERGE.md §3.1, §4.2, §4.3).

Every function takes tensors and numbers and returns a new float32 tensor; nothing here reads
files, knows tensor names, or rounds. The caller upcasts once, applies every update that targets a
tensor, and rounds once to the output dtype (:func:`round_to`).

Orientation conventions (as saved by PEFT and Lit-GPT):

* Linear: ``A`` is ``[r, in]``, ``B`` is ``[out, r]``, the weight is ``[out, in]``; a GPT-2 style
  ``Conv1D`` (``fan_in_fan_out``) stores the weight as ``[in, out]``.
* Embedding: ``A = lora_embedding_A`` is ``[r, vocab]``, ``B = lora_embedding_B`` is ``[dim, r]``,
  the weight is ``[vocab, dim]``.

The operation order inside each function follows PEFT's ``merge()`` (``(B @ A) * s`` then add, DoRA
norm of ``W + ΔW``), so float32 results are bit-identical to ``merge_and_unload()``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor

#: All merge arithmetic runs in this dtype; results are rounded once by the caller.
MERGE_PRECISION = torch.float32


def _f32(t: Tensor) -> Tensor:
    return t.to(MERGE_PRECISION)


# ---------------------------------------------------------------------------------------------
# scaling and pattern resolution


def lora_scale(alpha: float, r: int, *, use_rslora: bool = False) -> float:
    """``s = α/r`` (plain LoRA) or ``α/√r`` (rsLoRA)."""
    if r <= 0:
        raise ValueError(f"LoRA rank must be positive, got {r}")
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def get_pattern_key(pattern_keys: Iterable[str], module: str) -> str | None:
    """The first key ``K`` (in dict order) with ``re.match(r"(.*\\.)?(K)$", module)``, else None.

    ``module`` is the module path relative to the base model (``model.layers.3.mlp.down_proj``).
    This is PEFT's ``get_pattern_key`` since v0.15: ``K`` may be a plain suffix that starts at a dot
    boundary, a dotted path, or a regex.
    """
    for key in pattern_keys:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def resolve_rank_alpha(
    module: str,
    r: int,
    lora_alpha: float,
    rank_pattern: Mapping[str, int] | None = None,
    alpha_pattern: Mapping[str, float] | None = None,
) -> tuple[int, float]:
    """``(rank, alpha)`` of one module after ``rank_pattern`` / ``alpha_pattern`` overrides."""
    rank_pattern = rank_pattern or {}
    alpha_pattern = alpha_pattern or {}
    rk = get_pattern_key(rank_pattern, module)
    ak = get_pattern_key(alpha_pattern, module)
    return (rank_pattern[rk] if rk is not None else r), (alpha_pattern[ak] if ak is not None else lora_alpha)


def layer_index(module: str, layers_pattern: str | Sequence[str] | None = None) -> int | None:
    """The layer index of a module path: the first ``.<digits>.`` after a layer container.

    Without ``layers_pattern`` that is the first numbered segment after at least one dot-separated
    component (``model.layers.3.mlp`` → 3); with it, the number right after a component equal to
    one of the patterns.
    """
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern or [])
    if not patterns:
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module)
    else:
        m = None
        for p in patterns:
            m = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", module)
            if m:
                break
    return int(m.group("idx")) if m else None


def _listed(module: str, names: Iterable[str]) -> bool:
    """A list entry selects a module by exact path or by a suffix that starts after a dot."""
    return any(module == n or module.endswith(f".{n}") for n in names)


def is_targeted(
    module: str,
    target_modules: str | Sequence[str] | None,
    *,
    exclude_modules: str | Sequence[str] | None = None,
    layers_to_transform: int | Sequence[int] | None = None,
    layers_pattern: str | Sequence[str] | None = None,
    modules_to_save: Sequence[str] | None = None,
) -> bool:
    """Whether a LoRA config selects ``module`` for LoRA (PEFT's ``check_target_module_exists``).

    * ``exclude_modules`` and ``modules_to_save`` win over targets;
    * a string ``target_modules`` is a regex that must match the whole path; a list matches an exact
      path or a dotted suffix, and is further restricted by ``layers_to_transform`` (a module without
      a layer index is then not targeted).
    """
    if exclude_modules:
        if isinstance(exclude_modules, str):
            if re.fullmatch(exclude_modules, module):
                return False
        elif _listed(module, exclude_modules):
            return False
    if modules_to_save and any(re.match(rf"(^|.*\.){m}($|\..*)", module) for m in modules_to_save):
        return False
    if target_modules is None:
        return False
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, module) is not None
    if module in target_modules:
        return True
    if not _listed(module, target_modules):
        return False
    using_layers = layers_to_transform is not None and (
        not isinstance(layers_to_transform, Sequence) or len(layers_to_transform) > 0
    )
    if not using_layers:
        return True
    idx = layer_index(module, layers_pattern)
    if idx is None:
        return False
    if isinstance(layers_to_transform, int):
        return idx == layers_to_transform
    return idx in layers_to_transform


# ---------------------------------------------------------------------------------------------
# deltas


def linear_delta(A: Tensor, B: Tensor, scale: float, *, fan_in_fan_out: bool = False) -> Tensor:
    """``s·B·A`` in the stored orientation of the weight (``[in, out]`` when ``fan_in_fan_out``).

    Returns a fresh float32 tensor (possibly a transposed view of its own buffer) that the caller
    may modify in place.
    """
    d = _f32(B) @ _f32(A)
    if fan_in_fan_out:
        d = d.T
    return d.mul_(scale)


def embedding_delta(A: Tensor, B: Tensor, scale: float) -> Tensor:
    """``s·(B·A)ᵀ``: ``[vocab, dim]`` from ``A = lora_embedding_A [r, vocab]``, ``B [dim, r]``.

    A fresh float32 tensor (a transposed view of its own buffer).
    """
    return (_f32(B) @ _f32(A)).T.mul_(scale)


def blockdiag_qkv_delta(
    A: Tensor,
    B: Tensor,
    scale: float,
    enable: Sequence[bool],
    sizes: Sequence[int],
) -> Tensor:
    """Lit-GPT fused-QKV LoRA (``LoRAQKVLinear``): a block-diagonal update, not ``B·A``.

    ``A`` is ``[r·n_en, d]`` (``r`` rows per enabled projection, q,k,v order) and ``B`` is
    ``[Σ enabled sizes, r]`` (row blocks of the enabled projections, q,k,v order). Returns the
    ``[Σ sizes, d]`` delta in the current Lit layout (q rows, then k, then v); disabled
    projections get zero rows.
    """
    n_en = sum(bool(e) for e in enable)
    if n_en == 0:
        raise ValueError("fused QKV LoRA with no enabled projection")
    if A.shape[0] % n_en:
        raise ValueError(f"lora_A has {A.shape[0]} rows, not a multiple of {n_en} enabled projections")
    r = A.shape[0] // n_en
    A, B = _f32(A), _f32(B)
    out = torch.zeros(sum(sizes), A.shape[1], dtype=MERGE_PRECISION)
    a_row = b_row = o_row = 0
    for en, size in zip(enable, sizes):
        if en:
            out[o_row : o_row + size] = B[b_row : b_row + size] @ A[a_row : a_row + r]
            a_row += r
            b_row += size
        o_row += size
    if b_row != B.shape[0]:
        raise ValueError(f"lora_B has {B.shape[0]} rows, the enabled projections need {b_row}")
    return out * scale


# ---------------------------------------------------------------------------------------------
# merged weights (float32 in, float32 out)


def merge_linear(
    W: Tensor,
    A: Tensor,
    B: Tensor,
    scale: float,
    *,
    magnitude: Tensor | None = None,
    fan_in_fan_out: bool = False,
) -> Tensor:
    """``W + s·B·A`` (plain / rsLoRA), or the DoRA merge when ``magnitude`` is given.

    DoRA: ``V = W + s·B·A`` in ``[out, in]`` orientation, ``W' = (m / ‖V‖_row) · V`` with the norm
    over the input dimension of each output row (columns of the stored matrix for ``fan_in_fan_out``).

    ``W`` may be in any float dtype and is not modified; the result is a new float32 tensor. Memory:
    one float32 buffer the size of ``W`` (the delta, then the merged weight, updated in place).
    """
    delta = linear_delta(A, B, scale, fan_in_fan_out=fan_in_fan_out)
    if magnitude is None:
        return delta.add_(W)  # W + ΔW (+ commutes, so this is bit-identical)
    if fan_in_fan_out:
        factor = (_f32(magnitude) / _column_norm(W, delta)).view(1, -1)
    else:
        factor = (_f32(magnitude) / torch.linalg.norm(delta.add_(W), dim=1)).view(-1, 1)
        return delta.mul_(factor)
    return delta.add_(W).mul_(factor)


#: Elements per block of the fused elementwise pass: 124 KiB of float32 (stays in L2), and below
#: torch's parallel grain (32768), so each op runs on the calling thread. Blocks of 2^18 with two
#: OpenMP threads ran 10x slower on a loaded 2-core machine (a barrier per op, peers descheduled).
FUSED_BLOCK = 31 * 1024


def merge_linear_rounded(
    W: Tensor,
    A: Tensor,
    B: Tensor,
    scale: float,
    dtype: torch.dtype,
    *,
    work: Tensor | None = None,
    out: Tensor | None = None,
    block: int = FUSED_BLOCK,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``round_to(merge_linear(W, A, B, scale), dtype)`` fused: ``(rounded, merged, min, max)``.

    Plain LoRA only (no DoRA, no ``fan_in_fan_out``; ``W`` contiguous ``[out, in]``). Bit-identical
    to the unfused path: ``B·A`` is the same single GEMM (into ``work`` when given: a contiguous,
    64-byte aligned float32 tensor of ``W``'s shape; a reused buffer saves page-faulting a fresh
    one), then ``·s``, ``+ W``, the min/max and the rounding run block by block over cache-sized
    slices. Those are elementwise (and min/max exact), so blocking changes no value, but the
    float32 buffer crosses the memory bus 3 times (GEMM write, read, write-back) instead of 7.

    ``merged`` (the float32 ``W + s·B·A``, i.e. ``work``) is returned for error reports; ``min``
    and ``max`` are 0-d float32 tensors (NaN when any value is NaN); ``rounded`` is ``out`` when
    given (a contiguous tensor of ``dtype`` and ``W``'s shape).
    """
    if work is None:
        work = torch.empty(W.shape, dtype=MERGE_PRECISION)
    torch.mm(_f32(B), _f32(A), out=work)
    if out is None:
        out = torch.empty(W.shape, dtype=dtype)
    flat, w_flat, o_flat = work.view(-1), W.reshape(-1), out.view(-1)
    lows, highs = [], []
    for start in range(0, flat.numel(), block):
        part = flat[start : start + block]
        part.mul_(scale).add_(w_flat[start : start + block])
        lo, hi = torch.aminmax(part)
        lows.append(lo)
        highs.append(hi)
        o_flat[start : start + block].copy_(part)
    if not lows:  # an empty weight
        zero = torch.zeros((), dtype=MERGE_PRECISION)
        return out, work, zero, zero
    return out, work, torch.stack(lows).min(), torch.stack(highs).max()


def merge_embedding(
    E: Tensor, A: Tensor, B: Tensor, scale: float, *, magnitude: Tensor | None = None
) -> Tensor:
    """``E + s·(B·A)ᵀ``; with DoRA the magnitude has ``dim`` entries and the norm runs over the vocab
    axis (per column of ``E``). ``E`` is not modified; the result is a new float32 tensor."""
    delta = embedding_delta(A, B, scale)
    if magnitude is None:
        return delta.add_(E)
    factor = (_f32(magnitude) / _column_norm(E, delta)).view(1, -1)
    return delta.add_(E).mul_(factor)


def _column_norm(W: Tensor, delta: Tensor) -> Tensor:
    """``‖W + ΔW‖`` per column of the stored matrix (DoRA for embeddings and ``fan_in_fan_out``).

    Spelled as PEFT spells it (``Wᵀ + 1·ΔWᵀ`` reduced over dim 1): the memory layout of the
    temporary decides the summation order of the norm, and this keeps float32 results bit-identical.
    """
    return torch.linalg.norm(W.T + 1 * delta.T, dim=1)


def merge_bias(b: Tensor, lora_bias: Tensor, scale: float) -> Tensor:
    """``lora_bias=True``: ``b + s·lora_B.bias`` (the dense rule)."""
    return _f32(b) + _f32(lora_bias) * scale


def round_to(t: Tensor, dtype: torch.dtype) -> Tensor:
    """The single rounding of a merged float32 tensor to the output dtype (round-to-nearest-even)."""
    return t.to(dtype)
