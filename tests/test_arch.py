"""The architecture table against real transformers models of every family.

Each family's tiny checkpoint is instantiated with transformers and the table is checked against
it: module names and types, shapes, bias presence, tied embeddings, checkpoint tensor names, that the
sequential groups really share their input and run in the declared order, and that every AWQ scale
pair is an exact invariance of the model's logits (which pins down the Gemma (1 + w) norms, Gemma2's
pre_feedforward_layernorm, and phi3's fused row blocks).
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors import safe_open
from torch import nn

from quantize import arch as A
from quantize.errors import InputError
from quantize.testing import FAMILIES, FUSED_MOE_FAMILIES, MOE_FAMILIES

REQUIRED = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3"}
NO_GQA = {"num_key_value_heads": 4}


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _load(path):
    from transformers import AutoModelForCausalLM

    config = json.loads((path / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return config, model


def _layers(arch, model):
    return model.get_submodule(arch.layers_path)


def _logits(model, seed=0):
    ids = torch.randint(3, 1024, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits


# -- the table as data --------------------------------------------------------------------------


def test_required_families_are_supported():
    assert REQUIRED <= set(A.supported())
    assert FAMILIES + MOE_FAMILIES + FUSED_MOE_FAMILIES == A.supported()  # MoE: tests/test_moe.py, test_moe_gpt_oss.py


def _forms(family):
    """The family's entry and each of its config-selected forms (``Variant``), resolved."""
    arch = A.by_name(family)
    return [arch] + [dataclasses.replace(arch, variants=(), **dict(v.changes)) for v in arch.variants]


VARIANT_FORMS = [(f, k) for f in A.supported() for k in range(1, len(_forms(f)))]


@pytest.mark.parametrize("family", A.supported())
def test_table_entry_is_self_consistent(family):
    for arch in _forms(family):
        _check_entry(arch)
    arch = A.by_name(family)
    assert A.get_arch({"architectures": [arch.architectures[0]], "model_type": arch.model_type}) is arch
    assert A.get_arch({"model_type": arch.model_type}) is arch  # fallback when architectures is absent


@pytest.mark.parametrize("family,k", VARIANT_FORMS)
def test_variants_change_only_the_layout_and_are_picked_by_their_config(family, k):
    """A variant keeps the family's identity (name, classes, model_type), changes only layout fields,
    and ``get_arch`` returns it exactly for the configs its ``when`` accepts."""
    from quantize.testing.tiny import VARIANTS, tiny_config

    base, form = A.by_name(family), _forms(family)[k]
    v = base.variants[k - 1]
    assert not {f for f, _ in v.changes} & {"name", "architectures", "model_type", "variants", "moe"}
    cfgs = [tiny_config(name).to_dict() for name, (fam, _) in VARIANTS.items() if fam == family]
    assert cfgs, f"{family}: no tiny model of its variant (quantize/testing/tiny.py VARIANTS)"
    for cfg in cfgs:
        assert v.when(cfg) and A.get_arch(cfg) == form and A.get_arch(cfg) != base
    assert A.get_arch(tiny_config(family).to_dict()) is base  # the family's default tiny model: its own entry


def _check_entry(arch):
    names = arch.linear_names()
    assert len(names) == len(set(names)), "a linear appears in two groups"
    for pair in arch.scale_pairs:
        assert pair.prev in arch.layer_norms or pair.prev in names, pair
        assert all(n in names for n in pair.linears), pair
        if pair.prev in names:
            fused = len(arch.linear(pair.prev).out) > 1
            assert (pair.prev_part is not None) == fused, f"{pair.prev}: prev_part needed iff fused"
            assert pair.prev not in pair.linears
        else:
            assert pair.prev_part is None


# -- the table against instantiated models ------------------------------------------------------


@pytest.mark.parametrize("wide_heads", [False, True], ids=["default", "head_dim32"])
@pytest.mark.parametrize("family", FAMILIES)
def test_modules_shapes_and_groups_match_model(family, wide_heads, tiny_model_dir):
    # head_dim 32 makes num_attention_heads * head_dim (128) differ from hidden (64).
    config, model = _load(tiny_model_dir(family, head_dim=32) if wide_heads else tiny_model_dir(family))
    arch = A.get_arch(config)
    assert arch.name == family
    layers = _layers(arch, model)
    assert arch.num_layers(config) == len(layers) == 2
    assert isinstance(model.get_submodule(arch.embed_path), nn.Embedding)
    assert type(model.get_submodule(arch.final_norm_path)).__name__.endswith("RMSNorm")
    assert isinstance(model.get_submodule(arch.lm_head_path), nn.Linear)

    for i, layer in enumerate(layers):
        assert layer is model.get_submodule(arch.layer_prefix(i).rstrip("."))
        actual = {n for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
        assert sorted(arch.linear_names()) == sorted(actual), "groups must cover every linear exactly once"
        for name in arch.linear_names():
            lin = layer.get_submodule(name)
            assert isinstance(lin, nn.Linear)
            assert tuple(lin.weight.shape) == arch.linear_shape(name, config), name
            assert (lin.bias is not None) == arch.has_bias(name, config), name
        for norm in arch.layer_norms:
            assert type(layer.get_submodule(norm)).__name__.endswith("RMSNorm"), norm
        for pair in arch.scale_pairs:
            layer.get_submodule(pair.prev)
            if pair.inspect:
                layer.get_submodule(pair.inspect)


@pytest.mark.parametrize("family", FAMILIES)
def test_groups_share_input_and_run_in_declared_order(family, tiny_model_dir):
    config, model = _load(tiny_model_dir(family))
    arch = A.get_arch(config)
    layer = _layers(arch, model)[1]
    seen: list[tuple[str, torch.Tensor]] = []
    hooks = [
        layer.get_submodule(n).register_forward_hook(lambda m, inp, out, n=n: seen.append((n, inp[0])))
        for n in arch.linear_names()
    ]
    try:
        _logits(model)
    finally:
        for h in hooks:
            h.remove()
    order = [n for n, _ in seen]
    assert sorted(order) == sorted(arch.linear_names()), "each linear runs exactly once"
    inputs = dict(seen)
    flat_groups = [arch.group_names().index(g) for n in order for g in arch.group_names() if n in g]
    assert flat_groups == sorted(flat_groups), f"groups ran out of order: {order}"
    heads = [inputs[g[0]] for g in arch.group_names()]
    for group in arch.group_names():
        for n in group[1:]:
            assert torch.equal(inputs[group[0]], inputs[n]), f"{n} does not share {group[0]}'s input"
    for a in range(len(heads)):  # maximal: linears reading one input belong to one group
        for b in range(a + 1, len(heads)):
            assert heads[a].shape != heads[b].shape or not torch.equal(heads[a], heads[b]), (a, b)


def _apply_pair(arch, config, layer, pair, s):
    """Divide prev's output channels by s and multiply the linears' input channels by s."""
    with torch.no_grad():
        prev = layer.get_submodule(pair.prev)
        if pair.prev in arch.layer_norms:
            off = arch.norm_weight_offset
            prev.weight.copy_((off + prev.weight) / s - off)
        else:
            lin, d = arch.linear(pair.prev), arch.dims(config)
            part = pair.prev_part or 0
            start = sum(d[p] for p in lin.out[:part])
            rows = slice(start, start + d[lin.out[part]])
            prev.weight[rows] /= s[:, None]
            if prev.bias is not None:
                prev.bias[rows] /= s
        for n in pair.linears:
            layer.get_submodule(n).weight.mul_(s)


@pytest.mark.parametrize("gqa", [True, False], ids=["gqa", "mha"])
@pytest.mark.parametrize("family", FAMILIES)
def test_scale_pairs_are_exact_invariances(family, gqa, tiny_model_dir):
    path = tiny_model_dir(family) if gqa else tiny_model_dir(family, **NO_GQA)
    config, model = _load(path)
    arch = A.get_arch(config)
    applicable = arch.scale_pairs_for(config)
    d = arch.dims(config)
    # v -> o (fused or not) applies exactly when there is no GQA; every other pair always applies.
    assert len(applicable) == (len(arch.scale_pairs) - 1 if gqa else len(arch.scale_pairs))
    assert (d["kv"] == d["q"]) == (not gqa)

    ref = _logits(model)
    gen = torch.Generator().manual_seed(1)
    for layer in _layers(arch, model):
        for pair in applicable:
            width = layer.get_submodule(pair.linears[0]).in_features
            for n in pair.linears:
                assert layer.get_submodule(n).in_features == width
            if pair.prev in arch.layer_norms:
                assert layer.get_submodule(pair.prev).weight.numel() == width
            else:
                prev = arch.linear(pair.prev)
                assert d[prev.out[pair.prev_part or 0]] == width
            _apply_pair(arch, config, layer, pair, 0.5 + 1.5 * torch.rand(width, generator=gen))
    out = _logits(model)
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item()), (out - ref).abs().max()

    # Control: scaling only the linears' inputs (no compensation) must change the logits.
    pair = applicable[0]
    layer = _layers(arch, model)[0]
    with torch.no_grad():
        for n in pair.linears:
            layer.get_submodule(n).weight.mul_(2.0)
    assert not torch.allclose(_logits(model), ref, rtol=1e-3, atol=1e-3 * ref.abs().max().item())


@pytest.mark.parametrize(
    "family,overrides",
    [(f, {}) for f in FAMILIES]
    + [
        ("llama", {"attention_bias": True, "mlp_bias": True}),
        ("qwen3", {"attention_bias": True}),
        ("gemma", {"tie_word_embeddings": False}),
        ("llama", {"tie_word_embeddings": True}),
    ],
    ids=lambda v: v if isinstance(v, str) else "-".join(f"{k}={x}" for k, x in v.items()) or "default",
)
def test_checkpoint_names_match_templates(family, overrides, tiny_model_dir):
    path = tiny_model_dir(family, **overrides)
    config, model = _load(path)
    arch = A.get_arch(config)
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        names = list(f.keys())
        shapes = {n: tuple(f.get_slice(n).get_shape()) for n in names}
    assert sorted(names) == sorted(arch.expected_tensor_names(config))

    tied = model.get_submodule(arch.lm_head_path).weight is model.get_submodule(arch.embed_path).weight
    assert arch.is_tied(config) == tied == ((arch.lm_head_path + ".weight") not in names)
    assert tied == overrides.get("tie_word_embeddings", family in {"gemma", "gemma2"})

    per_layer, other = arch.split_tensor_names(names)
    assert sorted(other) == sorted(arch.non_layer_tensor_names(config))
    assert sorted(per_layer) == [0, 1]
    for i, layer_names in per_layer.items():
        rel = sorted(n[len(arch.layer_prefix(i)) :] for n in layer_names)
        assert rel == sorted(arch.layer_tensor_names(config))
    quantizable = [n for n in names if arch.is_quantizable(n)]
    assert len(quantizable) == 2 * len(arch.linear_names())
    for n in quantizable:
        rel = n[len(arch.layer_prefix(arch.layer_index(n))) : -len(".weight")]
        assert shapes[n] == arch.linear_shape(rel, config)
    assert not any(arch.is_quantizable(n) for n in other)
    assert not any(arch.is_quantizable(n) for n in names if "norm" in n or n.endswith(".bias"))


# -- config resolution and errors ---------------------------------------------------------------


def test_unsupported_architecture_lists_supported_families():
    with pytest.raises(InputError) as e:
        A.get_arch({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
    msg = str(e.value)
    assert "GPT2LMHeadModel" in msg and "\n" not in msg
    assert e.value.exit_code == 2
    for name in REQUIRED:
        assert name in msg.split("supported:")[1]


def test_known_model_type_with_foreign_head_or_mismatch_is_refused():
    with pytest.raises(InputError, match="LlamaForSequenceClassification"):
        A.get_arch({"architectures": ["LlamaForSequenceClassification"], "model_type": "llama"})
    with pytest.raises(InputError, match="model_type"):
        A.get_arch({"architectures": ["LlamaForCausalLM"], "model_type": "qwen2"})
    with pytest.raises(InputError, match="num_hidden_layers"):
        A.by_name("llama").num_layers({"num_hidden_layers": "two"})


def test_family_defaults_apply_when_config_omits_keys():
    base = {"hidden_size": 1024, "num_attention_heads": 8, "intermediate_size": 4096}
    assert A.by_name("llama").dims(base)["head_dim"] == 128
    assert A.by_name("qwen3").dims(base)["head_dim"] == 128
    assert A.by_name("gemma").dims(base)["head_dim"] == 256
    assert A.by_name("gemma").dims(base)["kv"] == 8 * 256  # kv heads default to attention heads
    assert A.by_name("gemma").is_tied({}) and not A.by_name("llama").is_tied({})
    assert not A.by_name("gemma").is_tied({"tie_word_embeddings": False})
    assert A.by_name("qwen2").has_bias("self_attn.v_proj", {})
    assert not A.by_name("qwen2").has_bias("self_attn.o_proj", {"attention_bias": True})
    assert not A.by_name("mistral").has_bias("self_attn.q_proj", {"attention_bias": True})
    assert A.by_name("llama").layer_prefix(3) == "model.layers.3."
    assert A.by_name("llama").layer_index("model.layers.12.mlp.up_proj.weight") == 12
    assert A.by_name("llama").layer_index("model.norm.weight") is None


def test_tiny_models_are_deterministic(tmp_path):
    from quantize.testing import build_tiny_model

    a = build_tiny_model("qwen2", tmp_path / "a", seed=3)
    b = build_tiny_model("qwen2", tmp_path / "b", seed=3)
    c = build_tiny_model("qwen2", tmp_path / "c", seed=4)
    blob = lambda p: (p / "model.safetensors").read_bytes()  # noqa: E731
    assert blob(a) == blob(b) != blob(c)


def test_tiny_model_ships_the_bundled_tokenizer(tiny_llama, tiny_model_dir):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    assert (len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1024, 0, 1, 2)
    # transformers 5 forces Qwen2Tokenizer on model_type qwen2 (different pre-tokenizer, an extra
    # <|endoftext|> at id 1024); the generic fast class reads tokenizer.json as written.
    q2 = PreTrainedTokenizerFast.from_pretrained(tiny_model_dir("qwen2"))
    text = "The European lobster , H. gammarus ."
    assert len(q2) == 1024 and q2(text)["input_ids"] == tok(text)["input_ids"]


def test_embedded_tiny_llama_matches_table_and_is_trained():
    from tokenizers import Tokenizer

    from quantize.testing import embedded_model_dir

    path = embedded_model_dir()
    if not (path / "model.safetensors").exists():
        pytest.skip("models/tiny-llama is only in a source checkout")
    config, model = _load(path)
    arch = A.get_arch(config)
    assert arch.name == "llama" and not arch.is_tied(config)
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        assert sorted(f.keys()) == sorted(arch.expected_tensor_names(config))
    text = (path.parents[1] / "calibration" / "wikitext2" / "test.txt").read_text(encoding="utf-8")[:40_000]
    ids = torch.tensor(Tokenizer.from_file(str(path / "tokenizer.json")).encode(text).ids[: 8 * 128]).view(8, 128)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 1024), ids[:, 1:].reshape(-1))
    assert nll.exp().item() < 60, "the embedded model should be far better than chance (ppl 1024)"
