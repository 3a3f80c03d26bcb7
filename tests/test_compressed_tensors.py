"""compressed-tensors output (pack-quantized W4A16/W8A16, float-quantized FP8 W8A8).

The oracles are the compressed-tensors library itself (its own decompressors and pydantic config
classes, not our reader) and transformers, which loads our outputs through the library on CPU.
"""

from __future__ import annotations

import json

import pytest
import torch

from helpers import CPU, format_example, u32
from quantize.cli import main
from quantize.formats.compressed_tensors import (
    CompressedTensorsFP8Format,
    CompressedTensorsIntFormat,
    format_from_config,
    pack_int,
)
from quantize.io.quantized import load_dequantized_model, open_model
from quantize.methods.fp8 import FP8_MAX, fake_fp8_per_token, fp8_quantize
from quantize.methods.gptq import gptq_quantize_shared, prepare_hessian_inverse
from quantize.methods.grid import QuantSpec
from quantize.methods.rtn import rtn_quantize
from quantize.testing import FAMILIES

ct = pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors import FloatQuantizationCompressor, PackedQuantizationCompressor  # noqa: E402
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme  # noqa: E402

IDS = torch.tensor([[5, 17, 300, 42, 7, 99, 512, 3, 64, 128, 11, 900]])
_DT = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def _solve(W: torch.Tensor, spec: QuantSpec, act_order: bool):
    if not act_order:
        return rtn_quantize(W, spec)
    X = torch.randn(512, W.shape[1]) * torch.linspace(0.2, 3.0, W.shape[1])  # uneven diag(H): a real permutation
    H = X.T @ X / X.shape[0]
    return gptq_quantize_shared([W], spec, prepare_hessian_inverse(H, spec), names=["w"])[0]


def _library_decompress(fmt, tensors: dict) -> torch.Tensor:
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**fmt.weights_args()))
    return PackedQuantizationCompressor.decompress(dict(tensors), scheme)["weight"]


CASES = [(bits, group, sym, act, sd) for bits in (4, 8) for group in (32, 128, -1) for sym in (True, False)
         for act in (False, True) for sd in ("bfloat16", "float16") if not (act and group == -1)]


@pytest.mark.parametrize("bits,group,sym,act_order,scale_dtype", CASES,
                         ids=[f"w{b}-g{g}-{'sym' if s else 'asym'}-{'act' if a else 'noact'}-{d}" for b, g, s, a, d in CASES])
def test_library_decompresses_our_packing_to_the_solver_weights(bits, group, sym, act_order, scale_dtype):
    """compressed-tensors' own decompressor (not ours) reproduces the solver's W_hat rounded once to
    the scale dtype (the library multiplies in it), bit for bit; ours gives W_hat exactly."""
    torch.manual_seed(bits * 1000 + group + 7 * sym + 3 * act_order)
    W = torch.randn(48, 256) * 0.05  # 48 rows: the library's 4-bit asym zero-point unpacking needs > 8
    spec = QuantSpec(bits=bits, group_size=group, sym=sym, act_order=act_order, static_groups=act_order,
                     v1_safe_zeros=False, scale_dtype=scale_dtype)
    r = _solve(W, spec, act_order)
    fmt = CompressedTensorsIntFormat(spec, _DT[scale_dtype])
    t = fmt.pack(r)
    assert t["weight_packed"].dtype == torch.int32 and t["weight_shape"].dtype == torch.int64
    assert tuple(t["weight_scale"].shape) == (48, 1 if group == -1 else 256 // group)
    assert ("weight_zero_point" in t) == (not sym)
    lib = _library_decompress(fmt, t)
    assert lib.dtype == _DT[scale_dtype]
    assert torch.equal(lib, r.W_hat.to(lib.dtype))
    assert torch.equal(fmt.dequantize(t), r.W_hat)


def test_worked_example_matches_formats_md():
    """FORMATS.md §4.6: the §1.8 codes as CT asym 4-bit g4 give the spec's words (= GPTQ v2 transposed)."""
    codes, scales, zeros, _ = format_example(8, 8, 2, 256)
    t = pack_int(codes, scales, zeros, bits=4, sym=False, scale_dtype=torch.float16)
    assert [f"0x{w:08X}" for w in u32(t["weight_packed"][:, 0])] == [
        "0x50B61C72", "0x83E94FA5", "0xB61C72D8", "0xE94FA50B", "0x1C72D83E", "0x4FA50B61", "0x72D83E94", "0xA50B61C7"]
    assert [f"0x{w:08X}" for w in u32(t["weight_zero_point"][0])] == ["0x87654321", "0xBA987654"]
    assert t["weight_shape"].tolist() == [8, 8]


def test_fp8_library_decompresses_to_the_solver_weights():
    torch.manual_seed(0)
    W = torch.randn(40, 96) * torch.logspace(-3, 1, 40).unsqueeze(1)  # rows over four decades
    W[3] = 0.0
    r = fp8_quantize(W, "bfloat16")
    assert r.weight.dtype == torch.float8_e4m3fn and torch.equal(r.W_hat[3], torch.zeros(96))
    assert float((r.weight.float().abs().amax(dim=1)[torch.arange(40) != 3]).min()) > 0.9 * FP8_MAX
    t = CompressedTensorsFP8Format(dtype=torch.bfloat16).pack(r)
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=8, type="float", strategy="channel", symmetric=True, dynamic=False))
    lib = FloatQuantizationCompressor.decompress(dict(t), scheme)["weight"]
    assert torch.equal(lib, r.W_hat.to(lib.dtype))
    assert torch.equal(CompressedTensorsFP8Format().dequantize(t), r.W_hat)
    rel = float((W - r.W_hat).square().sum() / W.square().sum())
    assert rel < 2e-3  # e4m3: 3 mantissa bits, ~1/16 worst-case relative rounding per value


@pytest.mark.parametrize("fmt", [
    CompressedTensorsIntFormat(QuantSpec(bits=4, group_size=128, act_order=True, static_groups=True)),
    CompressedTensorsIntFormat(QuantSpec(bits=8, group_size=-1, sym=False, v1_safe_zeros=False)),
    CompressedTensorsFP8Format(static=False), CompressedTensorsFP8Format(static=True)], ids=["w4", "w8asym", "fp8", "fp8s"])
def test_config_is_what_the_library_accepts_and_reads_back(fmt):
    from compressed_tensors.compressors import ModelCompressor
    from transformers import CompressedTensorsConfig

    qc = json.loads(json.dumps(fmt.quantization_config()))  # as written to config.json
    assert qc["quant_method"] == "compressed-tensors" and qc["quantization_status"] == "compressed"
    assert qc["version"] == ct.__version__ and qc["ignore"] == ["lm_head"]
    body = {k: v for k, v in qc.items() if k not in ("version", "quant_method", "sparsity_config", "transform_config")}
    QuantizationConfig.model_validate(body)
    compressor = ModelCompressor.from_compression_config(CompressedTensorsConfig.from_dict(qc))  # transformers' path
    assert compressor.quantization_config.config_groups["group_0"].weights.num_bits == qc["config_groups"]["group_0"]["weights"]["num_bits"]
    back = format_from_config(qc)
    assert type(back) is type(fmt)
    if isinstance(fmt, CompressedTensorsIntFormat):
        assert (back.spec.bits, back.spec.group_size, back.spec.sym) == (fmt.spec.bits, fmt.spec.group_size, fmt.spec.sym)
        assert qc["format"] == "pack-quantized"
    else:
        assert back.static == fmt.static and qc["format"] == "float-quantized"


# -- end to end: transformers loads our outputs -----------------------------------------------------

def _q(kind: str, model, cal, out):
    from quantize.commands.awq import quantize_awq
    from quantize.commands.fp8 import quantize_fp8
    from quantize.commands.gptq import quantize_gptq

    common = dict(damp=0.01, block_size=128, exec_cfg=CPU, format="compressed-tensors")
    if kind == "w4-gptq":
        return quantize_gptq(model_dir=model, calibration=cal, out=out, bits=4, group_size=32, act_order=True, sym=True,
                             static_groups=None, rtn=False, **common)
    if kind == "w8-rtn":
        return quantize_gptq(model_dir=model, calibration=cal, out=out, bits=8, group_size=-1, act_order=False, sym=True,
                             static_groups=None, rtn=True, **common)
    if kind == "w4-awq":
        return quantize_awq(model_dir=model, calibration=cal, out=out, exec_cfg=CPU, group_size=32, format="compressed-tensors")
    if kind == "fp8":
        return quantize_fp8(model_dir=model, out=out, exec_cfg=CPU)
    if kind == "fp8-static":
        return quantize_fp8(model_dir=model, out=out, exec_cfg=CPU, scheme="static", calibration=cal)
    raise AssertionError(kind)


def _hf(out, dequantize: bool = False):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    kw = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if dequantize else {}
    return AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.bfloat16, **kw).eval()


def _fp8_activations(model, static_scales: dict[str, float] | None = None):
    """Our read-back with the engine's FP8 activation quantization on every decoder linear input."""
    from quantize.methods.fp8 import fake_fp8

    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".layers." in name:
            if static_scales is None:
                mod.register_forward_pre_hook(lambda _m, a: (fake_fp8_per_token(a[0]),))
            else:
                mod.register_forward_pre_hook(lambda _m, a, s=static_scales[name]: (fake_fp8(a[0], s),))
    return model


KINDS = ["w4-gptq", "w8-rtn", "fp8"]


@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_loads_our_outputs_of_every_family(family, tiny_model_dir, calib_for, tmp_path):
    """``AutoModelForCausalLM.from_pretrained`` (compressed-tensors' loader, on CPU, no options) gives
    the weights our read-back gives, to the bit after bf16 rounding, and the same logits.

    Tolerance: the loaded model and ours hold identical bf16 weights and run the same transformers
    forward (for FP8 with activations quantized per token in bf16 by the loader and by our
    ``fake_fp8_per_token``, the same arithmetic), so the logits agree to 1e-6 of their range
    (measured: exactly); any misread code, scale or zero point moves them by far more."""
    model = tiny_model_dir(family, dtype=torch.bfloat16)
    cal = calib_for(model)
    for kind in KINDS:
        out = tmp_path / kind
        _q(kind, model, cal, out)
        hf = _hf(out)
        ours = load_dequantized_model(out, dtype=torch.bfloat16).eval()
        reader = open_model(out)
        with torch.no_grad():  # the first forward decompresses the packed modules
            a, b = hf(IDS).logits.float(), ours(IDS).logits.float()
        if kind == "fp8":  # the loader quantizes activations: so must our reference
            assert not torch.equal(a, b)
            with torch.no_grad():
                b = _fp8_activations(ours)(IDS).logits.float()
        for name in ("model.layers.0.self_attn.o_proj", "model.layers.1.mlp.down_proj"):
            # decompressed in bf16 by the library: our fp32 read-back rounded once
            assert torch.equal(hf.get_submodule(name).weight, reader.get(name + ".weight").to(torch.bfloat16)), (kind, name)
        assert float((a - b).abs().max()) <= 1e-6 * float(a.abs().max()), (family, kind, float((a - b).abs().max()))


def test_asymmetric_and_static_outputs_load(tiny_model_dir, calib_for, tmp_path):
    """AWQ (asymmetric zero points) loads with ``CompressedTensorsConfig(dequantize=True)``: the
    default compressed-module path of compressed-tensors 0.20 builds the zero-point parameter
    unpacked and rejects every packed asymmetric checkpoint (llm-compressor's own too, upstream
    llm-compressor#1618); vLLM reads the packed layout. FP8 static carries its input scales."""
    model = tiny_model_dir("llama", dtype=torch.bfloat16)
    cal = calib_for(model)
    out = tmp_path / "awq"
    _q("w4-awq", model, cal, out)
    hf = _hf(out, dequantize=True)
    ours = load_dequantized_model(out, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        a, b = hf(IDS).logits.float(), ours(IDS).logits.float()
    assert float((a - b).abs().max()) <= 1e-6 * float(a.abs().max())

    out = tmp_path / "fp8s"
    m = _q("fp8-static", model, cal, out)
    reader = open_model(out)
    scales = {}
    for layer in m.metrics["layers"]:
        for lin, s in layer["input_scale"].items():
            key = f"model.layers.{layer['layer']}.{lin}"
            assert float(reader.inner.get(key + ".input_scale").float()) == s
            scales[key] = s
    assert len(set(scales.values())) > 1
    hf = _hf(out)
    ours = _fp8_activations(load_dequantized_model(out, dtype=torch.bfloat16).eval(), scales)
    with torch.no_grad():
        a, b = hf(IDS).logits.float(), ours(IDS).logits.float()
    assert float((a - b).abs().max()) <= 1e-6 * float(a.abs().max())


def test_same_run_as_gptq_and_as_compressed_tensors_dequantizes_identically(tiny_model_dir, calib_for, tmp_path):
    """GPTQ 4-bit g32 act-order (static groups) written as GPTQ and as compressed-tensors: every
    linear reads back to the same weights (bf16 model: both on the bf16 grid; fp16 model: fp16)."""
    from quantize.commands.gptq import quantize_gptq

    for dtype, sd in ((torch.bfloat16, "bfloat16"), (torch.float16, "auto")):
        model = tiny_model_dir("qwen2", dtype=dtype)
        cal = calib_for(model)
        kw = dict(model_dir=model, calibration=cal, bits=4, group_size=32, act_order=True, sym=True, damp=0.01,
                  static_groups=True, block_size=128, rtn=False, exec_cfg=CPU, scale_dtype=sd)
        quantize_gptq(out=tmp_path / f"g-{sd}", format="gptq", **kw)
        quantize_gptq(out=tmp_path / f"c-{sd}", format="compressed-tensors", **kw)
        a, b = open_model(tmp_path / f"g-{sd}"), open_model(tmp_path / f"c-{sd}")
        assert a.names() == b.names()
        packed = [n for n in a.names() if "_proj.weight" in n]
        assert len(packed) == 14
        for n in a.names():
            assert torch.equal(a.get(n), b.get(n)), n


@pytest.mark.parametrize("argv,needle", [
    (["gptq", "--bits", "3", "--format", "compressed-tensors"], "--bits 3"),
    (["gptq", "--group-size", "16", "--format", "compressed-tensors"], "--group-size 16"),
    (["gptq", "--group-size", "32", "--act-order", "--no-static-groups", "--format", "compressed-tensors"], "--static-groups"),
    (["gptq", "--group-size", "32", "--scale-dtype", "float16", "--format", "compressed-tensors"], "--scale-dtype"),
    (["awq", "--group-size", "48", "--format", "compressed-tensors"], "48"),
    (["fp8", "--scheme", "static"], "--calibration"),
])
def test_unsupported_combinations_exit_2_and_leave_nothing(argv, needle, tiny_model_dir, calib_for, tmp_path, capsys):
    model = tiny_model_dir("llama", dtype=torch.bfloat16)
    out = tmp_path / "out"
    args = [*argv[:1], "--model", str(model), "--out", str(out), *argv[1:]]
    if argv[0] != "fp8":
        args += ["--calibration", str(calib_for(model))]
    capsys.readouterr()  # the fixtures' own output
    assert main(args) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists() and not list(tmp_path.glob("out*"))


def test_fp8_eval_applies_activation_quantization(tiny_model_dir, tmp_path):
    """Eval of an FP8 output runs the engine's activation quantization: its KL to the fp model is
    larger than the same weights' KL with exact activations."""
    from quantize.eval.perplexity import evaluate_windows

    model = tiny_model_dir("llama", dtype=torch.bfloat16)
    out = tmp_path / "fp8"
    _q("fp8", model, None, out)
    windows = torch.randint(3, 1000, (4, 32), generator=torch.Generator().manual_seed(0))
    with_act = evaluate_windows(out, windows, CPU, baseline=model)
    fmt_cls = CompressedTensorsFP8Format
    saved = fmt_cls.input_quantizer
    try:
        del fmt_cls.input_quantizer
        weights_only = evaluate_windows(out, windows, CPU, baseline=model)
    finally:
        fmt_cls.input_quantizer = saved
    assert with_act.kl > weights_only.kl > 0


@pytest.mark.parametrize("kind,setting", [("w4-gptq", ("ct", 4, 32, True)), ("w8-rtn", ("ct", 8, -1, True)),
                                          ("w4-awq", ("ct", 4, 32, False)), ("fp8", ("fp8", 8, 128, True)),
                                          ("fp8-static", ("fp8", 8, 128, False))])
def test_plan_predicts_compressed_tensors_bytes_exactly(kind, setting, tiny_model_dir, calib_for, tmp_path):
    """``quantize plan`` counts every tensor of these outputs: the tensor bytes match to the byte."""
    from quantize.plan import Setting, weight_bytes
    from quantize.io.reader import CheckpointReader

    model = tiny_model_dir("qwen2", dtype=torch.bfloat16)  # q/k/v biases exercise the bias term
    out = tmp_path / kind
    _q(kind, model, calib_for(model), out)
    r = CheckpointReader(out)
    actual = sum(r.nbytes(n) for n in r.names())
    cfg = json.loads((model / "config.json").read_text())
    assert weight_bytes(cfg, Setting(*setting))["total"] == actual


def test_recipe_format_and_fp8(tmp_path):
    from quantize.errors import InputError
    from quantize.pipeline.recipe import load_recipe

    from pathlib import Path

    tiny = Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml"
    r = load_recipe(tiny, ["format=compressed-tensors"])
    assert r.format == "compressed-tensors" and r.out_dir().name == "tiny-gptq-4bit-compressed-tensors"
    assert load_recipe(tiny, ["method=fp8"]).out_dir().name == "tiny-fp8-8bit"
    with pytest.raises(InputError, match="compressed-tensors"):
        load_recipe(tiny, ["method=exl2", "format=compressed-tensors"])
    with pytest.raises(InputError, match="format"):
        load_recipe(tiny, ["format=gguf"])
