"""`quantize plan` against real outputs and public configs; `quantize run` chaining and skipping."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from quantize import manifest as mf
from quantize.cli import main
from quantize.io.reader import CheckpointReader
from quantize.plan import Setting, kv_cache_bytes, plan, weight_bytes

ROOT = Path(__file__).resolve().parents[1]


def _data_bytes(directory: Path) -> int:
    r = CheckpointReader(directory)
    return sum(r.nbytes(n) for n in r.names())


def test_llama3_70b_bf16_bytes_match_the_parameter_count():
    cfg = json.loads((ROOT / "recipes/configs/llama3-70b.json").read_text())
    h, inter, kv, L, V = 8192, 28672, 1024, 80, 128256
    params = L * (h * (h + kv + kv) + h * h + 3 * h * inter + 2 * h) + 2 * V * h + h
    assert weight_bytes(cfg, Setting("bf16", 16))["total"] == 2 * params  # 70.55 B parameters
    assert kv_cache_bytes(cfg, 8192, 1, "fp16") == 2 * L * kv * 8192 * 2
    p = plan(cfg, vram=48 * 2**30, context=8192)
    assert p["best"]["total"] <= 48 * 2**30
    assert all(not r["fits"] for r in p["rows"] if r["effective_bits"] > p["best"]["effective_bits"])


@pytest.mark.parametrize("bits,group", [(4, 32), (3, 32), (2, -1), (8, 64)])
def test_plan_predicts_gptq_output_bytes(bits, group, tiny_model_dir, tmp_path):
    from quantize.calibration import sample_calibration
    from quantize.commands.gptq import quantize_gptq
    from quantize.executor.loop import ExecConfig

    model = tiny_model_dir("qwen2")  # q/k/v biases exercise the bias term
    sample_calibration(model, "wikitext2", 4, 32, 0, tmp_path / "cal")
    quantize_gptq(model_dir=model, calibration=tmp_path / "cal", out=tmp_path / "q", bits=bits, group_size=group,
                  act_order=False, sym=True, damp=0.01, static_groups=False, block_size=128, rtn=True,
                  exec_cfg=ExecConfig(batch_size=4))
    cfg = json.loads((model / "config.json").read_text())
    predicted = weight_bytes(cfg, Setting("gptq", bits, group))["total"]
    actual = _data_bytes(tmp_path / "q")
    assert abs(predicted - actual) / actual < 0.02, (predicted, actual)


def test_plan_cli(capsys):
    assert main(["plan", "--model", str(ROOT / "recipes/llama3-70b.yaml"), "--bits", "4", "--vram", "2x24GiB", "--context", "8192"]) == 0
    out = capsys.readouterr().out
    assert "gptq 4-bit g128" in out and "best within 2x24GiB" in out


def _recipe(tmp_path: Path, model: Path, **extra) -> Path:
    text = (ROOT / "recipes/tiny.yaml").read_text()
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def test_run_chains_and_skips(tiny_llama, tmp_path, capsys):
    recipe = _recipe(tmp_path, tiny_llama)
    args = ["run", str(recipe), "--out", str(tmp_path / "run"), "--set", f"source.model={tiny_llama}",
            "--set", "calibration.samples=8", "--set", "calibration.seq_len=64", "--set", "eval.seq_len=64",
            "--set", "eval.max_windows=4", "--set", "group_size=32", "--set", "eval.max_ppl_increase=null"]
    assert main(args) == 0
    top = mf.load_manifest(tmp_path / "run")
    assert top.status == "complete" and not mf.verify(tmp_path / "run")
    assert [s["status"] for s in top.metrics["stages"]] == ["done", "done", "done"]
    assert (tmp_path / "run/model/quantize_config.json").is_file()
    # a rerun skips every completed stage
    assert main(args) == 0
    assert [s["status"] for s in mf.load_manifest(tmp_path / "run").metrics["stages"]] == ["skipped"] * 3
    # changing the bits redoes the quantize and eval stages only
    assert main(args + ["--bits", "8"]) == 0
    assert [s["status"] for s in mf.load_manifest(tmp_path / "run").metrics["stages"]] == ["skipped", "done", "done"]


@pytest.mark.parametrize("argv,needle", [
    (["run", "recipes/llama3-70b.yaml", "--bits", "4"], "source.model"),
    (["run", "recipes/tiny.yaml", "--bits", "3", "--method", "awq"], "4-bit"),
    (["run", "recipes/tiny.yaml", "--set", "calibraton.samples=3"], "unknown key"),
    (["run", "recipes/nope.yaml"], "no such recipe"),
])
def test_run_bad_input_exit_2(argv, needle, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("LLAMA3_70B_DIR", raising=False)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_run_checks_the_output_when_the_recipe_asks(tiny_llama, tmp_path, monkeypatch):
    """recipe `check: all`: after quantizing, the engine verdicts land in the model's manifest
    (transformers on a compressed-tensors output runs in this interpreter); a rerun skips."""
    monkeypatch.setenv("QUANTIZE_LLAMACPP_PYTHON", str(tmp_path / "none" / "python"))
    recipe = _recipe(tmp_path, tiny_llama)
    args = ["run", str(recipe), "--out", str(tmp_path / "run"), "--set", f"source.model={tiny_llama}",
            "--set", "calibration.samples=8", "--set", "calibration.seq_len=64", "--set", "eval.seq_len=64",
            "--set", "eval.max_windows=4", "--set", "group_size=32", "--set", "eval.max_ppl_increase=null",
            "--set", "check=all", "--format", "compressed-tensors"]
    assert main(args) == 0
    checks = mf.load_manifest(tmp_path / "run" / "model").checks
    assert [(c.engine, c.verdict) for c in checks] == [("transformers", "pass"), ("vllm", "not installed")]
    assert not mf.verify(tmp_path / "run" / "model")
    assert main(args) == 0  # skipped: no second check appended
    assert len(mf.load_manifest(tmp_path / "run" / "model").checks) == 2
