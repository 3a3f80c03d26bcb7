"""What a method sees of one decoder layer: its modules, and statistics collected through hooks.

A method (GPTQ, AWQ, EXL2, RTN) implements ``process_layer(ctx) -> LayerResult``; it asks the
context for activation statistics of named linears and puts dequantized weights back with
``set_weight``. It never touches devices, batches or other layers.
"""

from __future__ import annotations

import dataclasses
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol

import torch
from torch import nn

from ..methods.hessian import HessianAccumulator
from .loop import LayerStreamer, _replace_hidden


@dataclass
class LayerResult:
    results: dict[str, Any]  # linear name (relative to the layer) -> method result (e.g. QuantResult)
    metrics: dict[str, Any] = field(default_factory=dict)
    # relative tensor name -> value written instead of the checkpoint's (e.g. a norm weight with AWQ
    # scales folded in); the stage casts it to the checkpoint tensor's dtype
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


class LayerMethod(Protocol):
    name: str

    def process_layer(self, ctx: "LayerContext") -> LayerResult: ...


class LayerContext:
    def __init__(self, streamer: LayerStreamer, index: int, layer: nn.Module):
        self.streamer = streamer
        self.index = index
        self.layer = layer
        self.arch = streamer.arch
        self.config = streamer.config
        self.device = streamer.cfg.device
        self.forward_passes = 0
        self.propagated = False  # the layer's outputs were already stored as the next layer's inputs
        # this layer's sequential groups (relative names, execution order); in a sparse layer the
        # experts module is one group (``experts_module``), its linears named per expert as on disk
        self.groups: list[list[str]] = self.arch.layer_groups(streamer.reader.config, index)
        self.experts_module: str | None = (self.arch.moe.experts.module
                                           if self.arch.is_sparse_layer(streamer.reader.config, index) else None)
        self.extra_metrics: dict[str, Any] = {}  # the context's own (MoE coverage), beside the method's
        self._expert_inputs: list[tuple[torch.Tensor, torch.Tensor]] = []

    @property
    def prefix(self) -> str:
        return self.arch.layer_prefix(self.index)

    def module(self, name: str) -> nn.Module:
        return self.layer.get_submodule(name)

    def _expert_view(self, name: str) -> torch.Tensor | None:
        """For an expert's linear (``mlp.experts.3.up_proj``): its ``[out, in]`` view of the experts
        module's 3D parameter (the table's layout: ``executor/moe.expert_view``), else None."""
        slot = self.arch.expert_slot(name) if self.experts_module else None
        if slot is None:
            return None
        from .moe import expert_view

        ex = self.arch.moe.experts
        return expert_view(self.module(ex.module), ex, *slot)

    def weight(self, name: str) -> torch.Tensor:
        """fp32 copy of a linear's weight as currently in place (an expert's: its slice)."""
        view = self._expert_view(name)
        if view is not None:
            return view.float().clone()
        return self.module(name).weight.detach().float().clone()

    def set_weight(self, name: str, W: torch.Tensor) -> None:
        target = self._expert_view(name)
        if target is not None:
            target.copy_(W.to(device=target.device, dtype=target.dtype).reshape(target.shape))
            return
        mod = self.module(name)
        mod.weight.data = W.to(device=mod.weight.device, dtype=mod.weight.dtype).reshape(mod.weight.shape)

    def place(self, name: str, r: Any) -> Any:
        """``set_weight(name, r.W_hat)``; returns ``r`` as the layer's results should keep it. A dense
        linear's weight already is ``W_hat`` (same dtype and device) or a cast of it, so ``r`` is kept
        as is. An expert's weight is copied into the experts module's 3D parameter, so its result
        moves to where that parameter lives (host memory with ``--expert-chunk``: a layer's results
        live until it is written, and on the device every expert's would add up to several times the
        chunk the device holds) and takes the placed slice as its ``W_hat`` where that holds the
        same values (same dtype), instead of keeping a second copy of every expert's weight."""
        self.set_weight(name, r.W_hat)
        placed = self._expert_view(name)
        if placed is None:
            return r
        moved = {f.name: getattr(r, f.name).to(placed.device) for f in dataclasses.fields(r)
                 if f.name != "W_hat" and isinstance(getattr(r, f.name), torch.Tensor)}
        W_hat = placed if placed.dtype == r.W_hat.dtype else r.W_hat.to(placed.device)
        return dataclasses.replace(r, W_hat=W_hat, **moved)

    def observe(self, names: list[str], fn: Callable[[str, torch.Tensor], None]) -> None:
        """One pass over the calibration batches calling ``fn(name, x)`` with each named module's
        input, flattened to [tokens, in_features]; the forward stops after the last module needed."""
        with self._feeding(names, fn):
            last = max(names, key=self._execution_rank)
            self.streamer.run_layer(self.index, propagate=False, stop_hook=self.module(last))
            self.forward_passes += 1

    @contextmanager
    def _feeding(self, names: list[str], fn: Callable[[str, torch.Tensor], None]) -> Iterator[None]:
        """Inside the block, each named module's input goes to ``fn(name, x [tokens, in_features])``;
        the experts module's inputs (tokens and their routing) are kept by the context instead."""
        handles = []
        for name in names:
            if name == self.experts_module and self.arch.moe.experts.score_on_input:
                handles += self._keep_scored_inputs()
                continue
            if name == self.experts_module:
                def keep(_mod, args, kwargs):
                    x = args[0] if args else kwargs["hidden_states"]
                    idx = args[1] if len(args) > 1 else kwargs["top_k_index"]
                    x = x.reshape(-1, x.shape[-1])
                    self._expert_inputs.append((x, idx.reshape(x.shape[0], -1)))
                handles.append(self.module(name).register_forward_pre_hook(keep, with_kwargs=True))
                continue

            def hook(_mod, args, _name=name):
                x = args[0]
                fn(_name, x.reshape(-1, x.shape[-1]))
            handles.append(self.module(name).register_forward_pre_hook(hook))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _keep_scored_inputs(self) -> list:
        """Hooks keeping, per batch, every expert's scaled copy of the tokens ``[E, T, H]`` and the
        routing ``[T, k]`` (the router's top-k logits) for experts whose input carries the score
        (``Experts.score_on_input``, Llama-4): an expert's rows are its copies of its routed tokens."""
        ex, cfg = self.arch.moe.experts, self.streamer.reader.config
        E, k = self.arch.num_experts(cfg), self.arch.experts_per_token(cfg)
        pending: dict[int, torch.Tensor] = {}  # per thread (lock-step batches run in workers)

        def route(_mod, _args, output):
            pending[threading.get_ident()] = torch.topk(output[1], k, dim=-1).indices

        def keep(_mod, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            x = x.reshape(E, -1, x.shape[-1])
            self._expert_inputs.append((x, pending.pop(threading.get_ident()).reshape(x.shape[1], -1)))
        return [self.module(ex.router).register_forward_hook(route),
                self.module(ex.module).register_forward_pre_hook(keep, with_kwargs=True)]

    def sequential(self, names: list[str], collect: Callable[[str, torch.Tensor], None],
                   solve: Callable[[str], None], *,
                   experts: Callable[[list[tuple[list[str], torch.Tensor | None]]], None] | None = None,
                   moe=None) -> None:
        """True-sequential statistics and solving over the modules ``names`` (execution order).

        For each name: ``collect(name, x)`` sees every batch's input to it ([tokens, in_features]),
        then ``solve(name)`` runs -- and may replace weights -- before any batch goes past it, so
        later modules see the outputs of the ones already solved. With the streamer's lock-step
        mode this is ONE forward per batch, and the layer's outputs are propagated on the way
        (``propagated``); otherwise one stopped pass per name. The results are identical.

        In a sparse layer ``names`` holds the experts module: its tokens and their routing are kept
        here, and the experts are solved a batch of experts at a time (``executor/moe.py``, options
        ``moe``), calling ``experts([(linear names, Hessian or None), ...])`` with one entry per
        expert for a group of its linears that share an input (gate+up, or down; None: too few
        tokens, the declared RTN fallback); the entries of one call are independent.
        """
        names = sorted(names, key=self._execution_rank)
        if self.experts_module in names:
            if experts is None:
                from ..errors import InputError

                raise InputError(f"layer {self.index} holds Mixture-of-Experts experts, which this method cannot solve")
            solve = self._with_experts(solve, experts, moe)
        if not self.streamer.lockstep_fits():
            for name in names:
                self.observe([name], collect)
                solve(name)
            return
        with self._feeding(names, collect):
            self.streamer.run_layer_lockstep(self.index, [self.module(n) for n in names], lambda k: solve(names[k]))
        self.forward_passes += 1
        self.propagated = True

    @contextmanager
    def recording_calls(self, name: str, max_tokens: int | None = None) -> Iterator[list[tuple[tuple, dict[str, Any]]]]:
        """Record the positional and keyword arguments of each call of module ``name`` (its input
        plus, for attention, masks and rotary embeddings: one call per batch) during the passes run
        inside the block (``observe``, ``inputs``, ...), so a method can re-run the module with
        other weights. With ``max_tokens``, recording stops once that many tokens were recorded."""
        calls: list[tuple[tuple, dict[str, Any]]] = []
        seen = 0

        def hook(_mod, args, kwargs):
            nonlocal seen
            if max_tokens is not None and seen >= max_tokens:
                return
            x = args[0] if args else kwargs["hidden_states"]
            seen += x.shape[:-1].numel()
            calls.append((tuple(args), dict(kwargs)))

        handle = self.module(name).register_forward_pre_hook(hook, with_kwargs=True)
        try:
            yield calls
        finally:
            handle.remove()

    def layer_calls(self) -> list[tuple[tuple, dict[str, Any]]]:
        """The arguments of this decoder layer's call for every calibration batch, on the stored
        hidden states (the layer's inputs until they are propagated), to re-run the whole layer."""
        return [_replace_hidden(b.args[self.index], b.kwargs[self.index], b.hidden.to(self.device))
                for b in self.streamer.batches]

    def fp_layer_calls(self) -> list[tuple[tuple, dict[str, Any]]]:
        """``layer_calls`` on the UNQUANTIZED model's hidden states at this layer (the fp stream a
        method keeps with ``set_fp_outputs``; the stored hidden states where none is kept yet: the
        two streams are equal until a layer is quantized)."""
        return [_replace_hidden(b.args[self.index], b.kwargs[self.index],
                                (b.hidden if b.fp_hidden is None else b.fp_hidden).to(self.device))
                for b in self.streamer.batches]

    def set_fp_outputs(self, outputs: list[torch.Tensor]) -> None:
        """Advance the fp stream: ``outputs`` are this layer's unquantized outputs on ``fp_layer_calls``
        (the next layer's fp inputs; kept like the hidden states, and in the resume point)."""
        for b, o in zip(self.streamer.batches, outputs, strict=True):
            b.fp_hidden = self.streamer._park(o.to(self.streamer.cfg.dtype))

    def stored_hidden(self) -> list[torch.Tensor]:
        """The stored hidden states (before any propagation: this layer's inputs), for ``restore_inputs``."""
        return [b.hidden for b in self.streamer.batches]

    def restore_inputs(self, hidden: list[torch.Tensor]) -> None:
        """Put back this layer's inputs (``stored_hidden`` taken before ``sequential``) and mark the
        outputs as not propagated: the stage then propagates through the weights now in place."""
        for b, h in zip(self.streamer.batches, hidden, strict=True):
            b.hidden = h
        self.propagated = False

    def expert_inputs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """One pass (stopped at the experts module of this sparse layer): per calibration batch, the
        tokens reaching the experts ``[T, hidden]`` and their routing ``top_k_index [T, k]``, with
        the weights now in place (a method's own per-expert statistics, e.g. AWQ's)."""
        self._expert_inputs = []
        self.observe([self.experts_module], lambda *_: None)
        out, self._expert_inputs = self._expert_inputs, []
        return out

    def hessian(self, name: str) -> HessianAccumulator:
        """The input Hessian (2/n X^T X, fp32) of a linear, shared by the linears of its group."""
        acc = HessianAccumulator()
        self.observe([name], lambda _n, x: acc.add(x))
        return acc

    def inputs(self, names: list[str], dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """The full input activations of the named modules ([tokens, in_features])."""
        chunks: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        self.observe(names, lambda n, x: chunks[n].append(x.to(dtype)))
        return {n: torch.cat(c) for n, c in chunks.items()}

    def _with_experts(self, solve: Callable[[str], None], experts, moe) -> Callable[[str], None]:
        from .moe import MoEOptions, solve_experts

        def wrapped(name: str) -> None:
            if name != self.experts_module:
                return solve(name)
            inputs, self._expert_inputs = self._expert_inputs, []
            self.extra_metrics["moe"] = solve_experts(self, inputs, experts, moe or MoEOptions())
        return wrapped

    def _execution_rank(self, name: str) -> int:
        order = [n for group in self.groups for n in group]
        return order.index(name) if name in order else len(order)
