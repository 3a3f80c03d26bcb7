"""What the serving engine does to the inputs of a W8A8 checkpoint's linears, applied to our
read-back of one decoder layer (eval and `quantize check` run the quantized model as it is served).

The format says what happens to one linear's input (``input_quantizer(reader, prefix)``: FP8 per
token, or FP8 with the stored per-tensor scale). A layer's dense linears (attention, a dense MLP,
shared experts) get it as a forward pre-hook. The routed experts of a sparse layer are no Linear
modules in transformers 5 (one module holding fused 3D parameters), so for the duration their
forward is the layer loop's per-expert one (``executor/moe.chunked_experts_forward``) with what
vLLM's fused-MoE does to each expert's inputs: its tokens quantized with its gate/up rule, then
its down input ``act(x Wg) * (x Wu)`` with its down rule.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..executor.moe import chunked_experts_forward

Quantizer = Callable[[torch.Tensor], torch.Tensor]


@contextmanager
def quantized_inputs(layer: nn.Module, i: int, arch, config: dict[str, Any],
                     quantizer: Callable[[Any, str], Quantizer], reader, device: str = "cpu",
                     expert_chunk: int | None = None) -> Iterator[None]:
    """Inside the block, decoder layer ``i`` (``layer``) runs with every quantized linear's input
    as the engine quantizes it; ``quantizer(reader, linear prefix)`` gives each one's rule. The
    experts run ``expert_chunk`` at a time on ``device`` (all of them: None), as the layer loop's."""
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
            E = arch.num_experts(config)
            # gate and up read one input: the gate's rule serves both (vLLM loads one scale for the pair)
            rules = {(e, j): quantizer(reader, prefix + arch.expert_linear(e, j)) for e in range(E) for j in (0, 2)}
            module.forward = chunked_experts_forward(module, arch.moe.experts, expert_chunk or E, device,
                                                     inputs=lambda e, j, x: rules[e, j](x))
        yield
    finally:
        for h in handles:
            h.remove()
        if module is not None:
            if saved is None:
                vars(module).pop("forward", None)
            else:
                module.forward = saved

