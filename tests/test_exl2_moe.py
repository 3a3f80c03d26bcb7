"""`quantize exl2` for the Mixture-of-Experts families exllamav2 loads (#17 item 5): Mixtral and
Qwen3-MoE. Every routed expert is GPTQ-solved on the EXL2 grid from its own routed Hessian in the one
layer loop; a sparse layer's experts form one optimizer slot (``block_sparse_moe``: one MLP option
row for all its experts, its cost every expert's bits); the router stays unquantized.

exllamav2 needs CUDA and there is no GPU here: nothing below runs exllamav2. What its loader reads is
checked against its source instead (turboderp-org/exllamav2, snapshot da07fac, files named where
each expectation comes from). Families it does not load are refused with exit 2 in one line.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch.nn import functional as F

from helpers import (CPU, assert_same_files, keeping_outputs, killed_at, output_files, recording, refused_in_one_line,
                     replaced)
from quantize import manifest as mf
from quantize.arch import get_arch
from quantize.commands.exl2 import quantize_exl2
from quantize.formats.exl2 import PACKED_SUFFIXES, SUFFIXES, achieved_bpw, check_exl2_tensors, dequantize_exl2, packed_linears
from quantize.io.quantized import load_dequantized_model, open_model
from quantize.io.reader import CheckpointReader
from quantize.methods.exl2 import MLP_OPTIONS, exllamav2_total_bits, padded_columns
from quantize.methods.exl2_layer import Exl2QuantMethod
from quantize.methods.exl2_optimize import decoder_weights

pytestmark = pytest.mark.usefixtures("one_thread")

FAMILIES = ("mixtral", "qwen3_moe")
ROWS = 4  # measurement rows
BPW = 5.0  # the tiny models' 64-wide linears pay 32 bits per input row for q_invperm: 4.32 bpw at least
IDS = torch.tensor([[5, 17, 300, 42, 7, 99, 512, 3, 250, 11, 640, 9]])

# exllamav2/architecture.py (ExLlamaV2ArchParams, da07fac): the keys of an MoE layer's experts and router
EXLLAMAV2_KEYS = {
    "mixtral": {"mlp_gate": ".block_sparse_moe.experts.*.w1", "mlp_up": ".block_sparse_moe.experts.*.w3",
                "mlp_down": ".block_sparse_moe.experts.*.w2", "mlp_expert_gate": ".block_sparse_moe.gate"},
    "qwen3_moe": {"mlp_gate": ".mlp.experts.*.gate_proj", "mlp_up": ".mlp.experts.*.up_proj",
                  "mlp_down": ".mlp.experts.*.down_proj", "mlp_expert_gate": ".mlp.gate"},
}


def _kwargs(family: str) -> dict:
    # exllamav2 always renormalises the top-k routing weights (moe_mlp.py forward_torch); Qwen3-MoE's
    # released configs set norm_topk_prob (transformers' default is false: refused below)
    return {"norm_topk_prob": True} if family == "qwen3_moe" else {}


def _run(model, cal, out, **kw):
    kw.setdefault("bpw", BPW)
    return quantize_exl2(model_dir=model, calibration=cal, out=out, measurement_rows=ROWS,
                         exec_cfg=kw.pop("exec_cfg", CPU), **kw)


@pytest.fixture(scope="module")
def runs(tiny_model_dir, calib_for, tmp_path_factory):
    """family -> {"src", "cal", "out", "m" (manifest), "solved" ({weight name: solver's W_hat})}."""
    cache: dict[str, dict] = {}

    def get(family: str) -> dict:
        if family not in cache:
            src = tiny_model_dir(family, **_kwargs(family))
            cal = calib_for(src)
            out = tmp_path_factory.mktemp(f"exl2-moe-{family}") / "q"
            solved: dict[str, torch.Tensor] = {}
            with replaced(Exl2QuantMethod, "process_layer", keeping_outputs(Exl2QuantMethod, solved)):
                m = _run(src, cal, out)
            cache[family] = {"src": src, "cal": cal, "out": out, "m": m, "solved": solved}
        return cache[family]

    return get


def _expert_names(arch, cfg):
    return [arch.layer_prefix(i) + arch.expert_linear(e, j) for i in range(arch.num_layers(cfg))
            for e in range(arch.num_experts(cfg)) for j in range(3)]


@pytest.mark.parametrize("family", FAMILIES)
def test_readback_equals_the_solver_for_every_expert(family, runs):
    r = runs(family)
    out, solved = r["out"], r["solved"]
    assert r["m"].status == "complete" and not mf.verify(out)
    reader = open_model(out)
    arch = get_arch(reader.config)
    experts = _expert_names(arch, reader.config)
    assert len(experts) == 2 * 4 * 3
    for name in experts:
        assert torch.equal(reader.get(name + ".weight").float(), solved[name + ".weight"]), name
    # and every other decoder linear
    for name, W_hat in solved.items():
        assert torch.equal(reader.get(name).float(), W_hat), name


@pytest.mark.parametrize("chunk", [None, 3], ids=["resident", "expert-chunk-3"])
@pytest.mark.parametrize("family", FAMILIES)
def test_streamed_forward_equals_the_readback_model(family, chunk, runs):
    from quantize.eval.perplexity import final_logits

    out = runs(family)["out"]
    with torch.no_grad():
        ref = load_dequantized_model(out)(IDS).logits
    ours = torch.cat(list(final_logits(out, IDS, dataclasses.replace(CPU, expert_chunk=chunk))))
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_exllamav2_moe_forward_on_our_tensors_equals_the_readback_layer(family, runs):
    """exllamav2's MoE MLP (moe_mlp.py ``forward_torch``: norm, router logits, softmax, top-k,
    renormalise, ``silu(w1 x) * (w3 x)``, ``w2``, weighted sum + residual) written out here on
    the dequantized EXL2 tensors (``dequantize_exl2``: the loader's reconstruct) equals the read-back
    transformers layer: w1/w3/w2 are gate/up/down and the routing is the model's."""
    out = runs(family)["out"]
    reader = CheckpointReader(out)
    cfg = reader.config
    keys = EXLLAMAV2_KEYS[family]
    model = load_dequantized_model(out)
    E, k = cfg.get("num_local_experts") or cfg["num_experts"], cfg["num_experts_per_tok"]
    gen = torch.Generator().manual_seed(0)
    for i in range(cfg["num_hidden_layers"]):
        layer = model.model.layers[i]
        x = torch.randn(1, 10, cfg["hidden_size"], generator=gen)
        with torch.no_grad():
            want = x + layer.mlp(layer.post_attention_layernorm(x))
        key = f"model.layers.{i}"

        def lin(name: str) -> torch.Tensor:
            t = {s: reader.get(f"{name}.{s}") for s in SUFFIXES if f"{name}.{s}" in reader}
            return dequantize_exl2(t, name)

        h = layer.post_attention_layernorm(x).reshape(-1, x.shape[-1])
        logits = F.linear(h, reader.get(key + keys["mlp_expert_gate"] + ".weight").float())
        w = F.softmax(logits, dim=-1, dtype=torch.float)
        w, sel = torch.topk(w, k, dim=-1)
        w /= w.sum(dim=-1, keepdim=True)
        y = torch.zeros_like(h)
        for e in range(E):
            tok, slot = torch.where(sel == e)
            if tok.numel() == 0:
                continue
            xe = h[tok]
            g = F.linear(xe, lin(key + keys["mlp_gate"].replace("*", str(e))))
            u = F.linear(xe, lin(key + keys["mlp_up"].replace("*", str(e))))
            d = F.linear(F.silu(g) * u, lin(key + keys["mlp_down"].replace("*", str(e))))
            y.index_add_(0, tok, d * w[tok, slot, None])
        got = x + y.reshape(x.shape)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_gptq_beats_rtn_on_every_expert_that_saw_tokens(family, runs):
    m = runs(family)["m"]
    compared = 0
    for layer in m.metrics["layers"]:
        seen = layer["moe"]["seen"]
        for name, err in layer["rel_error"].items():
            if ".experts." not in name:
                continue
            e = int(name.split(".experts.")[1].split(".")[0])
            if seen[e] > 0:
                assert err < layer["rtn_rel_error"][name], (layer["layer"], name, err, layer["rtn_rel_error"][name])
                compared += 1
    assert compared == 2 * 4 * 3
    errs = [(layer["rel_error"][n], layer["rtn_rel_error"][n]) for layer in m.metrics["layers"]
            for n in layer["rel_error"] if ".experts." in n]
    print(f"{family}: experts' Hessian-weighted error, mean EXL2-GPTQ {sum(a for a, _ in errs) / len(errs):.4f} "
          f"vs RTN {sum(b for _, b in errs) / len(errs):.4f}")


@pytest.mark.parametrize("family", FAMILIES)
def test_stored_bpw_counts_every_expert_and_meets_the_target(family, runs):
    r = runs(family)
    out, m = r["out"], r["m"]
    cfg = CheckpointReader(out).config
    arch = get_arch(cfg)
    got = achieved_bpw(out)["decoder"]
    # the denominator holds every expert's weights (exllamav2 optimize.py: numel_mlp x num_experts)
    assert got["weights"] == decoder_weights(arch, cfg)
    E, H, I = 4, cfg["hidden_size"], cfg.get("moe_intermediate_size") or cfg["intermediate_size"]
    attn = sum(arch.linear_shape(n, cfg)[0] * arch.linear_shape(n, cfg)[1] for n in arch.linear_names()
               if n.startswith("self_attn"))
    assert got["weights"] == cfg["num_hidden_layers"] * (attn + E * 3 * H * I)
    # bits from the files = the bits the optimizer planned = the layers' storage bits; within target
    assert got["bits"] == m.params["planned_bits"] == sum(layer["storage_bits"] for layer in m.metrics["layers"])
    assert BPW - 0.1 < got["bpw"] <= BPW
    print(f"{family}: {got['bpw']:.4f} bpw stored (target {BPW})")
    # one option row for all the experts of a layer (exllamav2 quant_moe_mlp: strat["w1"|"w3"|"w2"])
    for layer in m.metrics["layers"]:
        opts = layer["options"]
        for j in range(3):
            assert len({opts[arch.expert_linear(e, j)] for e in range(E)}) == 1


@pytest.mark.parametrize("family", FAMILIES)
def test_measurement_has_exllamav2s_moe_slot(family, runs):
    """measurement.json: ``model.layers.N.block_sparse_moe`` with the 17 MLP rows as ``w1``/``w3``/``w2``
    and ``total_bits`` summed over the experts (exllamav2 measure.py ``measure_moe_mlp``)."""
    out = runs(family)["out"]
    cfg = CheckpointReader(out).config
    arch = get_arch(cfg)
    doc = json.loads((out / "measurement.json").read_text())
    for i in range(cfg["num_hidden_layers"]):
        entries = doc["measurement"][f"model.layers.{i}.block_sparse_moe"]
        assert len(entries) == len(MLP_OPTIONS) == 17
        assert f"model.layers.{i}.mlp" not in doc["measurement"]
        for entry, row in zip(entries, MLP_OPTIONS):
            assert {k for k in entry if k not in ("accuracy", "total_bits")} == {"w1", "w3", "w2"}
            want = sum(exllamav2_total_bits(row[role], *reversed(arch.linear_shape(arch.expert_linear(e, j), cfg)))
                       for e in range(4) for j, role in enumerate(("gate", "up", "down")))
            assert entry["total_bits"] == want and 0 < entry["accuracy"] <= 1


@pytest.mark.parametrize("family", FAMILIES)
def test_same_bytes_for_the_same_seed_with_expert_chunk_and_a_reused_measurement(family, runs, tmp_path):
    r = runs(family)
    files = ["model.safetensors", "measurement.json", "config.json"]
    _run(r["src"], r["cal"], tmp_path / "again")
    assert_same_files(r["out"], tmp_path / "again", output_files(r["out"]))
    _run(r["src"], r["cal"], tmp_path / "chunk", exec_cfg=dataclasses.replace(CPU, expert_chunk=3))
    assert_same_files(r["out"], tmp_path / "chunk", files)
    _run(r["src"], r["cal"], tmp_path / "reuse", measurement=r["out"] / "measurement.json")
    assert_same_files(r["out"], tmp_path / "reuse", files)


def test_resume_after_a_kill_in_a_sparse_layer_writes_the_same_bytes(runs, tmp_path):
    from quantize.methods.exl2_layer import Exl2MeasureMethod

    r = runs("qwen3_moe")
    with replaced(Exl2MeasureMethod, "process_layer", killed_at(Exl2MeasureMethod, 1)), pytest.raises(KeyboardInterrupt):
        _run(r["src"], r["cal"], tmp_path / "q")
    with replaced(Exl2QuantMethod, "process_layer", killed_at(Exl2QuantMethod, 1)), pytest.raises(KeyboardInterrupt):
        _run(r["src"], r["cal"], tmp_path / "q")
    resumed: list[int] = []
    with replaced(Exl2QuantMethod, "process_layer", recording(Exl2QuantMethod, resumed)):
        m = _run(r["src"], r["cal"], tmp_path / "q")
    assert resumed == [1]
    assert_same_files(r["out"], tmp_path / "q", output_files(r["out"]))
    assert m.metrics["moe"] == r["m"].metrics["moe"]


@pytest.mark.parametrize("family", FAMILIES)
def test_coverage_is_in_the_manifest(family, runs):
    m = runs(family)["m"]
    assert m.params["moe_calibration"] == "routed" and m.params["moe_fallback"] == "all"
    cov = m.metrics["moe"]
    assert cov["sparse_layers"] == 2 and cov["experts"] == 4 and cov["top_k"] == 2
    assert cov["solved"] == {"routed": 8, "all": 0, "rtn": 0}
    for layer in m.metrics["layers"]:
        rec = layer["moe"]
        assert rec["tokens"] == 8 * 64 and sum(rec["seen"]) >= rec["tokens"]


@pytest.mark.parametrize("fallback", ["all", "rtn"])
def test_starved_experts_take_the_declared_fallback(fallback, runs, tmp_path):
    """--moe-min-tokens above some experts' share: they are solved by the fallback (all-token
    Hessian, or RTN on the EXL2 grid), listed in the manifest; the file still reads back exactly."""
    r = runs("mixtral")
    solved: dict[str, torch.Tensor] = {}
    with replaced(Exl2QuantMethod, "process_layer", keeping_outputs(Exl2QuantMethod, solved)):
        m = _run(r["src"], r["cal"], tmp_path / "q", moe_min_tokens=0.5, moe_fallback=fallback)
    cov = m.metrics["moe"]
    starved = sum(len(v) for v in cov["fallback_experts"].values())
    assert starved > 0 and cov["solved"][fallback] == starved and cov["solved"]["routed"] == 8 - starved
    assert m.params["moe_min_tokens"] == 0.5 and m.params["moe_fallback"] == fallback
    reader = open_model(tmp_path / "q")
    for name, W_hat in solved.items():
        assert torch.equal(reader.get(name).float(), W_hat), name


@pytest.mark.parametrize("family", FAMILIES)
def test_tensors_are_what_exllamav2s_moe_loader_reads(family, runs):
    out = runs(family)["out"]
    reader = CheckpointReader(out)
    cfg = reader.config
    keys = EXLLAMAV2_KEYS[family]
    E = cfg.get("num_local_experts") or cfg.get("num_experts")
    H = cfg["hidden_size"]
    # config.py: num_experts from num_local_experts | num_experts, num_experts_per_token from
    # num_experts_per_tok, and for is_moe archs the expert width from moe_intermediate_size if present
    I = cfg.get("moe_intermediate_size") or cfg["intermediate_size"]
    assert E == 4 and cfg["num_experts_per_tok"] == 2
    packed = packed_linears(reader)
    for i in range(cfg["num_hidden_layers"]):
        key = f"model.layers.{i}"
        for e in range(E):
            # moe_mlp.py ExLlamaV2MoEMLP.__init__: ExLlamaV2Linear(w1: hidden -> I, w2: I -> hidden,
            # w3: hidden -> I, bias = archparams.mlp_bias = False), keys with "*" -> expert index
            for km, (K, N) in (("mlp_gate", (H, I)), ("mlp_up", (H, I)), ("mlp_down", (I, H))):
                name = key + keys[km].replace("*", str(e))
                # module.py load_weight: EXL2 iff <key>.q_weight exists; loads q_weight, q_invperm,
                # q_scale, q_scale_max, q_groups (q_perm optional, derived from q_invperm)
                assert name in packed and name + ".weight" not in reader and name + ".bias" not in reader, name
                t = {s: reader.get(f"{name}.{s}") for s in SUFFIXES if f"{name}.{s}" in reader}
                check_exl2_tensors(t, name)  # ext.py make_q_matrix / C++ make_q_matrix dtype and shape checks
                assert t["q_invperm"].shape == (K,) and t["q_weight"].shape[1] == padded_columns(N) == N, name
                assert t["q_weight"].dtype == torch.int32 and t["q_scale_max"].dtype == torch.float16
        # the router: ExLlamaV2Linear(key + mlp_expert_gate, hidden, num_experts, bias False, pad32 False),
        # unquantized: load_weight takes <key>.weight and casts it .half()
        gate = key + keys["mlp_expert_gate"]
        assert gate not in packed and gate + ".q_weight" not in reader
        assert tuple(reader.shape(gate + ".weight")) == (E, H) and reader.dtype(gate + ".weight").is_floating_point
        assert torch.equal(reader.get(gate + ".weight"), CheckpointReader(runs(family)["src"]).get(gate + ".weight"))
    # nothing else of the experts is stored (every expert tensor is one exllamav2 reads)
    want = {f"model.layers.{i}" + keys[km].replace("*", str(e)) + "." + s for i in range(cfg["num_hidden_layers"])
            for e in range(E) for km in ("mlp_gate", "mlp_up", "mlp_down") for s in PACKED_SUFFIXES}
    assert {n for n in reader.names() if ".experts." in n} == want


@pytest.mark.parametrize("family, extra, words", [
    ("qwen2_moe", {}, ["qwen2_moe", "exllamav2", "quantize gptq", "quantize awq", "quantize gguf"]),
    ("deepseek_v3", {}, ["deepseek_v3", "exllamav2", "quantize gptq", "quantize awq", "quantize gguf"]),
    ("qwen3_moe", {}, ["norm_topk_prob", "renormalises", "quantize gptq"]),  # transformers' default: false
    ("qwen3_moe", {"norm_topk_prob": True, "mlp_only_layers": [0]}, ["dense", "[0]", "quantize gptq"]),
])
def test_unsupported_moe_models_exit_2_in_one_line(family, extra, words, tiny_model_dir, calib_for, tmp_path, capsys):
    model = tiny_model_dir(family, **extra)
    out = tmp_path / "out"
    line = refused_in_one_line(["exl2", "--model", str(model), "--calibration", str(calib_for(model)), "--bpw", "5",
                                "--out", str(out)], out, capsys)
    assert all(w in line for w in words), line


def test_cli_takes_the_moe_options(runs, tmp_path, capsys):
    from quantize.cli import main

    r = runs("mixtral")
    out = tmp_path / "q"
    argv = ["exl2", "--model", str(r["src"]), "--calibration", str(r["cal"]), "--bpw", str(BPW), "--device", "cpu",
            "--measurement-rows", str(ROWS), "--expert-chunk", "2", "--moe-min-tokens", "0.01", "--out", str(out)]
    assert main(argv) == 0
    assert "bpw over the decoder linears" in capsys.readouterr().out
    m = mf.load_manifest(out)
    assert m.params["expert_chunk"] == 2 and m.params["moe_min_tokens"] == 0.01
    bad = tmp_path / "bad"
    line = refused_in_one_line(argv[:-1] + [str(bad), "--moe-min-tokens", "1.5"], bad, capsys)
    assert "--moe-min-tokens" in line, line


@pytest.mark.parametrize("family, extra, listed", [
    ("mixtral", {}, True), ("qwen3_moe", {"norm_topk_prob": True}, True),
    ("qwen3_moe", {}, False), ("qwen2_moe", {}, False), ("deepseek_v3", {}, False),
])
def test_plan_lists_exl2_only_where_it_is_written(family, extra, listed, tiny_model_dir):
    """``quantize plan`` has EXL2 rows for the MoE models `quantize exl2` writes (exllamav2 runs
    them), none for those it refuses; the rows' layer bytes count every expert at the row's bpw."""
    from quantize.plan import plan

    cfg = CheckpointReader(tiny_model_dir(family, **extra)).config
    rows = [r for r in plan(cfg)["rows"] if r["method"] == "exl2"]
    assert bool(rows) == listed
    arch = get_arch(cfg)
    for r in rows:
        assert r["detail"]["layers"] >= decoder_weights(arch, cfg) * r["bits"] / 8
