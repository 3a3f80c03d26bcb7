"""`quantize gguf` for Mixture-of-Experts models (#17 item 5): the routed experts of each layer are
stacked into ``blk.N.ffn_{gate,up,down}_exps`` ([E, rows, cols]), the router and Qwen2-MoE's
shared-expert gate stay F32, the metadata is convert_hf_to_gguf's; gguf-py reads every tensor; our
read-back (``open_model``) returns exactly the weights the solver chose, expert by expert; with
calibration every expert is solved by GPTQ on its own K-quant grid and Hessian; families llama.cpp
cannot run are refused with exit 2. DeepSeek-V3 (``deepseek2``): MLA tensors, kv_b split into
attn_k_b (transposed per head) / attn_v_b as llama.cpp's converter splits it, leading dense layer,
exp_probs_b, the converter's keys; the read-back re-assembles kv_b. The DeepSeek tests run on
DeepSeek-V3 with ``q_lora_rank`` and on the same model without it (``deepseek_v3_noqlora``,
Moonlight-style: a plain q_proj written as ``attn_q``). llama.cpp itself:
tests/test_interop_llamacpp_moe.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from helpers import CPU  # noqa: E402
from quantize.arch import by_name, get_arch  # noqa: E402
from quantize.cli import main  # noqa: E402
from quantize.commands.gguf import quantize_gguf  # noqa: E402
from quantize.formats import gguf_blocks  # noqa: E402
from quantize.formats.gguf import GGUFCheckpoint, gguf_tensor_name, permute_rows, qk_permute_heads  # noqa: E402
from quantize.formats.gguf_imatrix import read_imatrix  # noqa: E402
from quantize.formats.gguf_mix import ModelShape, gguf_weight_bytes, tensor_type  # noqa: E402
from quantize.io.reader import CheckpointReader  # noqa: E402
from quantize.methods import gguf_layer  # noqa: E402

GGUF_MOE = ("mixtral", "qwen2_moe", "qwen3_moe")  # stacked-expert families sharing the tests below
DEEPSEEK = "deepseek_v3"  # llama.cpp's deepseek2: its own tests (MLA, a leading dense layer)
DEEPSEEK_NOQ = "deepseek_v3_noqlora"  # the same without q_lora_rank (quantize/testing/tiny.py VARIANTS): attn_q
DEEPSEEKS = (DEEPSEEK, DEEPSEEK_NOQ)
STEMS = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")
VARIANTS = ("F16", "Q8_0", "Q4_K_M", "Q4_K_M+cal")


# DeepSeek-V3's YaRN as released (mscale = mscale_all_dim = 1.0), shrunk to the tiny model's context
DEEPSEEK_YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
                 "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}


def moe_kwargs(family: str) -> dict:
    """Tiny MoE models whose every linear is whole 256-value K-quant super-blocks, configured as
    llama.cpp's graph computes them (qwen3moe renormalises the top-k weights, qwen2moe does not).

    DeepSeek-V3: 3 layers, layer 0 dense (first_k_dense_replace=1) and layers 1-2 sparse (4 experts,
    top-2 in n_group=2 groups with topk_group=1: llama.cpp groups experts as transformers does, so
    grouping is representable and exercised); q/kv LoRA ranks 256 (q_b, v_b rows whole super-blocks),
    qk_nope_head_dim 128 as DeepSeek-V3's, so attn_k_b's 128-wide rows take llama.cpp's shape fallback
    (Q4_K -> Q5_0, Q6_K -> Q8_0); v_head_dim 64 (o_proj input 4 x 64 = 256); rope 64. DEEPSEEK_NOQ: the
    same without q_lora_rank (q_proj: 4 x 192 rows of 256)."""
    if family in DEEPSEEKS:
        kw = dict(hidden=256, dtype=torch.bfloat16, num_layers=3, intermediate_size=256, moe_intermediate_size=256,
                  q_lora_rank=256, kv_lora_rank=256, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=64,
                  head_dim=64)
        if family == DEEPSEEK_NOQ:
            del kw["q_lora_rank"]  # the variant's q_lora_rank=None
        return kw
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
    team's published Q4_K_M file is 18.6 GB); DeepSeek-V3 Q4_K_M 404.5 GB (published Q4_K_M
    conversions of DeepSeek-V3: 404 GB), with kv_b counted as attn_k_b (128-wide rows: Q5_0) + attn_v_b."""
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
    rows = {r["setting"]: r for r in plan(ds)["rows"]}
    q4 = rows["gguf Q4_K_M"]["weights"]
    assert q4 == gguf_weight_bytes(ds, "Q4_K_M", by_name(DEEPSEEK))["total"]
    assert abs(q4 / 404e9 - 1) < 0.01


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
    ("gpt_oss", {}, "gpt_oss"),
    ("deepseek_v3", {"rope_interleave": False}, "rope_interleave"),
    ("deepseek_v3", {"num_key_value_heads": 2}, "num_key_value_heads"),
    ("deepseek_v3", {"scoring_func": "softmax"}, "scoring_func"),
    ("deepseek_v3", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "mscale": 0.707,
                                         "mscale_all_dim": 1.0, "original_max_position_embeddings": 64}}, "mscale"),
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


# -- DeepSeek-V3 (llama.cpp's deepseek2) -----------------------------------------------------------

MLA = ("attn_q_a", "attn_q_b", "attn_kv_a_mqa", "attn_k_b", "attn_v_b", "attn_output")


def _q_stems(family: str) -> tuple[str, ...]:
    """The GGUF tensors of q: attn_q_a/attn_q_b, or attn_q without q_lora_rank."""
    return ("attn_q",) if family == DEEPSEEK_NOQ else ("attn_q_a", "attn_q_b")


def _ds_expected_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    """GGUF name -> logical (numpy) shape of every layer tensor llama.cpp's deepseek2 loads."""
    H, nope, rope, v = c["num_attention_heads"], c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"]
    q, r, hid, E, I = c["q_lora_rank"], c["kv_lora_rank"], c["hidden_size"], c["n_routed_experts"], c["moe_intermediate_size"]
    out = {}
    for i in range(c["num_hidden_layers"]):
        b = f"blk.{i}."
        if q is None:  # a plain q_proj
            out[b + "attn_q.weight"] = (H * (nope + rope), hid)
        else:
            out.update({b + "attn_q_a_norm.weight": (q,), b + "attn_q_a.weight": (q, hid),
                        b + "attn_q_b.weight": (H * (nope + rope), q)})
        out.update({b + "attn_norm.weight": (hid,), b + "ffn_norm.weight": (hid,),
                    b + "attn_kv_a_norm.weight": (r,), b + "attn_kv_a_mqa.weight": (r + rope, hid),
                    b + "attn_k_b.weight": (H, r, nope), b + "attn_v_b.weight": (H, v, r),
                    b + "attn_output.weight": (hid, H * v)})
        if i < c["first_k_dense_replace"]:
            f = c["intermediate_size"]
            out.update({b + "ffn_gate.weight": (f, hid), b + "ffn_up.weight": (f, hid), b + "ffn_down.weight": (hid, f)})
        else:
            s = I * c["n_shared_experts"]
            out.update({b + "ffn_gate_inp.weight": (E, hid), b + "exp_probs_b.bias": (E,),
                        b + "ffn_gate_exps.weight": (E, I, hid), b + "ffn_up_exps.weight": (E, I, hid),
                        b + "ffn_down_exps.weight": (E, hid, I), b + "ffn_gate_shexp.weight": (s, hid),
                        b + "ffn_up_shexp.weight": (s, hid), b + "ffn_down_shexp.weight": (hid, s)})
    return out


@pytest.mark.parametrize("family", DEEPSEEKS)
def test_deepseek_gguf_py_reads_mla_layout_and_the_converters_keys(runs, family):
    d = runs(family)
    c = CheckpointReader(d["src"]).config
    shapes = _ds_expected_shapes(c)
    shape = ModelShape(n_layers=3, n_head=4, n_head_kv=4, tied=False, arch="deepseek2", n_expert=4)
    for variant in VARIANTS:
        out, m, _ = d[variant]
        r = gguf.GGUFReader(str(out / "model.gguf"))
        meta = {f.name: f.contents() for f in r.fields.values() if f.types}
        a = meta["general.architecture"]
        assert a == "deepseek2"
        want = {"block_count": 3, "embedding_length": 256, "feed_forward_length": 256, "attention.head_count": 4,
                "attention.head_count_kv": 1, "leading_dense_block_count": 1, "vocab_size": 1024,
                # no q_lora_rank: 0, which llama.cpp reads for any layer count (formats/gguf.py)
                "attention.q_lora_rank": 0 if family == DEEPSEEK_NOQ else 256, "attention.kv_lora_rank": 256, "attention.key_length": 256 + 64,
                "attention.value_length": 256, "attention.key_length_mla": 128 + 64, "attention.value_length_mla": 64,
                "expert_feed_forward_length": 256, "expert_count": 4, "expert_used_count": 2, "expert_shared_count": 1,
                "expert_group_count": 2, "expert_group_used_count": 1, "expert_weights_norm": True,
                "expert_gating_func": int(gguf.ExpertGatingFuncType.SIGMOID), "rope.dimension_count": 64}
        assert {k: meta.get(f"{a}.{k}") for k in want} == want
        assert meta[f"{a}.expert_weights_scale"] == pytest.approx(c["routed_scaling_factor"])
        t = {x.name: x for x in r.tensors}
        layer = {n: x for n, x in t.items() if n.startswith("blk.")}
        assert {n: _shape(x) for n, x in layer.items()} == shapes, variant
        assert "blk.0.ffn_gate_inp.weight" not in t and "blk.1.ffn_gate.weight" not in t  # layer 0 dense only
        for n, x in layer.items():
            s = shapes[n]
            dense = len(s) == 1 or "norm" in n or "gate_inp" in n
            want_type = "F32" if dense else tensor_type(n, s[-1], variant.split("+")[0], shape)
            assert x.tensor_type.name == want_type == m.metrics["tensor_types"][n], (variant, n)
        # `quantize plan`'s GGUF row is this file's tensor bytes exactly (kv_b as k_b + v_b, exp_probs_b, MLA norms)
        want_bytes = gguf_weight_bytes(c, variant.split("+")[0], get_arch(c))["total"]
        assert sum(int(x.n_bytes) for x in r.tensors) == want_bytes
        if variant.startswith("Q4_K_M"):  # attn_k_b's 128-wide rows: llama.cpp's fallback from Q4_K
            assert t["blk.1.attn_k_b.weight"].tensor_type.name == "Q5_0"
            assert t["blk.1.attn_v_b.weight"].tensor_type.name == "Q4_K"
            assert t["blk.2.ffn_down_exps.weight"].tensor_type.name == "Q6_K"  # use_more_bits(2, 3)
            assert {t[f"blk.1.{g}.weight"].tensor_type.name for g in _q_stems(family)} == {"Q4_K"}


@pytest.mark.parametrize("family", DEEPSEEKS)
def test_deepseek_kv_b_is_split_as_llama_cpps_converter_splits_it(runs, family):
    """attn_k_b[h] = (kv_b's k rows of head h)ᵀ, attn_v_b[h] = kv_b's v rows of head h (F16: exact);
    computed here from the checkpoint, independently of formats/gguf.py's split."""
    d = runs(family)
    src, t = CheckpointReader(d["src"]), _tensors(d["F16"][0])
    H, nope, v = 4, 128, 64
    for i in range(3):
        W = src.get(f"model.layers.{i}.self_attn.kv_b_proj.weight").to(torch.float16)
        k_b = np.asarray(t[f"blk.{i}.attn_k_b.weight"].data).reshape(H, 256, nope)
        v_b = np.asarray(t[f"blk.{i}.attn_v_b.weight"].data).reshape(H, v, 256)
        for h in range(H):
            rows = W[h * (nope + v): (h + 1) * (nope + v)].numpy()
            assert np.array_equal(k_b[h], rows[:nope].T) and np.array_equal(v_b[h], rows[nope:]), (i, h)
        bias = np.asarray(t[f"blk.{i}.exp_probs_b.bias"].data) if i else None
        if i:
            assert np.array_equal(bias, src.get(f"model.layers.{i}.mlp.gate.e_score_correction_bias").float().numpy())


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("family", DEEPSEEKS)
def test_deepseek_read_back_is_the_solvers_weights(runs, family, variant):
    """Every linear: our reader's weight == the solver's W_hat; kv_b re-assembled from k_b and v_b."""
    from quantize.formats.gguf import join_kv_b

    d = runs(family)
    out, _, solved = d[variant]
    back = GGUFCheckpoint(out)
    config = back.config
    arch = get_arch(config)
    seen = experts = 0
    for i in range(3):
        p = f"model.layers.{i}."
        kv = join_kv_b(solved[p + "self_attn.kv_b_proj (k_b)"], solved[p + "self_attn.kv_b_proj (v_b)"], config)
        assert torch.equal(back.get(p + "self_attn.kv_b_proj.weight"), kv), (variant, i)
        for lin in arch.layer_linears(config, i):
            if lin == "self_attn.kv_b_proj":
                continue
            assert torch.equal(back.get(p + lin + ".weight"), solved[p + lin].to(torch.float32)), (variant, lin)
            seen += 1
            experts += arch.expert_slot(lin) is not None
    attn = len(_q_stems(family)) + 2  # q_a + q_b (or q), kv_a, o
    assert experts == 2 * 4 * 3 and seen == 3 * attn + 3 + 2 * (4 * 3 + 3)
    assert back.qtype("model.layers.1.self_attn.kv_b_proj.weight") == {
        "F16": "F16+F16", "Q8_0": "Q8_0+Q8_0"}.get(variant, "Q5_0+Q4_K")


@pytest.mark.parametrize("family", DEEPSEEKS)
def test_deepseek_hf_forward_on_the_f16_read_back_is_the_model(runs, family):
    from transformers import AutoModelForCausalLM

    from quantize.io.quantized import load_dequantized_model

    d = runs(family)
    ids = torch.randint(3, 1000, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fp = AutoModelForCausalLM.from_pretrained(d["src"], dtype=torch.float32).eval()(ids).logits
        ours = load_dequantized_model(d["F16"][0]).eval()(ids).logits
    assert (fp - ours).abs().max() < 1e-3 * fp.abs().max()


@pytest.mark.parametrize("family", DEEPSEEKS)
def test_deepseek_without_calibration_every_tensor_has_llama_cpps_reference_bytes(runs, family):
    from quantize.formats.gguf import split_kv_b

    d = runs(family)
    src, t = CheckpointReader(d["src"]), _tensors(d["Q4_K_M"][0])
    config = src.config
    arch = get_arch(config)

    def ref(W, qtype):
        if qtype in ("Q5_0", "Q8_0"):  # the shape fallbacks: gguf-py's (= ggml's) reference rounding
            return gguf.quants.quantize(W.numpy(), getattr(gguf.GGMLQuantizationType, qtype))
        return gguf_blocks.quantize_reference(W, qtype).numpy()

    checked = 0
    for i in range(3):
        p = f"model.layers.{i}."
        for lin in arch.layer_linears(config, i):
            W = src.get(p + lin + ".weight").to(torch.float32)
            if lin == "self_attn.kv_b_proj":
                for g, part in zip(("attn_k_b", "attn_v_b"), split_kv_b(W, config)):
                    x = t[f"blk.{i}.{g}.weight"]
                    assert np.array_equal(np.asarray(x.data).reshape(-1),
                                          ref(part.reshape(-1, part.shape[-1]), x.tensor_type.name).reshape(-1)), g
                    checked += 1
            elif arch.expert_slot(lin) is None:
                x = t[gguf_tensor_name(p + lin + ".weight", config)]
                assert np.array_equal(np.asarray(x.data).reshape(-1), ref(W, x.tensor_type.name).reshape(-1)), lin
                checked += 1
    assert checked == 3 * (len(_q_stems(family)) + 4) + 3 + 2 * 3  # q, kv_a, k_b, v_b, o; MLP; shared expert


@pytest.mark.parametrize("family", DEEPSEEKS)
def test_deepseek_calibration_gptq_except_k_b(runs, family):
    """With calibration: every linear whose GGUF rows are its HF rows is GPTQ-solved (below llama.cpp's
    rounding on its own Hessian), v_b on kv_b's; attn_k_b (transposed: other inputs) keeps llama.cpp's
    reference bytes, as the manifest says; the file's size and types are the uncalibrated ones."""
    d = runs(family)
    (ref_out, _, _), (cal_out, m, _) = d["Q4_K_M"], d["Q4_K_M+cal"]
    assert "attn_k_b" in m.params["reference_rounding"]
    ref, cal = _tensors(ref_out), _tensors(cal_out)
    assert {n: x.tensor_type for n, x in ref.items()} == {n: x.tensor_type for n, x in cal.items()}
    for i in range(3):
        assert np.array_equal(np.asarray(cal[f"blk.{i}.attn_k_b.weight"].data), np.asarray(ref[f"blk.{i}.attn_k_b.weight"].data))
        for g in ("attn_v_b", *_q_stems(family), "attn_kv_a_mqa", "attn_output"):
            assert not np.array_equal(np.asarray(cal[f"blk.{i}.{g}.weight"].data), np.asarray(ref[f"blk.{i}.{g}.weight"].data)), g
    for layer in m.metrics["layers"]:
        errs = layer["rel_error"]
        attn = len(_q_stems(family)) + 3  # q_a + q_b (or q), kv_a, kv_b, o
        assert "self_attn.kv_b_proj" in errs and len(errs) == (attn + 3 if layer["layer"] == 0 else attn + 4 * 3 + 3)
        assert all(e < layer["reference_rel_error"][n] for n, e in errs.items()), layer["layer"]
        assert layer["types"]["self_attn.k_b_proj"] == "Q5_0" and layer["types"]["self_attn.v_b_proj"] == "Q4_K"
    r = {x.name: np.asarray(x.data, dtype=np.float32) for x in gguf.GGUFReader(str(d["imatrix"])).tensors}
    assert r["blk.1.attn_v_b.weight.in_sum2"].reshape(4, 256).shape == (4, 256)  # one row per head
    assert len(set(r["blk.1.attn_v_b.weight.counts"].reshape(-1).tolist())) == 1
    assert "blk.1.attn_k_b.weight.in_sum2" not in r and "blk.1.attn_kv_b.weight.in_sum2" not in r


def test_deepseek_yarn_keys_are_the_converters(tmp_path):
    """DeepSeek-V3's YaRN: TextModel's YaRN keys plus yarn_log_mul = 0.1 * mscale_all_dim."""
    from quantize.formats.gguf import config_from_metadata, metadata
    from quantize.testing.tiny import tiny_config

    c = tiny_config(DEEPSEEK, **{k: v for k, v in moe_kwargs(DEEPSEEK).items() if k not in ("dtype", "num_layers", "hidden")},
                    hidden=256, num_layers=3).to_dict()
    c["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "original_max_position_embeddings": 4096,
                            "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}
    meta = {k: v for k, (v, _) in metadata(c, tmp_path, "F16").items()}
    a = "deepseek2"
    assert meta[f"{a}.rope.scaling.type"] == "yarn" and meta[f"{a}.rope.scaling.factor"] == 40.0
    assert meta[f"{a}.rope.scaling.original_context_length"] == 4096
    assert meta[f"{a}.rope.scaling.yarn_beta_fast"] == 32.0 and meta[f"{a}.rope.scaling.yarn_beta_slow"] == 1.0
    assert meta[f"{a}.rope.scaling.yarn_log_multiplier"] == pytest.approx(0.1)
    back = config_from_metadata(meta, {"output.weight"})
    assert back["rope_parameters"]["mscale_all_dim"] == pytest.approx(1.0) and back["qk_nope_head_dim"] == 128
    assert {k: back[k] for k in ("q_lora_rank", "kv_lora_rank", "v_head_dim", "first_k_dense_replace", "n_group")} == {
        "q_lora_rank": 256, "kv_lora_rank": 256, "v_head_dim": 64, "first_k_dense_replace": 1, "n_group": 2}


@pytest.mark.parametrize("family", DEEPSEEKS)
def test_deepseek_config_from_metadata_is_the_source_config(runs, family):
    """Without config.json beside the file, the reader rebuilds DeepSeek-V3's config from deepseek2's
    keys (num_key_value_heads back to the head count, nope = key_length_mla - rope, q_lora_rank 0 back
    to null, ...)."""
    from quantize.formats.gguf import config_from_metadata

    d = runs(family)
    ck = GGUFCheckpoint(d["Q4_K_M"][0])
    src = CheckpointReader(d["src"]).config
    rebuilt = config_from_metadata(ck.metadata, set(ck._tensors))
    for k, v in rebuilt.items():
        if k in src and src[k] is not None:
            assert v == pytest.approx(src[k]), k
    assert rebuilt["q_lora_rank"] == src["q_lora_rank"]  # None without q_lora_rank
    assert {k for k in rebuilt if k not in src or src[k] is None} <= {"rope_theta", "q_lora_rank"}
