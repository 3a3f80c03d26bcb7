"""Llama-4 text (``Llama4ForCausalLM``): experts 3D on disk, transposed, gate/up concatenated, the
router's sigmoid score multiplying each expert's INPUT, a shared expert, dense and sparse layers
(``moe_layers``), through the one layer loop (``quantize gptq`` / ``quantize rtn`` into GPTQ and
compressed-tensors).

Oracles: transformers itself (its in-memory experts, its batched expert matmuls, its forward, and
its compressed-tensors loader, which takes per-expert linears for Llama-4), the compressed-tensors
decompressor, and RTN on the source weights.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from quantize.arch import get_arch
from quantize.cli import cli
from quantize.executor import skeleton
from quantize.executor.moe import MoEOptions, expert_view
from quantize.io.quantized import load_dequantized_model, open_model
from quantize.io.reader import CheckpointReader
from quantize.testing import FUSED_MOE_FAMILIES, build_tiny_model

from helpers import (
    CPU, assert_same_files, hf_model, output_files, refused_in_one_line, replaced, rtn_ct_and_gptq_outputs, run_gptq,
    layer_context, tiny_model_edited,
)

pytestmark = pytest.mark.usefixtures("one_thread")

LOCK = dataclasses.replace(CPU, lockstep=True)
MULTI = dataclasses.replace(CPU, lockstep=False)
# 21 tokens: more than one 16-token attention chunk
IDS = torch.tensor([[5, 17, 300, 42, 7, 99, 512, 3, 64, 128, 900, 11, 5, 17, 300, 42, 7, 99, 512, 3, 64]])
SPARSE = 1  # the tiny model's moe_layers



@pytest.fixture(scope="module")
def llama4(tmp_path_factory):
    return build_tiny_model("llama4_text", tmp_path_factory.mktemp("llama4"))


@pytest.fixture(scope="module")
def outputs(llama4, calib_for, tmp_path_factory):
    root = tmp_path_factory.mktemp("llama4-out")
    m = rtn_ct_and_gptq_outputs(llama4, calib_for(llama4), root)
    return root, m


# -- the architecture table ---------------------------------------------------------------------


def test_table_names_every_tensor_of_the_checkpoint(llama4):
    r = CheckpointReader(llama4)
    arch = get_arch(r.config)
    assert arch.name == "llama4_text" and "llama4_text" in FUSED_MOE_FAMILIES
    assert [arch.is_sparse_layer(r.config, i) for i in range(2)] == [False, True]
    assert set(arch.expected_tensor_names(r.config)) == set(r.names())
    assert arch.layer_groups(r.config, 0)[2] == ["feed_forward.gate_proj", "feed_forward.up_proj"]
    assert arch.layer_groups(r.config, 1)[2:] == [["feed_forward.experts"],
                                                  ["feed_forward.shared_expert.gate_proj", "feed_forward.shared_expert.up_proj"],
                                                  ["feed_forward.shared_expert.down_proj"]]
    assert arch.linear_shape("feed_forward.down_proj", r.config) == (64, 128)
    assert arch.linear_shape("feed_forward.experts.3.gate_proj", r.config) == (32, 64)


def test_expert_views_are_what_transformers_holds(llama4):
    """gate = gate_up_proj[e][:, :I]ᵀ, up = [:, I:]ᵀ, down = down_proj[e]ᵀ (transposed, concatenated)."""
    hf = hf_model(llama4)
    r = CheckpointReader(llama4)
    arch = get_arch(r.config)
    view = skeleton.MemoryView(r, arch)
    for name, p in hf.named_parameters():
        assert name in view and torch.equal(view.get(name), p.detach()), name
    experts = hf.model.layers[SPARSE].feed_forward.experts
    for e in range(4):
        assert torch.equal(expert_view(experts, arch.moe.experts, e, 0), experts.gate_up_proj[e][:, :32].T)
        assert torch.equal(expert_view(experts, arch.moe.experts, e, 1), experts.gate_up_proj[e][:, 32:].T)
        assert torch.equal(expert_view(experts, arch.moe.experts, e, 2), experts.down_proj[e].T)


@pytest.mark.parametrize("chunk", [None, 3], ids=["resident", "expert-chunk-3"])
def test_streamed_forward_equals_transformers(llama4, chunk):
    from quantize.eval.perplexity import final_logits

    with torch.no_grad():
        ref = hf_model(llama4)(IDS).logits
    ours = torch.cat(list(final_logits(llama4, IDS, dataclasses.replace(CPU, expert_chunk=chunk))))
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


# -- 1. statistics ---------------------------------------------------------------------------------


def test_expert_hessians_equal_brute_force_from_the_batched_expert_matmuls(llama4, calib_for):
    """Every expert's gate/up and down Hessians equal 2/n XᵀX of the rows transformers' expert
    matmuls (``torch.bmm`` over every expert's copy of the tokens) give that expert for the tokens
    its router picked: the inputs already scaled by the routing score."""
    from quantize.calibration import load_calibration

    ids = load_calibration(calib_for(llama4))[0][:4]
    ctx = layer_context(llama4, calib_for(llama4), SPARSE, samples=4)
    ours: dict[tuple[str, ...], torch.Tensor] = {}
    ctx.sequential([g[0] for g in ctx.groups], lambda *_: None, lambda _n: None,
                   experts=lambda jobs: ours.update((tuple(lins), H.double()) for lins, H in jobs),
                   moe=MoEOptions(min_tokens=0.0))
    hf = hf_model(llama4)
    moe = hf.model.layers[SPARSE].feed_forward
    gu, dn = moe.experts.gate_up_proj, moe.experts.down_proj
    routed: list[torch.Tensor] = []
    moe.router.register_forward_hook(lambda _m, _a, out: routed.append(torch.topk(out[1], 1, dim=-1).indices))
    plain: list[torch.Tensor] = []  # the MoE block's input, before the score scales it
    moe.register_forward_pre_hook(lambda _m, args: plain.append(args[0].reshape(-1, args[0].shape[-1]).double()))
    seen: dict[str, list[torch.Tensor]] = {"gu": [], "dn": []}
    bmm = torch.bmm

    def spy(x, w, *a, **k):
        for kind, fused in (("gu", gu), ("dn", dn)):
            if w.data_ptr() == fused.data_ptr():
                seen[kind].append(x.detach().double())
        return bmm(x, w, *a, **k)

    with replaced(torch, "bmm", spy), torch.no_grad():
        hf(ids.long())
    assert len(ours) == 2 * 4 and len(seen["gu"]) == len(routed) == 1
    idx = routed[0]
    for e in range(4):
        mine = (idx == e).any(-1)
        for kind, lins in (("gu", ("gate_proj", "up_proj")), ("dn", ("down_proj",))):
            X = seen[kind][0][e][mine]
            brute = 2.0 / X.shape[0] * X.T @ X
            torch.testing.assert_close(ours[tuple(f"feed_forward.experts.{e}.{n}" for n in lins)], brute,
                                       rtol=1e-4, atol=1e-6)
        # the score scales the input: the same tokens unscaled give another Hessian
        U = plain[0][mine]
        assert not torch.allclose(2.0 / U.shape[0] * U.T @ U, ours[(f"feed_forward.experts.{e}.gate_proj",
                                                                    f"feed_forward.experts.{e}.up_proj")], rtol=1e-2)


# -- 2. quantize -> read-back ---------------------------------------------------------------------


def test_gptq_experts_into_both_formats_read_back(llama4, outputs):
    """Per-expert 2D names in both formats (``feed_forward.experts.{e}.gate_proj.qweight`` /
    ``.weight_packed``), identical read-backs, the router byte for byte, the streamed forward over
    each output equals its read-back model's forward."""
    from compressed_tensors.compressors import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme

    from quantize.eval.perplexity import final_logits

    root, _ = outputs
    src = CheckpointReader(llama4)
    a, b = open_model(root / "gptq"), open_model(root / "ct")
    with safe_open(root / "gptq" / "model.safetensors", "pt") as f:
        gk = set(f.keys())
    with safe_open(root / "ct" / "model.safetensors", "pt") as f:
        ck = set(f.keys())
        ct = {k: f.get_tensor(k) for k in ck}
    p = f"model.layers.{SPARSE}."
    for e in range(4):
        for n in ("gate_proj", "up_proj", "down_proj"):
            assert f"{p}feed_forward.experts.{e}.{n}.qweight" in gk and f"{p}feed_forward.experts.{e}.{n}.weight_packed" in ck
            name = f"{p}feed_forward.experts.{e}.{n}.weight"
            assert torch.equal(a.get(name), b.get(name)), name
    for n in ("gate_proj", "up_proj", "down_proj"):  # the dense layer's MLP and the shared expert
        assert f"model.layers.0.feed_forward.{n}.weight_packed" in ck
        assert f"{p}feed_forward.shared_expert.{n}.weight_packed" in ck
    assert torch.equal(ct[p + "feed_forward.router.weight"], src.get(p + "feed_forward.router.weight"))
    assert p + "feed_forward.experts.gate_up_proj" not in ck
    qc = json.loads((root / "ct" / "config.json").read_text())["quantization_config"]
    assert r"re:.*feed_forward\.router$" in qc["ignore"]
    scheme = QuantizationScheme(**qc["config_groups"]["group_0"])
    prefix = f"{p}feed_forward.experts.2.up_proj"
    tensors = {k.rsplit(".", 1)[1]: t for k, t in ct.items() if k.startswith(prefix + ".")}
    lib = PackedQuantizationCompressor.decompress(tensors, scheme)["weight"].float()
    assert torch.equal(lib, b.get(prefix + ".weight").float())
    for d in ("gptq", "ct"):
        model = load_dequantized_model(root / d)
        experts = model.model.layers[SPARSE].feed_forward.experts
        assert torch.equal(experts.gate_up_proj[2][:, 32:].T, b.get(prefix + ".weight"))
        with torch.no_grad():
            ref = model(IDS).logits
        ours = torch.cat(list(final_logits(root / d, IDS, CPU)))
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_gptq_beats_rtn_on_every_expert_that_saw_tokens(outputs):
    _, m = outputs
    layer = m["gptq"].metrics["layers"][SPARSE]
    checked = 0
    for name, err in layer["rel_error"].items():
        if ".experts." in name and layer["moe"]["seen"][int(name.split(".")[2])] > 0:
            assert err < layer["rtn_rel_error"][name], name
            checked += 1
    assert checked == 4 * 3


def test_rtn_is_rtn_of_the_source_experts(llama4, outputs):
    from quantize.commands.gptq import DEFAULT_GRID, grid_flags, resolve_grid
    from quantize.methods.grid import QuantSpec
    from quantize.methods.rtn import rtn_quantize

    root, _ = outputs
    src = CheckpointReader(llama4)
    q = open_model(root / "rtn")
    spec = QuantSpec(bits=4, group_size=32, sym=True, scale_dtype="float16", act_order=False,
                     **grid_flags(resolve_grid(DEFAULT_GRID, 4, rtn=True)))
    p = f"model.layers.{SPARSE}.feed_forward.experts."
    gu, dn = src.get(p + "gate_up_proj"), src.get(p + "down_proj")
    for e in range(4):
        for n, W in (("gate_proj", gu[e][:, :32].T), ("up_proj", gu[e][:, 32:].T), ("down_proj", dn[e].T)):
            ref = rtn_quantize(W.contiguous().float(), spec).W_hat
            assert torch.equal(q.get(f"{p}{e}.{n}.weight").float(), ref.float()), (e, n)


def test_lockstep_and_stopped_passes_give_the_same_bytes(llama4, calib_for, tmp_path):
    cal = calib_for(llama4)
    run_gptq(llama4, cal, tmp_path / "lock", exec_cfg=LOCK, static_groups=True)
    run_gptq(llama4, cal, tmp_path / "multi", exec_cfg=MULTI, static_groups=True)
    assert_same_files(tmp_path / "lock", tmp_path / "multi",
                      [f for f in output_files(tmp_path / "lock") if f.endswith(".safetensors")])


# -- 3. transformers + compressed-tensors -----------------------------------------------------------


def test_transformers_loads_our_compressed_tensors_output(llama4, outputs):
    """transformers 5.24 + compressed-tensors load the per-expert linears into their sequential
    Llama-4 experts (``SequentialLlama4TextExperts``): the same logits as our read-back."""
    root, _ = outputs
    lib = hf_model(root / "ct")
    ours = load_dequantized_model(root / "ct")
    with torch.no_grad():
        a, b = lib(IDS).logits, ours(IDS).logits
        src = hf_model(llama4)(IDS).logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert not torch.equal(a, src)


# -- 4. coverage -------------------------------------------------------------------------------------


def test_unrouted_experts_fall_back_listed_in_the_manifest_and_inspect(calib_for, tmp_path_factory, tmp_path):
    """The sparse layer's router all zeros: every token ties, top-1 keeps the same expert."""
    d = tiny_model_edited("llama4_text", tmp_path_factory.mktemp("llama4-starved"),
                          {f"model.layers.{SPARSE}.feed_forward.router.weight": torch.zeros_like})
    out = run_gptq(d, calib_for(d), tmp_path / "q", static_groups=True, format="compressed-tensors")
    moe = out.metrics["layers"][SPARSE]["moe"]
    idle = [e for e, c in enumerate(moe["seen"]) if c == 0]
    assert len(idle) == 3 and max(moe["seen"]) == moe["tokens"]
    assert moe["fallback_experts"] == idle and moe["solved"] == {"routed": 1, "all": 3, "rtn": 0}
    assert "moe" not in out.metrics["layers"][0]  # the dense layer
    for e in idle:
        assert torch.isfinite(open_model(tmp_path / "q").get(
            f"model.layers.{SPARSE}.feed_forward.experts.{e}.down_proj.weight")).all()
    res = CliRunner().invoke(cli, ["inspect", str(tmp_path / "q")])
    assert res.exit_code == 0
    assert "1 sparse layers x 4 experts (top-1)" in res.output
    assert f"fallback     3 experts: layer {SPARSE}: " in res.output


# -- 5. what is refused -------------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [
    ["awq", "--calibration", "{cal}", "--bits", "4", "--group-size", "32"],
    ["gguf", "--type", "Q4_K_M"],
    ["exl2", "--calibration", "{cal}", "--bpw", "4"],
    ["fp8"],
], ids=["awq", "gguf", "exl2", "fp8"])
def test_other_formats_refuse_with_exit_2(argv, llama4, calib_for, tmp_path, capsys):
    cal = calib_for(llama4)
    out = tmp_path / "out"
    line = refused_in_one_line([a.format(cal=cal) for a in argv] + ["--model", str(llama4), "--out", str(out)],
                               out, capsys)
    assert "llama4_text" in line and "quantize gptq" in line and "quantize rtn" in line, line


def test_plan_counts_every_parameter(llama4):
    from quantize.plan import FUSED_MOE_METHODS, parameter_counts, plan

    cfg = CheckpointReader(llama4).config
    assert parameter_counts(cfg)["total"] == sum(p.numel() for p in hf_model(llama4).parameters())
    assert {r["method"] for r in plan(cfg)["rows"]} <= set(FUSED_MOE_METHODS)
