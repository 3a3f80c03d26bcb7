"""SignRound refinement of an already quantized decoder layer (``--refine signround``).

SignRound (Cheng et al., "Optimize Weight Rounding via Signed Gradient Descent for the Quantization
of LLMs", arXiv:2309.05516) tunes, per decoder layer, a rounding offset ``V`` in [-0.5, 0.5] for
every weight and a clip factor per quantization group, by signed gradient descent on the layer's
output error. Here it starts from another method's solution (GPTQ or RTN) instead of plain
rounding, so it can only refine it:

    Per linear with original weight ``W`` and starting result ``(codes q0, scales s0, zeros z0, g_idx)``:
      k  = q0 − z0 − round(W / s0)                       integer: the steps GPTQ moved each weight
                                                          away from round-to-nearest (0 for RTN)
      s  = fp16(s0 · α)                        (sym)      α in [0.5, 1] per group and output row;
      lo = −z0·s0·β, hi = (maxq − z0)·s0·α     (asym)     s = fp16((hi − lo)/maxq), z = round(−lo/s)
      q  = clamp(round(W / s + k + V) + z, 0, maxq),    Ŵ = s · (q − z)
    At V = 0, α = β = 1 this is exactly the starting codes (checked; the rare float tie is absorbed
    into V's initial value), so iteration 0 evaluates the start.

    Loss: mean squared error of the whole decoder layer's output with every linear at Ŵ against the
    unquantized layer's output, on one captured calibration batch per step (chosen by ``seed``);
    rounding and the fp16 rounding of the scales pass gradients straight through.
    Update: ``p ← clamp(p − lr_t · sign(∂loss/∂p))`` with ``lr_t`` decaying linearly from ``lr``
    (default ``1/iters``, the paper's 5e-3 at 200 steps) to 0, for V, α and β alike.

    Kept: the iterate with the lowest step loss, as in the paper; then the start, that iterate and
    the last one are measured on ALL captured batches and the best of the three is returned, so the
    layer's output error on the calibration data never exceeds the start's.

The results are ``QuantResult``s on the same grid as the start (codes, fp16-exact scales, integer
zero-points, the same ``g_idx`` and ``perm``), so every format that packs GPTQ/RTN results packs
them. ``signround_layer`` is a pure function of the weights, the starting results and the captured
calls; ``refine_layer`` is the glue to the executor's ``LayerContext``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

import torch
from pydantic import Field
from torch import Tensor

from .grid import QuantResult, Settings, dequantize_grouped, dtype_exact

CLIP_MIN = 0.5  # the paper's range of the clip factors: [0.5, 1]


class SignRoundSettings(Settings):
    """Settings of the SignRound refinement. Immutable; unknown fields are rejected."""

    iters: int = Field(200, ge=0, description="signed-gradient steps per decoder layer")
    lr: float | None = Field(None, gt=0.0, description="initial step size (linear decay to 0); None: 1/iters")
    batch: int = Field(1, ge=1, description="captured calibration batches per step")
    clip: bool = Field(True, description="also tune the per-group clip factors (scales/zeros)")
    seed: int = 0

    @property
    def step_size(self) -> float:
        return self.lr if self.lr is not None else 1.0 / max(self.iters, 1)


def _round_ste(x: Tensor) -> Tensor:
    return x + (torch.round(x) - x).detach()


@dataclass
class _Linear:
    """One linear's fixed data and tunable parameters."""

    W: Tensor  # fp32 [N, K], the unquantized weight
    start: QuantResult
    k: Tensor  # fp32 [N, K], integer shift of the start's codes from round(W / s0)
    gi: Tensor  # long [K]
    V: Tensor  # fp32 [N, K], rounding offset in [-0.5, 0.5]
    alpha: Tensor  # fp32 [G, N], clip factor of the range's top (sym: of the whole range)
    beta: Tensor | None  # fp32 [G, N], clip factor of the range's bottom (asym)

    def params(self, clip: bool) -> list[Tensor]:
        ps = [self.V]
        if clip:
            ps.append(self.alpha)
            if self.beta is not None:
                ps.append(self.beta)
        return ps

    def grid(self) -> tuple[Tensor, Tensor]:
        """(scales [G, N] with straight-through fp16 rounding, zero-points [G, N] integer-valued)."""
        spec, s0, z0 = self.start.spec, self.start.scales, self.start.zeros.to(torch.float32)
        if spec.sym:
            s = s0 * self.alpha
            z = z0
        else:
            lo = -z0 * s0 * self.beta
            hi = (spec.maxq - z0) * s0 * self.alpha
            s = (hi - lo) / spec.maxq
        s = s + (dtype_exact(s.detach(), spec.scale_dtype) - s.detach())
        if not spec.sym:
            z = _round_ste(-lo / s).clamp(1.0 if spec.v1_safe_zeros else 0.0, float(spec.maxq))
        return s, z

    def w_hat(self) -> Tensor:
        """The dequantized weight at the current parameters (differentiable)."""
        s, z = self.grid()
        S, Z = s.index_select(0, self.gi).T, z.index_select(0, self.gi).T
        q = torch.clamp(_round_ste(self.W / S + self.k + self.V) + Z, 0, self.start.spec.maxq)
        return S * (q - Z)

    @torch.no_grad()
    def result(self) -> QuantResult:
        """The current parameters as a QuantResult (``W_hat`` exactly its dequantization)."""
        s, z = self.grid()
        S, Z = s.index_select(0, self.gi).T, z.index_select(0, self.gi).T
        codes = torch.clamp(torch.round(self.W / S + self.k + self.V) + Z, 0, self.start.spec.maxq).to(torch.int32)
        scales, zeros = s.contiguous(), z.to(torch.int32).contiguous()
        W_hat = dequantize_grouped(codes, scales, zeros, self.start.g_idx)
        return replace(self.start, codes=codes, scales=scales, zeros=zeros, W_hat=W_hat, loss=float("nan"))

    def snapshot(self) -> list[Tensor]:
        return [t.detach().clone() for t in (self.V, self.alpha, self.beta) if t is not None]

    @torch.no_grad()
    def restore(self, snap: list[Tensor]) -> None:
        for t, v in zip([t for t in (self.V, self.alpha, self.beta) if t is not None], snap):
            t.copy_(v)


def _prepare(W: Tensor, start: QuantResult) -> _Linear:
    W = W.detach().to(torch.float32)
    gi = start.g_idx.to(torch.long)
    s0 = start.scales.to(torch.float32).index_select(0, gi).T
    z0 = start.zeros.to(torch.float32).index_select(0, gi).T
    k = start.codes.to(torch.float32) - z0 - torch.round(W / s0)
    G, N = start.scales.shape
    lin = _Linear(W=W, start=start, k=k, gi=gi, V=torch.zeros_like(W), alpha=torch.ones(G, N),
                  beta=None if start.spec.sym else torch.ones(G, N))
    # exact reproduction of the start; a float tie of round(W/s0 + k) goes into V's initial value
    r = lin.result()
    off = r.codes != start.codes
    if bool(off.any()):
        s, z = lin.grid()
        S, Z = s.index_select(0, gi).T, z.index_select(0, gi).T
        u = W / S + k
        lin.V[off] = ((start.codes.to(torch.float32) - Z) - u)[off].clamp(-0.5, 0.5)
        if not torch.equal(lin.result().codes, start.codes):
            raise AssertionError("SignRound: the parametrisation does not reproduce the starting codes")
    return lin


def _loss(out: Tensor, target: Tensor) -> Tensor:
    return (out.to(torch.float32) - target).square().mean()


def signround_layer(
    layer_fn: Callable[[dict[str, Tensor], Any], Tensor],
    weights: dict[str, Tensor],
    results: dict[str, QuantResult],
    inputs: Sequence[Any],
    targets: Sequence[Tensor],
    settings: SignRoundSettings = SignRoundSettings(),
) -> tuple[dict[str, QuantResult], dict[str, Any]]:
    """Refine the quantized linears of one decoder layer by SignRound (module docstring).

    ``layer_fn(w_hats, inputs[i])``: the layer's output on captured input ``i`` with every linear
    named in ``weights`` at the given weight (differentiable in them); ``weights``: the unquantized
    weights; ``results``: the starting QuantResults (same names); ``targets[i]``: the unquantized
    layer's output on ``inputs[i]``. Returns the refined results and metrics: the mean squared
    output error over all inputs before and after, the steps run and the seconds taken.
    """
    t0 = time.perf_counter()
    names = list(weights)
    if not names or not inputs:
        return dict(results), {"mse_before": None, "mse_after": None, "iters": 0, "seconds": 0.0, "kept": "start"}
    lins = {n: _prepare(weights[n], results[n]) for n in names}
    params = [p for lin in lins.values() for p in lin.params(settings.clip)]

    def full_error(w_hats: dict[str, Tensor]) -> float:
        with torch.no_grad():
            tot, n = 0.0, 0
            for x, t in zip(inputs, targets):
                tot += float((layer_fn(w_hats, x).to(torch.float32) - t).square().sum(dtype=torch.float64))
                n += t.numel()
        return tot / n

    start_err = full_error({n: r.W_hat for n, r in results.items() if n in lins})
    energy = sum(float(t.square().sum(dtype=torch.float64)) for t in targets) / sum(t.numel() for t in targets)
    gen = torch.Generator().manual_seed(settings.seed)
    best_loss, best = float("inf"), None
    lr0, iters = settings.step_size, settings.iters
    for p in params:
        p.requires_grad_(True)
    try:
        with torch.enable_grad():
            for it in range(iters):
                picks = torch.randint(len(inputs), (settings.batch,), generator=gen).tolist()
                w_hats = {n: lin.w_hat() for n, lin in lins.items()}
                loss = sum(_loss(layer_fn(w_hats, inputs[i]), targets[i]) for i in picks) / len(picks)
                if float(loss.detach()) < best_loss:  # the loss of the parameters before this step
                    best_loss, best = float(loss.detach()), {n: lin.snapshot() for n, lin in lins.items()}
                grads = torch.autograd.grad(loss, params)
                lr = lr0 * (1.0 - it / iters)
                with torch.no_grad():
                    for p, g in zip(params, grads):
                        p.sub_(lr * torch.sign(g))
                    for lin in lins.values():
                        lin.V.clamp_(-0.5, 0.5)
                        lin.alpha.clamp_(CLIP_MIN, 1.0)
                        if lin.beta is not None:
                            lin.beta.clamp_(CLIP_MIN, 1.0)
    finally:
        for p in params:
            p.requires_grad_(False)

    candidates: list[tuple[str, dict[str, QuantResult]]] = [("start", dict(results))]
    if iters:
        candidates.append(("last", {n: lin.result() for n, lin in lins.items()}))
        if best is not None:
            for n, lin in lins.items():
                lin.restore(best[n])
            candidates.append(("best_step", {n: lin.result() for n, lin in lins.items()}))
    kept, kept_err, kept_res = "start", start_err, candidates[0][1]
    for label, res in candidates[1:]:
        err = full_error({n: r.W_hat for n, r in res.items()})
        if err < kept_err:
            kept, kept_err, kept_res = label, err, res
    out = dict(results)
    out.update(kept_res)
    changed = sum(int((out[n].codes != results[n].codes).sum()) for n in names)
    metrics = {"mse_before": start_err, "mse_after": kept_err,
               "rel_before": start_err / energy if energy > 0 else 0.0,
               "rel_after": kept_err / energy if energy > 0 else 0.0,
               "iters": iters, "kept": kept, "codes_changed": changed,
               "seconds": round(time.perf_counter() - t0, 3)}
    return out, metrics


# -- glue to the layer loop ----------------------------------------------------------------------


def _output(out: Any) -> Tensor:
    return out[0] if isinstance(out, tuple) else out


def refine_layer(ctx, process: Callable, settings: SignRoundSettings):
    """Run ``process(ctx)`` (GPTQ/RTN on the layer, which may propagate its outputs in lock-step),
    then SignRound on its results: the layer's calls and its unquantized outputs are taken before,
    the refined weights are put in place after, and the layer's inputs are put back so that the
    stage propagates the outputs of the REFINED layer."""
    from torch.func import functional_call

    from ..errors import InputError

    if ctx.experts_module is not None:
        raise InputError(f"layer {ctx.index} holds Mixture-of-Experts experts: --refine signround "
                         f"does not support Mixture-of-Experts models yet")
    names = [n for g in ctx.groups for n in g]
    weights = {n: ctx.weight(n) for n in names}
    hidden = ctx.stored_hidden()
    calls = ctx.layer_calls()
    layer = ctx.layer
    with torch.no_grad():
        targets = [_output(layer(*a, **kw)).to(torch.float32) for a, kw in calls]
    ctx.forward_passes += 1
    res = process(ctx)
    dtypes = {n: ctx.module(n).weight.dtype for n in names}

    def layer_fn(w_hats: dict[str, Tensor], call) -> Tensor:
        a, kw = call
        return _output(functional_call(layer, {f"{n}.weight": w.to(dtypes[n]) for n, w in w_hats.items()}, a, kw))

    seed = settings.seed * 1_000_003 + ctx.index
    refined, m = signround_layer(layer_fn, weights, {n: res.results[n] for n in names}, calls, targets,
                                 settings.model_copy(update={"seed": seed}))
    for n in names:
        ctx.set_weight(n, refined[n].W_hat)
        res.results[n] = refined[n]
    ctx.restore_inputs(hidden)
    res.metrics["signround"] = m
    return res
