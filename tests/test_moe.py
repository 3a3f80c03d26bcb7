"""Mixture-of-Experts models (Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V3) through the one layer loop.

Oracles: transformers itself (its in-memory fused experts and its forward), compressed-tensors' own
decompressor, and our RTN on the original weights for experts that fall back to it.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from quantize.arch import by_name, get_arch
from quantize.cli import cli, main
from quantize.executor import skeleton
from quantize.executor.moe import MoEOptions, Routing, expert_rows
from quantize.io.quantized import load_dequantized_model, open_model
from quantize.io.reader import CheckpointReader
from quantize.methods.grid import QuantSpec
from quantize.methods.rtn import rtn_quantize
from quantize.plan import parameter_counts, plan
from quantize.testing import MOE_FAMILIES

from helpers import CPU, assert_same_files, hf_model, output_files, refused_in_one_line, run_gptq
from helpers import layer_context, tiny_model_edited
from helpers import replaced as helpers_replaced

pytestmark = pytest.mark.usefixtures("one_thread")

LOCK = dataclasses.replace(CPU, lockstep=True)
MULTI = dataclasses.replace(CPU, lockstep=False)
IDS = torch.tensor([[5, 17, 300, 42, 7, 99, 512, 3, 64, 128, 900, 11]])



ROUTER_BIAS = {"e_score_correction_bias": lambda t: torch.tensor([0.3, -0.2, 0.1, 0.05])}  # 4 experts


@pytest.fixture(scope="module")
def deepseek_with_bias(tmp_path_factory):
    """A tiny DeepSeek-V3 whose router correction bias (a buffer on disk) is not zero."""
    return tiny_model_edited("deepseek_v3", tmp_path_factory.mktemp("ds"), ROUTER_BIAS)


def _model(family, tiny_model_dir, deepseek_with_bias):
    return deepseek_with_bias if family == "deepseek_v3" else tiny_model_dir(family)


# -- the architecture table ---------------------------------------------------------------------


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_table_names_every_tensor_of_the_checkpoint(family, tiny_model_dir):
    model = tiny_model_dir(family)
    r = CheckpointReader(model)
    arch = get_arch(r.config)
    assert set(arch.expected_tensor_names(r.config)) - {n for n in r.names() if "e_score" in n} == \
        {n for n in r.names() if "e_score" not in n}
    # quantizable: attention, dense MLP, shared and routed experts; never routers or gates
    for n in r.names():
        q = arch.is_quantizable(n)
        assert q == (n.endswith(".weight") and "norm" not in n and not n.endswith(("gate.weight", "embed_tokens.weight"))
                     and "lm_head" not in n and not n.endswith("shared_expert_gate.weight")), n


def test_dense_and_sparse_layers_follow_the_config():
    ds = by_name("deepseek_v3")
    cfg = {"n_routed_experts": 4, "first_k_dense_replace": 2}
    assert [ds.is_sparse_layer(cfg, i) for i in range(4)] == [False, False, True, True]
    q3 = by_name("qwen3_moe")
    cfg = {"num_experts": 4, "mlp_only_layers": [0], "decoder_sparse_step": 2}
    assert [q3.is_sparse_layer(cfg, i) for i in range(4)] == [False, True, False, True]
    assert q3.layer_groups(cfg, 0)[-1] == ["mlp.down_proj"]
    assert q3.layer_groups(cfg, 1)[-1] == ["mlp.experts"]
    mx = by_name("mixtral")
    assert mx.expert_linear(3, 1) == "block_sparse_moe.experts.3.w3"
    assert mx.expert_slot("block_sparse_moe.experts.3.w2") == (3, 2)
    assert mx.expert_slot("block_sparse_moe.gate") is None


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_memory_view_assembles_what_transformers_holds(family, tiny_model_dir):
    """Every in-memory parameter (fused 3D experts, renamed modules) equals transformers' own load."""
    model = tiny_model_dir(family)
    hf = hf_model(model)
    r = CheckpointReader(model)
    view = skeleton.MemoryView(r, get_arch(r.config))
    for name, p in hf.named_parameters():
        assert name in view, name
        assert tuple(view.shape(name)) == tuple(p.shape), name
        assert torch.equal(view.get(name), p.detach()), name
        buf = torch.empty(view.nbytes(name), dtype=torch.uint8)
        assert torch.equal(view.get(name, out=buf), p.detach()), name


@pytest.mark.parametrize("chunk", [None, 3], ids=["resident", "expert-chunk-3"])
@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_streamed_forward_equals_transformers(family, chunk, tiny_model_dir, deepseek_with_bias):
    """The layer loop runs the model's own routing: streamed logits equal transformers' forward,
    also with the experts kept in host memory and run 3 at a time (--expert-chunk)."""
    from quantize.eval.perplexity import final_logits

    model = _model(family, tiny_model_dir, deepseek_with_bias)
    with torch.no_grad():
        ref = hf_model(model)(IDS).logits
    ours = torch.cat(list(final_logits(model, IDS, dataclasses.replace(CPU, expert_chunk=chunk))))
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


# -- quantization --------------------------------------------------------------------------------


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_gptq_experts_into_both_formats(family, tiny_model_dir, deepseek_with_bias, calib_for, tmp_path):
    from compressed_tensors.compressors import PackedQuantizationCompressor

    model = _model(family, tiny_model_dir, deepseek_with_bias)
    cal = calib_for(model)
    arch = get_arch(CheckpointReader(model).config)
    gp = run_gptq(model, cal, tmp_path / "gptq", static_groups=True)
    run_gptq(model, cal, tmp_path / "ct", static_groups=True, format="compressed-tensors")
    # the same solve, two formats: identical dequantized weights; every expert linear quantized
    a, b = open_model(tmp_path / "gptq"), open_model(tmp_path / "ct")
    cfg = a.config
    n_experts = 0
    for i in range(arch.num_layers(cfg)):
        for lin in arch.layer_linears(cfg, i):
            name = arch.layer_prefix(i) + lin + ".weight"
            assert torch.equal(a.get(name), b.get(name)), name
            n_experts += arch.expert_slot(lin) is not None
    assert n_experts == 3 * 4 * sum(arch.is_sparse_layer(cfg, i) for i in range(arch.num_layers(cfg)))
    with safe_open(tmp_path / "gptq" / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert f"model.layers.1.{arch.expert_linear(3, 2)}.qweight" in keys
    assert f"model.layers.1.{arch.disk_name('mlp.gate')}.weight" in keys  # the router stays dense
    # compressed-tensors' decompressor (the oracle) returns our read-back for an expert
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert any(g.startswith("re:") and g.endswith(arch.disk_name("mlp.gate").replace(".", r"\.") + "$")
               for g in qc["ignore"])
    from compressed_tensors.quantization import QuantizationScheme

    scheme = QuantizationScheme(**{**qc["config_groups"]["group_0"]})
    prefix = f"model.layers.1.{arch.expert_linear(2, 0)}"
    with safe_open(tmp_path / "ct" / "model.safetensors", "pt") as f:
        tensors = {k.rsplit(".", 1)[1]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix + ".")}
    lib = PackedQuantizationCompressor.decompress(tensors, scheme)["weight"].float()
    assert torch.equal(lib, b.get(prefix + ".weight").float())
    # transformers + compressed-tensors load the checkpoint into their fused experts: the same
    # weights as our read-back (quantized: not the source's), the same logits
    lib_model, ours, src = hf_model(tmp_path / "ct"), load_dequantized_model(tmp_path / "ct"), hf_model(model)
    sparse = next(i for i in range(arch.num_layers(cfg)) if arch.is_sparse_layer(cfg, i))
    for fused in arch.moe.experts.fused:
        got = getattr(lib_model.model.layers[sparse].mlp.experts, fused)
        assert torch.equal(got, getattr(ours.model.layers[sparse].mlp.experts, fused)), fused
        assert not torch.equal(got, getattr(src.model.layers[sparse].mlp.experts, fused)), fused
    with torch.no_grad():
        assert torch.equal(lib_model(IDS).logits, ours(IDS).logits)
    # coverage: each token is routed to exactly top_k distinct experts
    for m in gp.metrics["layers"]:
        if "moe" in m:
            assert sum(m["moe"]["seen"]) == m["moe"]["tokens"] * m["moe"]["top_k"]
            assert m["moe"]["solved"]["routed"] == 4
    assert gp.metrics["moe"]["sparse_layers"] == sum(arch.is_sparse_layer(cfg, i) for i in range(arch.num_layers(cfg)))
    assert gp.params["moe_calibration"] == "routed"


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3"])  # shared experts before / after the routed ones
def test_lockstep_equals_stopped_passes(family, tiny_model_dir, calib_for, tmp_path):
    """One paused forward per layer and one stopped pass per group give the same bytes: the experts'
    statistics and the propagation through the quantized experts do not depend on the schedule."""
    model = tiny_model_dir(family)
    cal = calib_for(model)
    run_gptq(model, cal, tmp_path / "lock", exec_cfg=LOCK)
    run_gptq(model, cal, tmp_path / "multi", exec_cfg=MULTI)
    assert_same_files(tmp_path / "lock", tmp_path / "multi", output_files(tmp_path / "lock"))


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3"])
def test_expert_chunks_give_the_same_bytes(family, tiny_model_dir, calib_for, tmp_path):
    """Experts in host memory, 3 at a time on the device: the same solve and the same outputs as the
    whole layer resident (CPU fp32), in lock-step or not; the plan's device figure shrinks with it."""
    from quantize.plan import run_memory

    model = tiny_model_dir(family)
    cal = calib_for(model)
    run_gptq(model, cal, tmp_path / "whole", exec_cfg=LOCK)
    m = run_gptq(model, cal, tmp_path / "chunk", exec_cfg=dataclasses.replace(LOCK, expert_chunk=3))
    run_gptq(model, cal, tmp_path / "chunk-multi", exec_cfg=dataclasses.replace(MULTI, expert_chunk=3))
    assert m.params["expert_chunk"] == 3
    a, b, c = open_model(tmp_path / "whole"), open_model(tmp_path / "chunk"), open_model(tmp_path / "chunk-multi")
    for n in a.names():
        assert torch.equal(a.get(n), b.get(n)) and torch.equal(b.get(n), c.get(n)), n
    cfg = CheckpointReader(model).config
    full, one, all4 = (run_memory(cfg, expert_chunk=k) for k in (None, 1, 4))
    assert full["device_layer_bytes_max"] == all4["device_layer_bytes_max"] == full["layer_bytes_max"]
    assert one["device_layer_bytes_max"] < full["device_layer_bytes_max"]


@pytest.fixture(scope="module")
def starved(tmp_path_factory):
    """A Qwen3-MoE whose layer-1 router is all zeros: every token ties, top-k keeps the same two
    experts, and the other two are never routed to."""
    return tiny_model_edited("qwen3_moe", tmp_path_factory.mktemp("starved"),
                             {"model.layers.1.mlp.gate.weight": torch.zeros_like})


def test_unrouted_experts_fall_back_and_are_listed(starved, calib_for, tmp_path):
    cal = calib_for(starved)
    out = run_gptq(starved, cal, tmp_path / "all", group_size=32, static_groups=True)
    moe = out.metrics["layers"][1]["moe"]
    idle = [e for e, c in enumerate(moe["seen"]) if c == 0]
    assert len(idle) == 2 and sorted(moe["seen"])[2:] == [moe["tokens"]] * 2
    assert moe["below_min"] == idle and moe["fallback_experts"] == idle
    assert moe["solved"] == {"routed": 2, "all": 2, "rtn": 0}
    assert out.metrics["moe"]["fallback_experts"] == {"1": idle}
    rtn = run_gptq(starved, cal, tmp_path / "rtn", group_size=32, static_groups=True, moe_fallback="rtn")
    assert rtn.metrics["layers"][1]["moe"]["solved"] == {"routed": 2, "all": 0, "rtn": 2}
    # the RTN fallback is exactly RTN of the original weights (scales stored in fp16); the
    # all-token fallback is a GPTQ solve, finite and different
    src, q_rtn, q_all = CheckpointReader(starved), open_model(tmp_path / "rtn"), open_model(tmp_path / "all")
    from quantize.commands.gptq import DEFAULT_GRID, grid_flags, resolve_grid

    # on the GPTQ run's grid (--grid auto at 4 bits: full-range with MSE clipping)
    spec = QuantSpec(bits=4, group_size=32, sym=True, scale_dtype="float16",
                     **grid_flags(resolve_grid(DEFAULT_GRID, 4, rtn=False)))
    for e in idle:
        for j in ("gate_proj", "up_proj", "down_proj"):
            name = f"model.layers.1.mlp.experts.{e}.{j}.weight"
            ref = rtn_quantize(src.get(name).float(), spec).W_hat
            assert torch.isfinite(q_all.get(name).float()).all()
            assert torch.equal(q_rtn.get(name).float(), ref.float()), name
            assert not torch.equal(q_all.get(name), q_rtn.get(name))
    # the routed experts do not depend on the choice of fallback
    busy = next(e for e in range(4) if e not in idle)
    name = f"model.layers.1.mlp.experts.{busy}.gate_proj.weight"
    assert torch.equal(q_all.get(name), q_rtn.get(name))


@pytest.mark.parametrize("mode, fallback", [("routed", "all"), ("routed", "rtn"), ("all", "all")])
def test_batched_expert_solves_give_the_bytes_of_one_expert_at_a_time(mode, fallback, starved, calib_for, tmp_path,
                                                                     monkeypatch):
    """The experts of a layer solved in one batch give the same bytes and manifest metrics as one
    expert per solve (``BATCH_SOLVE_BYTES`` below one expert's), starved experts and their
    fallback included."""
    from quantize.executor import moe

    cal = calib_for(starved)
    kw = dict(group_size=32, moe_calibration=mode, moe_fallback=fallback)
    batched = run_gptq(starved, cal, tmp_path / "batched", **kw)
    monkeypatch.setattr(moe, "BATCH_SOLVE_BYTES", 1)
    one = run_gptq(starved, cal, tmp_path / "one", **kw)
    assert_same_files(tmp_path / "batched", tmp_path / "one", output_files(tmp_path / "batched"))
    for a, b in zip(batched.metrics["layers"], one.metrics["layers"], strict=True):
        for key in ("rel_error", "rtn_rel_error", "damp_used", "moe"):
            assert a[key] == b[key], key


def test_all_token_statistics(tiny_model_dir, calib_for, tmp_path):
    model = tiny_model_dir("qwen3_moe")
    cal = calib_for(model)
    routed = run_gptq(model, cal, tmp_path / "routed")
    every = run_gptq(model, cal, tmp_path / "all", moe_calibration="all")
    assert every.metrics["layers"][1]["moe"]["solved"] == {"routed": 0, "all": 4, "rtn": 0}
    name = "model.layers.1.mlp.experts.1.gate_proj.weight"
    assert not torch.equal(open_model(tmp_path / "routed").get(name), open_model(tmp_path / "all").get(name))
    assert routed.params["moe_calibration"] == "routed" and every.params["moe_calibration"] == "all"


def test_expert_rows_ignore_padding_ids_and_select_what_a_mask_selects():
    idx = torch.tensor([[0, 1], [1, 2], [2, 4], [3, 1]])  # 4: out of range (a padding id)
    assert [r.tolist() for r in expert_rows(idx, 4)] == [[0], [0, 1, 3], [1, 2], [3]]
    x = torch.randn(4, 3)
    rt = Routing.of([(x, idx), (x + 1, idx.flip(0))], 4, MoEOptions())
    assert rt.counts.tolist() == [2, 6, 4, 2]
    for e in range(4):
        assert torch.equal(rt.routed(e), torch.cat([x[(idx == e).any(-1)], (x + 1)[(idx.flip(0) == e).any(-1)]]))


def test_bad_moe_options_exit_2():
    with pytest.raises(Exception, match="--moe-min-tokens"):
        MoEOptions(min_tokens=1.5)


@pytest.mark.parametrize("argv", [
    ["exl2", "--calibration", "{cal}", "--bpw", "4"],  # a family exllamav2 does not load (tests/test_exl2_moe.py)
])
def test_methods_without_experts_refuse_with_exit_2(argv, tiny_model_dir, calib_for, tmp_path, capsys):
    model = tiny_model_dir("qwen2_moe")
    cal = calib_for(model)
    out = tmp_path / "out"
    line = refused_in_one_line([a.format(cal=cal) for a in argv] + ["--model", str(model), "--out", str(out)], out, capsys)
    assert "Mixture-of-Experts" in line and "quantize gptq" in line, line


def test_inspect_shows_coverage(starved, calib_for, tmp_path):
    cal = calib_for(starved)
    run_gptq(starved, cal, tmp_path / "q", group_size=32)
    res = CliRunner().invoke(cli, ["inspect", str(tmp_path / "q")])
    assert res.exit_code == 0
    assert "2 sparse layers x 4 experts (top-2)" in res.output
    assert "min 0 (layer 1 expert " in res.output
    assert "fallback     2 experts: layer 1: " in res.output


# -- plan ----------------------------------------------------------------------------------------


def test_plan_counts_total_and_active_parameters(tiny_model_dir):
    """The published totals of real MoE models (config.json only), and exact counts on tiny ones
    (every value the checkpoint holds: DeepSeek's ``e_score_correction_bias`` buffer too)."""
    from pathlib import Path

    configs = Path(__file__).resolve().parents[1] / "recipes" / "configs"
    published = {"qwen3-30b-a3b": (30.5e9, 3.3e9), "mixtral-8x7b": (46.7e9, 12.9e9), "deepseek-v3": (671e9, 37e9)}
    for name, (total, active) in published.items():
        n = parameter_counts(json.loads((configs / f"{name}.json").read_text()))
        assert abs(n["total"] - total) / total < 0.01 and abs(n["active"] - active) / active < 0.02, (name, n)
    for family in MOE_FAMILIES:
        model = tiny_model_dir(family)
        hf = hf_model(model)
        cfg = CheckpointReader(model).config
        sd = hf.state_dict()  # parameters and the persistent buffers the checkpoint carries (DeepSeek's router bias)
        on_disk = sum(p.numel() for p in hf.parameters()) + sum(b.numel() for n, b in hf.named_buffers() if n in sd)
        assert parameter_counts(cfg)["total"] == on_disk, family
        p = plan(cfg)
        from quantize.plan import MOE_METHODS

        assert {r["method"] for r in p["rows"]} <= set(MOE_METHODS)  # only what `quantize` writes for MoE


def test_plan_bytes_match_a_written_moe_checkpoint(tiny_model_dir, calib_for, tmp_path):
    from quantize.plan import Setting, weight_bytes

    model = tiny_model_dir("qwen2_moe")
    run_gptq(model, calib_for(model), tmp_path / "ct", static_groups=True, format="compressed-tensors", group_size=32)
    cfg = CheckpointReader(model).config
    predicted = weight_bytes(cfg, Setting("ct", 4, 32), get_arch(cfg))["total"]
    with safe_open(tmp_path / "ct" / "model.safetensors", "pt") as f:
        written = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())
    assert written == predicted


def test_dequantized_moe_model_loads_whole(tiny_model_dir, calib_for, tmp_path):
    model = tiny_model_dir("mixtral")
    run_gptq(model, calib_for(model), tmp_path / "q")
    q = load_dequantized_model(tmp_path / "q")
    with torch.no_grad():
        a, b = hf_model(model)(IDS).logits, q(IDS).logits
    assert torch.isfinite(b).all() and not torch.equal(a, b)
    kl = torch.nn.functional.kl_div(b.log_softmax(-1), a.log_softmax(-1), log_target=True, reduction="batchmean")
    assert kl < 0.05
    shutil.rmtree(tmp_path / "q")


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_layer_groups_match_the_model_and_its_execution_order(family, tiny_model_dir):
    """Per layer: the table's linears are the model's nn.Linear modules (routers and shared-expert
    gates aside), with their shapes and biases; the fused experts have the per-expert shapes; the
    groups run in the declared order, and the linears of a group read one input."""
    from torch import nn

    model = tiny_model_dir(family)
    hf = hf_model(model)
    cfg = CheckpointReader(model).config
    arch = get_arch(cfg)
    E = arch.num_experts(cfg)
    for i, layer in enumerate(hf.model.layers):
        table = [n for n in arch.layer_linears(cfg, i) if arch.expert_slot(n) is None]
        gates = {m.name for m in arch.moe.never_quantized}
        actual = {n for n, m in layer.named_modules() if isinstance(m, nn.Linear)} - gates
        assert sorted(table) == sorted(actual), i
        for n in table:
            lin = layer.get_submodule(n)
            assert tuple(lin.weight.shape) == arch.linear_shape(n, cfg) and (lin.bias is not None) == arch.has_bias(n, cfg)
        if arch.is_sparse_layer(cfg, i):
            ex = layer.get_submodule(arch.moe.experts.module)
            (gN, gK), (dN, dK) = arch.linear_shape(arch.expert_linear(0, 0), cfg), arch.linear_shape(arch.expert_linear(0, 2), cfg)
            assert tuple(getattr(ex, arch.moe.experts.fused[0]).shape) == (E, 2 * gN, gK)
            assert tuple(getattr(ex, arch.moe.experts.fused[1]).shape) == (E, dN, dK)
    # execution order of the groups' first modules (the pause points of the lock-step loop)
    i = next(i for i in range(len(hf.model.layers)) if arch.is_sparse_layer(cfg, i))
    layer, groups = hf.model.layers[i], arch.layer_groups(cfg, i)
    seen: list[tuple[str, torch.Tensor]] = []
    hooks = [layer.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: seen.append((n, a[0])))
             for g in groups for n in g]
    with torch.no_grad():
        hf(IDS)
    for h in hooks:
        h.remove()
    order = [n for n, _ in seen]
    firsts = [g[0] for g in groups]
    assert [n for n in order if n in firsts] == firsts
    inputs = dict(seen)
    for g in groups:
        for n in g[1:]:
            assert torch.equal(inputs[g[0]], inputs[n]), n


def test_recipe_runs_an_moe_model_with_its_settings(tiny_model_dir, tmp_path):
    """`quantize run` with a recipe's `moe:` section: sample -> gptq (compressed-tensors) -> eval,
    the settings recorded in the quantize stage's manifest; rerun skips every stage."""
    from pathlib import Path

    from quantize import manifest as mf

    root = Path(__file__).resolve().parents[1]
    model = tiny_model_dir("qwen3_moe")
    args = ["run", str(root / "recipes/qwen3-30b-a3b.yaml"), "--out", str(tmp_path / "run"),
            "--set", f"source.model={model}", "--set", "calibration.samples=4", "--set", "calibration.seq_len=64",
            "--set", "eval.seq_len=64", "--set", "eval.max_windows=4", "--set", "group_size=32",
            "--set", "moe.calibration=all", "--set", "device=cpu"]
    assert main(args) == 0
    q = mf.load_manifest(tmp_path / "run" / "model")
    assert q.params["moe_calibration"] == "all" and q.params["format"] == "compressed-tensors"
    assert q.metrics["moe"]["solved"]["all"] == 2 * 4
    assert [s["stage"] for s in mf.load_manifest(tmp_path / "run").metrics["stages"]] == ["sample", "gptq", "eval"]
    assert main(args) == 0  # everything done: skipped
    assert mf.load_manifest(tmp_path / "run" / "model").created == q.created


# -- merge: PEFT LoRA on MoE models --------------------------------------------------------------


def _moe_adapter(base, out, seed=0):
    """A PEFT LoRA on attention (target_modules) and on the fused experts (target_parameters),
    random factors; returns the PeftModel's logits on IDS."""
    import peft

    model = hf_model(base)
    have = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}  # DeepSeek: MLA, with or without q_lora
    attn = ["q_a_proj", "o_proj"] if "q_a_proj" in have else ["q_proj", "v_proj"] if "v_proj" in have else ["q_proj", "o_proj"]
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=attn,
                          target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    p = peft.get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, t in p.named_parameters():
            if "lora_" in n:
                t.copy_(0.2 * torch.randn(t.shape, generator=g))
        logits = p(IDS).logits
    p.save_pretrained(out)
    return logits


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_merge_lora_on_attention_and_fused_experts_is_exact(family, tiny_model_dir, tmp_path):
    """PEFT's ParamWrapper LoRA on fused experts merges, per expert, into the 2D expert tensors: the
    merged model computes what the PeftModel computes."""
    base = tiny_model_dir(family)
    peft_logits = _moe_adapter(base, tmp_path / "adapter")
    assert main(["merge", "lora", "--base", str(base), "--adapter", str(tmp_path / "adapter"),
                 "--out", str(tmp_path / "merged")]) == 0
    with torch.no_grad():
        merged, plain = hf_model(tmp_path / "merged")(IDS).logits, hf_model(base)(IDS).logits
    torch.testing.assert_close(merged, peft_logits, rtol=1e-5, atol=1e-5)
    assert (plain - peft_logits).abs().max() > 100 * (merged - peft_logits).abs().max()
    cfg = CheckpointReader(base).config
    arch = get_arch(cfg)
    sparse = sum(arch.is_sparse_layer(cfg, i) for i in range(arch.num_layers(cfg)))
    from quantize import manifest as mf

    m = mf.load_manifest(tmp_path / "merged")
    assert m.metrics["tensors_modified"] == 2 * arch.num_layers(cfg) + sparse * 4 * 3, m.metrics


def test_expert_lora_on_another_base_exits_2(tiny_model_dir, tmp_path, capsys):
    base = tiny_model_dir("qwen3_moe")
    _moe_adapter(base, tmp_path / "adapter")
    other = tiny_model_dir("qwen3_moe", num_experts=8)  # same widths, twice the experts
    rc = main(["merge", "lora", "--base", str(other), "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "o")])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("!!")]
    assert rc == 2 and len(err) == 1 and "experts" in err[0], err
    assert not (tmp_path / "o").exists()


def test_adapter_on_a_router_is_refused(tiny_model_dir, tmp_path, capsys):
    import peft

    base = tiny_model_dir("qwen2_moe")
    p = peft.get_peft_model(hf_model(base), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "shared_expert_gate"]))
    p.save_pretrained(tmp_path / "adapter")
    rc = main(["merge", "lora", "--base", str(base), "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "o")])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("!!")]
    assert rc == 2 and len(err) == 1 and "shared_expert_gate" in err[0] and "router" in err[0], err
    assert not (tmp_path / "o").exists()


def test_an_moe_family_not_in_the_table_exits_2_listing_the_supported(tmp_path, capsys):
    import transformers as T

    cfg = T.OlmoeConfig(vocab_size=1024, hidden_size=64, intermediate_size=32, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2)
    T.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "olmoe")
    rc = main(["plan", "--model", str(tmp_path / "olmoe")])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("!!")]
    assert rc == 2 and len(err) == 1 and "OlmoeForCausalLM" in err[0], err
    assert all(f in err[0] for f in ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "gpt_oss", "llama4_text"))


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_gptq_beats_rtn_on_every_expert_that_saw_tokens(family, tiny_model_dir, calib_for, tmp_path):
    model = tiny_model_dir(family)
    m = run_gptq(model, calib_for(model), tmp_path / "q", static_groups=True)
    checked = 0
    for layer in m.metrics["layers"]:
        if "moe" not in layer:
            continue
        for name, err in layer["rel_error"].items():
            slot = get_arch(CheckpointReader(model).config).expert_slot(name)
            if slot is not None and layer["moe"]["seen"][slot[0]] > 0:
                assert err < layer["rtn_rel_error"][name], (layer["layer"], name)
                checked += 1
    assert checked > 0


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_expert_hessians_equal_brute_force_from_the_eager_expert_loop(family, tiny_model_dir, calib_for):
    """Every expert's gate/up and down Hessians, as the layer loop builds them, equal 2/n XᵀX of the
    inputs transformers' own eager expert loop feeds that expert's matrices (F.linear intercepted)."""
    from torch.nn import functional as F

    from quantize.calibration import load_calibration

    model = tiny_model_dir(family)
    ids = load_calibration(calib_for(model))[0][:4]
    reader = CheckpointReader(model)
    arch = get_arch(reader.config)
    sparse = next(i for i in range(arch.num_layers(reader.config)) if arch.is_sparse_layer(reader.config, i))
    # ours: the layer loop up to the first sparse layer, then its experts' statistics, weights untouched
    ctx = layer_context(model, calib_for(model), sparse, samples=4)
    ours: dict[tuple[str, ...], torch.Tensor] = {}
    names = [g[0] for g in ctx.groups]
    ctx.sequential(names, lambda *_: None, lambda _n: None,
                   experts=lambda jobs: ours.update((tuple(lins), H.double()) for lins, H in jobs),
                   moe=MoEOptions(min_tokens=0.0))
    # brute force: the eager expert loop of transformers, every F.linear call on an expert's matrix
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32, experts_implementation="eager").eval()
    experts = hf.model.layers[sparse].get_submodule(arch.moe.experts.module)
    gu, dn = (getattr(experts, f) for f in arch.moe.experts.fused)
    E = gu.shape[0]
    seen: dict[tuple[str, int], list[torch.Tensor]] = {}
    linear = F.linear

    def spy(x, w, *a, **k):
        for kind, fused in (("gu", gu), ("dn", dn)):
            for e in range(E):
                if w.data_ptr() == fused[e].data_ptr() and w.shape == fused[e].shape:
                    seen.setdefault((kind, e), []).append(x.detach().reshape(-1, x.shape[-1]).double())
        return linear(x, w, *a, **k)

    with helpers_replaced(F, "linear", spy), torch.no_grad():
        hf(ids.long())
    assert len(ours) == 2 * E
    for e in range(E):
        for kind, j in (("gu", 0), ("dn", 2)):
            X = torch.cat(seen[(kind, e)])
            brute = 2.0 / X.shape[0] * X.T @ X
            key = tuple(arch.expert_linear(e, k) for k in ((0, 1) if j == 0 else (2,)))
            torch.testing.assert_close(ours[key], brute, rtol=1e-4, atol=1e-6)


def test_fallback_down_statistic_is_an_even_sample_of_every_token(starved, calib_for, monkeypatch):
    """An expert under ``--moe-min-tokens`` solved by the all-token fallback: gate/up from the layer's
    all-token Hessian, down from ``max(FALLBACK_ROWS, 4 x width)`` evenly spaced tokens through its
    gate/up (brute force from the experts module's input in transformers' eager forward), and the
    record says how many; a routed expert's statistics are untouched."""
    from torch.nn import functional as F

    from quantize.calibration import load_calibration
    from quantize.executor import moe
    from quantize.executor.moe import coverage_lines, coverage_summary

    monkeypatch.setattr(moe, "FALLBACK_ROWS", 1)  # the floor: 4 x the down width (32) = 128 of 256 tokens
    cal = calib_for(starved)
    ctx = layer_context(starved, cal, 1, samples=4)
    ours: dict[tuple[str, ...], torch.Tensor] = {}
    names = [g[0] for g in ctx.groups]
    ctx.sequential(names, lambda *_: None, lambda _n: None,
                   experts=lambda jobs: ours.update((tuple(lins), H.double()) for lins, H in jobs), moe=MoEOptions())
    rec = ctx.extra_metrics["moe"]
    idle = rec["fallback_experts"]
    assert len(idle) == 2 and rec["tokens"] == 256 and rec["fallback_down_tokens"] == 128
    assert coverage_summary([{"layer": 1, "moe": rec}])["fallback_down_tokens"] == 128
    assert "even sample of at most 128 tokens" in "\n".join(coverage_lines(coverage_summary([{"layer": 1, "moe": rec}])))

    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(starved, dtype=torch.float32, experts_implementation="eager").eval()
    experts = hf.model.layers[1].mlp.experts
    seen: list[torch.Tensor] = []
    experts.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        hf(load_calibration(cal)[0][:4].long())
    X = torch.cat(seen).double()
    assert X.shape[0] == 256
    sample = X[torch.linspace(0, 255, 128).round().long()]
    arch = ctx.arch
    for e in idle:
        g, u = F.linear(sample, experts.gate_up_proj[e].double()).chunk(2, dim=-1)
        h = F.silu(g) * u
        down = ours[(arch.expert_linear(e, 2),)]
        torch.testing.assert_close(down, 2.0 / 128 * h.T @ h, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(ours[(arch.expert_linear(e, 0), arch.expert_linear(e, 1))], 2.0 / 256 * X.T @ X,
                                   rtol=1e-4, atol=1e-6)
        g_all, u_all = F.linear(X, experts.gate_up_proj[e].double()).chunk(2, dim=-1)
        h_all = F.silu(g_all) * u_all
        assert not torch.allclose(down, 2.0 / 256 * h_all.T @ h_all, rtol=1e-3)  # a sample, not every token
