"""The ``merge`` stage: PEFT LoRA adapters and Lit-GPT checkpoints -> plain HF safetensors.

Public API::

    merge_lora(base, adapter, out, dtype="auto", overwrite=False) -> Manifest
    merge_litgpt(checkpoint, out, lora=None, dtype="auto", overwrite=False) -> Manifest

Both stream tensor by tensor (``stream``), do all merge arithmetic in float32 (``lora_math``) and
round once to the output dtype.
"""

from __future__ import annotations

from .litgpt import merge_litgpt
from .peft_adapter import merge_lora

__all__ = ["merge_litgpt", "merge_lora"]
