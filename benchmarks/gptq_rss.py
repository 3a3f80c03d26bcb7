"""Peak RSS of GPTQ (or, with ``--method gguf``, GGUF Q4_K_M) quantization is flat in the number of
layers (one decoder layer resident).

Builds two synthetic random Llamas that differ only in depth (default 4 and 32 layers; hidden 1024,
intermediate 2816, 16 query / 4 KV heads, vocab 1024 with the bundled tokenizer, bf16), streamed
tensor by tensor through ``ShardedWriter`` (never a whole model in memory). Then quantizes each with
GPTQ 4-bit g128 act-order on the same calibration tokens, each run in a fresh subprocess, and
reports ``ru_maxrss`` (peak), the RSS right after the imports, wall time, and the ratio of the peaks
(goal: deep / shallow <= 1.2).

The host-memory set-ups run side by side (executor/memory.py, quantize/allocator.py): glibc
``flat`` (every block of 1 MiB or more its own mmap: peak = live memory, page faults on every large
temporary; the default without jemalloc), glibc ``pooled`` (a reused heap, trimmed after each layer:
fewer faults, a higher peak inside a layer, which varies with the heap's layout) and, where
libjemalloc is installed, ``jemalloc`` (preloaded: reuse inside a layer, purge after each; what the
quantize command uses there). Before these policies, glibc's default dynamic threshold gave
1.24-1.40x from 4 to 32 layers.

With ``--moe`` the two models are synthetic Qwen3-MoE (every layer sparse: 8 experts, 2 per token,
expert width 512, hidden 1024, 16 / 4 heads): each expert solved from its routed tokens, one
expert's Hessians at a time.

    python benchmarks/gptq_rss.py [--layers 4 32] [--samples 16] [--seq-len 256] [--modes flat pooled jemalloc] [--method gguf] [--moe]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as c  # noqa: E402

GOAL_RATIO = 1.2
SETUPS = c.heap_setups()  # flat, pooled (glibc) and jemalloc where installed: label -> (host_heap, env)
SHAPES = dict(hidden=1024, intermediate=2816, heads=16, kv_heads=4, vocab=1024)
MOE_SHAPES = dict(hidden=1024, moe_intermediate=512, experts=8, top_k=2, heads=16, kv_heads=4, vocab=1024)


def child(model: Path, cal: Path, out: Path, mode: str, method: str = "gptq") -> None:
    """One quantization in this (fresh) process; prints a JSON line with the measurements."""
    import torch  # noqa: F401  (imports first, so the baseline includes them)

    from quantize.commands.gguf import quantize_gguf
    from quantize.commands.gptq import quantize_gptq  # noqa: F401

    baseline = c.rss_mb()
    if method == "gguf":  # Hessian-aware Q4_K_M into model.gguf
        t0 = time.perf_counter()
        with c.quiet():
            m = quantize_gguf(model_dir=model, out=out, exec_cfg=c.exec_config(8, SETUPS[mode][0]), ftype="Q4_K_M",
                              calibration=cal, overwrite=True)
        seconds = time.perf_counter() - t0
    else:
        m, seconds = c.quantize(model, cal, out, bits=4, group_size=128, act_order=True, sym=True,
                                host_heap=SETUPS[mode][0])
    print(json.dumps({"baseline_mb": baseline, "peak_mb": c.maxrss_mb(), "seconds": seconds,
                      "layers": len(m.metrics["layers"]), "host_heap": m.metrics.get("host_heap"),
                      "allocator": m.metrics.get("allocator")}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, nargs=2, default=[4, 32], metavar=("SHALLOW", "DEEP"))
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--modes", nargs="+", default=list(SETUPS), choices=list(SETUPS),
                    help="host-heap policies to compare (executor/memory.py)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per run (0: auto, see common.set_threads)")
    ap.add_argument("--method", default="gptq", choices=["gptq", "gguf"],
                    help="gptq: GPTQ 4-bit g128 act-order; gguf: `quantize gguf --type Q4_K_M --calibration`")
    ap.add_argument("--moe", action="store_true", help="synthetic Qwen3-MoE models instead of Llamas")
    ap.add_argument("--child", nargs=5, metavar=("MODEL", "CAL", "OUT", "MODE", "METHOD"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    n_threads, threads = c.set_threads(args.threads)
    if args.child:
        child(*map(Path, args.child[:3]), args.child[3], args.child[4])
        return 0

    print(f"device: {c.cpu_model()}, torch threads {threads}")
    what = "GPTQ 4-bit g128 act-order sym" if args.method == "gptq" else "GGUF Q4_K_M, Hessian-aware"
    print(f"model: synthetic {'Qwen3-MoE ' + str(MOE_SHAPES) if args.moe else 'Llama ' + str(SHAPES)}, bf16; {what}; "
          f"calibration {args.samples} x {args.seq_len} tokens (bundled wikitext2)")
    allocators = args.modes
    results: dict[tuple[str, int], dict] = {}
    with tempfile.TemporaryDirectory(prefix="gptq_rss-") as tmp:
        tmp = Path(tmp)
        cal = None
        for n in args.layers:
            model = tmp / f"llama-{n}"
            t0 = time.perf_counter()
            if args.moe:
                c.build_synthetic_moe(model, layers=n, **MOE_SHAPES)
            else:
                c.build_synthetic_llama(model, layers=n, **SHAPES)
            size = sum(p.stat().st_size for p in model.glob("*.safetensors")) / 1e6
            print(f"built {n}-layer model: {size:.0f} MB bf16 in {time.perf_counter() - t0:.1f}s", flush=True)
            if cal is None:  # same tokenizer for both models: one calibration set
                cal = c.calibrate(model, "wikitext2", args.samples, args.seq_len, tmp / "cal")
            for alloc in allocators:
                cmd = [sys.executable, __file__, "--threads", str(n_threads)]  # all runs alike
                r = c.run_json_child(cmd + ["--child", str(model), str(cal), str(tmp / "q"), alloc, args.method],
                                     env=SETUPS[alloc][1])
                results[alloc, n] = r
                print(f"  {n} layers, {alloc}: peak {r['peak_mb']:.0f} MB, after imports {r['baseline_mb']:.0f} MB, "
                      f"{r['seconds']:.0f}s", flush=True)
                shutil.rmtree(tmp / "q")
            shutil.rmtree(model)  # keep the temp disk small

    print()
    rows = [[f"{n} layers", alloc, r["baseline_mb"], r["peak_mb"], r["peak_mb"] - r["baseline_mb"], r["seconds"]]
            for (alloc, n), r in results.items()]
    c.print_table(["model", "host heap", "RSS after imports (MB)", "peak RSS (MB)", "peak - imports (MB)", "wall s"], rows)
    shallow_n, deep_n = args.layers
    for alloc in allocators:
        shallow, deep = results[alloc, shallow_n], results[alloc, deep_n]
        ratio = deep["peak_mb"] / shallow["peak_mb"]
        above = (deep["peak_mb"] - deep["baseline_mb"]) / max(shallow["peak_mb"] - shallow["baseline_mb"], 1e-9)
        default = alloc == ("jemalloc" if "jemalloc" in SETUPS else "flat")  # what the quantize command uses here
        verdict = ("PASS" if ratio <= GOAL_RATIO else "FAIL") + (", the default here" if default else "")
        print(f"{verdict} ({alloc}): peak RSS {deep_n} / {shallow_n} layers = {ratio:.3f} (goal <= {GOAL_RATIO}); "
              f"above the imports: {above:.3f}")
    for other in ("pooled", "jemalloc"):
        if "flat" in allocators and other in allocators:
            t = {n: results[other, n]["seconds"] / results["flat", n]["seconds"] for n in args.layers}
            print(f"wall time {other} / flat: {shallow_n} layers {t[shallow_n]:.2f}, {deep_n} layers {t[deep_n]:.2f}; "
                  f"peak RSS {other} / flat at {deep_n} layers "
                  f"{results[other, deep_n]['peak_mb'] / results['flat', deep_n]['peak_mb']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
