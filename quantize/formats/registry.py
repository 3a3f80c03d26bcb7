"""Formats by name, and from a checkpoint's config.json ``quantization_config``."""

from __future__ import annotations

from typing import Any

from ..errors import InputError
from .base import Format

SUPPORTED = ("gptq", "awq", "exl2")


def format_from_config(qc: dict[str, Any], source: str = "config.json") -> Format:
    method = str(qc.get("quant_method", "")).lower()
    if method == "gptq":
        from .gptq_checkpoint import GPTQFormat

        return GPTQFormat.from_quantization_config(qc, source=source)
    if method == "awq":
        from .awq import AWQFormat

        return AWQFormat.from_quantization_config(qc, source=source)
    if method == "exl2":
        from .exl2 import EXL2Format

        return EXL2Format.from_quantization_config(qc, source=source)
    raise InputError(
        f"{source}: quantization_config quant_method {method!r} is not readable by this version; "
        f"supported: {', '.join(SUPPORTED)}"
    )
