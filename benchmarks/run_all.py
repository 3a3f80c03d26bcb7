"""Run every benchmark in benchmarks/ (what `make bench` does), one after another, and summarise.

Every ``benchmarks/*.py`` except this file and ``common.py`` is run as its own process with its
default arguments; output streams through. Scripts that need something absent (the shared
reference model, the interop virtualenv) say so with a ``SKIP:`` line and exit 0; the summary lists
them with the reason. Benchmarks that compare against peer tools (``INTEROP``) run with
``.venv-interop/bin/python`` (``scripts/setup_interop.sh``) and are skipped when it does not exist;
those that run a peer only in a child process of its own environment (``PEER_CHILD``: llm-compressor
in ``.venv-llmcompressor``, ``scripts/setup_llmcompressor.sh``) run with this interpreter and are
skipped when that environment does not exist. Those that run entirely in a peer's environment
(``PEER_VENV``: llama.cpp's llama-cpp-python in ``.venv-llamacpp``, ``scripts/setup_llamacpp.sh``,
which has this project installed too) run with that environment's interpreter and are skipped when
it does not exist.

    python benchmarks/run_all.py [--only NAME ...] [--exclude NAME ...] [--list]

Exit status: 1 if any benchmark failed (non-zero exit), else 0.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as c  # noqa: E402

HERE = Path(__file__).resolve().parent
NOT_BENCHMARKS = {"run_all.py", "common.py"}
INTEROP = {"gptq_vs_gptqmodel.py", "awq_vs_gptqmodel.py"}  # need gptqmodel: run in the interop virtualenv
INTEROP_PYTHON = c.repo_root() / ".venv-interop" / "bin" / "python"
# run here (our side and the eval need this project's own environment), the peer as a child in its venv
PEER_CHILD = {"ct_vs_llmcompressor.py": (c.repo_root() / ".venv-llmcompressor" / "bin" / "python",
                                         "scripts/setup_llmcompressor.sh or `make peers`")}
# run entirely with the peer environment's interpreter (it has this project installed as well)
PEER_VENV = {"gguf_vs_llamacpp.py": (c.repo_root() / ".venv-llamacpp" / "bin" / "python",
                                     "scripts/setup_llamacpp.sh or `make peers`")}


def discover() -> list[Path]:
    return sorted(p for p in HERE.glob("*.py") if p.name not in NOT_BENCHMARKS and not p.name.startswith("_"))


def run_one(script: Path, python: str) -> tuple[int, str | None, float]:
    """Run ``script``; returns (exit status, skip reason or None, seconds). Output is echoed live."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    t0 = time.perf_counter()
    skip_reason = None
    with subprocess.Popen([python, str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          cwd=c.repo_root(), env=env) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            if line.startswith(c.SKIP_PREFIX):
                skip_reason = line[len(c.SKIP_PREFIX):].strip()
        rc = proc.wait()
    return rc, skip_reason, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", metavar="NAME", help="run only these (file names, with or without .py)")
    ap.add_argument("--exclude", nargs="+", metavar="NAME", default=[], help="do not run these")
    ap.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    args = ap.parse_args()

    norm = lambda names: {n if n.endswith(".py") else n + ".py" for n in names}  # noqa: E731
    scripts = discover()
    if args.only:
        unknown = norm(args.only) - {s.name for s in scripts}
        if unknown:
            print(f"unknown benchmark(s): {', '.join(sorted(unknown))}; known: {', '.join(s.name for s in scripts)}")
            return 2
        scripts = [s for s in scripts if s.name in norm(args.only)]
    scripts = [s for s in scripts if s.name not in norm(args.exclude)]
    if args.list:
        for s in scripts:
            note = "  (interop virtualenv)" if s.name in INTEROP else ""
            if s.name in PEER_CHILD:
                note = f"  (peer child in {PEER_CHILD[s.name][0].parent.parent.name})"
            if s.name in PEER_VENV:
                note = f"  ({PEER_VENV[s.name][0].parent.parent.name})"
            print(s.name + note)
        return 0

    print(f"device: {c.cpu_model()}; {len(scripts)} benchmarks; shared assets: {c.shared_dir() or 'absent'}")
    summary: list[tuple[str, str, float]] = []
    for script in scripts:
        python = sys.executable
        if script.name in INTEROP:
            if not INTEROP_PYTHON.is_file():
                reason = f"no {INTEROP_PYTHON.parent.parent.name} (run scripts/setup_interop.sh or `make interop`)"
                print(f"\n=== {script.name}: skipped, {reason}")
                summary.append((script.name, f"skipped: {reason}", 0.0))
                continue
            python = str(INTEROP_PYTHON)
        if script.name in PEER_VENV:
            peer_python, how = PEER_VENV[script.name]
            if not peer_python.is_file():
                reason = f"no {peer_python.parent.parent.name} (run {how})"
                print(f"\n=== {script.name}: skipped, {reason}")
                summary.append((script.name, f"skipped: {reason}", 0.0))
                continue
            python = str(peer_python)
        if script.name in PEER_CHILD and not PEER_CHILD[script.name][0].is_file():
            peer_python, how = PEER_CHILD[script.name]
            reason = f"no {peer_python.parent.parent.name} (run {how})"
            print(f"\n=== {script.name}: skipped, {reason}")
            summary.append((script.name, f"skipped: {reason}", 0.0))
            continue
        print(f"\n=== {script.name} ({Path(python).parent.parent.name}) ===", flush=True)
        rc, skip_reason, seconds = run_one(script, python)
        if rc != 0:
            status = f"FAILED (exit {rc})"
        elif skip_reason is not None:
            status = f"skipped: {skip_reason}"
        else:
            status = "ok"
        summary.append((script.name, status, seconds))

    print("\n=== summary ===")
    c.print_table(["benchmark", "result", "seconds"], [[n, s, t] for n, s, t in summary])
    return 1 if any(s.startswith("FAILED") for _, s, _ in summary) else 0


if __name__ == "__main__":
    sys.exit(main())
