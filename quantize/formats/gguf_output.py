"""GGUF as an output format of the layer loop: per-layer parts hold each linear's block bytes, and
``compile`` streams them into ``model.gguf`` (gguf-py's writer through ``formats/gguf.py``: tensor
infos first, then data one tensor at a time).

Part tensor names: ``<hf linear prefix>.gguf_<TYPE>`` (uint8 ``[N, bytes per row]``, rows in the
checkpoint's order: the writer permutes llama's q/k rows); biases and norms as dense tensors. The
embedding and an untied head are quantized at compile time by llama.cpp's reference rounding (the
type llama.cpp's mix gives them), a bounded number of rows at a time.

DeepSeek-V3's ``kv_b_proj`` is two GGUF tensors (``quantize.formats.gguf.split_kv_b``): its part
entries are ``...self_attn.kv_b_proj.k_b.gguf_<TYPE>`` and ``....v_b.gguf_<TYPE>`` (rows: k_b's
``[H*kv_lora, nope]``, v_b's ``[H*v, kv_lora]``), compiled into the 3D ``blk.N.attn_k_b`` /
``blk.N.attn_v_b``.

Mixture-of-Experts: the parts hold each routed expert's linears as 2D results under their on-disk
names (``mlp.experts.5.up_proj.gguf_Q4_K``); compile stacks one layer's experts of one projection
into the 3D ``blk.N.ffn_{gate,up,down}_exps`` (rows of expert 0, then expert 1, ...: the byte layout
of a GGUF ``[E, rows, cols]`` tensor), reading them from that layer's part only when the tensor is
written, so host memory holds one stacked projection of one layer at a time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import safe_open

from ..errors import InputError
from .gguf_mix import ModelShape, tensor_type

PART_PREFIX = "gguf_"
_ROWS_PER_CHUNK = 4096


class GGUFFormat:
    name = "gguf"
    suffixes: tuple[str, ...] = ()  # read back by GGUFCheckpoint, not through DequantReader

    def __init__(self, ftype: str, shape: ModelShape, model_dir: Path):
        self.ftype = ftype
        self.shape = shape
        self.model_dir = Path(model_dir)
        self.tensor_types: dict[str, str] = {}  # GGUF name -> type, filled by compile

    def preflight(self, arch, config: Mapping[str, Any]) -> None:
        """Family, tokenizer and metadata llama.cpp needs, before any heavy work (InputError)."""
        from . import gguf as container

        container.check_representable(config)
        container.tokenizer_pre(self.model_dir)

    def pack(self, result) -> dict[str, torch.Tensor]:
        if result.parts:  # one linear written as several GGUF tensors (DeepSeek's kv_b -> k_b, v_b)
            return {f"{role}.{PART_PREFIX}{t.qtype}": t.raw.contiguous() for role, t in result.parts}
        return {PART_PREFIX + result.qtype: result.raw.contiguous()}

    def pack_bias(self, bias: torch.Tensor) -> torch.Tensor:
        return bias.to(torch.float32)

    def quantization_config(self) -> None:
        return None  # config.json stays the plain HF config (GGUF carries its own metadata)

    def extra_files(self) -> dict[str, bytes]:
        return {}

    def compile(self, staging: Path, *, reader, arch, other_names: list[str], n_layers: int, model_dir: Path) -> None:
        from . import gguf as container

        config = reader.config
        hidden = arch.dims(config)["hidden"]
        entries: list[tuple[str, tuple[int, ...], str, Any]] = []  # (hf name, shape, type, loader)

        def dense(name: str):
            return lambda: reader.get(name).to(torch.float32)

        def quantized(name: str, qtype: str):
            return lambda: _reference_rows(reader, name, qtype)

        embed = arch.embed_path + ".weight"
        e_type = tensor_type("token_embd.weight", hidden, self.ftype, self.shape)
        entries.append((embed, tuple(reader.shape(embed)), e_type, quantized(embed, e_type)))
        for i in range(n_layers):
            part = Path(staging) / "parts" / f"layer-{i:05d}.safetensors"
            with safe_open(str(part), framework="pt") as f:
                names = sorted(f.keys())
            stacks: dict[str, dict[int, tuple[str, str, str]]] = {}  # stacked GGUF name -> expert -> part entry
            for name in names:
                stem, _, suffix = name.rpartition(".")
                if suffix.startswith(PART_PREFIX):
                    hf = stem + ".weight"
                    qtype = suffix[len(PART_PREFIX):]
                    split = _kv_b_part(container, stem, config)
                    if split is not None:  # DeepSeek's kv_b: k_b or v_b, 3D
                        entries.append((*split, qtype, _part_loader(part, name)))
                        continue
                    expert = container.expert_tensor(hf, config)
                    if expert is not None:
                        stacks.setdefault(expert[0], {})[expert[1]] = (hf, name, qtype)
                        continue
                    entries.append((hf, tuple(reader.shape(hf)), qtype, _part_loader(part, name)))
                else:
                    shape = tuple(reader.shape(name)) if name in reader else None
                    entries.append((name, shape, "F32", _part_loader(part, name, dense=True)))
            entries += [_expert_stack(arch, config, reader, part, i, experts) for _, experts in sorted(stacks.items())]
        for name in other_names:
            if name == embed:
                continue
            if name == arch.lm_head_path + ".weight":
                if arch.is_tied(config):
                    continue
                o_type = tensor_type("output.weight", hidden, self.ftype, self.shape)
                head = Path(staging) / "parts" / "head.safetensors"  # the method's Hessian-aware head
                key = f"{arch.lm_head_path}.{PART_PREFIX}{o_type}"
                solved = False
                if head.is_file():
                    with safe_open(str(head), framework="pt") as f:
                        solved = key in f.keys()
                load = _part_loader(head, key) if solved else quantized(name, o_type)
                entries.append((name, tuple(reader.shape(name)), o_type, load))
            else:
                entries.append((name, tuple(reader.shape(name)), "F32", dense(name)))

        writer = container.GGUFStreamWriter(Path(staging) / "model.gguf", config, model_dir, self.ftype)
        try:
            for hf, shape, qtype, _ in entries:
                gname = writer.add_tensor_info(hf, shape, qtype)
                self.tensor_types[gname] = qtype
            writer.write_header()
            for hf, _, _, load in entries:
                writer.write_tensor(hf, load())
            writer.close()
        except BaseException:
            writer.abort()
            raise


def _expert_stack(arch, config, reader, part: Path, i: int, experts: dict[int, tuple[str, str, str]]):
    """The entry of one stacked ``ffn_*_exps`` tensor of layer ``i`` from its experts' part entries."""
    from . import gguf as container

    E = arch.num_experts(config)
    if sorted(experts) != list(range(E)):
        missing = sorted(set(range(E)) - set(experts))
        raise InputError(f"{part}: experts {missing} of layer {i} have no quantized part; rerun without --resume")
    types = {qtype for _, _, qtype in experts.values()}
    if len(types) != 1:
        raise InputError(f"{part}: the experts of layer {i} were quantized to different types {sorted(types)}")
    first = experts[0][0]
    j = arch.expert_slot(first[len(arch.layer_prefix(i)):-len(".weight")])[1]
    keys = [experts[e][1] for e in range(E)]

    def load():
        with safe_open(str(part), framework="pt") as f:
            return torch.cat([f.get_tensor(k) for k in keys])  # [E * rows, bytes per row]
    return container.expert_stack_name(arch, i, j), (E, *reader.shape(first)), types.pop(), load


def _kv_b_part(container, stem: str, config) -> tuple[str, tuple[int, int, int]] | None:
    """``...self_attn.kv_b_proj.k_b`` (or ``.v_b``) -> the HF-style name and 3D shape it is written as."""
    base, _, role = stem.rpartition(".")
    if role not in ("k_b", "v_b"):
        return None
    parts = container.kv_b_parts(base + ".weight", config)
    if parts is None:
        return None
    return parts[0] if role == "k_b" else parts[1]


def _part_loader(path: Path, name: str, dense: bool = False):
    def load():
        with safe_open(str(path), framework="pt") as f:
            t = f.get_tensor(name)
        return t.to(torch.float32) if dense else t
    return load


def _reference_rows(reader, name: str, qtype: str) -> torch.Tensor:
    """``name`` quantized by llama.cpp's reference rounding, ``_ROWS_PER_CHUNK`` rows at a time
    (rows are independent): raw bytes, or the dense tensor for float types."""
    from ..methods.gguf_layer import quantize_tensor

    W = reader.get(name).to(torch.float32)
    if qtype in ("F32", "F16", "BF16"):
        return W
    chunks = [quantize_tensor(W[r: r + _ROWS_PER_CHUNK], qtype, name=name).raw
              for r in range(0, W.shape[0], _ROWS_PER_CHUNK)]
    if not chunks:
        raise InputError(f"{name}: empty tensor")
    return torch.cat(chunks)
