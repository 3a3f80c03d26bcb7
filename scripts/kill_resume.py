"""SIGKILL a CPU GPTQ run at several layers, rerun the same command, compare hashes.

    python scripts/kill_resume.py [--layers 6] [--kill-at 1 3 5] [--workdir DIR]

Builds a tiny random Llama with ``--layers`` decoder layers, samples calibration, runs one
uninterrupted `quantize gptq`, then for each K in ``--kill-at`` starts the same command, kills it
with SIGKILL as soon as layer K-1 has reported (so during layer K), checks that nothing complete
exists at the output, reruns the identical command and compares the sha256 of every output file
with the uninterrupted run. Exit 0 only when all match.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path


def sha_tree(d: Path) -> dict[str, str]:
    return {p.relative_to(d).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file() and p.name != "manifest.json"}


def gptq_cmd(model: Path, cal: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "quantize", "--json-logs", "gptq", "--model", str(model), "--calibration", str(cal),
            "--out", str(out), "--device", "cpu", "--bits", "4", "--group-size", "32", "--batch-size", "4"]


def run_and_kill(cmd: list[str], kill_after_layer: int) -> bool:
    """Start ``cmd``; SIGKILL it right after the layer event of ``kill_after_layer``. True if killed."""
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    for line in proc.stderr:
        try:
            ev = json.loads(line)
        except json.JSONDecodeError:
            continue
        if ev.get("event") == "layer" and ev.get("layer") == kill_after_layer:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
    proc.wait()
    return False


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--kill-at", type=int, nargs="+", default=[1, 3, 5])
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args(argv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="kill-resume-"))
    from quantize.calibration import sample_calibration
    from quantize.testing.tiny import build_tiny_model

    model = build_tiny_model("llama", work / "model", num_layers=args.layers)
    cal = work / "cal"
    if not cal.exists():
        sample_calibration(model, "wikitext2", 8, 64, 0, cal)
    ref = work / "reference"
    subprocess.run(gptq_cmd(model, cal, ref), check=True, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    want = sha_tree(ref)
    ok = True
    print(f"{'killed during layer':>20} {'killed':>7} {'partial left':>13} {'layers rerun':>16} {'resumed identical':>18}")
    for k in args.kill_at:
        out = work / f"killed-at-{k}"
        killed = run_and_kill(gptq_cmd(model, cal, out), k - 1)
        partial = (work / f"killed-at-{k}.partial").is_dir() and not out.exists()
        rerun = subprocess.run(gptq_cmd(model, cal, out), check=True, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        redone = sorted(json.loads(ln)["layer"] for ln in rerun.stderr.splitlines()
                        if ln.startswith("{") and json.loads(ln).get("event") == "layer")
        same = sha_tree(out) == want
        resumed = bool(redone) and redone[0] >= k - 1  # completed layers were not redone
        ok &= killed and partial and same and resumed
        print(f"{k:>20} {str(killed):>7} {str(partial):>13} {str(redone):>16} {str(same):>18}")
    print(f"{len(want)} output files compared by sha256 against the uninterrupted run: {'ALL IDENTICAL' if ok else 'MISMATCH'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
