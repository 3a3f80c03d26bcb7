"""What a method sees of one decoder layer: its modules, and statistics collected through hooks.

A method (GPTQ, AWQ, EXL2, RTN) implements ``process_layer(ctx) -> LayerResult``; it asks the
context for activation statistics of named linears and puts dequantized weights back with
``set_weight``. It never touches devices, batches or other layers.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol

import torch
from torch import nn

from ..methods.hessian import HessianAccumulator
from .loop import LayerStreamer


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

    @property
    def prefix(self) -> str:
        return self.arch.layer_prefix(self.index)

    def module(self, name: str) -> nn.Module:
        return self.layer.get_submodule(name)

    def weight(self, name: str) -> torch.Tensor:
        """fp32 copy of a linear's weight as currently in place."""
        return self.module(name).weight.detach().float().clone()

    def set_weight(self, name: str, W: torch.Tensor) -> None:
        mod = self.module(name)
        mod.weight.data = W.to(device=mod.weight.device, dtype=mod.weight.dtype).reshape(mod.weight.shape)

    def observe(self, names: list[str], fn: Callable[[str, torch.Tensor], None]) -> None:
        """One pass over the calibration batches calling ``fn(name, x)`` with each named module's
        input, flattened to [tokens, in_features]; the forward stops after the last module needed."""
        with self._feeding(names, fn):
            last = max(names, key=self._execution_rank)
            self.streamer.run_layer(self.index, propagate=False, stop_hook=self.module(last))
            self.forward_passes += 1

    @contextmanager
    def _feeding(self, names: list[str], fn: Callable[[str, torch.Tensor], None]) -> Iterator[None]:
        """Inside the block, each named module's input goes to ``fn(name, x [tokens, in_features])``."""
        handles = []
        for name in names:
            def hook(_mod, args, _name=name):
                x = args[0]
                fn(_name, x.reshape(-1, x.shape[-1]))
            handles.append(self.module(name).register_forward_pre_hook(hook))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def sequential(self, names: list[str], collect: Callable[[str, torch.Tensor], None],
                   solve: Callable[[str], None]) -> None:
        """True-sequential statistics and solving over the modules ``names`` (execution order).

        For each name: ``collect(name, x)`` sees every batch's input to it ([tokens, in_features]),
        then ``solve(name)`` runs -- and may replace weights -- before any batch goes past it, so
        later modules see the outputs of the ones already solved. With the streamer's lock-step
        mode this is ONE forward per batch, and the layer's outputs are propagated on the way
        (``propagated``); otherwise one stopped pass per name. The results are identical.
        """
        names = sorted(names, key=self._execution_rank)
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

    def _execution_rank(self, name: str) -> int:
        order = self.arch.linear_names()
        return order.index(name) if name in order else len(order)
