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

Mixture-of-Experts layers (``Arch.layer_scale_pairs``: the table's ``MoE.scale_pairs`` replace the
dense MLP pairs in a sparse layer; names with ``{e}`` stand for every routed expert), still one
layer loop:
  [STEP 1] norm -> every expert's gate/up + the shared expert's gate/up: ``mean |x|`` over all
           tokens reaching the experts; each candidate scored by ``Σ_e n_e tr(ΔW_e H_e ΔW_eᵀ)`` with
           ``H_e`` from the ``n_e`` tokens routed to expert e (the shared expert: all tokens), then
           the whole MoE block (router included) re-run on the ``rerun_top`` best; the scale is
           folded into the norm and into the columns of the routers and the shared-expert gate
           (``ScalePair.passive``: never quantized, they read the same input). Expert up -> down:
           one scale per expert from its own down input over its routed tokens, folded into its up
           rows. Which tokens an expert's statistics come from, and the fallback below
           ``--moe-min-tokens``, follow ``executor/moe.Routing`` (``rtn``: no scale, no clip);
  [STEP 2] the experts group: per expert, gate/up clipped on the group Gram matrices of its tokens,
           then down on ``act(X Ŵgate) * (X Ŵup)`` through its quantized gate/up; the coverage
           record (tokens per expert, how each was solved) goes to the manifest as GPTQ's does.
  With ``--expert-chunk N`` the layer loop keeps the experts in host memory (its forward brings N at
  a time to the device) and so does ``_Weights`` their fp32 copies; every expert weight reaches the
  device through ``_expert_on_device``, one expert at a time: the norm -> experts search streams the
  duo-scaling statistic (``awq.streamed_weight_mean``, also without chunks), scores expert by expert
  and hands the MoE re-run its candidates one linear at a time (``awq.LazySequence``); a quantized
  expert's result goes where its weight lives (``LayerContext.place``: host memory). The arithmetic, and so the bytes, are those of the resident run.

The executor then propagates the batch through the quantized layer. Norm weights and biases the
scales were folded into are returned in ``LayerResult.tensors`` (rounded to the checkpoint dtype
first, so the written tensors are exactly those the propagation used).

A non-finite statistic, scale, folded tensor or quantized weight raises ``RuntimeFault`` naming the
layer and the module; nothing is written for that layer.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import nullcontext
from typing import Any, Literal

import torch
from pydantic import Field, field_validator
from torch import Tensor, nn
from torch.nn import functional as F

from ..arch import EXPERT, Arch, ScalePair
from ..errors import InputError, RuntimeFault
from ..executor.context import LayerContext, LayerResult
from ..executor.moe import CHUNK, MoEOptions, Routing, hessian_of
from .grid import Settings, check_group_size
from .hessian import HessianAccumulator
from ..formats.awq import awq_spec
from . import awq as A

# Linears whose error reaches the layer output through softmax(q·kᵀ): clipping them is judged by a
# linear proxy that does not hold there (AutoAWQ skips them too). Suffixes are family independent.
# DeepSeek's MLA: q_a (normalised, then q_b: q), kv_a (the rope part of k, and the latent of k and
# v) and q_b (q). Measured on the tiny DeepSeek-V3 (tests/test_awq_moe.py): clipping them raised
# the KL to the fp model from 5.89e-5 to 6.34e-5, above RTN's 6.05e-5.
_NO_CLIP = ("q_proj", "k_proj", "qkv_proj", "q_a_proj", "kv_a_proj_with_mqa", "q_b_proj")
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


def _expert_on_device(name: str, w: Tensor, device: torch.device | str, copy: bool) -> Tensor:
    """An expert's fp32 weight on the compute device: the one way an expert's weight reaches it, so
    at most the experts in use are there (``copy``: a tensor of its own even where host and device
    are one, with ``--expert-chunk``, whose experts stay in host memory)."""
    return w.to(device=device, dtype=torch.float32, copy=copy)


class _Weights(dict):
    """Relative linear name -> fp32 weight (scales folded in as the layer goes), read from the layer
    on first use: a sparse layer's experts are copied only when a pair or a group needs them."""

    def __init__(self, ctx: LayerContext):
        super().__init__()
        self.ctx = ctx

    def __missing__(self, name: str) -> Tensor:
        w = self[name] = self.ctx.weight(name)
        return w


class AWQMethod:
    name = "awq"
    solves_experts = True  # sparse layers: per-expert scales and clips from each expert's routed tokens

    def __init__(self, params: AWQParams, scale_dtype: str = "float16", moe: MoEOptions | None = None):
        self.params = params
        self.spec = awq_spec(params.group_size, scale_dtype)
        self.moe = moe or MoEOptions()

    def preflight(self, arch: Arch, config: Mapping[str, Any]) -> None:
        """Before any heavy work: every layer linear's width must hold whole groups (InputError).
        What the output format can store is the format's preflight."""
        for name in arch.linear_kinds(config):
            _, K = arch.linear_shape(name, config)
            self.spec.group_width(K, name=f"{arch.layer_prefix(0)}{name}")

    # -- plumbing helpers ------------------------------------------------------------------------
    @staticmethod
    def _chunked(ctx: LayerContext) -> bool:
        """A sparse layer run with ``--expert-chunk``: its experts stay in host memory (the layer
        loop's) and so do their fp32 copies (``_Weights``); each reaches the device only while in use."""
        return ctx.experts_module is not None and ctx.streamer.cfg.expert_chunk is not None

    def _dev(self, ctx: LayerContext, name: str, w: Tensor, device: torch.device | str | None = None) -> Tensor:
        """``w`` (linear ``name``'s weight) on the compute device (``device``, default the layer's)."""
        device = ctx.device if device is None else device
        if ctx.experts_module is not None and ctx.arch.expert_slot(name) is not None:
            return _expert_on_device(name, w, device, self._chunked(ctx))
        return w.to(device)

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
        W = _Weights(ctx)  # fp32, scales folded in as we go
        tensors: dict[str, Tensor] = {}
        m: dict[str, Any] = {"awq_alpha": {}, "scale_loss": {}, "rtn_loss": {}, "rel_error": {}, "noclip_rel_error": {}}

        # [STEP 1] per-channel scales, searched and folded pair by pair (a sparse layer: its MoE pairs)
        if p.scale_search:
            for pair in ctx.arch.layer_scale_pairs(cfg, ctx.index):
                if EXPERT in pair.prev:  # expert up -> its down: one scale per expert
                    self._expert_pairs(ctx, pair, W, tensors, cfg, m)
                    continue
                pair = dataclasses.replace(pair, linears=tuple(n for t in pair.linears for n in ctx.arch.expert_names(t, cfg)))
                found = self._search_pair(ctx, pair, W)
                self._fold_pair(ctx, pair, found.scales, W, tensors, cfg)
                m["awq_alpha"][pair.prev] = found.alpha
                m["scale_loss"][pair.prev] = found.loss
                m["rtn_loss"][pair.prev] = found.rtn_loss

        # [STEP 2] clip search and quantization, one sequential group at a time (the experts: expert
        # by expert, from the tokens routed to each, through the quantized groups before them)
        results: dict[str, Any] = {}
        for group in ctx.groups:
            if group == [ctx.experts_module]:
                self._quantize_experts(ctx, W, results, m)
                continue
            acc = A.GroupGram(p.group_size)
            ctx.observe([group[0]], lambda _n, x: acc.add(x))
            gram = acc.gram
            if not bool(torch.isfinite(gram).all()):
                raise self._fault(ctx, group[0], "non-finite input statistics")
            for name in group:
                self._quantize_linear(ctx, name, W, gram, p.clip and name.rsplit(".", 1)[-1] not in _NO_CLIP, results, m)
            del acc, gram
        return LayerResult(results, m, tensors)

    def _quantize_linear(self, ctx: LayerContext, name: str, W: dict[str, Tensor], gram: Tensor | None, clip: bool,
                         results: dict[str, Any], m: dict[str, Any]) -> None:
        """Clip search (``clip``, on the group Gram matrices ``gram``) and AWQ-grid quantization of
        one linear; the dequantized weight goes in place. ``gram`` None: no tokens, no error report."""
        p = self.params
        w = W[name]  # (loaded on first use), dropped once quantized
        del W[name]
        # an expert's weight is host-resident with --expert-chunk: quantize it where its tokens are
        w = self._dev(ctx, name, w, None if gram is None else gram.device)
        r = r0 = A.awq_quantize(w, self.spec)
        if clip and gram is not None:
            max_val = A.search_clip(w, gram, p.group_size, n_grid=p.clip_grid, max_shrink=p.max_shrink)
            r = A.awq_quantize(A.clip_weight(w, max_val), self.spec)
            m["noclip_rel_error"][name] = _rel_error(w, r0.W_hat, gram)
        if not (bool(torch.isfinite(r.W_hat).all()) and bool(torch.isfinite(r.scales.half()).all())):
            raise self._fault(ctx, name, "non-finite quantized weight or fp16 scale overflow after AWQ scaling")
        if gram is not None:
            m["rel_error"][name] = _rel_error(w, r.W_hat, gram)
        results[name] = ctx.place(name, r)  # an expert's result: where its weight lives (host with --expert-chunk)

    # -- Mixture-of-Experts ----------------------------------------------------------------------
    def _routing(self, ctx: LayerContext, parts: list[tuple[Tensor, Tensor]]) -> Routing:
        return Routing.of(parts, ctx.arch.num_experts(ctx.streamer.reader.config), self.moe)

    def _gram(self, ctx: LayerContext, x: Tensor, where: str, fn: Callable[[Tensor], Tensor] | None = None) -> Tensor | None:
        """Group Gram matrices of ``x`` (or of ``fn(x)``, chunk by chunk); None without tokens."""
        if x.shape[0] == 0:
            return None
        acc = A.GroupGram(self.params.group_size)
        with torch.no_grad():
            for chunk in x.split(CHUNK):
                acc.add(chunk.float() if fn is None else fn(chunk.float()))
        if not bool(torch.isfinite(acc.gram).all()):
            raise self._fault(ctx, where, "non-finite input statistics")
        return acc.gram

    def _quantize_experts(self, ctx: LayerContext, W: dict[str, Tensor], results: dict[str, Any],
                          m: dict[str, Any]) -> None:
        """Every routed expert of the layer: gate/up clipped on the Gram matrices of its tokens (its
        routed ones; every token with ``--moe-calibration all`` or the ``all`` fallback), then its
        down on ``act(X Ŵgate) * (X Ŵup)`` through its quantized gate/up. An expert under
        ``--moe-min-tokens`` with the ``rtn`` fallback: plain asymmetric RTN on the AWQ grid (no
        clip; its up -> down was not scaled either). The coverage record goes to the manifest."""
        arch, cfg = ctx.arch, ctx.streamer.reader.config
        rt = self._routing(ctx, ctx.expert_inputs())
        ctx.extra_metrics["moe"] = rt.record(arch.experts_per_token(cfg))
        act = ctx.module(ctx.experts_module).act_fn
        clip = self.params.clip
        for e, how in enumerate(rt.how):
            gate, up, down = (arch.expert_linear(e, j) for j in range(3))
            x = rt.rows(e)
            gram = self._gram(ctx, x, gate)
            for name in (gate, up):
                self._quantize_linear(ctx, name, W, gram, clip and how != "rtn", results, m)
            # quantized: the quantized expert's down input
            Wg, Wu = (self._dev(ctx, n, ctx.weight(n), x.device) for n in (gate, up))
            gram = self._gram(ctx, x, down, lambda c: act(F.linear(c, Wg)) * F.linear(c, Wu))
            del Wg, Wu
            self._quantize_linear(ctx, down, W, gram, clip and how != "rtn", results, m)
            del x, gram

    def _moe_terms(self, ctx: LayerContext, pair: ScalePair, rt: Routing,
                   W: dict[str, Tensor]) -> Iterator[tuple[list[Tensor], Tensor, float]]:
        """The norm -> experts pair's quadratic-loss terms, one Hessian alive at a time: each routed
        expert's gate/up with ``H`` from its statistic tokens, weighted by the tokens routed to it;
        the shared expert's gate/up (every token) weighted by all tokens."""
        arch = ctx.arch
        by_expert: dict[int, list[str]] = {}
        shared = []
        for n in pair.linears:
            slot = arch.expert_slot(n)
            (by_expert.setdefault(slot[0], []) if slot is not None else shared).append(n)
        H_all = None
        for e, names in by_expert.items():
            n_e = int(rt.counts[e])
            if n_e == 0:
                continue
            if rt.how[e] == "all":
                H_all = H_all if H_all is not None else hessian_of(rt.all_tokens())
                H = H_all
            else:
                H = hessian_of(rt.routed(e))
            yield [self._dev(ctx, n, W[n], H.device) for n in names], H, float(n_e)  # one expert on the device
            del H
        if shared:
            H_all = H_all if H_all is not None else hessian_of(rt.all_tokens())
            yield [W[n].to(H_all.device) for n in shared], H_all, float(rt.tokens)

    def _expert_pairs(self, ctx: LayerContext, pair: ScalePair, W: dict[str, Tensor], tensors: dict[str, Tensor],
                      cfg: dict, m: dict[str, Any]) -> None:
        """Expert up -> down, one scale per expert: ``mean |h|`` and the Hessian of the expert's down
        input ``h = act(X Wgate) * (X Wup)`` over its statistic tokens (the fp weights, scales of the
        norm pair folded in), scored by the quadratic form; folded into its up rows and down
        columns. Experts under ``--moe-min-tokens`` with the ``rtn`` fallback stay unscaled."""
        p, arch = self.params, ctx.arch
        rt = self._routing(ctx, ctx.expert_inputs())
        act = ctx.module(ctx.experts_module).act_fn
        unscaled = []
        for e, how in enumerate(rt.how):
            x = rt.rows(e)
            if how == "rtn" or x.shape[0] == 0:
                unscaled.append(e)
                continue
            one = ScalePair(pair.prev.replace(EXPERT, str(e)), tuple(n.replace(EXPERT, str(e)) for n in pair.linears))
            Wg, Wu = (self._dev(ctx, n, W[n], x.device) for n in (arch.expert_linear(e, 0), arch.expert_linear(e, 1)))
            stats, hess = A.AbsMean(), HessianAccumulator()
            with torch.no_grad():
                for chunk in x.split(CHUNK):
                    h = act(F.linear(chunk.float(), Wg)) * F.linear(chunk.float(), Wu)
                    stats.add(h)
                    hess.add(h)
            del Wg, Wu, h
            where = f"{one.prev} -> {', '.join(one.linears)}"
            if not bool(torch.isfinite(stats.mean).all()) or not bool(torch.isfinite(hess.H).all()):
                raise self._fault(ctx, where, "non-finite input activations")
            try:
                found = A.search_scales(stats.mean, [self._dev(ctx, n, W[n], hess.H.device) for n in one.linears], None,
                                        p.group_size,
                                        n_grid=p.n_grid,
                                        duo_scaling=p.duo_scaling, H=hess.H)
            except ValueError as err:
                raise self._fault(ctx, where, f"AWQ scale search failed ({err})") from None
            self._fold_pair(ctx, one, found.scales, W, tensors, cfg)
            m["awq_alpha"][one.prev] = found.alpha
            m["scale_loss"][one.prev] = found.loss
            m["rtn_loss"][one.prev] = found.rtn_loss
            del x, stats, hess
        m["unscaled_experts"] = unscaled

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
        batch_loss = w_mean = None
        weights: Any = [W[n] for n in pair.linears]
        if any(ctx.arch.expert_slot(n) is not None for n in pair.linears):
            # norm -> experts (+ shared expert, routers): mean |x| over every token reaching the
            # experts; the quadratic form summed over experts, each with its routed tokens' Hessian
            with recording as recorded:
                rt = self._routing(ctx, ctx.expert_inputs())
            for x, _ in rt.parts:
                stats.add(x)
            hess = None
            batch_loss = lambda S: A.weighted_quadratic_losses(self._moe_terms(ctx, pair, rt, W), S, p.group_size)
            # every expert's weights, one linear at a time on the device (all of them resident at once
            # would be the whole layer's experts in fp32): the duo-scaling statistic streamed over
            # them, and the candidates handed to the sub-block re-run one linear at a time
            weights = A.LazySequence(len(pair.linears), lambda i: self._dev(ctx, pair.linears[i], W[pair.linears[i]]))
            if p.duo_scaling:
                w_mean = A.streamed_weight_mean(iter(weights), p.group_size)
        else:
            with recording as recorded:
                ctx.observe([pair.linears[0]], lambda _n, x: (stats.add(x), hess.add(x)))
        x_mean = stats.mean
        if not bool(torch.isfinite(x_mean).all()) or (hess is not None and not bool(torch.isfinite(hess.H).all())):
            raise self._fault(ctx, where, "non-finite input activations")

        loss = None
        if pair.inspect and p.rerun_top != 0:
            calls = recorded if p.search_tokens is None else take_sequences(recorded, p.search_tokens)
            loss = sub_block_loss(ctx, pair, calls, getattr(torch, p.rerun_dtype))
        try:
            found = A.search_scales(x_mean, weights, loss, p.group_size, n_grid=p.n_grid,
                                    duo_scaling=p.duo_scaling, H=None if hess is None else hess.H,
                                    refine=None if p.rerun_top == -1 else p.rerun_top, batch_loss=batch_loss,
                                    w_mean=w_mean)
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
        new = fold_pair(ctx.layer, ctx.arch, cfg, pair, s, W, rounding=lambda rel, t: self._ckpt_round(ctx, rel, t),
                        set_weight=ctx.set_weight)
        for rel, t in {**new, **{n + ".weight": W[n] for n in (*pair.linears, pair.prev) if n in W}}.items():
            if not bool(torch.isfinite(t).all()):
                raise self._fault(ctx, where, f"non-finite {rel} after folding the AWQ scales")
        tensors.update({ctx.arch.disk_name(rel): t for rel, t in new.items()})  # routers: the checkpoint's names


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
        experts = ctx.experts_module
        if experts is not None and experts.startswith(prefix) and "forward" in vars(ctx.module(experts)):
            # --expert-chunk: the copy's experts (host memory, like the layer's) need a chunked
            # forward of their own (the copied one reads the layer's experts)
            from ..executor.moe import chunked_experts_forward

            sub = module.get_submodule(experts[len(prefix):])
            sub.forward = chunked_experts_forward(sub, ctx.arch.moe.experts, ctx.streamer.cfg.expert_chunk, ctx.device)

        def set_weight(name: str, w: Tensor) -> None:
            slot = ctx.arch.expert_slot(name) if ctx.experts_module else None
            if slot is not None:  # an expert's rows of the copy's fused parameter
                e, j = slot
                ex = ctx.arch.moe.experts
                fused = getattr(module.get_submodule(ex.module[len(prefix):]), ex.fused[0 if j < 2 else 1])
                inter = fused.shape[1] // 2
                rows = slice(None) if j == 2 else slice(0, inter) if j == 0 else slice(inter, 2 * inter)
                fused.data[e, rows] = w.to(device=fused.device, dtype=dtype).reshape(fused.data[e, rows].shape)
                return
            lin = module.get_submodule(name[len(prefix):])
            lin.weight.data = w.to(device=lin.weight.device, dtype=dtype).reshape(lin.weight.shape)

    with torch.no_grad():
        reference = [_output(module(*a, **k)) for a, k in calls]

    def loss(effective: list[Tensor]) -> float:
        for name, w in zip(pair.linears, effective):  # (computed on access: one alive at a time)
            set_weight(name, w)
            del w
        total, count = 0.0, 0
        with torch.no_grad():
            for (a, k), ref in zip(calls, reference):
                out = _output(module(*a, **k))
                total += float((out.float() - ref.float()).pow(2).sum())
                count += out.numel()
        return total / max(count, 1)

    return loss


def fold_pair(layer: nn.Module, arch: Arch, config: Mapping[str, Any], pair: ScalePair, s: Tensor,
              W: dict[str, Tensor], rounding: Callable[[str, Tensor], Tensor] | None = None,
              set_weight: Callable[[str, Tensor], None] | None = None) -> dict[str, Tensor]:
    """Fold the scales ``s`` of ``pair`` into a decoder layer; the layer's fp function is unchanged.

    ``pair.prev``'s output channels are divided by ``s`` (a norm: ``(offset + w)/s − offset``; a
    linear: the rows of its ``prev_part`` block, and its bias) and the linears' input columns are
    multiplied by it. ``W`` (relative linear name -> fp32 weight) is updated for the linears touched
    and their modules are set from it; norm weights and biases are set on the modules and returned
    as ``{relative tensor name: fp32 tensor}`` after ``rounding(name, t)`` (e.g. to the checkpoint
    dtype, so the layer uses exactly what will be written). ``pair.passive`` modules (routers,
    shared-expert gates: never quantized) get their input columns multiplied by ``s`` and are
    returned likewise (in-memory names). ``set_weight(name, W)`` puts a linear's weight in place
    (``LayerContext.set_weight``: also an expert's rows of the fused experts; default: the module's).
    """
    rounding = rounding or (lambda _rel, t: t)
    set_weight = set_weight or (lambda name, w: _set_param(layer.get_submodule(name), "weight", w))
    new: dict[str, Tensor] = {}
    prev = None if arch.expert_slot(pair.prev) is not None else layer.get_submodule(pair.prev)  # experts: no bias
    bias = getattr(prev, "bias", None)
    bias = None if bias is None else bias.detach().float()
    if pair.prev in arch.layer_norms:
        w, b = A.fold_into_norm(prev.weight.detach().float(), s, arch.norm_weight_offset, bias)
        new[pair.prev + ".weight"] = rounding(pair.prev + ".weight", w)
    else:
        lin, dims = arch.linear(pair.prev), arch.dims(config)
        part = pair.prev_part or 0
        start = sum(dims[d] for d in lin.out[:part])
        W[pair.prev], b = A.fold_into_rows(W[pair.prev], s.to(W[pair.prev].device), start, bias)
    if b is not None:
        new[pair.prev + ".bias"] = rounding(pair.prev + ".bias", b)
    for name in pair.passive:
        w = layer.get_submodule(name).weight.detach().float()
        new[name + ".weight"] = rounding(name + ".weight", A.scale_columns(w, s.to(w.device)))
    for name in pair.linears:  # (an expert's weight may be host-resident: --expert-chunk)
        W[name] = A.scale_columns(W[name], s.to(W[name].device))
    for rel, t in new.items():
        module, leaf = rel.rsplit(".", 1)
        _set_param(layer.get_submodule(module), leaf, t)
    for name in (*pair.linears, pair.prev):
        if name in W:
            set_weight(name, W[name])
    return new


def _set_param(module: nn.Module, leaf: str, t: Tensor) -> None:
    p = getattr(module, leaf)
    p.data = t.to(device=p.device, dtype=p.dtype).reshape(p.shape)
