"""FP8 (float8 e4m3) weight quantization per output channel, and static activation scales.

Pure functions over tensors. Per output row ``n`` of ``W [N, K]``: ``scale[n] = max|W[n]| / 448``
(448 = the largest finite e4m3 value), rounded to the dtype the checkpoint stores scales in; the
weight is ``fp8(clamp(W / scale, ±448))`` (round to nearest even) and reads back as
``float(q) · scale``. Per tensor (static FP8 of a Mixture-of-Experts model): one ``scale`` for
the whole weight, or for a group of weights (an expert's gate and up). A static activation scale
is ``max|x| / 448`` over every calibration token reaching a linear (:class:`AbsMax` collects it;
solving is separate).

A layer plug-in (:class:`FP8Method`) runs it in the shared layer loop: without calibration data
(dynamic per-token activation scales, chosen by the engine at run time) no forward runs at all;
with ``static`` the loop's true-sequential pass feeds each group of linears its inputs, with the
earlier groups already in FP8 (a sparse layer's experts: from the tokens routed to them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .grid import check_weight, dtype_exact

FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
SCALE_DTYPES = ("bfloat16", "float16", "float32")


@dataclass(frozen=True)
class FP8Result:
    """One linear quantized to FP8 e4m3 per output channel."""

    weight: Tensor  # float8_e4m3fn [N, K]
    scale: Tensor  # fp32 [N], exact in the checkpoint's scale dtype
    W_hat: Tensor  # fp32 [N, K] == weight.float() * scale[:, None]
    input_scale: float | None = None  # static per-tensor activation scale (None: dynamic per token)


def exact_scale(x: Tensor, scale_dtype: str) -> Tensor:
    """``x`` rounded to ``scale_dtype`` (kept fp32), never zero."""
    if scale_dtype == "float32":
        return x.to(torch.float32).clamp_min(torch.finfo(torch.float32).tiny)
    return dtype_exact(x.to(torch.float32), scale_dtype)


def fp8_quantize(W: Tensor, scale_dtype: str = "bfloat16", *, input_scale: float | None = None,
                 name: str = "weight", absmax: float | None = None) -> FP8Result:
    """Per-channel FP8 e4m3 of ``W [N, K]`` (not modified); an all-zero row gets the smallest scale.
    With ``absmax`` (>= max|W|): per tensor, one scale ``absmax / 448`` (``scale`` [1]), so that
    several linears can share it (an expert's gate and up: vLLM's fused w13 holds one per expert)."""
    if scale_dtype not in SCALE_DTYPES:
        raise ValueError(f"scale_dtype must be one of {SCALE_DTYPES}, got {scale_dtype!r}")
    W32 = check_weight(W, name)
    amax = W32.abs().amax(dim=1) if absmax is None else torch.tensor([absmax], dtype=torch.float32, device=W32.device)
    scale = exact_scale(amax / FP8_MAX, scale_dtype)
    q = (W32 / scale[:, None]).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return FP8Result(weight=q, scale=scale, W_hat=q.to(torch.float32) * scale[:, None], input_scale=input_scale)


def static_input_scale(absmax: float, scale_dtype: str) -> float:
    """The per-tensor activation scale for inputs whose largest magnitude is ``absmax``."""
    return float(exact_scale(torch.tensor(max(absmax, 0.0) / FP8_MAX), scale_dtype))


def fake_fp8(x: Tensor, scale: Tensor | float) -> Tensor:
    """``x`` through FP8 e4m3 with ``scale`` (broadcast) and back, computed in ``x``'s dtype as
    compressed-tensors' forward does (bit-identical to its fake quantization, tested)."""
    scale = torch.as_tensor(scale, dtype=x.dtype, device=x.device)
    return (x / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).to(x.dtype) * scale


def fake_fp8_per_token(x: Tensor) -> Tensor:
    """Dynamic per-token FP8 activations: each token's scale is its largest |x| / 448 (a zero token
    keeps a tiny scale), in ``x``'s dtype."""
    scale = x.abs().amax(dim=-1, keepdim=True) / FP8_MAX
    scale = torch.where(scale == 0, torch.finfo(x.dtype).eps, scale)
    return fake_fp8(x, scale)


class AbsMax:
    """Largest |x| over every token seen (statistics for static activation scales)."""

    def __init__(self) -> None:
        self.value = 0.0
        self.n = 0

    def add(self, x: Tensor) -> None:
        if x.numel():
            self.value = max(self.value, float(x.detach().abs().amax()))
            self.n += x.shape[0] if x.ndim > 1 else 1


class FP8Method:
    """Layer plug-in: every layer linear to FP8; static activation scales when asked.

    Mixture-of-Experts layers: every routed expert's gate/up/down, each its own 2D linear as on
    disk (``mlp.experts.{e}.gate_proj``, Mixtral ``block_sparse_moe.experts.{e}.w1``), and the
    shared experts; routers and shared-expert gates are never quantized. Dynamic: per-channel
    weights, no statistics. Static (``per_tensor``: what vLLM's FP8 fused-MoE method takes with
    static activations, per-tensor weights, for every linear of the model) -- Lifecycle of a sparse
    layer: [1] the dense groups (attention, shared experts) as in a dense layer; [2] the experts
    from the tokens that reach them (``ctx.expert_inputs``, ``executor/moe.Routing``): gate/up per
    expert with one weight scale for the pair, and one input scale, from every token reaching the
    experts; down's input scale the largest ``|act(x Ŵgate) * (x Ŵup)|`` over the experts, each on
    its routed tokens through its FP8 gate/up (an expert under ``--moe-min-tokens``: the declared
    fallback, all tokens; ``rtn``: no statistic of its own). vLLM takes the largest input scale of a
    layer's experts, so every expert stores that one; [3] the stage propagates through it all."""

    name = "fp8"
    solves_experts = True

    def __init__(self, scale_dtype: str = "bfloat16", static: bool = False, per_tensor: bool = False, moe=None):
        from ..executor.moe import MoEOptions

        self.scale_dtype = scale_dtype
        self.static = static
        self.per_tensor = per_tensor
        self.moe = moe or MoEOptions()

    def preflight(self, arch, config) -> None:
        """Static activation scales with per-channel weights are refused for a Mixture-of-Experts
        model: vLLM's FP8 fused-MoE method (``CompressedTensorsW8A8Fp8MoEMethod``) takes per-channel
        weights only with dynamic per-token activations, so such a checkpoint would not load there."""
        if self.static and arch.moe is not None and not self.per_tensor:
            from ..errors import InputError

            raise InputError(f"static FP8 with per-channel weights: {arch.name} is a Mixture-of-Experts model and "
                             "vLLM's FP8 fused-MoE layers take static activation scales only with per-tensor weights")

    def process_layer(self, ctx) -> Any:
        from ..executor.context import LayerResult

        results: dict[str, FP8Result] = {}
        metrics: dict[str, dict] = {"weight_rel_error": {}}
        groups = {g[0]: g for g in ctx.groups}
        arch, cfg = ctx.arch, ctx.streamer.reader.config

        def quantize(name: str, scale_in: float | None, absmax: float | None = None) -> None:
            W = ctx.weight(name)
            if self.per_tensor and absmax is None:
                absmax = float(W.abs().amax())
            r = fp8_quantize(W, self.scale_dtype, input_scale=scale_in, name=ctx.prefix + name, absmax=absmax)
            ctx.set_weight(name, r.W_hat)
            results[name] = r
            ref = float(W.square().sum())
            metrics["weight_rel_error"][name] = float((W - r.W_hat).square().sum()) / ref if ref > 0 else 0.0
            if scale_in is not None:
                metrics.setdefault("input_scale", {})[name] = scale_in

        def solve(first: str, absmax: float | None) -> None:
            scale_in = static_input_scale(absmax, self.scale_dtype) if absmax is not None else None
            names = groups[first]
            if first == ctx.experts_module:  # every routed expert's gate, up and down (dynamic only)
                names = [arch.expert_linear(e, j) for e in range(arch.num_experts(cfg)) for j in range(3)]
            for name in names:
                quantize(name, scale_in)

        if not self.static:
            for first in groups:
                solve(first, None)
            return LayerResult(results, metrics)
        dense = [first for first in groups if first != ctx.experts_module]
        hidden = ctx.stored_hidden() if ctx.experts_module is not None else None  # this layer's inputs
        stats = {first: AbsMax() for first in dense}
        ctx.sequential(dense, lambda first, x: stats[first].add(x), lambda first: solve(first, stats[first].value))
        if ctx.experts_module is not None:
            # the pass above ran the experts unquantized: the stage propagates the layer again
            ctx.restore_inputs(hidden)
            self._experts_static(ctx, quantize, metrics)
        return LayerResult(results, metrics)

    def _experts_static(self, ctx, quantize, metrics: dict) -> None:
        """Step [2] of the class docstring: every routed expert of ``ctx``'s layer, static."""
        from ..executor.moe import CHUNK, Routing, expert_hidden

        arch, cfg = ctx.arch, ctx.streamer.reader.config
        E, ex = arch.num_experts(cfg), arch.moe.experts
        rt = Routing.of(ctx.expert_inputs(), E, self.moe)  # the tokens reaching the experts, with the weights in place
        ctx.extra_metrics["moe"] = rt.record(arch.experts_per_token(cfg))
        amax_in = AbsMax()
        for x, _ in rt.parts:
            amax_in.add(x)
        scale_in = static_input_scale(amax_in.value, self.scale_dtype)
        for e in range(E):  # gate and up: one weight scale for the pair, the layer's input scale
            gate, up = arch.expert_linear(e, 0), arch.expert_linear(e, 1)
            pair = max(float(ctx.weight(gate).abs().amax()), float(ctx.weight(up).abs().amax()))
            for name in (gate, up):
                quantize(name, scale_in, pair)
        module = ctx.module(ctx.experts_module)
        gate_up = getattr(module, ex.fused[0])
        down_amax: list[float | None] = []
        for e, how in enumerate(rt.how):
            if how == "rtn":  # the declared no-statistics fallback: the other experts' scale serves it
                down_amax.append(None)
                continue
            x = rt.rows(e)
            W_gu = gate_up[e].to(device=x.device, dtype=x.dtype)  # FP8 already; host-resident with --expert-chunk
            amax = AbsMax()
            with torch.no_grad():
                for chunk in x.split(CHUNK):
                    amax.add(expert_hidden(module, ex, chunk, W_gu, None))
            down_amax.append(amax.value)
            del x, W_gu
        scale_down = static_input_scale(max([a for a in down_amax if a is not None], default=0.0), self.scale_dtype)
        for e in range(E):
            quantize(arch.expert_linear(e, 2), scale_down)
        metrics["expert_input_absmax"] = {"gate_up": amax_in.value, "down": down_amax}
