"""The GPTQ checkpoint format as the pipeline's ``Format``: packing, config, read-back."""

from __future__ import annotations

from typing import Any

import torch

from ..methods.grid import QuantResult, QuantSpec
from . import gptq as _gptq


class GPTQFormat:
    name = "gptq"
    suffixes = ("qweight", "qzeros", "scales", "g_idx")

    def __init__(self, spec: QuantSpec, checkpoint_format: str = "gptq"):
        self.spec = spec
        self.checkpoint_format = checkpoint_format

    @classmethod
    def from_quantization_config(cls, qc: dict[str, Any], source: str = "config.json") -> "GPTQFormat":
        spec = QuantSpec.parse(
            {"bits": qc.get("bits"), "group_size": qc.get("group_size", 128), "sym": qc.get("sym", True),
             "act_order": qc.get("desc_act", False), "static_groups": qc.get("static_groups", False)},
            source=source,
        )
        fmt = qc.get("checkpoint_format") or qc.get("format") or "gptq"
        return cls(spec, checkpoint_format=fmt)

    def pack(self, result: QuantResult) -> dict[str, torch.Tensor]:
        return _gptq.pack_quant_result(result, checkpoint_format=self.checkpoint_format)

    def dequantize(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        return _gptq.dequantize_gptq(tensors, self.spec.bits, self.checkpoint_format)

    def weight_shape(self, shapes: dict[str, tuple[int, ...]]) -> tuple[int, int]:
        k_words, n = shapes["qweight"]
        return (n, k_words * 32 // self.spec.bits)

    def quantization_config(self) -> dict[str, Any]:
        return _gptq.quantization_config(self.spec, checkpoint_format=self.checkpoint_format)

    def extra_files(self) -> dict[str, bytes]:
        return {"quantize_config.json": _gptq.quantize_config_json(self.spec, checkpoint_format=self.checkpoint_format).encode()}
