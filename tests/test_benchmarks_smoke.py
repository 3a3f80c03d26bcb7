"""The benchmark scripts that nothing else runs keep working: a shrunken run of each, checking the
figures they print (not their values: timings are the benchmarks' business)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def test_layer70b_runs_and_projects(tmp_path):
    r = subprocess.run([sys.executable, str(BENCH / "layer70b.py"), "--shrink", "16", "--tokens", "1x64",
                        "--threads", "1", "--reps", "1"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    assert "hidden 512, intermediate 1792, 4/1 heads" in out
    for step in ("hessian  q_proj", "prepare  q_proj/k_proj/v_proj", "solve    gate_proj/up_proj", "metrics  down_proj",
                 "pack     o_proj"):
        assert step in out, step
    assert "Projection to 80 layers at 128 x 2048" in out and "| total " in out


def test_layer70b_on_a_missing_gpu_says_so_and_exits_0():
    r = subprocess.run([sys.executable, str(BENCH / "layer70b.py"), "--shrink", "16", "--device", "cuda"],
                       capture_output=True, text=True, timeout=300)
    import torch

    if torch.cuda.is_available():  # a GPU here: the run itself is the check
        assert r.returncode == 0, r.stderr[-3000:]
    else:
        assert r.returncode == 0 and "no CUDA device here" in r.stdout + r.stderr


def test_moe_device_compares_chunked_and_resident_bytes():
    """benchmarks/moe_device.py (the GPU session's MoE check, scripts/gpu_session.sh) on the CPU, shrunk:
    both methods' chunked outputs equal the resident ones, and the table says so."""
    r = subprocess.run([sys.executable, str(BENCH / "moe_device.py"), "--device", "cpu", "--layers", "1", "--hidden", "128",
                        "--experts", "4", "--width", "128", "--chunk", "2", "--samples", "4", "--seq-len", "64"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "gptq: chunked bytes identical to the resident run" in r.stdout
    assert "awq: chunked bytes identical to the resident run" in r.stdout
    assert "--expert-chunk 2" in r.stdout and "peak RSS MB" in r.stdout
