"""PEFT LoRA adapters: ``adapter_config.json`` + ``adapter_model.safetensors`` (MERGE.md §4).

:func:`load_adapter` parses and normalises the adapter (key grammar of §4.1, refusals of §4.2);
:func:`plan_adapter` maps it onto a base checkpoint and returns the streaming jobs, validating
everything (targets, shapes, ranks, tied embeddings, vocabulary) before any tensor data is read.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..arch import Arch
from ..errors import InputError
from ..io.reader import CheckpointReader
from . import lora_math as lm
from .stream import (
    BiasLora,
    EmbeddingLora,
    Job,
    LinearLora,
    Replace,
    SetRows,
    TensorJob,
    TiedEmbeddingJob,
    Update,
    output_dtype,
)

CONFIG_NAME = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors.index.json", "adapter_model.safetensors", "adapter_model.bin")
PREFIX = "base_model.model."

# Config fields that select a LoRA variant or setup this merger cannot reproduce (§4.2): a truthy
# value is refused with the reason given.
_REFUSED_FIELDS: dict[str, str] = {
    "alora_invocation_tokens": "activated LoRA is applied only after invocation tokens and cannot be merged",
    "arrow_config": "Arrow routing mixes adapters per token and cannot be merged",
    "layer_replication": "layer replication changes the number of layers",
    "use_qalora": "QA-LoRA pools the input for GPTQ bases",
    "megatron_config": "Megatron tensor-parallel LoRA layers are sharded",
    "velora_config": "the VeLoRA variant is not supported",
    "kasa_config": "the KaSA variant is not supported",
    "use_bdlora": "the BD-LoRA variant is not supported",
    "monteclora_config": "the MonteCLoRA variant is not supported",
}
# init_lora_weights values whose adapters expect a modified (residual) base weight.
_REFUSED_INITS = ("pissa", "olora", "corda", "lora_ga", "loftq", "mica")

# Saved-key suffixes (after the module path) and what they hold.
_LORA_SUFFIXES = {
    ".lora_A.weight": "A",
    ".lora_B.weight": "B",
    ".lora_B.bias": "lora_bias",
    ".lora_magnitude_vector.weight": "magnitude",
    ".lora_magnitude_vector": "magnitude",
    ".lora_embedding_A": "emb_A",
    ".lora_embedding_B": "emb_B",
    ".token_adapter.trainable_tokens_delta": "tokens",
}
_REPLACEMENT_INFIXES = (".modules_to_save.", ".base_layer.")  # stripped: "<m>.modules_to_save.weight" -> "<m>.weight"
_IGNORED_INFIX = ".original_module."  # frozen copy kept by ModulesToSaveWrapper
# Names of other PEFT methods' tensors: a file holding them is not a LoRA adapter.
_FOREIGN = re.compile(r"\.(lora_E|ranknum|hada_|lokr_|ia3_|vera_|boft_|oft_|fourierft_|ln_tuning|adaption_)")
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
    "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
)


@dataclass(frozen=True)
class LoraSettings:
    """The fields of ``adapter_config.json`` that decide the merge."""

    r: int
    lora_alpha: float
    use_rslora: bool = False
    use_dora: bool = False
    fan_in_fan_out: bool = False
    target_modules: str | tuple[str, ...] | None = None
    exclude_modules: str | tuple[str, ...] | None = None
    layers_to_transform: int | tuple[int, ...] | None = None
    layers_pattern: str | tuple[str, ...] | None = None
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    modules_to_save: tuple[str, ...] = ()
    bias: str = "none"
    lora_bias: bool = False
    trainable_token_indices: Any = None
    base_model_name_or_path: str | None = None
    # LoRA on nn.Parameters (PEFT's ParamWrapper): an MoE model's fused 3D experts (mlp.experts.gate_up_proj)
    target_parameters: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], path: Path) -> LoraSettings:
        peft_type = cfg.get("peft_type")
        if peft_type != "LORA":
            raise InputError(
                f"{path}: peft_type={peft_type!r} is not supported (only LORA adapters can be merged); "
                "merge it with the tool that trained it"
            )
        for key, why in _REFUSED_FIELDS.items():
            if cfg.get(key):
                raise InputError(f"{path}: {key}={cfg[key]!r} is set: {why}; merge it with PEFT instead")
        init = cfg.get("init_lora_weights", True)
        if isinstance(init, str) and init.lower().startswith(_REFUSED_INITS):
            raise InputError(
                f"{path}: init_lora_weights={init!r}: this adapter expects a modified (residual) base weight; "
                "re-save it with path_initial_model_for_weight_conversion (PEFT) to get a plain LoRA"
            )
        try:
            r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
        except (KeyError, TypeError, ValueError):
            raise InputError(f"{path}: needs integer \"r\" and numeric \"lora_alpha\"; re-save the adapter") from None

        def seq(v):
            return tuple(v) if isinstance(v, (list, tuple, set)) else v

        targets = cfg.get("target_modules")
        return cls(
            r=r,
            lora_alpha=alpha,
            use_rslora=bool(cfg.get("use_rslora")),
            use_dora=bool(cfg.get("use_dora")),
            fan_in_fan_out=bool(cfg.get("fan_in_fan_out")),
            target_modules=tuple(sorted(targets)) if isinstance(targets, (list, set)) else targets,
            exclude_modules=seq(cfg.get("exclude_modules")),
            layers_to_transform=seq(cfg.get("layers_to_transform")),
            layers_pattern=seq(cfg.get("layers_pattern")),
            rank_pattern=dict(cfg.get("rank_pattern") or {}),
            alpha_pattern=dict(cfg.get("alpha_pattern") or {}),
            modules_to_save=tuple(cfg.get("modules_to_save") or ()),
            bias=str(cfg.get("bias") or "none"),
            lora_bias=bool(cfg.get("lora_bias")),
            trainable_token_indices=cfg.get("trainable_token_indices"),
            base_model_name_or_path=cfg.get("base_model_name_or_path"),
            target_parameters=tuple(cfg.get("target_parameters") or ()),
        )

    def targets(self, module: str) -> bool:
        return lm.is_targeted(
            module, self.target_modules, exclude_modules=self.exclude_modules,
            layers_to_transform=self.layers_to_transform, layers_pattern=self.layers_pattern,
            modules_to_save=self.modules_to_save,
        )

    def rank_alpha(self, module: str) -> tuple[int, float]:
        return lm.resolve_rank_alpha(module, self.r, self.lora_alpha, self.rank_pattern, self.alpha_pattern)

    def summary(self) -> dict[str, Any]:
        """JSON-able settings for the manifest."""
        out = {k: v for k, v in self.__dict__.items() if v not in (None, (), {}, False)}
        return json.loads(json.dumps(out, default=list))


@dataclass
class ModuleFactors:
    """Everything an adapter saved for one module (runtime module path, prefix stripped)."""

    module: str
    keys: dict[str, str] = field(default_factory=dict)  # role (A, B, lora_bias, magnitude, emb_A, emb_B, tokens) -> key

    @property
    def is_embedding(self) -> bool:
        return "emb_A" in self.keys or "emb_B" in self.keys


@dataclass
class PeftAdapter:
    """A parsed adapter directory. Tensors are read lazily from :attr:`reader`."""

    directory: Path
    weight_file: Path
    settings: LoraSettings
    reader: CheckpointReader
    modules: dict[str, ModuleFactors]  # module path -> LoRA factors
    replacements: dict[str, list[str]]  # base tensor name (module.param) -> adapter keys holding it

    def tensor(self, key: str) -> Tensor:
        return self.reader.get(key)

    def loader(self, key: str):
        """A callable reading ``key`` when an update runs (adapter tensors are not held in memory)."""
        return lambda: self.reader.get(key)

    def tokenizer_files(self) -> list[str]:
        return [n for n in TOKENIZER_FILES if (self.directory / n).is_file()]


def _strip(key: str) -> str:
    return key[len(PREFIX):] if key.startswith(PREFIX) else key


def load_adapter(directory: Path) -> PeftAdapter:
    """Parse ``directory`` (config + weights) into modules and replacements; no tensor data is read."""
    directory = Path(directory)
    cfg_path = directory / CONFIG_NAME
    if not cfg_path.is_file():
        raise InputError(f"{directory}: no {CONFIG_NAME}; pass the directory PEFT's save_pretrained wrote")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{cfg_path}: not valid JSON ({e}); re-save the adapter") from None
    if not isinstance(cfg, dict):
        raise InputError(f"{cfg_path}: is not a JSON object; re-save the adapter")
    settings = LoraSettings.from_config(cfg, cfg_path)
    weight_file = next((directory / n for n in WEIGHT_FILES if (directory / n).is_file()), None)
    if weight_file is None:
        raise InputError(f"{directory}: no adapter weights (looked for {', '.join(WEIGHT_FILES)}); re-save the adapter")
    reader = CheckpointReader(weight_file)

    modules: dict[str, ModuleFactors] = {}
    replacements: dict[str, list[str]] = {}
    for key in reader.names():
        name = _strip(key)
        if _IGNORED_INFIX in name:
            continue
        if _FOREIGN.search(name):
            raise InputError(
                f"{weight_file}: tensor {key!r} belongs to another PEFT method, not LoRA; "
                "this adapter cannot be merged as LoRA (check peft_type)"
            )
        hit = next(((sfx, r) for sfx, r in _LORA_SUFFIXES.items() if name.endswith(sfx)), None)
        if hit is not None:
            suffix, role = hit
            mod = modules.setdefault(name[: -len(suffix)], ModuleFactors(name[: -len(suffix)]))
            if role in mod.keys:
                raise InputError(f"{weight_file}: two tensors for {role} of {mod.module}; re-save the adapter")
            mod.keys[role] = key
            continue
        if ".lora_" in name:
            raise InputError(
                f"{weight_file}: tensor {key!r} is not a LoRA tensor this merger knows "
                "(multiple adapters in one file, or an unsupported variant); re-save a single default adapter"
            )
        for infix in _REPLACEMENT_INFIXES:
            name = name.replace(infix, ".")
        replacements.setdefault(name, []).append(key)
    if not modules and not replacements:
        raise InputError(f"{weight_file}: holds no adapter tensors; re-save the adapter")
    return PeftAdapter(directory, weight_file, settings, reader, modules, replacements)


# ---------------------------------------------------------------------------------------------
# planning against a base checkpoint


@dataclass
class AdapterPlan:
    jobs: list[Job]
    tied_job: TiedEmbeddingJob | None
    vocab_size: int | None  # new vocabulary size when the embedding was resized


def _nearest(name: str, names: list[str]) -> str:
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
    return f" (nearest: {', '.join(close)})" if close else ""


def _check_factor(adapter: PeftAdapter, key: str, ndim: int = 2) -> tuple[int, ...]:
    shape = adapter.reader.shape(key)
    if math.prod(shape) == 0 or len(shape) < ndim:
        raise InputError(
            f"{adapter.weight_file}: {key} has shape {list(shape)}: the adapter was saved from DeepSpeed "
            "ZeRO-3/FSDP without gathering the parameters; re-save it with gathered weights"
        )
    if len(shape) > ndim:
        raise InputError(f"{adapter.weight_file}: {key} has shape {list(shape)}: convolution LoRA is not supported")
    return shape


def plan_adapter(
    adapter: PeftAdapter,
    base: CheckpointReader,
    arch: Arch,
    config: Mapping[str, Any],
    dtype: torch.dtype | None,
) -> AdapterPlan:
    """Map every adapter tensor onto a base tensor and build the jobs (validation happens here)."""
    s = adapter.settings
    base_names = base.names()
    embed, head = f"{arch.embed_path}.weight", f"{arch.lm_head_path}.weight"
    tied = arch.is_tied(config)
    if embed not in base:
        raise InputError(f"{base.path}: has no embedding tensor {embed!r}; is this a {arch.name} checkpoint?")
    # a tied model computes its logits with the embedding, whatever else the file holds
    head_source = embed if tied else (head if head in base else None)

    def src_of(name: str) -> str | None:
        """The base tensor an output name starts from (a tied head starts from the embedding)."""
        if name == head:
            return head_source
        return name if name in base else None

    def missing(what: str, name: str) -> InputError:
        return InputError(
            f"{adapter.weight_file}: {what} targets {name!r}, which does not exist in the base {base.path}; "
            f"wrong base model or the module naming differs{_nearest(name, base_names)}"
        )

    updates: dict[str, list[Update]] = {}
    shapes: dict[str, tuple[int, ...]] = {}  # current shape of every touched tensor

    # 1. full replacements (modules_to_save, saved embeddings, trained biases) come first
    for name, keys in sorted(adapter.replacements.items()):
        src = src_of(name)
        if src is None:
            raise missing("replacement tensor", name)
        shape = adapter.reader.shape(keys[0])
        for k in keys[1:]:
            if adapter.reader.shape(k) != shape or not torch.equal(adapter.tensor(k), adapter.tensor(keys[0])):
                raise InputError(f"{adapter.weight_file}: {keys[0]} and {k} both replace {name} but differ; re-save the adapter")
        if shape != base.shape(src) and not (name in (embed, head) and shape[1:] == base.shape(src)[1:]):
            raise InputError(
                f"{adapter.weight_file}: {keys[0]} has shape {list(shape)} but base {name} is {list(base.shape(src))}: "
                "adapter trained on a different model size/revision"
            )
        key = keys[0]
        updates[name] = [Replace(adapter.loader(key), f"adapter:{_strip(key)}", tuple(shape))]
        shapes[name] = shape

    # 2. LoRA factors, per module (PEFT's ParamWrapper on fused experts: per expert, on the 2D tensors)
    experts_lora = _ExpertsLora(adapter, arch, config)
    for module, f in sorted(adapter.modules.items()):
        if experts_lora.handles(module):
            for target, lora in experts_lora.updates(f):
                if src_of(target) is None:
                    raise missing("LoRA", target)
                updates.setdefault(target, []).append(lora)
                shapes.setdefault(target, tuple(base.shape(target)))
            continue
        target = f"{module}.weight"
        _refuse_router(adapter, arch, module)
        if src_of(target) is None:
            raise missing("LoRA", target)
        if "tokens" in f.keys:
            _plan_trainable_tokens(adapter, f, target, updates, shapes, base, src_of)
            if set(f.keys) == {"tokens"}:
                continue
        # ensure_weight_tying on a tied model: PEFT adds a LoRA to the head, tied to the embedding's
        # (not listed in target_modules)
        tied_twin = tied and module == arch.lm_head_path and s.targets(arch.embed_path)
        if not s.targets(module) and not tied_twin:
            raise InputError(
                f"{adapter.weight_file}: has LoRA for {module}, which {CONFIG_NAME} does not target "
                f"(target_modules={s.target_modules!r}); config and weights disagree, re-save the adapter"
            )
        W_shape = shapes.get(target) or base.shape(src_of(target))
        if not base.dtype(src_of(target)).is_floating_point:
            raise InputError(f"{base.path}: {target} is {base.dtype(src_of(target))}: the base is quantized; "
                             "merge into the 16-bit base")
        lora = _lora_update(adapter, f, tuple(W_shape))
        updates.setdefault(target, []).append(lora)
        shapes.setdefault(target, tuple(W_shape))
        if "lora_bias" in f.keys:
            bias = f"{module}.bias"
            if bias not in base:
                raise InputError(f"{adapter.weight_file}: {module} has lora_B.bias but the base layer has no bias; "
                                 "wrong base model")
            updates.setdefault(bias, []).append(BiasLora(module, adapter.loader(f.keys["lora_bias"]), lora.scale))

    _check_completeness(adapter, base, updates, arch)
    tied_rows = [u for u in updates.get(embed, []) if isinstance(u, SetRows)]
    if tied and tied_rows:  # PEFT ties trainable tokens of a tied embedding to the head as well
        updates.setdefault(head, []).extend(tied_rows)

    # 3. vocabulary and tied embeddings
    vocab = shapes.get(embed, base.shape(embed))[0]
    vocab_size = vocab if vocab != base.shape(embed)[0] else None
    head_rows = shapes.get(head, base.shape(head_source)) if head_source else None
    if head_rows is not None and head_rows[0] != vocab:
        raise InputError(
            f"{adapter.weight_file}: the embedding has {vocab} rows but the head has {head_rows[0]}: the vocabulary "
            "was resized but only one of them was saved; save both (modules_to_save=[embed_tokens, lm_head])"
        )
    _check_tokenizer(adapter, vocab, embed in updates or head in updates)

    def out_dtype(name: str) -> torch.dtype:
        return output_dtype(base.dtype(src_of(name)), dtype)

    jobs: list[Job] = []
    tied_job = None
    for name in base_names:
        if tied and name in (embed, head):
            if name == head:
                continue
            tied_job = TiedEmbeddingJob(embed, head, embed, head_source, out_dtype(embed),
                                        updates.get(embed, []), updates.get(head, []))
            jobs.append(tied_job)
            continue
        jobs.append(TensorJob(name, name, out_dtype(name), updates.get(name, [])))
    return AdapterPlan(jobs, tied_job, vocab_size)


def _lora_update(adapter: PeftAdapter, f: ModuleFactors, W_shape: tuple[int, ...]) -> LinearLora | EmbeddingLora:
    """Validate one module's factors against the config and the base weight shape; build its update."""
    s, module = adapter.settings, f.module
    a_role, b_role = ("emb_A", "emb_B") if f.is_embedding else ("A", "B")
    for role in (a_role, b_role):
        if role not in f.keys:
            raise InputError(f"{adapter.weight_file}: {module} has no {role.replace('emb_', 'lora_embedding_')} "
                             "tensor; re-save the adapter")
    a_shape, b_shape = _check_factor(adapter, f.keys[a_role]), _check_factor(adapter, f.keys[b_role])
    rank, alpha = s.rank_alpha(module)
    if a_shape[0] != rank or b_shape[1] != rank:
        raise InputError(
            f"{adapter.weight_file}: {module} has rank {a_shape[0]} (lora_A) / {b_shape[1]} (lora_B) but "
            f"{CONFIG_NAME} resolves r={rank} for it (r / rank_pattern); config and weights disagree"
        )
    if f.is_embedding:  # A [r, vocab], B [dim, r], E [vocab, dim]; DoRA magnitude per dim
        expect, n_out = (a_shape[1], b_shape[0]), b_shape[0]
    elif s.fan_in_fan_out:  # A [r, in], B [out, r], W stored [in, out]
        expect, n_out = (a_shape[1], b_shape[0]), b_shape[0]
    else:  # A [r, in], B [out, r], W [out, in]
        expect, n_out = (b_shape[0], a_shape[1]), b_shape[0]
    if W_shape != expect:
        raise InputError(
            f"LoRA for {module} has shape A {list(a_shape)}, B {list(b_shape)} but base {module}.weight is "
            f"{list(W_shape)}: adapter trained on a different model size/revision"
        )
    magnitude = None
    if s.use_dora:
        if "magnitude" not in f.keys:
            raise InputError(f"{adapter.weight_file}: use_dora is set but {module} has no lora_magnitude_vector; "
                             "re-save the adapter")
        n_mag = math.prod(adapter.reader.shape(f.keys["magnitude"]))
        if n_mag != n_out:
            raise InputError(f"{adapter.weight_file}: {module} DoRA magnitude has {n_mag} entries, expected {n_out}")
        magnitude = adapter.loader(f.keys["magnitude"])
    elif "magnitude" in f.keys:
        raise InputError(f"{adapter.weight_file}: {module} has a DoRA magnitude but use_dora is false; "
                         "config and weights disagree")
    scale = lm.lora_scale(alpha, rank, use_rslora=s.use_rslora)
    A, B = adapter.loader(f.keys[a_role]), adapter.loader(f.keys[b_role])
    if f.is_embedding:
        return EmbeddingLora(module, A, B, scale, rank, alpha, rslora=s.use_rslora, magnitude=magnitude)
    return LinearLora(module, A, B, scale, rank, alpha, rslora=s.use_rslora, magnitude=magnitude,
                      fan_in_fan_out=s.fan_in_fan_out)


def _refuse_router(adapter: PeftAdapter, arch: Arch, module: str) -> None:
    """An MoE router or shared-expert gate is never merged: the experts each token reaches would
    change with the adapter, and every output format keeps these dense and unquantized as released."""
    i = arch.layer_index(module)
    if arch.moe is None or i is None:
        return
    rel = module[len(arch.layer_prefix(i)):]
    if any(rel in (g.name, arch.disk_name(g.name)) for g in arch.moe.never_quantized):
        raise InputError(f"{adapter.weight_file}: has LoRA for {module}, the {arch.name} router/expert gate; "
                         "routers are not merged: train the adapter without it (exclude it from target_modules)")


class _ExpertsLora:
    """PEFT's LoRA on a fused expert parameter (``target_parameters``: ``mlp.experts.gate_up_proj``
    [E, 2I, H], ``mlp.experts.down_proj`` [E, H, I]) as ordinary per-expert LoRA updates of the
    checkpoint's 2D expert tensors.

    PEFT's ParamWrapper saves ``lora_A`` [r E, in] (expert-major rows: expert e is rows e r .. e r + r)
    and ``lora_B`` [out, r E] (rank-major columns: expert e is columns e, e + E, ...), so expert e's
    delta is ``scale * B[:, e::E] @ A[e r:(e + 1) r]``; gate_up's rows split into gate (first I) and up.
    Two parameters of one module nest: the inner wrapper's keys carry ``.base_layer``; which parameter
    a pair adapts follows from its shapes (in H and out 2I: gate_up; in I and out H: down)."""

    def __init__(self, adapter: PeftAdapter, arch: Arch, config: Mapping[str, Any]):
        self.adapter, self.arch, self.config = adapter, arch, config
        self.on = bool(adapter.settings.target_parameters) and arch.moe is not None
        self._cache: dict[str, Tensor] = {}

    def handles(self, module: str) -> bool:
        if not self.on:
            return False
        i = self.arch.layer_index(module)
        if i is None:
            return False
        rel = module[len(self.arch.layer_prefix(i)):]
        while rel.endswith(".base_layer"):
            rel = rel[: -len(".base_layer")]
        return rel == self.arch.moe.experts.module

    def _tensor(self, key: str) -> Tensor:
        if key not in self._cache:
            self._cache = {key: self.adapter.tensor(key)}  # one module's factors at a time
        return self._cache[key]

    def updates(self, f: ModuleFactors):
        a, arch, s = self.adapter, self.arch, self.adapter.settings
        if set(f.keys) - {"A", "B"} or not {"A", "B"} <= set(f.keys):
            raise InputError(f"{a.weight_file}: {f.module}: expert LoRA needs exactly lora_A and lora_B "
                             "(no bias, no DoRA); re-save the adapter")
        i = arch.layer_index(f.module)
        E = arch.num_experts(self.config)
        (rE, n_in), (n_out, rE_b) = _check_factor(a, f.keys["A"]), _check_factor(a, f.keys["B"])
        H = arch.dims(self.config)["hidden"]
        inter = arch.linear_shape(arch.expert_linear(0, 2), self.config)[1]
        if not arch.is_sparse_layer(self.config, i) or rE != rE_b or rE % max(E, 1):
            raise InputError(f"{a.weight_file}: {f.module}: LoRA factors A {[rE, n_in]}, B {[n_out, rE_b]} do not fit "
                             f"{E} experts of layer {i} of the base: wrong base model")
        r = rE // E
        kind = {(H, 2 * inter): 0, (inter, H): 1}.get((n_in, n_out))
        fused = arch.moe.experts.fused[kind] if kind is not None else None
        if fused is None or not any(t.endswith(fused) for t in s.target_parameters):
            raise InputError(f"{a.weight_file}: {f.module}: LoRA of shape A {[rE, n_in]}, B {[n_out, rE]} matches no "
                             f"targeted expert parameter ({', '.join(s.target_parameters)}) of the base: wrong base model")
        rank, alpha = s.rank_alpha(f"{arch.layer_prefix(i)}{arch.moe.experts.module}.{fused}")
        if rank != r:
            raise InputError(f"{a.weight_file}: {f.module}: rank {r} per expert but {CONFIG_NAME} resolves r={rank}; "
                             "config and weights disagree")
        scale = lm.lora_scale(alpha, rank, use_rslora=s.use_rslora)
        prefix, ka, kb = arch.layer_prefix(i), f.keys["A"], f.keys["B"]
        for e in range(E):
            def A(e=e):
                return self._tensor(ka)[e * r:(e + 1) * r]
            if kind == 0:  # gate rows, then up rows
                for j, rows in ((0, slice(0, inter)), (1, slice(inter, 2 * inter))):
                    yield (f"{prefix}{arch.expert_linear(e, j)}.weight",
                           LinearLora(f"{f.module}.{fused}[{e}]", A, lambda e=e, rows=rows: self._tensor(kb)[rows, e::E],
                                      scale, rank, alpha, rslora=s.use_rslora))
            else:
                yield (f"{prefix}{arch.expert_linear(e, 2)}.weight",
                       LinearLora(f"{f.module}.{fused}[{e}]", A, lambda e=e: self._tensor(kb)[:, e::E],
                                  scale, rank, alpha, rslora=s.use_rslora))


def _plan_trainable_tokens(adapter, f, target, updates, shapes, base, src_of) -> None:
    """``trainable_token_indices``: rows of the embedding are overwritten with the saved rows."""
    idx = adapter.settings.trainable_token_indices
    if isinstance(idx, Mapping):
        idx = next((v for k, v in idx.items() if f.module == k or f.module.endswith(f".{k}")), None)
    rows_key = f.keys["tokens"]
    shape = adapter.reader.shape(rows_key)
    if not isinstance(idx, list) or len(idx) != shape[0]:
        raise InputError(
            f"{adapter.weight_file}: {rows_key} has {shape[0]} rows but {CONFIG_NAME} trainable_token_indices "
            f"gives {idx!r} for {f.module}; config and weights disagree"
        )
    W_shape = shapes.get(target) or base.shape(src_of(target))
    if shape[1:] != tuple(W_shape[1:]) or max(idx) >= W_shape[0]:
        raise InputError(f"{adapter.weight_file}: {rows_key} does not fit {target} {list(W_shape)}: wrong base model")
    updates.setdefault(target, []).append(SetRows(list(idx), adapter.loader(rows_key)))
    shapes.setdefault(target, tuple(W_shape))


def _check_completeness(adapter: PeftAdapter, base: CheckpointReader, updates: Mapping[str, list], arch: Arch) -> None:
    """Every base module the config targets must have LoRA factors, and the config must target something.
    An MoE model's per-expert linears are not modules in memory (fused 3D experts): target_modules
    cannot reach them, only target_parameters can."""
    s = adapter.settings
    if s.target_modules is None or s.target_modules == "all-linear":
        return

    def expert(name: str) -> bool:
        i = arch.layer_index(name)
        return i is not None and arch.expert_slot(name[len(arch.layer_prefix(i)):]) is not None

    candidates = [n[: -len(".weight")] for n in base.names()
                  if n.endswith(".weight") and len(base.shape(n)) == 2 and not expert(n[: -len(".weight")])]
    selected = [m for m in candidates if s.targets(m)]
    if not selected and adapter.modules:
        raise InputError(
            f"{adapter.directory / CONFIG_NAME}: target_modules={s.target_modules!r} matches no module of the base "
            f"{base.path}: wrong base model or architecture naming differs"
        )
    lacking = [m for m in selected if m not in adapter.modules]
    if lacking:
        raise InputError(
            f"{adapter.weight_file}: {CONFIG_NAME} targets {lacking[0]} ({len(lacking)} modules in all) but the file "
            "has no LoRA tensors for it: incomplete adapter (saved from ZeRO-3/FSDP?) or a different base; re-save it"
        )


def _tokenizer_size(path: Path) -> int | None:
    """Token-id count a tokenizer.json can produce (max id + 1), or None when unreadable."""
    try:
        tok = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    ids: list[int] = []
    vocab = (tok.get("model") or {}).get("vocab")
    if isinstance(vocab, dict):
        ids += [v for v in vocab.values() if isinstance(v, int)]
    elif isinstance(vocab, list):
        ids.append(len(vocab) - 1)
    ids += [t.get("id") for t in tok.get("added_tokens") or [] if isinstance(t.get("id"), int)]
    return max(ids) + 1 if ids else None


def _check_tokenizer(adapter: PeftAdapter, vocab: int, embeddings_saved: bool) -> None:
    path = adapter.directory / "tokenizer.json"
    if not path.is_file():
        return
    n = _tokenizer_size(path)
    if n is not None and n > vocab:
        why = ("tokens were added during training but the embeddings were not saved; re-save the adapter with "
               "save_embedding_layers=True" if not embeddings_saved else "the saved embedding is too small")
        raise InputError(f"{path}: produces token ids up to {n - 1} but the merged embedding has {vocab} rows: {why}")


# ---------------------------------------------------------------------------------------------
# the library entry point


def merge_lora(
    base: Path,
    adapter: Path,
    out: Path,
    dtype: str = "auto",
    overwrite: bool = False,
    max_shard_bytes: int | None = None,
    base_quant: str | None = None,
    base_quant_dtype: str | None = None,
    axolotl_config: Path | None = None,
):
    """Merge a PEFT LoRA adapter into its base model and write a plain HF safetensors directory.

    ``dtype``: ``auto`` keeps every base tensor's dtype; ``bf16``/``fp16``/``fp32`` cast all
    floating tensors. Deltas are applied in float32 and each tensor is rounded once. Returns the
    complete manifest (stage ``merge``), which lists every modified tensor with the variant and
    scale used and the tied-embedding decision.

    ``base_quant`` (``nf4``, ``nf4-dq``, ``fp4``, ``fp4-dq``, ``none``; None: as the training run
    recorded it, else ``none``): merge onto the bitsandbytes 4-bit round trip of the base's linear
    weights, the base a QLoRA adapter was trained against (:mod:`qlora`, :mod:`bnb4`);
    ``base_quant_dtype`` the weights' dtype when quantized. ``axolotl_config``: the Axolotl YAML
    the adapter was trained with (one of the records). The decision is in ``params.base_quant``.
    """
    from .. import log
    from .. import manifest as mf
    from ..arch import get_arch
    from ..io.atomic import StagedOutput
    from ..io.writer import AUX_FILES, DEFAULT_MAX_SHARD_BYTES
    from .output import checkpoint_files, parse_dtype, patch_config, refuse_quantized, write_output
    from .qlora import apply_to_jobs, axolotl_record, peft_records, resolve, skipped

    base, adapter_dir, out = Path(base), Path(adapter), Path(out)
    out_dtype = parse_dtype(dtype)
    StagedOutput(out, overwrite=overwrite).preflight()
    reader = CheckpointReader(base)
    config = reader.config
    if not config:
        raise InputError(f"{base}: no config.json; pass the Hugging Face base model directory")
    refuse_quantized(config, base)
    arch = get_arch(config, source=str(base / "config.json"))
    ad = load_adapter(adapter_dir)
    plan = plan_adapter(ad, reader, arch, config, out_dtype)
    records = peft_records(adapter_dir) + ([axolotl_record(axolotl_config)] if axolotl_config is not None else [])
    embed = f"{arch.embed_path}.weight"
    bq = resolve(base_quant, base_quant_dtype, records, reader.dtype(embed), lm_head_quantized=False)
    if bq.setting is not None and getattr(arch, "moe", None) is not None:
        raise InputError(
            f"{base}: --base-quant {bq.method} on a mixture-of-experts model ({arch.name}) is not supported: which "
            "expert/router tensors bitsandbytes quantized depends on the transformers version; use --base-quant none"
        )
    bq = apply_to_jobs(plan.jobs, bq, lambda name: arch.is_quantizable(name)
                       and not skipped(name.removesuffix(".weight"), bq.skip_modules))
    recorded = ad.settings.base_model_name_or_path  # warned only once the plan holds (an error is one line)
    if recorded and Path(recorded).name != base.name and config.get("_name_or_path") != recorded:
        log.warning(f"{adapter_dir / CONFIG_NAME}: adapter was trained on {recorded!r}; merging into {base}")
    if bq.setting is not None:
        if not bq.record.tensors:
            raise InputError(f"{base}: no linear weight of this {arch.name} checkpoint is left to quantize "
                             f"(llm_int8_skip_modules={list(bq.skip_modules)}); check the training config")
        log.info(f"base: {bq.setting.describe()} round trip of {bq.record.tensors} linear weights "
                 f"({bq.record.source}: {bq.record.reason})")
    log.info(f"merging {len(ad.modules)} LoRA modules and {len(ad.replacements)} replacement tensors into "
             f"{len(reader)} base tensors ({arch.name})")

    def make_config():
        tied = None if plan.tied_job is None else plan.tied_job.decision.get("tied")
        if tied is False:
            log.warning(plan.tied_job.decision["reason"])
        return patch_config(config, dtype=out_dtype, vocab_size=plan.vocab_size, tied=tied)

    def make_metrics(modified):
        metrics = {"tensors_modified": len(modified), "modified": modified}
        if plan.tied_job is not None:
            metrics["tied_embeddings"] = dict(plan.tied_job.decision, base_tied=True)
        if plan.vocab_size is not None:
            metrics["vocab_size"] = {"base": reader.shape(f"{arch.embed_path}.weight")[0], "merged": plan.vocab_size}
        return metrics

    adapter_files = [CONFIG_NAME, *[n for n in ad.reader.shards], *([ad.reader.index_file] if ad.reader.index_file else []),
                     *ad.tokenizer_files(), *[n for n in ("config.json", "README.md") if (adapter_dir / n).is_file()]]
    return write_output(
        out,
        overwrite=overwrite,
        reader=reader,
        jobs=plan.jobs,
        aux_files=[(base, AUX_FILES), (adapter_dir, TOKENIZER_FILES)],
        make_config=make_config,
        inputs=lambda: [mf.describe_input("model", base, checkpoint_files(reader)),
                        mf.describe_input("adapter", adapter_dir, sorted(set(adapter_files))),
                        *([mf.describe_input("training_config", Path(axolotl_config))] if axolotl_config else [])],
        params={"mode": "lora", "dtype": dtype, "arch": arch.name, "adapter": ad.settings.summary(),
                "base_quant": bq.record.model_dump(mode="json"),
                "base_quant_request": {"base_quant": base_quant, "base_quant_dtype": base_quant_dtype}},
        make_metrics=make_metrics,
        max_shard_bytes=max_shard_bytes or DEFAULT_MAX_SHARD_BYTES,
    )
