"""What a checkpoint format is to the pipeline: packing per linear, config entries, read-back.

Formats know nothing about Hessians or calibration: they turn a method's result for one linear into
the tensors a loader reads, and those tensors back into a dense weight.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch


class Format(Protocol):
    name: str  # "gptq", "awq", "exl2"
    suffixes: tuple[str, ...]  # tensor suffixes of one quantized linear, e.g. ("qweight", "qzeros", "scales", "g_idx")

    def pack(self, result: Any) -> dict[str, torch.Tensor]:
        """suffix -> tensor for one linear (bias excluded: the stage copies it)."""

    def dequantize(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """suffix -> tensor back to the dense fp32 weight [out_features, in_features]."""

    def quantization_config(self) -> dict[str, Any]:
        """config.json ``quantization_config``."""

    def extra_files(self) -> dict[str, bytes]:
        """Further files of the output directory (quantize_config.json, ...)."""
