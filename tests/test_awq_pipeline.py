"""AWQ end to end through the streaming executor: every family, read-back, quality vs RTN, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from quantize import manifest as mf
from quantize.cli import main
from quantize.commands.awq import quantize_awq
from quantize.errors import RuntimeFault
from quantize.eval.perplexity import eval_windows_from_dataset, evaluate_windows
from quantize.io.quantized import load_dequantized_model
from quantize.io.reader import CheckpointReader
from quantize.methods.awq_layer import AWQMethod
from quantize.testing.tiny import FAMILIES

from helpers import (CPU, assert_reads_back_close, assert_same_files, keeping_outputs, killed_at, output_files,
                     replaced, run_gptq)


def _awq(model, cal, out, **kw):
    return quantize_awq(model_dir=model, calibration=cal, out=out, exec_cfg=CPU, **{"group_size": 32, **kw})


def _rtn(model, cal, out, group_size=32):
    """The round-to-nearest baseline AWQ must beat: asymmetric 4-bit, same groups, no act-order."""
    return run_gptq(model, cal, out, group_size=group_size, act_order=False, sym=False, rtn=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_quantizes_reads_back_and_beats_rtn(family, tiny_model_dir, calib_for, tmp_path):
    torch.set_num_threads(1)
    model = tiny_model_dir(family)
    cal = calib_for(model)
    m = _awq(model, cal, tmp_path / "awq")
    assert m.status == "complete" and not mf.verify(tmp_path / "awq")
    qc = json.loads((tmp_path / "awq" / "config.json").read_text())["quantization_config"]
    assert qc == {"quant_method": "awq", "version": "gemm", "bits": 4, "group_size": 32, "zero_point": True,
                  "modules_to_not_convert": None}
    # packed tensors in the AWQ GEMM shapes, no dense linear weights
    reader = CheckpointReader(tmp_path / "awq")
    names = reader.names()
    assert not any(n.endswith("_proj.weight") for n in names)
    for n in [n for n in names if n.endswith(".qweight")]:
        K, words = reader.shape(n)
        assert reader.shape(n[: -len("qweight")] + "scales") == (K // 32, words * 8)
    # the scale search chose per pair, and never did worse than round-to-nearest on its tokens
    for layer in m.metrics["layers"]:
        assert layer["scale_loss"] and set(layer["scale_loss"]) == set(layer["awq_alpha"])
        for prev, loss in layer["scale_loss"].items():
            assert loss <= layer["rtn_loss"][prev], (family, layer["layer"], prev)
        for name, err in layer["noclip_rel_error"].items():
            assert err >= layer["rel_error"][name] - 1e-9, (family, name)  # clipping never hurt

    # read-back: a transformers model with dequantized weights and folded norms, close to the fp model
    assert_reads_back_close(model, tmp_path / "awq", family)

    # quality: lower KL to the fp model than plain RTN 4-bit on the same group size, on held-out text
    _rtn(model, cal, tmp_path / "rtn")
    windows, _ = eval_windows_from_dataset(model, "wikitext2-test", 64, 16)
    awq = evaluate_windows(tmp_path / "awq", windows, CPU, baseline=model)
    rtn = evaluate_windows(tmp_path / "rtn", windows, CPU, baseline=model)
    assert awq.kl < rtn.kl, f"{family}: AWQ KL {awq.kl:.3g} vs RTN {rtn.kl:.3g}"


@pytest.mark.parametrize("family", ["llama", "qwen2", "phi3"])
def test_readback_equals_what_was_propagated(family, tiny_model_dir, calib_for, tmp_path):
    """Without GQA the v->o pair applies too (qwen2: v bias folded, phi3: fused rows). The checkpoint
    holds exactly the quantized weights and folded norms/biases the executor propagated with."""
    torch.set_num_threads(1)
    model = tiny_model_dir(family, num_key_value_heads=4)
    seen: dict[str, torch.Tensor] = {}

    def four_pairs(res):
        assert len(res.metrics["awq_alpha"]) == 4  # norm->qkv, v->o, norm->mlp, up->down

    with replaced(AWQMethod, "process_layer", keeping_outputs(AWQMethod, seen, four_pairs)):
        _awq(model, calib_for(model), tmp_path / "q")
    src = CheckpointReader(model)
    q = dict(load_dequantized_model(tmp_path / "q").named_parameters())
    folded = [n for n in seen if not n.endswith("_proj.weight")]
    assert any("layernorm" in n for n in folded)
    if family == "qwen2":
        assert any(n.endswith("v_proj.bias") for n in folded)
    for name, t in seen.items():
        assert torch.equal(q[name].float(), t), name
    # folded tensors differ from the source checkpoint (unless the search kept s = 1 for that pair)
    assert sum(not torch.equal(src.get(n).float(), seen[n]) for n in folded) >= len(folded) // 2


def test_deterministic_and_resume_bit_identical(tiny_model_dir, calib_for, tmp_path):
    torch.set_num_threads(1)
    model = tiny_model_dir("llama", num_layers=3)
    cal = calib_for(model)
    _awq(model, cal, tmp_path / "a")
    _awq(model, cal, tmp_path / "b")
    files = output_files(tmp_path / "a")
    assert_same_files(tmp_path / "a", tmp_path / "b", files)

    with replaced(AWQMethod, "process_layer", killed_at(AWQMethod, 2)), pytest.raises(KeyboardInterrupt):
        _awq(model, cal, tmp_path / "c")
    assert (tmp_path / "c.partial" / "resume" / "state.json").is_file()
    _awq(model, cal, tmp_path / "c")
    # folded norms of layers 0-1 came from the parts written before the kill
    assert_same_files(tmp_path / "a", tmp_path / "c", files)


def test_non_finite_scale_is_named_and_never_written(tiny_llama, calib_for, tmp_path, monkeypatch):
    from quantize.methods import awq as A

    real = A.search_scales

    def poisoned(*args, **kw):
        r = real(*args, **kw)
        bad = r.scales.clone()
        bad[0] = float("nan")
        return A.ScaleSearch(bad, r.alpha, r.loss, r.rtn_loss, r.losses)

    monkeypatch.setattr(A, "search_scales", poisoned)
    with pytest.raises(RuntimeFault, match=r"layer 0 \(model\.layers\.0\.input_layernorm -> self_attn\.q_proj"):
        _awq(tiny_llama, calib_for(tiny_llama), tmp_path / "q")
    assert not (tmp_path / "q").exists()
    assert not list((tmp_path / "q.partial" / "parts").glob("*.safetensors"))


def test_cli_awq(tiny_llama, calib_for, tmp_path, capsys):
    torch.set_num_threads(1)
    cal = calib_for(tiny_llama)
    capsys.readouterr()
    base = ["awq", "--model", str(tiny_llama), "--calibration", str(cal), "--device", "cpu"]
    assert main(base + ["--out", str(tmp_path / "x"), "--bits", "3"]) == 2
    err = capsys.readouterr().err
    assert "4-bit only" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert main(base + ["--out", str(tmp_path / "x"), "--group-size", "48"]) == 2
    assert "group_size=48" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.partial").exists()
    assert main(base + ["--out", str(tmp_path / "q"), "--group-size", "64", "--json-logs"]) == 0
    out = capsys.readouterr().out
    assert "wrote" in out and "round-to-nearest" in out
    m = mf.load_manifest(tmp_path / "q")
    assert m.params["method"] == "awq" and m.params["group_size"] == 64 and m.params["n_grid"] == 20
    assert main(["verify", str(tmp_path / "q")]) == 0


def test_run_recipe_with_awq(tiny_llama, tmp_path):
    torch.set_num_threads(1)
    root = Path(__file__).resolve().parents[1]
    recipe = tmp_path / "r.yaml"
    recipe.write_text((root / "recipes/tiny.yaml").read_text())
    args = ["run", str(recipe), "--out", str(tmp_path / "run"), "--method", "awq", "--set", f"source.model={tiny_llama}",
            "--set", "calibration.samples=8", "--set", "calibration.seq_len=64", "--set", "eval.seq_len=64",
            "--set", "eval.max_windows=4", "--set", "group_size=32", "--set", "eval.max_ppl_increase=null"]
    assert main(args) == 0
    top = mf.load_manifest(tmp_path / "run")
    assert top.status == "complete" and [s["stage"] for s in top.metrics["stages"]] == ["sample", "awq", "eval"]
    q = mf.load_manifest(tmp_path / "run" / "model")
    assert q.stage == "awq" and q.params["group_size"] == 32
    assert json.loads((tmp_path / "run/model/config.json").read_text())["quantization_config"]["quant_method"] == "awq"
    assert main(args) == 0  # a rerun skips every completed stage
    assert [s["status"] for s in mf.load_manifest(tmp_path / "run").metrics["stages"]] == ["skipped"] * 3


def test_scale_search_runs_on_every_calibration_token_by_default(tiny_llama, calib_for, tmp_path, monkeypatch):
    """36 x 256 = 9216 calibration tokens, more than the old default's 8192 search tokens: by default
    every sub-block re-run and every Hessian covers all of them; ``search_tokens`` still subsamples."""
    from quantize.methods import awq as A
    from quantize.methods import awq_layer as AL

    torch.set_num_threads(1)
    cal = calib_for(tiny_llama, n=36, seq_len=256)
    rerun_tokens, hessians = [], []
    real_loss, real_search = AL.sub_block_loss, A.search_scales

    def spy_loss(ctx, pair, calls, *rest):
        rerun_tokens.append(sum(AL._hidden(a, k).shape[:-1].numel() for a, k in calls))
        return real_loss(ctx, pair, calls, *rest)

    def spy_search(*args, **kw):
        hessians.append(kw.get("H") is not None)
        return real_search(*args, **kw)

    monkeypatch.setattr(AL, "sub_block_loss", spy_loss)
    monkeypatch.setattr(A, "search_scales", spy_search)
    assert AL.AWQParams().search_tokens is None
    m = _awq(tiny_llama, cal, tmp_path / "all")
    n_layers = len(m.metrics["layers"])
    assert rerun_tokens == [36 * 256] * (2 * n_layers)  # q/k/v -> self_attn and gate/up -> mlp, every layer
    assert hessians and all(hessians)
    rerun_tokens.clear()
    _awq(tiny_llama, cal, tmp_path / "sub", search_tokens=8192)
    assert rerun_tokens == [8192] * (2 * n_layers)


def test_cli_defaults_are_the_methods(capsys):
    """The CLI leaves search_tokens and rerun_top to AWQParams; its help states the same default."""
    from quantize.methods.awq_layer import RERUN_TOP, AWQParams

    assert main(["awq", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert f"[default: {RERUN_TOP}]" in out and "[default: all]" in out and AWQParams().rerun_top == RERUN_TOP


def test_bf16_reruns_run_on_a_copy_and_still_beat_rtn(tiny_llama, calib_for, tmp_path):
    """``rerun_dtype="bfloat16"``: the sub-block re-runs use a bf16 copy; the layer keeps its fp32
    weights (the result reads back like the fp32 re-runs' does) and no pair ends worse than RTN."""
    torch.set_num_threads(1)
    cal = calib_for(tiny_llama)
    m = _awq(tiny_llama, cal, tmp_path / "bf16", rerun_dtype="bfloat16")
    assert m.params["rerun_dtype"] == "bfloat16" and m.status == "complete"
    for layer in m.metrics["layers"]:
        for prev, loss in layer["scale_loss"].items():
            assert loss <= layer["rtn_loss"][prev]
    assert_reads_back_close(tiny_llama, tmp_path / "bf16", "llama")
