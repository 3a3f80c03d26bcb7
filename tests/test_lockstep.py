"""Lock-step layer execution: one forward per layer, every batch paused at each group of linears.

The claim that makes it safe to pick automatically: outputs are byte-identical to the one-pass-per-
group executor, for every family and method that uses ``LayerContext.sequential``.
"""

from __future__ import annotations

import dataclasses
import threading

import pytest
import torch

from quantize.commands.exl2 import quantize_exl2
from quantize.errors import RuntimeFault
from quantize.executor.context import LayerContext
from quantize.executor.loop import LayerStreamer
from quantize.io.reader import CheckpointReader
from quantize.arch import get_arch
from quantize.calibration import load_calibration
from quantize.testing.tiny import FAMILIES

from helpers import CPU, assert_same_files, output_files, run_gptq

pytestmark = pytest.mark.usefixtures("one_thread")

LOCK = dataclasses.replace(CPU, lockstep=True)
MULTI = dataclasses.replace(CPU, lockstep=False)


@pytest.mark.parametrize("family", FAMILIES)
def test_gptq_lockstep_output_is_byte_identical(family, tiny_model_dir, calib_for, tmp_path):
    model = tiny_model_dir(family)
    cal = calib_for(model)
    a = run_gptq(model, cal, tmp_path / "lock", exec_cfg=LOCK)
    b = run_gptq(model, cal, tmp_path / "multi", exec_cfg=MULTI)
    assert_same_files(tmp_path / "lock", tmp_path / "multi", output_files(tmp_path / "lock"))
    groups = len(get_arch(CheckpointReader(model).config).group_names())
    assert [m["forward_passes"] for m in a.metrics["layers"]] == [1] * len(a.metrics["layers"])
    assert [m["forward_passes"] for m in b.metrics["layers"]] == [groups + 1] * len(b.metrics["layers"])
    assert a.metrics["layers"][0]["rel_error"] == b.metrics["layers"][0]["rel_error"]


def test_rtn_lockstep_output_is_byte_identical(tiny_llama, calib_for, tmp_path):
    cal = calib_for(tiny_llama)
    run_gptq(tiny_llama, cal, tmp_path / "lock", rtn=True, exec_cfg=LOCK)
    run_gptq(tiny_llama, cal, tmp_path / "multi", rtn=True, exec_cfg=MULTI)
    assert_same_files(tmp_path / "lock", tmp_path / "multi", output_files(tmp_path / "lock"))


def test_exl2_lockstep_output_is_byte_identical(tiny_llama, calib_for, tmp_path):
    cal = calib_for(tiny_llama)
    runs = {}
    for label, cfg in (("lock", LOCK), ("multi", MULTI)):
        runs[label] = quantize_exl2(model_dir=tiny_llama, calibration=cal, out=tmp_path / label, bpw=4.0,
                                    head_bits=6, exec_cfg=cfg)
    assert_same_files(tmp_path / "lock", tmp_path / "multi", output_files(tmp_path / "lock"))


# -- the runner itself ---------------------------------------------------------------------------


@pytest.fixture
def streamer(tiny_llama, calib_for):
    reader = CheckpointReader(tiny_llama)
    s = LayerStreamer(tiny_llama, reader, get_arch(reader.config), LOCK)
    ids, _ = load_calibration(calib_for(tiny_llama))
    s.capture(ids)
    return s


def _worker_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("layer") and "-batch" in t.name]


def test_pauses_see_every_batch_in_order_before_solving(streamer):
    ctx = LayerContext(streamer, 0, streamer.load_layer(0))
    names = ["self_attn.o_proj", "self_attn.q_proj", "mlp.down_proj"]  # given out of order on purpose
    log: list[tuple[str, str, int]] = []
    ctx.sequential(names, lambda n, x: log.append(("collect", n, x.shape[0])), lambda n: log.append(("solve", n, 0)))
    per_batch = streamer.batches[0].hidden.shape[:-1].numel()
    n = len(streamer.batches)
    expected = []
    for name in ["self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj"]:
        expected += [("collect", name, per_batch)] * n + [("solve", name, 0)]
    assert log == expected
    assert ctx.propagated and ctx.forward_passes == 1


def test_weights_set_while_paused_are_used_downstream(streamer):
    """Zeroing v_proj when the batches pause at o_proj changes nothing seen at o_proj this pass,
    but zeroing it at q_proj's pause makes o_proj's input exactly zero (attention of zero values)."""
    ctx = LayerContext(streamer, 0, streamer.load_layer(0))
    seen: dict[str, list[torch.Tensor]] = {"self_attn.o_proj": []}

    def solve(name):
        if name == "self_attn.q_proj":
            ctx.set_weight("self_attn.v_proj", torch.zeros_like(ctx.weight("self_attn.v_proj")))

    ctx.sequential(["self_attn.q_proj", "self_attn.o_proj"],
                   lambda n, x: seen.setdefault(n, []).append(x.clone()), solve)
    assert len(seen["self_attn.o_proj"]) == len(streamer.batches)
    assert all(not x.any() for x in seen["self_attn.o_proj"])


def test_error_in_solve_propagates_and_leaves_no_thread(streamer):
    ctx = LayerContext(streamer, 0, streamer.load_layer(0))
    before = streamer.hidden_states()

    def solve(name):
        if name == "self_attn.o_proj":
            raise RuntimeFault("solver failed")

    with pytest.raises(RuntimeFault, match="solver failed"):
        ctx.sequential(["self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj"], lambda n, x: None, solve)
    assert not _worker_threads()
    assert not ctx.propagated
    assert all(a is b for a, b in zip(before, streamer.hidden_states()))  # nothing half-propagated


def test_error_in_a_batch_forward_propagates(streamer):
    ctx = LayerContext(streamer, 0, streamer.load_layer(0))
    calls = {"n": 0}

    def collect(name, x):
        calls["n"] += 1
        if calls["n"] == 2:  # the second batch's forward fails at q_proj
            raise ValueError("boom in batch 1")

    with pytest.raises(ValueError, match="boom in batch 1"):
        ctx.sequential(["self_attn.q_proj", "mlp.down_proj"], collect, lambda n: None)
    assert not _worker_threads()


def test_module_not_reached_in_order_is_a_runtime_fault(streamer):
    layer = streamer.load_layer(0)
    stops = [layer.get_submodule("mlp.down_proj"), layer.get_submodule("self_attn.q_proj")]  # reversed
    with pytest.raises(RuntimeFault, match="did not pass"):
        streamer.run_layer_lockstep(0, stops, lambda k: None)
    assert not _worker_threads()


def test_auto_mode_follows_the_memory_budget(tiny_llama, calib_for):
    reader = CheckpointReader(tiny_llama)
    ids, _ = load_calibration(calib_for(tiny_llama))
    decided = {}
    for budget in (1, 1 << 40):
        s = LayerStreamer(tiny_llama, reader, get_arch(reader.config), dataclasses.replace(CPU, lockstep_budget=budget))
        s.capture(ids)
        need = s.lockstep_bytes()
        # tokens x (2 hidden + intermediate) x 4 bytes (fp32)
        assert need == ids.numel() * (2 * s.config.hidden_size + s.config.intermediate_size) * 4
        decided[budget] = s.lockstep_fits()
    assert decided == {1: False, 1 << 40: True}


# -- prefetch: the next layer's tensors are read while this one computes -------------------------


def test_next_layer_is_prefetched_and_used(tiny_llama, calib_for, tmp_path):
    reader = CheckpointReader(tiny_llama)
    s = LayerStreamer(tiny_llama, reader, get_arch(reader.config), CPU)
    s.load_layer(0)
    pending = s._prefetched[1]
    pending.thread.join()
    assert sorted(pending.tensors) == sorted(n for n in reader.names() if n.startswith("model.layers.1."))
    reads: list[str] = []
    orig = reader.get
    reader.get = lambda name, *a, **k: (reads.append(name), orig(name, *a, **k))[1]
    try:
        layer = s.load_layer(1)
    finally:
        reader.get = orig
    assert not reads  # every tensor of layer 1 came from the prefetch
    for local, p in layer.named_parameters():
        assert torch.equal(p, orig("model.layers.1." + local).float())


def test_prefetch_read_error_surfaces_in_the_layer_loop(tiny_llama):
    reader = CheckpointReader(tiny_llama)
    s = LayerStreamer(tiny_llama, reader, get_arch(reader.config), CPU)
    orig = reader.get

    def failing(name, *a, **k):
        if name.startswith("model.layers.1."):
            raise RuntimeFault(f"{name}: read failed")
        return orig(name, *a, **k)

    reader.get = failing
    s.load_layer(0)
    with pytest.raises(RuntimeFault, match="model.layers.1.*read failed"):
        s.load_layer(1)


def test_prefetch_off_gives_the_same_bytes(tiny_llama, calib_for, tmp_path):
    cal = calib_for(tiny_llama)
    run_gptq(tiny_llama, cal, tmp_path / "on", exec_cfg=CPU)
    run_gptq(tiny_llama, cal, tmp_path / "off", exec_cfg=dataclasses.replace(CPU, prefetch=False))
    assert_same_files(tmp_path / "on", tmp_path / "off", output_files(tmp_path / "on"))


@pytest.mark.parametrize("flag,passes", [("--lockstep", 1), ("--no-lockstep", 5)])
def test_cli_lockstep_flag(flag, passes, tiny_llama, calib_for, tmp_path):
    from quantize import manifest as mf
    from quantize.cli import main

    out = tmp_path / "q"
    rc = main(["gptq", "--model", str(tiny_llama), "--calibration", str(calib_for(tiny_llama)), "--out", str(out),
               "--device", "cpu", "--group-size", "32", flag])
    assert rc == 0
    layers = mf.load_manifest(out).metrics["layers"]
    assert [m["forward_passes"] for m in layers] == [passes] * len(layers)  # llama: 4 groups (+1 propagating pass)
