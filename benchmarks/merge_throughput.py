"""Throughput of ``quantize merge lora`` against a plain copy of the same bytes (issue #9 (c)).

Builds, once, a synthetic bf16 Llama (default hidden 2048, intermediate 5632, 16/4 heads, 10
layers, vocab 32000: ~1.16 GB in 2 safetensors shards) with ``common.build_synthetic_llama`` and a
PEFT LoRA adapter for it (r=16, fp32 factors, all seven linears of every layer). Then times, each
in a fresh process, on the same inputs:

* ``cp``: ``cp`` of the shard files (a plain byte copy: the floor);
* ``io``: the loop any caller would write, ``CheckpointReader.get`` -> ``ShardedWriter.add``
  (fresh tensors; the writer spools each tensor and copies it into its shard when full);
* ``io-merge``: the merge's own streaming with nothing to merge (``stream.run_jobs`` over plain
  copy jobs: the writer is given the layout up front and writes each tensor once, in place; reads
  go into one reused buffer);
* ``merge``: ``quantize.merge.merge_lora`` (what ``quantize merge lora`` runs: plan, merge, write,
  hash inputs and outputs into the manifest);
* ``peft``: PEFT ``merge_and_unload`` + ``save_pretrained`` (``merge_rss.py``'s child; whole model
  resident), and whether its output is bit-identical to ours.

Every input is read once before the timings (all runs see a warm page cache) and ``sync`` runs
before each one (no run pays for the previous one's dirty pages); nothing is fsynced, so the write
side is page-cache speed for every path alike. Each path runs ``--repeat`` times (best kept; PEFT
once). The merge's wall time is split into phases (exclusive seconds of wrapped functions: reads,
writes, the B@A GEMM, the fused scale/add/check/round pass, hashing). The inputs are hashed on a
background thread (shown, but overlapping the rest); output shards are hashed on a helper thread
while they are written (inside "write tensors"); "sha256 outputs" is the small files and manifest.

    python benchmarks/merge_throughput.py [--layers 10] [--repeat 3] [--no-peft] [--profile io merge]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as c  # noqa: E402
from merge_rss import LINEARS, _same_tensors  # noqa: E402

MB = 1e6


# ---------------------------------------------------------------------------------------------
# inputs


def build_adapter(base: Path, out: Path, rank: int, seed: int = 1) -> Path:
    """A PEFT LoRA adapter (fp32 A/B, lora_alpha = 2r) for every linear in ``LINEARS`` of ``base``."""
    import torch
    from safetensors.torch import save_file

    from quantize.io.reader import CheckpointReader

    gen = torch.Generator().manual_seed(seed)
    lora, reader = {}, CheckpointReader(base)
    for name in reader.names():
        module = name.removesuffix(".weight")
        if module.endswith(LINEARS):
            rows, cols = reader.shape(name)
            key = f"base_model.model.{module}"
            lora[f"{key}.lora_A.weight"] = 0.05 * torch.randn(rank, cols, generator=gen)
            lora[f"{key}.lora_B.weight"] = 0.05 * torch.randn(rows, rank, generator=gen)
    out.mkdir(parents=True)
    save_file(lora, out / "adapter_model.safetensors", metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": [x.split(".")[1] for x in LINEARS],
        "task_type": "CAUSAL_LM", "bias": "none", "base_model_name_or_path": str(base)}))
    return out


def weight_files(d: Path) -> list[Path]:
    return sorted(d.glob("*.safetensors"))


def warm(paths: list[Path]) -> None:
    """Read every file once so the timed runs all start from a warm page cache."""
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.read(64 << 20):
                pass


# ---------------------------------------------------------------------------------------------
# children (fresh interpreters)


class Phases:
    """Exclusive wall seconds per label for wrapped functions (nested calls are subtracted from their
    caller); calls on another thread than the main one are labelled ``(background)``."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._local = threading.local()  # per thread: time spent in wrapped callees of each open frame
        self._main = threading.get_ident()

    def wrap(self, owner, attr: str, label: str) -> None:
        fn = getattr(owner, attr)

        def timed(*args, **kwargs):
            stack = self._local.__dict__.setdefault("stack", [])
            stack.append(0.0)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                dt = time.perf_counter() - t0
                inner = stack.pop()
                key = label if threading.get_ident() == self._main else f"{label} (background)"
                self.seconds[key] = self.seconds.get(key, 0.0) + dt - inner
                if stack:
                    stack[-1] += dt

        setattr(owner, attr, timed)

    def finish(self, wall: float) -> dict[str, float]:
        """The phases plus ``other``: the main thread's wall time not in any wrapped call."""
        main = sum(v for k, v in self.seconds.items() if not k.endswith("(background)"))
        return {**self.seconds, "other": wall - main}


def _child(mode: str, base: Path, adapter: Path, out: Path, profile: bool) -> None:
    import torch

    import transformers  # noqa: F401  (the merge imports it for the manifest; keep it out of the timing)

    from quantize.io.reader import CheckpointReader
    from quantize.io.writer import ShardedWriter
    from quantize.merge import stream

    torch.set_num_threads(c.available_cpus())
    phases = Phases()
    phases.wrap(CheckpointReader, "get", "read tensors (CheckpointReader.get)")
    phases.wrap(ShardedWriter, "add", "write tensors (ShardedWriter.add)")
    phases.wrap(ShardedWriter, "_flush_shard", "assemble shards from the spool")
    if mode == "merge":
        from quantize import manifest as mf
        from quantize.merge import lora_math as lm
        from quantize.merge import merge_lora

        phases.wrap(torch, "mm", "B@A GEMM (fp32)")
        phases.wrap(lm, "merge_linear_rounded", "*s, +W, min/max, round (fused pass)")
        phases.wrap(lm, "merge_linear", "LoRA math, unfused path")
        phases.wrap(stream, "finish", "finite check + round, unfused path")
        phases.wrap(mf, "describe_input", "sha256 inputs")
        phases.wrap(mf, "complete", "sha256 outputs + manifest")

        def run():
            merge_lora(base, adapter, out)
    elif mode == "io-merge":  # the merge's own streaming with nothing to merge: planned writer, reused buffers
        def run():
            with CheckpointReader(base) as r, ShardedWriter(out) as w:
                stream.run_jobs([stream.TensorJob(n, n, r.dtype(n)) for n in r.names()], r, w)
                w.close()
    else:  # the plain loop any caller would write
        def run():
            with CheckpointReader(base) as r, ShardedWriter(out) as w:
                for name in r.names():
                    w.add(name, r.get(name))
                w.close()

    prof = None
    if profile:
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
    t0 = time.perf_counter()
    run()
    seconds = time.perf_counter() - t0
    if prof is not None:
        import pstats

        prof.disable()
        pstats.Stats(prof, stream=sys.stderr).sort_stats("tottime").print_stats(22)
    print(json.dumps({"mode": mode, "seconds": seconds, "phases": phases.finish(seconds)}))


def _run_child(mode: str, base: Path, adapter: Path, out: Path, profile: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, str(base), str(adapter), str(out)]
    if profile:
        cmd.append("--profile-child")
        proc = subprocess.run(cmd, capture_output=True, text=True)
        print(f"\n--- cProfile of {mode} (tottime) ---\n{proc.stderr}")
        if proc.returncode != 0:
            raise SystemExit(f"{mode} child failed")
        return json.loads(proc.stdout.strip().splitlines()[-1])
    return c.run_json_child(cmd)


def _run_cp(base: Path, out: Path) -> dict:
    out.mkdir()
    t0 = time.perf_counter()
    subprocess.run(["cp", *map(str, weight_files(base)), str(out)], check=True)
    return {"mode": "cp", "seconds": time.perf_counter() - t0}


def _run_peft(base: Path, adapter: Path, out: Path) -> dict:
    rss = Path(__file__).resolve().parent / "merge_rss.py"
    return c.run_json_child([sys.executable, str(rss), "--child", "peft", str(base), str(adapter), str(out)])


# ---------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", nargs=4, metavar=("MODE", "BASE", "ADAPTER", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--profile-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--shard-mb", type=int, default=700, help="input shard size (MB), so the base has 2+ shards")
    ap.add_argument("--repeat", type=int, default=3, help="runs per path (best kept; PEFT runs once)")
    ap.add_argument("--no-peft", action="store_true", help="skip the PEFT reference")
    ap.add_argument("--profile", choices=("io", "io-merge", "merge"), nargs="+", default=[],
                    help="also run these paths once more under cProfile and print the top functions")
    ap.add_argument("--keep", type=Path, help="work directory to keep (default: a temp dir, removed)")
    args = ap.parse_args()
    if args.child:
        mode, base, adapter, out = args.child
        _child(mode, Path(base), Path(adapter), Path(out), args.profile_child)
        return

    root = Path(args.keep or tempfile.mkdtemp(prefix="merge_throughput_"))
    try:
        base, adapter = root / "base", root / "adapter"
        t0 = time.perf_counter()
        if not (base / "config.json").is_file():
            shutil.rmtree(base, ignore_errors=True)
            shutil.rmtree(adapter, ignore_errors=True)
            c.build_synthetic_llama(base, layers=args.layers, hidden=args.hidden, intermediate=args.intermediate,
                                    heads=16, kv_heads=4, vocab=args.vocab, max_shard_bytes=args.shard_mb * 10**6)
            build_adapter(base, adapter, args.rank)
        build_s = time.perf_counter() - t0
        shards = weight_files(base)
        model_bytes = sum(p.stat().st_size for p in shards)
        adapter_bytes = (adapter / "adapter_model.safetensors").stat().st_size
        warm([*shards, adapter / "adapter_model.safetensors"])
        print(f"{c.cpu_model()}; load average {os.getloadavg()[0]:.2f}; built in {build_s:.0f} s")
        print(f"base: {args.layers} layers, hidden {args.hidden}, intermediate {args.intermediate}, vocab {args.vocab}, "
              f"bf16, {len(shards)} shards, {model_bytes / MB:.0f} MB; adapter r={args.rank} fp32, "
              f"{adapter_bytes / MB:.1f} MB; warm page cache, no fsync", flush=True)

        runners = {
            "cp": lambda out: _run_cp(base, out),
            "io": lambda out: _run_child("io", base, adapter, out),
            "io-merge": lambda out: _run_child("io-merge", base, adapter, out),
            "merge": lambda out: _run_child("merge", base, adapter, out),
        }
        best: dict[str, dict] = {}
        for round_ in range(args.repeat):  # round-robin: every path sees the machine in the same states
            times = []
            for mode, fn in runners.items():
                out = root / f"out-{mode}"
                shutil.rmtree(out, ignore_errors=True)
                subprocess.run(["sync"], check=False)
                r = fn(out)
                times.append(f"{mode} {r['seconds']:.2f} s")
                if mode not in best or r["seconds"] < best[mode]["seconds"]:
                    best[mode] = r
            print(f"  round {round_ + 1}: {', '.join(times)} (load {os.getloadavg()[0]:.2f})", flush=True)
        identical = None
        if not args.no_peft:
            subprocess.run(["sync"], check=False)
            best["peft"] = _run_peft(base, adapter, root / "out-peft")
            print(f"  peft: {best['peft']['seconds']:.2f} s", flush=True)
            identical = _same_tensors(root / "out-merge", root / "out-peft")
        for mode in args.profile:
            shutil.rmtree(root / f"out-{mode}", ignore_errors=True)
            _run_child(mode, base, adapter, root / f"out-{mode}", profile=True)

        labels = {"cp": "cp (plain byte copy)", "io": "io: reader.get -> writer.add loop",
                  "io-merge": "io: merge streaming, no LoRA (plan, arena)",
                  "merge": "quantize merge lora (merge_lora)", "peft": "PEFT merge_and_unload + save_pretrained"}
        floor = best["cp"]["seconds"]
        print()
        c.print_table(["path", "MB", "seconds", "MB/s", "x cp time"],
                      [[labels[m], round(model_bytes / MB), r["seconds"], model_bytes / MB / r["seconds"],
                        r["seconds"] / floor] for m, r in best.items()], digits=3)
        if identical is not None:
            print(f"merge output bit-identical to PEFT's: {identical}")

        m, io, iom = best["merge"], best["io"], best["io-merge"]
        print("\nwall time by phase (exclusive seconds; background-thread time overlaps the rest and is not in the total):")
        phase_rows = []
        for label, sec in sorted(m["phases"].items(), key=lambda kv: -kv[1]):
            phase_rows.append([label, sec, 100 * sec / m["seconds"], iom["phases"].get(label), io["phases"].get(label)])
        phase_rows += [[label, None, None, iom["phases"].get(label), sec] for label, sec in io["phases"].items()
                       if label not in m["phases"]]
        phase_rows.append(["total (wall)", m["seconds"], 100.0, iom["seconds"], io["seconds"]])
        c.print_table(["phase", "merge s", "% of merge", "io-merge s", "io s"], phase_rows, digits=3)
        print(json.dumps({"model_bytes": model_bytes, "adapter_bytes": adapter_bytes, "runs": best,
                          "identical_to_peft": identical}))
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
