"""SignRound refinement (``--refine signround``, methods/signround.py).

Properties: on a real decoder layer of every dense family, starting from GPTQ or RTN, the refined
layer's output error on the captured calibration inputs -- measured here, independently of the
method's own bookkeeping, by running the layer with the weights it leaves in place -- is never above
the starting point's, and at 2 bits it is strictly below; the stored hidden states are the layer's
inputs again afterwards, so the stage propagates through the REFINED weights; the output is
byte-identical for a seed (and between lock-step and one-pass-per-group execution); the written
checkpoint reads back to the refined weights, and compressed-tensors loads in transformers.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from quantize.arch import get_arch
from quantize.calibration import load_calibration
from quantize.cli import main
from quantize.executor.context import LayerContext
from quantize.executor.loop import LayerStreamer
from quantize.io.quantized import open_model
from quantize.io.reader import CheckpointReader
from quantize.methods import signround
from quantize.methods.grid import QuantSpec, dequantize_grouped
from quantize.methods.layer import GPTQMethod, RTNMethod
from quantize.methods.signround import SignRoundSettings, signround_layer
from quantize.testing.tiny import FAMILIES, MOE_FAMILIES

from helpers import CPU, assert_same_files, output_files, replaced, run_gptq

pytestmark = pytest.mark.usefixtures("one_thread")

ITERS = 25  # enough to move at 2 bits on the tiny layers, small enough for CI


def _output(out):
    return out[0] if isinstance(out, tuple) else out


def _layer_error(layer, calls, targets) -> float:
    """Mean squared error of the layer as it stands against ``targets``, over every captured call."""
    tot, n = 0.0, 0
    with torch.no_grad():
        for (a, kw), t in zip(calls, targets):
            tot += float((_output(layer(*a, **kw)).float() - t).square().sum(dtype=torch.float64))
            n += t.numel()
    return tot / n


def _first_layer(model, cal, cfg=CPU):
    reader = CheckpointReader(model)
    s = LayerStreamer(model, reader, get_arch(reader.config), cfg)
    ids, _ = load_calibration(cal)
    s.capture(ids)
    return s, LayerContext(s, 0, s.load_layer(0))


@pytest.mark.parametrize("start", ["gptq", "rtn"])
@pytest.mark.parametrize("family", FAMILIES)
def test_refinement_never_increases_the_layer_output_error(family, start, tiny_model_dir, calib_for):
    model = tiny_model_dir(family)
    cal = calib_for(model)
    spec = QuantSpec(bits=2, group_size=32, act_order=(start == "gptq"), static_groups=(start == "gptq"))
    cls = GPTQMethod if start == "gptq" else RTNMethod

    # the start: the same method without refinement, on a fresh copy of the same layer and inputs
    _, ctx0 = _first_layer(model, cal)
    calls = ctx0.layer_calls()
    with torch.no_grad():
        targets = [_output(ctx0.layer(*a, **kw)).float() for a, kw in calls]
    start_res = cls(spec).process_layer(ctx0)
    err_start = _layer_error(ctx0.layer, calls, targets)

    streamer, ctx = _first_layer(model, cal)
    inputs = [h.clone() for h in ctx.stored_hidden()]
    res = cls(spec, refine=SignRoundSettings(iters=ITERS)).process_layer(ctx)
    err_after = _layer_error(ctx.layer, ctx.layer_calls(), targets)
    m = res.metrics["signround"]

    assert err_after <= err_start, (family, start, err_after, err_start)
    assert err_after < 0.999 * err_start, (family, start, "2-bit refinement should improve", err_after, err_start)
    assert m["mse_before"] == pytest.approx(err_start, rel=1e-5)
    assert m["mse_after"] == pytest.approx(err_after, rel=1e-5)
    # the stored hidden states are the layer's inputs again, and nothing is marked propagated
    assert not ctx.propagated
    assert all(torch.equal(a, b) for a, b in zip(inputs, ctx.stored_hidden()))
    # results stay on the start's grid layout: same g_idx/perm, fp16-exact scales, W_hat their dequantization
    for name, r in res.results.items():
        r0 = start_res.results[name]
        assert torch.equal(r.g_idx, r0.g_idx)
        assert (r.perm is None) == (r0.perm is None) and (r.perm is None or torch.equal(r.perm, r0.perm))
        assert r.scales.shape == r0.scales.shape and r.zeros.shape == r0.zeros.shape
        assert torch.equal(r.scales, r.scales.half().float())
        assert int(r.codes.min()) >= 0 and int(r.codes.max()) <= spec.maxq
        assert torch.equal(r.W_hat, dequantize_grouped(r.codes, r.scales, r.zeros, r.g_idx))
        assert torch.equal(ctx.weight(name), r.W_hat)
    # the stage's propagation now runs through the refined weights
    streamer.run_layer(0, propagate=True)
    for h, t in zip(ctx.stored_hidden(), targets):
        assert not torch.equal(h, t)
    assert sum(float((h - t).square().sum()) for h, t in zip(ctx.stored_hidden(), targets)) / sum(
        t.numel() for t in targets) == pytest.approx(err_after, rel=1e-5)


@pytest.mark.parametrize("sym", [True, False])
def test_zero_steps_reproduce_the_start_exactly(sym, tiny_llama, calib_for):
    """The parametrisation's starting point is the start's codes, scales and zeros (asym: clip
    factors on both ends), including dynamic act-order GPTQ (permuted g_idx)."""
    _, ctx = _first_layer(tiny_llama, calib_for(tiny_llama))
    spec = QuantSpec(bits=3, group_size=32, sym=sym, act_order=True, static_groups=False)
    names = [n for g in ctx.groups for n in g]
    weights = {n: ctx.weight(n) for n in names}
    res = GPTQMethod(spec).process_layer(ctx)
    lins = {n: signround._prepare(weights[n], res.results[n]) for n in names}
    for n, lin in lins.items():
        r, r0 = lin.result(), res.results[n]
        assert torch.equal(r.codes, r0.codes) and torch.equal(r.scales, r0.scales) and torch.equal(r.zeros, r0.zeros)
        with torch.no_grad():
            assert torch.equal(lin.w_hat(), r0.W_hat), n


def test_pure_function_never_returns_worse_than_start():
    """A toy 'layer' (one linear) where the signed steps cannot help (lr far too large): the start is kept."""
    torch.manual_seed(0)
    W = torch.randn(16, 64)
    from quantize.methods.rtn import rtn_quantize

    start = rtn_quantize(W, QuantSpec(bits=2, group_size=32))
    xs = [torch.randn(32, 64) for _ in range(4)]
    targets = [x @ W.T for x in xs]
    fn = lambda w, x: x @ w["lin"].T  # noqa: E731
    out, m = signround_layer(fn, {"lin": W}, {"lin": start}, xs, targets, SignRoundSettings(iters=5, lr=50.0))
    assert m["mse_after"] <= m["mse_before"]
    assert m["kept"] in ("start", "last", "best_step")
    err = sum(float((x @ out["lin"].W_hat.T - t).square().sum()) for x, t in zip(xs, targets)) / sum(t.numel() for t in targets)
    assert err == pytest.approx(m["mse_after"], rel=1e-6)
    # and a sensible step size improves it
    out2, m2 = signround_layer(fn, {"lin": W}, {"lin": start}, xs, targets, SignRoundSettings(iters=50))
    assert m2["mse_after"] < m2["mse_before"]


def test_deterministic_and_lockstep_independent(tiny_llama, calib_for, tmp_path):
    cal = calib_for(tiny_llama)
    kw = dict(bits=2, refine="signround", refine_iters=10, static_groups=True)
    a = run_gptq(tiny_llama, cal, tmp_path / "a", exec_cfg=dataclasses.replace(CPU, lockstep=True), **kw)
    run_gptq(tiny_llama, cal, tmp_path / "b", exec_cfg=dataclasses.replace(CPU, lockstep=True), **kw)
    run_gptq(tiny_llama, cal, tmp_path / "c", exec_cfg=dataclasses.replace(CPU, lockstep=False), **kw)
    files = output_files(tmp_path / "a")
    assert_same_files(tmp_path / "a", tmp_path / "b", files)
    assert_same_files(tmp_path / "a", tmp_path / "c", files)
    for layer in a.metrics["layers"]:
        sr = layer["signround"]
        assert sr["iters"] == 10 and sr["seconds"] >= 0 and sr["mse_after"] <= sr["mse_before"]
    assert a.params["refine"] == "signround" and a.params["refine_iters"] == 10
    # another seed: another (still valid) result
    run_gptq(tiny_llama, cal, tmp_path / "d", exec_cfg=CPU, seed=1, **kw)
    assert any((tmp_path / "a" / f).read_bytes() != (tmp_path / "d" / f).read_bytes()
               for f in files if f.endswith(".safetensors"))


@pytest.mark.parametrize("fmt", ["gptq", "compressed-tensors"])
def test_checkpoint_reads_back_to_the_refined_weights(fmt, tiny_model_dir, calib_for, tmp_path):
    model = tiny_model_dir("llama", dtype=torch.bfloat16)
    cal = calib_for(model)
    refined: dict[str, torch.Tensor] = {}
    orig = signround.refine_layer

    def spy(ctx, process, settings, **kw):
        res = orig(ctx, process, settings, **kw)
        for n, r in res.results.items():
            refined[ctx.prefix + n + ".weight"] = r.W_hat.clone()
        return res

    out = tmp_path / fmt
    with replaced(signround, "refine_layer", spy):
        # compressed-tensors is written at 4 bits only (vLLM kernels); the refinement still moves it
        # from the min/max grid's start (the default at 4 bits, MSE clipping, leaves 10 steps nothing to gain here)
        m = run_gptq(model, cal, out, bits=2 if fmt == "gptq" else 4, refine="signround", refine_iters=10, format=fmt,
                     static_groups=True, grid="minmax")
    assert any(layer["signround"]["kept"] != "start" for layer in m.metrics["layers"])
    reader = open_model(out)
    assert refined
    for name, W_hat in refined.items():
        assert torch.equal(reader.get(name, dtype=torch.float32), W_hat), name
    if fmt == "compressed-tensors":
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.bfloat16).eval()
        with torch.no_grad():
            logits = hf(torch.tensor([[5, 17, 300, 42, 7, 99]])).logits
        assert torch.isfinite(logits).all()
        for name in ("model.layers.0.self_attn.o_proj", "model.layers.1.mlp.down_proj"):
            assert torch.equal(hf.get_submodule(name).weight, refined[name + ".weight"].to(torch.bfloat16)), name


def test_refine_rejects_moe_and_bad_settings(tiny_model_dir, calib_for, tiny_llama, tmp_path, capsys):
    moe = tiny_model_dir(MOE_FAMILIES[0])
    cases = [
        (["gptq", "--model", str(moe), "--calibration", str(calib_for(moe)), "--out", str(tmp_path / "m"),
          "--group-size", "32", "--refine", "signround"], "mixture-of-experts"),
        (["rtn", "--model", str(tiny_llama), "--calibration", str(calib_for(tiny_llama)), "--out", str(tmp_path / "r"),
          "--group-size", "32", "--refine", "signround", "--refine-iters", "-1"], "iters"),
    ]
    for argv, needle in cases:
        rc = main(argv)
        err = capsys.readouterr().err
        lines = [ln for ln in err.strip().splitlines() if ln.startswith("!!")]
        assert rc == 2, err
        assert "Traceback" not in err and len(lines) == 1, err
        assert needle in lines[0].lower(), lines[0]


@pytest.mark.parametrize("target", ["fp", "quantized"])
def test_targets_are_the_unquantized_models_own_layer_outputs(target, tiny_model_dir, calib_for, tmp_path, monkeypatch):
    """``target="fp"`` (the default): every layer is tuned towards the UNQUANTIZED model's output of
    that layer, i.e. transformers' hidden states of the fp model, while its inputs are the quantized
    model's (the executor keeps the fp stream); ``"quantized"``: the unquantized layer on the
    quantized inputs, which differs from the fp model's from layer 1 on."""
    from transformers import AutoModelForCausalLM

    model = tiny_model_dir("llama", num_layers=3)
    cal = calib_for(model)
    seen: list[tuple[list, list]] = []
    real = signround.signround_layer

    def spy(layer_fn, weights, results, inputs, targets, settings):
        seen.append(([_replace_input(c) for c in inputs], [t.clone() for t in targets]))
        return real(layer_fn, weights, results, inputs, targets, settings)

    monkeypatch.setattr(signround, "signround_layer", spy)
    m = run_gptq(model, cal, tmp_path / "q", bits=2, static_groups=True, refine="signround", refine_iters=2,
                 refine_target=target)
    assert (m.params.get("refine_target") == "fp") == (target == "fp")
    ids, _ = load_calibration(cal)
    fp = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32).eval()
    with torch.no_grad():
        hs = fp(ids, output_hidden_states=True).hidden_states  # embeddings, then every layer's output
    assert len(seen) == 3
    for i, (inputs, targets) in enumerate(seen):
        got = torch.cat(targets)
        want = hs[i + 1] if i < 2 else None  # the last entry has the final norm applied
        x = torch.cat(inputs)
        if i == 0:
            torch.testing.assert_close(x, hs[0])  # layer 0: both streams are the embeddings
        else:
            assert (x - hs[i]).abs().max() > 1e-3  # later layers run on the quantized model's inputs
        if want is not None and (target == "fp" or i == 0):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        elif want is not None:
            assert (got - want).abs().max() > 1e-3


def _replace_input(call):
    a, kw = call
    return (a[0] if a else kw["hidden_states"]).float().clone()


def test_fp_stream_survives_a_resume(tiny_model_dir, calib_for, tmp_path):
    """A run killed after layer 1 resumes with the fp stream from the resume point: the same bytes
    as an uninterrupted run (the fp targets of layer 2 are the unquantized model's, not the
    quantized stream's)."""
    from helpers import killed_at, recording

    model = tiny_model_dir("llama", num_layers=3)
    cal = calib_for(model)
    kw = dict(bits=2, static_groups=True, refine="signround", refine_iters=3)
    run_gptq(model, cal, tmp_path / "a", **kw)
    with replaced(GPTQMethod, "process_layer", killed_at(GPTQMethod, 2)), pytest.raises(KeyboardInterrupt):
        run_gptq(model, cal, tmp_path / "c", **kw)
    resumed: list[int] = []
    with replaced(GPTQMethod, "process_layer", recording(GPTQMethod, resumed)):
        run_gptq(model, cal, tmp_path / "c", **kw)
    assert resumed == [2]
    assert_same_files(tmp_path / "a", tmp_path / "c", output_files(tmp_path / "a"))
