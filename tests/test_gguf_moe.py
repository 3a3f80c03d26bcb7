"""`quantize gguf` for Mixture-of-Experts models (#17 item 5): the routed experts of each layer are
stacked into ``blk.N.ffn_{gate,up,down}_exps`` ([E, rows, cols]), the router and Qwen2-MoE's
shared-expert gate stay F32, the metadata is convert_hf_to_gguf's; gguf-py reads every tensor; our
read-back (``open_model``) returns exactly the weights the solver chose, expert by expert; with
calibration every expert is solved by GPTQ on its own K-quant grid and Hessian; families llama.cpp
cannot run are refused with exit 2. llama.cpp itself: tests/test_interop_llamacpp_moe.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from helpers import CPU  # noqa: E402
from quantize.arch import by_name  # noqa: E402
from quantize.cli import main  # noqa: E402
from quantize.commands.gguf import quantize_gguf  # noqa: E402
from quantize.formats import gguf_blocks  # noqa: E402
from quantize.formats.gguf import GGUFCheckpoint, gguf_tensor_name, permute_rows, qk_permute_heads  # noqa: E402
from quantize.formats.gguf_imatrix import read_imatrix  # noqa: E402
from quantize.formats.gguf_mix import ModelShape, gguf_weight_bytes, tensor_type  # noqa: E402
from quantize.io.reader import CheckpointReader  # noqa: E402
from quantize.methods import gguf_layer  # noqa: E402

GGUF_MOE = ("mixtral", "qwen2_moe", "qwen3_moe")  # what llama.cpp runs (deepseek_v3: refused)
STEMS = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")


def moe_kwargs(family: str) -> dict:
    """Tiny MoE models whose every linear is whole 256-value K-quant super-blocks, configured as
    llama.cpp's graph computes them (qwen3moe renormalises the top-k weights, qwen2moe does not)."""
    kw = dict(hidden=256, dtype=torch.bfloat16, intermediate_size=256)
    if family != "mixtral":
        kw["moe_intermediate_size"] = 256
    if family == "qwen2_moe":
        kw["shared_expert_intermediate_size"] = 256
    if family == "qwen3_moe":
        kw["norm_topk_prob"] = True
    return kw


@pytest.fixture(scope="module")
def runs(tiny_model_dir, calib_for, tmp_path_factory):
    """family -> {"src", "cal", variant: (out dir, manifest, {linear: solver's W_hat})}, made once."""
    cache: dict[str, dict] = {}

    def get(family: str) -> dict:
        if family in cache:
            return cache[family]
        src = tiny_model_dir(family, **moe_kwargs(family))
        cal = calib_for(src)
        root = tmp_path_factory.mktemp(f"gguf-moe-{family}")
        d = {"src": src, "cal": cal, "imatrix": root / "imatrix.gguf"}
        for name, kw in (("F16", {"ftype": "F16"}), ("Q8_0", {"ftype": "Q8_0"}), ("Q4_K_M", {"ftype": "Q4_K_M"}),
                         ("Q4_K_M+cal", {"ftype": "Q4_K_M", "calibration": cal, "imatrix_out": d["imatrix"]})):
            solved: dict[str, torch.Tensor] = {}
            real = gguf_layer.quantize_tensor

            def recording(W, qtype, H=None, *, name="weight", **k):
                r = real(W, qtype, H, name=name, **k)
                if H is not None or k.get("prepared") is not None or name not in solved:
                    solved[name] = r.W_hat.clone()  # the last call per linear is the one kept
                return r

            gguf_layer.quantize_tensor = recording
            try:
                m = quantize_gguf(model_dir=src, out=root / name, exec_cfg=CPU, **kw)
            finally:
                gguf_layer.quantize_tensor = real
            d[name] = (root / name, m, solved)
        cache[family] = d
        return d

    return get


def _tensors(path) -> dict:
    return {t.name: t for t in gguf.GGUFReader(str(path / "model.gguf")).tensors}


def _shape(t) -> tuple[int, ...]:
    return tuple(int(s) for s in reversed(t.shape.tolist()))


@pytest.mark.parametrize("family", GGUF_MOE)
def test_gguf_py_reads_stacked_experts_and_moe_metadata(runs, family):
    d = runs(family)
    src = CheckpointReader(d["src"])
    config, arch = src.config, by_name(family)
    E, k = arch.num_experts(config), arch.experts_per_token(config)
    for variant in ("F16", "Q8_0", "Q4_K_M", "Q4_K_M+cal"):
        out, m, _ = d[variant]
        r = gguf.GGUFReader(str(out / "model.gguf"))
        meta = {f.name: f.contents() for f in r.fields.values() if f.types}
        a = meta["general.architecture"]
        assert a == {"mixtral": "llama", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe"}[family]
        assert meta[f"{a}.expert_count"] == E == 4 and meta[f"{a}.expert_used_count"] == k == 2
        if family != "mixtral":
            assert meta[f"{a}.expert_feed_forward_length"] == config["moe_intermediate_size"]
        if family == "qwen2_moe":
            assert meta[f"{a}.expert_shared_feed_forward_length"] == config["shared_expert_intermediate_size"]
        t = {x.name: x for x in r.tensors}
        shape = ModelShape(n_layers=2, n_head=4, n_head_kv=2, tied=False, arch=a, n_expert=E)
        for i in range(2):
            for j, stem in enumerate(STEMS):
                g = t[f"blk.{i}.{stem}.weight"]
                per_expert = src.shape(f"model.layers.{i}.{arch.expert_linear(0, j)}.weight")
                assert _shape(g) == (E, *per_expert), (family, stem)
                want = tensor_type(g.name, per_expert[1], variant.split("+")[0], shape)
                assert g.tensor_type.name == want == m.metrics["tensor_types"][g.name]
            router = t[f"blk.{i}.ffn_gate_inp.weight"]
            assert router.tensor_type.name == "F32" and _shape(router) == (E, 256)
            if family == "qwen2_moe":
                assert t[f"blk.{i}.ffn_gate_inp_shexp.weight"].tensor_type.name == "F32"
                assert {f"blk.{i}.ffn_{p}_shexp.weight" for p in ("gate", "up", "down")} <= set(t)
            # no per-expert 2D tensor and no dense MLP: llama.cpp's qwen2moe/qwen3moe/llama-MoE layout
            assert not {f"blk.{i}.ffn_{p}.weight" for p in ("gate", "up", "down")} & set(t)


@pytest.mark.parametrize("variant", ["F16", "Q8_0", "Q4_K_M", "Q4_K_M+cal"])
@pytest.mark.parametrize("family", GGUF_MOE)
def test_read_back_is_the_solvers_weights(runs, family, variant):
    """Every linear, experts included: our reader's weight == the W_hat the solver set in the layer."""
    d = runs(family)
    out, _, solved = d[variant]
    back = GGUFCheckpoint(out)
    arch = by_name(family)
    experts = 0
    for full, W_hat in solved.items():
        if not full.startswith("model.layers."):
            continue  # the head: checked by the dense tests
        got = back.get(full + ".weight")
        assert torch.equal(got, W_hat.to(torch.float32)), (family, variant, full)
        experts += arch.expert_slot(full.split(".", 3)[3]) is not None
    assert experts == 2 * 4 * 3  # two sparse layers x 4 experts x gate/up/down


@pytest.mark.parametrize("family", GGUF_MOE)
def test_without_calibration_every_expert_has_llama_cpps_reference_bytes(runs, family):
    d = runs(family)
    out, m, _ = d["Q4_K_M"]
    src, t = CheckpointReader(d["src"]), _tensors(out)
    config, arch = src.config, by_name(family)
    for i in range(2):
        for j, stem in enumerate(STEMS):
            g = t[f"blk.{i}.{stem}.weight"]
            want = np.concatenate([gguf_blocks.quantize_reference(
                src.get(f"model.layers.{i}.{arch.expert_linear(e, j)}.weight").to(torch.float32), g.tensor_type.name).numpy()
                for e in range(4)])
            assert np.array_equal(np.asarray(g.data).reshape(-1), want.reshape(-1)), (family, stem)
        hf = f"model.layers.{i}.self_attn.q_proj.weight"  # q/k still permuted for llama (Mixtral)
        W = src.get(hf).to(torch.float32)
        heads = qk_permute_heads(hf, config)
        W = permute_rows(W, heads) if heads is not None else W
        want = gguf_blocks.quantize_reference(W, t[f"blk.{i}.attn_q.weight"].tensor_type.name).numpy()
        assert np.array_equal(np.asarray(t[f"blk.{i}.attn_q.weight"].data).reshape(-1), want.reshape(-1))


@pytest.mark.parametrize("family", GGUF_MOE)
def test_calibration_solves_each_expert_on_its_grid_with_its_hessian(runs, family):
    d = runs(family)
    (ref_out, _, _), (cal_out, m, _) = d["Q4_K_M"], d["Q4_K_M+cal"]
    assert (ref_out / "model.gguf").stat().st_size == (cal_out / "model.gguf").stat().st_size
    ref, cal = _tensors(ref_out), _tensors(cal_out)
    arch = by_name(family)
    for layer in m.metrics["layers"]:
        moe = layer["moe"]
        assert moe["experts"] == 4 and sum(moe["seen"]) == 2 * moe["tokens"] > 0  # top-2: each token twice
        expert_errs = [(n, e, r) for n, e in layer["rel_error"].items()
                       for r in [layer["reference_rel_error"][n]] if arch.expert_slot(n) is not None]
        assert len(expert_errs) == 4 * 3  # every expert saw tokens here: each one GPTQ-solved
        assert all(e < r for _, e, r in expert_errs), expert_errs  # below llama.cpp's rounding on its Hessian
        i = layer["layer"]
        for stem in STEMS:
            g = f"blk.{i}.{stem}.weight"
            assert cal[g].tensor_type == ref[g].tensor_type
            assert not np.array_equal(np.asarray(cal[g].data), np.asarray(ref[g].data))
    assert m.params["moe_calibration"] == "routed"
    assert m.metrics["moe"]["sparse_layers"] == 2


@pytest.mark.parametrize("family", GGUF_MOE)
def test_imatrix_has_one_3d_entry_per_expert_stack(runs, family):
    """As llama-imatrix writes experts: in_sum2 [E, K], counts [E, 1] = each expert's routed tokens."""
    d = runs(family)
    _, m, _ = d["Q4_K_M+cal"]
    r = {t.name: np.asarray(t.data, dtype=np.float32) for t in gguf.GGUFReader(str(d["imatrix"])).tensors}
    imx = read_imatrix(d["imatrix"])
    for layer in m.metrics["layers"]:
        i, seen = layer["layer"], layer["moe"]["seen"]
        for stem in STEMS:
            name = f"blk.{i}.{stem}.weight"
            counts = r[f"{name}.counts"].reshape(-1)
            assert counts.tolist() == [float(s) for s in seen]
            assert r[f"{name}.in_sum2"].reshape(4, -1).shape == (4, 256)
            assert imx[name].shape == (4 * 256,) and torch.isfinite(imx[name]).all() and (imx[name] >= 0).all()
        assert f"blk.{i}.ffn_gate_inp.weight" not in imx  # routers are not quantized
    assert "blk.0.attn_q.weight" in imx


def test_plan_counts_gguf_rows_for_moe():
    """Stacked experts in `quantize plan`: Qwen3-30B-A3B Q4_K_M is 18.55 GB of tensors (the Qwen
    team's published Q4_K_M file is 18.6 GB); DeepSeek-V3 has no GGUF row (not written yet)."""
    from pathlib import Path

    from quantize.plan import plan

    cfgs = Path(__file__).resolve().parents[1] / "recipes" / "configs"
    qwen = json.loads((cfgs / "qwen3-30b-a3b.json").read_text())
    rows = {r["setting"]: r for r in plan(qwen)["rows"]}
    assert {"gguf Q4_K_M", "gguf Q8_0"} <= set(rows)
    q4 = rows["gguf Q4_K_M"]["weights"]
    assert q4 == gguf_weight_bytes(qwen, "Q4_K_M", by_name("qwen3_moe"))["total"]
    assert abs(q4 / 18.6e9 - 1) < 0.01
    assert 4.5 < rows["gguf Q4_K_M"]["effective_bits"] < 5.2
    ds = json.loads((cfgs / "deepseek-v3.json").read_text())
    assert not [r for r in plan(ds)["rows"] if r["method"] == "gguf"]


def test_mix_rules_for_eight_experts():
    """llama.cpp's 8-expert rules (Mixtral): attn_v/attn_k Q8_0, attn_output Q5_K for Q4_K_M; routers F32;
    ffn_down_exps follows use_more_bits by layer (checked against llama_model_quantize in the interop tests)."""
    s = ModelShape(n_layers=32, n_head=32, n_head_kv=8, tied=False, n_expert=8)
    assert tensor_type("blk.5.attn_v.weight", 4096, "Q4_K_M", s) == "Q8_0"
    assert tensor_type("blk.5.attn_k.weight", 4096, "Q4_0", s) == "Q8_0"
    assert tensor_type("blk.5.attn_output.weight", 4096, "Q4_K_M", s) == "Q5_K"
    assert tensor_type("blk.5.ffn_gate_inp.weight", 4096, "Q4_K_M", s) == "F32"
    assert tensor_type("blk.0.ffn_down_exps.weight", 14336, "Q4_K_M", s) == "Q6_K"
    assert tensor_type("blk.5.ffn_down_exps.weight", 14336, "Q4_K_M", s) == "Q4_K"
    assert tensor_type("blk.6.ffn_down_exps.weight", 14336, "Q4_K_M", s) == "Q6_K"


def test_expert_names_map_to_their_stack(runs):
    config = CheckpointReader(runs("mixtral")["src"]).config
    assert gguf_tensor_name("model.layers.1.block_sparse_moe.experts.3.w2.weight", config) == "blk.1.ffn_down_exps.weight"
    assert gguf_tensor_name("model.layers.1.block_sparse_moe.gate.weight", config) == "blk.1.ffn_gate_inp.weight"


@pytest.mark.parametrize("family,overrides,needle", [
    ("deepseek_v3", {}, "deepseek_v3"),
    ("qwen3_moe", {"norm_topk_prob": False}, "norm_topk_prob"),
    ("qwen2_moe", {"norm_topk_prob": True}, "norm_topk_prob"),
    ("qwen3_moe", {"mlp_only_layers": [0], "norm_topk_prob": True}, "layer 0"),
])
def test_what_llama_cpp_cannot_run_exits_2(family, overrides, needle, tiny_model_dir, tmp_path, capsys):
    model = tiny_model_dir(family, **overrides)
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["gguf", "--model", str(model), "--out", str(out), "--type", "Q8_0"]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not list(tmp_path.glob("out*"))
