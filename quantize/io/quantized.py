"""Read-back: any quantized output of this project as dense weights.

``DequantReader`` wraps a ``CheckpointReader`` over a quantized directory and presents each packed
linear as its dense ``<prefix>.weight`` (dequantized on ``get``), hiding the packed tensors. The
streaming executor and eval run on it unchanged (layer by layer, memory flat); tests and the
interop tier use ``load_dequantized_model`` to get a whole transformers model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..formats.base import Format
from ..formats.registry import format_from_config
from .detect import detect_format  # noqa: F401  (re-exported)
from .reader import CheckpointReader


class DequantReader:
    def __init__(self, reader: CheckpointReader, fmt: Format):
        self.inner = reader
        self.fmt = fmt
        self.path = reader.path
        self.directory = reader.directory
        first = fmt.suffixes[0]
        self._packed: dict[str, str] = {}  # dense weight name -> linear prefix
        hidden: set[str] = set()
        for name in reader.names():
            if name.endswith("." + first):
                prefix = name[: -len(first) - 1]
                self._packed[prefix + ".weight"] = prefix
                hidden.update(f"{prefix}.{s}" for s in fmt.suffixes if f"{prefix}.{s}" in reader)
        # experts stored under the names a loader serves them by (compressed-tensors GPT-OSS:
        # ``experts.3.w13_weight_packed`` holds gate and up): dense weight name -> (stem, linear)
        self._served: dict[str, tuple[str, int]] = {}
        self.arch = None
        if getattr(fmt, "served_experts", None) is not None:
            from ..arch import get_arch
            from ..errors import InputError

            try:
                self.arch = get_arch(reader.config, source=str(reader.path))
            except InputError:  # not a family of the table: no experts to serve
                self.arch = None
            self._served = fmt.served_experts(self.arch, reader.names())
            for stem, _ in self._served.values():
                hidden.update(n for n in fmt.served_hidden(self.arch, stem) if n in reader)
            for name in self._served:
                self._packed.pop(name, None)
        self._names = sorted([n for n in reader.names() if n not in hidden] + list(self._packed) + list(self._served))

    @classmethod
    def open(cls, directory: Path) -> "DequantReader | CheckpointReader":
        """A DequantReader when config.json carries a quantization_config, else the plain reader."""
        # GGUF output (model.gguf beside config.json): its own dense reader
        if (Path(directory) / "model.gguf").is_file():
            from ..formats.gguf import GGUFCheckpoint

            return GGUFCheckpoint(Path(directory))
        reader = CheckpointReader(Path(directory))
        qc = reader.config.get("quantization_config")
        if not qc:
            return reader
        return cls(reader, format_from_config(qc, source=str(Path(directory) / "config.json")))

    @property
    def config(self) -> dict:
        return self.inner.config

    @property
    def total_bytes(self) -> int:
        return self.inner.total_bytes

    def names(self) -> list[str]:
        return list(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._packed or name in self._served or (name in self.inner and name in self._names)

    def _packed_tensors(self, name: str) -> dict[str, torch.Tensor]:
        if name in self._served:
            return self.fmt.served_tensors(self.arch, self.inner.get, *self._served[name])
        prefix = self._packed[name]
        return {s: self.inner.get(f"{prefix}.{s}") for s in self.fmt.suffixes if f"{prefix}.{s}" in self.inner}

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self._served:
            return tuple(self.fmt.served_shape(self.arch, self.inner, *self._served[name]))
        if name in self._packed:
            prefix = self._packed[name]
            shapes = {s: tuple(self.inner.shape(f"{prefix}.{s}")) for s in self.fmt.suffixes if f"{prefix}.{s}" in self.inner}
            return tuple(self.fmt.weight_shape(shapes))
        return self.inner.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return torch.float32 if name in self._packed or name in self._served else self.inner.dtype(name)

    def get(self, name: str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> torch.Tensor:
        if name in self._packed or name in self._served:
            W = self.fmt.dequantize(self._packed_tensors(name))
            return W.to(device=device, dtype=dtype or W.dtype)
        return self.inner.get(name, dtype=dtype, device=device)


def open_model(directory: Path):
    return DequantReader.open(Path(directory))


def load_dequantized_model(directory: Path, dtype: torch.dtype = torch.float32):
    """A whole transformers model with dense (dequantized) weights, for tests and comparisons."""
    from ..arch import get_arch
    from ..executor import skeleton

    reader = open_model(Path(directory))
    cfg = skeleton.load_config(Path(directory))
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    model = skeleton.build_skeleton(cfg)
    arch = get_arch(reader.config)
    aliases = {arch.lm_head_path + ".weight": arch.embed_path + ".weight"}
    source = skeleton.MemoryView(reader, arch) if arch.moe is not None else reader  # fused experts
    skeleton.materialize(model, "", source, device="cpu", dtype=dtype, aliases=aliases)
    if arch.is_tied(reader.config):
        model.tie_weights()
    return model
