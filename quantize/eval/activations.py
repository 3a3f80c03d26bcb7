"""What the serving engine does to the inputs of a W8A8 checkpoint's linears, applied to our
read-back of one decoder layer (eval and `quantize check` run the quantized model as it is served).

The format says what happens to one linear's input (``input_quantizer(reader, prefix)``: FP8 per
token, or FP8 with the stored per-tensor scale). A layer's dense linears (attention, a dense MLP,
shared experts) get it as a forward pre-hook. The routed experts of a sparse layer are no Linear
modules in transformers 5 (one module holding fused 3D parameters), so for the duration their
forward is replaced by the computation vLLM's fused-MoE runs: per expert, its tokens quantized
with its gate/up quantizer, then ``act(x Wg) * (x Wu)`` quantized with its down quantizer before
the down projection, times the routing weight, summed over each token's experts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

Quantizer = Callable[[torch.Tensor], torch.Tensor]


@contextmanager
def quantized_inputs(layer: nn.Module, i: int, arch, config: dict[str, Any],
                     quantizer: Callable[[Any, str], Quantizer], reader) -> Iterator[None]:
    """Inside the block, decoder layer ``i`` (``layer``) runs with every quantized linear's input
    as the engine quantizes it; ``quantizer(reader, linear prefix)`` gives each one's rule."""
    prefix = arch.layer_prefix(i)
    experts = arch.moe.experts.module if arch.is_sparse_layer(config, i) else None
    handles = []
    module, saved = None, None
    try:
        for group in arch.layer_groups(config, i):
            for name in group:
                if name == experts:
                    continue
                q = quantizer(reader, prefix + name)
                handles.append(layer.get_submodule(name).register_forward_pre_hook(
                    lambda _m, args, q=q: (q(args[0]), *args[1:])))
        if experts is not None:
            module = layer.get_submodule(experts)
            saved = vars(module).get("forward")  # the --expert-chunk forward, when installed
            rules = [(quantizer(reader, prefix + arch.expert_linear(e, 0)), quantizer(reader, prefix + arch.expert_linear(e, 2)))
                     for e in range(arch.num_experts(config))]
            module.forward = _experts_forward(module, arch.moe.experts.fused, rules)
        yield
    finally:
        for h in handles:
            h.remove()
        if module is not None:
            if saved is None:
                vars(module).pop("forward", None)
            else:
                module.forward = saved


def _experts_forward(module: nn.Module, fused: tuple[str, str], rules: list[tuple[Quantizer, Quantizer]]):
    """The experts' forward with each expert's inputs quantized (``rules[e]``: gate/up input, down
    input), one expert's weights at a time on the tokens' device (host-resident with --expert-chunk).
    Gate and up share one input, so the gate's rule serves both (vLLM loads one scale for the pair)."""

    def forward(hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        gate_up, down = getattr(module, fused[0]), getattr(module, fused[1])
        out = torch.zeros_like(hidden_states)
        with torch.no_grad():
            for e, (q_in, q_down) in enumerate(rules):
                token, pos = torch.where(top_k_index == e)
                if token.numel() == 0:
                    continue
                x = q_in(hidden_states[token])
                g, u = F.linear(x, gate_up[e].to(device=x.device, dtype=x.dtype)).chunk(2, dim=-1)
                h = F.linear(q_down(module.act_fn(g) * u), down[e].to(device=x.device, dtype=x.dtype))
                out.index_add_(0, token, (h * top_k_weights[token, pos, None]).to(out.dtype))
        return out

    return forward
