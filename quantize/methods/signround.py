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

    Loss: mean squared error of the whole decoder layer's output with every linear at Ŵ, on the
    quantized model's inputs to the layer, against the unquantized MODEL's output of that layer
    (``target="fp"``, the default, as AutoRound's ``enable_quanted_input``: the layer also learns to
    undo the error the quantized layers before it left in its inputs; the executor keeps the
    unquantized model's hidden states as a second stream for this) or against the unquantized
    layer's output on the same quantized inputs (``target="quantized"``), on one captured
    calibration batch per step (chosen by ``seed``);
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
from typing import Any, Callable, Literal, Sequence

import torch
from pydantic import Field
from torch import Tensor

from .grid import QuantResult, Settings, dequantize_grouped, dtype_exact

TIE, TIE_MARGIN = 1e-3, 0.05  # see _prepare
CLIP_MIN, CLIP_MAX = 0.5, 1.25  # range of the per-group scale factors (the paper clips to [0.5, 1])


class SignRoundSettings(Settings):
    """Settings of the SignRound refinement. Immutable; unknown fields are rejected."""

    iters: int = Field(200, ge=0, description="signed-gradient steps per decoder layer")
    lr: float | None = Field(None, gt=0.0, description="initial step of V (linear decay to 0); None: 1/iters")
    scale_lr: float | None = Field(None, gt=0.0, description="initial step of the scale factors; None: as lr")
    batch: int = Field(1, ge=1, description="captured calibration batches per step")
    rounding: bool = Field(True, description="tune the rounding offsets V")
    clip: bool = Field(True, description="tune the per-group scale factors")
    target: Literal["fp", "quantized"] = Field(
        "fp", description="the output the layer is tuned towards: 'fp' the unquantized model's own layer output "
        "(on its own, unquantized inputs: AutoRound's default), 'quantized' the unquantized layer on the "
        "quantized model's inputs")
    seed: int = 0

    @property
    def step_size(self) -> float:
        return self.lr if self.lr is not None else 1.0 / max(self.iters, 1)

    @property
    def scale_step_size(self) -> float:
        return self.scale_lr if self.scale_lr is not None else self.step_size


def _round_ste(x: Tensor) -> Tensor:
    return x + (torch.round(x) - x).detach()


@dataclass
class _Linear:
    """One linear's fixed data and tunable parameters."""

    start: QuantResult
    u: Tensor  # fp32 [N, K], W / s0 + k: k the integer steps the start moved each weight from round(W / s0)
    Z0: Tensor  # fp32 [N, K], the start's zero-point of every weight
    gi: Tensor  # long [K]
    V: Tensor  # fp32 [N, K], rounding offset in [-0.5, 0.5]
    alpha: Tensor  # fp32 [G, N], scale factor per group and output row in [CLIP_MIN, CLIP_MAX]

    def grid(self) -> tuple[Tensor, Tensor]:
        """(scales [G, N]: s0 · α with straight-through rounding to the stored dtype, the start's zero-points [G, N])."""
        spec = self.start.spec
        s = self.start.scales * self.alpha
        s = s + (dtype_exact(s.detach(), spec.scale_dtype) - s.detach())
        return s, self.start.zeros.to(torch.float32)

    def codes(self, hard: bool) -> Tensor:
        """Codes on the START's grid: ``clamp(round(W / s0 + k + V) + z0, 0, maxq)`` (fp32)."""
        r = torch.round if hard else _round_ste
        return torch.clamp(r(self.u + self.V) + self.Z0, 0, self.start.spec.maxq)

    def params(self, settings: "SignRoundSettings") -> list[tuple[Tensor, float]]:
        """The tuned tensors and their initial step sizes."""
        ps = [(self.V, settings.step_size)] if settings.rounding else []
        if settings.clip:
            ps.append((self.alpha, settings.scale_step_size))
        return ps

    def w_hat(self) -> Tensor:
        """The dequantized weight at the current parameters (differentiable)."""
        s, z = self.grid()
        return s.index_select(0, self.gi).T * (self.codes(hard=False) - self.Z0)

    @torch.no_grad()
    def result(self) -> QuantResult:
        """The current parameters as a QuantResult (``W_hat`` exactly its dequantization)."""
        s, _ = self.grid()
        codes = self.codes(hard=True).to(torch.int32)
        scales = s.contiguous()
        W_hat = dequantize_grouped(codes, scales, self.start.zeros, self.start.g_idx)
        return replace(self.start, codes=codes, scales=scales, W_hat=W_hat, loss=float("nan"))

    def snapshot(self) -> list[Tensor]:
        return [self.V.detach().clone(), self.alpha.detach().clone()]

    @torch.no_grad()
    def restore(self, snap: list[Tensor]) -> None:
        self.V.copy_(snap[0])
        self.alpha.copy_(snap[1])


def _prepare(W: Tensor, start: QuantResult) -> _Linear:
    W = W.detach().to(torch.float32)
    gi = start.g_idx.to(torch.long)
    s0 = start.scales.to(torch.float32).index_select(0, gi).T
    Z0 = start.zeros.to(torch.float32).index_select(0, gi).T
    u = W / s0
    u = u + (start.codes.to(torch.float32) - Z0 - torch.round(u))
    G, N = start.scales.shape
    lin = _Linear(start=start, u=u, Z0=Z0, gi=gi, V=torch.zeros_like(W), alpha=torch.ones(G, N))
    # Exact reproduction of the start. Weights at (or within TIE of) a rounding boundary -- common:
    # the group's extreme weight sits at ±(maxq+1)/2 steps when the scale came from it -- start
    # TIE_MARGIN inside the start code's bin, so that one signed step cannot flip them all at once.
    target = start.codes.to(torch.float32) - Z0
    near = ((u - torch.floor(u) - 0.5).abs() < TIE) | (torch.round(u) != target)
    if bool(near.any()):
        side = torch.sign(target - u)
        lin.V[near] = (target - u - side * (0.5 - TIE_MARGIN))[near].clamp(-0.5, 0.5)
    r = lin.result()
    if not (torch.equal(r.codes, start.codes) and torch.equal(r.scales, start.scales.to(torch.float32))):
        raise AssertionError("SignRound: the parametrisation does not reproduce the starting result")
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
    tuned = [pl for lin in lins.values() for pl in lin.params(settings)]
    params = [p for p, _ in tuned]

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
    iters = settings.iters if tuned else 0
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
                decay = 1.0 - it / iters
                with torch.no_grad():
                    for (p, lr), g in zip(tuned, grads):
                        p.sub_(lr * decay * torch.sign(g))
                    for lin in lins.values():
                        lin.V.clamp_(-0.5, 0.5)
                        lin.alpha.clamp_(CLIP_MIN, CLIP_MAX)
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


# From a GPTQ start the default step of V is this fraction of 1/iters (measured on ref-llama W2 g64:
# at the paper's 1/iters every signed step flips ~1/iters of the codes at once and the layer's error
# rises above GPTQ's, never to come back within 200 steps; the scale factors alone lower it ~25%).
GPTQ_V_STEP = 0.02


def refine_layer(ctx, process: Callable, settings: SignRoundSettings, start: str = "rtn"):
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
    with torch.no_grad():  # the unquantized layer (nothing is quantized yet)
        targets = [_output(layer(*a, **kw)).to(torch.float32)
                   for a, kw in (ctx.fp_layer_calls() if settings.target == "fp" else calls)]
    ctx.forward_passes += 1
    if settings.target == "fp":
        ctx.set_fp_outputs(targets)  # the next layer's unquantized inputs
    res = process(ctx)
    dtypes = {n: ctx.module(n).weight.dtype for n in names}

    def layer_fn(w_hats: dict[str, Tensor], call) -> Tensor:
        a, kw = call
        return _output(functional_call(layer, {f"{n}.weight": w.to(dtypes[n]) for n, w in w_hats.items()}, a, kw))

    update: dict[str, Any] = {"seed": settings.seed * 1_000_003 + ctx.index}
    if start == "gptq" and settings.lr is None:
        update["lr"] = GPTQ_V_STEP / max(settings.iters, 1)
        if settings.scale_lr is None:
            update["scale_lr"] = settings.step_size
    refined, m = signround_layer(layer_fn, weights, {n: res.results[n] for n in names}, calls, targets,
                                 settings.model_copy(update=update))
    for n in names:
        ctx.set_weight(n, refined[n].W_hat)
        res.results[n] = refined[n]
    ctx.restore_inputs(hidden)
    res.metrics["signround"] = m
    return res
