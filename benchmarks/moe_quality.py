"""Mixture-of-Experts calibration on a trained MoE: routed vs all-token expert statistics, side by side.

The model is a small Qwen3-MoE trained on the bundled WikiText-2 validation text
(``scripts/train_tiny_moe.py``: 4 layers, 8 experts, 2 per token; built into
``out/bench-cache/tiny-qwen3-moe`` on first use, about 2-4 minutes on 2 cores). For each grid (W4 g128,
W3 g128, W2 g64) and each calibration size, GPTQ with

* ``--moe-calibration routed``: each expert's Hessian from the tokens routed to it;
* ``--moe-calibration all``: from every token (the forward stays the model's own routing);
* RTN on the same grid (the floor),

and GGUF (``--gguf``, default Q4_K_M: llama.cpp's mix for this model) twice: the block bytes of
llama.cpp's reference rounding (no calibration) and ours (GPTQ per expert on the same grids, routed
statistics); then KL / top-1 / perplexity against the bf16 model by our eval over WikiText-2 test windows, wall
time, and how many experts fell below ``--moe-min-tokens`` (solved by the fallback).

    python benchmarks/moe_quality.py [--windows 60] [--seq-len 256] [--grids 4:128] [--gguf Q4_K_M,Q8_0]

Needs only this checkout (bundled text and tokenizer).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as c  # noqa: E402


def trained_moe(preset: str = "tiny") -> Path:
    """The trained MoE of ``scripts/train_tiny_moe.py --preset PRESET``, trained on first use."""
    out = c.repo_root() / "out" / "bench-cache" / f"{preset}-qwen3-moe"
    if not (out / "config.json").is_file():
        print(f"-- training the benchmark MoE into {out} (scripts/train_tiny_moe.py --preset {preset})", flush=True)
        subprocess.run([sys.executable, str(c.repo_root() / "scripts" / "train_tiny_moe.py"), "--preset", preset,
                        "--out", str(out)], check=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--windows", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--calibrations", default="128x256,16x128",
                    help="comma-separated SAMPLESxSEQ_LEN calibration sets (a large one, and a small one that "
                         "starves rarely routed experts)")
    ap.add_argument("--grids", default="4:128,3:128,2:64", help="comma-separated BITS:GROUP")
    ap.add_argument("--gguf", default="Q4_K_M", help="comma-separated GGUF file types ('' for none)")
    ap.add_argument("--work", type=Path, default=None)
    args = ap.parse_args(argv)

    import torch

    from quantize.commands.gguf import quantize_gguf
    from quantize.commands.gptq import quantize_gptq

    model = trained_moe()
    root = c.repo_root() / "calibration" / "wikitext2"
    cfg = c.exec_config(args.batch_size)
    rows = []
    with tempfile.TemporaryDirectory(prefix="moe-quality-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        windows = c.eval_windows(model, str(root / "test.txt"), args.seq_len, args.windows)
        ref = c.FpReference(model, windows, args.batch_size)
        rows.append(["bf16", "-", "-", f"{ref.fp.perplexity:.3f}", "0", "1", "-", "-"])
        for cal_spec in args.calibrations.split(","):
            n, L = (int(v) for v in cal_spec.split("x"))
            cal = c.calibrate(model, str(root / "valid.txt"), n, L, work / f"cal-{n}x{L}")
            for gtype in [g for g in args.gguf.split(",") if g]:
                for label, kw in ((f"GGUF {gtype} llama.cpp rounding", {}), (f"GGUF {gtype} ours (routed)",
                                                                               {"calibration": cal})):
                    out = work / f"gguf-{n}x{L}-{gtype}-{'cal' if kw else 'ref'}"
                    t0 = time.perf_counter()
                    with c.quiet():
                        m = quantize_gguf(model_dir=model, out=out, exec_cfg=cfg, ftype=gtype, overwrite=True, **kw)
                    seconds = time.perf_counter() - t0
                    q = ref.compare(out)
                    size = (out / "model.gguf").stat().st_size
                    rows.append([label, f"{n}x{L}" if kw else "-", "-", f"{q.perplexity:.3f}", f"{q.kl:.4g}",
                                 f"{q.top1:.4f}", f"{seconds:.1f}", f"{size:,} B"])
                    print(f"{label} cal {n}x{L}: KL {q.kl:.4g} top-1 {q.top1:.4f} ({seconds:.1f} s, {size:,} bytes)",
                          flush=True)
                    shutil.rmtree(out, ignore_errors=True)
                kl = [float(r[4]) for r in rows[-2:]]
                rows[-1][7] += f"; ours/llama.cpp {kl[1] / kl[0]:.3f}"
            for grid in [g for g in args.grids.split(",") if g]:
                bits, group = (int(v) for v in grid.split(":"))
                base = dict(model_dir=model, calibration=cal, exec_cfg=cfg, bits=bits, group_size=group,
                            act_order=True, sym=True, damp=0.01, static_groups=None, block_size=128, overwrite=True)
                runs = {"RTN": dict(rtn=True, act_order=False),
                        "GPTQ routed": dict(rtn=False, moe_calibration="routed"),
                        "GPTQ routed, RTN fallback": dict(rtn=False, moe_calibration="routed", moe_fallback="rtn"),
                        "GPTQ all": dict(rtn=False, moe_calibration="all")}
                for label, kw in runs.items():
                    out = work / f"q-{n}x{L}-{bits}-{group}-{label.replace(' ', '-').replace(',', '')}"
                    t0 = time.perf_counter()
                    with c.quiet():
                        m = quantize_gptq(out=out, **{**base, **kw})
                    seconds = time.perf_counter() - t0
                    q = ref.compare(out)
                    cov = m.metrics.get("moe", {})
                    below = sum(len(v) for v in cov.get("fallback_experts", {}).values())
                    lo = cov.get("seen_min", {}).get("tokens", "-")
                    rows.append([f"W{bits} g{group} {label}", f"{n}x{L}", f"{lo}/{below}", f"{q.perplexity:.3f}",
                                 f"{q.kl:.4g}", f"{q.top1:.4f}", f"{seconds:.1f}", ""])
                    print(f"{rows[-1][0]} cal {n}x{L}: KL {q.kl:.4g} top-1 {q.top1:.4f} ({seconds:.1f} s)", flush=True)
                    shutil.rmtree(out, ignore_errors=True)
                kl = {r[0].split(" ", 2)[2]: float(r[4]) for r in rows[-len(runs):]}
                rows[-1][7] = f"all/routed {kl['GPTQ all'] / kl['GPTQ routed']:.3f}"
                rows[-2][7] = f"rtn-fb/routed {kl['GPTQ routed, RTN fallback'] / kl['GPTQ routed']:.3f}"

    print(f"\n{model.name}: Qwen3-MoE, 4 layers, 8 experts (top-2); eval {windows.shape[0]} x {args.seq_len} tokens of "
          f"WikiText-2 test; {c.cpu_model()}, {torch.get_num_threads()} threads\n")
    c.print_table(["weights", "calibration", "min seen/fallbacks", "perplexity", "KL vs bf16", "top-1", "wall s",
                   "ratio"], rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
