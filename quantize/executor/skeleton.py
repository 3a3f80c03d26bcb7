"""A transformers model whose parameters live on the meta device, filled one module at a time.

The model object gives us the architecture's own forward (masks, rotary embeddings, per-layer
attention types) without holding any weights: parameters are created on ``meta`` (buffers such as
rotary ``inv_freq`` stay real, they are tiny) and a module is materialized from the safetensors
shards only while the layer loop needs it.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from ..errors import InputError


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Construct modules with every parameter moved to ``meta`` as soon as it is registered.

    ``torch.empty`` allocations made by the constructors are never touched before the move, so no
    host memory is committed; buffers are left alone (they are small and often computed, e.g. RoPE).
    """
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=False)

    nn.Module.register_parameter = register  # scoped: restored below
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def load_config(model_dir: Path):
    from transformers import AutoConfig

    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise InputError(f"{path}: missing; a model directory needs config.json")
    try:
        return AutoConfig.from_pretrained(str(model_dir), trust_remote_code=False)
    except (ValueError, KeyError, json.JSONDecodeError, OSError) as e:
        raise InputError(f"{path}: cannot be read by transformers ({' '.join(str(e).split())[:200]})") from None


def build_skeleton(config, attn_implementation: str = "sdpa") -> nn.Module:
    """The causal-LM module tree with meta parameters, in eval mode."""
    from transformers import AutoModelForCausalLM

    with parameters_on_meta():
        try:
            model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
        except ValueError:  # e.g. Gemma-2 has no SDPA path (soft-capped attention): eager is exact
            model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    model.eval()
    model.requires_grad_(False)
    return model


def materialize(module: nn.Module, prefix: str, reader, *, device: str, dtype: torch.dtype,
                aliases: dict[str, str] | None = None, host: frozenset[str] = frozenset()) -> None:
    """Load every parameter of ``module`` (named ``prefix + local name`` in the checkpoint).

    ``aliases`` maps a checkpoint name that may be absent to the one to use instead (tied lm_head).
    Floating tensors are cast to ``dtype``; buffers are moved to ``device``. Parameters named in
    ``host`` (local names) stay in host memory (experts streamed to the device in chunks).
    """
    aliases = aliases or {}
    for local, param in list(module.named_parameters(recurse=True)):
        name = prefix + local
        if name not in reader and name in aliases:
            name = aliases[name]
        if name not in reader:
            raise InputError(f"{reader.path}: tensor {name!r} is missing from the checkpoint")
        if tuple(reader.shape(name)) != tuple(param.shape):
            raise InputError(
                f"{reader.path}: tensor {name!r} has shape {tuple(reader.shape(name))}, "
                f"config.json implies {tuple(param.shape)}; the weights do not match config.json"
            )
        t = reader.get(name)
        t = t.to(device="cpu" if local in host else device, dtype=dtype if t.is_floating_point() else t.dtype)
        _set_parameter(module, local, t)
    for local, buf in list(module.named_buffers(recurse=True)):
        owner, leaf = _owner(module, local)
        if prefix + local in reader and leaf not in owner._non_persistent_buffers_set:
            # a persistent buffer the checkpoint carries (DeepSeek's e_score_correction_bias)
            owner._buffers[leaf] = reader.get(prefix + local).to(device=device, dtype=buf.dtype)
        elif buf.device != torch.device(device):
            owner._buffers[leaf] = buf.to(device)


class MemoryView:
    """A checkpoint reader seen through transformers' in-memory names (Mixture-of-Experts).

    transformers 5.x holds a sparse layer's experts as 3D parameters (``mlp.experts.gate_up_proj``
    [E, 2I, H], ``mlp.experts.down_proj`` [E, H, I]; GPT-OSS transposed and interleaved, as the
    table's ``Experts`` says) and may rename modules (Mixtral's ``block_sparse_moe`` is ``mlp``);
    checkpoints keep per-expert 2D linears (and so do our outputs of GPT-OSS, whose source holds
    the 3D parameters: those pass through). ``get`` assembles a fused parameter from its experts'
    tensors (``Arch.moe``), everything else passes through. Quacks like the reader for
    ``materialize`` and the prefetcher."""

    def __init__(self, reader, arch):
        self.reader = reader
        self.arch = arch
        self.path = reader.path

    def _resolve(self, name: str):
        """``(kind, data)``: ("plain", disk name) or ("fused", (layer prefix, j)), or None."""
        if name in self.reader:
            return "plain", name
        i = self.arch.layer_index(name)
        if i is None:
            return None
        prefix = self.arch.layer_prefix(i)
        rel = name[len(prefix):]
        ex = self.arch.moe.experts
        for j, fused in enumerate(ex.fused):
            if rel == f"{ex.module}.{fused}":
                return "fused", (prefix, j)
        disk = prefix + self.arch.disk_name(rel)
        return ("plain", disk) if disk in self.reader else None

    def _parts(self, prefix: str, j: int) -> list[list[str]]:
        """Per expert, the disk tensors stacked into fused parameter ``j`` (gate + up rows, or down)."""
        E = self.arch.num_experts(self.reader.config)
        lin = [0, 1] if j == 0 else [2]
        return [[f"{prefix}{self.arch.expert_linear(e, k)}.weight" for k in lin] for e in range(E)]

    def __contains__(self, name: object) -> bool:
        r = self._resolve(str(name))
        if r is None:
            return False
        if r[0] == "fused":
            return all(n in self.reader for part in self._parts(*r[1]) for n in part)
        return True

    def shape(self, name: str) -> tuple[int, ...]:
        kind, data = self._resolve(name)
        if kind == "plain":
            return tuple(self.reader.shape(data))
        parts = self._parts(*data)
        first = [self.reader.shape(n) for n in parts[0]]
        rows, cols = sum(s[0] for s in first), first[0][1]
        return (len(parts), cols, rows) if self.arch.moe.experts.transposed else (len(parts), rows, cols)

    def nbytes(self, name: str) -> int:
        kind, data = self._resolve(name)
        if kind == "plain":
            return self.reader.nbytes(data)
        return sum(self.reader.nbytes(n) for part in self._parts(*data) for n in part)

    def dtype(self, name: str) -> torch.dtype:
        kind, data = self._resolve(name)
        return self.reader.dtype(data if kind == "plain" else self._parts(*data)[0][0])

    def get(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor; ``out``: a byte buffer of ``nbytes(name)`` to fill (the prefetcher's)."""
        kind, data = self._resolve(name)
        if kind == "plain":
            return self.reader.get(data) if out is None else self.reader.get(data, out=out)
        parts = self._parts(*data)
        shape, dtype = self.shape(name), self.dtype(name)
        full = (torch.empty(shape, dtype=dtype) if out is None
                else out[:self.nbytes(name)].view(dtype).view(shape))
        from .moe import linear_view

        ex, j0 = self.arch.moe.experts, 0 if data[1] == 0 else 2
        for e, names in enumerate(parts):
            for j, n in enumerate(names, start=j0):  # one expert's gate and up (or its down), in ex's layout
                linear_view(ex, full[e], j).copy_(self.reader.get(n))
        return full

    def __getattr__(self, attr: str):  # config, names, dtype, ...: the reader's
        return getattr(self.reader, attr)


def release(module: nn.Module) -> None:
    """Drop the weights of ``module`` (back to meta) so its memory is freed."""
    for local, param in list(module.named_parameters(recurse=True)):
        _set_parameter(module, local, torch.empty(param.shape, dtype=param.dtype, device="meta"))


def _owner(module: nn.Module, dotted: str) -> tuple[nn.Module, str]:
    *path, leaf = dotted.split(".")
    for p in path:
        module = getattr(module, p)
    return module, leaf


def _set_parameter(module: nn.Module, dotted: str, tensor: torch.Tensor) -> None:
    owner, leaf = _owner(module, dotted)
    owner._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)


def get_submodule(model: nn.Module, path: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise InputError(f"model has no module {path!r}; the architecture table does not match this model") from None
