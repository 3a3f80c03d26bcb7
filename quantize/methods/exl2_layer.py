"""EXL2 plug-ins for the streaming executor: the measurement pass and the quantization pass.

Measurement (:class:`Exl2MeasureMethod`, driven by :func:`run_measurement`): per decoder layer, one
reference forward collects the Hessian of every sequential group; then for each slot (attention,
MLP) and each of its candidate option rows (19 / 17, §3.3) the slot's linears are replaced by their
EXL2 fake-quantized weights and the slot's output is compared with the reference:

* attention: the residual stream after attention, i.e. the input of the norm that feeds the MLP
  (found from the architecture table's MLP scale pair; the forward stops there);
* MLP: the decoder layer's output (attention unquantized, so its input is the reference one).

``accuracy = max(1e-6, 1 − mean_rows ‖y_q − y_ref‖_F / ‖y_ref‖_F)`` (exllamav2's metric). Weights
are restored afterwards, so the next layer sees reference inputs, as in exllamav2. Every distinct
(linear, option) is quantized once per layer with GPTQ against the reference Hessian.

Quantization (:class:`Exl2QuantMethod`, driven by ``run_quantize_stage``): per sequential group,
the Hessian of the *current* (already quantized upstream) activations, one prepared inverse, each
linear quantized with the option row the optimizer chose for its slot. ``process_head`` quantizes
``lm_head`` after the last layer on the final-norm outputs of the quantized model. The manifest
records per linear the Hessian-weighted error beside RTN's on the same EXL2 grid (same regions and
storage order, no error feedback: ``exl2_rtn``).

Mixture-of-Experts (Mixtral, Qwen3-MoE: the families exllamav2 loads, ``methods/exl2.EXL2_MOE_FAMILIES``):
a sparse layer's routed experts are the slot ``block_sparse_moe``, measured with the 17 MLP option
rows, each row applied to every expert at once (gate/up/down of each expert take the row's
gate/up/down; exllamav2 ``measure_moe_mlp``), its error the layer output's, its cost the sum over
the experts. The measurement solves each expert on its own Hessians (the tokens routed to it, by the
``--moe-*`` rules of ``executor/moe.solve_experts``; down from its reference hidden state), where
exllamav2 gives every expert's w1/w3 the Hessian of all the layer's tokens. The quantization pass
runs the experts through ``ctx.sequential``'s experts callback: per expert its gate/up on its routed
Hessian, then its down on its hidden state through the quantized gate/up; an expert under
``--moe-min-tokens`` takes the all-token Hessian or, ``--moe-fallback rtn``, RTN on the EXL2 grid.
The measurement keeps every expert's prepared inverse through the 17 rows (``E·(H²+I²)`` fp32).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch


from .. import log
from ..errors import RuntimeFault
from ..executor.context import LayerContext, LayerResult
from ..executor.resume import ResumePoint
from ..executor.loop import ExecConfig, LayerStreamer
from ..executor.memory import frozen_gc
from .exl2 import (
    EXL2_DAMP,
    SLOT_OPTIONS,
    Exl2Result,
    QParams,
    exl2_quantize,
    exl2_rtn,
    exllamav2_total_bits,
    layer_slots,
    option_key,
    output_rel_error,
    prepare_exl2_hessian,
    slot_linears,
)
from .gptq import weighted_error
from .hessian import HessianAccumulator
from .layer import raise_nonfinite, relative_errors

MEASUREMENT_FILE = "measurement.json"


def attention_probe(arch) -> str | None:
    """The module whose input is the residual stream after attention: the norm feeding the MLP's
    first linears (the ``prev`` of that scale pair in the architecture table). None: unknown."""
    first_mlp = slot_linears(arch).get("mlp", [None])[0]
    for pair in arch.scale_pairs:
        if first_mlp in pair.linears and pair.prev in arch.layer_norms:
            return pair.prev
    return None


def _hessian(acc: HessianAccumulator, K: int, ctx: LayerContext, name: str) -> torch.Tensor:
    """The accumulated H, or the identity when no calibration signal reached these inputs."""
    H = acc.H
    if H is None or acc.n == 0 or not bool((torch.diagonal(H) > 0).any()):
        return torch.eye(K, device=ctx.device)
    if not torch.isfinite(H).all():
        raise_nonfinite(ctx, name)
    return H


def _run_probe(ctx: LayerContext, probe: str | None, consume: Callable[[int, torch.Tensor], None]) -> None:
    """One pass over the calibration batches; ``consume(batch, y)`` with the input of module
    ``probe`` (the forward stops there) or, when None, the decoder layer's output."""
    batch = [0]
    if probe is None:
        def hook(_m, _args, out):
            consume(batch[0], out[0] if isinstance(out, tuple) else out)
        handle, stop = ctx.layer.register_forward_hook(hook), None
    else:
        mod = ctx.module(probe)

        def hook(_m, args):
            consume(batch[0], args[0])
        handle, stop = mod.register_forward_pre_hook(hook), mod
    try:
        ctx.streamer.run_layer(ctx.index, propagate=False, stop_hook=stop,
                               on_batch=lambda b: batch.__setitem__(0, b))
    finally:
        handle.remove()
    ctx.forward_passes += 1


def _expert_hessians(ctx: LayerContext, moe) -> tuple[dict[str, torch.Tensor | None], dict[str, Any]]:
    """Measurement: every routed expert's input Hessians as ``executor/moe.solve_experts`` gives them
    to a method (its own routed tokens; the all-token Hessian, shared, or None, i.e. RTN, for an
    expert under ``--moe-min-tokens``), only collected: nothing is quantized, so down's comes from
    the expert's reference hidden state ``act(x W_gate^T) * (x W_up^T)``. ``{linear: H or None}``
    and the coverage record."""
    from ..executor.moe import solve_experts

    out: dict[str, torch.Tensor | None] = {}
    coverage = solve_experts(ctx, ctx.expert_inputs(), lambda jobs: out.update({n: H for names, H in jobs for n in names}),
                             moe)
    return out, coverage


class Exl2MeasureMethod:
    """Measures every candidate option row of every slot of a layer; changes no weights."""

    name = "exl2-measure"

    def __init__(self, damp: float = EXL2_DAMP, moe=None):
        from ..executor.moe import MoEOptions

        self.damp = damp
        self.moe = moe or MoEOptions()

    def process_layer(self, ctx: LayerContext) -> LayerResult:
        arch, cfg = ctx.arch, ctx.streamer.reader.config
        slots = layer_slots(arch, cfg, ctx.index)
        linears = [lin for group in slots.values() for lin, _ in group]
        originals = {n: ctx.weight(n) for n in linears}
        groups = [g for g in ctx.groups if g[0] != ctx.experts_module]
        accs = {g[0]: HessianAccumulator() for g in groups}
        ctx.observe([g[0] for g in groups], lambda n, x: accs[n].add(x))
        prepared: dict[str, Any] = {}
        for g in groups:
            K = originals[g[0]].shape[1]
            p = prepare_exl2_hessian(_hessian(accs[g[0]], K, ctx, g[0]), self.damp, name=f"{ctx.prefix}{g[0]} Hessian")
            prepared.update({n: p for n in g})
        del accs
        coverage = None
        if ctx.experts_module is not None:
            # every expert's prepared inverse is kept through the 17 option rows (exllamav2 keeps
            # every expert's quantized candidates instead)
            hessians, coverage = _expert_hessians(ctx, self.moe)
            by_id: dict[int, Any] = {}  # ids of Hessians still held by ``hessians`` (shared: the all-token one)
            for n in list(hessians):
                H = hessians.pop(n)
                if H is None:
                    prepared[n] = None  # no tokens: RTN on the EXL2 grid
                    continue
                if not torch.isfinite(H).all():
                    raise_nonfinite(ctx, n)
                if id(H) not in by_id:
                    K = originals[n].shape[1]
                    by_id[id(H)] = prepare_exl2_hessian(_hessian_or_eye(H, K, ctx), self.damp,
                                                        name=f"{ctx.prefix}{n} Hessian")
                prepared[n] = by_id[id(H)]
                del H
            del hessians, by_id
        seq_len = ctx.streamer.batches[0].hidden.shape[1]
        measurement: dict[str, list[dict[str, Any]]] = {}
        t0 = time.time()
        for slot, members in slots.items():
            probe = attention_probe(arch) if slot == "self_attn" else None
            ref: dict[int, torch.Tensor] = {}
            _run_probe(ctx, probe, lambda b, y: ref.__setitem__(b, y.detach().clone()))
            # each distinct (linear, option) is quantized once and kept (as fp16: its values are
            # fp16-exact) only until the last option row that uses it
            rows = SLOT_OPTIONS[slot]
            last_use = {(lin, row[role].desc): j for j, row in enumerate(rows) for lin, role in members}
            cache: dict[tuple[str, str], torch.Tensor] = {}
            entries = []
            for j, row in enumerate(rows):
                entry: dict[str, Any] = {"accuracy": 0.0, "total_bits": 0}
                for lin, role in members:
                    qp = row[role]
                    key = (lin, qp.desc)
                    if key not in cache:
                        if prepared[lin] is None:
                            r = exl2_rtn(originals[lin], qp, name=ctx.prefix + lin)
                        else:
                            r = exl2_quantize(originals[lin], qp, prepared=prepared[lin], name=ctx.prefix + lin)
                        cache[key] = r.W_hat.to(torch.float16)
                    ctx.set_weight(lin, cache[key].float())
                    N, K = originals[lin].shape
                    entry["total_bits"] += exllamav2_total_bits(qp, K, N, bias=arch.has_bias(lin, cfg))
                    entry[option_key(slot, lin, role)] = qp.to_dict()
                errs: list[float] = []
                _run_probe(ctx, probe, lambda b, y: errs.extend(output_rel_error(ref[b], y, seq_len)))
                entry["accuracy"] = max(1e-6, 1.0 - sum(errs) / len(errs))
                entries.append(entry)
                for key in [k for k, last in last_use.items() if last == j]:
                    cache.pop(key, None)
            for lin, _ in members:
                ctx.set_weight(lin, originals[lin])
            measurement[ctx.prefix + slot] = entries
            del ref, cache
        metrics: dict[str, Any] = {"measurement": measurement, "measure_seconds": round(time.time() - t0, 3)}
        if coverage is not None:
            metrics["moe"] = coverage
        return LayerResult({}, metrics)


def _hessian_or_eye(H: torch.Tensor, K: int, ctx: LayerContext) -> torch.Tensor:
    """``H``, or the identity when no signal reached these inputs (all-zero diagonal)."""
    return H if bool((torch.diagonal(H) > 0).any()) else torch.eye(K, device=H.device)


class Exl2QuantMethod:
    """Quantizes each linear with its planned :class:`QParams`; ``plan[layer][linear]``.

    A sparse layer's routed experts are solved in the one layer loop (``ctx.sequential``'s experts
    callback, executor/moe.py): each expert's gate/up on the Hessian of the tokens routed to it,
    then its down on its hidden state through the quantized gate/up, with the ``--moe-*`` rules
    (an expert under ``--moe-min-tokens``: the all-token Hessian, or RTN on the EXL2 grid)."""

    name = "exl2"
    solves_experts = True  # sparse layers: ctx.sequential hands each expert's linears to ``quantize``

    def __init__(self, plan: dict[int, dict[str, QParams]], head: QParams | None = None, damp: float = EXL2_DAMP,
                 moe=None):
        from ..executor.moe import MoEOptions

        self.plan = plan
        self.head = head
        self.damp = damp
        self.moe = moe or MoEOptions()

    def process_layer(self, ctx: LayerContext) -> LayerResult:
        plan = self.plan[ctx.index]
        results: dict[str, Exl2Result] = {}
        m: dict[str, Any] = {"rel_error": {}, "rtn_rel_error": {}, "damp_used": {}, "healed": {}, "options": {}}
        totals = {"bits": 0, "weights": 0}
        groups = {g[0]: g for g in ctx.groups}
        accs = {first: HessianAccumulator() for first in groups}

        def quantize(names: list[str], H: torch.Tensor | None) -> None:
            """The linears ``names`` sharing the input Hessian ``H`` (None: no calibration signal,
            RTN on the EXL2 grid in the inputs' own order)."""
            if H is not None and not torch.isfinite(H).all():
                raise_nonfinite(ctx, names[0])
            if H is not None and not bool((torch.diagonal(H) > 0).any()):
                H = None
            prepared = None if H is None else prepare_exl2_hessian(H, self.damp, name=f"{ctx.prefix}{names[0]} Hessian")
            for name in names:
                W = ctx.weight(name)
                if prepared is None:
                    r = exl2_rtn(W, plan[name], name=ctx.prefix + name)
                else:
                    r = exl2_quantize(W, plan[name], prepared=prepared, name=ctx.prefix + name)
                if not torch.isfinite(r.W_hat).all():
                    raise_nonfinite(ctx, name)
                ctx.set_weight(name, r.W_hat)
                results[name] = r
                if H is not None:  # RTN: same regions and storage order, no error feedback
                    rtn = exl2_rtn(W, plan[name], r.perm, name=ctx.prefix + name).W_hat
                    errs = relative_errors(W, H, exl2=r.W_hat, rtn=rtn)
                    m["rel_error"][name], m["rtn_rel_error"][name] = errs["exl2"], errs["rtn"]
                m["damp_used"][name] = r.damp_used
                m["healed"][name] = bool(prepared is not None and r.damp_used > self.damp * (1 + 1e-9))
                m["options"][name] = plan[name].desc
                totals["bits"] += r.storage_bits()
                totals["weights"] += W.numel()

        def solve(first: str) -> None:
            acc = accs.pop(first)
            quantize(groups[first], acc.H if acc.n else None)

        ctx.sequential(list(groups), lambda first, x: accs[first].add(x), solve,
                       experts=lambda jobs: [quantize(names, H) for names, H in jobs], moe=self.moe)
        m["storage_bits"] = totals["bits"]
        m["quantized_weights"] = totals["weights"]
        return LayerResult(results, m)

    def process_head(self, streamer: LayerStreamer) -> LayerResult:
        """lm_head on the final-norm outputs of the (quantized) model, after the last layer."""
        if self.head is None:
            return LayerResult({}, {})
        arch = streamer.arch
        W = streamer.reader.get(arch.lm_head_path + ".weight").float().to(streamer.cfg.device)
        H = streamer.head_hessian()
        if H is None:
            H = torch.eye(W.shape[1], device=W.device)
        r = exl2_quantize(W, self.head, H, damp=self.damp, name=arch.lm_head_path)
        ref = weighted_error(W, torch.zeros_like(W), H)
        metrics = {"rel_error": weighted_error(W, r.W_hat, H) / ref if ref > 0 else 0.0, "option": self.head.desc,
                   "storage_bits": r.storage_bits(), "weights": W.numel(), "bpw": r.storage_bits() / W.numel()}
        return LayerResult({arch.lm_head_path: r}, metrics)


# -- the measurement pass ------------------------------------------------------------------------


def run_measurement(*, model_dir: Path, reader, arch, input_ids: torch.Tensor, exec_cfg: ExecConfig,
                    work_dir: Path, run_id: str, damp: float = EXL2_DAMP, moe=None) -> dict[str, Any]:
    """Stream every layer once through :class:`Exl2MeasureMethod`; return the measurement entries.
    ``moe``: the ``--moe-*`` rules for the experts' Hessians (executor/moe.MoEOptions).

    ``work_dir`` holds a resume point after every layer (reference hidden states + entries so far);
    a rerun with the same ``run_id`` continues there. It is removed when the pass completes.
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    point = ResumePoint(work_dir, run_id)
    loaded = point.load()
    streamer = LayerStreamer(Path(model_dir), reader, arch, exec_cfg)
    streamer.capture(input_ids)
    start, entries = 0, {}
    if loaded is not None:
        state, hidden, _ = loaded
        start, entries = state["next_layer"], state["measurement"]
        streamer.set_hidden_states(hidden)
        log.info(f"resuming the measurement at layer {start}")
    streamer.apply_host_heap()
    method = Exl2MeasureMethod(damp, moe)
    n = streamer.num_layers
    with frozen_gc():
        for i in log.progress(range(start, n), total=n - start, desc="exl2 measure"):
            t0 = time.time()
            ctx = LayerContext(streamer, i, streamer.load_layer(i))
            res = method.process_layer(ctx)
            streamer.run_layer(i, propagate=True)  # reference weights: the next layer sees reference inputs
            streamer.release_layer(i)
            entries.update(res.metrics["measurement"])
            log.event("measure_layer", f"measure layer {i}: {time.time() - t0:.2f}s ({ctx.forward_passes + 1} passes)",
                      layer=i, seconds=round(time.time() - t0, 3))
            point.save(i + 1, streamer.hidden_states(), measurement=entries)
    want = sum(len(layer_slots(arch, reader.config, i)) for i in range(n))
    if len(entries) != want:
        raise RuntimeFault(f"measurement covers {len(entries)} slots, expected {want}")
    shutil.rmtree(work_dir, ignore_errors=True)
    return entries
