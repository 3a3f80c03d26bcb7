"""Host allocation policy of the layer loop (executor/memory.py): ``flat`` and ``pooled``.

The claims: the policy changes memory and speed only, never bytes; ``flat`` is the default;
``pooled`` keeps what outlives a layer off the heap and hands the heap's free pages back after each
layer (that is what keeps peak RSS flat in depth); bad values are refused.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch

from quantize.executor import memory
from quantize.executor.loop import ExecConfig

from helpers import CPU, assert_same_files, output_files, run_gptq

pytestmark = pytest.mark.usefixtures("one_thread")

glibc = pytest.mark.skipif(not sys.platform.startswith("linux") or memory._glibc() is None,
                           reason="the heap policies tune glibc malloc")


@pytest.fixture(autouse=True)
def _restore_flat():
    yield
    if memory._glibc() is not None:
        memory.host_heap("flat")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def _mapping_of(ptr: int) -> str:
    """The /proc/self/maps line of the mapping holding address ``ptr``."""
    with open("/proc/self/maps") as f:
        for line in f:
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if lo <= ptr < hi:
                return line.strip()
    raise AssertionError(f"{ptr:#x} is in no mapping")


@glibc
@pytest.mark.parametrize("lockstep", [True, False])
def test_flat_and_pooled_give_the_same_bytes(lockstep, tiny_llama, calib_for, tmp_path):
    cal = calib_for(tiny_llama)
    runs = {}
    for mode in ("flat", "pooled"):
        cfg = dataclasses.replace(CPU, host_heap=mode, lockstep=lockstep)
        runs[mode] = run_gptq(tiny_llama, cal, tmp_path / mode, exec_cfg=cfg)
        assert runs[mode].metrics["host_heap"] == mode
    assert_same_files(tmp_path / "flat", tmp_path / "pooled", output_files(tmp_path / "flat"))
    assert runs["flat"].metrics["layers"][0]["rel_error"] == runs["pooled"].metrics["layers"][0]["rel_error"]


@glibc
def test_flat_is_the_default(tiny_llama, calib_for, tmp_path):
    assert ExecConfig().host_heap == "flat"
    assert run_gptq(tiny_llama, calib_for(tiny_llama), tmp_path / "q").metrics["host_heap"] == "flat"


def _churn(n: int) -> torch.Tensor:
    """Allocate ``n`` x 4 MiB (heap blocks in the pooled mode), free them; returns a live block
    allocated after them, which keeps the heap top from shrinking on its own."""
    blocks = [torch.ones(1 << 20) for _ in range(n)]
    pin = torch.ones(1 << 18)
    del blocks
    return pin


@glibc
def test_pooled_keeps_freed_blocks_until_release_hands_them_back():
    assert memory.host_heap("pooled")
    memory.release()  # no free pages left over from earlier tests in this process
    before = _rss()
    pin = _churn(48)  # 192 MiB allocated and freed
    kept = _rss()
    assert kept > before + (128 << 20), "freed heap blocks stay resident (reused without faults) until release()"
    memory.release()
    assert _rss() < kept - (128 << 20), f"release() returned only {(kept - _rss()) >> 20} MiB of 192"
    del pin


@glibc
def test_flat_returns_large_blocks_on_free():
    # a fresh process: in this one, earlier pooled runs left free heap chunks that large
    # allocations may reuse (release() trims their pages, but the chunks stay)
    code = """
import torch
from quantize.executor import memory
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
assert memory.host_heap("flat")
warm = [torch.ones(1 << 20) for _ in range(4)]
del warm  # with glibc's default dynamic threshold this moves later 4 MiB blocks onto the heap
blocks = [torch.ones(1 << 20) for _ in range(24)]
pin = torch.ones(1 << 17)  # a small heap block above them: the heap top cannot shrink past it
before = rss()
del blocks
print(before - rss())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(out.stdout.split()[-1]) > 64 << 20, "flat: freed 1 MiB+ blocks go back to the OS at once"


@glibc
def test_offheap_copy_lives_in_its_own_mapping():
    memory.host_heap("pooled")
    t = torch.arange(3 * 1000, dtype=torch.float32).view(3, 1000)
    c = memory.offheap_copy(t)
    assert torch.equal(c, t) and c.dtype == t.dtype and c.shape == t.shape
    assert "[heap]" not in _mapping_of(c.data_ptr())
    assert memory.offheap_copy(torch.empty(0, 5)).shape == (0, 5)


@glibc
def test_pooled_parks_hidden_states_off_the_heap(tiny_llama, calib_for):
    from quantize.arch import get_arch
    from quantize.calibration import load_calibration
    from quantize.executor.loop import LayerStreamer
    from quantize.io.reader import CheckpointReader

    reader = CheckpointReader(tiny_llama)
    s = LayerStreamer(tiny_llama, reader, get_arch(reader.config), dataclasses.replace(CPU, host_heap="pooled"))
    ids, _ = load_calibration(calib_for(tiny_llama))
    s.capture(ids[:8].long())
    before = [b.hidden.clone() for b in s.batches]
    assert s.apply_host_heap() == "pooled"
    for b, h in zip(s.batches, before):
        assert torch.equal(b.hidden, h)
        assert "[heap]" not in _mapping_of(b.hidden.data_ptr())
    s.load_layer(0)
    s.run_layer(0, propagate=True)
    assert all("[heap]" not in _mapping_of(b.hidden.data_ptr()) for b in s.batches)
    s.release_layer(0)


def test_bad_mode_is_refused():
    with pytest.raises(ValueError, match="host_heap"):
        ExecConfig(host_heap="jemalloc")
    with pytest.raises(ValueError, match="unknown host heap mode"):
        memory.host_heap("huge")


@pytest.mark.parametrize("flag", ["flat", "pooled"])
def test_cli_host_heap_flag(flag, tiny_llama, calib_for, tmp_path):
    from quantize import manifest as mf
    from quantize.cli import main

    out = tmp_path / "q"
    rc = main(["gptq", "--model", str(tiny_llama), "--calibration", str(calib_for(tiny_llama)), "--out", str(out),
               "--device", "cpu", "--group-size", "32", "--host-heap", flag])
    assert rc == 0
    expected = flag if memory._glibc() is not None else None
    assert mf.load_manifest(out).metrics["host_heap"] == expected


def test_cli_refuses_an_unknown_host_heap(tiny_llama, calib_for, tmp_path, capsys):
    from quantize.cli import main

    rc = main(["gptq", "--model", str(tiny_llama), "--calibration", str(calib_for(tiny_llama)),
               "--out", str(tmp_path / "q"), "--host-heap", "tcmalloc"])
    assert rc == 2
    assert "tcmalloc" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()
