"""`quantize check`: the engine that serves an output loads it, and its logits are our read-back's.

transformers (the project's own interpreter) must pass on compressed-tensors W4A16 and on GGUF
Q8_0; the verdicts land in manifest.json `checks`, `inspect` shows them and `verify` still holds.
A checkpoint whose lm_head tensor was renamed (transformers initializes a fresh head, our reader
falls back to the embedding) fails with one line naming transformers; a missing engine
interpreter is "not installed", never "pass". With .venv-llamacpp, llama.cpp passes a GGUF.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from helpers import CPU
from quantize import manifest as mf
from quantize.check import compare, detect_format, engines_for
from quantize.check.engines import REPO_ROOT
from quantize.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def _ct(model: Path, cal: Path, out: Path) -> Path:
    from quantize.commands.gptq import quantize_gptq

    quantize_gptq(model_dir=model, calibration=cal, out=out, bits=4, group_size=32, act_order=False, sym=True,
                  damp=0.01, static_groups=None, block_size=128, rtn=True, exec_cfg=CPU, format="compressed-tensors")
    return out


def _gguf(model: Path, out: Path, ftype: str = "Q8_0") -> Path:
    from quantize.commands.gguf import quantize_gguf

    quantize_gguf(model_dir=model, out=out, exec_cfg=CPU, ftype=ftype)
    return out


@pytest.fixture(scope="module")
def outputs(tiny_model_dir, calib_for, tmp_path_factory) -> dict[str, Path]:
    model = tiny_model_dir("llama", dtype=torch.bfloat16)
    root = tmp_path_factory.mktemp("check")
    return {"src": model, "ct": _ct(model, calib_for(model), root / "ct"), "gguf": _gguf(model, root / "gguf")}


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _err_lines(capsys) -> list[str]:
    return capsys.readouterr().err.strip().splitlines()


def test_formats_and_engines(outputs):
    assert detect_format(outputs["src"]) == "dense"
    assert detect_format(outputs["ct"]) == "compressed-tensors"
    assert detect_format(outputs["gguf"]) == "gguf"
    assert engines_for("gguf", "llama") == ["transformers", "llama.cpp"]
    assert engines_for("gguf", "gemma") == ["llama.cpp"]  # transformers' GGUF loader does not map gemma back
    assert engines_for("gptq") == ["transformers", "gptqmodel", "vllm"]
    assert engines_for("compressed-tensors") == engines_for("dense") == ["transformers", "vllm"]
    assert engines_for("gptq", "qwen3_moe") == ["gptqmodel", "vllm"]
    assert engines_for("exl2") == ["exllamav2"]


def test_compare_figures():
    a = [torch.tensor([[0.0, 1.0, 2.0], [3.0, 0.0, 1.0]])]
    f = compare(a, [a[0].clone()])
    assert (f.kl, f.top1, f.max_abs_diff, f.rel) == (0.0, 1.0, 0.0, 0.0)
    f = compare(a, [torch.tensor([[0.0, 1.0, 2.0], [0.0, 3.0, 1.0]])])
    assert f.top1 == 0.5 and f.max_abs_diff == 3.0 and f.rel == 1.0 and f.kl > 0


@pytest.mark.parametrize("kind", ["ct", "gguf"])
def test_transformers_passes_and_the_verdict_is_recorded(kind, outputs, tmp_path, capsys):
    out = _copy(outputs[kind], tmp_path / kind)
    before = (out / mf.MANIFEST_NAME).read_bytes()
    assert b'"checks"' not in before  # an unchecked manifest keeps its old bytes
    capsys.readouterr()
    assert main(["check", str(out), "--engine", "transformers", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["format"] == detect_format(out)
    m = mf.load_manifest(out)
    assert [c.engine for c in m.checks] == ["transformers"]
    c = m.checks[0]
    assert c.verdict == "pass" and c.engine_version and c.figures is not None
    assert c.figures.rel <= 1e-4 and c.figures.top1 > 0.99
    assert printed["checks"][0]["verdict"] == "pass"
    # inspect shows it; verify still holds (the manifest is not among its own outputs)
    assert main(["inspect", str(out)]) == 0
    shown = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("check")]
    assert len(shown) == 1 and "transformers" in shown[0] and "pass" in shown[0]
    assert main(["verify", str(out)]) == 0
    # a second check appends
    assert main(["check", str(out), "--engine", "transformers"]) == 0
    assert [c.verdict for c in mf.load_manifest(out).checks] == ["pass", "pass"]


def test_a_broken_checkpoint_fails_naming_transformers(outputs, tmp_path, capsys):
    """lm_head.weight renamed inside model.safetensors: transformers initializes a fresh head (our
    read-back falls back to the embedding), so the logits disagree; exit 1, one line."""
    from safetensors.torch import load_file, save_file

    out = _copy(outputs["ct"], tmp_path / "broken")
    f = out / "model.safetensors"
    sd = load_file(f)
    sd["lm_head_renamed.weight"] = sd.pop("lm_head.weight")
    save_file(sd, f, metadata={"format": "pt"})
    capsys.readouterr()
    assert main(["check", str(out), "--engine", "all"]) == 1
    err = _err_lines(capsys)
    assert len(err) == 1, err
    assert "transformers" in err[0] and "logit" in err[0] and "Traceback" not in err[0], err
    c = next(c for c in mf.load_manifest(out).checks if c.engine == "transformers")
    assert c.verdict == "fail" and c.figures.rel > 1e-4


def test_a_missing_engine_is_not_installed_never_pass(outputs, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("QUANTIZE_LLAMACPP_PYTHON", str(tmp_path / "nonexistent" / "python"))
    out = _copy(outputs["gguf"], tmp_path / "gguf")
    capsys.readouterr()
    assert main(["check", str(out), "--engine", "all"]) == 0  # transformers passes; llama.cpp is only absent
    by = {c.engine: c for c in mf.load_manifest(out).checks}
    assert by["transformers"].verdict == "pass"
    assert by["llama.cpp"].verdict == "not installed" and by["llama.cpp"].figures is None
    assert "QUANTIZE_LLAMACPP_PYTHON" in by["llama.cpp"].reason
    capsys.readouterr()
    assert main(["check", str(out), "--engine", "llama.cpp"]) == 1  # named explicitly: it could not check
    err = _err_lines(capsys)
    assert len(err) == 1 and "llama.cpp" in err[0] and "not installed" in err[0], err


def test_an_engine_that_does_not_serve_the_format_is_bad_usage(outputs, capsys):
    capsys.readouterr()
    assert main(["check", str(outputs["ct"]), "--engine", "llama.cpp"]) == 2
    err = _err_lines(capsys)
    assert len(err) == 1 and "llama.cpp" in err[0] and "compressed-tensors" in err[0], err


LLAMACPP_PYTHON = REPO_ROOT / ".venv-llamacpp" / "bin" / "python"


@pytest.mark.interop
@pytest.mark.skipif(not LLAMACPP_PYTHON.is_file(), reason="needs .venv-llamacpp (scripts/setup_llamacpp.sh)")
@pytest.mark.parametrize("ftype", ["Q8_0", "Q4_K_M"])
def test_llama_cpp_passes_our_gguf(ftype, tiny_model_dir, tmp_path, monkeypatch, capsys):
    """Q4_K_M (widths of 256) also exercises the KL-against-the-quantization-effect gate."""
    monkeypatch.delenv("QUANTIZE_LLAMACPP_PYTHON", raising=False)
    model = tiny_model_dir("llama", hidden=256, dtype=torch.bfloat16)
    out = _gguf(model, tmp_path / ftype, ftype)
    capsys.readouterr()
    assert main(["check", str(out), "--engine", "llama.cpp"]) == 0, capsys.readouterr().err
    c = mf.load_manifest(out).checks[-1]
    assert c.engine == "llama.cpp" and c.verdict == "pass" and c.engine_version
    assert c.figures.rel <= 0.02
    if ftype == "Q4_K_M":
        assert "KL(source||ours)" in c.reason  # the ratio gate ran


def test_exl2_is_served_by_exllamav2_only_and_never_passes_without_it(tmp_path, monkeypatch):
    """EXL2 has no CPU engine: exllamav2 needs CUDA. Without its virtualenv the verdict is "not
    installed" with the way to get it, and `check` exits 1 when it is named."""
    from quantize.check import check_output

    monkeypatch.setenv("QUANTIZE_EXLLAMAV2_PYTHON", str(tmp_path / "none" / "python"))
    out = tmp_path / "exl2"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": {"quant_method": "exl2"}}))
    fmt, engines, (rec,) = check_output(out, "auto")
    assert (fmt, engines) == ("exl2", ["exllamav2"])
    assert rec.verdict == "not installed" and "CUDA" in rec.reason and "QUANTIZE_EXLLAMAV2_PYTHON" in rec.reason


def test_auto_leaves_out_an_engine_known_to_refuse_the_configuration(tmp_path):
    """vLLM serves GPTQ 4/8-bit symmetric only: `auto` leaves it out for 2/3-bit or asymmetric GPTQ
    (transformers + gptqmodel serve those); `all` keeps it, so its refusal is recorded."""
    from quantize.check.engines import refused_by, select

    for bits, sym, refused in [(4, True, False), (8, True, False), (2, True, True), (3, True, True), (4, False, True)]:
        d = tmp_path / f"g{bits}{sym}"
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": {
            "quant_method": "gptq", "bits": bits, "sym": sym}}))
        assert (refused_by("vllm", "gptq", d) is not None) == refused
        assert ("vllm" in select("auto", "gptq", "llama", d)) == (not refused)
        assert select("all", "gptq", "llama", d) == ["transformers", "gptqmodel", "vllm"]


def _engine_answering(monkeypatch, logits: list[torch.Tensor]):
    """``run_engine`` stubbed: the engine 'ran' and returned ``logits``."""
    import quantize.check as check

    monkeypatch.setattr(check, "run_engine", lambda engine, python, d, prompts: {
        "status": "ok", "engine_version": "stub", "logits": logits})
    monkeypatch.setattr(check, "interpreter", lambda engine, fmt: check.engines.Interpreter(engine, "python"))


def test_moe_positions_beyond_tolerance_pass_only_from_a_router_near_tie(monkeypatch, tmp_path):
    """llama.cpp may route a token whose router scores nearly tie to another expert: that position
    and later ones differ by more than 2% of the range. The check passes them (and says so) only
    when a near-tie in our read-back comes at or before each prompt's first such position and at
    most a quarter of the positions are off; clear router margins up to there, or too many
    positions, fail."""
    from quantize.check import check_engine
    from quantize.check.routing import MAX_DIVERGED, TIE

    g = torch.Generator().manual_seed(0)
    ours = [torch.randn(12, 50, generator=g) * 3, torch.randn(10, 50, generator=g) * 3]
    rng = float(torch.cat(ours).max() - torch.cat(ours).min())
    got = [o + 0.001 * rng for o in ours]  # within 2% everywhere
    got[0] = got[0].clone()
    got[0][7:10] += 0.1 * rng  # a flip at position 7 and two tokens attending to it
    clear = [torch.full((12,), 0.5), torch.full((10,), 0.5)]
    tied = [c.clone() for c in clear]
    tied[0][7] = TIE / 4
    _engine_answering(monkeypatch, got)

    def verdict(margins):
        return check_engine("llama.cpp", tmp_path, "gguf", [], ours, gguf_type="F16", margins=margins)

    r = verdict(tied)
    assert r.verdict == "pass" and "3 of 22 positions" in r.reason and "near-tie" in r.reason, r.reason
    before, after = [c.clone() for c in clear], [c.clone() for c in clear]
    before[0][5], after[0][8] = TIE / 4, TIE / 4
    assert verdict(before).verdict == "pass"  # a flip two tokens earlier reaches position 7 through attention
    assert verdict(after).verdict == "fail"  # a near-tie only after the divergence began explains nothing
    r = verdict(clear)  # the same logits without a near-tie there: a misread tensor, not a flip
    assert r.verdict == "fail" and "each prompt's first 0.500" in r.reason, r.reason
    assert check_engine("llama.cpp", tmp_path, "gguf", [], ours, gguf_type="F16").verdict == "fail"  # dense rule
    many = [got[0].clone(), got[1]]
    many[0][7:] += 0.1 * rng  # 5 + 3 more positions in the other prompt: 8 of 22 > a quarter
    many[1] = got[1].clone()
    many[1][4:7] += 0.1 * rng
    tied[1][4] = TIE / 4
    _engine_answering(monkeypatch, many)
    assert 8 > MAX_DIVERGED * 22
    r = verdict(tied)
    assert r.verdict == "fail" and "8 of 22 positions" in r.reason, r.reason
    # transformers (rel 1e-4, the same fp32 forward) never gets the allowance
    _engine_answering(monkeypatch, got)
    assert check_engine("transformers", tmp_path, "gguf", [], ours, gguf_type="F16", margins=tied).verdict == "fail"


def test_router_margins_are_the_gap_between_the_kth_and_next_router_logit(tiny_model_dir):
    """``forward_with_margins``: per position the smallest (k-th - (k+1)-th router logit) / std over
    the sparse layers, from the router's own input; None for a dense model."""
    from transformers import AutoModelForCausalLM

    from quantize.check.routing import forward_with_margins

    ids = [5, 17, 300, 42, 7, 99, 512, 3]
    dense = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"), dtype=torch.float32).eval()
    assert forward_with_margins(dense, ids)[1] is None
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("qwen3_moe"), dtype=torch.float32).eval()
    seen = []
    hooks = [layer.mlp.gate.register_forward_hook(lambda m, a, out: seen.append(a[0].reshape(-1, a[0].shape[-1])))
             for layer in model.model.layers]
    logits, margins = forward_with_margins(model, ids)
    for h in hooks:
        h.remove()
    k = model.config.num_experts_per_tok
    want = []
    for x, layer in zip(seen, model.model.layers):
        r = (x @ layer.mlp.gate.weight.T).sort(-1, descending=True).values
        want.append((r[:, k - 1] - r[:, k]) / (x @ layer.mlp.gate.weight.T).std(-1))
    torch.testing.assert_close(margins, torch.stack(want).min(0).values)
    with torch.no_grad():
        torch.testing.assert_close(logits, model(torch.tensor([ids])).logits[0])
