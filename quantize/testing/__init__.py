"""Test helpers shipped with the package: tiny random models of every family and the bundled tokenizer."""

from __future__ import annotations

from pathlib import Path

from .tiny import BOS_ID, EOS_ID, FAMILIES, FUSED_MOE_FAMILIES, MOE_FAMILIES, PAD_ID, VOCAB_SIZE, build_tiny_model, tiny_config, tokenizer_dir


def embedded_model_dir() -> Path:
    """``models/tiny-llama`` of a source checkout (a small trained Llama); absent from wheels."""
    return Path(__file__).resolve().parents[2] / "models" / "tiny-llama"


__all__ = [
    "BOS_ID",
    "EOS_ID",
    "FAMILIES",
    "FUSED_MOE_FAMILIES",
    "MOE_FAMILIES",
    "PAD_ID",
    "VOCAB_SIZE",
    "build_tiny_model",
    "embedded_model_dir",
    "tiny_config",
    "tokenizer_dir",
]
