"""Lit-GPT checkpoints → HF, with and without a Lit-GPT LoRA.

``hf_to_lit`` below converts a tiny HF model into a Lit-GPT checkpoint directory (current
``attn.qkv`` or legacy ``attn.attn`` layout), written from MERGE.md §1.3/§2 independently of the
code under test. Converting back must reproduce the HF tensors bit for bit and the logits exactly.
Lit-GPT LoRA factors are checked against an *unmerged* forward: the HF model with hooks that add
``s·B(Ax)`` per projection (block-diagonal for the fused QKV, §3.1).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from quantize.errors import InputError
from quantize.merge.litgpt import legacy_to_current_rows, merge_litgpt

from helpers import safetensors_in

pytestmark = pytest.mark.usefixtures("one_thread")
FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3"]
IDS = torch.tensor([[0, 5, 17, 300, 1000, 42, 7, 999, 3, 64]])
LIT_NAMES = {"llama": "tiny-llama", "mistral": "Mistral-tiny", "qwen2": "Qwen2.5-tiny", "qwen3": "Qwen3-tiny",
             "gemma": "Gemma-tiny", "gemma2": "Gemma-2-tiny", "phi3": "Phi-3-tiny"}


# ---------------------------------------------------------------------------------------------
# HF -> Lit-GPT, from the spec


def lit_model_config(family: str, c: dict) -> dict:
    """model_config.yaml fields of the equivalent Lit-GPT Config (§1.3, §2.7 read backwards)."""
    rope = c.get("rope_parameters") or {}
    cfg = {
        "name": LIT_NAMES[family],
        "block_size": c["max_position_embeddings"],
        "vocab_size": c["vocab_size"],
        "padded_vocab_size": c["vocab_size"],
        "n_layer": c["num_hidden_layers"],
        "n_head": c["num_attention_heads"],
        "n_query_groups": c["num_key_value_heads"],
        "n_embd": c["hidden_size"],
        "head_size": c["head_dim"],
        "intermediate_size": c["intermediate_size"],
        "norm_eps": c["rms_norm_eps"],
        "rope_base": rope.get("rope_theta", c.get("rope_theta", 10000)),
        "norm_class_name": "RMSNorm",
        "mlp_class_name": "GemmaMLP" if family.startswith("gemma") else "LLaMAMLP",
        "bias": False,
        "attn_bias": family == "qwen2",
        "norm_qk": family == "qwen3",
        "post_attention_norm": family == "gemma2",
        "post_mlp_norm": family == "gemma2",
        "parallel_residual": False,
        "rotary_percentage": c.get("partial_rotary_factor", 1.0),
    }
    if family == "gemma2":
        cfg.update(attention_scores_scalar=c["query_pre_attn_scalar"], sliding_window_size=c["sliding_window"],
                   attention_logit_softcapping=c["attn_logit_softcapping"],
                   final_logit_softcapping=c["final_logit_softcapping"],
                   sliding_window_indices=[int(t == "sliding_attention") for t in c["layer_types"]])
    return cfg


def interleave_qkv(q, k, v, n_head, n_groups, hs):
    """Legacy lit-gpt layout: per query group, its q heads, then its k head, then its v head."""
    qpk = n_head // n_groups
    blocks = []
    for g in range(n_groups):
        blocks += [q[g * qpk * hs:(g + 1) * qpk * hs], k[g * hs:(g + 1) * hs], v[g * hs:(g + 1) * hs]]
    return torch.cat(blocks)


def hf_to_lit(hf: Path, out: Path, *, family: str, legacy=False, with_config=True, wrap=False, compiled=False) -> Path:
    """Write a Lit-GPT checkpoint directory equivalent to the HF model in ``hf``."""
    c = json.loads((hf / "config.json").read_text())
    sd = load_file(hf / "model.safetensors")
    nh, ng, hs = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
    lit = {"transformer.wte.weight": sd["model.embed_tokens.weight"],
           "transformer.ln_f.weight": sd["model.norm.weight"]}
    # a tied HF model has no lm_head: Lit-GPT's conversion stores the embedding (shared storage)
    lit["lm_head.weight"] = sd.get("lm_head.weight", lit["transformer.wte.weight"])
    norms = {"norm_1": "input_layernorm", "norm_2": "post_attention_layernorm"}
    if family == "gemma2":
        norms = {"norm_1": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
                 "norm_2": "pre_feedforward_layernorm", "post_mlp_norm": "post_feedforward_layernorm"}
    if family == "qwen3":
        norms.update({"attn.norm_q": "self_attn.q_norm", "attn.norm_k": "self_attn.k_norm"})
    for i in range(c["num_hidden_layers"]):
        L, P = f"transformer.h.{i}.", f"model.layers.{i}."
        for a, b in norms.items():
            lit[f"{L}{a}.weight"] = sd[f"{P}{b}.weight"]
        for param in ("weight", "bias"):
            if family == "phi3":
                if param == "bias":
                    continue
                fused = sd[f"{P}self_attn.qkv_proj.weight"]
                q, k, v = fused.split([nh * hs, ng * hs, ng * hs])
            elif f"{P}self_attn.q_proj.{param}" in sd:
                q, k, v = (sd[f"{P}self_attn.{p}_proj.{param}"] for p in "qkv")
            else:
                continue
            if legacy:
                lit[f"{L}attn.attn.{param}"] = interleave_qkv(q, k, v, nh, ng, hs)
            else:
                lit[f"{L}attn.qkv.{param}"] = torch.cat([q, k, v])
        lit[f"{L}attn.proj.weight"] = sd[f"{P}self_attn.o_proj.weight"]
        if family == "phi3":
            gate, up = sd[f"{P}mlp.gate_up_proj.weight"].chunk(2)
        else:
            gate, up = sd[f"{P}mlp.gate_proj.weight"], sd[f"{P}mlp.up_proj.weight"]
        lit[f"{L}mlp.fc_1.weight"], lit[f"{L}mlp.fc_2.weight"] = gate, up
        lit[f"{L}mlp.proj.weight"] = sd[f"{P}mlp.down_proj.weight"]
    if compiled:
        lit = {f"_orig_mod.{k}": v for k, v in lit.items()}
    out.mkdir(parents=True)
    torch.save({"model": lit} if wrap else lit, out / "lit_model.pth")
    (out / "model_config.yaml").write_text(yaml.safe_dump(lit_model_config(family, c)))
    for f in hf.iterdir():
        if f.name.startswith("tokenizer") or f.name == "generation_config.json" or (with_config and f.name == "config.json"):
            shutil.copy(f, out / f.name)
    return out


# ---------------------------------------------------------------------------------------------
# Lit-GPT LoRA and its unmerged forward


def make_lit_lora(hf: Path, out: Path, *, r=2, alpha=4, query=True, key=False, value=True,
                  projection=False, mlp=False, head=False, seed=0) -> dict:
    c = json.loads((hf / "config.json").read_text())
    d, inter = c["hidden_size"], c["intermediate_size"]
    nh, ng, hs, V = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"], c["vocab_size"]
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return 0.2 * torch.randn(*shape, generator=g)

    sizes = [nh * hs, ng * hs, ng * hs]
    enabled = [s for s, e in zip(sizes, (query, key, value)) if e]
    lora = {}
    for i in range(c["num_hidden_layers"]):
        L = f"transformer.h.{i}."
        if enabled:
            lora[L + "attn.qkv.lora_A"], lora[L + "attn.qkv.lora_B"] = rnd(r * len(enabled), d), rnd(sum(enabled), r)
        if projection:
            lora[L + "attn.proj.lora_A"], lora[L + "attn.proj.lora_B"] = rnd(r, nh * hs), rnd(d, r)
        if mlp:
            for m, (o, i_) in {"fc_1": (inter, d), "fc_2": (inter, d), "proj": (d, inter)}.items():
                lora[f"{L}mlp.{m}.lora_A"], lora[f"{L}mlp.{m}.lora_B"] = rnd(r, i_), rnd(o, r)
    if head:
        lora["lm_head.lora_A"], lora["lm_head.lora_B"] = rnd(r, d), rnd(V, r)
    out.mkdir(parents=True)
    torch.save({"model": lora}, out / "lit_model.pth.lora")
    hp = dict(lora_r=r, lora_alpha=alpha, lora_query=query, lora_key=key, lora_value=value,
              lora_projection=projection, lora_mlp=mlp, lora_head=head, precision="bf16-mixed", checkpoint_dir="unused")
    (out / "hyperparameters.yaml").write_text(yaml.safe_dump(hp))
    return {"lora": lora, "hp": hp, "sizes": sizes}


def unmerged_logits(hf: Path, family: str, spec: dict, ids=IDS) -> torch.Tensor:
    """The HF model plus forward hooks adding ``s·B(Ax)`` where the Lit LoRA acts."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    lora, hp, sizes = spec["lora"], spec["hp"], spec["sizes"]
    s = hp["lora_alpha"] / hp["lora_r"]
    r = hp["lora_r"]

    def add(module, fn):
        module.register_forward_hook(lambda m, args, out: out + fn(args[0]))

    def path(A, B):
        return lambda x: s * ((x @ A.T) @ B.T)

    for i, layer in enumerate(model.model.layers):
        L = f"transformer.h.{i}."
        if L + "attn.qkv.lora_A" in lora:
            A, B = lora[L + "attn.qkv.lora_A"], lora[L + "attn.qkv.lora_B"]
            blocks, a, b = [], 0, 0
            for size, on in zip(sizes, (hp["lora_query"], hp["lora_key"], hp["lora_value"])):
                blocks.append((A[a:a + r], B[b:b + size]) if on else None)
                if on:
                    a, b = a + r, b + size
            if family == "phi3":
                def fused(x, blocks=blocks):
                    outs = [path(*blk)(x) if blk else x.new_zeros(*x.shape[:-1], size)
                            for blk, size in zip(blocks, sizes)]
                    return torch.cat(outs, dim=-1)
                add(layer.self_attn.qkv_proj, fused)
            else:
                for blk, name in zip(blocks, ("q_proj", "k_proj", "v_proj")):
                    if blk:
                        add(getattr(layer.self_attn, name), path(*blk))
        if L + "attn.proj.lora_A" in lora:
            add(layer.self_attn.o_proj, path(lora[L + "attn.proj.lora_A"], lora[L + "attn.proj.lora_B"]))
        if L + "mlp.fc_1.lora_A" in lora:
            ab = {m: (lora[f"{L}mlp.{m}.lora_A"], lora[f"{L}mlp.{m}.lora_B"]) for m in ("fc_1", "fc_2", "proj")}
            if family == "phi3":
                add(layer.mlp.gate_up_proj, lambda x, ab=ab: torch.cat([path(*ab["fc_1"])(x), path(*ab["fc_2"])(x)], -1))
            else:
                add(layer.mlp.gate_proj, path(*ab["fc_1"]))
                add(layer.mlp.up_proj, path(*ab["fc_2"]))
            add(layer.mlp.down_proj, path(*ab["proj"]))
    if "lm_head.lora_A" in lora:
        add(model.lm_head, path(lora["lm_head.lora_A"], lora["lm_head.lora_B"]))
    with torch.no_grad():
        return model(ids).logits


def hf_logits(d: Path, ids=IDS) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        return model.eval()(ids).logits


# ---------------------------------------------------------------------------------------------
# layout


def test_tv1_legacy_row_order():
    assert legacy_to_current_rows(4, 2, 2).tolist() == [0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15]
    assert legacy_to_current_rows(2, 2, 2).tolist() == [0, 1, 6, 7, 2, 3, 8, 9, 4, 5, 10, 11]  # MHA
    assert legacy_to_current_rows(3, 1, 2).tolist() == list(range(10))  # MQA: already [Q; K; V]
    # the test helper's interleave is the inverse
    rows = torch.arange(16.0)
    q, k, v = rows[:8], rows[8:12], rows[12:]
    assert torch.equal(interleave_qkv(q, k, v, 4, 2, 2)[legacy_to_current_rows(4, 2, 2)], rows)


@pytest.mark.parametrize("legacy", [False, True], ids=["current", "legacy"])
@pytest.mark.parametrize("family", FAMILIES)
def test_roundtrip_is_exact(tmp_path, tiny_model_dir, family, legacy):
    hf = tiny_model_dir(family)
    lit = hf_to_lit(hf, tmp_path / "lit", family=family, legacy=legacy)
    m = merge_litgpt(lit, tmp_path / "out")
    ours, ref = safetensors_in(tmp_path / "out"), load_file(hf / "model.safetensors")
    assert sorted(ours) == sorted(ref)
    for name, t in ref.items():
        assert torch.equal(ours[name], t), name
    assert m.metrics["tensors_modified"] == 0 and m.metrics["legacy_qkv_layout"] is legacy
    torch.testing.assert_close(hf_logits(tmp_path / "out"), hf_logits(hf), atol=0, rtol=0)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["tie_word_embeddings"] == json.loads((hf / "config.json").read_text())["tie_word_embeddings"]


@pytest.mark.parametrize("family", FAMILIES)
def test_synthesized_config(tmp_path, tiny_model_dir, family):
    hf = tiny_model_dir(family)
    lit = hf_to_lit(hf, tmp_path / "lit", family=family, with_config=False)
    m = merge_litgpt(lit, tmp_path / "out")
    assert m.metrics["config"] == "synthesized from model_config.yaml"
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["model_type"] == json.loads((hf / "config.json").read_text())["model_type"]
    torch.testing.assert_close(hf_logits(tmp_path / "out"), hf_logits(hf), atol=1e-6, rtol=0)


def test_bf16_wrapped_and_compiled_checkpoint(tmp_path, tiny_model_dir):
    hf = tiny_model_dir("llama", dtype=torch.bfloat16)
    lit = hf_to_lit(hf, tmp_path / "lit", family="llama", wrap=True, compiled=True)
    merge_litgpt(lit, tmp_path / "out")
    ours, ref = safetensors_in(tmp_path / "out"), load_file(hf / "model.safetensors")
    assert all(torch.equal(ours[n], t) and ours[n].dtype == torch.bfloat16 for n, t in ref.items())
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    merge_litgpt(lit, tmp_path / "out32", dtype="fp32")
    assert {t.dtype for t in safetensors_in(tmp_path / "out32").values()} == {torch.float32}


def test_trained_head_of_tied_model_is_untied(tmp_path, tiny_model_dir):
    hf = tiny_model_dir("gemma")
    lit = hf_to_lit(hf, tmp_path / "lit", family="gemma")
    sd = torch.load(lit / "lit_model.pth", weights_only=True)
    sd["lm_head.weight"] = sd["lm_head.weight"].clone() + 0.01  # full fine-tune moved the head
    torch.save(sd, lit / "lit_model.pth")
    m = merge_litgpt(lit, tmp_path / "out")
    ours = safetensors_in(tmp_path / "out")
    assert torch.equal(ours["lm_head.weight"], sd["lm_head.weight"])
    assert torch.equal(ours["model.embed_tokens.weight"], sd["transformer.wte.weight"])
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is False
    assert m.metrics["tied_embeddings"]["tied"] is False


# ---------------------------------------------------------------------------------------------
# tied embeddings: decided from the checkpoint, with or without config.json


def weight_files(out: Path) -> dict[str, bytes]:
    """The output's tensor files (shards and index), name -> bytes."""
    return {f.name: f.read_bytes() for f in sorted(out.iterdir()) if f.name.startswith("model.safetensors")
            or f.name.startswith("model-")}


def convert_both(tmp_path: Path, hf: Path, family: str, **kw) -> dict[bool, tuple]:
    """Convert the Lit-GPT form of ``hf`` from a directory with and one without config.json:
    ``{with_config: (manifest, out dir, config.json)}``."""
    edit = kw.pop("edit", None)
    res = {}
    for with_config in (True, False):
        lit = hf_to_lit(hf, tmp_path / f"lit-{with_config}", family=family, with_config=with_config, **kw)
        if edit is not None:
            edit(lit)
        out = tmp_path / f"out-{with_config}"
        m = merge_litgpt(lit, out)
        res[with_config] = (m, out, json.loads((out / "config.json").read_text()))
    return res


def assert_plan_counts_output(out: Path, cfg: dict):
    """`quantize plan` predicts the converted model's weights to the byte (the head once, or not at all)."""
    from quantize.io.reader import CheckpointReader
    from quantize.plan import Setting, weight_bytes

    w = weight_bytes(cfg, Setting("bf16", 16))  # the unquantized row: dtype from config.json
    with CheckpointReader(out) as r:
        assert w["total"] == r.total_bytes
        head = r.nbytes("lm_head.weight") if "lm_head.weight" in r else 0
    assert w["lm_head"] == head


def _copy_head(lit: Path):
    """Store lm_head as a separate copy (bit-identical, own storage), as a re-saved checkpoint has it."""
    sd = torch.load(lit / "lit_model.pth", weights_only=True)
    sd["lm_head.weight"] = sd["lm_head.weight"].clone()
    torch.save(sd, lit / "lit_model.pth")


@pytest.mark.parametrize("variant", ["shared", "copy-legacy"])
@pytest.mark.parametrize("family", FAMILIES)
def test_tied_model_is_tied_with_or_without_config_json(tmp_path, tiny_model_dir, family, variant):
    hf = tiny_model_dir(family, tie_word_embeddings=True)
    ref = load_file(hf / "model.safetensors")
    assert "lm_head.weight" not in ref  # the HF release writes the embedding only
    legacy = variant == "copy-legacy"
    res = convert_both(tmp_path, hf, family, legacy=legacy, edit=_copy_head if legacy else None)
    (m1, out1, cfg1), (m0, out0, cfg0) = res[True], res[False]
    assert weight_files(out1) and weight_files(out1) == weight_files(out0)  # byte-identical tensors
    ours = safetensors_in(out0)
    assert sorted(ours) == sorted(ref) and all(torch.equal(ours[n], t) for n, t in ref.items())
    assert cfg1["tie_word_embeddings"] is True and cfg0["tie_word_embeddings"] is True
    evidence = "bit-identical as float32" if legacy else "same storage in lit_model.pth"
    for m, said in ((m1, True), (m0, None)):
        tie = m.metrics["tied_embeddings"]
        assert tie["tied"] is True and tie["config_tie_word_embeddings"] is said and tie["evidence"].endswith(evidence)
        assert m.metrics["tensors_modified"] == 0 and m.metrics["legacy_qkv_layout"] is legacy
    assert_plan_counts_output(out0, cfg0)
    assert weight_bytes_head(cfg0) == 0
    if family == "qwen2":  # the synthesized, tied config loads and computes what the HF release does
        torch.testing.assert_close(hf_logits(out0), hf_logits(hf), atol=1e-6, rtol=0)


def weight_bytes_head(cfg: dict) -> int:
    from quantize.plan import Setting, weight_bytes

    return weight_bytes(cfg, Setting("gptq", 4, 32))["lm_head"]


@pytest.mark.parametrize("family", FAMILIES)
def test_untied_model_keeps_its_head(tmp_path, tiny_model_dir, family):
    hf = tiny_model_dir(family, tie_word_embeddings=False)
    ref = load_file(hf / "model.safetensors")
    res = convert_both(tmp_path, hf, family)
    (m1, out1, cfg1), (m0, out0, cfg0) = res[True], res[False]
    assert weight_files(out1) == weight_files(out0)
    ours = safetensors_in(out0)
    assert sorted(ours) == sorted(ref) and torch.equal(ours["lm_head.weight"], ref["lm_head.weight"])
    assert cfg1["tie_word_embeddings"] is False and cfg0["tie_word_embeddings"] is False
    assert m1.metrics["tied_embeddings"]["evidence"] == "not compared"  # config.json says so
    tie = m0.metrics["tied_embeddings"]
    assert tie["tied"] is False and tie["config_tie_word_embeddings"] is None and "differ (first at row 0)" in tie["evidence"]
    assert m0.metrics["tensors_modified"] == 0
    assert_plan_counts_output(out0, cfg0)
    assert weight_bytes_head(cfg0) == ours["lm_head.weight"].numel() * 4


def test_head_differing_in_its_last_row_is_untied(tmp_path, tiny_model_dir):
    hf = tiny_model_dir("qwen2", tie_word_embeddings=True)

    def edit(lit):
        sd = torch.load(lit / "lit_model.pth", weights_only=True)
        sd["lm_head.weight"] = sd["lm_head.weight"].clone()
        sd["lm_head.weight"][-1, -1] = -sd["lm_head.weight"][-1, -1]
        torch.save(sd, lit / "lit_model.pth")

    res = convert_both(tmp_path, hf, "qwen2", edit=edit)
    head = torch.load(tmp_path / "lit-False" / "lit_model.pth", weights_only=True)["lm_head.weight"]
    for with_config, (m, out, cfg) in res.items():
        ours = safetensors_in(out)
        assert torch.equal(ours["lm_head.weight"], head) and cfg["tie_word_embeddings"] is False
        assert m.metrics["tied_embeddings"]["tied"] is False
        assert m.metrics["tied_embeddings"]["evidence"].endswith("differ (first at row 1023)")
    # the config said tied: the head is recorded as untied from it; without one it is just the head
    assert res[True][0].metrics["modified"] == [{"tensor": "lm_head.weight", "ops": [{"op": "untie", "from": "lm_head.weight"}]}]
    assert res[False][0].metrics["tensors_modified"] == 0
    assert weight_files(res[True][1]) == weight_files(res[False][1])


def test_config_json_saying_untied_wins(tmp_path, tiny_model_dir):
    """A head equal to the embedding under a config.json that says tie_word_embeddings=false: as the config says."""
    hf = tiny_model_dir("qwen2", tie_word_embeddings=True)
    lit = hf_to_lit(hf, tmp_path / "lit", family="qwen2")
    cfg = json.loads((lit / "config.json").read_text())
    (lit / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": False}))
    m = merge_litgpt(lit, tmp_path / "out")
    ours = safetensors_in(tmp_path / "out")
    assert torch.equal(ours["lm_head.weight"], ours["model.embed_tokens.weight"])
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is False
    assert m.metrics["tied_embeddings"] == {
        "tied": False, "config_tie_word_embeddings": False, "evidence": "not compared",
        "reason": "config.json sets tie_word_embeddings=false; wrote the head"}


def test_first_difference_is_bitwise_and_chunked(tmp_path):
    from safetensors.torch import save_file

    from quantize.io.reader import CheckpointReader
    from quantize.merge.stream import first_difference

    a = torch.randn(40, 8)
    b = a.clone()
    b[37, 5] = b[37, 5] + 1
    nan_a, nan_b = a.clone(), a.clone()
    nan_a[3, 3] = nan_b[3, 3] = float("nan")
    zero_a, zero_b = a.clone(), a.clone()
    zero_a[30, 0], zero_b[30, 0] = 0.0, -0.0
    save_file({"a": a, "b": b, "short": a[:39].clone(), "nan_a": nan_a, "nan_b": nan_b, "zero_a": zero_a, "zero_b": zero_b},
              tmp_path / "model.safetensors")
    with CheckpointReader(tmp_path) as r:
        for chunk in (32, 8 * 4 * 5, 1 << 20):  # one row, five rows, everything per chunk
            assert first_difference(r, "a", "a", torch.float32, chunk) is None
            assert first_difference(r, "a", "b", torch.float32, chunk) == 37
            assert first_difference(r, "nan_a", "nan_b", torch.float32, chunk) is None  # same bits
            assert first_difference(r, "zero_a", "zero_b", torch.float32, chunk) == 30  # 0.0 == -0.0, bits differ
        assert first_difference(r, "a", "b", torch.bfloat16) == 37
        with pytest.raises(ValueError, match="equal shapes"):
            first_difference(r, "a", "short", torch.float32)


@pytest.mark.parametrize("head", [False, True], ids=["qkv-lora", "head-lora"])
@pytest.mark.parametrize("family", ["qwen2", "gemma"])
def test_lit_lora_on_tied_model(tmp_path, tiny_model_dir, family, head):
    """A LoRA that leaves the head alone keeps a tied model tied; a LoRA on the head unties it. Either
    way the same with and without config.json, and equal to the unmerged forward."""
    hf = tiny_model_dir(family, tie_word_embeddings=True)
    spec = make_lit_lora(hf, tmp_path / "lora", head=head)
    outs = {}
    for with_config in (True, False):
        lit = hf_to_lit(hf, tmp_path / f"lit-{with_config}", family=family, with_config=with_config)
        out = tmp_path / f"out-{with_config}"
        m = merge_litgpt(lit, out, lora=tmp_path / "lora")
        cfg = json.loads((out / "config.json").read_text())
        ours = safetensors_in(out)
        assert ("lm_head.weight" in ours) is head and cfg["tie_word_embeddings"] is (not head)
        assert m.metrics["tied_embeddings"]["tied"] is (not head)
        assert torch.equal(ours["model.embed_tokens.weight"], load_file(hf / "model.safetensors")["model.embed_tokens.weight"])
        if head:
            assert [op["op"] for r in m.metrics["modified"] if r["tensor"] == "lm_head.weight" for op in r["ops"]] == ["lora"]
        assert_plan_counts_output(out, cfg)
        outs[with_config] = out
    assert weight_files(outs[True]) == weight_files(outs[False])
    torch.testing.assert_close(hf_logits(outs[False]), unmerged_logits(hf, family, spec), atol=2e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# Lit-GPT LoRA


def test_tv3_qkv_lora_job(tmp_path):
    """TV-3 through the Lit LoRA reader and the QKV job: MQA (n_head=2, n_query_groups=1,
    head_size=2), q+v LoRA, r=1, alpha=2; the fused weight is split into q, k, v."""
    from quantize.io.reader import CheckpointReader
    from quantize.merge.litgpt import LitConfig, QkvJob, load_lit_lora
    from quantize.merge.stream import FusedQkvLora

    W = torch.tensor([[(3 * i + j) / 10 for j in range(3)] for i in range(8)])
    torch.save({"transformer.h.0.attn.qkv.weight": W}, tmp_path / "lit_model.pth")
    (tmp_path / "lora").mkdir()
    torch.save({"model": {"transformer.h.0.attn.qkv.lora_A": torch.tensor([[1, 0, -1], [0.5, 2, 0]]),
                          "transformer.h.0.attn.qkv.lora_B": torch.tensor([[1.0], [2], [0], [-1], [3], [0.5]])}},
               tmp_path / "lora" / "lit_model.pth.lora")
    (tmp_path / "lora" / "hyperparameters.yaml").write_text(yaml.safe_dump(dict(lora_r=1, lora_alpha=2)))
    lora = load_lit_lora(tmp_path / "lora")
    assert lora.scale == 2.0 and lora.hparams["lora_query"] and lora.hparams["lora_value"] and not lora.hparams["lora_key"]
    cfg = LitConfig({"n_head": 2, "n_query_groups": 1, "head_size": 2, "n_embd": 3}, tmp_path / "model_config.yaml")
    A, B = (lora.tensors[k] for k in lora.modules["transformer.h.0.attn.qkv"])
    job = QkvJob("transformer.h.0.attn.qkv.weight", ["q", "k", "v"], cfg.qkv_sizes, torch.float32, None,
                 [FusedQkvLora("qkv", A, B, lora.scale, 1, 2, (True, False, True), cfg.qkv_sizes)])
    out = {p.name: p.tensor for p in job.run(CheckpointReader(tmp_path / "lit_model.pth"))}
    expected = {
        "q": [[2.0, 0.1, -1.8], [4.3, 0.4, -3.5], [0.6, 0.7, 0.8], [-1.1, 1.0, 3.1]],
        "k": [[1.2, 1.3, 1.4], [1.5, 1.6, 1.7]],
        "v": [[4.8, 13.9, 2.0], [2.6, 4.2, 2.3]],
    }
    for k, v in expected.items():
        torch.testing.assert_close(out[k], torch.tensor(v), atol=1e-6, rtol=0)


LORA_CASES = {
    "q+v": dict(query=True, key=False, value=True),
    "qkv+proj+mlp": dict(query=True, key=True, value=True, projection=True, mlp=True),
    "k-only+head": dict(query=False, key=True, value=False, head=True),
}


@pytest.mark.parametrize("case", list(LORA_CASES))
@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma", "phi3"])
def test_lit_lora_matches_unmerged_forward(tmp_path, tiny_model_dir, family, case):
    hf = tiny_model_dir(family)
    lit = hf_to_lit(hf, tmp_path / "lit", family=family)
    spec = make_lit_lora(hf, tmp_path / "lora", r=2, alpha=4, **LORA_CASES[case])
    m = merge_litgpt(lit, tmp_path / "out", lora=tmp_path / "lora")
    merged = hf_logits(tmp_path / "out")
    torch.testing.assert_close(merged, unmerged_logits(hf, family, spec), atol=2e-5, rtol=0)
    assert not torch.allclose(merged, hf_logits(hf), atol=1e-3)  # the LoRA did something
    ops = {op["op"] for r in m.metrics["modified"] for op in r["ops"]}
    assert "lora_qkv" in ops and all(op["scale"] == 2.0 for r in m.metrics["modified"] for op in r["ops"])
    if "head" in case and family == "gemma":  # tied head with lora_head: untied
        assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is False
    if case == "q+v" and family != "phi3":  # k rows untouched
        assert torch.equal(safetensors_in(tmp_path / "out")["model.layers.0.self_attn.k_proj.weight"],
                           load_file(hf / "model.safetensors")["model.layers.0.self_attn.k_proj.weight"])


def test_lit_lora_gqa_split_with_legacy_base(tmp_path, tiny_model_dir):
    """A LoRA (current layout) on a legacy-layout base: de-interleave first, then the block-diagonal delta."""
    hf = tiny_model_dir("llama")
    lit = hf_to_lit(hf, tmp_path / "lit", family="llama", legacy=True)
    spec = make_lit_lora(hf, tmp_path / "lora", query=True, key=True, value=True)
    merge_litgpt(lit, tmp_path / "out", lora=tmp_path / "lora")
    torch.testing.assert_close(hf_logits(tmp_path / "out"), unmerged_logits(hf, "llama", spec), atol=2e-5, rtol=0)


def test_lora_tokenizer_wins(tmp_path, tiny_model_dir):
    hf = tiny_model_dir("llama")
    lit = hf_to_lit(hf, tmp_path / "lit", family="llama")
    make_lit_lora(hf, tmp_path / "lora")
    cfg = json.loads((hf / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{{ x }}"
    (tmp_path / "lora" / "tokenizer_config.json").write_text(json.dumps(cfg))
    m = merge_litgpt(lit, tmp_path / "out", lora=tmp_path / "lora")
    assert json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())["chat_template"] == "{{ x }}"
    assert [i.role for i in m.inputs] == ["model", "adapter"] and m.params["lora"]["lora_r"] == 2


# ---------------------------------------------------------------------------------------------
# bad input


def cli(*args):
    r = subprocess.run([sys.executable, "-m", "quantize", *map(str, args)], capture_output=True, text=True)
    return r.returncode, [ln for ln in r.stderr.splitlines() if ln.startswith("!! error")]


@pytest.mark.parametrize(
    "changes, needle",
    [
        (dict(mlp_class_name="GptNeoxMLP", parallel_residual=True, name="pythia-tiny"), "not supported"),
        (dict(mlp_class_name="LLaMAMoE", name="Mixtral-tiny"), "not supported"),
        (dict(norm_qk=True, post_attention_norm=True, post_mlp_norm=True, name="OLMo-2-tiny"), "OLMo-2"),
        (dict(mlp_class_name="GemmaMLP", norm_qk=True, post_attention_norm=True, post_mlp_norm=True,
              name="Gemma-3-tiny"), "Gemma-3"),
    ],
)
def test_refuses_unsupported_family(tmp_path, tiny_model_dir, changes, needle):
    lit = hf_to_lit(tiny_model_dir("llama"), tmp_path / "lit", family="llama", with_config=False)
    cfg = yaml.safe_load((lit / "model_config.yaml").read_text())
    cfg.update(changes)
    (lit / "model_config.yaml").write_text(yaml.safe_dump(cfg))
    code, errs = cli("merge", "litgpt", "--checkpoint", lit, "--out", tmp_path / "out")
    assert code == 2 and len(errs) == 1 and needle in errs[0] and "model_config.yaml" in errs[0]
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_refuses_mismatched_config_json(tmp_path, tiny_model_dir):
    lit = hf_to_lit(tiny_model_dir("llama"), tmp_path / "lit", family="llama", with_config=False)
    shutil.copy(tiny_model_dir("llama", hidden=32) / "config.json", lit / "config.json")
    with pytest.raises(InputError, match="hidden_size=32 but the Lit-GPT checkpoint has 64"):
        merge_litgpt(lit, tmp_path / "out")


def test_refuses_adapter_v2_and_legacy_lora(tmp_path, tiny_model_dir):
    hf = tiny_model_dir("llama")
    lit = hf_to_lit(hf, tmp_path / "lit", family="llama")
    sd = torch.load(lit / "lit_model.pth", weights_only=True)
    torch.save({**sd, "transformer.h.0.attn.adapter_wte.weight": torch.zeros(2, 64)}, lit / "lit_model.pth")
    with pytest.raises(InputError, match="Adapter/Adapter-v2"):
        merge_litgpt(lit, tmp_path / "out")
    torch.save(sd, lit / "lit_model.pth")
    (tmp_path / "lora").mkdir()
    torch.save({"model": {"transformer.h.0.attn.attn.lora_A": torch.zeros(2, 64),
                          "transformer.h.0.attn.attn.lora_B": torch.zeros(64, 2)}}, tmp_path / "lora" / "lit_model.pth.lora")
    code, errs = cli("merge", "litgpt", "--checkpoint", lit, "--lora", tmp_path / "lora", "--out", tmp_path / "out")
    assert code == 2 and "legacy LoRA layout" in errs[0]


def test_refuses_lora_disagreeing_with_hyperparameters(tmp_path, tiny_model_dir):
    hf = tiny_model_dir("llama")
    lit = hf_to_lit(hf, tmp_path / "lit", family="llama")
    make_lit_lora(hf, tmp_path / "lora", query=True, value=True)
    hp = yaml.safe_load((tmp_path / "lora" / "hyperparameters.yaml").read_text())
    (tmp_path / "lora" / "hyperparameters.yaml").write_text(yaml.safe_dump({**hp, "lora_key": True}))
    code, errs = cli("merge", "litgpt", "--checkpoint", lit, "--lora", tmp_path / "lora", "--out", tmp_path / "out")
    assert code == 2 and "attn.qkv" in errs[0] and "hyperparameters.yaml" in errs[0]
    (tmp_path / "lora" / "hyperparameters.yaml").write_text(yaml.safe_dump({**hp, "lora_mlp": True}))
    code, errs = cli("merge", "litgpt", "--checkpoint", lit, "--lora", tmp_path / "lora", "--out", tmp_path / "out")
    assert code == 2 and "has no LoRA for transformer.h.0.mlp" in errs[0]


def test_refuses_nan_lora_and_lora_for_another_size(tmp_path, tiny_model_dir):
    hf = tiny_model_dir("llama")
    lit = hf_to_lit(hf, tmp_path / "lit", family="llama")
    spec = make_lit_lora(hf, tmp_path / "lora")
    spec["lora"]["transformer.h.1.attn.qkv.lora_B"][3, 0] = float("inf")
    torch.save({"model": spec["lora"]}, tmp_path / "lora" / "lit_model.pth.lora")
    code, errs = cli("merge", "litgpt", "--checkpoint", lit, "--lora", tmp_path / "lora", "--out", tmp_path / "out")
    assert code == 2 and "model.layers.1.self_attn.q_proj.weight" in errs[0] and "NaN/Inf" in errs[0]
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
    make_lit_lora(tiny_model_dir("llama", hidden=32), tmp_path / "lora32")
    with pytest.raises(InputError, match="hyperparameters.yaml does not match"):
        merge_litgpt(lit, tmp_path / "out", lora=tmp_path / "lora32")


def test_refuses_missing_head_and_bad_tie_flag(tmp_path, tiny_model_dir):
    lit = hf_to_lit(tiny_model_dir("qwen2", tie_word_embeddings=True), tmp_path / "lit", family="qwen2")
    cfg = json.loads((lit / "config.json").read_text())
    (lit / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": "yes"}))
    code, errs = cli("merge", "litgpt", "--checkpoint", lit, "--out", tmp_path / "out")
    assert code == 2 and len(errs) == 1 and "tie_word_embeddings='yes'" in errs[0] and "config.json" in errs[0]
    (lit / "config.json").unlink()
    sd = torch.load(lit / "lit_model.pth", weights_only=True)
    del sd["lm_head.weight"]
    torch.save(sd, lit / "lit_model.pth")
    code, errs = cli("merge", "litgpt", "--checkpoint", lit, "--out", tmp_path / "out")
    assert code == 2 and len(errs) == 1 and "has no lm_head.weight" in errs[0]
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
