"""Tiny random HF checkpoints of every supported family, built offline in well under a second.

The models are real transformers models (built from the family's config class, saved with
``save_pretrained`` as safetensors) with the repository's small BPE tokenizer, so every stage can be
exercised end to end on CPU. Shapes: 4 attention heads / 2 KV heads (GQA), head_dim = hidden / 4,
intermediate = 2 * hidden, vocab 1024.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from .. import arch as arch_table

VOCAB_SIZE = 1024
BOS_ID, EOS_ID, PAD_ID = 0, 1, 2


def _config_classes() -> dict[str, type]:
    import transformers as T

    return {
        "llama": T.LlamaConfig,
        "mistral": T.MistralConfig,
        "qwen2": T.Qwen2Config,
        "qwen3": T.Qwen3Config,
        "gemma": T.GemmaConfig,
        "gemma2": T.Gemma2Config,
        "phi3": T.Phi3Config,
        "mixtral": T.MixtralConfig,
        "qwen2_moe": T.Qwen2MoeConfig,
        "qwen3_moe": T.Qwen3MoeConfig,
        "deepseek_v3": T.DeepseekV3Config,
        "gpt_oss": T.GptOssConfig,
        "llama4_text": T.Llama4TextConfig,
    }


FAMILIES: list[str] = arch_table.dense_families()
"""The dense families (every method and format supports them)."""
FUSED_MOE_FAMILIES: list[str] = arch_table.fused_moe_families()
"""The Mixture-of-Experts families whose checkpoints hold the experts 3D (GPT-OSS, Llama-4 text):
GPTQ/RTN into GPTQ and compressed-tensors only (tests/test_moe_gpt_oss.py, tests/test_moe_llama4.py)."""
MOE_FAMILIES: list[str] = [f for f in arch_table.moe_families() if f not in FUSED_MOE_FAMILIES]
"""The Mixture-of-Experts families with per-expert 2D checkpoints: 4 experts, 2 per token, expert
width hidden / 2."""

# Tiny MoE shapes: every width a multiple of 32 so that group size 32 applies to every linear.
_MOE_DEFAULTS: dict[str, dict[str, Any]] = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=32),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=64, intermediate_size=128),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, intermediate_size=128),
    # layer 0 dense (first_k_dense_replace), MLA attention with small ranks, one shared expert
    "deepseek_v3": dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1,
                        first_k_dense_replace=1, n_group=2, topk_group=1, q_lora_rank=32, kv_lora_rank=32,
                        qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16, num_key_value_heads=4,
                        intermediate_size=128),
    # every layer sparse, experts 3D on disk with biases; layers alternate sliding-window (8) / full
    # attention, with sinks
    "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=32, sliding_window=8),
    # layer 0 dense (its own MLP, intermediate_size_mlp), layer 1 sparse (moe_layers = [1]): 4 experts,
    # top-1 as released, a shared expert; chunked attention in chunks of 16 tokens
    "llama4_text": dict(num_local_experts=4, num_experts_per_tok=1, intermediate_size=32, intermediate_size_mlp=128,
                        interleave_moe_layer_step=2, attention_chunk_size=16),
}


# Config-selected forms of a family (quantize/arch.py ``Variant``), built as their own tiny models:
# name -> (family, config fields on top of the family's tiny defaults)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    # DeepSeek-V3 without q_lora_rank (Moonlight-16B-A3B style): a plain self_attn.q_proj
    "deepseek_v3_noqlora": ("deepseek_v3", dict(q_lora_rank=None)),
}


def family_of(name: str) -> str:
    """The family of a tiny-model name (a family, or a :data:`VARIANTS` name)."""
    return VARIANTS[name][0] if name in VARIANTS else name


def tokenizer_dir() -> Path:
    """The bundled tokenizer (vocab 1024; bos 0, eos 1, pad 2)."""
    return Path(__file__).resolve().parent / "assets" / "tokenizer"


def tiny_config(family: str, *, num_layers: int = 2, hidden: int = 64, **overrides: Any):
    """The transformers config of a tiny ``family`` model (a family or a :data:`VARIANTS` name);
    ``overrides`` win over every default."""
    classes = _config_classes()
    variant = VARIANTS.get(family, (family, {}))[1]
    family = family_of(family)
    if family not in classes:
        raise ValueError(f"no tiny config for family {family!r}; known: {sorted(classes) + sorted(VARIANTS)}")
    heads = 4
    kwargs: dict[str, Any] = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=2,
        head_dim=hidden // heads,
        max_position_embeddings=512,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )
    kwargs.update(_MOE_DEFAULTS.get(family, {}))
    kwargs.update(variant)
    kwargs.update(overrides)
    return classes[family](**kwargs)


def _perturb(model: torch.nn.Module, family: str, gen: torch.Generator) -> None:
    """Give norms and biases non-trivial values (HF initialises them to 1 / 0 / 0).

    Trivial norms and zero biases would let a test pass even if scale folding ignored them; the
    perturbed values keep each norm's effective multiplier around 1 (Gemma stores it as 1 + w).
    """
    offset = arch_table.by_name(family_of(family)).norm_weight_offset
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 2)[-2]
            if name.endswith((".bias", "_bias")):  # GPT-OSS's expert biases: gate_up_proj_bias, down_proj_bias
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
            elif "norm" in leaf:
                p.copy_(1.0 - offset + 0.2 * torch.randn(p.shape, generator=gen))


def build_tiny_model(
    family: str,
    out_dir: Path,
    *,
    num_layers: int = 2,
    hidden: int = 64,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    **overrides: Any,
) -> Path:
    """Build, save and return ``out_dir``: a random ``family`` model plus the bundled tokenizer.

    Deterministic: the same arguments give bit-identical safetensors. The global torch RNG is left
    untouched. ``overrides`` are config fields (e.g. ``num_key_value_heads=4``, ``attention_bias=True``,
    ``tie_word_embeddings=False``).
    """
    from transformers import AutoModelForCausalLM, GenerationConfig

    out_dir = Path(out_dir)
    config = tiny_config(family, num_layers=num_layers, hidden=hidden, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    _perturb(model, family, torch.Generator().manual_seed(seed + 1))
    model = model.to(dtype).eval()
    model.generation_config = GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    for f in tokenizer_dir().iterdir():
        if f.is_file():
            shutil.copy2(f, out_dir / f.name)
    return out_dir
