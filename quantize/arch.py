"""The architecture table: everything the pipeline knows about a decoder family, as data.

Each supported family is one frozen :class:`Arch` value in ``_TABLE`` below; there are no per-model
subclasses and no ``if arch == ...`` chains elsewhere. Code that needs model structure asks the table:

* ``groups``: the linears of one decoder layer in execution order, as *sequential groups*; the
  linears of a group read the same input (one Hessian / one activation statistic per group).
* ``scale_pairs``: AWQ smoothing pairs, "previous op -> linears it feeds". A scale ``s`` divides the
  previous op's output channels and multiplies the linears' input channels; the product is unchanged.
* tensor-name templates (``layers_path``, ``embed_path``, ``final_norm_path``, ``lm_head_path``,
  ``layer_norms``) so checkpoints can be planned and streamed from safetensors names alone.

Widths are symbolic (:data:`Dim`) and resolved against a ``config.json`` dict by :func:`dims`, so a
shape or an applicability condition is data too, e.g. v_proj -> o_proj applies only when
``num_key_value_heads * head_dim == num_attention_heads * head_dim`` (see :meth:`Arch.pair_applies`).

Never quantized: embeddings, every norm, and lm_head (``Arch.is_quantizable`` is true only for the
weight of a layer linear), nor an MoE router or shared-expert gate.

Mixture-of-Experts families carry an :class:`MoE` value: where the experts module is, how its fused
3D parameters map to the per-expert 2D linears on disk, the shared experts, the router, and which
layers stay dense. A sparse layer's groups are the dense groups with the MLP ones replaced by
``MoE.groups``, where the experts module stands as one group (``Arch.layer_groups``); per-expert
linears are named as on disk (``mlp.experts.7.gate_proj``), so every format writes the names vLLM's
``FusedMoE`` maps. ``MemoryView`` serves the in-memory (transformers) parameter names from them.
GPT-OSS and Llama-4 text checkpoints hold the 3D parameters themselves (``Experts.fused_on_disk``,
transposed; GPT-OSS's interleaved and biased, Llama-4's scaled by the routing score on the input):
their per-expert linears are views of those, written per expert all the same (GPT-OSS's
compressed-tensors under the names vLLM's GPT-OSS loader streams, ``Experts.served``).

A family whose layer layout depends on its config carries :class:`Variant` values: :func:`get_arch`
returns the form the config selects (DeepSeek-V3 with ``q_lora_rank: null``, Moonlight-style: a plain
``self_attn.q_proj`` in place of q_a_proj / q_a_layernorm / q_b_proj), so every consumer reads one
resolved table entry; :func:`by_name` returns the family's default form.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

from .errors import InputError

Dim = str
"""Symbolic widths: ``hidden`` = hidden_size, ``q`` = num_attention_heads * head_dim,
``kv`` = num_key_value_heads * head_dim, ``intermediate`` = intermediate_size, plus a family's own
(``Arch.extra_dims``: an MoE expert's ``moe_intermediate``, DeepSeek's MLA ranks)."""


@dataclass(frozen=True)
class Linear:
    """One nn.Linear of a decoder layer, named relative to the layer (``self_attn.q_proj``).

    ``out`` lists the output row blocks in order; a fused linear has several (phi3 ``qkv_proj`` is
    ``("q", "kv", "kv")``: rows of q, then k, then v), a plain one has a single block.
    """

    name: str
    out: tuple[Dim, ...]
    inp: Dim


@dataclass(frozen=True)
class ScalePair:
    """AWQ smoothing pair: ``prev``'s output channels feed ``linears``' input channels.

    ``prev`` is a layer norm or a linear (relative name). For a fused ``prev`` linear, ``prev_part``
    is the index of the output block in :attr:`Linear.out` that feeds ``linears`` (only those rows
    are divided by the scale). ``inspect`` is the module whose output measures the scaling loss
    (``None``: the linears themselves), e.g. the whole ``self_attn`` for the q/k/v pair.
    """

    prev: str
    linears: tuple[str, ...]
    inspect: str | None = None
    prev_part: int | None = None
    # never-quantized modules (routers, shared-expert gates; in-memory names) that read ``prev``'s
    # output too: their input columns are multiplied by the scale so the fp function stays the same
    passive: tuple[str, ...] = ()


EXPERT = "{e}"
"""In a scale pair's names, an expert index: ``mlp.experts.{e}.up_proj`` is every routed expert's up
projection (a pair whose ``prev`` holds it is one pair per expert, with its own scale)."""


@dataclass(frozen=True)
class Experts:
    """The routed experts of a sparse layer (MOE.md §1).

    In memory (transformers 5.x) they are one module ``module`` whose forward is
    ``forward(hidden [T, H], top_k_index [T, k], top_k_weights [T, k])`` and which holds two 3D
    parameters, ``fused[0]`` (every expert's gate and up) and ``fused[1]`` (every expert's down).
    Expert e's linears are named as 2D linears ``{disk}.{e}.{gate|up|down}`` with the names in
    ``linears`` (Mixtral ``w1/w3/w2``): the statistics, the solve and the GPTQ output use them.

    How the 3D parameters hold the 2D linears is data (``transposed``, ``interleaved``):
    ``[E, 2I, H]`` gate rows then up rows and ``[E, H, I]`` (Mixtral, Qwen, DeepSeek), or, with
    ``transposed``, ``[E, H, 2I]`` and ``[E, I, H]`` (``x @ W``, not ``F.linear``) whose last dim
    of gate_up interleaves gate and up (``interleaved``: even = gate, odd = up; GPT-OSS).
    ``fused_on_disk``: the checkpoint holds the 3D parameters themselves (GPT-OSS), not the 2D
    linears. ``biases``: the experts' bias parameters (gate_up, down: ``[E, 2I]``, ``[E, H]``,
    gate_up's in its own order), never quantized, written as on disk. ``gate``: the experts
    module's method mapping the gate_up output (bias added) to the down input (GPT-OSS's clamped
    SwiGLU ``_apply_gate``); None: ``act_fn(gate) * up``. ``served``: the names vLLM's loader
    maps for a compressed-tensors expert (GPT-OSS: ``{disk}.{e}.w13_weight_packed`` /
    ``w2_weight_packed`` and their ``_weight_scale``: gate and up as ONE tensor in the gate_up
    row order, no ``weight_shape``); empty: per-expert 2D linears as for every other tensor.
    ``score_on_input`` (Llama-4): the module's forward is ``forward(x [E*T, H])``, every expert's
    copy of the layer's tokens times its routing score (0 where not routed: ``x`` of expert e is
    ``x.view(E, T, H)[e]``), and its output is summed by the caller; the routing is then read from
    ``router``'s output logits (top-``k``, as the router picks them).
    """

    module: str = "mlp.experts"
    disk: str = "mlp.experts"
    linears: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")  # gate, up, down
    fused: tuple[str, str] = ("gate_up_proj", "down_proj")
    num_keys: tuple[str, ...] = ("num_experts", "num_local_experts")  # first present wins (transformers 5.x saves aliases)
    top_k_key: str = "num_experts_per_tok"
    intermediate: Dim = "moe_intermediate"  # an expert's intermediate width
    transposed: bool = False
    interleaved: bool = False
    fused_on_disk: bool = False
    biases: tuple[str, str] | None = None
    gate: str | None = None
    served: tuple[str, str] = ()  # (gate+up, down) compressed-tensors name stems
    score_on_input: bool = False
    router: str | None = None  # the router module (score_on_input): its output's [1] are the logits [T, E]


@dataclass(frozen=True)
class MoE:
    """What makes a family Mixture-of-Experts, as data.

    ``groups``: the MLP part of a sparse layer in execution order; the experts are the one-linear
    group named ``experts.module`` (shared experts are plain linears). ``dense_linears``: the dense
    MLP linears that a sparse layer lacks and a dense layer keeps. Which layers are dense:
    ``first_dense_key`` (DeepSeek ``first_k_dense_replace``), ``dense_list_key`` (Qwen
    ``mlp_only_layers``), ``sparse_step_key`` (Qwen ``decoder_sparse_step``). ``never_quantized``:
    in-memory module names of routers and shared-expert gates (excluded in every config).
    ``renames``: (in-memory prefix, on-disk prefix) of a layer's modules (Mixtral's
    ``block_sparse_moe`` is ``mlp`` in transformers 5.x).
    """

    experts: Experts
    groups: tuple[tuple[Linear, ...], ...]
    # AWQ pairs of a sparse layer's MLP part (replacing the dense MLP pairs; ``EXPERT`` templates):
    # norm -> every expert's and the shared expert's gate/up (routers as ``passive``), expert up ->
    # its down, shared up -> shared down
    scale_pairs: tuple[ScalePair, ...] = ()
    # routers and shared-expert gates: Linear-shaped ([experts or 1, hidden]) but never quantized
    never_quantized: tuple[Linear, ...] = (Linear("mlp.gate", ("experts",), "hidden"),)
    dense_linears: tuple[str, ...] = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    renames: tuple[tuple[str, str], ...] = ()
    biased: tuple[str, ...] = ()  # never_quantized modules that carry a bias (GPT-OSS's router)
    # persistent buffers of a sparse layer on disk, never quantized: (relative name, width key)
    # (DeepSeek-V3's router ``mlp.gate.e_score_correction_bias``, one value per routed expert)
    buffers: tuple[tuple[str, str], ...] = ()
    first_dense_key: str | None = None
    dense_list_key: str | None = None
    sparse_step_key: str | None = None
    sparse_list_key: str | None = None  # Llama-4 ``moe_layers``: exactly these layers are sparse


@dataclass(frozen=True)
class Variant:
    """A config-selected form of a family, as data: where ``when(config)`` holds, the family's entry
    with the fields in ``changes`` (``(field name, value)``) replaced is what :func:`get_arch` returns
    (same name, model_type and architectures). The first variant whose ``when`` holds wins."""

    when: Callable[[Mapping[str, Any]], bool]
    changes: tuple[tuple[str, Any], ...]


@dataclass(frozen=True)
class Arch:
    """One decoder family. Fields are data; methods only derive names and widths from them."""

    name: str  # short family name used in messages and CLI ("llama")
    architectures: tuple[str, ...]  # config.json "architectures"[0] values that map here
    model_type: str  # config.json "model_type"
    groups: tuple[tuple[Linear, ...], ...]  # sequential groups, execution order
    scale_pairs: tuple[ScalePair, ...]  # AWQ pairs, execution order
    layer_norms: tuple[str, ...]  # per-layer norm modules (never quantized)
    tie_word_embeddings: bool = False  # family default when config.json omits the key
    head_dim_default: int | None = None  # head_dim when config.json omits it; None: hidden // heads
    norm_weight_offset: float = 0.0  # RMSNorm multiplies by (offset + weight)
    scales_embeddings: bool = False  # embeddings are multiplied by sqrt(hidden_size) before layer 0
    always_biased: tuple[str, ...] = ()  # linears that carry a bias whatever the config says
    bias_flags: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (config key, linears it adds a bias to)
    bias_defaults: tuple[tuple[str, bool], ...] = ()  # a bias_flags key's value when config.json omits it
    moe: MoE | None = None  # Mixture-of-Experts layout; None: a dense family
    layer_params: tuple[tuple[str, Dim], ...] = ()  # other per-layer parameters and widths, never quantized (GPT-OSS's sinks)
    # family-specific widths: (name, function of config.json) -> int
    extra_dims: tuple[tuple[str, Callable[[Mapping[str, Any]], int]], ...] = ()
    variants: tuple[Variant, ...] = ()  # config-selected forms (:meth:`for_config`); () in a resolved form
    layers_path: str = "model.layers"
    num_layers_key: str = "num_hidden_layers"
    embed_path: str = "model.embed_tokens"
    final_norm_path: str = "model.norm"
    lm_head_path: str = "lm_head"

    def for_config(self, config: Mapping[str, Any]) -> Arch:
        """The form of this family ``config`` selects: the first :class:`Variant` whose ``when`` holds
        applied (its ``variants`` emptied), else ``self``."""
        for v in self.variants:
            if v.when(config):
                return replace(self, variants=(), **dict(v.changes))
        return self

    # -- names -------------------------------------------------------------------------------

    def layer_prefix(self, i: int) -> str:
        """``"model.layers.{i}."``: prepend to a relative name to get the checkpoint/module name."""
        return f"{self.layers_path}.{i}."

    def linear_names(self) -> list[str]:
        """Relative names of every linear of a layer, flat, in execution order."""
        return [lin.name for group in self.groups for lin in group]

    def group_names(self) -> list[list[str]]:
        """Sequential groups as lists of relative names."""
        return [[lin.name for lin in group] for group in self.groups]

    def linear(self, name: str) -> Linear:
        """The :class:`Linear` with relative name ``name`` (dense and MoE groups; an expert's linear
        ``mlp.experts.3.up_proj`` resolves to its template)."""
        for group in self.groups + (self.moe.groups if self.moe else ()):
            for lin in group:
                if lin.name == name:
                    return lin
        slot = self.expert_slot(name.replace(EXPERT, "0"))
        if slot is not None:
            j, d = slot[1], self.moe.experts.intermediate
            return Linear(name, ("hidden",) if j == 2 else (d,), d if j == 2 else "hidden")
        raise KeyError(f"{self.name}: no linear named {name!r}; layer linears are {self.linear_names()}")

    # -- Mixture-of-Experts ----------------------------------------------------------------------

    def is_sparse_layer(self, config: Mapping[str, Any], i: int) -> bool:
        """Whether decoder layer ``i`` of ``config`` holds routed experts (transformers' own rule)."""
        m = self.moe
        if m is None or self.num_experts(config) <= 0:
            return False
        if m.first_dense_key and i < int(config.get(m.first_dense_key) or 0):
            return False
        if m.dense_list_key and i in (config.get(m.dense_list_key) or ()):
            return False
        if m.sparse_step_key and (i + 1) % int(config.get(m.sparse_step_key) or 1) != 0:
            return False
        if m.sparse_list_key and i not in (config.get(m.sparse_list_key) or ()):
            return False
        return True

    def num_experts(self, config: Mapping[str, Any]) -> int:
        """Routed experts per sparse layer (0 for a dense family)."""
        if self.moe is None:
            return 0
        for key in self.moe.experts.num_keys:
            if config.get(key) is not None:
                return int(config[key])
        return 0

    def experts_per_token(self, config: Mapping[str, Any]) -> int:
        return int(config.get(self.moe.experts.top_k_key) or 0) if self.moe else 0

    def expert_linear(self, e: int, j: int) -> str:
        """On-disk relative name of expert ``e``'s linear ``j`` (0 gate, 1 up, 2 down)."""
        ex = self.moe.experts
        return f"{ex.disk}.{e}.{ex.linears[j]}"

    def expert_slot(self, name: str) -> tuple[int, int] | None:
        """``(expert, j)`` for an expert linear's relative on-disk name, else None."""
        if self.moe is None:
            return None
        ex = self.moe.experts
        m = re.fullmatch(re.escape(ex.disk) + r"\.(\d+)\.(\w+)", name)
        if m is None or m.group(2) not in ex.linears:
            return None
        return int(m.group(1)), ex.linears.index(m.group(2))

    def layer_groups(self, config: Mapping[str, Any], i: int) -> list[list[str]]:
        """Sequential groups of layer ``i`` (relative names, execution order). In a sparse layer the
        dense MLP groups are replaced by ``MoE.groups``; the experts are the group ``[experts.module]``."""
        if not self.is_sparse_layer(config, i):
            return self.group_names()
        dense = set(self.moe.dense_linears)
        out, placed = [], False
        for group in self.groups:
            if any(lin.name in dense for lin in group):
                if not placed:
                    out += [[lin.name for lin in g] for g in self.moe.groups]
                    placed = True
                continue
            out.append([lin.name for lin in group])
        if not placed:
            out += [[lin.name for lin in g] for g in self.moe.groups]
        return out

    def layer_linears(self, config: Mapping[str, Any], i: int) -> list[str]:
        """Every quantizable linear of layer ``i`` (relative on-disk names; experts expanded)."""
        out = []
        for group in self.layer_groups(config, i):
            for name in group:
                if self.moe is not None and name == self.moe.experts.module:
                    out += [self.expert_linear(e, j) for e in range(self.num_experts(config)) for j in range(3)]
                else:
                    out.append(name)
        return out

    def linear_kinds(self, config: Mapping[str, Any]) -> list[str]:
        """One representative name per distinct linear of the model (dense layers' and sparse
        layers'; expert 0 stands for every expert): for preflights of shapes and group sizes."""
        seen: dict[str, None] = {}
        kinds = {self.is_sparse_layer(config, i) for i in range(self.num_layers(config))}
        for sparse in sorted(kinds):
            i = next(i for i in range(self.num_layers(config)) if self.is_sparse_layer(config, i) == sparse)
            for name in self.layer_linears(config, i):
                slot = self.expert_slot(name)
                if slot is None or slot[0] == 0:
                    seen.setdefault(name)
        return list(seen)

    def disk_name(self, local: str) -> str:
        """The on-disk relative name of an in-memory relative name (``renames``)."""
        for mem, disk in (self.moe.renames if self.moe else ()):
            if local.startswith(mem):
                return disk + local[len(mem):]
        return local

    def has_bias(self, linear: str, config: Mapping[str, Any]) -> bool:
        """Whether ``linear`` carries a bias in a model built from ``config``."""
        if linear in self.always_biased:
            return True
        defaults = dict(self.bias_defaults)
        return any(bool(config.get(key, defaults.get(key, False))) and linear in names for key, names in self.bias_flags)

    def layer_tensor_names(self, config: Mapping[str, Any], i: int = 0) -> list[str]:
        """Relative tensor names layer ``i`` holds in a checkpoint (``self_attn.q_proj.weight``, ...);
        a sparse layer adds its router (and shared-expert gate) weights."""
        names = []
        for lin in self.layer_linears(config, i):
            names.append(f"{lin}.weight")
            if self.has_bias(lin, config):
                names.append(f"{lin}.bias")
        if self.is_sparse_layer(config, i):
            ex = self.moe.experts
            if ex.fused_on_disk:  # the 3D parameters instead of the 2D linears
                names = [n for n in names if self.expert_slot(n.rsplit(".", 1)[0]) is None]
                names += [f"{ex.disk}.{p}" for p in ex.fused]
            names += [f"{self.disk_name(m.name)}.weight" for m in self.moe.never_quantized]
        names += [f"{norm}.weight" for norm in self.layer_norms]
        names += [name for name, _, _ in self.layer_other_params(config, i)]
        return names

    def layer_other_params(self, config: Mapping[str, Any], i: int) -> list[tuple[str, int, bool]]:
        """Layer ``i``'s parameters besides its linears, norms and router weights, never quantized:
        ``(relative name, numel, one slice per routed expert)`` -- ``layer_params`` (GPT-OSS's
        sinks), router biases (``MoE.biased``), router buffers (``MoE.buffers``: DeepSeek's
        ``e_score_correction_bias``) and the experts' biases (``Experts.biases``)."""
        d = self.dims(config)
        out = [(name, d[width], False) for name, width in self.layer_params]
        if self.is_sparse_layer(config, i):
            out += [(f"{self.disk_name(m.name)}.bias", sum(d[o] for o in m.out), False)
                    for m in self.moe.never_quantized if m.name in self.moe.biased]
            out += [(name, d[width], False) for name, width in self.moe.buffers]
            ex = self.moe.experts
            if ex.biases:
                E = self.num_experts(config)
                out += [(f"{ex.disk}.{ex.biases[0]}", E * 2 * d[ex.intermediate], True),
                        (f"{ex.disk}.{ex.biases[1]}", E * d["hidden"], True)]
        return out

    def non_layer_tensor_names(self, config: Mapping[str, Any]) -> list[str]:
        """Checkpoint names outside the layers; lm_head is absent when embeddings are tied."""
        names = [f"{self.embed_path}.weight", f"{self.final_norm_path}.weight"]
        if not self.is_tied(config):
            names.append(f"{self.lm_head_path}.weight")
        return names

    def expected_tensor_names(self, config: Mapping[str, Any]) -> list[str]:
        """Every tensor name a complete checkpoint of ``config`` holds (a tied lm_head is omitted)."""
        per_layer = [self.layer_prefix(i) + r for i in range(self.num_layers(config))
                     for r in self.layer_tensor_names(config, i)]
        return self.non_layer_tensor_names(config) + per_layer

    def layer_index(self, tensor_name: str) -> int | None:
        """The layer a checkpoint tensor belongs to, or None for embeddings / final norm / lm_head."""
        m = re.match(re.escape(self.layers_path) + r"\.(\d+)\.", tensor_name)
        return int(m.group(1)) if m else None

    def split_tensor_names(self, names: Iterable[str]) -> tuple[dict[int, list[str]], list[str]]:
        """Partition checkpoint names into ``({layer index: names}, non-layer names)``, order kept."""
        per_layer: dict[int, list[str]] = {}
        other: list[str] = []
        for name in names:
            i = self.layer_index(name)
            if i is None:
                other.append(name)
            else:
                per_layer.setdefault(i, []).append(name)
        return dict(sorted(per_layer.items())), other

    def is_quantizable(self, tensor_name: str) -> bool:
        """True only for the weight of a layer linear (embeddings, norms, lm_head, biases, routers
        and shared-expert gates stay)."""
        i = self.layer_index(tensor_name)
        if i is None or not tensor_name.endswith(".weight"):
            return False
        rel = tensor_name[len(self.layer_prefix(i)) : -len(".weight")]
        if self.expert_slot(rel) is not None:
            return True
        return rel in self.linear_names() or any(rel == lin.name for g in (self.moe.groups if self.moe else ())
                                                  for lin in g if lin.name != self.moe.experts.module)

    # -- config --------------------------------------------------------------------------------

    def num_layers(self, config: Mapping[str, Any]) -> int:
        n = config.get(self.num_layers_key)
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise InputError(
                f"config.json: {self.num_layers_key}={n!r} is not a positive integer; "
                f"fix the config of this {self.name} checkpoint"
            )
        return n

    def is_tied(self, config: Mapping[str, Any]) -> bool:
        """Whether lm_head shares the embedding matrix (config value, else the family default)."""
        return bool(config.get("tie_word_embeddings", self.tie_word_embeddings))

    def dims(self, config: Mapping[str, Any]) -> dict[str, int]:
        """Resolve the symbolic widths (and ``head_dim``) against ``config``."""
        try:
            hidden = int(config["hidden_size"])
            heads = int(config["num_attention_heads"])
            intermediate = int(config["intermediate_size"])
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(
                f"config.json: missing or invalid {e} for {self.name}; needs hidden_size, "
                "num_attention_heads and intermediate_size"
            ) from None
        kv_heads = int(config.get("num_key_value_heads") or heads)
        head_dim = config.get("head_dim") or self.head_dim_default or hidden // heads
        head_dim = int(head_dim)
        out = {
            "hidden": hidden,
            "q": heads * head_dim,
            "kv": kv_heads * head_dim,
            "intermediate": intermediate,
            "head_dim": head_dim,
            "heads": heads,
        }
        if self.moe is not None:
            out["experts"], out["one"] = self.num_experts(config), 1
        for name, fn in self.extra_dims:
            try:
                out[name] = int(fn(config))
            except (KeyError, TypeError, ValueError) as e:
                raise InputError(f"config.json: missing or invalid {e} for {self.name} ({name} width)") from None
        return out

    def linear_shape(self, name: str, config: Mapping[str, Any]) -> tuple[int, int]:
        """``(out_features, in_features)`` of a layer linear under ``config``."""
        return self.shape_of(self.linear(name), config)

    def shape_of(self, lin: Linear, config: Mapping[str, Any]) -> tuple[int, int]:
        """``(out_features, in_features)`` of ``lin`` (a layer linear, a router) under ``config``."""
        d = self.dims(config)
        return sum(d[p] for p in lin.out), d[lin.inp]

    def pair_applies(self, pair: ScalePair, config: Mapping[str, Any]) -> bool:
        """Whether a scale pair is shape-compatible under ``config``.

        Exact condition: the width of the channels ``prev`` emits into ``linears`` (``hidden`` for a
        norm, ``prev.out[prev_part]`` for a linear) equals every linear's ``in_features``. For
        v_proj -> o_proj this is ``num_key_value_heads * head_dim == num_attention_heads * head_dim``,
        i.e. no grouped-query attention: with GQA one v channel feeds several o_proj inputs.
        """
        d = self.dims(config)
        if pair.prev in self.layer_norms:
            width = d["hidden"]
        else:
            prev = self.linear(pair.prev)
            width = d[prev.out[pair.prev_part if pair.prev_part is not None else 0]]
        passive = [lin for lin in (self.moe.never_quantized if self.moe else ()) if lin.name in pair.passive]
        return (all(d[self.linear(n).inp] == width for n in pair.linears)
                and len(passive) == len(pair.passive) and all(d[lin.inp] == width for lin in passive))

    def scale_pairs_for(self, config: Mapping[str, Any]) -> list[ScalePair]:
        """The AWQ pairs that apply to a model built from ``config`` (see :meth:`pair_applies`)."""
        return [p for p in self.scale_pairs if self.pair_applies(p, config)]

    def layer_scale_pairs(self, config: Mapping[str, Any], i: int) -> list[ScalePair]:
        """The AWQ pairs of layer ``i`` that apply under ``config``, in execution order. In a sparse
        layer the dense MLP pairs (those touching ``MoE.dense_linears``) are replaced by
        ``MoE.scale_pairs``, whose expert names are ``EXPERT`` templates (:meth:`expert_names`)."""
        if not self.is_sparse_layer(config, i):
            return self.scale_pairs_for(config)
        dense = set(self.moe.dense_linears)
        out, placed = [], False
        for pair in self.scale_pairs:
            if pair.prev in dense or any(n in dense for n in pair.linears):
                if not placed:
                    out += self.moe.scale_pairs
                    placed = True
                continue
            out.append(pair)
        if not placed:
            out += self.moe.scale_pairs
        return [p for p in out if self.pair_applies(p, config)]

    def expert_names(self, name: str, config: Mapping[str, Any]) -> list[str]:
        """``name`` with its ``EXPERT`` template filled in for every routed expert (else ``[name]``)."""
        if EXPERT not in name:
            return [name]
        return [name.replace(EXPERT, str(e)) for e in range(self.num_experts(config))]


# -- building blocks shared by the families ------------------------------------------------------

Q = Linear("self_attn.q_proj", ("q",), "hidden")
K = Linear("self_attn.k_proj", ("kv",), "hidden")
V = Linear("self_attn.v_proj", ("kv",), "hidden")
O = Linear("self_attn.o_proj", ("hidden",), "q")
GATE = Linear("mlp.gate_proj", ("intermediate",), "hidden")
UP = Linear("mlp.up_proj", ("intermediate",), "hidden")
DOWN = Linear("mlp.down_proj", ("hidden",), "intermediate")

ATTN_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
MLP_LINEARS = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")

LLAMA_GROUPS = ((Q, K, V), (O,), (GATE, UP), (DOWN,))
LLAMA_NORMS = ("input_layernorm", "post_attention_layernorm")


def llama_pairs(mlp_norm: str = "post_attention_layernorm") -> tuple[ScalePair, ...]:
    """The four AWQ pairs of a Llama-style layer; ``mlp_norm`` is the norm that feeds the MLP."""
    return (
        ScalePair("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
        ScalePair("self_attn.v_proj", ("self_attn.o_proj",)),  # only without GQA: see Arch.pair_applies
        ScalePair(mlp_norm, ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
        ScalePair("mlp.up_proj", ("mlp.down_proj",)),
    )


# -- the table -----------------------------------------------------------------------------------

_TABLE: tuple[Arch, ...] = (
    Arch(
        name="llama",
        architectures=("LlamaForCausalLM",),
        model_type="llama",
        groups=LLAMA_GROUPS,
        scale_pairs=llama_pairs(),
        layer_norms=LLAMA_NORMS,
        # attention_bias / mlp_bias default to false; some derivatives (e.g. InternLM-style) set them
        bias_flags=(("attention_bias", ATTN_LINEARS), ("mlp_bias", MLP_LINEARS)),
    ),
    Arch(
        name="mistral",
        architectures=("MistralForCausalLM",),
        model_type="mistral",
        groups=LLAMA_GROUPS,
        scale_pairs=llama_pairs(),
        layer_norms=LLAMA_NORMS,
        # Llama layout; biases are hard-coded off in transformers' Mistral, config keys are ignored
    ),
    Arch(
        name="qwen2",
        architectures=("Qwen2ForCausalLM",),
        model_type="qwen2",
        groups=LLAMA_GROUPS,
        scale_pairs=llama_pairs(),  # v_proj bias must be divided by the v->o scale too
        layer_norms=LLAMA_NORMS,
        always_biased=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),  # Qwen2 quirk: q/k/v bias
    ),
    Arch(
        name="qwen3",
        architectures=("Qwen3ForCausalLM",),
        model_type="qwen3",
        groups=LLAMA_GROUPS,
        # q_norm/k_norm RMS-normalise q and k per head after projection; v is not normalised, so
        # v_proj -> o_proj smoothing stays exact (subject to the GQA condition).
        scale_pairs=llama_pairs(),
        layer_norms=LLAMA_NORMS + ("self_attn.q_norm", "self_attn.k_norm"),
        head_dim_default=128,  # Qwen3Config default, not hidden // heads
        bias_flags=(("attention_bias", ATTN_LINEARS),),
    ),
    Arch(
        name="gemma",
        architectures=("GemmaForCausalLM",),
        model_type="gemma",
        groups=LLAMA_GROUPS,
        scale_pairs=llama_pairs(),
        layer_norms=LLAMA_NORMS,
        tie_word_embeddings=True,  # Gemma ties lm_head to the embeddings by default
        head_dim_default=256,  # GemmaConfig default, not hidden // heads
        norm_weight_offset=1.0,  # GemmaRMSNorm scales by (1 + weight): fold s as w' = (1 + w) / s - 1
        scales_embeddings=True,  # Gemma multiplies embeddings by sqrt(hidden_size)
        bias_flags=(("attention_bias", ATTN_LINEARS),),
    ),
    Arch(
        name="gemma2",
        architectures=("Gemma2ForCausalLM",),
        model_type="gemma2",
        groups=LLAMA_GROUPS,
        # Sandwich norms: post_attention_layernorm normalises the attention *output* (after o_proj),
        # so it feeds nothing quantizable; the MLP input norm is pre_feedforward_layernorm.
        scale_pairs=llama_pairs(mlp_norm="pre_feedforward_layernorm"),
        layer_norms=LLAMA_NORMS + ("pre_feedforward_layernorm", "post_feedforward_layernorm"),
        tie_word_embeddings=True,
        head_dim_default=256,
        norm_weight_offset=1.0,  # (1 + weight) RMSNorm, as Gemma
        scales_embeddings=True,  # as Gemma; logit/attention soft-capping does not touch linears
        bias_flags=(("attention_bias", ATTN_LINEARS),),
    ),
    Arch(
        name="phi3",
        architectures=("Phi3ForCausalLM",),
        model_type="phi3",
        # Fused projections: qkv_proj rows are [q | k | v], gate_up_proj rows are [gate | up].
        groups=(
            (Linear("self_attn.qkv_proj", ("q", "kv", "kv"), "hidden"),),
            (Linear("self_attn.o_proj", ("hidden",), "q"),),
            (Linear("mlp.gate_up_proj", ("intermediate", "intermediate"), "hidden"),),
            (Linear("mlp.down_proj", ("hidden",), "intermediate"),),
        ),
        scale_pairs=(
            ScalePair("input_layernorm", ("self_attn.qkv_proj",), "self_attn"),
            ScalePair("self_attn.qkv_proj", ("self_attn.o_proj",), prev_part=2),  # v rows only; no GQA
            ScalePair("post_attention_layernorm", ("mlp.gate_up_proj",), "mlp"),
            ScalePair("mlp.gate_up_proj", ("mlp.down_proj",), prev_part=1),  # up rows only
        ),
        layer_norms=LLAMA_NORMS,
    ),
)

# -- Mixture-of-Experts families (MOE.md) ----------------------------------------------------------

EXPERTS = Linear("mlp.experts", ("hidden",), "hidden")  # the experts module, one group of its own


def _shared(prefix: str) -> tuple[tuple[Linear, ...], ...]:
    """A shared expert's two groups (gate/up read the MoE input; down reads their product)."""
    return ((Linear(f"{prefix}.gate_proj", ("shared",), "hidden"), Linear(f"{prefix}.up_proj", ("shared",), "hidden")),
            (Linear(f"{prefix}.down_proj", ("hidden",), "shared"),))


def _moe_pairs(experts: Experts, shared: str | None = None, routers: tuple[str, ...] = ("mlp.gate",),
               norm: str = "post_attention_layernorm") -> tuple[ScalePair, ...]:
    """A sparse layer's MLP-part AWQ pairs. The norm feeds every routed expert's gate/up, the shared
    expert's gate/up and the routers (never quantized: ``passive``, their columns take the scale);
    ``inspect="mlp"`` re-runs the whole MoE block (router included) on the best candidates. Then per
    expert up -> down (its own scale, folded into its up rows) and shared up -> shared down."""
    gate, up, down = (f"{experts.disk}.{EXPERT}.{n}" for n in experts.linears)
    mlp = (gate, up) + ((f"{shared}.gate_proj", f"{shared}.up_proj") if shared else ())
    pairs = (ScalePair(norm, mlp, "mlp", passive=routers), ScalePair(up, (down,)))
    if shared:
        pairs += (ScalePair(f"{shared}.up_proj", (f"{shared}.down_proj",)),)
    return pairs


def _moe_intermediate(c: Mapping[str, Any]) -> int:
    return c["moe_intermediate_size"]


_MLA_ATTN = ("self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa", "self_attn.o_proj")  # attention_bias
# DeepSeek-V3's MLA linears after q (both forms): kv_a reads the layer input, beside q_a or q_proj
_KV_A = Linear("self_attn.kv_a_proj_with_mqa", ("kv_a",), "hidden")
_MLA_TAIL = (
    (Linear("self_attn.kv_b_proj", ("kv_b",), "kv_lora"),),
    (Linear("self_attn.o_proj", ("hidden",), "o_mla"),),
    (GATE, UP),
    (DOWN,),
)
_DEEPSEEK_MLP_PAIRS = (
    ScalePair("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),  # dense layers
    ScalePair("mlp.up_proj", ("mlp.down_proj",)),
)
_DEEPSEEK_DIMS = (
    ("moe_intermediate", _moe_intermediate),
    ("shared", lambda c: c["moe_intermediate_size"] * c["n_shared_experts"]),
    ("kv_lora", lambda c: c["kv_lora_rank"]),
    ("kv_a", lambda c: c["kv_lora_rank"] + c["qk_rope_head_dim"]),
    ("q_mla", lambda c: c["num_attention_heads"] * (c["qk_nope_head_dim"] + c["qk_rope_head_dim"])),
    ("kv_b", lambda c: c["num_attention_heads"] * (c["qk_nope_head_dim"] + c["v_head_dim"])),
    ("o_mla", lambda c: c["num_attention_heads"] * c["v_head_dim"]),
)

_MIXTRAL_EXPERTS = Experts(disk="block_sparse_moe.experts", linears=("w1", "w3", "w2"),
                           num_keys=("num_local_experts",), intermediate="intermediate")
_QWEN3_EXPERTS = Experts(num_keys=("num_experts", "num_local_experts"))
_DEEPSEEK_EXPERTS = Experts(num_keys=("n_routed_experts",))

# GPT-OSS (MOE.md §1): the checkpoint holds the experts as transformers does, 3D and transposed,
# gate/up interleaved on gate_up's last dim, with biases; the down input is the clamped SwiGLU
# ``(clamp(up, ±7) + 1) * g * sigmoid(1.702 g)``, g = clamp(gate, max=7) (``GptOssExperts._apply_gate``).
# Our per-expert linears are the 2D views (gate_up_proj[e][:, 0::2]ᵀ is gate_proj); compressed-tensors
# outputs use the per-expert names vLLM's GPT-OSS loader streams (``served``).
_GPT_OSS_EXPERTS = Experts(num_keys=("num_local_experts",), intermediate="intermediate", transposed=True,
                           interleaved=True, fused_on_disk=True, biases=("gate_up_proj_bias", "down_proj_bias"),
                           gate="_apply_gate", served=("w13", "w2"))

_MOE_TABLE: tuple[Arch, ...] = (
    Arch(
        name="mixtral",
        architectures=("MixtralForCausalLM",),
        model_type="mixtral",
        groups=LLAMA_GROUPS,  # dense MLP groups never occur: every Mixtral layer is sparse
        scale_pairs=llama_pairs(),  # the MLP pairs never apply: MoE.scale_pairs in every (sparse) layer
        layer_norms=LLAMA_NORMS,
        moe=MoE(
            experts=_MIXTRAL_EXPERTS,
            groups=((EXPERTS,),),
            scale_pairs=_moe_pairs(_MIXTRAL_EXPERTS),
            renames=(("mlp.", "block_sparse_moe."),),
        ),
    ),
    Arch(
        name="qwen2_moe",
        architectures=("Qwen2MoeForCausalLM",),
        model_type="qwen2_moe",
        groups=LLAMA_GROUPS,
        scale_pairs=llama_pairs(),  # dense layers (mlp_only_layers) keep the dense MLP pairs; v bias divided by v->o
        layer_norms=LLAMA_NORMS,
        bias_flags=(("qkv_bias", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),),
        bias_defaults=(("qkv_bias", True),),
        # the shared expert runs before the router in transformers' forward
        moe=MoE(
            experts=Experts(),
            groups=_shared("mlp.shared_expert") + ((EXPERTS,),),
            never_quantized=(Linear("mlp.gate", ("experts",), "hidden"), Linear("mlp.shared_expert_gate", ("one",), "hidden")),
            scale_pairs=_moe_pairs(Experts(), "mlp.shared_expert", ("mlp.gate", "mlp.shared_expert_gate")),
            dense_list_key="mlp_only_layers",
            sparse_step_key="decoder_sparse_step",
        ),
        extra_dims=(("moe_intermediate", _moe_intermediate),
                    ("shared", lambda c: c["shared_expert_intermediate_size"])),
    ),
    Arch(
        name="qwen3_moe",
        architectures=("Qwen3MoeForCausalLM",),
        model_type="qwen3_moe",
        groups=LLAMA_GROUPS,
        scale_pairs=llama_pairs(),  # as Qwen3: q_norm/k_norm leave v -> o exact
        layer_norms=LLAMA_NORMS + ("self_attn.q_norm", "self_attn.k_norm"),
        head_dim_default=128,
        bias_flags=(("attention_bias", ATTN_LINEARS),),
        moe=MoE(
            experts=_QWEN3_EXPERTS,
            groups=((EXPERTS,),),
            scale_pairs=_moe_pairs(_QWEN3_EXPERTS),
            dense_list_key="mlp_only_layers",
            sparse_step_key="decoder_sparse_step",
        ),
        extra_dims=(("moe_intermediate", _moe_intermediate),),
    ),
    Arch(
        name="deepseek_v3",
        architectures=("DeepseekV3ForCausalLM",),
        model_type="deepseek_v3",
        # MLA: q_a and kv_a read the layer input (one group), q_b reads the normalised q_a output,
        # kv_b the normalised kv_a latent; forward order q_a, q_b, kv_a, kv_b, o
        groups=(
            (Linear("self_attn.q_a_proj", ("q_lora",), "hidden"), _KV_A),
            (Linear("self_attn.q_b_proj", ("q_mla",), "q_lora"),),
        ) + _MLA_TAIL,
        # MLA: only the input norm -> q_a/kv_a pair. q_a_layernorm -> q_b and kv_a_layernorm -> kv_b
        # would fold into norms of other widths (kv_a_layernorm normalises only the first kv_lora of
        # kv_a's outputs), and kv_b's v rows are interleaved per head with the no-rope k rows, so
        # kv_b -> o has no contiguous row block to fold into: those stay unscaled (clip search only).
        scale_pairs=(ScalePair("input_layernorm", ("self_attn.q_a_proj", _KV_A.name), "self_attn"),)
        + _DEEPSEEK_MLP_PAIRS,
        layer_norms=LLAMA_NORMS + ("self_attn.q_a_layernorm", "self_attn.kv_a_layernorm"),
        bias_flags=(("attention_bias", _MLA_ATTN),),
        moe=MoE(
            experts=_DEEPSEEK_EXPERTS,
            groups=((EXPERTS,),) + _shared("mlp.shared_experts"),  # shared experts run after the routed ones
            scale_pairs=_moe_pairs(_DEEPSEEK_EXPERTS, "mlp.shared_experts"),
            first_dense_key="first_k_dense_replace",
            buffers=(("mlp.gate.e_score_correction_bias", "experts"),),
        ),
        extra_dims=_DEEPSEEK_DIMS[:2] + (("q_lora", lambda c: c["q_lora_rank"]),) + _DEEPSEEK_DIMS[2:],
        variants=(
            # ``q_lora_rank: null`` (Moonlight-16B-A3B, DeepSeek-V2-Lite style; a config that omits the key
            # is transformers' default 1536, the form above): q is one plain q_proj reading the layer input
            # beside kv_a (no q_a_layernorm); transformers builds it without a bias whatever attention_bias says
            Variant(
                when=lambda c: "q_lora_rank" in c and c["q_lora_rank"] is None,
                changes=(
                    ("groups", ((Linear("self_attn.q_proj", ("q_mla",), "hidden"), _KV_A),) + _MLA_TAIL),
                    ("scale_pairs", (ScalePair("input_layernorm", ("self_attn.q_proj", _KV_A.name), "self_attn"),)
                     + _DEEPSEEK_MLP_PAIRS),
                    ("layer_norms", LLAMA_NORMS + ("self_attn.kv_a_layernorm",)),
                    ("bias_flags", (("attention_bias", _MLA_ATTN[1:]),)),
                    ("extra_dims", _DEEPSEEK_DIMS),
                ),
            ),
        ),
    ),
)

# Llama-4 text (MOE.md §1): experts 3D on disk and in memory, transposed, gate/up CONCATENATED on
# gate_up's last dim, no biases; the router (a plain Linear) takes the top-k logits through a sigmoid
# and the score multiplies each expert's INPUT (``score_on_input``); a shared expert runs on every
# token after the routed ones; ``moe_layers`` says which layers are sparse (the dense ones have their
# own, wider MLP: ``intermediate_size_mlp``). Outputs: per-expert 2D names (``feed_forward.experts.
# {e}.gate_proj``), what vLLM's Llama-4 loader maps and transformers' compressed-tensors path
# (``SequentialLlama4TextExperts``) loads.
_LLAMA4_EXPERTS = Experts(module="feed_forward.experts", disk="feed_forward.experts", num_keys=("num_local_experts",),
                          intermediate="intermediate", transposed=True, fused_on_disk=True, score_on_input=True,
                          router="feed_forward.router")
_FF = ("feed_forward.gate_proj", "feed_forward.up_proj", "feed_forward.down_proj")

_FUSED_MOE_TABLE: tuple[Arch, ...] = (
    Arch(
        name="gpt_oss",
        architectures=("GptOssForCausalLM",),
        model_type="gpt_oss",
        groups=LLAMA_GROUPS,  # every layer is sparse: the MLP groups are always MoE.groups
        scale_pairs=llama_pairs(),  # unused: AWQ refuses fused-on-disk experts
        layer_norms=LLAMA_NORMS,
        bias_flags=(("attention_bias", ATTN_LINEARS),),  # q/k/v/o biases (GptOssConfig default true)
        bias_defaults=(("attention_bias", True),),
        layer_params=(("self_attn.sinks", "heads"),),  # per-head attention sinks
        moe=MoE(
            experts=_GPT_OSS_EXPERTS,
            groups=((EXPERTS,),),
            # the router: top-k on the logits (weight and bias), softmax over the k; never quantized
            never_quantized=(Linear("mlp.router", ("experts",), "hidden"),),
            biased=("mlp.router",),
        ),
    ),
    Arch(
        name="llama4_text",
        architectures=("Llama4ForCausalLM",),
        model_type="llama4_text",
        groups=((Q, K, V), (O,), (Linear(_FF[0], ("mlp_dense",), "hidden"), Linear(_FF[1], ("mlp_dense",), "hidden")),
                (Linear(_FF[2], ("hidden",), "mlp_dense"),)),
        # q/k are L2-normalised per head (no weights); v is not: v -> o stays exact (without GQA)
        scale_pairs=(ScalePair("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                               "self_attn"),
                     ScalePair("self_attn.v_proj", ("self_attn.o_proj",)),
                     ScalePair("post_attention_layernorm", _FF[:2], "feed_forward"),
                     ScalePair(_FF[1], (_FF[2],))),  # unused: AWQ refuses fused-on-disk experts
        layer_norms=LLAMA_NORMS,
        bias_flags=(("attention_bias", ATTN_LINEARS),),
        moe=MoE(
            experts=_LLAMA4_EXPERTS,
            # forward order: router, routed experts, then the shared expert
            groups=((Linear("feed_forward.experts", ("hidden",), "hidden"),),) + _shared("feed_forward.shared_expert"),
            never_quantized=(Linear("feed_forward.router", ("experts",), "hidden"),),
            dense_linears=_FF,
            sparse_list_key="moe_layers",
        ),
        extra_dims=(("mlp_dense", lambda c: c["intermediate_size_mlp"]), ("shared", lambda c: c["intermediate_size"])),
    ),
)

_TABLE = _TABLE + _MOE_TABLE + _FUSED_MOE_TABLE

_BY_NAME = {a.name: a for a in _TABLE}
_BY_ARCHITECTURE = {cls: a for a in _TABLE for cls in a.architectures}
_BY_MODEL_TYPE = {a.model_type: a for a in _TABLE}


def supported() -> list[str]:
    """Short names of the supported families, in table order."""
    return [a.name for a in _TABLE]


def dense_families() -> list[str]:
    """The families without experts."""
    return [a.name for a in _TABLE if a.moe is None]


def moe_families() -> list[str]:
    """The Mixture-of-Experts families."""
    return [a.name for a in _TABLE if a.moe is not None]


def fused_moe_families() -> list[str]:
    """The Mixture-of-Experts families whose checkpoints hold the experts 3D (GPT-OSS)."""
    return [a.name for a in _TABLE if a.moe is not None and a.moe.experts.fused_on_disk]


def by_name(name: str) -> Arch:
    """The family with short name ``name`` (``"llama"``)."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise InputError(f"unknown architecture family {name!r}; supported: {', '.join(supported())}") from None


def get_arch(config: Mapping[str, Any], source: str = "config.json") -> Arch:
    """Resolve a ``config.json`` dict to its family.

    ``architectures[0]`` decides when present (a sequence-classification head is not a causal LM and
    is refused even if ``model_type`` is known); ``model_type`` is the fallback when it is absent.
    A known class whose ``model_type`` names another family is refused as inconsistent. A family with
    :class:`Variant` values resolves to the form ``config`` selects (:meth:`Arch.for_config`).
    """
    archs = config.get("architectures") or []
    model_type = config.get("model_type")
    cls = archs[0] if archs else None
    arch = _BY_ARCHITECTURE.get(cls) if cls else _BY_MODEL_TYPE.get(model_type)
    if arch is None:
        what = cls or model_type or "<none>"
        raise InputError(
            f"unsupported architecture {what!r} ({source} architectures={list(archs)}, "
            f"model_type={model_type!r}); supported: {', '.join(supported())}"
        )
    if model_type is not None and model_type != arch.model_type:
        raise InputError(
            f"{source}: architectures[0]={cls!r} is {arch.name} but model_type={model_type!r}; "
            f"fix model_type to {arch.model_type!r}"
        )
    return arch.for_config(config)
