"""GPTQ end to end through the streaming executor: every family, read-back, resume, determinism."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from quantize import manifest as mf
from quantize.calibration import sample_calibration
from quantize.cli import main
from quantize.commands.gptq import quantize_gptq
from quantize.executor.loop import ExecConfig
from quantize.io.quantized import load_dequantized_model
from quantize.io.reader import CheckpointReader
from quantize.testing.tiny import FAMILIES

CPU = ExecConfig(device="cpu", dtype=torch.float32, batch_size=4)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def calib_for(tmp_path_factory):
    cache = {}

    def make(model_dir: Path, n=8, seq_len=64) -> Path:
        key = (str(model_dir), n, seq_len)
        if key not in cache:
            out = tmp_path_factory.mktemp("cal") / "cal"
            sample_calibration(model_dir, "wikitext2", n, seq_len, 0, out)
            cache[key] = out
        return cache[key]

    return make


def _run(model, cal, out, **kw):
    args = dict(bits=4, group_size=32, act_order=True, sym=True, damp=0.01, static_groups=False, block_size=128,
                rtn=False, exec_cfg=CPU)
    args.update(kw)
    return quantize_gptq(model_dir=model, calibration=cal, out=out, **args)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_quantizes_and_reads_back(family, tiny_model_dir, calib_for, tmp_path):
    torch.set_num_threads(1)
    model = tiny_model_dir(family)
    cal = calib_for(model)
    m = _run(model, cal, tmp_path / "q")
    assert m.status == "complete" and not mf.verify(tmp_path / "q")
    # GPTQ beats round-to-nearest in Hessian-weighted error on every linear of every layer
    for layer in m.metrics["layers"]:
        for name, err in layer["rel_error"].items():
            assert err < layer["rtn_rel_error"][name], (family, layer["layer"], name)
    # packed tensors are there, dense weights are not
    names = CheckpointReader(tmp_path / "q").names()
    assert any(n.endswith(".qweight") for n in names)
    assert not any(n.endswith("_proj.weight") for n in names)
    # read-back: a transformers model with dequantized weights, close to the original
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    q = load_dequantized_model(tmp_path / "q").eval()
    ids = torch.tensor([[5, 17, 300, 42, 7, 99, 512, 3]])
    with torch.no_grad():
        a, b = ref(ids).logits, q(ids).logits
    assert torch.isfinite(b).all()
    assert not torch.equal(a, b)
    kl = torch.nn.functional.kl_div(b.log_softmax(-1), a.log_softmax(-1), log_target=True, reduction="batchmean")
    assert kl < 0.05, f"{family}: KL {kl}"


def test_readback_equals_solver_output(tiny_llama, calib_for, tmp_path):
    """The packed checkpoint dequantizes to exactly the weights the executor propagated with."""
    from quantize.executor import stage
    from quantize.methods.layer import GPTQMethod

    seen = {}
    orig = GPTQMethod.process_layer

    def spy(self, ctx):
        res = orig(self, ctx)
        for name, r in res.results.items():
            seen[ctx.prefix + name + ".weight"] = r.W_hat.clone()
        return res

    GPTQMethod.process_layer = spy
    try:
        _run(tiny_llama, calib_for(tiny_llama), tmp_path / "q")
    finally:
        GPTQMethod.process_layer = orig
    q = load_dequantized_model(tmp_path / "q")
    params = dict(q.named_parameters())
    assert seen
    for name, W_hat in seen.items():
        assert torch.equal(params[name].float(), W_hat), name


def test_deterministic_and_resume_bit_identical(tiny_model_dir, calib_for, tmp_path):
    from quantize.methods.layer import GPTQMethod

    model = tiny_model_dir("llama", num_layers=3)
    cal = calib_for(model)
    _run(model, cal, tmp_path / "a")
    _run(model, cal, tmp_path / "b")
    files = [o.path for o in mf.load_manifest(tmp_path / "a").outputs if o.path != "README.md"]
    for f in files:
        assert _sha(tmp_path / "a" / f) == _sha(tmp_path / "b" / f), f

    # crash while quantizing layer 2, then rerun the same call: it resumes at layer 2
    orig = GPTQMethod.process_layer
    calls = []

    def crash(self, ctx):
        calls.append(ctx.index)
        if ctx.index == 2:
            raise KeyboardInterrupt("simulated kill")
        return orig(self, ctx)

    GPTQMethod.process_layer = crash
    try:
        with pytest.raises(KeyboardInterrupt):
            _run(model, cal, tmp_path / "c")
    finally:
        GPTQMethod.process_layer = orig
    assert not (tmp_path / "c").exists() and (tmp_path / "c.partial" / "resume" / "state.json").is_file()
    resumed = []

    def record(self, ctx):
        resumed.append(ctx.index)
        return orig(self, ctx)

    GPTQMethod.process_layer = record
    try:
        _run(model, cal, tmp_path / "c")
    finally:
        GPTQMethod.process_layer = orig
    assert resumed == [2]
    assert not (tmp_path / "c.partial").exists()
    for f in files:
        assert _sha(tmp_path / "a" / f) == _sha(tmp_path / "c" / f), f


def test_cli_gptq_errors(tiny_llama, calib_for, tmp_path, capsys):
    cal = calib_for(tiny_llama)
    out = tmp_path / "q"
    out.mkdir()
    rc = main(["gptq", "--model", str(tiny_llama), "--calibration", str(cal), "--out", str(out), "--device", "cpu"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and "Traceback" not in err
    rc = main(["gptq", "--model", str(tiny_llama), "--calibration", str(cal), "--out", str(tmp_path / "x"),
               "--group-size", "48", "--device", "cpu"])
    assert rc == 2
    assert not (tmp_path / "x").exists()


def test_calibration_from_another_tokenizer_is_refused(tiny_llama, calib_for, tmp_path, capsys):
    import json
    import shutil

    other = tmp_path / "other"
    shutil.copytree(tiny_llama, other)
    tok = json.loads((other / "tokenizer_config.json").read_text())
    tok["model_max_length"] = 123
    (other / "tokenizer_config.json").write_text(json.dumps(tok))
    rc = main(["gptq", "--model", str(other), "--calibration", str(calib_for(tiny_llama)), "--out",
               str(tmp_path / "q"), "--device", "cpu"])
    assert rc == 2
    assert "tokenizer" in capsys.readouterr().err


def test_eval_gate(tiny_llama, calib_for, tmp_path):
    cal = calib_for(tiny_llama)
    _run(tiny_llama, cal, tmp_path / "q", bits=2, group_size=-1, act_order=False)
    base = ["eval", "--model", str(tmp_path / "q"), "--baseline", str(tiny_llama), "--seq-len", "64",
            "--max-windows", "4", "--device", "cpu"]
    assert main(base + ["--out", str(tmp_path / "e1")]) == 0
    m = mf.load_manifest(tmp_path / "e1")
    assert m.status == "complete" and m.metrics["kl"] > 0 and 0 < m.metrics["top1_agreement"] <= 1
    # a gate the 2-bit model cannot pass: exit 1, results still recorded
    assert main(base + ["--out", str(tmp_path / "e2"), "--max-ppl-increase", "-100"]) == 1
    assert mf.load_manifest(tmp_path / "e2").metrics["gate"]["passed"] is False
