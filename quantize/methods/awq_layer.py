"""AWQ as a layer plug-in of the streaming executor (quantize/executor/context.py).

Lifecycle of one decoder layer (``AWQMethod.process_layer``):

  [STEP 1] scales, for each smoothing pair of the architecture table in execution order
           (``Arch.scale_pairs_for``: input norm -> q/k/v, v -> o without GQA, MLP norm -> gate/up,
           up -> down):
           - one pass over all tokens: ``mean |x|`` per input channel of the pair's linears and
             their input Hessian ``H``, and, when they feed a sub-block (``self_attn`` for q/k/v,
             ``mlp`` for gate/up), its call arguments (all tokens by default; ``search_tokens``
             keeps a subsample of whole sequences, since attention needs them);
           - grid search (``methods.awq.search_scales``) of the mean squared output error against
             the fp output with ``Q(W·s)/s`` in place of each linear: every candidate is scored in
             one batch by the quadratic form ``ΔW H ΔWᵀ`` (exact over all tokens, no re-runs: it
             decides where the affected block is the linears themselves, v -> o and up -> down);
             for a sub-block, the identity and the ``rerun_top`` candidates it ranks best are
             re-run on the recorded calls and the sub-block's output error decides (``rerun_top``
             -1: every candidate, the brute force);
           - the scales are folded at once: into the norm weight (``(offset + w)/s − offset``) or
             the previous linear's output rows (and bias), and into the linears' input columns.
             The fp function of the layer is unchanged, so later pairs see the same activations
             (divided by the scales where they were folded).
  [STEP 2] clip + quantize, one sequential group at a time (q/k/v, o, gate/up, down): one pass
           accumulates the per-group input Gram matrices of the group over all tokens (inputs
           from the already quantized groups, true-sequential), then per linear a clip search
           (skipped for q/k, as in AutoAWQ: their error reaches the output through the softmax of
           q·kᵀ, not linearly) and 4-bit asymmetric group quantization; the dequantized weight
           is put in place.

The executor then propagates the batch through the quantized layer. Norm weights and biases the
scales were folded into are returned in ``LayerResult.tensors`` (rounded to the checkpoint dtype
first, so the written tensors are exactly those the propagation used).

A non-finite statistic, scale, folded tensor or quantized weight raises ``RuntimeFault`` naming the
layer and the module; nothing is written for that layer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from contextlib import nullcontext
import copy
from typing import Any, Literal

import torch
from pydantic import Field, field_validator
from torch import Tensor, nn

from ..arch import Arch, ScalePair
from ..errors import InputError, RuntimeFault
from ..executor.context import LayerContext, LayerResult
from .grid import Settings, check_group_size
from .hessian import HessianAccumulator
from ..formats.awq import awq_spec
from . import awq as A

# Linears whose error reaches the layer output through softmax(q·kᵀ): clipping them is judged by a
# linear proxy that does not hold there (AutoAWQ skips them too). Suffixes are family independent.
_NO_CLIP = ("q_proj", "k_proj", "qkv_proj")
RERUN_TOP = 6  # measured on ref-llama: the sub-block's best candidate was always among the quadratic form's 6 best


class AWQParams(Settings):
    """Search settings of AWQ. Immutable; unknown fields are rejected."""

    group_size: int = Field(128, description="input columns per scale/zero group; -1 = one group per row")
    scale_search: bool = Field(True, description="search and fold per-channel scales (off: RTN + clip)")
    n_grid: int = Field(A.SCALE_GRID, ge=1, description="α grid points of the scale search")
    duo_scaling: bool = Field(True, description="s = x^α / w^(1−α); off: s = x^α")
    search_tokens: int | None = Field(None, ge=1, description="tokens (whole sequences) the scale search re-runs "
                                      "sub-blocks on; None: all calibration tokens")
    rerun_top: int = Field(RERUN_TOP, ge=-1, description="scale candidates (lowest all-token quadratic loss of the "
                           "linears) whose sub-block error is measured by re-running it; -1: all, 0: none")
    rerun_dtype: Literal["float32", "bfloat16"] = Field("float32", description="dtype of the sub-block re-runs "
                                                        "(a copy of the sub-block; the fp32 statistics are unchanged)")
    clip: bool = Field(True, description="search per-group clip thresholds")
    clip_grid: int = Field(A.CLIP_GRID, ge=1)
    max_shrink: float = Field(A.CLIP_MAX_SHRINK, ge=0.0, lt=1.0, description="clip range down to (1 − max_shrink)")

    _check_group_size = field_validator("group_size")(classmethod(lambda cls, v: check_group_size(v)))


def _batch_dim_slice(obj: Any, B: int, n: int) -> Any:
    """The first ``n`` of ``B`` sequences of every tensor with a leading batch dim (ndim ≥ 2)."""
    if isinstance(obj, Tensor):
        return obj[:n] if obj.ndim >= 2 and obj.shape[0] == B else obj
    if isinstance(obj, tuple):
        return tuple(_batch_dim_slice(o, B, n) for o in obj)
    if isinstance(obj, list):
        return [_batch_dim_slice(o, B, n) for o in obj]
    if isinstance(obj, dict):
        return {k: _batch_dim_slice(v, B, n) for k, v in obj.items()}
    return obj


def _hidden(args: tuple, kwargs: dict) -> Tensor:
    return args[0] if args else kwargs["hidden_states"]


def take_sequences(calls: list[tuple[tuple, dict]], max_tokens: int) -> list[tuple[tuple, dict]]:
    """Whole calls, then whole sequences of the last one, until ``max_tokens`` tokens are covered."""
    out, seen = [], 0
    for args, kwargs in calls:
        if seen >= max_tokens:
            break
        x = _hidden(args, kwargs)
        B, L = x.shape[0], x.shape[1] if x.ndim >= 3 else 1
        n = min(B, math.ceil((max_tokens - seen) / L))
        if n < B:
            args, kwargs = _batch_dim_slice(args, B, n), _batch_dim_slice(kwargs, B, n)
        out.append((args, kwargs))
        seen += n * L
    return out


def _rel_error(W: Tensor, W_hat: Tensor, gram: Tensor) -> float:
    """Output error of ``W_hat`` relative to the output energy of ``W`` (block-diagonal, per group)."""
    ref = float(A.group_error(W, torch.zeros_like(W), gram).sum())
    return float(A.group_error(W, W_hat, gram).sum()) / ref if ref > 0 else 0.0


def _output(out: Any) -> Tensor:
    return out[0] if isinstance(out, tuple) else out


class AWQMethod:
    name = "awq"

    def __init__(self, params: AWQParams, scale_dtype: str = "float16"):
        self.params = params
        self.spec = awq_spec(params.group_size, scale_dtype)

    def preflight(self, arch: Arch, config: Mapping[str, Any]) -> None:
        """Before any heavy work: every layer linear's width must hold whole groups (InputError).
        What the output format can store is the format's preflight."""
        for name in arch.linear_names():
            _, K = arch.linear_shape(name, config)
            self.spec.group_width(K, name=f"{arch.layer_prefix(0)}{name}")

    # -- plumbing helpers ------------------------------------------------------------------------
    @staticmethod
    def _fault(ctx: LayerContext, what: str, detail: str) -> RuntimeFault:
        return RuntimeFault(
            f"layer {ctx.index} ({ctx.prefix}{what}): {detail}; the activations overflow in "
            f"{ctx.streamer.cfg.dtype} (try --dtype float32) or the weights contain NaN/Inf"
        )

    @staticmethod
    def _ckpt_round(ctx: LayerContext, rel: str, t: Tensor) -> Tensor:
        """``t`` as the checkpoint will store it (its dtype), back in fp32."""
        return t.to(ctx.streamer.reader.dtype(ctx.prefix + rel)).float()

    # -- the layer -------------------------------------------------------------------------------
    def process_layer(self, ctx: LayerContext) -> LayerResult:
        p = self.params
        cfg = ctx.streamer.reader.config
        W = {name: ctx.weight(name) for name in ctx.arch.linear_names()}  # fp32, scales folded in as we go
        tensors: dict[str, Tensor] = {}
        m: dict[str, dict] = {"awq_alpha": {}, "scale_loss": {}, "rtn_loss": {}, "rel_error": {}, "noclip_rel_error": {}}

        # [STEP 1] per-channel scales, searched and folded pair by pair
        if p.scale_search:
            for pair in ctx.arch.scale_pairs_for(cfg):
                found = self._search_pair(ctx, pair, W)
                self._fold_pair(ctx, pair, found.scales, W, tensors, cfg)
                m["awq_alpha"][pair.prev] = found.alpha
                m["scale_loss"][pair.prev] = found.loss
                m["rtn_loss"][pair.prev] = found.rtn_loss

        # [STEP 2] clip search and quantization, one sequential group at a time
        results: dict[str, Any] = {}
        for group in ctx.arch.group_names():
            acc = A.GroupGram(p.group_size)
            ctx.observe([group[0]], lambda _n, x: acc.add(x))
            gram = acc.gram
            if not bool(torch.isfinite(gram).all()):
                raise self._fault(ctx, group[0], "non-finite input statistics")
            for name in group:
                w = W[name]
                r = r0 = A.awq_quantize(w, self.spec)
                if p.clip and name.rsplit(".", 1)[-1] not in _NO_CLIP:
                    max_val = A.search_clip(w, gram, p.group_size, n_grid=p.clip_grid, max_shrink=p.max_shrink)
                    r = A.awq_quantize(A.clip_weight(w, max_val), self.spec)
                    m["noclip_rel_error"][name] = _rel_error(w, r0.W_hat, gram)
                if not (bool(torch.isfinite(r.W_hat).all()) and bool(torch.isfinite(r.scales.half()).all())):
                    raise self._fault(ctx, name, "non-finite quantized weight or fp16 scale overflow after AWQ scaling")
                ctx.set_weight(name, r.W_hat)
                results[name] = r
                m["rel_error"][name] = _rel_error(w, r.W_hat, gram)
            del acc, gram
        return LayerResult(results, m, tensors)

    # -- [STEP 1] pieces -------------------------------------------------------------------------
    def _search_pair(self, ctx: LayerContext, pair: ScalePair, W: dict[str, Tensor]) -> A.ScaleSearch:
        p = self.params
        where = f"{pair.prev} -> {', '.join(pair.linears)}"
        # one pass over all tokens: mean |x| and the Hessian H of the linears' input (every candidate's
        # output error of the linears is a quadratic form in H: scored in one batch, no re-runs), and
        # for a sub-block (self_attn, mlp) also its call arguments (all tokens, or search_tokens of
        # them), to re-run it on the candidates the quadratic form ranks best
        stats, hess = A.AbsMean(), HessianAccumulator()
        recording = ctx.recording_calls(pair.inspect, max_tokens=p.search_tokens) if pair.inspect else nullcontext([])
        with recording as recorded:
            ctx.observe([pair.linears[0]], lambda _n, x: (stats.add(x), hess.add(x)))
        x_mean = stats.mean
        if not bool(torch.isfinite(x_mean).all()) or not bool(torch.isfinite(hess.H).all()):
            raise self._fault(ctx, where, "non-finite input activations")

        loss = None
        if pair.inspect and p.rerun_top != 0:
            calls = recorded if p.search_tokens is None else take_sequences(recorded, p.search_tokens)
            loss = sub_block_loss(ctx, pair, calls, getattr(torch, p.rerun_dtype))
        try:
            found = A.search_scales(x_mean, [W[n] for n in pair.linears], loss, p.group_size, n_grid=p.n_grid,
                                    duo_scaling=p.duo_scaling, H=hess.H,
                                    refine=None if p.rerun_top == -1 else p.rerun_top)
        except ValueError as e:
            raise self._fault(ctx, where, f"AWQ scale search failed ({e})") from None
        finally:
            for name in pair.linears:
                ctx.set_weight(name, W[name])
        if not bool(torch.isfinite(found.scales).all()) or not bool((found.scales > 0).all()):
            raise self._fault(ctx, where, "non-finite AWQ scales")
        return found

    def _fold_pair(self, ctx: LayerContext, pair: ScalePair, s: Tensor, W: dict[str, Tensor],
                   tensors: dict[str, Tensor], cfg: dict) -> None:
        where = f"{pair.prev} -> {', '.join(pair.linears)}"
        new = fold_pair(ctx.layer, ctx.arch, cfg, pair, s, W, rounding=lambda rel, t: self._ckpt_round(ctx, rel, t))
        for rel, t in {**new, **{n + ".weight": W[n] for n in (*pair.linears, pair.prev) if n in W}}.items():
            if not bool(torch.isfinite(t).all()):
                raise self._fault(ctx, where, f"non-finite {rel} after folding the AWQ scales")
        tensors.update(new)


def _cast(obj: Any, dtype: torch.dtype) -> Any:
    """Every floating tensor in ``obj`` (nested tuples, lists, dicts) as ``dtype``."""
    if isinstance(obj, Tensor):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_cast(o, dtype) for o in obj)
    if isinstance(obj, dict):
        return {k: _cast(v, dtype) for k, v in obj.items()}
    return obj


def sub_block_loss(ctx: LayerContext, pair: ScalePair, calls: list[tuple[tuple, dict]],
                   dtype: torch.dtype = torch.float32) -> Callable[[list[Tensor]], float]:
    """The scale search's sub-block loss: with the candidate weights of ``pair.linears`` in place, the
    mean squared output error of ``pair.inspect`` re-run on ``calls`` against its output with the
    current weights (computed once, here). The caller restores the weights.

    With a ``dtype`` other than the layer's, the sub-block is re-run as a copy in ``dtype`` (calls,
    reference and candidates alike; the error is summed in fp32): faster matmuls on CPUs with bf16
    dot products, at the cost of ``dtype``'s rounding in every output compared."""
    module = ctx.module(pair.inspect)
    set_weight = ctx.set_weight
    if dtype != next(module.parameters()).dtype:
        module = copy.deepcopy(module).to(dtype)
        calls = [_cast(c, dtype) for c in calls]
        prefix = pair.inspect + "."

        def set_weight(name: str, w: Tensor) -> None:
            lin = module.get_submodule(name[len(prefix):])
            lin.weight.data = w.to(device=lin.weight.device, dtype=dtype).reshape(lin.weight.shape)

    with torch.no_grad():
        reference = [_output(module(*a, **k)) for a, k in calls]

    def loss(effective: list[Tensor]) -> float:
        for name, w in zip(pair.linears, effective):
            set_weight(name, w)
        total, count = 0.0, 0
        with torch.no_grad():
            for (a, k), ref in zip(calls, reference):
                out = _output(module(*a, **k))
                total += float((out.float() - ref.float()).pow(2).sum())
                count += out.numel()
        return total / max(count, 1)

    return loss


def fold_pair(layer: nn.Module, arch: Arch, config: Mapping[str, Any], pair: ScalePair, s: Tensor,
              W: dict[str, Tensor], rounding: Callable[[str, Tensor], Tensor] | None = None) -> dict[str, Tensor]:
    """Fold the scales ``s`` of ``pair`` into a decoder layer; the layer's fp function is unchanged.

    ``pair.prev``'s output channels are divided by ``s`` (a norm: ``(offset + w)/s − offset``; a
    linear: the rows of its ``prev_part`` block, and its bias) and the linears' input columns are
    multiplied by it. ``W`` (relative linear name -> fp32 weight) is updated for the linears touched
    and their modules are set from it; norm weights and biases are set on the modules and returned
    as ``{relative tensor name: fp32 tensor}`` after ``rounding(name, t)`` (e.g. to the checkpoint
    dtype, so the layer uses exactly what will be written).
    """
    rounding = rounding or (lambda _rel, t: t)
    new: dict[str, Tensor] = {}
    prev = layer.get_submodule(pair.prev)
    bias = getattr(prev, "bias", None)
    bias = None if bias is None else bias.detach().float()
    if pair.prev in arch.layer_norms:
        w, b = A.fold_into_norm(prev.weight.detach().float(), s, arch.norm_weight_offset, bias)
        new[pair.prev + ".weight"] = rounding(pair.prev + ".weight", w)
    else:
        lin, dims = arch.linear(pair.prev), arch.dims(config)
        part = pair.prev_part or 0
        start = sum(dims[d] for d in lin.out[:part])
        W[pair.prev], b = A.fold_into_rows(W[pair.prev], s, start, bias)
    if b is not None:
        new[pair.prev + ".bias"] = rounding(pair.prev + ".bias", b)
    for name in pair.linears:
        W[name] = A.scale_columns(W[name], s)
    for rel, t in new.items():
        module, leaf = rel.rsplit(".", 1)
        _set_param(layer.get_submodule(module), leaf, t)
    for name in (*pair.linears, pair.prev):
        if name in W:
            _set_param(layer.get_submodule(name), "weight", W[name])
    return new


def _set_param(module: nn.Module, leaf: str, t: Tensor) -> None:
    p = getattr(module, leaf)
    p.data = t.to(device=p.device, dtype=p.dtype).reshape(p.shape)
