"""GPTQ vs round-to-nearest on a model trained on real text (shared/models/ref-llama).

Calibration: ``quantize sample`` of wikitext-2 *valid* (the model saw it in training, as a user's
calibration set usually resembles the fine-tuning data); evaluation: the first 60 windows of 256
tokens of wikitext-2 *test* (never seen), as in shared/models/README.md, whose MEASURED table of RTN
asymmetric results our RTN rows should reproduce.

Rows per setting (4-bit g128, 3-bit g128, 2-bit g64): RTN asymmetric (the README's baseline), GPTQ
symmetric with static act-order (the default: groups on the original columns, desc_act false),
dynamic act-order (desc_act true) and no act-order, GPTQ asymmetric with dynamic act-order
(``--no-asym`` drops it).
Columns: perplexity, mean KL(fp ‖ quantized) per token, top-1 agreement with fp, quantization wall
seconds (2 shared cores: timings are noisy). Prints PASS/FAIL for "GPTQ's KL < RTN's" per row.

    python benchmarks/gptq_quality.py [--samples 128] [--seq-len 256] [--windows 60] [--settings 4:128,3:128,2:64]

About 4 minutes on 2 idle cores (12 quantizations of ~15 s, evals of ~4 s); much longer on a busy
machine (``--samples 32`` is ~2x faster and changes the KLs by < 10%). Exit status 0 unless an error
occurs (the checks only print).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as c  # noqa: E402


def parse_settings(text: str) -> list[tuple[int, int]]:
    out = []
    for item in text.split(","):
        bits, group = item.split(":")
        out.append((int(bits), int(group)))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=128, help="calibration windows of --seq-len tokens")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--windows", type=int, default=60, help="eval windows from the start of test.txt")
    ap.add_argument("--settings", default="4:128,3:128,2:64", help="bits:group_size,...")
    ap.add_argument("--no-asym", action="store_true", help="skip the GPTQ asymmetric rows")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: auto, 1 when the machine is oversubscribed)")
    ap.add_argument("--verbose", action="store_true", help="show the pipeline's progress lines")
    args = ap.parse_args()

    ref, valid, test = c.ref_llama(), c.wikitext("valid"), c.wikitext("test")
    if ref is None or valid is None or test is None:
        c.skip("needs shared/models/ref-llama and shared/data/wikitext-2/{valid,test}.txt (not in this checkout)")

    _, threads = c.set_threads(args.threads)
    settings = parse_settings(args.settings)
    variants = [("RTN asym", dict(rtn=True, sym=False, act_order=False)),
                ("GPTQ sym act-order static", dict(sym=True, act_order=True, static_groups=True)),
                ("GPTQ sym act-order dynamic", dict(sym=True, act_order=True)),
                ("GPTQ sym no act-order", dict(sym=True, act_order=False))]
    if not args.no_asym:
        variants.append(("GPTQ asym act-order", dict(sym=False, act_order=True)))

    print(f"model: {ref}")
    print(f"device: {c.cpu_model()}, torch threads {threads}")
    print(f"calibration: {args.samples} x {args.seq_len} tokens of {valid.name} (seed 0); "
          f"eval: first {args.windows} windows of {args.seq_len} tokens of {test.name}; damp 0.01, block 128")

    rows, checks = [], []
    with tempfile.TemporaryDirectory(prefix="gptq_quality-") as tmp:
        tmp = Path(tmp)
        cal = c.calibrate(ref, str(valid), args.samples, args.seq_len, tmp / "cal")
        windows = c.eval_windows(ref, str(test), args.seq_len, args.windows)
        with c.Timer() as t:
            fp = c.FpReference(ref, windows)
        rows.append(["fp (bf16 weights, fp32 math)", "-", fp.fp.perplexity, 0.0, 1.0, None, t.seconds])
        for bits, group in settings:
            rtn_kl = None
            for label, kw in variants:
                out = tmp / "q"
                _, seconds = c.quantize(ref, cal, out, bits=bits, group_size=group, verbose=args.verbose, **kw)
                with c.Timer() as t:
                    q = fp.compare(out)
                rows.append([label, f"{bits}-bit g{group}", q.perplexity, q.kl, q.top1, seconds, t.seconds])
                if kw.get("rtn"):
                    rtn_kl = q.kl
                elif rtn_kl is not None:
                    checks.append((f"{bits}-bit g{group} {label}", q.kl, rtn_kl))
                print(f"  done: {label:24} {bits}-bit g{group:<4} KL {q.kl:.5f} top-1 {q.top1:.4f} "
                      f"({seconds:.0f}s quantize, {t.seconds:.0f}s eval)", flush=True)

    print()
    c.print_table(["weights", "setting", "perplexity", "KL vs fp", "top-1 agree", "quantize s", "eval s"], rows)
    print()
    ok = True
    for name, kl, rtn_kl in checks:
        passed = kl < rtn_kl
        ok &= passed
        print(f"{'PASS' if passed else 'FAIL'}: {name}: KL {kl:.5f} {'<' if passed else '>='} RTN asym {rtn_kl:.5f} "
              f"({rtn_kl / kl if kl > 0 else float('inf'):.1f}x lower)")
    print(f"{'PASS' if ok else 'FAIL'}: GPTQ KL < RTN KL at every setting ({len(checks)} comparisons)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
