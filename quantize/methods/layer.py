"""Layer plug-ins: how GPTQ and RTN use the executor's LayerContext.

Each sequential group of linears sharing one input (q/k/v; gate/up) gets ONE Hessian and ONE
prepared inverse; groups run in execution order, so o_proj sees the outputs of the already
quantized q/k/v (true-sequential).
"""

from __future__ import annotations

from typing import Any

import torch

from ..executor.context import LayerContext, LayerResult
from ..executor.moe import MoEOptions
from .gptq import gptq_quantize_experts, gptq_quantize_shared, prepare_hessian_inverse
from .grid import QuantResult, QuantSpec, all_finite
from .hessian import HessianAccumulator
from .rtn import rtn_on_grid, rtn_quantize


# Reporting, not solving: relative errors are estimated on at most this many evenly spaced output
# rows (all rows for small layers), so a 70B-shaped down_proj costs O(512 K^2), not O(N K^2).
REPORT_ROWS = 512


def relative_errors(W: torch.Tensor, H: torch.Tensor, **W_hats) -> dict[str, float]:
    """``tr(dW H dW^T) / tr(W H W^T)`` for each candidate, on the same row subset (at most
    ``REPORT_ROWS`` evenly spaced rows). A candidate is a tensor like ``W`` or a function of the
    row subset of ``W`` returning its approximation (RTN, whose rows are independent: only the
    reported rows get quantized). The reference and every candidate share ONE ``[rows, K] @ H``."""
    if W.shape[0] > REPORT_ROWS:
        rows = torch.linspace(0, W.shape[0] - 1, REPORT_ROWS).round().long()
        W = W[rows]
        W_hats = {k: v(W) if callable(v) else v[rows] for k, v in W_hats.items()}
    else:
        W_hats = {k: v(W) if callable(v) else v for k, v in W_hats.items()}
    H32 = H.to(torch.float32)
    W32 = W.to(device=H.device, dtype=torch.float32)
    D = torch.stack([W32, *(W32 - v.to(device=H.device, dtype=torch.float32) for v in W_hats.values())])
    errs = ((D.flatten(0, 1) @ H32).view_as(D) * D).sum(dim=(1, 2), dtype=torch.float64).tolist()
    ref = errs[0]
    return {k: float(e / ref) if ref > 0 else 0.0 for k, e in zip(W_hats, errs[1:])}


def rtn_reference(W: torch.Tensor, r: QuantResult, spec: QuantSpec):
    """RTN's approximation of ``W`` for the manifest's GPTQ-vs-RTN error: from the GPTQ result's
    own grid where that grid is RTN's (static groups or one group per row, and no dead input
    column zeroed before the grid was chosen: the same ``find_params`` on the same weights), else a
    function of the reported rows that quantizes them (the MSE grid search is not run twice)."""
    if r.dead_columns == 0 and (spec.static_groups or r.scales.shape[0] == 1):
        return rtn_on_grid(W, r.scales, r.zeros, spec)
    return lambda w: rtn_quantize(w, spec).W_hat


def check_group_sizes(arch, config, spec: QuantSpec) -> None:
    """Preflight: every linear's in_features must be a multiple of the group size (InputError)."""
    for name in arch.linear_kinds(config):
        _, K = arch.linear_shape(name, config)
        spec.group_width(K, name=f"{arch.layer_prefix(0)}{name}")


class _GridMethod:
    """A plug-in quantizing every layer linear on a ``QuantSpec`` grid (experts included: ``moe``
    says where each expert's statistics come from, executor/moe.py)."""

    solves_experts = True  # sparse layers: ctx.sequential hands each expert's linears to ``quantize``
    solves_fused_experts = True  # GPT-OSS's 3D experts too (their 2D views, executor/moe.expert_view)

    def __init__(self, spec: QuantSpec, moe: MoEOptions | None = None, refine=None):
        self.spec = spec
        self.moe = moe or MoEOptions()
        self.refine = refine  # SignRoundSettings: refine each layer's results (methods/signround.py)

    def preflight(self, arch, config) -> None:
        check_group_sizes(arch, config, self.spec)

    def process_layer(self, ctx: LayerContext) -> LayerResult:
        if self.refine is None:
            return self._process(ctx)
        from .signround import refine_layer

        return refine_layer(ctx, self._process, self.refine, start=self.name)


class GPTQMethod(_GridMethod):
    name = "gptq"

    def _process(self, ctx: LayerContext) -> LayerResult:
        results: dict[str, Any] = {}
        m: dict[str, dict] = {"damp_used": {}, "healed": {}, "rel_error": {}, "rtn_rel_error": {}}
        groups = {g[0]: g for g in ctx.groups}
        accs = {first: HessianAccumulator() for first in groups}

        def quantize(jobs: list[tuple[list[str], torch.Tensor | None]]) -> None:
            """GPTQ on each job's linears, which share the input Hessian ``H``; RTN where no signal
            reached them. Jobs of one shape (a MoE layer's experts) are solved as one batch."""
            gptq, rtn = [], []
            for names, H in jobs:
                if H is not None and not all_finite(H):
                    raise_nonfinite(ctx, names[0])
                # no calibration signal reached these inputs: GPTQ would zero them, RTN keeps them
                unseen = H is None or not bool((torch.diagonal(H) > 0).any())
                (rtn if unseen else gptq).append((names, H, [ctx.weight(name) for name in names]))
            prepared: dict[int, Any] = {}  # one factorization per Hessian (``all``: shared by experts)
            for _, H, _ in gptq:
                if id(H) not in prepared:
                    prepared[id(H)] = prepare_hessian_inverse(H, self.spec)
            fulls = [[ctx.prefix + name for name in names] for names, _, _ in gptq]
            if len(gptq) == 1:
                solved = [gptq_quantize_shared(gptq[0][2], self.spec, prepared[id(gptq[0][1])], names=fulls[0])]
            else:
                solved = gptq_quantize_experts([Ws for _, _, Ws in gptq], [prepared[id(H)] for _, H, _ in gptq],
                                               self.spec, names=fulls)
            prepared.clear()
            done = [(names, H, Ws, rs) for (names, H, Ws), rs in zip(gptq, solved)]
            done += [(names, H, Ws, [rtn_quantize(W, self.spec, name=ctx.prefix + name) for name, W in zip(names, Ws)])
                     for names, H, Ws in rtn]
            for names, H, Ws, rs in done:
                for name, W, r in zip(names, Ws, rs):
                    if not all_finite(r.W_hat):
                        raise_nonfinite(ctx, name)
                    r = results[name] = ctx.place(name, r)
                    m["damp_used"][name] = float(r.damp_used)
                    m["healed"][name] = bool(r.damp_used > self.spec.damp * (1 + 1e-9))
                    if H is not None:
                        errs = relative_errors(W, H, gptq=r.W_hat, rtn=rtn_reference(W, r, self.spec))
                        m["rel_error"][name], m["rtn_rel_error"][name] = errs["gptq"], errs["rtn"]

        def solve(first: str) -> None:
            acc = accs.pop(first)
            if acc.H is None:
                raise_nonfinite(ctx, first)
            quantize([(groups[first], acc.H if acc.n else None)])

        ctx.sequential(list(groups), lambda first, x: accs[first].add(x), solve, experts=quantize, moe=self.moe)
        return LayerResult(results, m)


class RTNMethod(_GridMethod):
    """Round-to-nearest on the same grid and format: the baseline. Needs no calibration data,
    but uses it to report the Hessian-weighted error beside GPTQ's."""

    name = "rtn"

    def _process(self, ctx: LayerContext) -> LayerResult:
        results: dict[str, Any] = {}
        m: dict[str, dict] = {"rel_error": {}}
        groups = {g[0]: g for g in ctx.groups}
        accs = {first: HessianAccumulator() for first in groups}

        def quantize(jobs: list[tuple[list[str], torch.Tensor | None]]) -> None:
            for names, H in jobs:
                for name in names:
                    W = ctx.weight(name)
                    r = results[name] = ctx.place(name, rtn_quantize(W, self.spec))
                    if H is not None:
                        m["rel_error"][name] = relative_errors(W, H, rtn=r.W_hat)["rtn"]

        def solve(first: str) -> None:
            quantize([(groups[first], accs.pop(first).H)])

        ctx.sequential(list(groups), lambda first, x: accs[first].add(x), solve, experts=quantize, moe=self.moe)
        return LayerResult(results, m)


def raise_nonfinite(ctx: LayerContext, name: str):
    from ..errors import RuntimeFault

    raise RuntimeFault(
        f"layer {ctx.index} ({ctx.prefix}{name}): non-finite values in its input statistics or result; "
        f"the model's activations overflow in {ctx.streamer.cfg.dtype} (try --dtype float32) or the weights contain NaN/Inf"
    )
