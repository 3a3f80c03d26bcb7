"""PEFT LoRA merges against PEFT itself.

Every adapter is made by PEFT (``get_peft_model`` on a tiny random model, every adapter parameter
randomised so merges are non-trivial, ``save_pretrained``). For each variant:

* our merged tensors equal ``merge_and_unload()``'s bit for bit in fp32 (where PEFT's own merge is
  faithful; see the tied-embedding tests) and within one rounding in bf16;
* the merged model's logits match the *unmerged* PeftModel's;
* the output loads with ``AutoModelForCausalLM.from_pretrained`` with no missing/unexpected keys.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from quantize.errors import InputError
from quantize.merge import merge_lora

from helpers import safetensors_in

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
pytestmark = [pytest.mark.interop, pytest.mark.usefixtures("one_thread")]

IDS = torch.tensor([[0, 5, 17, 300, 1000, 42, 7, 999]])


def make_adapter(base: Path, out: Path, *, resize: int | None = None, seed: int = 0, safe: bool = True,
                 dtype=torch.float32, **lora):
    """A PEFT adapter with every trainable tensor randomised; returns the (unmerged) PeftModel."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    if resize:
        model.resize_token_embeddings(resize)
    p = get_peft_model(model, LoraConfig(**lora))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in p.named_parameters():
            if not t.requires_grad:
                continue
            noise = torch.randn(t.shape, generator=g).to(t.dtype)
            if "lora_magnitude_vector" in name:
                t.mul_(1 + 0.2 * noise)
            elif "lora_" in name:
                t.copy_(0.2 * noise)
            else:  # modules_to_save copies, trained biases, trainable tokens
                t.add_(0.05 * noise)
    p.eval()
    p.save_pretrained(out, safe_serialization=safe)
    return p


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits.float()


def load_merged(out: Path):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


def run_case(tmp_path, base, *, compare_peft_merge=True, atol=2e-5, **make_kw):
    p = make_adapter(base, tmp_path / "adapter", **make_kw)
    unmerged = logits(p)
    manifest = merge_lora(base, tmp_path / "adapter", tmp_path / "out")
    ours = safetensors_in(tmp_path / "out")
    ref = p.merge_and_unload().state_dict()
    if compare_peft_merge:
        for name, t in ours.items():
            assert torch.equal(t, ref[name]), f"{name} differs from PEFT merge_and_unload"
    merged = load_merged(tmp_path / "out")
    torch.testing.assert_close(logits(merged), unmerged, atol=atol, rtol=0)
    return manifest, ours, ref


def modified(manifest) -> dict[str, list[dict]]:
    return {r["tensor"]: r["ops"] for r in manifest.metrics["modified"]}


# ---------------------------------------------------------------------------------------------
# variants


ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_plain_lora(tmp_path, tiny_model_dir):
    m, ours, _ = run_case(tmp_path, tiny_model_dir("llama"), r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    mods = modified(m)
    assert sorted(mods) == sorted(f"model.layers.{i}.self_attn.{p}.weight" for i in (0, 1) for p in ("q_proj", "v_proj"))
    assert mods["model.layers.0.self_attn.q_proj.weight"] == [
        {"op": "lora", "module": "model.layers.0.self_attn.q_proj", "rank": 4, "alpha": 8.0, "scale": 2.0, "rslora": False}]
    base = load_file(tiny_model_dir("llama") / "model.safetensors")
    assert not torch.equal(ours["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(ours["model.layers.0.self_attn.k_proj.weight"], base["model.layers.0.self_attn.k_proj.weight"])
    assert m.status == "complete" and m.stage == "merge"


def test_rslora_with_rank_and_alpha_patterns(tmp_path, tiny_model_dir):
    m, _, _ = run_case(
        tmp_path, tiny_model_dir("llama"), r=4, lora_alpha=8, use_rslora=True, target_modules=ALL_LINEAR,
        rank_pattern={"down_proj": 2, r"layers\.1\.self_attn\.q_proj": 6}, alpha_pattern={"o_proj": 3},
    )
    mods = modified(m)
    assert mods["model.layers.0.mlp.down_proj.weight"][0]["rank"] == 2
    assert mods["model.layers.1.self_attn.q_proj.weight"][0]["rank"] == 6
    assert mods["model.layers.0.self_attn.q_proj.weight"][0]["rank"] == 4
    o = mods["model.layers.1.self_attn.o_proj.weight"][0]
    assert o["alpha"] == 3 and o["scale"] == pytest.approx(3 / 2) and o["rslora"] is True


@pytest.mark.parametrize("rslora", [False, True])
def test_dora(tmp_path, tiny_model_dir, rslora):
    m, _, _ = run_case(tmp_path, tiny_model_dir("llama"), r=4, lora_alpha=8, use_dora=True, use_rslora=rslora,
                       target_modules=ALL_LINEAR)
    assert {op["op"] for ops in modified(m).values() for op in ops} == {"dora"}


def test_regex_targets_and_layers_to_transform(tmp_path, tiny_model_dir):
    m, _, _ = run_case(tmp_path, tiny_model_dir("llama"), r=2, lora_alpha=4, target_modules=r".*\.mlp\.(up|down)_proj")
    assert sorted(modified(m)) == sorted(f"model.layers.{i}.mlp.{p}.weight" for i in (0, 1) for p in ("up_proj", "down_proj"))
    m, _, _ = run_case(tmp_path / "l", tiny_model_dir("llama", num_layers=3), r=2, lora_alpha=4,
                       target_modules=["q_proj", "down_proj"], layers_to_transform=[0, 2])
    assert sorted(modified(m)) == sorted(
        f"model.layers.{i}.{p}.weight" for i in (0, 2) for p in ("self_attn.q_proj", "mlp.down_proj"))


def test_embedding_and_head_lora_untied(tmp_path, tiny_model_dir):
    m, ours, _ = run_case(tmp_path, tiny_model_dir("llama", tie_word_embeddings=False), r=4, lora_alpha=8,
                          target_modules=["embed_tokens", "lm_head", "q_proj"])
    mods = modified(m)
    # PEFT also saves the (unchanged) embedding as base_layer: replace, then add the LoRA delta
    assert [op["op"] for op in mods["model.embed_tokens.weight"]] == ["replace", "embedding_lora"]
    assert [op["op"] for op in mods["lm_head.weight"]] == ["replace", "lora"]


def test_embedding_dora(tmp_path, tiny_model_dir):
    m, _, _ = run_case(tmp_path, tiny_model_dir("llama", tie_word_embeddings=False), r=4, lora_alpha=8, use_dora=True,
                       target_modules=["embed_tokens", "v_proj"])
    assert modified(m)["model.embed_tokens.weight"][-1]["op"] == "embedding_dora"


def test_modules_to_save_on_tied_model_unties(tmp_path, tiny_model_dir):
    base = tiny_model_dir("llama", tie_word_embeddings=True)
    m, ours, ref = run_case(tmp_path, base, r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"])
    assert "lm_head.weight" not in load_file(base / "model.safetensors")
    assert not torch.equal(ours["lm_head.weight"], ours["model.embed_tokens.weight"])
    assert torch.equal(ours["model.embed_tokens.weight"], load_file(base / "model.safetensors")["model.embed_tokens.weight"])
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is False
    assert m.metrics["tied_embeddings"]["tied"] is False


def test_embedding_lora_on_tied_model_keeps_head(tmp_path, tiny_model_dir):
    """PEFT's merge adds the delta to the *shared* matrix (the head changes too); the unmerged model
    uses the LoRA embedding for input only, so the faithful merge unties and keeps the head."""
    base = tiny_model_dir("gemma")  # Gemma ties by default
    base_sd = load_file(base / "model.safetensors")
    m, ours, _ = run_case(tmp_path, base, compare_peft_merge=False, r=4, lora_alpha=8,
                          target_modules=["embed_tokens", "q_proj"])
    assert torch.equal(ours["lm_head.weight"], base_sd["model.embed_tokens.weight"])
    assert not torch.equal(ours["model.embed_tokens.weight"], base_sd["model.embed_tokens.weight"])
    assert m.metrics["tied_embeddings"] == {
        "tied": False, "base_tied": True,
        "reason": "model.embed_tokens.weight differs from its tied twin; wrote both and set tie_word_embeddings=false"}


def test_tied_model_untouched_embeddings_stay_tied(tmp_path, tiny_model_dir):
    m, ours, _ = run_case(tmp_path, tiny_model_dir("gemma"), r=4, lora_alpha=8, target_modules=["q_proj"])
    assert "lm_head.weight" not in ours
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is True
    assert m.metrics["tied_embeddings"]["tied"] is True


@pytest.mark.parametrize(
    "lora, tied_after",
    [
        (dict(target_modules=["q_proj", "lm_head"]), False),  # LoRA on the tied head
        (dict(target_modules=["q_proj"], modules_to_save=["embed_tokens"]), False),  # head keeps the base matrix
        (dict(target_modules=["q_proj"], trainable_token_indices=[3, 10, 500]), True),  # PEFT ties the token rows
        (dict(target_modules=["q_proj"], modules_to_save=["embed_tokens"], ensure_weight_tying=True), True),
        (dict(target_modules=["q_proj", "embed_tokens"], ensure_weight_tying=True), True),  # tied LoRA twins
    ],
    ids=["head-lora", "embed-saved", "trainable-tokens", "tied-modules-to-save", "tied-lora"],
)
def test_tied_embedding_cases_match_unmerged(tmp_path, tiny_model_dir, lora, tied_after):
    m, ours, _ = run_case(tmp_path, tiny_model_dir("gemma"), compare_peft_merge=False, r=4, lora_alpha=8, **lora)
    assert m.metrics["tied_embeddings"]["tied"] is tied_after
    assert ("lm_head.weight" in ours) is (not tied_after)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is tied_after


def test_resized_vocabulary(tmp_path, tiny_model_dir):
    base = tiny_model_dir("llama", tie_word_embeddings=False)
    m, ours, _ = run_case(tmp_path, base, resize=1040, r=4, lora_alpha=8, target_modules=["q_proj"],
                          modules_to_save=["embed_tokens", "lm_head"])
    assert ours["model.embed_tokens.weight"].shape[0] == 1040 and ours["lm_head.weight"].shape[0] == 1040
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == 1040
    assert m.metrics["vocab_size"] == {"base": 1024, "merged": 1040}
    ids = torch.tensor([[3, 1030, 1039, 7]])  # new tokens
    p = make_adapter(base, tmp_path / "adapter2", resize=1040, r=4, lora_alpha=8, target_modules=["q_proj"],
                     modules_to_save=["embed_tokens", "lm_head"])
    merge_lora(base, tmp_path / "adapter2", tmp_path / "out2")
    torch.testing.assert_close(logits(load_merged(tmp_path / "out2"), ids), logits(p, ids), atol=2e-5, rtol=0)


def test_lora_bias_and_trained_biases(tmp_path, tiny_model_dir):
    base = tiny_model_dir("qwen2")  # q/k/v carry biases
    m, _, _ = run_case(tmp_path, base, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_bias=True)
    assert modified(m)["model.layers.0.self_attn.q_proj.bias"] == [
        {"op": "lora_bias", "module": "model.layers.0.self_attn.q_proj", "scale": 2.0}]
    m, _, _ = run_case(tmp_path / "all", base, r=4, lora_alpha=8, target_modules=["q_proj"], bias="all")
    mods = modified(m)
    assert mods["model.layers.0.self_attn.k_proj.bias"][0]["op"] == "replace"  # trained, not targeted
    assert mods["model.layers.0.self_attn.q_proj.bias"][0]["op"] == "replace"  # saved as base_layer.bias


def test_trainable_tokens(tmp_path, tiny_model_dir):
    m, ours, _ = run_case(tmp_path, tiny_model_dir("llama", tie_word_embeddings=False), r=4, lora_alpha=8,
                          target_modules=["q_proj"], trainable_token_indices=[3, 10, 500])
    assert modified(m)["model.embed_tokens.weight"] == [{"op": "trainable_tokens", "rows": 3}]


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3"])
def test_every_family_all_linear(tmp_path, tiny_model_dir, family):
    from peft.utils.constants import INCLUDE_LINEAR_LAYERS_SHORTHAND

    m, _, _ = run_case(tmp_path, tiny_model_dir(family), r=4, lora_alpha=8, target_modules=INCLUDE_LINEAR_LAYERS_SHORTHAND)
    assert len(modified(m)) == 2 * (4 if family == "phi3" else 7)


def test_bin_adapter(tmp_path, tiny_model_dir):
    p = make_adapter(tiny_model_dir("llama"), tmp_path / "adapter", safe=False, r=4, lora_alpha=8, target_modules=["v_proj"])
    assert (tmp_path / "adapter" / "adapter_model.bin").is_file()
    merge_lora(tiny_model_dir("llama"), tmp_path / "adapter", tmp_path / "out")
    ours, ref = safetensors_in(tmp_path / "out"), p.merge_and_unload().state_dict()
    assert all(torch.equal(t, ref[n]) for n, t in ours.items())


def test_bf16_within_one_rounding(tmp_path, tiny_model_dir):
    """bf16 base: every merged tensor is the single rounding of PEFT's fp32 merge; PEFT's own bf16
    merge differs only where it rounds the delta first (embeddings), by at most that rounding."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = tiny_model_dir("llama", dtype=torch.bfloat16, tie_word_embeddings=False)
    p = make_adapter(base, tmp_path / "adapter", dtype=torch.bfloat16, r=4, lora_alpha=8,
                     target_modules=["embed_tokens", "q_proj", "down_proj"])
    merge_lora(base, tmp_path / "adapter", tmp_path / "out")
    ours = safetensors_in(tmp_path / "out")
    ref_bf16 = p.merge_and_unload().state_dict()
    ref_fp32 = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), tmp_path / "adapter").merge_and_unload().state_dict()
    base_sd = load_file(base / "model.safetensors")
    for name, t in ours.items():
        assert t.dtype == torch.bfloat16
        assert torch.equal(t, ref_fp32[name].to(torch.bfloat16)), name
        r, delta = ref_bf16[name].float(), ref_fp32[name] - base_sd[name].float()
        one_rounding = (t.float().abs() + delta.abs()) * 2.0 ** -7  # ulp(result) + ulp(delta), bf16
        assert bool(((t.float() - r).abs() <= one_rounding).all()), name
        if name != "model.embed_tokens.weight":  # PEFT rounds once for linears with fp32 factors
            assert torch.equal(t, ref_bf16[name]), name
    assert not torch.equal(ours["model.layers.0.mlp.down_proj.weight"], base_sd["model.layers.0.mlp.down_proj.weight"])
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"


def test_dtype_option_and_manifest(tmp_path, tiny_model_dir):
    base = tiny_model_dir("llama")
    make_adapter(base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj"])
    m = merge_lora(base, tmp_path / "adapter", tmp_path / "out", dtype="bf16")
    ours = safetensors_in(tmp_path / "out")
    assert {t.dtype for t in ours.values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    assert [i.role for i in m.inputs] == ["model", "adapter"]
    assert {f.path for f in m.inputs[1].files} >= {"adapter_config.json", "adapter_model.safetensors"}
    from quantize.manifest import verify

    assert verify(tmp_path / "out") == []
    load_merged(tmp_path / "out")


def test_sharded_output(tmp_path, tiny_model_dir):
    from quantize.merge.peft_adapter import merge_lora as merge_lora_impl

    base = tiny_model_dir("llama")
    make_adapter(base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj"])
    merge_lora_impl(base, tmp_path / "adapter", tmp_path / "out", max_shard_bytes=200_000)
    assert len(list((tmp_path / "out").glob("model-*-of-*.safetensors"))) > 1
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    load_merged(tmp_path / "out")


def test_adapter_tokenizer_is_copied(tmp_path, tiny_model_dir):
    base = tiny_model_dir("llama")
    make_adapter(base, tmp_path / "adapter", r=2, lora_alpha=4, target_modules=["q_proj"])
    cfg = json.loads((base / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{{ messages }}"
    (tmp_path / "adapter" / "tokenizer_config.json").write_text(json.dumps(cfg))
    merge_lora(base, tmp_path / "adapter", tmp_path / "out")
    assert json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())["chat_template"] == "{{ messages }}"


# ---------------------------------------------------------------------------------------------
# math-level checks against PEFT's own layers (shapes the model families do not cover)


def test_fan_in_fan_out_and_embedding_dora_match_peft_layers():
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    from quantize.merge import lora_math as lm

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c = Conv1D(72, 40)  # GPT-2 style: weight stored [in, out]
            self.emb = torch.nn.Embedding(300, 48)

    torch.manual_seed(0)
    for dora in (False, True):
        toy = Toy()
        base = {k: v.clone() for k, v in toy.state_dict().items()}
        p = get_peft_model(toy, LoraConfig(r=8, lora_alpha=12, target_modules=["c", "emb"], use_dora=dora,
                                           fan_in_fan_out=True, init_lora_weights=False))
        with torch.no_grad():
            for n, t in p.named_parameters():
                if "lora_" in n:
                    t.normal_(0, 0.3)
        sd = {k: v.clone() for k, v in p.state_dict().items()}
        ref = p.merge_and_unload().state_dict()

        def g(k):
            return sd.get(f"base_model.model.{k}")

        s = lm.lora_scale(12, 8)
        c = lm.merge_linear(base["c.weight"], g("c.lora_A.default.weight"), g("c.lora_B.default.weight"), s,
                            magnitude=g("c.lora_magnitude_vector.default.weight"), fan_in_fan_out=True)
        e = lm.merge_embedding(base["emb.weight"], g("emb.lora_embedding_A.default"), g("emb.lora_embedding_B.default"),
                               s, magnitude=g("emb.lora_magnitude_vector.default.weight"))
        assert torch.equal(c, ref["c.weight"]) and torch.equal(e, ref["emb.weight"])


# ---------------------------------------------------------------------------------------------
# bad input: exit 2, one line naming the file/tensor and the fix, nothing at the output path


def cli(*args) -> tuple[int, str]:
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "quantize", *map(str, args)], capture_output=True, text=True)
    return r.returncode, r.stderr


def assert_refused(tmp_path, base, adapter, *needles, out_name="out"):
    out = tmp_path / out_name
    code, err = cli("merge", "lora", "--base", base, "--adapter", adapter, "--out", out)
    lines = [ln for ln in err.splitlines() if ln.startswith("!! error")]
    assert code == 2, err
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], lines[0]
    assert not out.exists() and not (tmp_path / f"{out_name}.partial").exists()
    return lines[0]


@pytest.fixture(scope="module")
def good_adapter(tmp_path_factory, tiny_model_dir):
    d = tmp_path_factory.mktemp("good") / "adapter"
    make_adapter(tiny_model_dir("llama"), d, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    return d


def edited_adapter(src: Path, dst: Path, *, config=None, tensors=None) -> Path:
    shutil.copytree(src, dst)
    if config is not None:
        cfg = json.loads((dst / "adapter_config.json").read_text())
        config(cfg)
        (dst / "adapter_config.json").write_text(json.dumps(cfg))
    if tensors is not None:
        sd = load_file(dst / "adapter_model.safetensors")
        tensors(sd)
        save_file(sd, dst / "adapter_model.safetensors")
    return dst


def test_refuses_adapter_for_another_model_size(tmp_path, tiny_model_dir, good_adapter):
    line = assert_refused(tmp_path, tiny_model_dir("llama", hidden=32), good_adapter, "different model size")
    assert "q_proj" in line


def test_refuses_missing_target(tmp_path, tiny_model_dir):
    make_adapter(tiny_model_dir("llama", num_layers=3), tmp_path / "a", r=2, lora_alpha=4, target_modules=["q_proj"])
    assert_refused(tmp_path, tiny_model_dir("llama"), tmp_path / "a", "model.layers.2.self_attn.q_proj.weight",
                   "does not exist in the base")


@pytest.mark.parametrize("peft_type", ["LOHA", "LOKR", "IA3", "ADALORA"])
def test_refuses_unsupported_peft_type(tmp_path, tiny_model_dir, good_adapter, peft_type):
    a = edited_adapter(good_adapter, tmp_path / "a", config=lambda c: c.update(peft_type=peft_type))
    assert_refused(tmp_path, tiny_model_dir("llama"), a, "adapter_config.json", f"peft_type='{peft_type}'")


def test_refuses_residual_init_and_variants(tmp_path, tiny_model_dir, good_adapter):
    a = edited_adapter(good_adapter, tmp_path / "a", config=lambda c: c.update(init_lora_weights="pissa"))
    assert_refused(tmp_path, tiny_model_dir("llama"), a, "init_lora_weights='pissa'", out_name="o1")
    b = edited_adapter(good_adapter, tmp_path / "b", config=lambda c: c.update(layer_replication=[[0, 2], [1, 2]]))
    assert_refused(tmp_path, tiny_model_dir("llama"), b, "layer_replication", out_name="o2")


def test_refuses_target_matched_by_nothing(tmp_path, tiny_model_dir, good_adapter):
    a = edited_adapter(good_adapter, tmp_path / "a", config=lambda c: c.update(target_modules=["c_attn"]))
    assert_refused(tmp_path, tiny_model_dir("llama"), a, "does not target")
    b = edited_adapter(good_adapter, tmp_path / "b", config=lambda c: c.update(target_modules=["q_proj", "v_proj", "k_proj"]))
    assert_refused(tmp_path, tiny_model_dir("llama"), b, "k_proj", "no LoRA tensors", out_name="o2")


def test_refuses_rank_disagreeing_with_config(tmp_path, tiny_model_dir, good_adapter):
    a = edited_adapter(good_adapter, tmp_path / "a", config=lambda c: c.update(r=8))
    assert_refused(tmp_path, tiny_model_dir("llama"), a, "rank 4", "r=8")


def test_refuses_nan_after_merge(tmp_path, tiny_model_dir, good_adapter):
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    a = edited_adapter(good_adapter, tmp_path / "a", tensors=lambda sd: sd[key].__setitem__((0, 0), float("nan")))
    assert_refused(tmp_path, tiny_model_dir("llama"), a, "model.layers.1.self_attn.v_proj.weight", "NaN/Inf")


def test_refuses_fp16_overflow(tmp_path, tiny_model_dir, good_adapter):
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    a = edited_adapter(good_adapter, tmp_path / "a", tensors=lambda sd: sd[key].mul_(1e6))
    out = tmp_path / "out"
    code, err = cli("merge", "lora", "--base", tiny_model_dir("llama"), "--adapter", a, "--out", out, "--dtype", "fp16")
    assert code == 2 and "overflow" in err and "q_proj" in err
    assert not out.exists() and not (tmp_path / "out.partial").exists()


def test_refuses_zero3_empty_tensors(tmp_path, tiny_model_dir, good_adapter):
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    a = edited_adapter(good_adapter, tmp_path / "a", tensors=lambda sd: sd.__setitem__(key, torch.empty(0)))
    assert_refused(tmp_path, tiny_model_dir("llama"), a, "ZeRO-3")


def test_refuses_existing_output_without_overwrite(tmp_path, tiny_model_dir, good_adapter):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    code, err = cli("merge", "lora", "--base", tiny_model_dir("llama"), "--adapter", good_adapter, "--out", out)
    assert code == 2 and "--overwrite" in err
    assert (out / "keep.txt").read_text() == "x"
    code, _ = cli("merge", "lora", "--base", tiny_model_dir("llama"), "--adapter", good_adapter, "--out", out, "--overwrite")
    assert code == 0 and not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


def test_refuses_added_tokens_without_embeddings(tmp_path, tiny_model_dir, good_adapter):
    def grow(src: Path, dst: Path):
        tok = json.loads(src.read_text())
        tok["added_tokens"].append({**tok["added_tokens"][0], "id": 1100, "content": "<new>"})
        dst.write_text(json.dumps(tok))

    a = edited_adapter(good_adapter, tmp_path / "a")
    grow(tiny_model_dir("llama") / "tokenizer.json", a / "tokenizer.json")
    assert_refused(tmp_path, tiny_model_dir("llama"), a, "tokenizer.json", "embeddings were not saved")


def test_library_refusals_are_input_errors(tmp_path, tiny_model_dir, good_adapter):
    with pytest.raises(InputError, match="no adapter_config.json"):
        merge_lora(tiny_model_dir("llama"), tmp_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()
