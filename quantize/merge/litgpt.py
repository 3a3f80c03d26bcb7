"""Lit-GPT checkpoints (full weights, optionally plus a Lit-GPT LoRA) → HF safetensors (MERGE.md §1–§3).

Input: a Lit-GPT checkpoint directory (``lit_model.pth`` + ``model_config.yaml``, usually also the
original ``config.json`` and tokenizer) and, optionally, a LoRA output directory
(``lit_model.pth.lora`` + ``hyperparameters.yaml``) merged on the fly. Output: the HF on-disk names
of the family (:mod:`quantize.arch`), with

* the fused ``attn.qkv`` split into q/k/v (plain concatenation, current layout) or kept fused for
  Phi-3's ``qkv_proj``; legacy ``attn.attn`` checkpoints (rows interleaved per query group) are
  de-interleaved first;
* Phi-3's ``gate_up_proj`` built as ``[fc_1; fc_2]``;
* LoRA on the fused QKV applied block-diagonally (``W_q += s·B_q·A_q``, ...) before splitting;
* the head written only when it differs from the embedding (§2.6). Tying is decided from the
  checkpoint unless the HF config.json says ``tie_word_embeddings: false``: a ``lm_head`` that *is*
  the embedding (same storage in ``lit_model.pth``, or bit-identical when compared in row chunks)
  is written once with ``tie_word_embeddings: true``, as the family's HF release has it, whether or
  not a config.json is at hand; the decision and its evidence go to the manifest;
* ``config.json`` copied from the original (validated against ``model_config.yaml``) or, for
  models without one, synthesized from ``model_config.yaml`` (§2.7).

The per-family Lit→HF names are data (:data:`LIT_NORMS` plus the linear names of the arch table).
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

from .. import log
from .. import manifest as mf
from ..arch import Arch, by_name, get_arch
from ..errors import InputError
from ..io.atomic import StagedOutput
from ..io.reader import CheckpointReader
from ..io.torchfile import TORCH_SUFFIXES, load_torch_file
from ..io.writer import AUX_FILES, DEFAULT_MAX_SHARD_BYTES
from .bnb4 import Bnb4RoundTrip, Bnb4Setting
from .output import parse_dtype, patch_config, refuse_quantized, write_output
from .qlora import BaseQuant, litgpt_record, resolve
from .stream import (
    Arena,
    FusedQkvLora,
    Job,
    LinearLora,
    Produced,
    TensorJob,
    TiedEmbeddingJob,
    Update,
    apply_updates,
    finish,
    first_difference,
    output_dtype,
)

WEIGHTS = "lit_model.pth"
LORA_WEIGHTS = "lit_model.pth.lora"
MODEL_CONFIG = "model_config.yaml"
HPARAMS = "hyperparameters.yaml"

# Per-layer norms: Lit-GPT module -> HF module, per family (§2.2 A, D, E, F, I).
_LLAMA_NORMS = (("norm_1", "input_layernorm"), ("norm_2", "post_attention_layernorm"))
LIT_NORMS: dict[str, tuple[tuple[str, str], ...]] = {
    "llama": _LLAMA_NORMS,
    "mistral": _LLAMA_NORMS,
    "qwen2": _LLAMA_NORMS,
    "qwen3": _LLAMA_NORMS + (("attn.norm_q", "self_attn.q_norm"), ("attn.norm_k", "self_attn.k_norm")),
    "gemma": _LLAMA_NORMS,
    # Gemma-2 sandwich norms: Lit's norm_2 is the pre-MLP norm
    "gemma2": (("norm_1", "input_layernorm"), ("post_attention_norm", "post_attention_layernorm"),
               ("norm_2", "pre_feedforward_layernorm"), ("post_mlp_norm", "post_feedforward_layernorm")),
    "phi3": _LLAMA_NORMS,
}
# HF linears (relative names) per Lit linear; the fused variants are chosen when the arch table has them.
_SPLIT_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_FUSED_QKV = "self_attn.qkv_proj"
_FUSED_GATE_UP = "mlp.gate_up_proj"
_MLP = {"mlp.fc_1": "mlp.gate_proj", "mlp.fc_2": "mlp.up_proj", "mlp.proj": "mlp.down_proj"}

# Lit-GPT linear modules (bitsandbytes-quantized under --quantize bnb.*, with lm_head).
_LIT_LINEARS = (".attn.qkv", ".attn.attn", ".attn.proj", ".mlp.fc_1", ".mlp.fc_2", ".mlp.proj", ".mlp.fc")

# Lit-GPT LoRA hyperparameters and their defaults (litgpt finetune_lora).
LORA_DEFAULTS: dict[str, Any] = {
    "lora_r": 8, "lora_alpha": 16, "lora_query": True, "lora_key": False, "lora_value": True,
    "lora_projection": False, "lora_mlp": False, "lora_head": False,
}


# ---------------------------------------------------------------------------------------------
# Lit-GPT config


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise InputError(f"{path}: not readable YAML ({' '.join(str(e).split())[:120]}); re-save it") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: is not a YAML mapping; re-save it")
    return data


@dataclass(frozen=True)
class LitConfig:
    """The fields of ``model_config.yaml`` the conversion needs."""

    raw: Mapping[str, Any]
    path: Path

    def get(self, key: str, default: Any = None) -> Any:
        return self.raw.get(key, default)

    def int(self, key: str) -> int:
        v = self.raw.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise InputError(f"{self.path}: {key}={v!r} is not a positive integer; fix model_config.yaml")
        return v

    @property
    def n_head(self) -> int:
        return self.int("n_head")

    @property
    def n_query_groups(self) -> int:
        return self.raw.get("n_query_groups") or self.n_head

    @property
    def head_size(self) -> int:
        return self.raw.get("head_size") or self.int("n_embd") // self.n_head

    @property
    def qkv_sizes(self) -> tuple[int, int, int]:
        q, kv = self.n_head * self.head_size, self.n_query_groups * self.head_size
        return q, kv, kv


def lit_family(cfg: LitConfig) -> str:
    """Which supported HF family a Lit-GPT config describes (decided by config flags, §2.1)."""
    mlp, name = cfg.get("mlp_class_name"), str(cfg.get("name") or "").lower()
    unsupported = None
    if cfg.get("parallel_residual") or cfg.get("shared_attention_norm"):
        unsupported = "parallel-residual models (GPT-NeoX, Falcon, Phi-2)"
    elif cfg.get("norm_class_name", "RMSNorm") != "RMSNorm":
        unsupported = f"{cfg.get('norm_class_name')} models (StableLM, OLMo-1, GPT-NeoX)"
    elif mlp == "LLaMAMLP":
        if cfg.get("post_attention_norm") or cfg.get("post_mlp_norm"):
            unsupported = "OLMo-2"
        elif name.startswith(("phi-3", "phi-4")):
            return "phi3"
        elif cfg.get("norm_qk"):
            return "qwen3"
        elif cfg.get("attn_bias") and not cfg.get("bias"):
            return "qwen2"
        elif name.startswith(("mistral", "mathstral")):
            return "mistral"
        else:
            return "llama"
    elif mlp == "GemmaMLP":
        if cfg.get("norm_qk"):
            unsupported = "Gemma-3"
        elif cfg.get("post_attention_norm") and cfg.get("post_mlp_norm"):
            return "gemma2"
        else:
            return "gemma"
    else:
        unsupported = f"mlp_class_name={mlp!r} (MoE / GPT-NeoX style MLP)"
    raise InputError(
        f"{cfg.path}: Lit-GPT model {cfg.get('name')!r} is not supported ({unsupported}); supported families: "
        f"{', '.join(LIT_NORMS)}"
    )


def synthesize_config(
    cfg: LitConfig, arch: Arch, vocab_size: int, token_ids: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """An HF ``config.json`` from ``model_config.yaml`` (§2.7 synthesis table).

    Lit-GPT does not store special token ids: ``token_ids`` (from ``generation_config.json``) supply
    bos/eos/pad; ``pad_token_id`` is always written (None when unknown) because some config classes
    default to an id outside a small vocabulary (Phi-3: 32000).
    """
    mlp = cfg.get("mlp_class_name")
    out: dict[str, Any] = {
        "architectures": [arch.architectures[0]],
        "model_type": arch.model_type,
        "vocab_size": vocab_size,
        "hidden_size": cfg.int("n_embd"),
        "num_hidden_layers": cfg.int("n_layer"),
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_query_groups,
        "head_dim": cfg.head_size,
        "intermediate_size": cfg.int("intermediate_size"),
        "max_position_embeddings": cfg.int("block_size"),
        "rms_norm_eps": float(cfg.get("norm_eps", 1e-5)),
        "rope_theta": float(cfg.get("rope_base", 10000)),
        "hidden_act": "gelu_pytorch_tanh" if mlp == "GemmaMLP" else "silu",
        "tie_word_embeddings": arch.tie_word_embeddings,
        "pad_token_id": None,
    }
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if token_ids and token_ids.get(key) is not None:
            out[key] = token_ids[key]
    if mlp == "GemmaMLP":
        out["hidden_activation"] = "gelu_pytorch_tanh"
    if arch.name in ("llama", "qwen3", "gemma", "gemma2"):
        out["attention_bias"] = bool(cfg.get("bias") or cfg.get("attn_bias"))
    if arch.name == "llama":
        out["mlp_bias"] = bool(cfg.get("bias"))
    adj = cfg.get("rope_adjustments")
    if isinstance(adj, Mapping) and adj:
        if {"low_freq_factor", "high_freq_factor", "original_max_seq_len"} <= set(adj):
            out["rope_scaling"] = {
                "rope_type": "llama3", "factor": float(adj["factor"]), "low_freq_factor": float(adj["low_freq_factor"]),
                "high_freq_factor": float(adj["high_freq_factor"]),
                "original_max_position_embeddings": int(adj["original_max_seq_len"])}
        elif set(adj) == {"factor"}:
            out["rope_scaling"] = {"rope_type": "linear", "factor": float(adj["factor"])}
        else:
            raise InputError(f"{cfg.path}: rope_adjustments={dict(adj)!r} has no HF equivalent; provide the original config.json")
    if cfg.get("rotary_percentage", 1.0) != 1.0:
        if arch.name != "phi3":
            raise InputError(f"{cfg.path}: rotary_percentage={cfg.get('rotary_percentage')} is not supported for {arch.name}")
        out["partial_rotary_factor"] = float(cfg.get("rotary_percentage"))
    window = cfg.get("sliding_window_size")
    if window and arch.name in ("mistral", "qwen2", "qwen3", "gemma2", "phi3"):
        out["sliding_window"] = int(window)
    if arch.name == "gemma2":
        out["query_pre_attn_scalar"] = cfg.get("attention_scores_scalar") or cfg.head_size
        out["attn_logit_softcapping"] = cfg.get("attention_logit_softcapping")
        out["final_logit_softcapping"] = cfg.get("final_logit_softcapping")
        indices = cfg.get("sliding_window_indices")
        if indices:
            out["layer_types"] = ["sliding_attention" if i else "full_attention" for i in indices]
    return out


def check_config(config: Mapping[str, Any], cfg: LitConfig, arch: Arch, vocab_size: int, source: Path) -> None:
    """The original config.json must describe the same model as ``model_config.yaml`` and the tensors."""
    d = arch.dims(config)
    expect = {
        "hidden_size": (int(config.get("hidden_size", -1)), cfg.int("n_embd")),
        "num_hidden_layers": (arch.num_layers(config), cfg.int("n_layer")),
        "num_attention_heads": (int(config.get("num_attention_heads", -1)), cfg.n_head),
        "num_key_value_heads": (int(config.get("num_key_value_heads") or config.get("num_attention_heads", -1)),
                                cfg.n_query_groups),
        "head_dim": (d["head_dim"], cfg.head_size),
        "intermediate_size": (d["intermediate"], cfg.int("intermediate_size")),
        "vocab_size": (int(config.get("vocab_size", -1)), vocab_size),
    }
    for key, (hf, lit) in expect.items():
        if hf != lit:
            raise InputError(
                f"{source}: {key}={hf} but the Lit-GPT checkpoint has {lit}; this config.json belongs to another "
                "model: remove it to synthesize one from model_config.yaml, or point to the right base"
            )


# ---------------------------------------------------------------------------------------------
# fused QKV


def legacy_to_current_rows(n_head: int, n_query_groups: int, head_size: int) -> torch.Tensor:
    """Row order that turns a legacy ``attn.attn`` matrix (per group: q block, k, v) into the current
    layout (all q, all k, all v): ``current = legacy[perm]`` (TV-1)."""
    q_per_kv = n_head // n_query_groups
    block = (q_per_kv + 2) * head_size
    q, k, v = [], [], []
    for g in range(n_query_groups):
        start = g * block
        q += range(start, start + q_per_kv * head_size)
        k += range(start + q_per_kv * head_size, start + (q_per_kv + 1) * head_size)
        v += range(start + (q_per_kv + 1) * head_size, start + block)
    return torch.tensor(q + k + v, dtype=torch.long)


@dataclass
class QkvJob:
    """One Lit fused QKV weight or bias → HF q/k/v (split) or qkv_proj (fused)."""

    source: str
    outputs: list[str]  # 3 names (split) or 1 (fused)
    sizes: tuple[int, int, int]
    dtype: torch.dtype
    legacy_perm: torch.Tensor | None = None
    updates: list[Update] = field(default_factory=list)

    def run(self, reader: CheckpointReader, arena: Arena | None = None) -> Iterator[Produced]:
        W = reader.get(self.source)
        if self.legacy_perm is not None:
            W = W[self.legacy_perm]
        ops = [u.record() for u in self.updates] or None
        if self.updates:
            W = apply_updates(W, self.updates)
        parts = [W] if len(self.outputs) == 1 else torch.split(W, list(self.sizes))
        for name, part in zip(self.outputs, parts):
            t = finish(name, part, self.dtype, what="the LoRA") if ops else part.to(self.dtype)
            yield Produced(name, t.contiguous(), ops)


@dataclass
class ConcatJob:
    """Phi-3 ``gate_up_proj = [fc_1; fc_2]`` (each part with its own LoRA)."""

    name: str
    sources: list[tuple[str, list[Update]]]
    dtype: torch.dtype

    @property
    def outputs(self) -> list[str]:
        return [self.name]

    def run(self, reader: CheckpointReader, arena: Arena | None = None) -> Iterator[Produced]:
        parts, ops = [], []
        for src, updates in self.sources:
            W = reader.get(src)
            parts.append(apply_updates(W, updates) if updates else W.to(torch.float32))
            ops += [u.record() for u in updates]
        merged = torch.cat(parts)
        del parts
        yield Produced(self.name, finish(self.name, merged, self.dtype, what="the LoRA"), ops or None)


# ---------------------------------------------------------------------------------------------
# Lit-GPT LoRA


@dataclass
class LitLora:
    directory: Path
    path: Path  # the LoRA weights file
    tensors: dict[str, Tensor]  # small: loaded (memory-mapped) at once
    hparams: dict[str, Any]
    modules: dict[str, tuple[str, str]]  # normalized module -> (lora_A key, lora_B key)

    @property
    def scale(self) -> float:
        return self.hparams["lora_alpha"] / self.hparams["lora_r"]


def _normalize(key: str) -> str:
    for prefix in ("_orig_mod.", "module."):
        if key.startswith(prefix):
            key = key[len(prefix):]
    return key.replace("._orig_mod.", ".")


def load_lit_lora(directory: Path) -> LitLora:
    directory = Path(directory)
    path = directory / LORA_WEIGHTS
    if not path.is_file():
        legacy = directory / "lit_model_lora_finetuned.pth"
        path = legacy if legacy.is_file() else path
    if not path.is_file():
        raise InputError(f"{directory}: no {LORA_WEIGHTS}; pass the Lit-GPT LoRA output directory (e.g. out/finetune/lora/final)")
    hparams = dict(LORA_DEFAULTS)
    for src in (directory / MODEL_CONFIG, directory / HPARAMS):  # hyperparameters.yaml wins
        if src.is_file():
            data = _read_yaml(src)
            hparams.update({k: data[k] for k in LORA_DEFAULTS if k in data})
    if not isinstance(hparams["lora_r"], int) or hparams["lora_r"] < 1:
        raise InputError(f"{directory / HPARAMS}: lora_r={hparams['lora_r']!r} is not a positive integer")
    tensors = load_torch_file(path)
    modules: dict[str, dict[str, str]] = {}
    for key in tensors:
        name = _normalize(key)
        for suffix, role in ((".lora_A", "A"), (".lora_B", "B")):
            if name.endswith(suffix):
                modules.setdefault(name[: -len(suffix)], {})[role] = key
                break
        else:
            raise InputError(f"{path}: tensor {key!r} is not a LoRA factor; pass the lit_model.pth.lora of a LoRA run")
    for mod, roles in modules.items():
        if set(roles) != {"A", "B"}:
            raise InputError(f"{path}: {mod} has only lora_{next(iter(roles))}; the file is incomplete, re-save it")
        if ".attn.attn" in mod:
            raise InputError(
                f"{path}: legacy LoRA layout ({mod}.lora_A, litgpt <= 0.5.4) is not supported; merge it with the "
                "Lit-GPT version that trained it (litgpt merge_lora) and convert the merged lit_model.pth"
            )
    return LitLora(directory, path, tensors, hparams, {m: (r["A"], r["B"]) for m, r in modules.items()})


# ---------------------------------------------------------------------------------------------
# planning


@dataclass
class LitPlan:
    jobs: list[Job]
    tied_job: TiedEmbeddingJob | None
    modules_merged: int
    tie: dict[str, Any]  # the tied-embedding decision and its evidence (final once the jobs ran)
    base_quant_tensors: int = 0  # Lit weights replaced by their bitsandbytes 4-bit round trip


def _shares_storage(reader: CheckpointReader, a: str, b: str) -> bool:
    """Whether two tensors of a zip-format ``.pth`` are views of the same bytes (how Lit-GPT's
    conversion stores a tied head). Only the pickle is parsed; the storages stay memory-mapped."""
    rel = reader.file_of(a)
    path = reader.directory / rel
    if reader.file_of(b) != rel or not rel.endswith(TORCH_SUFFIXES) or not zipfile.is_zipfile(path):
        return False
    state = load_torch_file(path)
    ta, tb = state[a], state[b]
    return (ta.untyped_storage().data_ptr() == tb.untyped_storage().data_ptr()
            and ta.storage_offset() == tb.storage_offset() and ta.dtype == tb.dtype
            and ta.shape == tb.shape and ta.stride() == tb.stride())


def compare_head(reader: CheckpointReader, wte: str, head: str, dtype: torch.dtype) -> tuple[bool, str]:
    """Is the Lit ``lm_head`` the embedding? ``(identical, evidence)``, without holding either whole:
    shared storage in the file, else a bitwise comparison (as ``dtype``, the written dtype) in row chunks."""
    ws, hs = reader.shape(wte), reader.shape(head)
    if ws != hs:
        return False, f"shapes differ ({list(ws)} and {list(hs)})"
    if _shares_storage(reader, wte, head):
        return True, f"same storage in {reader.file_of(wte)}"
    row = first_difference(reader, wte, head, dtype)
    if row is None:
        return True, f"bit-identical as {str(dtype).removeprefix('torch.')}"
    return False, f"differ (first at row {row})"


def plan_litgpt(
    reader: CheckpointReader, cfg: LitConfig, arch: Arch, tie_hint: bool | None, dtype: torch.dtype | None,
    lora: LitLora | None, base_quant: Bnb4Setting | None = None,
) -> LitPlan:
    """Map every Lit tensor to its HF name(s) and attach the LoRA updates; refuse anything unknown.

    ``tie_hint``: ``tie_word_embeddings`` of the original HF config.json, None when there is none or
    it does not say. False keeps the head untied; otherwise the checkpoint decides (a head equal to
    the embedding is tied; one that differs is written, and a config that said true is overruled).

    ``base_quant``: every Lit linear weight (Lightning's ``BitsandbytesPrecision`` converts every
    ``nn.Linear``, ``lm_head`` included) is first replaced by its bitsandbytes 4-bit round trip, on
    the Lit tensor as trained (the fused ``attn.qkv`` whole, before the split).
    """
    keys = {_normalize(k): k for k in reader.names()}
    if len(keys) != len(reader.names()):
        raise InputError(f"{reader.path}: duplicate tensor names after removing _orig_mod./module. prefixes; re-save it")
    bad = next((k for k in keys if ".adapter" in k or "gating_factor" in k), None)
    if bad:
        raise InputError(f"{reader.path}: {bad}: Adapter/Adapter-v2 checkpoints cannot be converted; use a LoRA or full fine-tune")
    bad = next((k for k in keys if ".lora_" in k), None)
    if bad:
        raise InputError(f"{reader.path}: {bad}: LoRA tensors inside the checkpoint; pass the LoRA directory with --lora")
    legacy = any(".attn.attn." in k for k in keys)
    if legacy and any(".attn.qkv." in k for k in keys):
        raise InputError(f"{reader.path}: has both attn.attn (legacy) and attn.qkv (current) tensors: corrupt checkpoint")
    qkv = "attn.attn" if legacy else "attn.qkv"
    fused_qkv = _FUSED_QKV in arch.linear_names()
    fused_mlp = _FUSED_GATE_UP in arch.linear_names()
    sizes = cfg.qkv_sizes

    # Lit module (without .weight/.bias) -> HF module, per layer and global
    module_map: dict[str, str] = {"transformer.wte": arch.embed_path, "transformer.ln_f": arch.final_norm_path,
                                  "lm_head": arch.lm_head_path}
    n_layer = cfg.int("n_layer")
    for i in range(n_layer):
        lit, hf = f"transformer.h.{i}.", arch.layer_prefix(i)
        for a, b in LIT_NORMS[arch.name]:
            module_map[lit + a] = hf + b
        module_map[lit + "attn.proj"] = hf + "self_attn.o_proj"
        if not fused_mlp:
            for a, b in _MLP.items():
                module_map[lit + a] = hf + b
        else:
            module_map[lit + "mlp.proj"] = hf + "mlp.down_proj"

    # LoRA updates per Lit module
    updates: dict[str, list[Update]] = {}
    merged = 0
    if lora is not None:
        hp = lora.hparams
        enable = (bool(hp["lora_query"]), bool(hp["lora_key"]), bool(hp["lora_value"]))
        for mod, (ka, kb) in sorted(lora.modules.items()):
            weight = f"{mod}.weight"
            if legacy and mod.endswith(".attn.qkv"):  # current-layout LoRA on a legacy base (re-ordered on load)
                weight = f"{mod[: -len('qkv')]}attn.weight"
            if weight not in keys:
                raise InputError(
                    f"{lora.path}: LoRA for {mod}, which the checkpoint {reader.path} does not have; "
                    "wrong base checkpoint or an unsupported module (MoE router/experts)"
                )
            A, B = lora.tensors[ka], lora.tensors[kb]
            r = hp["lora_r"]
            out_rows, in_cols = reader.shape(keys[weight])
            if mod.endswith(".attn.qkv"):
                n_en = sum(enable)
                need_b = sum(sz for sz, e in zip(sizes, enable) if e)
                if n_en == 0 or A.shape != (r * n_en, in_cols) or B.shape != (need_b, r):
                    raise InputError(
                        f"{lora.path}: {mod} LoRA has A {list(A.shape)}, B {list(B.shape)} but lora_r={r} with "
                        f"query/key/value={list(enable)} needs A [{r * n_en}, {in_cols}], B [{need_b}, {r}]: "
                        f"hyperparameters.yaml does not match the LoRA file or the base"
                    )
                u = FusedQkvLora(mod, A, B, lora.scale, r, hp["lora_alpha"], enable, sizes)
            else:
                if A.shape != (r, in_cols) or B.shape != (out_rows, r):
                    raise InputError(
                        f"{lora.path}: {mod} LoRA has A {list(A.shape)}, B {list(B.shape)} but base "
                        f"{weight} is {[out_rows, in_cols]} with lora_r={r}: LoRA trained on a different model"
                    )
                u = LinearLora(mod, A, B, lora.scale, r, hp["lora_alpha"])
            updates[weight] = [u]
            merged += 1
        _check_lora_flags(lora, n_layer)

    n_base_quant = 0
    if base_quant is not None:
        for name in sorted(keys):
            stem, _, param = name.rpartition(".")
            if param == "weight" and (stem == "lm_head" or stem.endswith(_LIT_LINEARS)):
                updates[name] = [Bnb4RoundTrip(base_quant), *updates.get(name, [])]
                n_base_quant += 1

    # tied embeddings: decided before any job runs (cheap: shared storage or a chunked compare)
    wte, head = "transformer.wte.weight", "lm_head.weight"
    if head not in keys:
        raise InputError(f"{reader.path}: has no {head}; incomplete checkpoint")
    tie: dict[str, Any] = {"config_tie_word_embeddings": tie_hint}
    if tie_hint is False:
        tie.update(tied=False, evidence="not compared",
                   reason="config.json sets tie_word_embeddings=false; wrote the head")
        identical = False
    else:
        identical, evidence = compare_head(reader, keys[wte], keys[head], output_dtype(reader.dtype(keys[wte]), dtype))
        tie["evidence"] = f"{head} and {wte}: {evidence}"
        if not identical and tie_hint is None:
            tie.update(tied=False, reason=f"{head} differs from {wte}: an untied model; wrote both")
    tied = "tied" not in tie  # a candidate: the TiedEmbeddingJob decides (after any LoRA on the head)
    head_touched = bool(updates.get(wte) or updates.get(head))

    # jobs, in checkpoint order; every Lit tensor must be consumed
    jobs: list[Job] = []
    consumed: set[str] = set()
    for name in sorted(keys, key=_layer_order):
        if name in consumed:
            continue
        stem, _, param = name.rpartition(".")
        src = keys[name]
        out_dtype = output_dtype(reader.dtype(src), dtype)
        if stem.endswith("." + qkv):
            layer = stem[: -len(qkv)]
            i = int(layer.split(".")[2])
            hf = arch.layer_prefix(i)
            outs = [f"{hf}{_FUSED_QKV}.{param}"] if fused_qkv else [f"{hf}{p}.{param}" for p in _SPLIT_QKV]
            perm = legacy_to_current_rows(cfg.n_head, cfg.n_query_groups, cfg.head_size) if legacy else None
            jobs.append(QkvJob(src, outs, sizes, out_dtype, perm, updates.get(name, [])))
        elif fused_mlp and stem.endswith((".mlp.fc_1", ".mlp.fc_2")):
            if param != "weight":
                raise InputError(f"{reader.path}: {name}: MLP biases are not supported for {arch.name}")
            layer = stem[: -len("mlp.fc_1")]
            parts = [f"{layer}mlp.fc_1.weight", f"{layer}mlp.fc_2.weight"]
            missing = [p for p in parts if p not in keys]
            if missing:
                raise InputError(f"{reader.path}: has no {missing[0]}; incomplete checkpoint")
            i = int(layer.split(".")[2])
            jobs.append(ConcatJob(f"{arch.layer_prefix(i)}{_FUSED_GATE_UP}.weight",
                                  [(keys[p], updates.get(p, [])) for p in parts], out_dtype))
            consumed.update(parts)
        elif name in (wte, head) and tied:
            if name == head:
                continue
            jobs.append(TiedEmbeddingJob(
                f"{arch.embed_path}.weight", f"{arch.lm_head_path}.weight", src, keys[head], out_dtype,
                updates.get(wte, []), updates.get(head, []), decision=tie,
                identical=None if head_touched else identical))
        elif stem in module_map:
            jobs.append(TensorJob(f"{module_map[stem]}.{param}", src, out_dtype, updates.get(name, [])))
        else:
            raise InputError(
                f"{reader.path}: tensor {name!r} has no {arch.name} HF equivalent; the checkpoint does not match "
                f"model_config.yaml ({cfg.get('name')!r})"
            )
        consumed.add(name)
    _check_complete(jobs, arch, cfg, reader, tied)
    return LitPlan(jobs, next((j for j in jobs if isinstance(j, TiedEmbeddingJob)), None), merged, tie, n_base_quant)


def _layer_order(name: str) -> tuple:
    parts = name.split(".")
    if len(parts) > 2 and parts[1] == "h" and parts[2].isdigit():
        return (1, int(parts[2]), name)
    return (0 if name.startswith("transformer.wte") else 2, 0, name)


def _check_lora_flags(lora: LitLora, n_layer: int) -> None:
    """The LoRA file must hold exactly the modules its hyperparameters enable."""
    hp = lora.hparams
    per_layer = []
    if hp["lora_query"] or hp["lora_key"] or hp["lora_value"]:
        per_layer.append("attn.qkv")
    if hp["lora_projection"]:
        per_layer.append("attn.proj")
    if hp["lora_mlp"]:
        per_layer += ["mlp.fc_1", "mlp.fc_2", "mlp.proj"]
    expect = {f"transformer.h.{i}.{m}" for i in range(n_layer) for m in per_layer}
    if hp["lora_head"]:
        expect.add("lm_head")
    missing, extra = sorted(expect - set(lora.modules)), sorted(set(lora.modules) - expect)
    if missing or extra:
        what = f"has no LoRA for {missing[0]}" if missing else f"has LoRA for {extra[0]}"
        raise InputError(
            f"{lora.path}: {what} although {HPARAMS} says {', '.join(f'{k}={v}' for k, v in hp.items())}; "
            "the LoRA file and its hyperparameters disagree"
        )


def _check_complete(jobs: list[Job], arch: Arch, cfg: LitConfig, reader: CheckpointReader, tied: bool) -> None:
    names = {n for j in jobs for n in j.outputs}
    n_layer = cfg.int("n_layer")
    need = [f"{arch.embed_path}.weight", f"{arch.final_norm_path}.weight"]
    for i in range(n_layer):
        need += [arch.layer_prefix(i) + f"{lin}.weight" for lin in arch.linear_names()]
        need += [arch.layer_prefix(i) + f"{norm}.weight" for norm in arch.layer_norms]
    if not tied:
        need.append(f"{arch.lm_head_path}.weight")
    missing = [n for n in need if n not in names]
    if missing:
        raise InputError(
            f"{reader.path}: yields no {missing[0]} ({len(missing)} HF tensors missing); the checkpoint is incomplete "
            f"or is not a {arch.name} model"
        )


# ---------------------------------------------------------------------------------------------
# the library entry point


def _hf_config(checkpoint: Path, lora: Path | None) -> tuple[dict[str, Any] | None, Path | None]:
    """The original HF config.json: in the checkpoint, else in the base named by hyperparameters.yaml."""
    candidates = [checkpoint]
    for d in (checkpoint, lora):
        if d is not None and (d / HPARAMS).is_file():
            base = _read_yaml(d / HPARAMS).get("checkpoint_dir")
            if isinstance(base, str):
                candidates.append(Path(base))
    for d in candidates:
        if (d / "config.json").is_file():
            try:
                return json.loads((d / "config.json").read_text(encoding="utf-8")), d / "config.json"
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise InputError(f"{d / 'config.json'}: not valid JSON ({e}); fix or remove it") from None
    return None, None


def _lit_base_quant(lora_dir: Path | None, requested: str | None, requested_dtype: str | None,
                    base_dtype: torch.dtype) -> BaseQuant:
    """The base-quantization decision for a Lit-GPT LoRA (its hyperparameters.yaml is the record)."""
    records = []
    if lora_dir is not None and (lora_dir / HPARAMS).is_file():
        records.append(litgpt_record(_read_yaml(lora_dir / HPARAMS), lora_dir / HPARAMS))
    return resolve(requested, requested_dtype, records, base_dtype, lm_head_quantized=True)


def merge_litgpt(
    checkpoint: Path,
    out: Path,
    lora: Path | None = None,
    dtype: str = "auto",
    overwrite: bool = False,
    max_shard_bytes: int | None = None,
    base_quant: str | None = None,
    base_quant_dtype: str | None = None,
) -> mf.Manifest:
    """Convert a Lit-GPT checkpoint (plus an optional Lit-GPT LoRA, merged on the fly) to HF safetensors.

    ``dtype``: ``auto`` keeps the checkpoint's dtypes (not the LoRA's, which is usually fp32).
    ``base_quant`` / ``base_quant_dtype``: as for :func:`~quantize.merge.merge_lora`; by default the
    LoRA's ``hyperparameters.yaml`` decides (``quantize: bnb.nf4[-dq]``, ``precision``). Only a LoRA
    can take it: a full checkpoint holds the trained weights themselves.
    Returns the complete ``merge`` manifest.
    """
    checkpoint, out = Path(checkpoint), Path(out)
    lora_dir = Path(lora) if lora is not None else None
    out_dtype = parse_dtype(dtype)
    StagedOutput(out, overwrite=overwrite).preflight()
    weights = checkpoint / WEIGHTS
    if not (checkpoint / MODEL_CONFIG).is_file():
        old = checkpoint / "lit_config.json"
        hint = " (old lit-gpt layout: convert it with that version first)" if old.is_file() else ""
        raise InputError(f"{checkpoint}: no {MODEL_CONFIG}{hint}; pass a Lit-GPT checkpoint directory")
    if not weights.exists():
        hint = " (lit_model.pth.lora found: pass the base checkpoint and --lora this directory)" \
            if (checkpoint / LORA_WEIGHTS).is_file() else ""
        raise InputError(f"{checkpoint}: no {WEIGHTS}{hint}; pass a Lit-GPT checkpoint directory")
    cfg = LitConfig(_read_yaml(checkpoint / MODEL_CONFIG), checkpoint / MODEL_CONFIG)
    family = lit_family(cfg)
    reader = CheckpointReader(weights)
    wte = next((k for k in reader.names() if _normalize(k) == "transformer.wte.weight"), None)
    if wte is None:
        raise InputError(f"{weights}: has no transformer.wte.weight; not a Lit-GPT GPT checkpoint")
    vocab = reader.shape(wte)[0]

    hf_config, hf_source = _hf_config(checkpoint, lora_dir)
    if hf_config is not None:
        refuse_quantized(hf_config, hf_source.parent)
        arch = get_arch(hf_config, source=str(hf_source))
        if arch.name != family and {arch.name, family} != {"llama", "mistral"}:
            raise InputError(
                f"{hf_source}: is a {arch.name} config but {cfg.path} describes {family}; remove the wrong config.json"
            )
        check_config(hf_config, cfg, arch, vocab, hf_source)
        base_config, config_origin = hf_config, str(hf_source)
    else:
        arch = by_name(family)
        gen = checkpoint / "generation_config.json"
        token_ids = json.loads(gen.read_text(encoding="utf-8")) if gen.is_file() else None
        base_config = synthesize_config(cfg, arch, vocab, token_ids)
        config_origin = "synthesized from model_config.yaml"
        log.warning(f"{checkpoint}: no original config.json; synthesized one from {MODEL_CONFIG} (check it)")
    # only an original config.json that states it constrains tying; else the checkpoint decides
    tie_hint = None if hf_config is None else hf_config.get("tie_word_embeddings")
    if tie_hint is not None and not isinstance(tie_hint, bool):
        raise InputError(f"{hf_source}: tie_word_embeddings={tie_hint!r} is not true or false; fix config.json")
    if lora_dir is None and base_quant not in (None, "none"):
        raise InputError(
            f"{checkpoint}: --base-quant {base_quant} applies to a LoRA trained on a 4-bit base, but this is a full "
            "Lit-GPT checkpoint (no --lora): its weights are the trained ones; drop --base-quant or pass --lora DIR"
        )
    lit_lora = load_lit_lora(lora_dir) if lora_dir is not None else None
    bq = _lit_base_quant(lora_dir, base_quant, base_quant_dtype, reader.dtype(wte))
    plan = plan_litgpt(reader, cfg, arch, tie_hint, out_dtype, lit_lora, bq.setting)
    if bq.setting is not None:
        n = plan.base_quant_tensors
        bq = BaseQuant(bq.setting, bq.record.model_copy(update={"tensors": n}))
        log.info(f"base: {bq.setting.describe()} round trip of {n} Lit-GPT linear weights (lm_head included, as "
                 f"Lightning quantizes it; {bq.record.source}: {bq.record.reason})")
    log.info(f"converting {len(reader)} Lit-GPT tensors to {arch.name} "
             f"({plan.modules_merged} LoRA modules merged{', legacy QKV layout' if any(isinstance(j, QkvJob) and j.legacy_perm is not None for j in plan.jobs) else ''})")

    def make_config():
        written_dtype = out_dtype or reader.dtype(wte)
        tie = plan.tie["tied"]
        if tie is False and tie_hint is not False and plan.tied_job is not None:  # a tied model came untied
            log.warning(plan.tie["reason"])
        else:
            log.info(f"tie_word_embeddings={str(tie).lower()}: {plan.tie['reason']} ({plan.tie['evidence']})")
        return patch_config(base_config, dtype=written_dtype, vocab_size=vocab, tied=tie)

    def make_metrics(modified):
        m: dict[str, Any] = {"tensors_modified": len(modified), "modified": modified, "config": config_origin,
                             "legacy_qkv_layout": any(".attn.attn." in k for k in reader.names())}
        m["tied_embeddings"] = dict(plan.tie)
        return m

    aux = [(checkpoint, AUX_FILES)]
    if lora_dir is not None:  # the training output's tokenizer wins (chat template, added tokens)
        aux.append((lora_dir, [n for n in AUX_FILES if n.startswith(("tokenizer", "special_tokens", "chat_template"))]))
    params: dict[str, Any] = {"mode": "litgpt", "dtype": dtype, "arch": arch.name, "lit_name": cfg.get("name")}
    if lit_lora is not None:
        params["lora"] = dict(lit_lora.hparams)
    params["base_quant"] = bq.record.model_dump(mode="json")
    params["base_quant_request"] = {"base_quant": base_quant, "base_quant_dtype": base_quant_dtype}

    def inputs():
        recs = [mf.describe_input("model", checkpoint, [WEIGHTS, MODEL_CONFIG] + [
            n for n in AUX_FILES if (checkpoint / n).is_file()])]
        if lit_lora is not None:
            recs.append(mf.describe_input("adapter", lora_dir, sorted(
                {lit_lora.path.name} | {n for n in (HPARAMS, MODEL_CONFIG) if (lora_dir / n).is_file()})))
        return recs

    return write_output(
        out, overwrite=overwrite, reader=reader, jobs=plan.jobs, aux_files=aux, make_config=make_config,
        inputs=inputs, params=params, make_metrics=make_metrics,
        max_shard_bytes=max_shard_bytes or DEFAULT_MAX_SHARD_BYTES,
    )
