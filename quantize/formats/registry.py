"""Formats by name, and from a checkpoint's config.json ``quantization_config``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import InputError
from .base import Format

SUPPORTED = ("gptq", "awq", "exl2", "compressed-tensors")


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
    if method == "compressed-tensors":
        from .compressed_tensors import format_from_config as ct_format

        return ct_format(qc, source=source)
    if method == "mxfp4":  # GPT-OSS's original release: experts as MXFP4 *_blocks / *_scales
        raise InputError(f"{source}: an MXFP4 checkpoint (GPT-OSS's release) is not readable by this version; "
                         "dequantize it to bf16 first (transformers: from_pretrained with "
                         "Mxfp4Config(dequantize=True), then save_pretrained) and quantize that")
    raise InputError(
        f"{source}: quantization_config quant_method {method!r} is not readable by this version; "
        f"supported: {', '.join(SUPPORTED)}"
    )


SCALE_DTYPES = ("auto", "float16", "bfloat16")


def model_config(model_dir: Path) -> dict[str, Any]:
    """config.json of a model directory (InputError naming the file when absent or unreadable)."""
    path = Path(model_dir) / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: missing; point --model at a Hugging Face model directory") from None
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: not readable JSON ({e})") from None


def resolve_scale_dtype(fmt: str, requested: str, model_dir: Path) -> str:
    """The grid's scale dtype: what the output format stores scales in. ``auto``: fp16 for the GPTQ
    and AWQ layouts (their loaders read fp16 scales), the model's 16-bit dtype for
    compressed-tensors (loaders create the scale parameters in it)."""
    if requested not in SCALE_DTYPES:
        raise InputError(f"--scale-dtype {requested!r}: use one of {', '.join(SCALE_DTYPES)}")
    if fmt == "compressed-tensors":
        from .compressed_tensors import grid_scale_dtype, model_dtype

        native = grid_scale_dtype(model_dtype(model_config(model_dir)))
        return native if requested == "auto" else requested
    return "float16" if requested == "auto" else requested
