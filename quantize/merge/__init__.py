"""The ``merge`` stage: PEFT LoRA adapters and Lit-GPT checkpoints -> plain HF safetensors.

Public API::

    merge_lora(base, adapter, out, dtype="auto", overwrite=False, base_quant=None, base_quant_dtype=None,
               axolotl_config=None) -> Manifest
    merge_litgpt(checkpoint, out, lora=None, dtype="auto", overwrite=False, base_quant=None,
                 base_quant_dtype=None) -> Manifest

Both stream tensor by tensor (``stream``), do all merge arithmetic in float32 (``lora_math``) and
round once to the output dtype. ``base_quant`` merges a QLoRA adapter onto the bitsandbytes 4-bit
round trip of its base (``bnb4``: our torch reimplementation; ``qlora``: which setting, from which
training record, on which tensors).
"""

from __future__ import annotations

from .litgpt import merge_litgpt
from .peft_adapter import merge_lora

__all__ = ["merge_litgpt", "merge_lora"]
