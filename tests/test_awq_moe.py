"""AWQ for Mixture-of-Experts models (Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V3) in the one layer loop.

Scale pairs of a sparse layer are data (``MoE.scale_pairs``): the post-attention norm feeds every
routed expert's gate/up, the shared expert's gate/up and the routers (never quantized: their columns
take the scale), then each expert's up -> down with a scale of its own. Oracles: transformers' own
forward (folding leaves the fp function unchanged), our read-back and compressed-tensors' loader
(the written bytes are what was propagated), RTN on the AWQ grid (quality), ``awq_quantize`` itself
(the declared fallback).
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from safetensors import safe_open

from quantize.arch import EXPERT, get_arch
from quantize.cli import main
from quantize.commands.awq import quantize_awq
from quantize.eval.perplexity import eval_windows_from_dataset, evaluate_windows
from quantize.io.quantized import load_dequantized_model, open_model
from quantize.io.reader import CheckpointReader
from quantize.methods import awq as A
from quantize.methods.awq_layer import AWQMethod, fold_pair
from quantize.testing import MOE_FAMILIES

from helpers import CPU, hf_model, keeping_outputs, refused_in_one_line, replaced, run_gptq
from helpers import tiny_model_edited

pytestmark = pytest.mark.usefixtures("one_thread")

IDS = torch.tensor([[5, 17, 300, 42, 7, 99, 512, 3, 64, 128, 900, 11], [9, 400, 23, 77, 1000, 6, 31, 250, 8, 19, 640, 2]])
NO_GQA = {"num_key_value_heads": 4}  # the tiny models have 4 heads: v -> o applies (not to DeepSeek's MLA)



def _awq(model, cal, out, **kw):
    return quantize_awq(model_dir=model, calibration=cal, out=out, exec_cfg=CPU, **{"group_size": 32, **kw})


def _rtn(model, cal, out):
    """Round-to-nearest on the AWQ grid: asymmetric 4-bit, the same groups, no act-order."""
    return run_gptq(model, cal, out, group_size=32, act_order=False, sym=False, rtn=True)


# -- (a) folding leaves the fp function unchanged ------------------------------------------------


def _expert_rows(layer, arch, name):
    e, j = arch.expert_slot(name)
    ex = arch.moe.experts
    fused = getattr(layer.get_submodule(ex.module), ex.fused[0 if j < 2 else 1])
    inter = fused.shape[1] // 2
    return fused, e, slice(None) if j == 2 else slice(0, inter) if j == 0 else slice(inter, 2 * inter)


def _get(layer, arch, name):
    if arch.expert_slot(name) is not None:
        fused, e, rows = _expert_rows(layer, arch, name)
        return fused.detach()[e, rows].float().clone()
    return layer.get_submodule(name).weight.detach().float().clone()


def _set(layer, arch, name, w):
    if arch.expert_slot(name) is not None:
        fused, e, rows = _expert_rows(layer, arch, name)
        fused.data[e, rows] = w.to(fused.dtype)
    else:
        mod = layer.get_submodule(name)
        mod.weight.data = w.to(mod.weight.dtype).reshape(mod.weight.shape)


class _Lazy(dict):
    def __init__(self, layer, arch):
        super().__init__()
        self.layer, self.arch = layer, arch

    def __missing__(self, name):
        w = self[name] = _get(self.layer, self.arch, name)
        return w


def _fold_random(model, arch, config, gen, *, passive=True):
    """Fold random scales (0.25x .. 4x) into every pair of every layer (per expert where the pair
    is per expert); ``passive=False`` leaves the routers unscaled (must break the function)."""
    pairs_seen = 0
    for i, layer in enumerate(model.get_submodule(arch.layers_path)):
        W = _Lazy(layer, arch)
        for pair in arch.layer_scale_pairs(config, i):
            concrete = ([dataclasses.replace(pair, prev=pair.prev.replace(EXPERT, str(e)),
                                             linears=tuple(n.replace(EXPERT, str(e)) for n in pair.linears))
                         for e in range(arch.num_experts(config))] if EXPERT in pair.prev else
                        [dataclasses.replace(pair, linears=tuple(n for t in pair.linears for n in arch.expert_names(t, config)))])
            for one in concrete:
                if not passive:
                    one = dataclasses.replace(one, passive=())
                K = W[one.linears[0]].shape[1]
                s = torch.exp((torch.rand(K, generator=gen) * 2 - 1) * math.log(4.0))
                fold_pair(layer, arch, config, one, s, W, set_weight=lambda n, w, layer=layer: _set(layer, arch, n, w))
                pairs_seen += 1
    return pairs_seen


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_folded_scales_leave_the_moe_model_unchanged(family, tiny_model_dir):
    """With random scales folded into every pair (attention, norm -> experts + shared expert +
    routers, every expert's up -> down, shared up -> down) the logits are transformers' own within
    float rounding; the routers' columns changed; without scaling the routers the output moves."""
    model_dir = tiny_model_dir(family, **NO_GQA)
    config = CheckpointReader(model_dir).config
    arch = get_arch(config)
    model = hf_model(model_dir)
    with torch.no_grad():
        before = model(IDS).logits
    routers = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith(".mlp.gate.weight")}
    E, layers = arch.num_experts(config), arch.num_layers(config)
    n = _fold_random(model, arch, config, torch.Generator().manual_seed(0))
    sparse = sum(arch.is_sparse_layer(config, i) for i in range(layers))
    assert n >= sparse * (2 + E)  # input norm, norm -> experts, E x up -> down (+ v -> o, shared)
    with torch.no_grad():
        after = model(IDS).logits
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    for name, w in routers.items():
        assert not torch.equal(dict(model.named_parameters())[name], w), name

    broken = hf_model(model_dir)
    _fold_random(broken, arch, config, torch.Generator().manual_seed(0), passive=False)
    with torch.no_grad():
        assert (broken(IDS).logits - before).abs().max() > 1e-2


def test_moe_pairs_are_data_in_the_table():
    from quantize.arch import by_name

    q2 = by_name("qwen2_moe")
    cfg = {"num_experts": 4, "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 4,
           "intermediate_size": 128, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 64,
           "mlp_only_layers": [0], "num_hidden_layers": 2}
    dense, sparse = q2.layer_scale_pairs(cfg, 0), q2.layer_scale_pairs(cfg, 1)
    assert [p.prev for p in dense] == ["input_layernorm", "self_attn.v_proj", "post_attention_layernorm", "mlp.up_proj"]
    norm = sparse[2]
    assert norm.prev == "post_attention_layernorm" and norm.passive == ("mlp.gate", "mlp.shared_expert_gate")
    assert norm.linears == ("mlp.experts.{e}.gate_proj", "mlp.experts.{e}.up_proj",
                            "mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj")
    assert [p.prev for p in sparse[3:]] == ["mlp.experts.{e}.up_proj", "mlp.shared_expert.up_proj"]
    assert q2.expert_names("mlp.experts.{e}.up_proj", cfg)[3] == "mlp.experts.3.up_proj"
    mx = by_name("mixtral")
    assert [p.prev for p in mx.moe.scale_pairs] == ["post_attention_layernorm", "block_sparse_moe.experts.{e}.w3"]


# -- (b) quantize -> read back; (c) better than RTN; (d) the manifest ---------------------------------


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_awq_moe_writes_what_it_propagated_and_beats_rtn(family, tiny_model_dir, calib_for, tmp_path):
    from compressed_tensors.compressors import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme

    model = tiny_model_dir(family)
    cal = calib_for(model)
    cfg = CheckpointReader(model).config
    arch = get_arch(cfg)
    E, layers = arch.num_experts(cfg), arch.num_layers(cfg)
    seen: dict[str, torch.Tensor] = {}
    with replaced(AWQMethod, "process_layer", keeping_outputs(AWQMethod, seen)):
        m = _awq(model, cal, tmp_path / "awq")
    ct = _awq(model, cal, tmp_path / "ct", format="compressed-tensors")
    assert m.status == ct.status == "complete"

    # per-expert 2D names on disk, routers dense and excluded from conversion
    with safe_open(tmp_path / "awq" / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    sparse = [i for i in range(layers) if arch.is_sparse_layer(cfg, i)]
    for i in sparse:
        for e in range(E):
            for j in range(3):
                assert f"{arch.layer_prefix(i)}{arch.expert_linear(e, j)}.qweight" in keys
        for g in arch.moe.never_quantized:
            assert f"{arch.layer_prefix(i)}{arch.disk_name(g.name)}.weight" in keys
    qc = json.loads((tmp_path / "awq" / "config.json").read_text())["quantization_config"]
    assert qc["modules_to_not_convert"] == [arch.layer_prefix(i) + arch.disk_name(g.name)
                                            for i in sparse for g in arch.moe.never_quantized]
    ignore = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]["ignore"]
    assert any(x.endswith(arch.disk_name("mlp.gate").replace(".", r"\.") + "$") for x in ignore)

    # the bytes are what the layer loop propagated: quantized experts, folded norms and routers
    a, b = open_model(tmp_path / "awq"), open_model(tmp_path / "ct")
    routers = [n for n in seen if n.endswith(arch.disk_name("mlp.gate") + ".weight")]
    assert len(routers) == len(sparse) and any("layernorm" in n for n in seen)
    for name, t in seen.items():
        assert torch.equal(a.get(name).float(), t), name
        assert torch.equal(b.get(name).float(), t), name  # one solve, two formats
    src = CheckpointReader(model)
    assert sum(not torch.equal(src.get(n).float(), seen[n]) for n in routers) >= 1  # the norm's scale reached them

    # transformers + compressed-tensors load our experts into their fused ones: our read-back's logits
    qcfg = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    scheme = QuantizationScheme(**qcfg["config_groups"]["group_0"])
    prefix = f"{arch.layer_prefix(sparse[-1])}{arch.expert_linear(1, 2)}"
    with safe_open(tmp_path / "ct" / "model.safetensors", "pt") as f:
        parts = {k.rsplit(".", 1)[1]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix + ".")}
    assert torch.equal(PackedQuantizationCompressor.decompress(parts, scheme)["weight"].float(), b.get(prefix + ".weight").float())
    # our read-back model runs: finite logits, not the fp model's
    with torch.no_grad():
        logits = load_dequantized_model(tmp_path / "awq")(IDS).logits
        assert torch.isfinite(logits).all() and not torch.equal(logits, hf_model(model)(IDS).logits)

    # (d) the manifest: every expert's tokens and how it was solved; every expert linear quantized
    for layer in m.metrics["layers"]:
        if layer["layer"] not in sparse:
            assert "moe" not in layer
            continue
        moe = layer["moe"]
        assert len(moe["seen"]) == E and sum(moe["seen"]) == moe["tokens"] * moe["top_k"]
        assert moe["solved"] == {"routed": E, "all": 0, "rtn": 0} and moe["fallback_experts"] == []
        for e in range(E):
            assert layer["awq_alpha"].keys() >= {arch.expert_linear(e, 1), "post_attention_layernorm"}
            for j in range(3):
                name = arch.expert_linear(e, j)
                assert math.isfinite(layer["rel_error"][name])
                assert layer["noclip_rel_error"][name] >= layer["rel_error"][name] - 1e-9  # clipping never hurt
        for prev, loss in layer["scale_loss"].items():
            assert loss <= layer["rtn_loss"][prev] * (1 + 1e-9), prev  # s = 1 is a candidate
    assert m.metrics["moe"]["sparse_layers"] == len(sparse)
    assert m.params["moe_calibration"] == "routed" and m.params["moe_fallback"] == "all"

    # (c) quality: lower KL to the fp model than RTN on the AWQ grid, on held-out text
    _rtn(model, cal, tmp_path / "rtn")
    windows, _ = eval_windows_from_dataset(model, "wikitext2-test", 64, 16)
    awq = evaluate_windows(tmp_path / "awq", windows, CPU, baseline=model)
    rtn = evaluate_windows(tmp_path / "rtn", windows, CPU, baseline=model)
    assert awq.kl < rtn.kl, f"{family}: AWQ KL {awq.kl:.3g} vs RTN {rtn.kl:.3g}"


def test_awq_beats_rtn_on_every_expert_that_saw_tokens(tiny_model_dir, calib_for, tmp_path):
    """Per expert, in the original basis: the output error of the quantized expert (its own gate,
    up and down, on the tokens routed to it in the fp model) is below RTN's on the AWQ grid."""
    from torch.nn import functional as F

    model = tiny_model_dir("qwen3_moe")
    cal = calib_for(model)
    _awq(model, cal, tmp_path / "awq")
    _rtn(model, cal, tmp_path / "rtn")
    src, q, r = hf_model(model), load_dequantized_model(tmp_path / "awq"), load_dequantized_model(tmp_path / "rtn")
    from quantize.calibration import load_calibration

    ids, _ = load_calibration(cal)
    inputs = {}
    experts = src.model.layers[1].mlp.experts
    h = experts.register_forward_pre_hook(lambda _m, a, k: inputs.update(x=a[0], idx=a[1]), with_kwargs=True)
    with torch.no_grad():
        src(ids.long())
    h.remove()
    better = 0
    for e in range(4):
        x = inputs["x"][(inputs["idx"] == e).any(-1)]
        assert x.shape[0] > 0

        def out(mod):
            g, u = F.linear(x, mod.gate_up_proj[e]).chunk(2, dim=-1)
            return F.linear(mod.act_fn(g) * u, mod.down_proj[e])

        with torch.no_grad():
            ref = out(experts)
            # AWQ's folded norm scales the expert's input: feed it the folded model's own input
            s = src.model.layers[1].post_attention_layernorm.weight / q.model.layers[1].post_attention_layernorm.weight
            xq = x / s
            g, u = F.linear(xq, q.model.layers[1].mlp.experts.gate_up_proj[e]).chunk(2, dim=-1)
            awq = F.linear(experts.act_fn(g) * u, q.model.layers[1].mlp.experts.down_proj[e])
            rtn = out(r.model.layers[1].mlp.experts)
        better += float((awq - ref).pow(2).sum()) < float((rtn - ref).pow(2).sum())
    assert better == 4


@pytest.fixture(scope="module")
def starved(tmp_path_factory):
    """A Qwen3-MoE whose layer-1 router is all zeros: two experts get every token, two none."""
    return tiny_model_edited("qwen3_moe", tmp_path_factory.mktemp("starved"),
                             {"model.layers.1.mlp.gate.weight": torch.zeros_like})


@pytest.mark.parametrize("fallback", ["all", "rtn"])
def test_unrouted_experts_take_the_declared_fallback(fallback, starved, calib_for, tmp_path):
    cal = calib_for(starved)
    m = _awq(starved, cal, tmp_path / "q", moe_fallback=fallback)
    layer = m.metrics["layers"][1]
    moe = layer["moe"]
    idle = [e for e, c in enumerate(moe["seen"]) if c == 0]
    assert len(idle) == 2 and moe["below_min"] == idle and moe["fallback_experts"] == idle
    assert moe["solved"] == {"routed": 2, "all": 2 if fallback == "all" else 0, "rtn": 2 if fallback == "rtn" else 0}
    assert m.metrics["moe"]["fallback_experts"] == {"1": idle}
    src, q = CheckpointReader(starved), open_model(tmp_path / "q")
    for e in range(4):
        for j in ("gate_proj", "up_proj", "down_proj"):
            name = f"model.layers.1.mlp.experts.{e}.{j}.weight"
            assert torch.isfinite(q.get(name).float()).all(), name
    if fallback == "rtn":
        # no scale (up -> down unscaled), no clip: the down projection is plain RTN of the original
        assert layer["unscaled_experts"] == idle
        for e in idle:
            name = f"model.layers.1.mlp.experts.{e}.down_proj.weight"
            spec = AWQMethod(A_params(), "float16").spec
            assert torch.equal(q.get(name).float(), A.awq_quantize(src.get(name).float(), spec).W_hat), name
            assert f"mlp.experts.{e}.down_proj" not in layer["noclip_rel_error"]
    else:  # all-token statistics: scaled and clipped like a routed expert
        assert layer["unscaled_experts"] == []
        assert all(f"mlp.experts.{e}.down_proj" in layer["noclip_rel_error"] for e in idle)


def A_params():
    from quantize.methods.awq_layer import AWQParams

    return AWQParams(group_size=32)


def test_lockstep_and_stopped_passes_give_the_same_bytes(tiny_model_dir, calib_for, tmp_path):
    from helpers import assert_same_files, output_files

    model = tiny_model_dir("qwen2_moe")
    cal = calib_for(model)
    quantize_awq(model_dir=model, calibration=cal, out=tmp_path / "a", group_size=32,
                 exec_cfg=dataclasses.replace(CPU, lockstep=True))
    quantize_awq(model_dir=model, calibration=cal, out=tmp_path / "b", group_size=32,
                 exec_cfg=dataclasses.replace(CPU, lockstep=False))
    assert_same_files(tmp_path / "a", tmp_path / "b", output_files(tmp_path / "a"))


def test_plan_bytes_match_a_written_awq_moe_checkpoint(tiny_model_dir, calib_for, tmp_path):
    from quantize.plan import Setting, plan, weight_bytes

    model = tiny_model_dir("qwen3_moe")  # no biases: the plan counts AWQ biases as fp16, this fp32 model keeps fp32
    _awq(model, calib_for(model), tmp_path / "q")
    cfg = CheckpointReader(model).config
    assert "awq" in {r["method"] for r in plan(cfg)["rows"]}
    with safe_open(tmp_path / "q" / "model.safetensors", "pt") as f:
        written = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())
    assert written == weight_bytes(cfg, Setting("awq", 4, 32), get_arch(cfg))["total"]


@pytest.mark.xfail(strict=True, raises=RuntimeError,
                   reason="transformers 5.x dequantizes compressed-tensors fused experts through a stand-in module "
                          "that carries weight_packed/weight_scale/weight_shape but no weight_zero_point, so every "
                          "asymmetric MoE checkpoint (AWQ's grid is asymmetric) fails to load: 'Asymmetric quant "
                          "requires zero-point values' (integrations/compressed_tensors.py); vLLM reads the layout")
def test_transformers_loads_asymmetric_moe_compressed_tensors(tiny_model_dir, calib_for, tmp_path):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    model = tiny_model_dir("qwen3_moe")
    _awq(model, calib_for(model), tmp_path / "ct", format="compressed-tensors")
    lib = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32,
                                               quantization_config=CompressedTensorsConfig(dequantize=True)).eval()
    with torch.no_grad():
        assert torch.equal(lib(IDS).logits, load_dequantized_model(tmp_path / "ct")(IDS).logits)


def test_check_reports_transformers_unsupported_for_asymmetric_moe_compressed_tensors(tiny_model_dir, calib_for,
                                                                                      tmp_path):
    """`quantize check`'s transformers engine says why (not a failed load) for the case above."""
    from quantize.check.runner import run_transformers

    model = tiny_model_dir("qwen3_moe")
    _awq(model, calib_for(model), tmp_path / "ct", format="compressed-tensors")
    status, reason, logits = run_transformers(tmp_path / "ct", [[5, 17, 300]])
    assert status == "unsupported" and "zero point" in reason and "vLLM" in reason and logits == []


def test_recipe_runs_awq_on_an_moe_model_with_its_settings(tiny_model_dir, tmp_path):
    """`quantize run --method awq` with a recipe's `moe:` section: the settings reach the stage."""
    from pathlib import Path

    from quantize import manifest as mf

    root = Path(__file__).resolve().parents[1]
    model = tiny_model_dir("qwen3_moe")
    args = ["run", str(root / "recipes/qwen3-30b-a3b.yaml"), "--method", "awq", "--format", "awq",
            "--out", str(tmp_path / "run"), "--set", f"source.model={model}", "--set", "calibration.samples=4",
            "--set", "calibration.seq_len=64", "--set", "eval.seq_len=64", "--set", "eval.max_windows=4",
            "--set", "group_size=32", "--set", "moe.fallback=rtn", "--set", "device=cpu"]
    assert main(args) == 0
    q = mf.load_manifest(tmp_path / "run" / "model")
    assert q.params["method"] == "awq" and q.params["moe_fallback"] == "rtn" and q.params["format"] == "awq"
    assert q.metrics["moe"]["sparse_layers"] == 2


def test_killed_and_resumed_run_gives_the_same_bytes(tiny_model_dir, calib_for, tmp_path):
    from helpers import assert_same_files, killed_at, output_files

    model = tiny_model_dir("deepseek_v3")  # a dense layer 0, a sparse layer 1
    cal = calib_for(model)
    a = _awq(model, cal, tmp_path / "a")
    with replaced(AWQMethod, "process_layer", killed_at(AWQMethod, 1)), pytest.raises(KeyboardInterrupt):
        _awq(model, cal, tmp_path / "b")
    b = _awq(model, cal, tmp_path / "b")
    assert_same_files(tmp_path / "a", tmp_path / "b", output_files(tmp_path / "a"))
    assert a.metrics["moe"] == b.metrics["moe"]


# -- (e) --expert-chunk: a sparse layer's experts in host memory, one at a time on the device ------------


def _chunked(k):
    return dataclasses.replace(CPU, expert_chunk=k)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_expert_chunks_give_the_same_bytes(family, tiny_model_dir, calib_for, tmp_path):
    """``--expert-chunk 1`` and ``3`` (experts kept in host memory; the forward runs them 1 or 3 at a
    time, the scale search, clip search and quantization one at a time) write every output file
    byte for byte as the run with the whole layer resident, with the same searched scales and
    coverage; the chunk is recorded in the run's params."""
    from helpers import assert_same_files, output_files

    model = tiny_model_dir(family)
    cal = calib_for(model)
    whole = quantize_awq(model_dir=model, calibration=cal, out=tmp_path / "whole", group_size=32, exec_cfg=CPU)
    files = output_files(tmp_path / "whole")
    assert any(f.endswith(".safetensors") for f in files) and "expert_chunk" not in whole.params
    for k in (1, 3):
        m = quantize_awq(model_dir=model, calibration=cal, out=tmp_path / f"chunk{k}", group_size=32,
                         exec_cfg=_chunked(k))
        assert m.status == "complete" and m.params["expert_chunk"] == k
        assert_same_files(tmp_path / "whole", tmp_path / f"chunk{k}", files)
        for a, b in zip(whole.metrics["layers"], m.metrics["layers"], strict=True):
            for key in ("awq_alpha", "scale_loss", "rel_error", "moe"):
                assert a.get(key) == b.get(key), (k, a["layer"], key)


def test_expert_chunk_holds_one_expert_on_the_device_at_a_time(tiny_model_dir, calib_for, tmp_path):
    """Every expert weight reaches the compute device through ``_expert_on_device``; counting the
    experts with a live copy there: with ``--expert-chunk 1`` never more than one (scale search, clip
    search, quantization), and every expert linear of every sparse layer went through it. The same
    count on the resident run sees every expert at once (the spy can tell)."""
    import weakref

    from quantize.methods import awq_layer as AL

    model = tiny_model_dir("qwen3_moe")
    cal = calib_for(model)
    cfg = CheckpointReader(model).config
    arch = get_arch(cfg)
    E = arch.num_experts(cfg)
    real = AL._expert_on_device

    def run(exec_cfg, out):
        live: dict[int, int] = {}
        state = {"peak": 0, "n": 0, "copy": set()}
        names = set()

        def spy(name, w, device, copy):
            t = real(name, w, device, copy)
            key = state["n"] = state["n"] + 1
            live[key] = arch.expert_slot(name)[0]
            weakref.finalize(t, live.pop, key, None)
            state["peak"] = max(state["peak"], len(set(live.values())))
            state["copy"].add(copy)
            names.add(name)
            return t

        with replaced(AL, "_expert_on_device", spy):
            quantize_awq(model_dir=model, calibration=cal, out=out, group_size=32, exec_cfg=exec_cfg)
        return state, names

    chunked, names = run(_chunked(1), tmp_path / "chunk")
    assert chunked["copy"] == {True} and chunked["peak"] == 1
    assert names == {arch.expert_linear(e, j) for e in range(E) for j in range(3)}
    resident, _ = run(CPU, tmp_path / "whole")
    assert resident["copy"] == {False} and resident["peak"] == E


def test_expert_chunk_with_bfloat16_reruns_gives_the_same_bytes(tiny_model_dir, calib_for, tmp_path):
    """``--rerun-dtype bfloat16`` re-runs a copy of the MoE block: with ``--expert-chunk`` the copy's
    experts get a chunked forward of their own (the copied one would read the layer's experts and
    score every candidate alike); the bytes are the resident run's."""
    from helpers import assert_same_files, output_files

    model = tiny_model_dir("mixtral")
    cal = calib_for(model)
    a = quantize_awq(model_dir=model, calibration=cal, out=tmp_path / "a", group_size=32, rerun_dtype="bfloat16",
                     exec_cfg=CPU)
    b = quantize_awq(model_dir=model, calibration=cal, out=tmp_path / "b", group_size=32, rerun_dtype="bfloat16",
                     exec_cfg=_chunked(2))
    assert_same_files(tmp_path / "a", tmp_path / "b", output_files(tmp_path / "a"))
    sparse = [x for x in a.metrics["layers"] if "moe" in x]
    assert sparse and [x["awq_alpha"] for x in a.metrics["layers"]] == [x["awq_alpha"] for x in b.metrics["layers"]]
    # the norm -> experts search chose a scale on its losses (not every candidate tied at the identity)
    assert any(x["awq_alpha"]["post_attention_layernorm"] is not None for x in sparse)


def test_cli_awq_accepts_expert_chunk(tiny_model_dir, calib_for, tmp_path, capsys):
    from quantize import manifest as mf

    model = tiny_model_dir("mixtral")
    out = tmp_path / "q"
    argv = ["awq", "--model", str(model), "--calibration", str(calib_for(model)), "--device", "cpu",
            "--group-size", "32", "--expert-chunk", "2", "--out", str(out)]
    assert main(argv) == 0
    assert "wrote" in capsys.readouterr().out
    m = mf.load_manifest(out)
    assert m.params["method"] == "awq" and m.params["expert_chunk"] == 2 and m.metrics["moe"]["sparse_layers"] >= 1
    assert main(["verify", str(out)]) == 0


# -- (f) bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, words", [
    (["awq", "--calibration", "{cal}", "--moe-min-tokens", "1.5"], ["--moe-min-tokens"]),
    (["awq", "--calibration", "{cal}", "--expert-chunk", "0"], ["--expert-chunk"]),
])
def test_bad_moe_input_exits_2_with_one_line(argv, words, tiny_model_dir, calib_for, tmp_path, capsys):
    model = tiny_model_dir("mixtral")
    cal = calib_for(model)
    out = tmp_path / "out"
    line = refused_in_one_line([a.format(cal=cal) for a in argv] + ["--model", str(model), "--out", str(out)], out, capsys)
    assert all(w in line for w in words), line
