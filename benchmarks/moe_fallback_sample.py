"""The all-token fallback's down statistic: an even sample of the layer's tokens vs every token, side by side.

An expert routed fewer than ``--moe-min-tokens`` of the calibration tokens is solved by the all-token
fallback: its gate/up Hessian is the layer's all-token one, and its down projection's statistic
comes from ``max(FALLBACK_ROWS, 4 x width)`` evenly spaced tokens through its own quantized gate/up
(``executor/moe.FALLBACK_ROWS``, 8192). This runs the same GPTQ (4-bit g128, act-order, static
groups, min/max grid, routed statistics) twice on a trained MoE, with that sample and with every
token (``FALLBACK_ROWS`` past the token count), and prints KL / top-1 / perplexity against the bf16
model, time, and how many experts took the fallback.

    python benchmarks/moe_fallback_sample.py [--model a3b|tiny] [--samples 128] [--seq-len 256] [--windows 60]

``a3b`` (the default): the trained Qwen3-30B-A3B miniature of ``benchmarks/moe_vs_gptqmodel.py``
(``scripts/train_tiny_moe.py --preset a3b``, trained on first use, ~30 min), 42% of whose experts
fall under 0.5% of the tokens. Needs only this checkout.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as c  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("a3b", "tiny"), default="a3b")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--windows", type=int, default=60)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    c.set_threads(args.threads)
    from moe_quality import trained_moe

    from quantize.commands.gptq import quantize_gptq
    from quantize.executor import moe

    model = trained_moe(args.model)
    text = c.repo_root() / "calibration" / "wikitext2"
    sample = moe.FALLBACK_ROWS
    with tempfile.TemporaryDirectory(prefix="moe_fallback_sample-") as tmp:
        tmp = Path(tmp)
        cal = c.calibrate(model, str(text / "valid.txt"), args.samples, args.seq_len, tmp / "cal")
        runs = {}
        for label, rows in ((f"even sample (FALLBACK_ROWS {sample}, default)", sample), ("every token", 1 << 62)):
            moe.FALLBACK_ROWS = rows
            t0 = time.perf_counter()
            with c.quiet():
                m = quantize_gptq(model_dir=model, calibration=cal, out=tmp / str(rows), bits=4, group_size=128,
                                  act_order=True, sym=True, damp=0.01, static_groups=None, block_size=128, rtn=False,
                                  exec_cfg=c.exec_config(8), overwrite=True, moe_calibration="routed", grid="minmax")
            cov = m.metrics["moe"]
            runs[label] = (tmp / str(rows), time.perf_counter() - t0, sum(len(v) for v in cov["fallback_experts"].values()),
                           cov.get("fallback_down_tokens", "all"))
            print(f"  {label}: {runs[label][1]:.1f}s", flush=True)
        moe.FALLBACK_ROWS = sample
        fp = c.FpReference(model, c.eval_windows(model, str(text / "test.txt"), args.seq_len, args.windows))
        rows = [["bf16", None, fp.fp.perplexity, 0.0, 1.0, None, None]]
        for label, (out, seconds, fallbacks, down) in runs.items():
            q = fp.compare(out)
            rows.append([label, seconds, q.perplexity, q.kl, q.top1, fallbacks, down])
    print(f"\n{model.name}: calibration {args.samples} x {args.seq_len} tokens, eval {args.windows} x {args.seq_len}; "
          f"{c.cpu_model()}\n")
    c.print_table(["fallback down statistic", "wall s", "perplexity", "KL vs bf16", "top-1", "fallback experts",
                   "down tokens"], rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
