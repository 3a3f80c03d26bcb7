"""Which format an output directory holds, from its files alone (json only: no torch, no format code).

Imported by the engine runners (quantize/check/runner.py) in engine virtualenvs that do not have this
project's dependencies.
"""

from __future__ import annotations

import json
from pathlib import Path


def detect_format(directory: Path) -> str:
    """``gguf``, ``gptq``, ``awq``, ``compressed-tensors``, ``dense`` (or another quant_method, lowercased)."""
    directory = Path(directory)
    if (directory / "model.gguf").is_file():
        return "gguf"
    try:
        cfg = json.loads((directory / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return "dense"
    qc = cfg.get("quantization_config") or {}
    return str(qc.get("quant_method", "dense")).lower() if qc else "dense"
