"""QLoRA-exact merges (``merge --base-quant``) against bitsandbytes itself.

* Unit: our torch quantize -> dequantize (:mod:`quantize.merge.bnb4`) equals
  ``bitsandbytes.functional.quantize_4bit`` + ``dequantize_4bit`` (bitsandbytes 0.50, CPU) bit for
  bit: the packed codes, the absmax statistics (and their double quantization), the dequantized
  weights; for NF4 and FP4, with and without double quantization, bf16 / fp16 / fp32, shapes whose
  sizes are not multiples of the block size included.
* End to end, every family: a LoRA trained for a few steps by PEFT on the bitsandbytes 4-bit (NF4,
  double quant, bf16) base, on CPU; ``quantize merge lora --base-quant nf4-dq`` gives exactly the
  trained model's effective weights (dequantized base + s·B·A, rounded once), and its logits match
  the PeftModel-on-4-bit-base's to ``QLORA_LOGIT_TOL`` while the plain merge's are measurably off.
* The Lit-GPT path, the training-record detection, the recipe key and the model card.
* Bad input exits 2 with one line and leaves nothing behind.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from quantize import manifest as mf
from quantize.cli import main
from quantize.errors import InputError
from quantize.merge import bnb4, merge_litgpt, merge_lora
from quantize.merge.qlora import axolotl_record, litgpt_record, peft_records, resolve
from quantize.testing import FAMILIES

from helpers import safetensors_in

bnb = pytest.importorskip("bitsandbytes")
F = pytest.importorskip("bitsandbytes.functional")
pytestmark = [pytest.mark.interop, pytest.mark.usefixtures("one_thread")]

SHAPES = [(64, 64), (32, 128), (3, 50), (7, 33), (1, 1), (5, 129), (96, 200), (257,), (4097,), (300, 1000), (3, 48)]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
_INT = {2: torch.int16, 4: torch.int32}


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits (zeros made +0.0 first: bitsandbytes' own kernels disagree on FP4's signed zero)."""
    return (t + 0.0).contiguous().view(-1).view(_INT[t.dtype.itemsize])


def pack(q: torch.Tensor, quant_type: str) -> torch.Tensor:
    """bitsandbytes' byte layout: first value in the high nibble; an odd count is padded with the code of 0."""
    q = q.to(torch.uint8)
    if q.numel() % 2:
        zero = bnb4.quantize_values(torch.zeros(64), torch.ones(1), quant_type, 64, last_partial=False)[:1]
        q = torch.cat([q, zero.to(torch.uint8)])
    return (q[::2] << 4) | q[1::2]


def our_state(A: torch.Tensor, quant_type: str, blocksize: int = 64):
    flat = A.reshape(-1)
    absmax = bnb4.absmax_4bit(flat, blocksize)
    q = bnb4.quantize_values(flat.float(), absmax, quant_type, blocksize, last_partial=True)
    return q, absmax


# ---------------------------------------------------------------------------------------------
# unit: bit for bit against bitsandbytes


def test_code_books_are_bitsandbytes():
    assert torch.equal(bnb4.code_book("nf4"), F.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(bits(bnb4.code_book("fp4")), bits(F.get_4bit_type("fp4", device="cpu")))
    assert torch.equal(bnb4.dynamic_code().view(torch.int32), F.create_dynamic_map().view(torch.int32))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_roundtrip_equals_bitsandbytes(quant_type, double_quant, dtype):
    g = torch.Generator().manual_seed(0)
    checked = 0
    for shape in SHAPES:
        # weight-like values plus outliers, exact zeros and a zero block
        A = 0.05 * torch.randn(shape, generator=g)
        A.view(-1)[:: 97] *= 40
        A.view(-1)[3::11] = 0
        if A.numel() >= 192:
            A.view(-1)[64:128] = 0
        A = A.to(dtype)
        packed, state = F.quantize_4bit(A, blocksize=64, compress_statistics=double_quant, quant_type=quant_type)
        q, absmax = our_state(A, quant_type)
        assert torch.equal(pack(q, quant_type), packed.view(-1)), shape
        if double_quant:
            qa, absmax2, offset = bnb4.double_quantize(absmax)
            assert torch.equal(qa, state.absmax.view(-1)), shape
            assert torch.equal(absmax2.view(torch.int32), state.state2.absmax.view(torch.int32)), shape
            assert torch.equal(offset.view(torch.int32), state.offset.view(torch.int32)), shape
        else:
            assert torch.equal(absmax.view(torch.int32), state.absmax.view(torch.int32)), shape
        ours = bnb4.roundtrip(A, quant_type, double_quant=double_quant)
        assert ours.dtype == dtype and ours.shape == A.shape
        # bitsandbytes' blocks run over the flattened tensor: its dequantization of the 1-d view
        flat_state = F.QuantState(absmax=state.absmax, shape=torch.Size([A.numel()]), dtype=dtype, blocksize=64,
                                  code=state.code, quant_type=quant_type, offset=state.offset, state2=state.state2)
        theirs = F.dequantize_4bit(packed, flat_state)
        assert torch.equal(bits(ours), bits(theirs)), shape
        if len(shape) == 1 or shape[-1] % 64 == 0 or shape[-1] % 16:
            # bitsandbytes' own 2-d dequantize (its AVX-512 CPU kernel mis-indexes absmax for rows that
            # are a multiple of 16 but not of the block size, e.g. (3, 48): see bnb4's docstring)
            assert torch.equal(bits(ours), bits(F.dequantize_4bit(packed, state).view(shape))), shape
        if A.numel() >= 64:
            assert not torch.equal(ours.float(), A.float())  # a real (lossy) round trip
        checked += A.numel()
    assert checked > 300_000


def test_roundtrip_is_chunk_invariant():
    A = 0.02 * torch.randn(37, 1000, generator=torch.Generator().manual_seed(1))
    whole = bnb4.roundtrip(A, "nf4", double_quant=True, dtype=torch.bfloat16)
    for chunk in (64, 640, 4096):
        assert torch.equal(bnb4.roundtrip(A, "nf4", double_quant=True, dtype=torch.bfloat16, chunk=chunk), whole)
    assert whole.dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------
# end to end: PEFT on the bitsandbytes 4-bit base, every family

QLORA_LOGIT_TOL = 0.04  # max |merged - PeftModel on the 4-bit base|, as a fraction of the reference's max |logit|
IDS = torch.tensor([[0, 5, 17, 300, 1000, 42, 7, 999, 64, 3], [1, 9, 250, 11, 800, 77, 512, 6, 31, 2]])
RESULTS: dict[str, dict[str, float]] = {}


def train_qlora(base: Path, adapter: Path, *, steps: int = 6):
    """PEFT LoRA on every linear of the NF4 (double quant, bf16) base, trained a few steps on CPU.
    Returns (the PeftModel in eval mode, {linear weight name: its dequantized bf16 base weight})."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                            bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16, quantization_config=qc)
    with torch.random.fork_rng(devices=[]):  # PEFT draws lora_A's initial values from the global generator
        torch.manual_seed(0)
        p = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
    opt = torch.optim.AdamW([t for t in p.parameters() if t.requires_grad], lr=2e-2)
    ids = torch.randint(3, 1024, (4, 24), generator=torch.Generator().manual_seed(0))
    p.train()
    for _ in range(steps):
        p(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    deq = {}
    for name, mod in p.named_modules():
        if isinstance(mod, bnb.nn.Linear4bit):  # before eval: the CPU inference path repacks the weight
            deq[name.removeprefix("base_model.model.").removesuffix(".base_layer") + ".weight"] = \
                F.dequantize_4bit(mod.weight.data, mod.weight.quant_state)
    p.eval()
    p.save_pretrained(adapter)
    model.config.save_pretrained(adapter)  # as Axolotl leaves it: config.json with the 4-bit quantization_config
    return p, deq


def logits_of(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


@pytest.mark.parametrize("family", FAMILIES)
def test_qlora_merge_reproduces_the_trained_model(tmp_path, tiny_model_dir, family, capsys):
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    base = tiny_model_dir(family, dtype=torch.bfloat16)
    p, deq = train_qlora(base, tmp_path / "adapter")
    reference = logits_of(p)
    lora = {}
    for name, mod in p.named_modules():
        if isinstance(mod, LoraLayer):  # on a 4-bit base: peft.tuners.lora.bnb.Linear4bit
            A, B = mod.lora_A["default"].weight.detach(), mod.lora_B["default"].weight.detach()
            lora[name.removeprefix("base_model.model.") + ".weight"] = (A.float(), B.float(), mod.scaling["default"])

    rc = main(["merge", "lora", "--base", str(base), "--adapter", str(tmp_path / "adapter"), "--out",
               str(tmp_path / "qlora"), "--base-quant", "nf4-dq", "--base-quant-dtype", "bf16"])
    assert rc == 0
    m = mf.load_manifest(tmp_path / "qlora")
    rec = m.params["base_quant"]
    assert rec["method"] == "nf4-dq" and rec["dtype"] == "bf16" and rec["blocksize"] == 64
    assert rec["nested_blocksize"] == 256 and rec["source"] == "--base-quant" and rec["lm_head_quantized"] is False
    assert rec["tensors"] == len(deq) > 0
    assert "quantization_config" in rec["reason"]  # it names the record it agrees with

    # 1. weights: exactly the trained model's effective weights, rounded once
    ours, base_sd = safetensors_in(tmp_path / "qlora"), safetensors_in(base)
    for name, t in ours.items():
        if name in deq:
            A, B, s = lora[name]
            expect = (deq[name].float() + (B @ A) * s).to(torch.bfloat16)
            assert torch.equal(t.view(torch.int16), expect.view(torch.int16)), name
        else:  # embeddings, norms, lm_head: never quantized
            assert torch.equal(t, base_sd[name]), name
    assert set(deq) <= set(ours)

    # 2. the record decides on its own (config.json's quantization_config): the same bytes
    assert main(["merge", "lora", "--base", str(base), "--adapter", str(tmp_path / "adapter"), "--out",
                 str(tmp_path / "auto")]) == 0
    auto = mf.load_manifest(tmp_path / "auto")
    assert auto.params["base_quant"]["source"].endswith("config.json quantization_config")
    assert [o.sha256 for o in auto.outputs if o.path.endswith(".safetensors")] == \
        [o.sha256 for o in m.outputs if o.path.endswith(".safetensors")]

    # 3. logits: the QLoRA merge matches the PeftModel on the 4-bit base; the plain merge does not
    assert main(["merge", "lora", "--base", str(base), "--adapter", str(tmp_path / "adapter"), "--out",
                 str(tmp_path / "plain"), "--base-quant", "none"]) == 0
    scale = reference.abs().max().item()
    diffs = {}
    for kind in ("qlora", "plain"):
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / kind, dtype=torch.float32).eval()
        diffs[kind] = (logits_of(merged) - reference).abs().max().item()
    RESULTS[family] = {**diffs, "max_logit": scale}
    with capsys.disabled():
        print(f"\n[qlora e2e] {family}: max|logit diff| nf4-dq merge {diffs['qlora']:.5f}, plain merge "
              f"{diffs['plain']:.5f} (max |logit| {scale:.3f})")
    assert diffs["qlora"] <= QLORA_LOGIT_TOL * scale, diffs
    assert diffs["plain"] >= 4 * diffs["qlora"], diffs


# ---------------------------------------------------------------------------------------------
# Lit-GPT: hyperparameters.yaml decides; the fused qkv and lm_head are round-tripped as trained


def test_litgpt_lora_trained_on_nf4(tmp_path, tiny_model_dir):
    from test_merge_litgpt import hf_to_lit, make_lit_lora

    hf = tiny_model_dir("llama", dtype=torch.bfloat16)
    lit = hf_to_lit(hf, tmp_path / "lit", family="llama")
    spec = make_lit_lora(hf, tmp_path / "lora", mlp=True)
    hp = {**spec["hp"], "quantize": "bnb.nf4-dq", "precision": "bf16-true"}
    (tmp_path / "lora" / "hyperparameters.yaml").write_text(yaml.safe_dump(hp))
    m = merge_litgpt(lit, tmp_path / "out", lora=tmp_path / "lora")
    rec = m.params["base_quant"]
    assert rec["method"] == "nf4-dq" and rec["dtype"] == "bf16" and "quantize: bnb.nf4-dq" in rec["source"]
    assert rec["lm_head_quantized"] is True and rec["tensors"] == 2 * 5 + 1  # qkv, proj, fc_1, fc_2, mlp.proj per layer + lm_head
    out = safetensors_in(tmp_path / "out")
    sd = torch.load(lit / "lit_model.pth", weights_only=True)
    s = hp["lora_alpha"] / hp["lora_r"]
    # the fused qkv is quantized whole (one absmax mean for double quant), then the q/v LoRA, then split
    W = bnb4.roundtrip(sd["transformer.h.0.attn.qkv.weight"], "nf4", double_quant=True, dtype=torch.bfloat16).float()
    A, B = spec["lora"]["transformer.h.0.attn.qkv.lora_A"], spec["lora"]["transformer.h.0.attn.qkv.lora_B"]
    q_rows, kv = spec["sizes"][0], spec["sizes"][1]
    W[:q_rows] += s * (B[:q_rows] @ A[:2])
    W[q_rows + kv:] += s * (B[q_rows:] @ A[2:])
    q, k, v = W.to(torch.bfloat16).split(spec["sizes"])
    assert torch.equal(out["model.layers.0.self_attn.q_proj.weight"], q)
    assert torch.equal(out["model.layers.0.self_attn.k_proj.weight"], k)  # no LoRA, still round-tripped
    assert torch.equal(out["model.layers.0.self_attn.v_proj.weight"], v)
    head = bnb4.roundtrip(sd["lm_head.weight"], "nf4", double_quant=True, dtype=torch.bfloat16)
    assert torch.equal(out["lm_head.weight"], head)  # Lightning quantizes lm_head too
    assert torch.equal(out["model.embed_tokens.weight"], sd["transformer.wte.weight"])  # embeddings never
    assert torch.equal(out["model.norm.weight"], sd["transformer.ln_f.weight"])
    # the same LoRA recorded as trained on the 16-bit base: nothing round-tripped
    (tmp_path / "lora" / "hyperparameters.yaml").write_text(yaml.safe_dump({**hp, "quantize": None}))
    m2 = merge_litgpt(lit, tmp_path / "out16", lora=tmp_path / "lora")
    assert m2.params["base_quant"]["method"] == "none"
    assert torch.equal(safetensors_in(tmp_path / "out16")["model.layers.0.self_attn.k_proj.weight"],
                       sd["transformer.h.0.attn.qkv.weight"][q_rows:q_rows + kv])


# ---------------------------------------------------------------------------------------------
# training records


def test_axolotl_records(tmp_path):
    cfg = tmp_path / "qlora.yml"
    cfg.write_text("base_model: x\nadapter: qlora\nload_in_4bit: true\nbf16: auto\n")
    assert axolotl_record(cfg).method == "nf4-dq" and axolotl_record(cfg).dtype == "bf16"  # axolotl's defaults
    cfg.write_text("adapter: qlora\nload_in_4bit: true\nfp16: true\nbnb_config_kwargs:\n"
                   "  bnb_4bit_quant_type: fp4\n  bnb_4bit_use_double_quant: false\n  llm_int8_skip_modules: [mlp]\n")
    r = axolotl_record(cfg)
    assert (r.method, r.dtype, r.skip_modules) == ("fp4", "fp16", ("mlp",))
    cfg.write_text("adapter: lora\nbf16: true\n")
    assert axolotl_record(cfg).method == "none"


def test_litgpt_and_peft_card_records(tmp_path):
    r = litgpt_record({"quantize": "bnb.nf4", "precision": "16-true"}, Path("hp.yaml"))
    assert (r.method, r.dtype) == ("nf4", "fp16")
    assert litgpt_record({"quantize": None, "precision": "bf16-true"}, Path("hp.yaml")).method == "none"
    # the block older PEFT versions write into the adapter's README.md
    (tmp_path / "README.md").write_text(
        "## Training procedure\n\n\nThe following `bitsandbytes` quantization config was used during training:\n"
        "- quant_method: bitsandbytes\n- load_in_8bit: False\n- load_in_4bit: True\n- llm_int8_skip_modules: None\n"
        "- bnb_4bit_quant_type: nf4\n- bnb_4bit_use_double_quant: True\n- bnb_4bit_compute_dtype: bfloat16\n\n"
        "### Framework versions\n\n- PEFT 0.6.2\n")
    (r,) = peft_records(tmp_path)
    assert (r.method, r.dtype) == ("nf4-dq", "bf16")
    bq = resolve(None, None, [r], torch.float16, lm_head_quantized=False)
    assert bq.setting == bnb4.Bnb4Setting("nf4", True, torch.bfloat16) and bq.record.dtype_source.endswith("block)")
    assert resolve(None, None, [], torch.bfloat16, lm_head_quantized=False).setting is None


# ---------------------------------------------------------------------------------------------
# recipe and model card


def test_recipe_merge_section_and_card(tmp_path, tiny_model_dir):
    from quantize.formats.card import merge_rows, write_model_card
    from quantize.pipeline.recipe import load_recipe
    from quantize.pipeline.run import plan_run
    from test_merge_peft import make_adapter

    base = tiny_model_dir("llama", dtype=torch.bfloat16)
    make_adapter(base, tmp_path / "adapter", dtype=torch.bfloat16, r=2, lora_alpha=4, target_modules=["q_proj"])
    recipe = tmp_path / "r.yaml"
    body = {"name": "t", "source": {"base": str(base), "adapter": str(tmp_path / "adapter")},
            "resources": {"ram": "1 GiB", "vram": "none"}, "merge": {"base_quant": "nf4-dq", "base_quant_dtype": "bf16"}}
    recipe.write_text(yaml.safe_dump(body))
    r = load_recipe(recipe)
    assert r.merge.base_quant == "nf4-dq" and r.merge.base_quant_dtype == "bf16"
    for bad, needle in (({"base_quant": "nf8"}, "merge.base_quant"), ({"base_qaunt": "nf4"}, "unknown key")):
        recipe.write_text(yaml.safe_dump({**body, "merge": bad}))
        with pytest.raises(InputError, match=needle):
            load_recipe(recipe)
    recipe.write_text(yaml.safe_dump({**body, "source": {"model": str(base)}}))
    with pytest.raises(InputError, match="merge settings need a source to merge"):
        load_recipe(recipe)

    # quantize run: the merge stage gets the setting (and a changed setting is not "done" already)
    recipe.write_text(yaml.safe_dump(body))
    _, plans = plan_run(r, recipe, out=tmp_path / "run")
    merge = plans[0]
    assert merge.name == "merge" and merge.params == {"base_quant_request": {"base_quant": "nf4-dq",
                                                                             "base_quant_dtype": "bf16"}}
    merge.run()
    m = mf.load_manifest(tmp_path / "run" / "merged")
    assert m.params["base_quant"]["method"] == "nf4-dq" and m.params["base_quant"]["tensors"] == 14
    assert m.params["base_quant_request"] == merge.params["base_quant_request"]

    # the model card of whatever is quantized from it says so
    rows = merge_rows(tmp_path / "run" / "merged")
    assert len(rows) == 1 and "NF4-dequantized" in rows[0] and "double quantization" in rows[0]
    card = write_model_card(tmp_path, stage="gptq", model_dir=tmp_path / "run" / "merged", calibration=None,
                            params={"bits": 4, "group_size": 128}, metrics={})
    assert rows[0] in card.read_text()
    merge_lora(base, tmp_path / "adapter", tmp_path / "plain")
    assert merge_rows(tmp_path / "plain") == [] and merge_rows(base) == []


# ---------------------------------------------------------------------------------------------
# bad input: exit 2, one line, nothing left behind


def _run(argv, capsys):
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    return rc, [ln for ln in err.strip().splitlines() if ln.startswith("!!")], err


def _assert_refused(rc, lines, err, out: Path, *needles):
    assert rc == 2, err
    assert "Traceback" not in err and len(lines) == 1, err
    for n in needles:
        assert n in lines[0], lines[0]
    assert not out.exists() and not out.with_name(out.name + ".partial").exists()


def test_refuses_adapter_of_another_base(tmp_path, tiny_model_dir, capsys):
    from test_merge_peft import make_adapter

    other = tiny_model_dir("llama", hidden=32)
    make_adapter(other, tmp_path / "adapter", r=2, lora_alpha=4, target_modules=["q_proj"])
    base = tiny_model_dir("llama")
    out = tmp_path / "out"
    rc, lines, err = _run(["merge", "lora", "--base", base, "--adapter", tmp_path / "adapter", "--out", out,
                           "--base-quant", "nf4-dq"], capsys)
    _assert_refused(rc, lines, err, out, "q_proj", "different model size")


def test_refuses_base_quant_contradicting_the_record(tmp_path, tiny_model_dir, capsys):
    from test_merge_peft import make_adapter

    base = tiny_model_dir("llama")
    make_adapter(base, tmp_path / "adapter", r=2, lora_alpha=4, target_modules=["q_proj"])
    cfg = json.loads((base / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True,
                                  "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True}
    (tmp_path / "adapter" / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    rc, lines, err = _run(["merge", "lora", "--base", base, "--adapter", tmp_path / "adapter", "--out", out,
                           "--base-quant", "fp4"], capsys)
    _assert_refused(rc, lines, err, out, "--base-quant fp4", "config.json", "nf4-dq")
    # an Axolotl config of a 16-bit LoRA run contradicts any --base-quant
    (tmp_path / "adapter" / "config.json").unlink()
    ax = tmp_path / "axolotl.yml"
    ax.write_text("adapter: lora\nbf16: true\n")
    rc, lines, err = _run(["merge", "lora", "--base", base, "--adapter", tmp_path / "adapter", "--out", out,
                           "--base-quant", "nf4", "--axolotl-config", ax], capsys)
    _assert_refused(rc, lines, err, out, "axolotl.yml", "none")
    rc, lines, err = _run(["merge", "lora", "--base", base, "--adapter", tmp_path / "adapter", "--out", out,
                           "--axolotl-config", tmp_path / "missing.yml"], capsys)
    _assert_refused(rc, lines, err, out, "missing.yml")


def test_refuses_base_quant_on_full_litgpt_checkpoint(tmp_path, tiny_model_dir, capsys):
    from test_merge_litgpt import hf_to_lit

    lit = hf_to_lit(tiny_model_dir("llama"), tmp_path / "lit", family="llama")
    out = tmp_path / "out"
    rc, lines, err = _run(["merge", "litgpt", "--checkpoint", lit, "--out", out, "--base-quant", "nf4-dq"], capsys)
    _assert_refused(rc, lines, err, out, str(lit), "full Lit-GPT checkpoint", "--lora")
