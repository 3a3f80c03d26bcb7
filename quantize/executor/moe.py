"""Mixture-of-Experts statistics: each expert's Hessians from the tokens it sees, and honest coverage.

The experts module of a sparse layer has no ``nn.Linear`` children; its forward receives the
layer's tokens and their routing (``hidden [T, H]``, ``top_k_index [T, k]``), which the layer
context keeps (``LayerContext._feeding``) while the calibration batches reach it. Here, a batch of
experts at a time (``experts_per_solve``: their solve's workspace within ``BATCH_SOLVE_BYTES``; the method
solves a batch's gate/up, then its down, as one batched GPTQ solve each, ``methods/gptq.py``):

* ``routed`` (the default): gate/up's Hessian from exactly the tokens routed to the expert; the
  down projection's from ``act(X_e Ŵ_gate^T) * (X_e Ŵ_up^T)`` with the expert's already-quantized
  gate/up (true-sequential inside the expert), computed as the experts' forward computes it;
* ``all``: every expert's statistics from all tokens (the forward itself stays the model's: only
  the routed outputs are summed), llm-compressor's ``moe_calibrate_all_experts``;
* an expert that saw fewer than ``min_tokens`` (a fraction of the layer's tokens, GPTQModel's
  0.5% by default) is solved by the declared ``fallback``: the all-token Hessian (default) or RTN
  on its weights. It is listed in the coverage record; nothing is left unquantized, no NaN.

Once the experts are solved the layer's forward goes on with them in place, so the next layer's
inputs come from the model's own routing through the quantized experts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.nn import functional as F

from ..errors import InputError
from ..methods.hessian import HessianAccumulator

MODES = ("routed", "all")
FALLBACKS = ("all", "rtn")
# Token rows per Hessian update: bounds the fp32 copy of an expert's inputs.
CHUNK = 8192
# The down projection of an expert solved by the all-token fallback takes its statistic from at most
# max(FALLBACK_ROWS, 4 x its input width) of the layer's tokens, evenly spaced: its input depends on
# the expert's own quantized gate/up, so every such expert would otherwise run all T tokens through
# them (with a third of a trained model's experts under --moe-min-tokens, most of a layer's work).
FALLBACK_ROWS = 8192
# What the experts solved together may hold (``experts_per_solve``): per expert and linear kind,
# fp32 Hessian, its factor and their stacked copy (3 K^2) and the weights in four forms (stacked,
# processing order, codes being written, dequantized result: 4 N K). 64 MiB is 36 experts of a
# 256-wide model with 128 experts of width 128, 2 of a 1024-wide one with width 512, one of
# Qwen3-30B-A3B's or Mixtral's.
BATCH_SOLVE_BYTES = 64 << 20


@dataclass(frozen=True)
class MoEOptions:
    mode: str = "routed"  # routed | all: which tokens an expert's statistics come from
    min_tokens: float = 0.005  # fraction of the layer's calibration tokens an expert must see
    fallback: str = "all"  # all | rtn: how an expert below min_tokens is solved

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise InputError(f"--moe-calibration {self.mode!r}: expected one of {', '.join(MODES)}")
        if self.fallback not in FALLBACKS:
            raise InputError(f"--moe-fallback {self.fallback!r}: expected one of {', '.join(FALLBACKS)}")
        if not 0.0 <= self.min_tokens < 1.0:
            raise InputError(f"--moe-min-tokens {self.min_tokens}: expected a fraction of the calibration tokens in [0, 1)")

    def params(self) -> dict[str, Any]:
        return {"moe_calibration": self.mode, "moe_min_tokens": self.min_tokens, "moe_fallback": self.fallback}


def hessian_of(x: torch.Tensor) -> torch.Tensor:
    """``2/n XᵀX`` in fp32 over the rows of ``x``, accumulated in chunks of ``CHUNK`` rows."""
    acc = HessianAccumulator()
    for chunk in x.split(CHUNK):
        acc.add(chunk)
    return acc.H


def expert_rows(index: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, ...]:
    """For each expert, the (ascending) positions of the tokens routed to it, from one pass over
    ``top_k_index [T, k]``: the rows ``x[(index == e).any(-1)]`` selects, without a mask per expert
    (a token counts once; out-of-range ids, padding, count for no expert)."""
    hit = torch.zeros(index.shape[0], num_experts + 1, dtype=torch.bool, device=index.device)
    hit.scatter_(1, index.long().clamp(0, num_experts), True)  # out-of-range ids go to column E
    hit = hit[:, :num_experts]
    rows = hit.T.nonzero()[:, 1]  # by expert, then by token
    return rows.split(hit.sum(0).tolist())


def solve_bytes(shapes) -> int:
    """The workspace one expert adds to a batched solve (see ``BATCH_SOLVE_BYTES``): the largest
    over its solves, ``shapes`` ``(N, K)``: rows solved together (gate+up's 2I, down's H), input width."""
    return max(4 * (3 * K * K + 4 * N * K) for N, K in shapes)


def experts_per_solve(shapes, num_experts: int) -> int:
    """Experts solved together (one batched GPTQ solve per linear kind, ``methods/gptq.py``): as
    many as keep their workspace (:func:`solve_bytes` of ``shapes``) within ``BATCH_SOLVE_BYTES``,
    at least one."""
    return max(1, min(num_experts, BATCH_SOLVE_BYTES // solve_bytes(shapes)))


def expert_solve_shapes(arch, config) -> list[tuple[int, int]]:
    """``(rows, input width)`` of an expert's two solves: gate+up together, then down."""
    (n_g, k_g), (n_u, _), (n_d, k_d) = (arch.linear_shape(arch.expert_linear(0, j), config) for j in range(3))
    return [(n_g + n_u, k_g), (n_d, k_d)]


@dataclass
class Routing:
    """The tokens of one pass over a sparse layer's experts (per batch: tokens, routing) and, by the
    rules of :func:`solve_experts`, where each expert's statistics come from: ``how[e]`` is
    ``routed`` (its own tokens), ``all`` (every token: ``--moe-calibration all``, or the fallback of
    an expert under ``need`` tokens) or ``rtn`` (the declared no-statistics fallback). For methods
    that gather their own per-expert statistics (AWQ) from ``ctx.expert_inputs()``."""

    parts: list[tuple[torch.Tensor, torch.Tensor]]
    index: list[tuple[torch.Tensor, ...]]  # per part, per expert: the positions of its tokens
    counts: torch.Tensor  # [E] tokens routed to each expert
    tokens: int  # T, the layer's tokens
    need: int  # tokens an expert must see for statistics of its own
    how: list[str]
    opts: MoEOptions
    _sampled: tuple[int, torch.Tensor] | None = field(default=None, repr=False)  # (n, :meth:`sampled`)

    @classmethod
    def of(cls, parts: list[tuple[torch.Tensor, torch.Tensor]], num_experts: int, opts: MoEOptions) -> "Routing":
        T = sum(x.shape[-2] for x, _ in parts)  # x [T, H], or [E, T, H] (``Experts.score_on_input``)
        index = [expert_rows(i, num_experts) for _, i in parts]
        counts = torch.tensor([sum(int(rows[e].numel()) for rows in index) for e in range(num_experts)], dtype=torch.long)
        need = max(1, math.ceil(opts.min_tokens * T))
        how = ["all" if opts.mode == "all" else ("routed" if int(counts[e]) >= need else opts.fallback)
               for e in range(num_experts)]
        how = ["rtn" if h == "all" and T == 0 else h for h in how]
        return cls(parts, index, counts, T, need, how, opts)

    def all_tokens(self) -> torch.Tensor:
        """Every token (``score_on_input``: each as scaled for the experts it was routed to)."""
        return torch.cat([_all_rows(x, i) for x, i in self.parts])

    def routed(self, e: int) -> torch.Tensor:
        """The tokens routed to expert ``e`` (batch order), as that expert receives them."""
        return torch.cat([(x[e] if x.ndim == 3 else x)[rows[e]] for (x, _), rows in zip(self.parts, self.index)])

    def sampled(self, n: int) -> torch.Tensor:
        """At most ``n`` of :meth:`all_tokens`, evenly spaced (all of them when there are no more);
        one copy per layer, kept for every expert that asks."""
        if self._sampled is None or self._sampled[0] != n:
            x = self.all_tokens()
            if x.shape[0] > n:
                x = x[torch.linspace(0, x.shape[0] - 1, n, device=x.device).round().long()]
            self._sampled = (n, x)
        return self._sampled[1]

    def rows(self, e: int) -> torch.Tensor:
        """The tokens expert ``e``'s statistics come from (``rtn``: its routed ones, for reporting)."""
        return self.all_tokens() if self.how[e] == "all" else self.routed(e)

    def record(self, top_k: int) -> dict[str, Any]:
        """The layer's coverage record, as :func:`solve_experts` returns it."""
        E = len(self.how)
        below = [e for e in range(E) if int(self.counts[e]) < self.need]
        return {
            "experts": E, "top_k": top_k, "tokens": self.tokens, "mode": self.opts.mode, "min_tokens": self.need,
            "fallback": self.opts.fallback, "seen": [int(c) for c in self.counts],
            "solved": {k: self.how.count(k) for k in ("routed", "all", "rtn")}, "below_min": below,
            "fallback_experts": below if self.opts.mode == "routed" else [],
            # the all-token fallback's down statistic: from this many tokens (at most FALLBACK_ROWS, or all)
            **({"fallback_down_tokens": int(self._sampled[1].shape[0])} if self._sampled else {}),
        }


def expert_view(module, ex, e: int, j: int) -> torch.Tensor:
    """Expert ``e``'s linear ``j`` (0 gate, 1 up, 2 down) as an ``nn.Linear`` holds it (``[out, in]``):
    a view of the experts module's 3D parameter laid out as ``ex`` (``Experts``) declares, so a
    copy into it writes the model's own parameter."""
    return linear_view(ex, getattr(module, ex.fused[0 if j < 2 else 1]).data[e], j)


def linear_view(ex, W: torch.Tensor, j: int) -> torch.Tensor:
    """Linear ``j``'s ``[out, in]`` view of one expert's slice ``W`` of 3D parameter ``fused[0]``
    (``j`` 0 gate, 1 up) or ``fused[1]`` (``j`` 2, down), in the layout of ``ex``."""
    if ex.transposed:  # [in, out] on disk and in memory (x @ W)
        W = W.T
    if j == 2:
        return W
    if ex.interleaved:  # gate_up rows: gate 0, up 0, gate 1, up 1, ...
        return W[j::2]
    inter = W.shape[0] // 2
    return W[j * inter:(j + 1) * inter]


def expert_hidden(module, ex, x: torch.Tensor, W_gu: torch.Tensor, b_gu: torch.Tensor | None) -> torch.Tensor:
    """The down projection's input for tokens ``x`` of one expert whose gate_up parameter slice is
    ``W_gu`` (and bias ``b_gu``), computed as the experts module computes it: the gate_up output
    (bias added) through the module's own gate (``ex.gate``: GPT-OSS's clamped SwiGLU), else
    ``act_fn(gate) * up``."""
    gu = x @ W_gu if ex.transposed else F.linear(x, W_gu)
    if b_gu is not None:
        gu = gu + b_gu
    if ex.gate is not None:
        return getattr(module, ex.gate)(gu)
    g, u = (gu[..., 0::2], gu[..., 1::2]) if ex.interleaved else gu.chunk(2, dim=-1)
    return module.act_fn(g) * u


def _all_rows(x: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
    """Every token of one batch (``score_on_input``: each as scaled for the experts it was routed to)."""
    if x.ndim == 2:
        return x
    return x[i.long(), torch.arange(x.shape[1], device=x.device)[:, None]].reshape(-1, x.shape[-1])


def _bias(module, ex, k: int) -> torch.Tensor | None:
    return getattr(module, ex.biases[k]) if ex.biases else None


def solve_experts(ctx, inputs: list[tuple[torch.Tensor, torch.Tensor]],
                  solve: Callable[[list[tuple[list[str], torch.Tensor | None]]], None], opts: MoEOptions) -> dict[str, Any]:
    """Solve every expert of ``ctx``'s layer from the kept ``inputs`` (per batch: tokens, routing).

    ``solve(jobs)`` quantizes, for each ``(names, H)`` of ``jobs``, the named linears (one expert's
    gate+up, or its down) given their shared input Hessian, or by RTN when ``H`` is None; the jobs
    of one call are independent and of one shape, so a method may solve them as one batch.
    ``experts_per_solve`` experts at a time: their gate/up, then (from the tokens through the
    quantized gate/up) their down. Returns the layer's coverage record."""
    arch, cfg = ctx.arch, ctx.streamer.reader.config
    E, top_k = arch.num_experts(cfg), arch.experts_per_token(cfg)
    ex = arch.moe.experts
    module = ctx.module(ex.module)
    gate_up, b_gu = getattr(module, ex.fused[0]), _bias(module, ex, 0)
    # per batch, never concatenated: an expert's rows are gathered from each batch in turn (the
    # rows, and their order, of one concatenation: the same Hessians)
    rt = Routing.of([(x, i) for x, i in inputs], E, opts)
    inputs.clear()
    how = rt.how
    H_all = hessian_of(rt.all_tokens()) if "all" in how else None  # shared by every such expert
    tokens = rt.rows

    shapes = expert_solve_shapes(arch, cfg)  # [(gate+up rows, hidden), (down rows, down width)]
    sample = max(FALLBACK_ROWS, 4 * shapes[1][1])

    def down_tokens(e: int) -> torch.Tensor:  # a fallback expert's down statistic: a sample of every token
        return rt.sampled(sample) if how[e] == "all" and opts.mode == "routed" else tokens(e)

    step = experts_per_solve(shapes, E)
    for e0 in range(0, E, step):
        batch = range(e0, min(E, e0 + step))
        solve([([arch.expert_linear(e, 0), arch.expert_linear(e, 1)],
                None if how[e] == "rtn" else H_all if how[e] == "all" else hessian_of(tokens(e))) for e in batch])
        jobs = []
        for e in batch:
            if how[e] == "rtn":
                jobs.append(([arch.expert_linear(e, 2)], None))
                continue
            acc = HessianAccumulator()
            Xe = down_tokens(e)
            W_gu = gate_up[e].to(device=Xe.device, dtype=Xe.dtype)  # host-resident with --expert-chunk
            bias = None if b_gu is None else b_gu[e].to(device=Xe.device, dtype=Xe.dtype)
            with torch.no_grad():
                for chunk in Xe.split(CHUNK):  # the expert's own forward, with its quantized gate/up
                    acc.add(expert_hidden(module, ex, chunk, W_gu, bias))
            del Xe, W_gu
            jobs.append(([arch.expert_linear(e, 2)], acc.H))
        solve(jobs)
        del jobs
    return rt.record(top_k)


def chunked_experts_forward(module, ex, chunk: int, device: str,
                            inputs: Callable[[int, int, torch.Tensor], torch.Tensor] | None = None):
    """A forward for an experts module whose fused parameters stay in host memory: ``chunk`` experts
    at a time are copied to ``device`` and run on their routed tokens (the computation of
    transformers' eager experts forward, in the layout ``ex`` declares: gate_up (+ bias), the gate,
    down projection (+ bias), times the routing weight, summed over the token's experts). Device
    memory for the experts is ``chunk / E`` of the layer's. ``inputs(e, j, x)``, when given, is what
    reaches expert e's gate/up (j = 0) and down (j = 2) projections instead of ``x`` (a W8A8
    engine's activation quantization: eval/activations.py)."""

    if ex.score_on_input:
        return _chunked_scored_forward(module, ex, chunk)

    def forward(hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        gate_up, down = getattr(module, ex.fused[0]), getattr(module, ex.fused[1])
        b_gu, b_d = _bias(module, ex, 0), _bias(module, ex, 1)
        E = gate_up.shape[0]
        out = torch.zeros_like(hidden_states)
        on = dict(device=hidden_states.device, dtype=hidden_states.dtype)
        with torch.no_grad():
            for c0 in range(0, E, chunk):
                hit = [e for e in range(c0, min(E, c0 + chunk)) if bool((top_k_index == e).any())]
                if not hit:
                    continue
                W_gu = gate_up[c0:c0 + chunk].to(**on)
                W_d = down[c0:c0 + chunk].to(**on)
                for e in hit:
                    token, pos = torch.where(top_k_index == e)
                    x = hidden_states[token] if inputs is None else inputs(e, 0, hidden_states[token])
                    h = expert_hidden(module, ex, x, W_gu[e - c0], None if b_gu is None else b_gu[e].to(**on))
                    h = h if inputs is None else inputs(e, 2, h)
                    h = h @ W_d[e - c0] if ex.transposed else F.linear(h, W_d[e - c0])
                    if b_d is not None:
                        h = h + b_d[e].to(**on)
                    out.index_add_(0, token, (h * top_k_weights[token, pos, None]).to(out.dtype))
                del W_gu, W_d
        return out

    return forward


def _chunked_scored_forward(module, ex, chunk: int):
    """``chunked_experts_forward`` for experts whose input carries the routing score (Llama-4):
    ``x [E*T, H]`` holds each expert's copy of the tokens; every expert runs on its own copy (zero
    rows where not routed, as the module's batched matmul does) and the outputs keep that layout."""

    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        gate_up, down = getattr(module, ex.fused[0]), getattr(module, ex.fused[1])
        E = gate_up.shape[0]
        x = hidden_states.view(E, -1, hidden_states.shape[-1])
        out = torch.empty_like(x)
        on = dict(device=hidden_states.device, dtype=hidden_states.dtype)
        with torch.no_grad():
            for c0 in range(0, E, chunk):
                W_gu, W_d = gate_up[c0:c0 + chunk].to(**on), down[c0:c0 + chunk].to(**on)
                for e in range(c0, min(E, c0 + chunk)):
                    h = expert_hidden(module, ex, x[e], W_gu[e - c0], None)
                    out[e] = h @ W_d[e - c0] if ex.transposed else F.linear(h, W_d[e - c0])
                del W_gu, W_d
        return out.view(-1, hidden_states.shape[-1])

    return forward


def coverage_summary(layer_metrics: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The run's expert coverage from its per-layer records (None for a dense model): token counts
    over every (layer, expert), and the experts solved by the fallback, by layer."""
    records = [(m["layer"], m["moe"]) for m in layer_metrics if "moe" in m]
    if not records:
        return None
    seen = sorted((c, layer, e) for layer, r in records for e, c in enumerate(r["seen"]))
    first = records[0][1]
    return {
        "sparse_layers": len(records),
        "experts": first["experts"],
        "top_k": first["top_k"],
        "mode": first["mode"],
        "fallback": first["fallback"],
        "min_tokens": min(r["min_tokens"] for _, r in records),
        "seen_min": {"tokens": seen[0][0], "layer": seen[0][1], "expert": seen[0][2]},
        "seen_median": seen[len(seen) // 2][0],
        "seen_max": seen[-1][0],
        "solved": {k: sum(r["solved"][k] for _, r in records) for k in first["solved"]},
        "fallback_experts": {str(layer): r["fallback_experts"] for layer, r in records if r["fallback_experts"]},
        **({"fallback_down_tokens": max(down)}
           if (down := [r["fallback_down_tokens"] for _, r in records if "fallback_down_tokens" in r]) else {}),
    }


def coverage_lines(summary: dict[str, Any]) -> list[str]:
    """``quantize inspect``'s lines for :func:`coverage_summary`."""
    s = summary
    lo = s["seen_min"]
    lines = [
        f"experts      {s['sparse_layers']} sparse layers x {s['experts']} experts (top-{s['top_k']}); statistics from "
        f"{s['mode']} tokens; below {s['min_tokens']} tokens: fallback {s['fallback']}",
        f"  tokens/expert  min {lo['tokens']} (layer {lo['layer']} expert {lo['expert']}), "
        f"median {s['seen_median']}, max {s['seen_max']}",
        "  solved       " + ", ".join(f"{k} {v}" for k, v in s["solved"].items()),
    ]
    fb = s["fallback_experts"]
    if fb:
        n = sum(len(v) for v in fb.values())
        lines.append(f"  fallback     {n} experts: " + "; ".join(f"layer {k}: {', '.join(map(str, v))}" for k, v in fb.items()))
        if "fallback_down_tokens" in s:
            lines.append(f"               (their down projections' statistics from an even sample of at most "
                         f"{s['fallback_down_tokens']} tokens)")
    else:
        lines.append("  fallback     none: every expert saw enough tokens")
    return lines
