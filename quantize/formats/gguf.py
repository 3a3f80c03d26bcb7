"""GGUF for llama.cpp: metadata, tokenizer, tensor names/layout, a streaming writer and a reader.

The container is gguf-py's (``gguf.GGUFWriter`` / ``gguf.GGUFReader``, the package maintained inside
llama.cpp); this module decides *what* goes in it, reproducing what llama.cpp's own converter
(``convert_hf_to_gguf.py``, whose model classes now live in ``conversion/*.py``) writes for our
families:

==========  ==============  ================================================================
family      GGUF arch       converter class (quirks)
==========  ==============  ================================================================
llama       ``llama``       LlamaModel: q/k rows permuted, ``vocab_size``, rope dimension
                            count, Llama-3.1 ``rope_freqs`` tensor
mistral     ``llama``       LlamaModel (the HF checkpoint; sliding window not written)
qwen2       ``qwen2``       Qwen2Model: base keys only; q/k/v biases
qwen3       ``qwen3``       Qwen3Model: base keys; per-head ``attn_q_norm``/``attn_k_norm``
gemma       ``gemma``       GemmaModel: own key set, norms stored as ``1 + w``, no ``output``
gemma2      ``gemma2``      Gemma2Model: gemma's + soft-capping, sliding window
phi3        ``phi3``        Phi3MiniModel: fused ``attn_qkv``/``ffn_up``, rope keys, LongRoPE
mixtral     ``llama``       LlamaModel: as llama, plus ``expert_count``/``expert_used_count``
qwen2_moe   ``qwen2moe``    Qwen2MoeModel: + ``expert_feed_forward_length``,
                            ``expert_shared_feed_forward_length``; shared expert ``*_shexp``
qwen3_moe   ``qwen3moe``    Qwen3MoeModel: qwen2moe's keys without a shared expert; q/k norms
deepseek_v3 ``deepseek2``   DeepseekV2Model: MLA (``attn_q_a``/``attn_q_a_norm``/``attn_q_b``, or
                            ``attn_q`` without ``q_lora_rank``,
                            ``attn_kv_a_mqa``/``attn_kv_a_norm``, ``kv_b_proj`` split per head
                            into ``attn_k_b`` (transposed) and ``attn_v_b``), leading dense
                            layers, ``exp_probs_b``, shared expert ``*_shexp``; MLA/expert keys
==========  ==============  ================================================================

Mixture-of-Experts (MOE.md section 4): a layer's routed experts are stacked into one 3D tensor per
projection, ``blk.N.ffn_{gate,up,down}_exps`` (numpy ``[E, rows, cols]``), written from the layer's
per-expert results; the router ``ffn_gate_inp`` and Qwen2-MoE's shared-expert gate
``ffn_gate_inp_shexp`` stay F32. llama.cpp's graphs fix what the checkpoint must be: every layer
sparse, and top-k weights renormalised for qwen3moe/Mixtral, not for qwen2moe
(:func:`check_representable` refuses the rest).

DeepSeek-V3 (``deepseek2``, DeepseekV2Model): ``kv_b_proj`` ``[H*(nope+v), kv_lora]`` is written as
the converter splits it for MLA's weight absorption, per head the ``nope`` k rows then the ``v`` rows:
``attn_k_b`` = the k rows transposed (numpy ``[H, kv_lora, nope]``: llama.cpp multiplies q_nope by
it) and ``attn_v_b`` = the v rows (``[H, v, kv_lora]``); the reader joins them back into
``kv_b_proj``. ``first_k_dense_replace`` leading layers keep ``ffn_{gate,up,down}``; the router's
``e_score_correction_bias`` is ``exp_probs_b.bias`` (F32). Keys: the converter's (head_count_kv 1, key/value
length ``kv_lora+rope``/``kv_lora`` and their ``_mla`` forms, rope dimension count ``qk_rope_head_dim``,
q/kv LoRA ranks, leading dense block count, expert counts, group count/used (llama.cpp groups the
experts as transformers does), weights scale/norm, YaRN keys and ``yarn_log_mul = 0.1 *
mscale_all_dim``) -- plus ``expert_gating_func = sigmoid`` always: the converter writes it only when
config.json has ``scoring_func`` (DeepSeek's own release does; a config saved by transformers does
not), and without it llama.cpp would gate with softmax while transformers' DeepseekV3 always gates with
sigmoid. Refused (:func:`check_representable`): ``num_key_value_heads != num_attention_heads`` (the
converter splits ``kv_b`` by it), ``rope_interleave: false`` (llama.cpp's deepseek2 rotary is the
interleaved one), YaRN whose attention factor
``get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)`` is not 1 (llama.cpp takes mscale as
1 or as mscale_all_dim; DeepSeek-V3's 1.0/1.0 is written). ``n_group``/``topk_group`` are written, not
refused: this llama.cpp selects the top groups by their two best experts' scores, as transformers does.
``q_lora_rank: null`` (Moonlight-16B-A3B; the table's variant with a plain ``q_proj``): ``attn_q`` in
place of ``attn_q_a``/``attn_q_a_norm``/``attn_q_b``, and ``attention.q_lora_rank = 0`` where the
converter writes no key: llama.cpp's deepseek2 reads the key unless the layer count is one of its
"lite" models' (26/27, or 48 with a 128256 vocabulary) and refuses a file without it otherwise; 0 is
the value it takes for those, and it builds ``attn_q`` for any rank 0 (the reader maps 0 back to null).

Layout rules (``ModelBase.prepare_tensors``): 1-D tensors and every ``*_norm.weight`` are F32; a tied
head has no ``output`` tensor (llama.cpp reuses ``token_embd``); names come from
``gguf.get_tensor_name_map``.

Writing streams: :class:`GGUFStreamWriter` takes every tensor's info first (name, shape, type,
bytes), writes the header, then one tensor at a time in the same order -- it never holds more than
the tensor being written. :class:`GGUFCheckpoint` reads a GGUF back as dense fp32 HF tensors, one
at a time with positioned reads, so eval streams over GGUF outputs like any other.

Checked (tests/test_gguf_container.py): gguf-py reads every family's file back; transformers' GGUF
loader reproduces the HF logits (llama, mistral, qwen2, qwen3, gemma2, phi3 -- it has no gemma);
llama.cpp itself (llama-cpp-python, interop tests) reproduces them for all seven and tokenizes as
the HF tokenizer does.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
from collections.abc import Callable, Mapping
from functools import lru_cache
from hashlib import sha256
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..arch import Arch, get_arch
from ..errors import InputError
from ..io.reader import Closing

log = logging.getLogger(__name__)

GGUF_FILE = "model.gguf"

# our family -> GGUF architecture (llama.cpp runs Mistral checkpoints as "llama")
FAMILY_TO_GGUF = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma": "gemma",
    "gemma2": "gemma2",
    "phi3": "phi3",
    "mixtral": "llama",
    "qwen2_moe": "qwen2moe",
    "qwen3_moe": "qwen3moe",
    "deepseek_v3": "deepseek2",
}
GGUF_TO_FAMILY = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma": "gemma", "gemma2": "gemma2", "phi3": "phi3",
                  "qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "deepseek2": "deepseek_v3"}
# llama.cpp's MoE graphs renormalise the top-k routing weights (or not) whatever the file says
# (deepseek2 reads it from expert_weights_norm: any norm_topk_prob is representable)
_RENORMALISES = {"mixtral": True, "qwen2_moe": False, "qwen3_moe": True}

# file type names (llama-quantize's) -> general.file_type
FILE_TYPES = {
    "F32": "ALL_F32",
    "F16": "MOSTLY_F16",
    "BF16": "MOSTLY_BF16",
    "Q8_0": "MOSTLY_Q8_0",
    "Q4_0": "MOSTLY_Q4_0",
    "Q6_K": "MOSTLY_Q6_K",
    "Q5_K_M": "MOSTLY_Q5_K_M",
    "Q4_K_M": "MOSTLY_Q4_K_M",
}

# types gguf-py can quantize itself (a dense array is accepted for these; others take raw bytes)
_GGUFPY_QUANTIZES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")

# tokenizer files copied beside model.gguf (transformers and our reader use them)
SIDECAR_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


def _gguf():
    import gguf

    return gguf


# -- architecture ----------------------------------------------------------------------------------


def gguf_arch(config: Mapping[str, Any]) -> str:
    """The GGUF ``general.architecture`` of an HF config (InputError for an unsupported family)."""
    family = get_arch(config).name
    if family not in FAMILY_TO_GGUF:
        raise InputError(
            f"config.json: {family} is not written as GGUF yet; GGUF families: {', '.join(FAMILY_TO_GGUF)}; "
            "use `quantize gptq` for this model"
        )
    return FAMILY_TO_GGUF[family]


def _model_arch(arch_name: str):
    gguf = _gguf()
    for key, value in gguf.MODEL_ARCH_NAMES.items():
        if value == arch_name:
            return key
    raise InputError(f"gguf-py has no architecture {arch_name!r}; upgrade the gguf package")


def _file_type(file_type: str | int):
    gguf = _gguf()
    if isinstance(file_type, int):
        return gguf.LlamaFileType(file_type)
    name = str(file_type).upper()
    if name not in FILE_TYPES:
        raise InputError(f"GGUF file type {file_type!r}: use one of {', '.join(FILE_TYPES)}")
    return gguf.LlamaFileType[FILE_TYPES[name]]


def _qtype(qtype):
    gguf = _gguf()
    if isinstance(qtype, gguf.GGMLQuantizationType):
        return qtype
    try:
        return gguf.GGMLQuantizationType[str(qtype).upper()]
    except KeyError:
        raise ValueError(f"unknown GGML tensor type {qtype!r}") from None


def _head_dim(config: Mapping[str, Any]) -> int:
    return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def _rope_params(config: Mapping[str, Any]) -> dict[str, Any]:
    """RoPE parameters as one dict, as the converter's TextModel.__init__ assembles them: transformers
    5's ``rope_parameters`` (or the older ``rope_scaling``), with top-level ``rope_theta``,
    ``partial_rotary_factor`` and ``original_max_position_embeddings`` mirrored in."""
    rp = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    if "full_attention" in rp:  # per-attention-type parameters; the full-attention set applies
        rp = dict(rp["full_attention"])
    if "rope_theta" not in rp and config.get("rope_theta") is not None:
        rp["rope_theta"] = config["rope_theta"]
    if "rope_type" not in rp and rp.get("type") is not None:
        rp["rope_type"] = rp["type"]
    for key in ("partial_rotary_factor", "original_max_position_embeddings"):
        if key not in rp and config.get(key) is not None:
            rp[key] = config[key]
    return rp


def check_representable(config: Mapping[str, Any]) -> None:
    """InputError for a checkpoint llama.cpp's graph for its family cannot express (before any work)."""
    gguf_arch(config)
    _check_representable(config, get_arch(config))


def _check_representable(config: Mapping[str, Any], arch: Arch) -> None:
    """Refuse checkpoints llama.cpp's graph for the family cannot express."""
    if arch.name == "deepseek_v3":
        _check_deepseek(config)
        return
    if arch.moe is not None:
        gguf_arch(config)
        dense = [i for i in range(arch.num_layers(config)) if not arch.is_sparse_layer(config, i)]
        if dense:
            raise InputError(
                f"config.json: layer {dense[0]} is a dense MLP layer (mlp_only_layers / decoder_sparse_step), but "
                f"llama.cpp's {FAMILY_TO_GGUF[arch.name]} graph makes every layer sparse; this checkpoint cannot be "
                "written as GGUF"
            )
        want = _RENORMALISES[arch.name]
        have = bool(config.get("norm_topk_prob", want))
        if have != want:
            raise InputError(
                f"config.json: norm_topk_prob={str(have).lower()}, but llama.cpp's {FAMILY_TO_GGUF[arch.name]} graph "
                f"{'always renormalises' if want else 'never renormalises'} the top-k routing weights; llama.cpp "
                "would compute another model, so it is not written as GGUF"
            )
    if arch.name in ("gemma", "gemma2") and not arch.is_tied(config):
        raise InputError(
            f"config.json: tie_word_embeddings=false, but llama.cpp's {arch.name} always uses token_embd as the "
            "output head (it has no output tensor); this checkpoint cannot be written as GGUF"
        )


def _check_deepseek(config: Mapping[str, Any]) -> None:
    """What llama.cpp's deepseek2 (and the converter's layout) needs of a DeepSeek-V3 config."""
    heads, kv_heads = int(config["num_attention_heads"]), config.get("num_key_value_heads")
    if kv_heads is not None and int(kv_heads) != heads:
        raise InputError(f"config.json: num_key_value_heads={kv_heads} but num_attention_heads={heads}; llama.cpp's "
                         "converter splits kv_b_proj into attn_k_b/attn_v_b per KV head, which needs them equal")
    if config.get("rope_interleave", True) is False:
        raise InputError("config.json: rope_interleave=false, but llama.cpp's deepseek2 rotates interleaved pairs; "
                         "llama.cpp would compute another model, so it is not written as GGUF")
    scoring = config.get("scoring_func", "sigmoid")
    if scoring != "sigmoid":
        raise InputError(f"config.json: scoring_func={scoring!r}, but transformers' DeepseekV3 gates with sigmoid; "
                         "the file would say one thing and the model do another, so it is not written as GGUF")
    rp = _rope_params(config)
    if rp.get("rope_type") == "yarn":
        # llama.cpp's deepseek2 takes YaRN's mscale as 1 (or as mscale_all_dim) and scales the whole
        # q.k by mscale_all_dim's factor: transformers computes the same only when its attention factor
        # get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim) is 1 (DeepSeek-V3: both 1.0)
        mad, msc = rp.get("mscale_all_dim"), rp.get("mscale")
        explicit = rp.get("attention_factor", rp.get("attn_factor"))
        if not mad or msc is None or float(msc) != float(mad) or (explicit is not None and float(explicit) != 1.0):
            raise InputError(
                f"config.json: YaRN with mscale={msc}, mscale_all_dim={mad}, attention_factor={explicit}: llama.cpp's "
                "deepseek2 computes transformers' attention scaling only when mscale == mscale_all_dim (and no "
                "other attention_factor); this checkpoint is not written as GGUF")
    groups, experts = int(config.get("n_group") or 1), int(config["n_routed_experts"])
    if groups > 1 and (experts % groups or experts // groups < 2):
        raise InputError(f"config.json: n_routed_experts={experts} in n_group={groups} groups; llama.cpp (as "
                         "transformers) scores each group by its top two experts, which needs >= 2 experts per group")


def llama_cpp_caveats(config: Mapping[str, Any]) -> list[str]:
    """Places where llama.cpp will not compute what transformers computes for ``config`` (warnings;
    the file is still what llama.cpp's converter writes)."""
    arch = get_arch(config)
    notes = []
    if arch.name == "gemma2":
        # llama.cpp (src/models/gemma2.cpp) picks the attention scale from the model size, not from
        # query_pre_attn_scalar: n_embd/n_head for the 46-layer 27B, else head_dim.
        n_layers, hd = arch.num_layers(config), _head_dim(config)
        implied = config["hidden_size"] // config["num_attention_heads"] if n_layers == 46 else hd
        qpas = config.get("query_pre_attn_scalar", 256)
        if qpas != implied:
            notes.append(
                f"gemma2: query_pre_attn_scalar={qpas} but llama.cpp scales attention by 1/sqrt({implied}) "
                "for this shape; llama.cpp's logits will differ from transformers'"
            )
    if arch.name == "mistral" and config.get("sliding_window"):
        notes.append(
            f"mistral: sliding_window={config['sliding_window']} is not written (llama.cpp's llama graph has "
            "no sliding window); contexts beyond it differ from transformers'"
        )
    return notes


# -- metadata --------------------------------------------------------------------------------------


def add_metadata(writer, config: Mapping[str, Any], model_dir: Path | None, file_type: str | int = "F16",
                 *, name: str | None = None) -> None:
    """Every model key llama.cpp reads for ``config``'s family, as convert_hf_to_gguf writes it
    (general.*, the family's hyperparameters, RoPE scaling); tokenizer keys: :func:`add_tokenizer`."""
    gguf = _gguf()
    arch = get_arch(config)
    family = arch.name
    w = writer
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name or (Path(model_dir).name if model_dir is not None else family))
    n_layers = arch.num_layers(config)
    n_head = int(config["num_attention_heads"])
    n_head_kv = int(config.get("num_key_value_heads") or n_head)
    rp = _rope_params(config)

    if family in ("gemma", "gemma2"):
        # GemmaModel / Gemma2Model.set_gguf_parameters: a key set of their own (no base keys)
        w.add_context_length(int(config["max_position_embeddings"]))
        w.add_embedding_length(int(config["hidden_size"]))
        w.add_block_count(n_layers)
        w.add_feed_forward_length(int(config["intermediate_size"]))
        w.add_head_count(n_head)
        w.add_head_count_kv(n_head_kv)
        w.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
        w.add_key_length(_head_dim(config))
        w.add_value_length(_head_dim(config))
        w.add_file_type(_file_type(file_type))
        if rp.get("rope_theta") is not None:
            # not written by the converter (llama.cpp's default 10000 is Gemma's value); written here
            # so a checkpoint with another base stays correct
            w.add_rope_freq_base(float(rp["rope_theta"]))
        if family == "gemma2":
            w.add_attn_logit_softcapping(float(config.get("attn_logit_softcapping") or 50.0))
            w.add_final_logit_softcapping(float(config.get("final_logit_softcapping") or 30.0))
            w.add_sliding_window(int(config.get("sliding_window") or 4096))
    elif family == "phi3":
        # Phi3MiniModel.set_gguf_parameters (no base keys)
        n_embd = int(config["hidden_size"])
        rope_dims = int(float(rp.get("partial_rotary_factor", 1.0)) * n_embd) // n_head
        w.add_context_length(int(config["max_position_embeddings"]))
        w.add_rope_scaling_orig_ctx_len(int(rp.get("original_max_position_embeddings") or config["max_position_embeddings"]))
        w.add_embedding_length(n_embd)
        w.add_feed_forward_length(int(config["intermediate_size"]))
        w.add_block_count(n_layers)
        w.add_head_count(n_head)
        w.add_head_count_kv(n_head_kv)
        w.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
        w.add_rope_dimension_count(rope_dims)
        w.add_rope_freq_base(float(rp.get("rope_theta", 10000.0)))
        w.add_file_type(_file_type(file_type))
        w.add_sliding_window(int(config.get("sliding_window") or 0))
        if rp.get("long_factor"):
            w.add_rope_scaling_attn_factors(_phi3_longrope_attn_factor(config, rp))
    elif family == "deepseek_v3":
        _add_deepseek_metadata(w, config, arch, rp, file_type)
    else:
        # TextModel.set_gguf_parameters (llama, mistral, qwen2, qwen3)
        w.add_block_count(n_layers)
        w.add_context_length(int(config["max_position_embeddings"]))
        w.add_embedding_length(int(config["hidden_size"]))
        w.add_feed_forward_length(int(config["intermediate_size"]))
        w.add_head_count(n_head)
        w.add_head_count_kv(n_head_kv)
        _add_rope_scaling(w, rp)
        if rp.get("rope_theta") is not None:
            w.add_rope_freq_base(float(rp["rope_theta"]))
        w.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
        if arch.moe is not None:
            w.add_expert_count(arch.num_experts(config))
            w.add_expert_used_count(arch.experts_per_token(config))
        if config.get("head_dim") is not None:
            w.add_key_length(int(config["head_dim"]))
            w.add_value_length(int(config["head_dim"]))
        w.add_file_type(_file_type(file_type))
        if family in ("qwen2_moe", "qwen3_moe"):
            # Qwen2MoeModel.set_gguf_parameters (Qwen3MoeModel inherits it)
            w.add_expert_feed_forward_length(int(config["moe_intermediate_size"]))
            if config.get("shared_expert_intermediate_size") is not None:
                w.add_expert_shared_feed_forward_length(int(config["shared_expert_intermediate_size"]))
        if family in ("llama", "mistral", "mixtral"):
            # LlamaModel.set_gguf_parameters
            w.add_vocab_size(int(config["vocab_size"]))
            w.add_rope_dimension_count(_head_dim(config))
    # ModelBase.prepare_metadata
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_deepseek_metadata(w, config: Mapping[str, Any], arch: Arch, rp: Mapping[str, Any], file_type) -> None:
    """DeepseekV2Model.set_gguf_parameters: TextModel's keys with num_key_value_heads forced to 1 (MLA
    runs as MQA over the latent), then the MLA and expert keys (module docstring)."""
    gguf = _gguf()
    n_head = int(config["num_attention_heads"])
    kv_lora, rope = int(config["kv_lora_rank"]), int(config["qk_rope_head_dim"])
    # TextModel.set_gguf_parameters (its head_dim key_length/value_length are overwritten below)
    w.add_block_count(arch.num_layers(config))
    w.add_context_length(int(config["max_position_embeddings"]))
    w.add_embedding_length(int(config["hidden_size"]))
    w.add_feed_forward_length(int(config["intermediate_size"]))
    w.add_head_count(n_head)
    w.add_head_count_kv(1)
    _add_rope_scaling(w, rp)
    if rp.get("rope_theta") is not None:
        w.add_rope_freq_base(float(rp["rope_theta"]))
    w.add_layer_norm_rms_eps(float(config.get("rms_norm_eps") or 1e-6))
    w.add_expert_count(arch.num_experts(config))
    w.add_expert_used_count(arch.experts_per_token(config))
    if config.get("n_group") is not None:
        w.add_expert_group_count(int(config["n_group"]))
    if config.get("topk_group") is not None:
        w.add_expert_group_used_count(int(config["topk_group"]))
    # transformers' DeepseekV3TopkRouter always gates with sigmoid (see the module docstring)
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    w.add_file_type(_file_type(file_type))
    # DeepseekV2Model's own keys
    w.add_leading_dense_block_count(int(config.get("first_k_dense_replace") or 0))
    w.add_vocab_size(int(config["vocab_size"]))
    # no q_lora_rank (a plain q_proj: attn_q): 0, which llama.cpp reads as "attn_q" for any layer count
    # (the converter omits the key, which llama.cpp accepts only for its "lite" layer counts)
    w.add_q_lora_rank(int(config.get("q_lora_rank") or 0))
    w.add_kv_lora_rank(kv_lora)
    w.add_key_length(kv_lora + rope)
    w.add_value_length(kv_lora)
    w.add_key_length_mla(int(config["qk_nope_head_dim"]) + rope)
    w.add_value_length_mla(int(config["v_head_dim"]))
    w.add_expert_feed_forward_length(int(config["moe_intermediate_size"]))
    w.add_expert_shared_count(int(config.get("n_shared_experts") or 0))
    if config.get("routed_scaling_factor") is not None:
        w.add_expert_weights_scale(float(config["routed_scaling_factor"]))
    if config.get("norm_topk_prob"):
        w.add_expert_weights_norm(True)
    w.add_rope_dimension_count(rope)
    if rp.get("mscale_all_dim") is not None:
        # the converter's legacy factor 0.1 (llama.cpp divides it out again)
        w.add_rope_scaling_yarn_log_mul(0.1 * float(rp["mscale_all_dim"]))


def _add_rope_scaling(w, rp: Mapping[str, Any]) -> None:
    """TextModel.set_gguf_parameters' RoPE-scaling branch."""
    gguf = _gguf()
    rope_type = rp.get("rope_type")
    factor = rp.get("factor")
    if rope_type is None or rope_type in ("default", "dynamic") or str(rope_type).lower() == "llama3":
        return  # llama3: the rope_freqs tensor (extra_tensors); dynamic: not representable, as upstream
    if rope_type == "linear" and factor is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(factor))
    elif rope_type == "yarn" and factor is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(factor))
        w.add_rope_scaling_orig_ctx_len(int(rp["original_max_position_embeddings"]))
        if rp.get("extrapolation_factor") is not None:
            w.add_rope_scaling_yarn_ext_factor(float(rp["extrapolation_factor"]))
        attn = rp.get("attention_factor", rp.get("attn_factor"))
        if attn is not None:
            w.add_rope_scaling_yarn_attn_factor(float(attn))
        if rp.get("beta_fast") is not None:
            w.add_rope_scaling_yarn_beta_fast(float(rp["beta_fast"]))
        if rp.get("beta_slow") is not None:
            w.add_rope_scaling_yarn_beta_slow(float(rp["beta_slow"]))
    elif rope_type in ("su", "longrope"):
        w.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)
    else:
        raise InputError(f"config.json: rope type {rope_type!r} (factor {factor}) has no GGUF representation")


def _phi3_longrope_attn_factor(config: Mapping[str, Any], rp: Mapping[str, Any]) -> float:
    scale = config["max_position_embeddings"] / rp["original_max_position_embeddings"]
    kind = str(rp.get("rope_type", "")).lower()
    if kind in ("su", "longrope"):
        return math.sqrt(1 + math.log(scale) / math.log(rp["original_max_position_embeddings"])) if scale > 1.0 else 1.0
    if kind == "yarn":
        return 0.1 * math.log(scale) + 1.0 if scale > 1.0 else 1.0
    raise InputError(f"config.json: phi3 rope type {kind!r} with long_factor has no GGUF representation")


def metadata(config: Mapping[str, Any], model_dir: Path | None = None, file_type: str | int = "F16",
             *, name: str | None = None, tokenizer: bool = False) -> dict[str, tuple[Any, Any]]:
    """The keys :func:`add_metadata` (and with ``tokenizer``, :func:`add_tokenizer`) write:
    ``{key: (value, GGUFValueType)}``, computed without a file."""
    gguf = _gguf()
    w = gguf.GGUFWriter(path=None, arch=gguf_arch(config))
    add_metadata(w, config, model_dir, file_type, name=name)
    if tokenizer:
        add_tokenizer(w, Path(model_dir), config)
    return {k: (v.value, v.type) for k, v in w.kv_data[0].items()}


# -- tokenizer -------------------------------------------------------------------------------------

# llama.cpp identifies a BPE pre-tokenizer by the sha256 of str(tokenizer.encode(PROBE_TEXT))
# (convert_hf_to_gguf.py get_vocab_base_pre; the hashes are listed in convert_hf_to_gguf_update.py).
PROBE_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n\U0001f680 (normal) \U0001f636\u200d\U0001f32b\ufe0f "
    "(multiple emojis concatenated) \u2705 \U0001f999\U0001f999 3 33 333 3333 33333 333333 3333333 33333333 "
    "3.3 3..3 3...3 \u1780\u17b6\u1793\u17cb\u178f\u17c2\u1796\u17b7\u179f\u17c1\u179f\u17a2\u17b6\u1785"
    "\U0001f601 ?\u6211\u60f3\u5728apple\u5de5\u4f5c1314151\u5929\uff5e ------======= "
    "\u043d\u0435\u0449\u043e \u043d\u0430 \u0411\u044a\u043b\u0433\u0430\u0440\u0441\u043a\u0438 "
    "''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure I'll "
    "make it, 'D you like some tea? We'Ve a'lL"
)

# the hashes of the tokenizers our families ship (a subset of llama.cpp's table)
KNOWN_PRE_HASHES = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3 / 3.1 / 3.2
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5 / 2 / 2.5
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral Nemo
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # GPT-2
    "ccc2ef013c104be7bae2965776d611e1d7a8a2a9c547dd93a682c9a9fc80352e": "gpt-4o",  # Phi-4 family (o200k)
    "877081d19cf6996e2c4ff0e1236341e9b7bde288f5311a56a937f0afbbb3aeb5": "deepseek-v3",  # DeepSeek-V3 / R1
}


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: not readable JSON ({' '.join(str(e).split())[:120]})") from None


def _is_byte_level_bpe(tok: Mapping[str, Any]) -> bool:
    model = tok.get("model") or {}
    return (model.get("type") == "BPE" and not model.get("byte_fallback", False)
            and (tok.get("decoder") or {}).get("type") == "ByteLevel")


# the original (tokenizer.json) split regexes of llama.cpp's BPE pre-tokenizers for our families
# (llama-vocab.cpp quotes them beside its adapted forms)
PRE_BY_SPLIT_REGEX = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "qwen2",
}


def pre_from_structure(state: Mapping[str, Any]) -> str | None:
    """The llama.cpp pre-tokenizer a tokenizers-library state implements, when it is one we can
    name from its structure alone (a fine-tuned vocabulary changes llama.cpp's hash, not this):
    GPT-2's ByteLevel with its built-in regex -> ``gpt-2``; Split(Llama-3's / Qwen2's regex) then
    ByteLevel without regex -> ``llama-bpe`` / ``qwen2``."""
    pre = state.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel":
        plain = pre.get("use_regex", True) is True and not pre.get("add_prefix_space", False)
        return "gpt-2" if plain and state.get("normalizer") is None else None
    parts = pre.get("pretokenizers") if pre.get("type") == "Sequence" else None
    if not parts or len(parts) != 2:
        return None
    split, byte_level = parts
    if (split.get("type") != "Split" or split.get("behavior") != "Isolated" or split.get("invert")
            or byte_level.get("type") != "ByteLevel" or byte_level.get("use_regex", True)
            or byte_level.get("add_prefix_space", False)):
        return None
    return PRE_BY_SPLIT_REGEX.get((split.get("pattern") or {}).get("Regex"))


def _load_hf_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"{model_dir}: transformers cannot load the tokenizer ({' '.join(str(e).split())[:160]})") from None


def probe_hash(model_dir: Path, tokenizer=None) -> str:
    """llama.cpp's pre-tokenizer fingerprint of the HF tokenizer in ``model_dir``."""
    tokenizer = tokenizer if tokenizer is not None else _load_hf_tokenizer(Path(model_dir))
    return sha256(str(tokenizer.encode(PROBE_TEXT)).encode()).hexdigest()


def tokenizer_pre(model_dir: Path, tokenizer_json: Mapping[str, Any] | None = None) -> str:
    """``tokenizer.ggml.pre`` for a byte-level BPE tokenizer, judged on the tokenizer transformers
    actually builds for ``model_dir`` (transformers 5 may replace tokenizer.json's pre-tokenizer with
    the model type's own, e.g. Qwen2's): llama.cpp's hash when it is one of the tokenizers our
    families ship, else :func:`pre_from_structure`, else InputError naming the tokenizer (llama.cpp
    refuses unknown values)."""
    path = Path(model_dir) / "tokenizer.json"
    tokenizer = _load_hf_tokenizer(Path(model_dir))
    h = probe_hash(Path(model_dir), tokenizer)
    if h in KNOWN_PRE_HASHES:
        return KNOWN_PRE_HASHES[h]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
    else:
        state = tokenizer_json if tokenizer_json is not None else _read_json(path)
    pre = pre_from_structure(state)
    if pre is not None:
        return pre
    p = state.get("pre_tokenizer") or {}
    kinds = [x.get("type") for x in p.get("pretokenizers", [p])]
    raise InputError(
        f"{path}: BPE pre-tokenizer not recognised (llama.cpp probe hash {h[:16]}..., pre_tokenizer "
        f"{'+'.join(str(k) for k in kinds)}); llama.cpp rejects unknown tokenizer.ggml.pre values; "
        f"recognised: {', '.join(sorted(set(KNOWN_PRE_HASHES.values())))} by hash, gpt-2 / llama-bpe / qwen2 "
        "by their split regex"
    )


def _looks_special(token: str) -> bool:
    """convert_hf_to_gguf's does_token_look_special (added tokens some models forget to flag)."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<\uff5c") and token.endswith("\uff5c>"))
            or (token.startswith("<unused") and token.endswith(">")))


def add_tokenizer(writer, model_dir: Path, config: Mapping[str, Any]) -> None:
    """The tokenizer keys: ``tokenizer.ggml.model``/``pre``, tokens, token types (scores for
    SentencePiece), merges, special token ids, add_bos/add_eos, chat template.

    SentencePiece (``tokenizer.model``) -> ``llama``/``default`` (needs the sentencepiece package);
    byte-level BPE (``tokenizer.json``) -> ``gpt2`` with :func:`tokenizer_pre`. Anything else is an
    InputError naming the tokenizer.
    """
    gguf = _gguf()
    model_dir = Path(model_dir)
    family = get_arch(config).name
    vocab_size = int(config["vocab_size"])
    spm, tj = model_dir / "tokenizer.model", model_dir / "tokenizer.json"
    tok = _read_json(tj) if tj.is_file() else None
    if spm.is_file() and not (tok is not None and _is_byte_level_bpe(tok)):
        _add_sentencepiece(writer, model_dir, vocab_size)
        if family == "gemma":
            # GemmaModel.set_vocab: CodeGemma's FIM/EOT ids in Gemma's SentencePiece vocabulary
            sv = gguf.SpecialVocab(model_dir, load_merges=False,
                                   special_token_types=["prefix", "suffix", "middle", "fsep", "eot"])
            for typ, tid in (("prefix", 67), ("suffix", 69), ("middle", 68), ("fsep", 70), ("eot", 107)):
                sv._set_special_token(typ, tid)
            sv.chat_template = None
            sv.add_to_gguf(writer, quiet=True)
    elif tok is not None and _is_byte_level_bpe(tok):
        _add_bpe(writer, model_dir, vocab_size, tok)
    else:
        if tok is None:
            raise InputError(f"{model_dir}: no tokenizer.json or tokenizer.model; a GGUF needs the model's tokenizer")
        model = tok.get("model") or {}
        raise InputError(
            f"{tj}: tokenizer {model.get('type')!r} (byte_fallback={model.get('byte_fallback', False)}, decoder "
            f"{(tok.get('decoder') or {}).get('type')!r}) is not supported for GGUF; supported: byte-level BPE "
            "tokenizer.json, or SentencePiece tokenizer.model"
        )
    if family in ("gemma", "gemma2"):
        writer.add_add_space_prefix(False)  # Gemma*Model.set_vocab
    elif family in ("llama", "mistral"):
        tc = model_dir / "tokenizer_config.json"
        if tc.is_file() and (aps := _read_json(tc).get("add_prefix_space")) is not None:
            writer.add_add_space_prefix(bool(aps))  # LlamaModel.set_vocab


def _add_bpe(writer, model_dir: Path, vocab_size: int, tok: Mapping[str, Any]) -> None:
    """TextModel._set_vocab_gpt2: tokens by id (added tokens CONTROL when special, else
    USER_DEFINED), padded to the model's vocab_size with ``[PAD{i}]`` UNUSED."""
    gguf = _gguf()
    vocab = gguf.vocab.BpeVocab(model_dir)
    tokens: list[str | bytes] = []
    types: list[int] = []
    for text, _score, ttype in vocab.all_tokens():
        tokens.append(text)
        types.append(int(ttype))
    if len(tokens) > vocab_size:
        raise InputError(f"{model_dir}/tokenizer.json: {len(tokens)} tokens but config.json vocab_size={vocab_size}")
    for entry in tok.get("added_tokens") or []:
        i = int(entry["id"])
        if i >= vocab_size:
            raise InputError(f"{model_dir}/tokenizer.json: added token id {i} >= vocab_size {vocab_size}")
        while len(tokens) <= i:
            tokens.append(f"[PAD{len(tokens)}]")
            types.append(int(gguf.TokenType.UNUSED))
        content = str(entry["content"])
        tokens[i] = content
        types[i] = int(gguf.TokenType.CONTROL if entry.get("special") or _looks_special(content)
                       else gguf.TokenType.USER_DEFINED)
    while len(tokens) < vocab_size:
        tokens.append(f"[PAD{len(tokens)}]")
        types.append(int(gguf.TokenType.UNUSED))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(tokenizer_pre(model_dir, tok))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)


def _add_sentencepiece(writer, model_dir: Path, vocab_size: int) -> None:
    """TextModel._set_vocab_sentencepiece: pieces with scores and types, padded to vocab_size,
    added tokens from tokenizer_config.json's added_tokens_decoder on top."""
    gguf = _gguf()
    try:
        vocab = gguf.vocab.SentencePieceVocab(model_dir)
    except RuntimeError:
        raise InputError(
            f"{model_dir}/tokenizer.model: a SentencePiece tokenizer needs the sentencepiece package "
            "(pip install sentencepiece)"
        ) from None
    tokens: list[bytes] = [f"[PAD{i}]".encode() for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    types = [int(gguf.TokenType.UNUSED)] * vocab_size
    for i, (text, score, ttype) in enumerate(vocab.all_tokens()):
        if i >= vocab_size:
            break
        tokens[i], scores[i], types[i] = text, float(score), int(ttype)
    tc = model_dir / "tokenizer_config.json"
    decoder = _read_json(tc).get("added_tokens_decoder", {}) if tc.is_file() else {}
    for tid, data in decoder.items():
        i = int(tid)
        if i >= vocab_size:
            continue
        content = str(data["content"])
        if data.get("special") or _looks_special(content):
            types[i] = int(gguf.TokenType.CONTROL)
        else:
            content = content.replace("\u2581", " ")
            types[i] = int(gguf.TokenType.USER_DEFINED)
        tokens[i], scores[i] = content.encode("utf-8"), -1000.0
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    gguf.SpecialVocab(model_dir, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)


# -- tensor names and layout -----------------------------------------------------------------------


@lru_cache(maxsize=32)
def _name_map(arch_name: str, n_layers: int):
    return _gguf().get_tensor_name_map(_model_arch(arch_name), n_layers)


def expert_tensor(hf_name: str, config: Mapping[str, Any]) -> tuple[str, int | None] | None:
    """For a routed expert's weight: its stacked GGUF tensor and the expert's index in it.

    ``model.layers.3.mlp.experts.5.up_proj.weight`` -> (``blk.3.ffn_up_exps.weight``, 5); the stack's
    own name (the expert index left out: ``model.layers.3.mlp.experts.up_proj.weight``) -> (..., None).
    None for every other tensor."""
    arch = get_arch(config)
    if arch.moe is None or not hf_name.endswith(".weight"):
        return None
    ex = arch.moe.experts
    m = re.fullmatch(re.escape(arch.layers_path) + r"\.(\d+)\." + re.escape(ex.disk) + r"\.(?:(\d+)\.)?(\w+)\.weight", hf_name)
    if m is None or m.group(3) not in ex.linears:
        return None
    from .gguf_mix import EXPERT_STEMS

    e = int(m.group(2)) if m.group(2) is not None else None
    return f"blk.{int(m.group(1))}.{EXPERT_STEMS[ex.linears.index(m.group(3))]}.weight", e


# DeepSeek-V3's kv_b_proj is written as two tensors, under the converter's names for them
KV_B = "self_attn.kv_b_proj"
KV_B_PARTS = ("self_attn.k_b_proj", "self_attn.v_b_proj")


def mla_dims(config: Mapping[str, Any]) -> tuple[int, int, int, int]:
    """``(heads, qk_nope_head_dim, v_head_dim, kv_lora_rank)`` of a DeepSeek-V3 config."""
    return (int(config["num_attention_heads"]), int(config["qk_nope_head_dim"]), int(config["v_head_dim"]),
            int(config["kv_lora_rank"]))


def kv_b_parts(hf_name: str, config: Mapping[str, Any]) -> list[tuple[str, tuple[int, int, int]]] | None:
    """For DeepSeek-V3's ``...self_attn.kv_b_proj.weight``: the two tensors it is written as,
    ``[(k_b name, (H, kv_lora, nope)), (v_b name, (H, v, kv_lora))]`` (HF-style names the gguf name map
    knows: ``attn_k_b``/``attn_v_b``); None for every other tensor."""
    if not hf_name.endswith(KV_B + ".weight") or get_arch(config).name != "deepseek_v3":
        return None
    H, nope, v, r = mla_dims(config)
    stem = hf_name[: -len(KV_B + ".weight")]
    return [(f"{stem}{KV_B_PARTS[0]}.weight", (H, r, nope)), (f"{stem}{KV_B_PARTS[1]}.weight", (H, v, r))]


def split_kv_b(W, config: Mapping[str, Any]):
    """``kv_b_proj`` ``[H*(nope+v), kv_lora]`` -> ``(k_b [H, kv_lora, nope], v_b [H, v, kv_lora])``, as
    DeepseekV2Model.modify_tensors splits it: per head its first ``nope`` rows are k's, the next ``v``
    rows v's; k's block is transposed (llama.cpp absorbs it into q: ``q_nope @ k_b``)."""
    H, nope, v, r = mla_dims(config)
    kv = W.reshape(H, nope + v, r)
    return kv[:, :nope, :].transpose(1, 2).contiguous(), kv[:, nope:, :].contiguous()


def join_kv_b(k_b, v_b, config: Mapping[str, Any]):
    """Inverse of :func:`split_kv_b` (torch tensors)."""
    H, nope, v, r = mla_dims(config)
    return torch.cat([k_b.reshape(H, r, nope).transpose(1, 2), v_b.reshape(H, v, r)], dim=1).reshape(H * (nope + v), r)


def expert_stack_name(arch: Arch, i: int, j: int) -> str:
    """The HF-style name we give layer ``i``'s stacked experts of projection ``j`` (0 gate, 1 up, 2 down)."""
    ex = arch.moe.experts
    return f"{arch.layer_prefix(i)}{ex.disk}.{ex.linears[j]}.weight"


def gguf_tensor_name(hf_name: str, config: Mapping[str, Any]) -> str:
    """``model.layers.3.self_attn.q_proj.weight`` -> ``blk.3.attn_q.weight`` (gguf-py's map); a routed
    expert's weight (or its stack's name) -> the stacked ``blk.3.ffn_*_exps.weight``."""
    arch = get_arch(config)
    stacked = expert_tensor(hf_name, config)
    if stacked is not None:
        return stacked[0]
    if hf_name.endswith("e_score_correction_bias"):  # ModelBase.filter_tensors: a ".bias" the map knows
        hf_name = hf_name[: -len("_bias")] + ".bias"
    name = _name_map(FAMILY_TO_GGUF[arch.name], arch.num_layers(config)).get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise InputError(f"tensor {hf_name!r} has no GGUF name for {arch.name}; it is not part of a {arch.name} model")
    return name


def hf_tensor_names(config: Mapping[str, Any]) -> list[str]:
    """The HF tensors a GGUF of ``config`` holds, in the order we write them (a tied head is left out)."""
    arch = get_arch(config)
    _check_representable(config, arch)
    if arch.moe is not None:
        raise InputError(f"{arch.name}: a dense conversion does not stack experts; use `quantize gguf --type F16` "
                         "(or BF16) for a Mixture-of-Experts model")
    head = [n for n in arch.non_layer_tensor_names(config)]
    per_layer = [arch.layer_prefix(i) + r for i in range(arch.num_layers(config)) for r in arch.layer_tensor_names(config)]
    return [head[0]] + per_layer + head[1:]


def needs_qk_permute(arch: str) -> bool:
    """Whether GGUF arch ``arch`` stores q/k rows permuted (llama.cpp's rotary is interleaved there)."""
    return arch == "llama"


def permute_rows(W, n_head: int):
    """The llama q/k row permutation (numpy array or torch tensor, any trailing shape): within each
    head, rows [x0 .. x_{d/2-1} | y0 .. y_{d/2-1}] become [x0 y0 x1 y1 ...]."""
    rows = W.shape[0]
    return W.reshape(n_head, 2, rows // n_head // 2, *W.shape[1:]).swapaxes(1, 2).reshape(W.shape)


def unpermute_rows(W, n_head: int):
    """Inverse of :func:`permute_rows`."""
    rows = W.shape[0]
    return W.reshape(n_head, rows // n_head // 2, 2, *W.shape[1:]).swapaxes(1, 2).reshape(W.shape)


def qk_permute_heads(hf_name: str, config: Mapping[str, Any]) -> int | None:
    """The head count to permute ``hf_name``'s rows by (None: not permuted)."""
    if not needs_qk_permute(gguf_arch(config)):
        return None
    if hf_name.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
        return int(config["num_attention_heads"])
    if hf_name.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
        return int(config.get("num_key_value_heads") or config["num_attention_heads"])
    return None


def norm_offset(hf_name: str, config: Mapping[str, Any]) -> float:
    """What GGUF adds to ``hf_name``'s values: 1 for a Gemma norm weight (llama.cpp multiplies by the
    stored value; transformers by ``1 + w``), else 0."""
    if get_arch(config).name in ("gemma", "gemma2") and hf_name.endswith("norm.weight"):
        return 1.0
    return 0.0


def must_be_f32(gguf_name: str, shape) -> bool:
    """1-D tensors and every ``*_norm.weight`` are F32 (ModelBase.prepare_tensors)."""
    return len(tuple(shape)) <= 1 or gguf_name.endswith("_norm.weight")


def tensor_nbytes(shape, qtype) -> int:
    """Bytes of a tensor of logical ``shape`` ([rows, cols], HF order) stored as ``qtype``."""
    gguf = _gguf()
    qt = _qtype(qtype)
    block, size = gguf.GGML_QUANT_SIZES[qt]
    shape = tuple(int(s) for s in shape)
    if shape[-1] % block:
        raise ValueError(f"{qt.name}: row width {shape[-1]} is not a multiple of its block size {block}")
    return math.prod(shape) // block * size


def extra_tensors(config: Mapping[str, Any]) -> list[tuple[str, np.ndarray]]:
    """Tensors llama.cpp needs that the checkpoint does not hold: Llama-3.1-style ``rope_freqs``
    (LlamaModel.generate_extra_tensors), Phi-3 LongRoPE ``rope_factors_long/short``."""
    arch = get_arch(config)
    rp = _rope_params(config)
    if arch.name in ("llama", "mistral") and str(rp.get("rope_type", "")).lower() == "llama3":
        base = float(rp.get("rope_theta", 10000.0))
        dim = _head_dim(config)
        freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        factor = float(rp.get("factor", 8.0))
        low, high = float(rp.get("low_freq_factor", 1.0)), float(rp.get("high_freq_factor", 4.0))
        old_ctx = float(rp.get("original_max_position_embeddings", 8192))
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        out = []
        for f in freqs.tolist():
            wavelen = 2 * math.pi / f
            if wavelen < high_wavelen:
                out.append(1.0)
            elif wavelen > low_wavelen:
                out.append(factor)
            else:
                smooth = (old_ctx / wavelen - low) / (high - low)
                out.append(1 / ((1 - smooth) / factor + smooth))
        return [("rope_freqs.weight", np.asarray(out, dtype=np.float32))]
    if arch.name == "phi3" and rp.get("long_factor"):
        long_f, short_f = rp.get("long_factor"), rp.get("short_factor")
        n_head = int(config["num_attention_heads"])
        rope_dims = int(float(rp.get("partial_rotary_factor", 1.0)) * int(config["hidden_size"])) // n_head
        if short_f is None or len(long_f) != len(short_f) or len(long_f) * 2 != rope_dims:
            raise InputError(f"config.json: phi3 rope long_factor/short_factor must both have {rope_dims // 2} values")
        return [("rope_factors_long.weight", np.asarray(long_f, dtype=np.float32)),
                ("rope_factors_short.weight", np.asarray(short_f, dtype=np.float32))]
    return []


# llama.cpp's vocabulary loader (llama-vocab.cpp) sets Phi-3's token attributes whenever
# general.name contains "phi3"/"phi-3", looking these tokens up by text: without them it cannot load
PHI3_NAME_TOKENS = ("</s>", "<unk>", "<s>", "<|endoftext|>")


def _safe_name(name: str | None, model_dir: Path, tokens) -> str:
    """``general.name``: ``name``, else the model directory's name; one llama.cpp would refuse to
    load with this vocabulary is an InputError when given, replaced by ``model`` when derived."""
    chosen = name or Path(model_dir).name
    if any(s in chosen.lower() for s in ("phi3", "phi-3")):
        have = {t if isinstance(t, str) else bytes(t).decode("utf-8", "replace") for t in tokens}
        missing = [t for t in PHI3_NAME_TOKENS if t not in have]
        if missing:
            if name is not None:
                raise InputError(
                    f"GGUF name {name!r}: llama.cpp applies Phi-3 token attributes to a model whose name contains "
                    f"'phi3'/'phi-3' and then fails on this vocabulary (no {missing[0]!r}); choose another name"
                )
            log.warning("general.name %r would make llama.cpp look for Phi-3's tokens (missing %s); writing 'model'",
                        chosen, missing[0])
            return "model"
    return chosen


# -- the streaming writer --------------------------------------------------------------------------


class _Planned:
    __slots__ = ("hf_name", "gguf_name", "shape", "qtype", "nbytes", "heads", "offset")

    def __init__(self, hf_name, gguf_name, shape, qtype, nbytes, heads, offset):
        self.hf_name, self.gguf_name, self.shape, self.qtype = hf_name, gguf_name, shape, qtype
        self.nbytes, self.heads, self.offset = nbytes, heads, offset


def _is_raw(data) -> bool:
    if isinstance(data, (bytes, bytearray, memoryview)):
        return True
    if isinstance(data, np.ndarray):
        return data.dtype == np.uint8
    if isinstance(data, torch.Tensor):
        return data.dtype == torch.uint8
    raise TypeError(f"tensor data must be a torch.Tensor, a numpy array or bytes, not {type(data).__name__}")


def _raw_rows(data, rows: int, p: _Planned) -> np.ndarray:
    if isinstance(data, torch.Tensor):
        arr = data.detach().cpu().contiguous().numpy()
    elif isinstance(data, np.ndarray):
        arr = np.ascontiguousarray(data)
    else:
        arr = np.frombuffer(data, dtype=np.uint8)
    if arr.nbytes != p.nbytes:
        raise ValueError(f"{p.hf_name}: {arr.nbytes} bytes of data, {p.qtype.name} {p.shape} takes {p.nbytes}")
    return arr.reshape(rows, -1)


def _dense_f32(data) -> torch.Tensor:
    t = data.detach().cpu() if isinstance(data, torch.Tensor) else torch.from_numpy(np.asarray(data))
    if not t.is_floating_point():
        raise TypeError(f"dense tensor data must be floating point, got {t.dtype}")
    return t.to(torch.float32)


class GGUFStreamWriter:
    """Write a GGUF one tensor at a time.

    >>> w = GGUFStreamWriter(out / "model.gguf", config, model_dir, "Q4_K_M")
    >>> for name in names: w.add_tensor_info(name, shape_of[name], qtype_of[name])
    >>> w.write_header()
    >>> for name in names: w.write_tensor(name, data)   # same order; one tensor in memory at a time
    >>> w.close()

    Names are HF names (``model.layers.0.self_attn.q_proj.weight``) and data is in HF layout; the
    writer maps the names, permutes llama's q/k rows (dense or raw block bytes: rows are quantized
    independently, so permuting the byte rows is the same as quantizing the permuted rows), adds
    Gemma's norm offset, and appends the tensors llama.cpp needs that no checkpoint holds
    (:func:`extra_tensors`). ``data`` is a floating tensor/array (written as F32/F16/BF16, or
    quantized with gguf-py for Q8_0/Q4_0/Q4_1/Q5_0/Q5_1) or the raw bytes of ``qtype``
    (``uint8``/``bytes``, e.g. from ``quantize.formats.gguf_blocks.pack``).
    """

    def __init__(self, path: Path, config: Mapping[str, Any], model_dir: Path, file_type: str | int = "F16",
                 *, name: str | None = None):
        gguf = _gguf()
        self.path = Path(path)
        self.config = dict(config)
        self.arch = get_arch(self.config)
        _check_representable(self.config, self.arch)
        self.gguf_arch = FAMILY_TO_GGUF[self.arch.name]
        self.file_type = _file_type(file_type)
        for note in llama_cpp_caveats(self.config):
            log.warning(note)
        self._w = gguf.GGUFWriter(path=None, arch=self.gguf_arch)
        add_tokenizer(self._w, Path(model_dir), self.config)
        name = _safe_name(name, Path(model_dir), self._w.kv_data[0][gguf.Keys.Tokenizer.LIST].value)
        add_metadata(self._w, self.config, model_dir, self.file_type, name=name)
        self._plan: list[_Planned] = []
        self._by_name: dict[str, _Planned] = {}
        self._extras = extra_tensors(self.config)
        self._next = 0
        self._state = "planning"
        self._offset = 0

    # -- planning ------------------------------------------------------------------------------

    def add_tensor_info(self, name: str, shape, qtype, nbytes: int | None = None) -> str:
        """Declare tensor ``name`` (HF name, HF shape); returns its GGUF name."""
        gguf = _gguf()
        if self._state != "planning":
            raise RuntimeError("add_tensor_info after write_header")
        if name in self._by_name:
            raise ValueError(f"tensor {name!r} declared twice")
        gname = gguf_tensor_name(name, self.config)
        if gname == "output.weight" and self.arch.is_tied(self.config):
            raise ValueError(f"{name}: the head is tied to the embeddings; llama.cpp reuses token_embd (do not write it)")
        shape = tuple(int(s) for s in shape)
        qt = _qtype(qtype)
        if must_be_f32(gname, shape) and qt != gguf.GGMLQuantizationType.F32:
            raise ValueError(f"{name} ({gname}): 1-D tensors and norms are F32 in GGUF, not {qt.name}")
        expected = tensor_nbytes(shape, qt)
        if nbytes is not None and int(nbytes) != expected:
            raise ValueError(f"{name}: {nbytes} bytes declared, {qt.name} {shape} takes {expected}")
        heads = qk_permute_heads(name, self.config)
        p = _Planned(name, gname, shape, qt, expected, heads, self._offset)
        self._offset += self._w.ggml_pad(expected, self._w.data_alignment)
        self._plan.append(p)
        self._by_name[name] = p
        # gguf-py takes the logical shape as given when raw_dtype is set and the dtype is not uint8
        self._w.add_tensor_info(gname, shape, np.dtype(np.float32), expected, raw_dtype=qt)
        return gname

    def write_header(self) -> None:
        """Write the header, metadata and tensor infos; tensor data follows with :meth:`write_tensor`."""
        gguf = _gguf()
        if self._state != "planning":
            raise RuntimeError("write_header called twice")
        for gname, arr in self._extras:
            self._w.add_tensor_info(gname, arr.shape, arr.dtype, arr.nbytes, raw_dtype=gguf.GGMLQuantizationType.F32)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._w.write_header_to_file(path=self.path)
        self._w.write_kv_data_to_file()
        self._w.write_ti_data_to_file()
        self._state = "writing"

    # -- data ----------------------------------------------------------------------------------

    def write_tensor(self, name: str, data) -> None:
        """Write the data of the next declared tensor (must be ``name``)."""
        if self._state != "writing":
            raise RuntimeError("write_tensor before write_header (or after close)")
        if self._next >= len(self._plan):
            raise ValueError(f"{name}: every declared tensor has been written")
        p = self._plan[self._next]
        if p.hf_name != name:
            raise ValueError(f"write_tensor({name!r}): the next declared tensor is {p.hf_name!r} (same order as add_tensor_info)")
        arr = self._encode(p, data)
        if arr.nbytes != p.nbytes:
            raise ValueError(f"{name}: {arr.nbytes} bytes of data, {p.qtype.name} {p.shape} takes {p.nbytes}")
        self._w.write_tensor_data(arr)
        self._next += 1

    def _encode(self, p: _Planned, data) -> np.ndarray:
        gguf = _gguf()
        qname = p.qtype.name
        offset = norm_offset(p.hf_name, self.config)
        rows = math.prod(p.shape[:-1]) if len(p.shape) > 1 else 1
        if _is_raw(data):
            if offset:  # a norm given as raw F32 bytes
                data = torch.from_numpy(_raw_rows(data, rows, p).reshape(-1).view(np.float32).copy()).reshape(p.shape)
            else:
                arr = _raw_rows(data, rows, p)
                if p.heads is not None:
                    arr = np.ascontiguousarray(permute_rows(arr, p.heads))
                return arr
        t = _dense_f32(data)
        if tuple(t.shape) != p.shape:
            raise ValueError(f"{p.hf_name}: data shape {tuple(t.shape)}, declared {p.shape}")
        if offset:
            t = t + offset
        if p.heads is not None:
            t = permute_rows(t, p.heads)
        t = t.contiguous()
        if qname == "F32":
            return t.numpy()
        if qname == "F16":
            return t.to(torch.float16).numpy()
        if qname == "BF16":
            return t.to(torch.bfloat16).view(torch.int16).numpy()
        if qname in _GGUFPY_QUANTIZES:
            return gguf.quants.quantize(t.numpy(), p.qtype)
        raise ValueError(f"{p.hf_name}: {qname} needs raw block bytes (quantize.formats.gguf_blocks), not a dense tensor")

    def close(self) -> None:
        """Write the generated tensors and close the file (checks every declared tensor was written)."""
        if self._state == "closed":
            return
        try:
            if self._state == "writing":
                if self._next != len(self._plan):
                    missing = self._plan[self._next].hf_name
                    raise ValueError(f"close(): {len(self._plan) - self._next} declared tensors not written (next: {missing})")
                for _gname, arr in self._extras:
                    self._w.write_tensor_data(arr)
                self._w.flush()
        finally:
            self._w.close()
            self._state = "closed"

    def abort(self) -> None:
        self._w.close()
        self._state = "closed"

    def __enter__(self) -> GGUFStreamWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


# -- output directory ------------------------------------------------------------------------------


def copy_sidecar_files(model_dir: Path, out_dir: Path, config: Mapping[str, Any] | None = None) -> None:
    """config.json (the HF config without any quantization_config) and the tokenizer files beside
    model.gguf, so our reader and transformers' GGUF loader both find what they need."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = dict(config) if config is not None else _read_json(model_dir / "config.json")
    cfg.pop("quantization_config", None)
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    for name in SIDECAR_FILES:
        src = model_dir / name
        if src.is_file():
            shutil.copyfile(src, out_dir / name)


def default_qtype(gguf_name: str, shape, file_type: str) -> str:
    """The type convert_hf_to_gguf's ``--outtype`` gives a tensor for the dense file types
    (F32/F16/BF16/Q8_0): F32 for 1-D and norms, the outtype for everything else."""
    ft = str(file_type).upper()
    if ft not in ("F32", "F16", "BF16", "Q8_0"):
        raise InputError(f"GGUF file type {file_type!r} is not a dense conversion; quantized mixes come from the quantizer")
    return "F32" if must_be_f32(gguf_name, shape) else ft


def write_gguf_directory(model_dir: Path, out_dir: Path, file_type: str = "F16", *,
                         qtype_for: Callable[[str, tuple[int, ...]], str] | None = None,
                         name: str | None = None) -> Path:
    """Convert an HF checkpoint directory to ``out_dir/model.gguf`` (+ config.json and tokenizer
    files), streaming one tensor at a time. ``qtype_for(gguf_name, shape)`` overrides the type."""
    from ..io.reader import CheckpointReader

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    with CheckpointReader(model_dir) as reader:
        config = reader.config
        names = hf_tensor_names(config)
        missing = [n for n in names if n not in reader]
        if missing:
            raise InputError(f"{model_dir}: tensor {missing[0]!r} is missing ({len(missing)} missing)")
        writer = GGUFStreamWriter(out_dir / GGUF_FILE, config, model_dir, file_type, name=name)
        with writer:
            for n in names:
                shape = tuple(reader.shape(n))
                gname = gguf_tensor_name(n, config)
                qt = qtype_for(gname, shape) if qtype_for else default_qtype(gname, shape, file_type)
                writer.add_tensor_info(n, shape, qt)
            writer.write_header()
            for n in names:
                writer.write_tensor(n, reader.get(n))
    copy_sidecar_files(model_dir, out_dir, config)
    return out_dir / GGUF_FILE


# -- the reader ------------------------------------------------------------------------------------


def _field_value(field):
    """A metadata field's value: a scalar or string, or a list for an array."""
    return field.contents() if field.types else None


def config_from_metadata(meta: Mapping[str, Any], tensor_names: set[str]) -> dict[str, Any]:
    """An HF-style config.json dict rebuilt from GGUF metadata (used when no config.json is beside
    the file). Covers the keys our families' transformers configs need."""
    arch_name = meta.get("general.architecture")
    family = GGUF_TO_FAMILY.get(str(arch_name))
    if family is None:
        raise InputError(f"GGUF architecture {arch_name!r} is not supported; supported: {', '.join(sorted(GGUF_TO_FAMILY))}")
    from ..arch import by_name

    arch = by_name(family)
    a = arch_name

    def key(k, default=None):
        return meta.get(f"{a}.{k}", default)

    hidden, heads = int(key("embedding_length")), int(key("attention.head_count"))
    vocab = key("vocab_size") or len(meta.get("tokenizer.ggml.tokens") or [])
    head_dim = key("attention.key_length") or key("rope.dimension_count") or hidden // heads
    cfg: dict[str, Any] = {
        "architectures": [arch.architectures[0]],
        "model_type": arch.model_type,
        "hidden_size": hidden,
        "intermediate_size": int(key("feed_forward_length")),
        "num_hidden_layers": int(key("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(key("attention.head_count_kv", heads)),
        "head_dim": int(head_dim),
        "max_position_embeddings": int(key("context_length")),
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(key("rope.freq_base", 10000.0)),
        "vocab_size": int(vocab),
        "tie_word_embeddings": "output.weight" not in tensor_names,
    }
    for tk, ck in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"), ("padding_token_id", "pad_token_id")):
        if f"tokenizer.ggml.{tk}" in meta:
            cfg[ck] = int(meta[f"tokenizer.ggml.{tk}"])
    if family == "llama" and key("expert_count"):
        family, arch = "mixtral", by_name("mixtral")
        cfg.update(architectures=[arch.architectures[0]], model_type=arch.model_type)
    if arch.moe is not None:
        cfg[arch.moe.experts.num_keys[0]] = int(key("expert_count"))
        cfg["num_experts_per_tok"] = int(key("expert_used_count"))
        cfg["norm_topk_prob"] = _RENORMALISES.get(family, False)  # deepseek2: expert_weights_norm, below
        if key("expert_feed_forward_length") is not None:
            cfg["moe_intermediate_size"] = int(key("expert_feed_forward_length"))
        if key("expert_shared_feed_forward_length") is not None:
            cfg["shared_expert_intermediate_size"] = int(key("expert_shared_feed_forward_length"))
    if family == "deepseek_v3":
        cfg.update(_deepseek_config(key, heads))
    if family == "llama" and "blk.0.attn_q.bias" in tensor_names:
        cfg["attention_bias"] = True
    if family == "gemma2":
        cfg["attn_logit_softcapping"] = float(key("attn_logit_softcapping", 50.0))
        cfg["final_logit_softcapping"] = float(key("final_logit_softcapping", 30.0))
        cfg["sliding_window"] = int(key("attention.sliding_window", 4096))
        cfg["query_pre_attn_scalar"] = int(head_dim)
    if family == "phi3":
        cfg["original_max_position_embeddings"] = int(key("rope.scaling.original_context_length", cfg["max_position_embeddings"]))
        sw = key("attention.sliding_window")
        cfg["sliding_window"] = int(sw) if sw else None
    return cfg


def _deepseek_config(key: Callable[..., Any], heads: int) -> dict[str, Any]:
    """The DeepSeek-V3 config keys deepseek2's metadata holds (the inverse of _add_deepseek_metadata)."""
    rope = int(key("rope.dimension_count"))
    cfg: dict[str, Any] = {
        "num_key_value_heads": heads,  # the file's 1 is MLA's MQA view; transformers' kv_b is per head
        "head_dim": rope,  # DeepseekV3Config's own value
        "q_lora_rank": int(key("attention.q_lora_rank", 0)) or None,  # 0 / absent: a plain q_proj (attn_q)
        "kv_lora_rank": int(key("attention.kv_lora_rank")),
        "qk_rope_head_dim": rope,
        "qk_nope_head_dim": int(key("attention.key_length_mla")) - rope,
        "v_head_dim": int(key("attention.value_length_mla")),
        "moe_intermediate_size": int(key("expert_feed_forward_length")),
        "n_shared_experts": int(key("expert_shared_count", 0)),
        "first_k_dense_replace": int(key("leading_dense_block_count", 0)),
        "n_group": int(key("expert_group_count", 1)),
        "topk_group": int(key("expert_group_used_count", 1)),
        "routed_scaling_factor": float(key("expert_weights_scale", 1.0)),
        "norm_topk_prob": bool(key("expert_weights_norm", False)),
        "rope_interleave": True,
    }
    if key("rope.scaling.type") == "yarn":
        rp = {"rope_type": "yarn", "rope_theta": float(key("rope.freq_base", 10000.0)),
              "factor": float(key("rope.scaling.factor")),
              "original_max_position_embeddings": int(key("rope.scaling.original_context_length"))}
        for gk, hk in (("rope.scaling.yarn_beta_fast", "beta_fast"), ("rope.scaling.yarn_beta_slow", "beta_slow"),
                       ("rope.scaling.yarn_attn_factor", "attention_factor")):
            if key(gk) is not None:
                rp[hk] = float(key(gk))
        if key("rope.scaling.yarn_log_multiplier") is not None:
            rp["mscale_all_dim"] = rp["mscale"] = float(key("rope.scaling.yarn_log_multiplier")) / 0.1
        cfg["rope_parameters"] = rp
    return cfg


class GGUFCheckpoint(Closing):
    """A GGUF file (or a directory holding ``model.gguf``) as dense HF tensors, read one at a time.

    Quacks like :class:`quantize.io.reader.CheckpointReader` for the streaming executor and eval:
    ``names()`` are HF names, ``shape``/``dtype``/``get`` give the dense fp32 weight (dequantized with
    gguf-py, q/k rows un-permuted, Gemma's norm offset removed). ``config`` is the config.json beside
    the file, else one rebuilt from the GGUF metadata.
    """

    def __init__(self, path: Path):
        gguf = _gguf()
        p = Path(path)
        self.path = p / GGUF_FILE if p.is_dir() else p
        if not self.path.is_file():
            raise InputError(f"{self.path}: no such GGUF file")
        self.directory = self.path.parent
        try:
            reader = gguf.GGUFReader(self.path)
        except (ValueError, OSError) as e:
            raise InputError(f"{self.path}: not a readable GGUF file ({' '.join(str(e).split())[:160]})") from None
        self.metadata: dict[str, Any] = {}
        for k, field in reader.fields.items():
            if k.startswith("GGUF."):
                continue
            try:
                self.metadata[k] = _field_value(field)
            except (ValueError, UnicodeDecodeError):
                continue
        self._tensors: dict[str, tuple[Any, tuple[int, ...], int, int]] = {}
        for t in reader.tensors:
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))
            self._tensors[t.name] = (t.tensor_type, shape, int(t.n_bytes), int(t.data_offset))
        del reader
        cfg_path = self.directory / "config.json"
        if cfg_path.is_file():
            self._config = _read_json(cfg_path)
        else:
            self._config = config_from_metadata(self.metadata, set(self._tensors))
        arch = get_arch(self._config, source=str(cfg_path))
        self._hf_to_gguf: dict[str, str] = {}
        self._expert: dict[str, int] = {}  # a routed expert's weight -> its index in the stacked tensor
        self._kv_b: dict[str, tuple[str, str]] = {}  # DeepSeek's kv_b_proj -> its (attn_k_b, attn_v_b)
        names = arch.expected_tensor_names(self._config)
        if arch.name == "deepseek_v3":  # the router's e_score_correction_bias (exp_probs_b), where written
            names += [f"{arch.layer_prefix(i)}mlp.gate.e_score_correction_bias" for i in range(arch.num_layers(self._config))
                      if arch.is_sparse_layer(self._config, i)]
        for hf in dict.fromkeys(names):
            parts = kv_b_parts(hf, self._config)
            if parts is not None:
                gk, gv = (gguf_tensor_name(n, self._config) for n, _ in parts)
                if gk in self._tensors and gv in self._tensors:
                    self._kv_b[hf] = (gk, gv)
                    self._hf_to_gguf[hf] = gv
                continue
            g = gguf_tensor_name(hf, self._config)
            if g in self._tensors:
                self._hf_to_gguf[hf] = g
                stacked = expert_tensor(hf, self._config)
                if stacked is not None:
                    self._expert[hf] = stacked[1]
        known = (set(self._hf_to_gguf.values()) | {k for k, _ in self._kv_b.values()}
                 | {"rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight"})
        unknown = sorted(set(self._tensors) - known)
        if unknown:
            raise InputError(f"{self.path}: tensor {unknown[0]!r} is not part of a {arch.name} model as config.json describes it")
        self._names = sorted(self._hf_to_gguf)
        self._fd: int | None = None

    # -- queries -------------------------------------------------------------------------------

    @property
    def config(self) -> dict:
        return self._config

    @property
    def total_bytes(self) -> int:
        return sum(v[2] for v in self._tensors.values())

    def names(self) -> list[str]:
        return list(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._hf_to_gguf

    def __len__(self) -> int:
        return len(self._names)

    def __iter__(self):
        return iter(self._names)

    def gguf_name(self, name: str) -> str:
        try:
            return self._hf_to_gguf[name]
        except KeyError:
            raise InputError(f"{self.path}: has no tensor {name!r} ({len(self._names)} tensors)") from None

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self._kv_b:
            H, nope, v, r = mla_dims(self._config)
            return (H * (nope + v), r)
        shape = self._tensors[self.gguf_name(name)][1]
        return shape[1:] if name in self._expert else shape

    def dtype(self, name: str) -> torch.dtype:
        self.gguf_name(name)
        return torch.float32

    def qtype(self, name: str) -> str:
        """The GGML type ``name`` is stored as (``"Q4_K"``; DeepSeek's kv_b: ``"<k_b's>+<v_b's>"``)."""
        if name in self._kv_b:
            return "+".join(self._tensors[g][0].name for g in self._kv_b[name])
        return self._tensors[self.gguf_name(name)][0].name

    # -- reads ---------------------------------------------------------------------------------

    def raw(self, name: str) -> np.ndarray:
        """The stored bytes of ``name`` (GGUF row order, i.e. permuted for llama q/k), uint8; a routed
        expert's: its slice of the stacked tensor; DeepSeek's kv_b: attn_k_b's bytes then attn_v_b's."""
        if name in self._kv_b:
            return np.concatenate([self._read(g) for g in self._kv_b[name]])
        return self._read(self.gguf_name(name), self._expert.get(name))

    def _read(self, gname: str, expert: int | None = None) -> np.ndarray:
        _qt, shape, n, offset = self._tensors[gname]
        if expert is not None:  # one expert's rows of a stacked [E, rows, cols] tensor
            n //= shape[0]
            offset += expert * n
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        buf = bytearray(n)
        view, done = memoryview(buf), 0
        while done < n:
            got = os.preadv(self._fd, [view[done:]], offset + done)
            if got <= 0:
                raise InputError(f"{self.path}: truncated at tensor {gname!r}")
            done += got
        return np.frombuffer(buf, dtype=np.uint8)

    def get(self, name: str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> torch.Tensor:
        """The dense fp32 weight ``name`` in HF layout (cast to ``dtype`` when given)."""
        if name in self._kv_b:  # re-assembled from attn_k_b (transposed per head) and attn_v_b
            k_b, v_b = (self._dense(g) for g in self._kv_b[name])
            return join_kv_b(k_b, v_b, self._config).to(device=device, dtype=dtype or torch.float32)
        gname = self.gguf_name(name)
        t = self._dense(gname, self._expert.get(name))
        heads = qk_permute_heads(name, self._config)
        if heads is not None:
            t = unpermute_rows(t, heads).contiguous()
        offset = norm_offset(name, self._config)
        if offset:
            t = t - offset
        return t.to(device=device, dtype=dtype or torch.float32)

    def _dense(self, gname: str, expert: int | None = None) -> torch.Tensor:
        """GGUF tensor ``gname`` (or one expert's slice of it) dequantized to fp32, in its stored layout."""
        gguf = _gguf()
        qt, shape, _n, _off = self._tensors[gname]
        raw = self._read(gname, expert)
        if expert is not None:
            shape = shape[1:]
        if qt == gguf.GGMLQuantizationType.F32:
            dense = raw.view(np.float32)
        elif qt == gguf.GGMLQuantizationType.F16:
            dense = raw.view(np.float16).astype(np.float32)
        else:
            rows = math.prod(shape[:-1]) if len(shape) > 1 else 1
            dense = gguf.quants.dequantize(raw.reshape(rows, -1), qt)
        return torch.from_numpy(np.ascontiguousarray(dense, dtype=np.float32).reshape(shape))

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


    def __repr__(self) -> str:
        return f"GGUFCheckpoint({str(self.path)!r}, {len(self._names)} tensors)"
