"""DeepSeek-V3 without ``q_lora_rank`` (Moonlight-16B-A3B style: ``model_type: deepseek_v3``,
``q_lora_rank: null``, a plain ``self_attn.q_proj`` in place of q_a_proj / q_a_layernorm / q_b_proj).

The architecture table holds it as a config-selected :class:`quantize.arch.Variant` of ``deepseek_v3``;
these tests run the tiny model of that form (``quantize/testing/tiny.py`` ``VARIANTS``:
``deepseek_v3_noqlora``, layer 0 dense, layer 1 sparse with 4 experts and a shared expert) through:

* the table against transformers' own model (tests/test_moe.py's checks, reused, not copied: tensor
  names, module names/shapes/biases/groups/execution order, the in-memory view, the streamed forward,
  every expert's Hessians by brute force), and every attention / dense / shared-expert group's
  Hessian against 2/n XᵀX of what transformers feeds the module;
* every format that takes DeepSeek-V3: GPTQ and compressed-tensors (GPTQ, RTN), AWQ (both formats),
  FP8 and GGUF: what is written is what the layer loop solved, and our read-back model's logits are
  what the streamed forward of the output computes; transformers loads the compressed-tensors
  outputs with our read-back's logits; gguf-py reads ``attn_q`` (and no q_a tensors) and the reader
  rebuilds ``q_lora_rank: null`` from the metadata alone;
* `quantize plan` (parameters and bytes as written), and the refusals (EXL2; a config without the
  key) with exit 2 and one line.

The larger GGUF checks (K-quants, calibration, llama.cpp's reference bytes): tests/test_gguf_moe.py
(``deepseek_v3_noqlora``); llama.cpp itself: tests/test_interop_llamacpp_moe.py.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open

import test_moe  # its checks run here on the variant (a module import: its tests are not collected twice)
from helpers import CPU, assert_reads_back_close, hf_model, keeping_outputs, refused_in_one_line, replaced, run_gptq
from helpers import layer_context, tiny_model_edited
from quantize.arch import by_name, get_arch
from quantize.cli import main
from quantize.io.quantized import load_dequantized_model, open_model
from quantize.io.reader import CheckpointReader
from quantize.testing.tiny import VARIANTS

pytestmark = pytest.mark.usefixtures("one_thread")

NOQ = "deepseek_v3_noqlora"
IDS = test_moe.IDS
Q_LINEARS = ("self_attn.q_a_proj", "self_attn.q_b_proj")  # what the variant has not


@pytest.fixture(scope="module")
def noq(tmp_path_factory):
    """The tiny no-q-lora DeepSeek-V3 with a non-zero router correction bias (a buffer on disk)."""
    return tiny_model_edited(NOQ, tmp_path_factory.mktemp("noq"), test_moe.ROUTER_BIAS)


def _dirs(model):
    """A ``tiny_model_dir`` for test_moe's checks that hands out ``model`` for the family."""
    return lambda family, **kw: model


# -- the architecture table ---------------------------------------------------------------------


def test_the_config_selects_the_variant(noq):
    cfg = CheckpointReader(noq).config
    assert VARIANTS[NOQ][0] == "deepseek_v3" and cfg["model_type"] == "deepseek_v3" and cfg["q_lora_rank"] is None
    arch, base = get_arch(cfg), by_name("deepseek_v3")
    assert arch.name == base.name == "deepseek_v3" and arch != base
    assert arch.group_names()[0] == ["self_attn.q_proj", "self_attn.kv_a_proj_with_mqa"]
    assert not set(Q_LINEARS) & set(arch.linear_names()) and "self_attn.q_a_layernorm" not in arch.layer_norms
    assert arch.scale_pairs[0].prev == "input_layernorm"
    assert arch.scale_pairs[0].linears == ("self_attn.q_proj", "self_attn.kv_a_proj_with_mqa")
    assert arch.linear_shape("self_attn.q_proj", cfg) == (4 * (16 + 16), 64)  # heads x (nope + rope), hidden
    assert "q_lora" not in arch.dims(cfg)
    # transformers builds q_proj without a bias whatever attention_bias says; kv_a and o take it
    biased = {**cfg, "attention_bias": True}
    assert not arch.has_bias("self_attn.q_proj", biased) and arch.has_bias("self_attn.o_proj", biased)
    # q_lora_rank set (DeepSeek-V3): the family's own entry, unchanged
    assert get_arch({**cfg, "q_lora_rank": 32}) is base
    assert base.group_names()[0] == ["self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa"]
    # resolving again is the same form
    assert arch.for_config(cfg) is arch and get_arch(cfg) == arch


def test_a_config_without_the_key_exits_2_naming_it(noq, tmp_path, capsys):
    """transformers would take its default rank (1536) for a config.json without ``q_lora_rank``:
    we cannot tell the checkpoint's layout from it, so it is refused, naming the key."""
    model = tmp_path / "m"
    shutil.copytree(noq, model)
    cfg = json.loads((model / "config.json").read_text())
    del cfg["q_lora_rank"]
    (model / "config.json").write_text(json.dumps(cfg))
    assert main(["plan", "--model", str(model)]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("!!")]
    assert len(err) == 1 and "q_lora_rank" in err[0] and "config.json" in err[0], err


def test_table_names_every_tensor_of_the_checkpoint(noq):
    test_moe.test_table_names_every_tensor_of_the_checkpoint(NOQ, _dirs(noq))


@pytest.mark.parametrize("overrides", [{}, {"attention_bias": True}], ids=["plain", "attention_bias"])
def test_layer_groups_match_the_model_and_its_execution_order(overrides, tiny_model_dir):
    """Module names, shapes, biases (attention_bias: kv_a and o, never q_proj), group order and shared inputs."""
    model = tiny_model_dir(NOQ, **overrides)
    assert "model.layers.0.self_attn.q_proj.weight" in CheckpointReader(model).names()
    test_moe.test_layer_groups_match_the_model_and_its_execution_order(NOQ, _dirs(model))


def test_memory_view_assembles_what_transformers_holds(noq):
    test_moe.test_memory_view_assembles_what_transformers_holds(NOQ, _dirs(noq))


@pytest.mark.parametrize("chunk", [None, 3], ids=["resident", "expert-chunk-3"])
def test_streamed_forward_equals_transformers(noq, chunk):
    test_moe.test_streamed_forward_equals_transformers(NOQ, chunk, _dirs(noq), noq)


def test_expert_hessians_equal_brute_force(noq, calib_for):
    test_moe.test_expert_hessians_equal_brute_force_from_the_eager_expert_loop(NOQ, _dirs(noq), calib_for)


@pytest.mark.parametrize("layer", [0, 1], ids=["dense", "sparse"])
def test_attention_and_mlp_hessians_equal_brute_force(noq, calib_for, layer):
    """Every group but the routed experts (q_proj + kv_a, kv_b, o, the dense MLP / the shared expert),
    as the layer loop collects it: 2/n XᵀX of the input transformers feeds each of the group's modules."""
    from quantize.calibration import load_calibration
    from quantize.executor.moe import MoEOptions

    ids = load_calibration(calib_for(noq))[0][:4]
    reader = CheckpointReader(noq)
    arch = get_arch(reader.config)
    ctx = layer_context(noq, calib_for(noq), layer, samples=4)
    xs: dict[str, list[torch.Tensor]] = {}
    names = [g[0] for g in ctx.groups]
    ctx.sequential(names, lambda n, x: xs.setdefault(n, []).append(x.detach().double()), lambda _n: None,
                   experts=lambda jobs: None, moe=MoEOptions(min_tokens=0.0))
    ours = {n: 2.0 / sum(x.shape[0] for x in v) * sum(x.T @ x for x in v) for n, v in xs.items()}

    hf = hf_model(noq)
    block = hf.model.layers[layer]
    groups = [g for g in arch.layer_groups(reader.config, layer) if g != [arch.moe.experts.module]]
    seen: dict[str, torch.Tensor] = {}
    hooks = [block.get_submodule(n).register_forward_pre_hook(
        lambda m, a, n=n: seen.__setitem__(n, a[0].detach().reshape(-1, a[0].shape[-1]).double()))
        for g in groups for n in g]
    with torch.no_grad():
        hf(ids.long())
    for h in hooks:
        h.remove()
    assert groups[0] == ["self_attn.q_proj", "self_attn.kv_a_proj_with_mqa"]
    assert len(groups) == 5  # q+kv_a, kv_b, o, gate+up, down (the shared expert's in layer 1)
    for g in groups:
        for n in g:
            X = seen[n]
            torch.testing.assert_close(ours[g[0]], 2.0 / X.shape[0] * X.T @ X, rtol=1e-4, atol=1e-6, msg=n)


# -- formats: written = solved; read-back model = streamed forward --------------------------------


def _run(kind: str, model, cal, out):
    """One output of ``kind`` and the method class whose solves it writes."""
    from quantize.commands.awq import quantize_awq
    from quantize.commands.fp8 import quantize_fp8
    from quantize.commands.gguf import quantize_gguf
    from quantize.methods.awq_layer import AWQMethod
    from quantize.methods.fp8 import FP8Method
    from quantize.methods.gguf_layer import GGUFMethod
    from quantize.methods.layer import GPTQMethod, RTNMethod

    if kind == "gptq":
        return GPTQMethod, lambda: run_gptq(model, cal, out, static_groups=True)
    if kind == "ct":
        return GPTQMethod, lambda: run_gptq(model, cal, out, static_groups=True, format="compressed-tensors")
    if kind == "rtn":
        return RTNMethod, lambda: run_gptq(model, cal, out, act_order=False, static_groups=True, rtn=True,
                                           format="compressed-tensors")
    if kind in ("awq", "awq-ct"):
        fmt = "awq" if kind == "awq" else "compressed-tensors"
        return AWQMethod, lambda: quantize_awq(model_dir=model, calibration=cal, out=out, exec_cfg=CPU, group_size=32,
                                               format=fmt)
    if kind == "fp8":
        return FP8Method, lambda: quantize_fp8(model_dir=model, out=out, exec_cfg=CPU)
    assert kind == "gguf"
    return GGUFMethod, lambda: quantize_gguf(model_dir=model, out=out, exec_cfg=CPU, ftype="Q8_0", calibration=cal)


# where each format holds q_proj's quantized weight (its tensors' name suffixes)
Q_STORED = {"gptq": ".qweight", "ct": ".weight_packed", "rtn": ".weight_packed", "awq": ".qweight",
            "awq-ct": ".weight_packed", "fp8": ".weight", "gguf": None}


@pytest.fixture(scope="module")
def outputs(noq, calib_for, tmp_path_factory):
    """kind -> (out dir, manifest, {tensor name: what the layer loop solved / folded}), made once."""
    cache: dict[str, tuple] = {}

    def get(kind: str):
        if kind not in cache:
            out = tmp_path_factory.mktemp(f"noq-{kind}") / "out"
            cls, go = _run(kind, noq, calib_for(noq), out)
            seen: dict[str, torch.Tensor] = {}
            with replaced(cls, "process_layer", keeping_outputs(cls, seen)):
                m = go()
            cache[kind] = (out, m, seen)
        return cache[kind]

    return get


@pytest.mark.parametrize("kind", list(Q_STORED))
def test_every_format_writes_what_it_solved_and_reads_back(kind, outputs, noq):
    out, m, seen = outputs(kind)
    assert m.status == "complete"
    cfg = CheckpointReader(noq).config
    arch = get_arch(cfg)
    back = open_model(out)
    assert get_arch(back.config) == arch
    # every linear of every layer was solved, q_proj included, and is read back as solved
    for i in range(arch.num_layers(cfg)):
        for lin in arch.layer_linears(cfg, i):
            name = arch.layer_prefix(i) + lin + ".weight"
            assert name in seen, name
            assert torch.equal(back.get(name).float(), seen[name].float()), (kind, name)
    assert not any(q in n for n in seen for q in Q_LINEARS)
    for name, t in seen.items():  # AWQ's folded norms and routers too
        assert torch.equal(back.get(name).float(), t.float()), (kind, name)
    if Q_STORED[kind] is not None:
        with safe_open(out / "model.safetensors", "pt") as f:
            keys = set(f.keys())
        q = "model.layers.1.self_attn.q_proj"
        assert q + Q_STORED[kind] in keys and not any(n.startswith(q + ".") and n.endswith(".bias") for n in keys)
        if kind == "fp8":
            with safe_open(out / "model.safetensors", "pt") as f:
                assert f.get_tensor(q + ".weight").dtype == torch.float8_e4m3fn
    # the read-back model is a quantized version of the source (finite, different, close)...
    assert_reads_back_close(noq, out, kind)
    # ...and computes what the streamed forward of the output computes (FP8: the layer loop also
    # rounds the activations to FP8, as the engine does; tests/test_fp8_moe.py)
    if kind != "fp8":
        from quantize.eval.perplexity import final_logits

        with torch.no_grad():
            ref = load_dequantized_model(out).eval()(IDS).logits
        streamed = torch.cat(list(final_logits(out, IDS, CPU)))
        torch.testing.assert_close(streamed, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


def test_gptq_experts_into_both_formats_and_transformers_loads_them(noq, calib_for, tmp_path):
    """tests/test_moe.py's check: GPTQ and compressed-tensors hold the same solve; compressed-tensors'
    decompressor returns our read-back; transformers + compressed-tensors load it (q_proj included)
    with exactly our read-back's logits; every token routed to top-k experts."""
    test_moe.test_gptq_experts_into_both_formats(NOQ, _dirs(noq), noq, calib_for, tmp_path)


def test_transformers_loads_the_rtn_compressed_tensors_with_our_logits(outputs, noq):
    out, _, _ = outputs("rtn")
    lib, ours = hf_model(out), load_dequantized_model(out)
    q = lib.model.layers[0].self_attn.q_proj
    assert q is not None and lib.model.layers[0].self_attn.q_a_proj is None
    with torch.no_grad():
        assert torch.equal(lib(IDS).logits, ours(IDS).logits)
        assert not torch.equal(lib(IDS).logits, hf_model(noq)(IDS).logits)


def test_awq_scales_the_input_norm_into_q_proj_and_kv_a(outputs, noq):
    """The input norm -> (q_proj, kv_a) pair runs in every layer and its scale is folded: the norm
    changed, q_proj's columns took the inverse (the fp function unchanged: test_moe's read-back check)."""
    _, m, seen = outputs("awq")
    src = CheckpointReader(noq)
    for layer in m.metrics["layers"]:
        assert "input_layernorm" in layer["awq_alpha"] and "input_layernorm" in layer["scale_loss"]
        norm = f"model.layers.{layer['layer']}.input_layernorm.weight"
        if layer["awq_alpha"]["input_layernorm"] > 0:
            assert not torch.equal(seen[norm], src.get(norm).float())


def test_lockstep_equals_stopped_passes(noq, calib_for, tmp_path):
    test_moe.test_lockstep_equals_stopped_passes(NOQ, _dirs(noq), calib_for, tmp_path)


def test_gptq_beats_rtn_on_every_expert_that_saw_tokens(noq, calib_for, tmp_path):
    test_moe.test_gptq_beats_rtn_on_every_expert_that_saw_tokens(NOQ, _dirs(noq), calib_for, tmp_path)


# -- GGUF ------------------------------------------------------------------------------------------


def test_gguf_py_reads_attn_q_and_the_reader_rebuilds_the_config(outputs, noq, tmp_path):
    gguf = pytest.importorskip("gguf")
    from quantize.formats.gguf import GGUFCheckpoint

    out, m, _ = outputs("gguf")
    r = gguf.GGUFReader(str(out / "model.gguf"))
    meta = {f.name: f.contents() for f in r.fields.values() if f.types}
    t = {x.name: x for x in r.tensors}
    cfg = CheckpointReader(noq).config
    assert meta["general.architecture"] == "deepseek2" and meta["deepseek2.attention.q_lora_rank"] == 0
    for i in range(2):
        x = t[f"blk.{i}.attn_q.weight"]
        assert tuple(int(s) for s in reversed(x.shape.tolist())) == (4 * 32, 64) and x.tensor_type.name == "Q8_0"
        assert not {f"blk.{i}.{g}.weight" for g in ("attn_q_a", "attn_q_b", "attn_q_a_norm")} & set(t)
        W = CheckpointReader(noq).get(f"model.layers.{i}.self_attn.q_proj.weight").float()
        dense = torch.from_numpy(gguf.quants.dequantize(x.data, x.tensor_type)).reshape(W.shape)
        assert (dense - W).abs().max() < 0.02 * W.abs().max()  # q_proj's rows as they are (no permutation)
    assert m.metrics["tensor_types"]["blk.1.attn_q.weight"] == "Q8_0"
    # without config.json beside it: the metadata's q_lora_rank 0 is null again, the variant is picked
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy2(out / "model.gguf", alone / "model.gguf")
    a, b = GGUFCheckpoint(alone), GGUFCheckpoint(out)
    assert a.config["q_lora_rank"] is None and get_arch(a.config) == get_arch(cfg)
    assert a.names() == b.names() and "model.layers.1.self_attn.q_proj.weight" in a.names()
    for n in a.names():
        assert torch.equal(a.get(n), b.get(n)), n


# -- plan and refusals -----------------------------------------------------------------------------


def test_plan_counts_parameters_and_bytes_as_written(noq, outputs):
    from quantize.formats.gguf_mix import gguf_weight_bytes
    from quantize.plan import MOE_METHODS, Setting, parameter_counts, plan, weight_bytes

    cfg = CheckpointReader(noq).config
    hf = hf_model(noq)
    sd = hf.state_dict()
    on_disk = sum(p.numel() for p in hf.parameters()) + sum(b.numel() for n, b in hf.named_buffers() if n in sd)
    counts = parameter_counts(cfg)
    assert counts["total"] == on_disk
    # the same model with q_lora_rank counts q_a + q_a_layernorm + q_b instead of q_proj
    with_q = parameter_counts({**cfg, "q_lora_rank": 32})["total"]
    assert with_q - counts["total"] == 2 * ((64 * 32 + 32 + 32 * 128) - 128 * 64)
    p = plan(cfg)
    assert {r["method"] for r in p["rows"]} <= set(MOE_METHODS) - {"exl2"}  # exllamav2 runs no DeepSeek
    assert any(r["method"] == "gguf" for r in p["rows"])
    out, _, _ = outputs("ct")
    with safe_open(out / "model.safetensors", "pt") as f:
        written = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())
    assert written == weight_bytes(cfg, Setting("ct", 4, 32), get_arch(cfg))["total"]
    gguf = pytest.importorskip("gguf")
    out, _, _ = outputs("gguf")
    tensors = gguf.GGUFReader(str(out / "model.gguf")).tensors
    assert sum(int(x.n_bytes) for x in tensors) == gguf_weight_bytes(cfg, "Q8_0", get_arch(cfg))["total"]


def test_exl2_refuses_with_exit_2(noq, calib_for, tmp_path, capsys):
    out = tmp_path / "out"
    line = refused_in_one_line(["exl2", "--calibration", str(calib_for(noq)), "--bpw", "4", "--model", str(noq),
                                "--out", str(out)], out, capsys)
    assert "deepseek_v3" in line and "exllamav2" in line, line


def test_merge_lora_on_q_proj_and_fused_experts_is_exact(noq, tmp_path):
    """PEFT LoRA on the plain q_proj and o_proj, and on the fused experts (target_parameters), merges
    exactly (test_moe's merge check: the merged model computes what the PeftModel computes)."""
    test_moe.test_merge_lora_on_attention_and_fused_experts_is_exact(NOQ, _dirs(noq), tmp_path)
