"""Stages chained by manifests: a PEFT adapter through merge -> sample -> gptq -> eval; a run killed
mid-quantization carries on without redoing finished stages; numerical faults name the layer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from quantize import manifest as mf
from quantize.cli import main
from quantize.io.quantized import load_dequantized_model

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--set", "calibration.samples=8", "--set", "calibration.seq_len=64", "--set", "eval.seq_len=64",
         "--set", "eval.max_windows=4", "--set", "group_size=32", "--set", "eval.max_ppl_increase=null"]


def _adapter(base: Path, out: Path) -> None:
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    p = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, t in p.named_parameters():
            if "lora_" in name:
                t.copy_(0.2 * torch.randn(t.shape, generator=g))
    p.save_pretrained(out)


def test_lora_adapter_through_the_whole_pipeline(tiny_llama, tmp_path):
    _adapter(tiny_llama, tmp_path / "adapter")
    recipe = tmp_path / "r.yaml"
    recipe.write_text((ROOT / "recipes/tiny.yaml").read_text().replace(
        "  model: ${TINY_DIR:-models/tiny-llama}", f"  base: {tiny_llama}\n  adapter: {tmp_path / 'adapter'}"))
    assert main(["run", str(recipe), "--out", str(tmp_path / "run"), *SMALL]) == 0
    run = tmp_path / "run"
    top = mf.load_manifest(run)
    assert [s["stage"] for s in top.metrics["stages"]] == ["merge", "sample", "gptq", "eval"]
    assert not mf.verify(run)
    # the quantize stage consumed the merge output and recorded its manifest hash
    q = mf.load_manifest(run / "model")
    model_input = next(i for i in q.inputs if i.role == "model")
    assert model_input.stage == "merge" and model_input.manifest_sha256 == mf.manifest_sha256(run / "merged")
    # and the quantized model is the *merged* one: closer to the merged than to the base model
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[5, 17, 300, 42, 7, 99, 512, 3]])
    with torch.no_grad():
        quant = load_dequantized_model(run / "model")(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(run / "merged", dtype=torch.float32)(ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)(ids).logits
    assert (quant - merged).abs().max() < (quant - base).abs().max()


def test_killed_run_resumes_without_redoing_stages(tiny_model_dir, tmp_path, monkeypatch):
    from quantize.methods.layer import GPTQMethod

    model = tiny_model_dir("llama", num_layers=3)
    args = ["run", str(ROOT / "recipes/tiny.yaml"), "--out", str(tmp_path / "run"), "--set", f"source.model={model}", *SMALL]
    orig = GPTQMethod.process_layer
    seen: list[int] = []

    def crash_at_1(self, ctx):
        seen.append(ctx.index)
        if ctx.index == 1:
            raise KeyboardInterrupt("simulated kill")
        return orig(self, ctx)

    monkeypatch.setattr(GPTQMethod, "process_layer", crash_at_1)
    assert main(args) == 130
    assert mf.load_manifest(tmp_path / "run").status == "running"
    assert (tmp_path / "run/model.partial").is_dir() and not (tmp_path / "run/model").exists()

    seen.clear()
    monkeypatch.setattr(GPTQMethod, "process_layer", lambda self, ctx: (seen.append(ctx.index), orig(self, ctx))[1])
    assert main(args) == 0
    top = mf.load_manifest(tmp_path / "run")
    assert [s["status"] for s in top.metrics["stages"]] == ["skipped", "done", "done"]
    assert seen == [1, 2]  # layer 0 came from the partial run


def test_overflowing_layer_stops_the_run_naming_it(tiny_llama, tmp_path, capsys):
    from quantize.calibration import sample_calibration

    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    t = load_file(str(model / "model.safetensors"))
    t["model.layers.0.post_attention_layernorm.weight"] *= 1e30  # finite weights; the MLP's Hessian overflows
    save_file(t, str(model / "model.safetensors"), metadata={"format": "pt"})
    sample_calibration(model, "wikitext2", 4, 32, 0, tmp_path / "cal")
    rc = main(["gptq", "--model", str(model), "--calibration", str(tmp_path / "cal"), "--out", str(tmp_path / "q"),
               "--group-size", "32", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 1 and "layer 0" in err, err and "Traceback" not in err
    assert not (tmp_path / "q").exists()
