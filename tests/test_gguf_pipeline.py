"""`quantize gguf` end to end: the layer loop writes model.gguf of llama.cpp's type mix; without
calibration the block bytes are llama.cpp's reference bytes, with calibration GPTQ's on the same
grid types; gguf-py and transformers read the file; eval gates it; bad input exits 2."""

from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from helpers import CPU  # noqa: E402
from quantize.cli import main  # noqa: E402
from quantize.commands.gguf import quantize_gguf  # noqa: E402
from quantize.formats import gguf_blocks  # noqa: E402
from quantize.formats.gguf import GGUFCheckpoint, gguf_tensor_name, permute_rows, qk_permute_heads  # noqa: E402
from quantize.formats.gguf_imatrix import read_imatrix  # noqa: E402
from quantize.io.reader import CheckpointReader  # noqa: E402
from quantize.testing import FAMILIES  # noqa: E402

IDS = torch.tensor([[0, 5, 17, 300, 999, 42, 7, 1000, 3, 64, 128, 511, 2, 1, 77]])
TRANSFORMERS = {"llama", "mistral", "qwen2", "gemma2", "phi3"}  # transformers 5's GGUF loader (qwen3: head_dim 128 only)


def _model(tiny_model_dir, family):
    return tiny_model_dir(family, hidden=256, dtype=torch.bfloat16)  # widths of 256: K-quant blocks


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_q4_k_m_with_and_without_calibration(family, tiny_model_dir, calib_for, tmp_path):
    model = _model(tiny_model_dir, family)
    cal = calib_for(model)
    src = CheckpointReader(model)
    m_ref = quantize_gguf(model_dir=model, out=tmp_path / "ref", exec_cfg=CPU, ftype="Q4_K_M")
    m_cal = quantize_gguf(model_dir=model, out=tmp_path / "cal", exec_cfg=CPU, ftype="Q4_K_M", calibration=cal,
                          imatrix_out=tmp_path / "imatrix.gguf")
    ref, ours = GGUFCheckpoint(tmp_path / "ref"), GGUFCheckpoint(tmp_path / "cal")
    assert ref.names() == ours.names()
    layer0 = m_ref.metrics["layers"][0]["types"]
    for m, raw_path in ((m_ref, tmp_path / "ref"), (m_cal, tmp_path / "cal")):  # the manifest names every tensor's type
        assert m.metrics["tensor_types"] == {t.name: t.tensor_type.name
                                              for t in gguf.GGUFReader(str(raw_path / "model.gguf")).tensors
                                              if t.name in m.metrics["tensor_types"]}
        assert {t.name for t in gguf.GGUFReader(str(raw_path / "model.gguf")).tensors} - set(m.metrics["tensor_types"]) \
            <= {"rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight"}
    raw_ref = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "ref" / "model.gguf")).tensors}
    raw_cal = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "cal" / "model.gguf")).tensors}
    config = src.config
    for lin, qtype in layer0.items():
        hf = f"model.layers.0.{lin}.weight"
        g = gguf_tensor_name(hf, config)
        assert raw_ref[g].tensor_type.name == qtype == raw_cal[g].tensor_type.name
        # no calibration: llama.cpp's reference bytes of the (q/k-permuted) weight
        W = src.get(hf).to(torch.float32)
        heads = qk_permute_heads(hf, config)
        if heads is not None:
            W = permute_rows(W, heads)
        want = gguf_blocks.quantize_reference(W, qtype).numpy()
        assert np.array_equal(np.asarray(raw_ref[g].data).reshape(want.shape), want), (family, lin)
        # calibration: different bytes of the same type and size
        assert not np.array_equal(np.asarray(raw_cal[g].data).reshape(want.shape), want)
    errs = [(e, r) for layer in m_cal.metrics["layers"] for e, r in
            zip(layer["rel_error"].values(), layer["reference_rel_error"].values())]
    assert all(e < r for e, r in errs), errs  # GPTQ on the grid beats llama.cpp's rounding on every linear
    head = m_cal.metrics.get("head", {})
    if not config.get("tie_word_embeddings", False) and family not in ("gemma", "gemma2"):
        # an untied head: Hessian-aware on the final-norm outputs, and what the file holds
        assert head["type"] == raw_cal["output.weight"].tensor_type.name
        assert head["rel_error"] < head["reference_rel_error"]
        assert not np.array_equal(np.asarray(raw_cal["output.weight"].data), np.asarray(raw_ref["output.weight"].data))
    else:
        assert not head
    assert (tmp_path / "cal" / "model.gguf").stat().st_size == (tmp_path / "ref" / "model.gguf").stat().st_size
    imx = read_imatrix(tmp_path / "imatrix.gguf")
    assert len(imx) == len(m_cal.metrics["layers"]) * len(layer0)


@pytest.mark.parametrize("family", sorted(TRANSFORMERS))
def test_transformers_reads_our_q4_k_m_as_our_reader_does(family, tiny_model_dir, calib_for, tmp_path):
    """transformers dequantizes the GGUF with gguf-py: the same dense model as our read-back, so the
    logits agree to 1e-5 of their range (same weights, same graph)."""
    from transformers import AutoModelForCausalLM

    from quantize.io.quantized import load_dequantized_model

    model = _model(tiny_model_dir, family)
    out = tmp_path / "q"
    quantize_gguf(model_dir=model, out=out, exec_cfg=CPU, ftype="Q4_K_M", calibration=calib_for(model))
    hf = AutoModelForCausalLM.from_pretrained(out, gguf_file="model.gguf", dtype=torch.float32).eval()
    ours = load_dequantized_model(out).eval()
    with torch.no_grad():
        a, b = hf(IDS).logits, ours(IDS).logits
    assert float((a - b).abs().max()) <= 1e-5 * float(b.max() - b.min())


def test_eval_gates_a_gguf_output(tiny_model_dir, calib_for, tmp_path):
    from quantize.eval.perplexity import eval_windows_from_dataset, evaluate_windows

    model = _model(tiny_model_dir, "qwen2")
    cal = calib_for(model, n=16, seq_len=64)
    windows, _ = eval_windows_from_dataset(model, "wikitext2-test", 64, 8)  # text like the calibration's
    kls = {}
    for name, kw in (("ref", {}), ("cal", {"calibration": cal})):
        quantize_gguf(model_dir=model, out=tmp_path / name, exec_cfg=CPU, ftype="Q4_0", **kw)
        kls[name] = evaluate_windows(tmp_path / name, windows, CPU, baseline=model).kl
    assert 0 < kls["cal"] < kls["ref"]


@pytest.mark.parametrize("argv,needle", [
    (["--type", "Q3_K_S"], "--type"),
    (["--imatrix-out", "x.gguf"], "--calibration"),
])
def test_bad_input_exit_2(argv, needle, tiny_model_dir, tmp_path, capsys):
    model = _model(tiny_model_dir, "llama")
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["gguf", "--model", str(model), "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not list(tmp_path.glob("out*"))


def test_a_quantized_output_converts_and_says_so(tiny_model_dir, calib_for, tmp_path):
    """A GPTQ output of this project converts to GGUF (read back dense, quantized again) and the card
    says it was re-quantized; the GGUF's config.json carries no quantization_config."""
    import json

    from quantize.commands.gptq import quantize_gptq
    from quantize.io.quantized import open_model

    model = _model(tiny_model_dir, "llama")
    cal = calib_for(model)
    quantize_gptq(model_dir=model, calibration=cal, out=tmp_path / "gptq", bits=8, group_size=128, act_order=False,
                  sym=True, damp=0.01, static_groups=False, block_size=128, rtn=True, exec_cfg=CPU)
    m = quantize_gguf(model_dir=tmp_path / "gptq", out=tmp_path / "gguf", exec_cfg=CPU, ftype="Q8_0")
    assert m.params["requantized_from"] == "gptq"
    assert "re-quantized" in (tmp_path / "gguf" / "README.md").read_text()
    assert "quantization_config" not in json.loads((tmp_path / "gguf" / "config.json").read_text())
    src, out = open_model(tmp_path / "gptq"), open_model(tmp_path / "gguf")
    name = "model.layers.1.mlp.down_proj.weight"
    W = src.get(name)
    assert torch.equal(out.get(name), torch.from_numpy(gguf.quants.dequantize(
        gguf.quants.quantize(W.numpy(), gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0)))
