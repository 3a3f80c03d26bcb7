"""Low bits on ref-llama: RTN, GPTQ, GPTQ+SignRound, RTN+SignRound (ours) against AutoRound 0.16.

Every row quantizes shared/models/ref-llama with the SAME calibration token ids (``quantize sample``
of wikitext-2 valid, seed 0; AutoRound gets them exported to a file) and is evaluated by OUR eval on
the first ``--windows`` windows of wikitext-2 test: mean KL(fp || quantized) per token and top-1
agreement with the fp model; plus quantization wall seconds and peak RSS of AutoRound's process.

Rows per setting (default W3 g128 and W2 g64, all symmetric):
  RTN                      ``quantize rtn``
  GPTQ                     ``quantize gptq`` at its defaults (act-order, static groups)
  GPTQ + signround         ``quantize gptq --refine signround`` (methods/signround.py)
  RTN + signround          ``quantize rtn --refine signround``
  AutoRound default        its default recipe: iters 200, batch 8 (nsamples: ours, see below)
  AutoRound best           its "best" recipe (auto-round-best): iters 1000, nsamples 512 -- run on
                           at most our ``--samples`` calibration windows (``--best-iters`` to shorten)
AutoRound runs in a child process of .venv-autoround (scripts/setup_autoround.sh), saves the GPTQ
format (``auto_gptq``, sym), which our reader dequantizes. A failing AutoRound run is a row with its
error. AutoRound's recipes use seqlen 2048; here every tool gets the same ``--seq-len`` windows.

    python benchmarks/lowbit_quality.py [--samples 128] [--seq-len 256] [--settings 3:128,2:64]
        [--iters 200] [--best-iters 1000] [--rows rtn,gptq,gptq+sr,rtn+sr,ar,ar-best] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as c  # noqa: E402

ROWS = ["rtn", "gptq", "gptq+sr", "rtn+sr", "ar", "ar-best"]
LABELS = {"rtn": "RTN", "gptq": "GPTQ (defaults)", "gptq+sr": "GPTQ + signround", "rtn+sr": "RTN + signround",
          "ar": "AutoRound default", "ar-best": "AutoRound best"}


def ours(ref, cal, out, *, bits, group, row, iters, batch_size, verbose):
    from quantize.commands.gptq import quantize_gptq

    kw = dict(rtn=row.startswith("rtn"), act_order=not row.startswith("rtn"), static_groups=None)
    if row.endswith("+sr"):
        kw.update(refine="signround", refine_iters=iters)
    t0 = time.perf_counter()
    with c.quiet(not verbose):
        m = quantize_gptq(model_dir=ref, calibration=cal, out=out, bits=bits, group_size=group, sym=True, damp=0.01,
                          block_size=128, exec_cfg=c.exec_config(batch_size), overwrite=True, **kw)
    seconds = time.perf_counter() - t0
    note = ""
    if row.endswith("+sr"):
        layers = [lm["signround"] for lm in m.metrics["layers"]]
        gain = [lm["mse_after"] / lm["mse_before"] for lm in layers if lm["mse_before"]]
        note = f"layer output MSE after/before: mean {sum(gain) / len(gain):.3f}, kept {[lm['kept'] for lm in layers]}"
    return seconds, None, note


def autoround(ref, ids_file, out, *, bits, group, iters, nsamples, threads, venv, timeout):
    py = Path(venv) / "bin" / "python"
    if not py.exists():
        raise RuntimeError(f"{py} not found: run scripts/setup_autoround.sh")
    cmd = [str(py), str(Path(__file__).resolve().parent / "autoround_child.py"), str(ref), str(ids_file), str(out),
           "--bits", str(bits), "--group-size", str(group), "--iters", str(iters), "--nsamples", str(nsamples)]
    if threads > 0:
        cmd += ["--threads", str(threads)]
    r = c.run_json_child(cmd, timeout=timeout)
    return (r["seconds"], r["maxrss_mb"], f"auto-round {r['version']}, iters {r['iters']}, nsamples {r['nsamples']}",
            Path(r["path"]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=128, help="calibration windows of --seq-len tokens")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--windows", type=int, default=60)
    ap.add_argument("--settings", default="3:128,2:64", help="bits:group_size,...")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"subset of {','.join(ROWS)}")
    ap.add_argument("--iters", type=int, default=200, help="SignRound steps per layer (ours and AutoRound default)")
    ap.add_argument("--best-iters", type=int, default=1000, help="AutoRound best recipe's steps")
    ap.add_argument("--best-samples", type=int, default=512, help="AutoRound best recipe's nsamples (capped at --samples)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--autoround-venv", default=str(c.repo_root() / ".venv-autoround"))
    ap.add_argument("--timeout", type=float, default=7200, help="seconds per AutoRound run")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args()

    ref, valid, test = c.ref_llama(), c.wikitext("valid"), c.wikitext("test")
    if ref is None or valid is None or test is None:
        c.skip("needs shared/models/ref-llama and shared/data/wikitext-2/{valid,test}.txt (not in this checkout)")
    rows_wanted = [r for r in args.rows.split(",") if r]
    bad = [r for r in rows_wanted if r not in ROWS]
    if bad:
        print(f"error: unknown rows {bad}; choose from {ROWS}", file=sys.stderr)
        return 2
    _, threads = c.set_threads(args.threads)
    settings = [(int(b), int(g)) for b, g in (s.split(":") for s in args.settings.split(","))]
    print(f"model: {ref}")
    print(f"device: {c.cpu_model()}, torch threads {threads}")
    print(f"calibration: {args.samples} x {args.seq_len} tokens of {valid.name} (seed 0), the same ids for every tool; "
          f"eval: first {args.windows} windows of {args.seq_len} tokens of {test.name}; sym everywhere; "
          f"signround {args.iters} steps/layer", flush=True)

    import torch

    from quantize.calibration import load_calibration

    table, records = [], []
    with tempfile.TemporaryDirectory(prefix="lowbit-") as tmp:
        tmp = Path(tmp)
        cal = c.calibrate(ref, str(valid), args.samples, args.seq_len, tmp / "cal")
        ids_file = tmp / "ids.pt"
        torch.save(load_calibration(cal)[0].to(torch.int64), ids_file)
        windows = c.eval_windows(ref, str(test), args.seq_len, args.windows)
        fp = c.FpReference(ref, windows)
        table.append(["fp", "-", fp.fp.perplexity, 0.0, 1.0, None, None, ""])
        for bits, group in settings:
            for row in rows_wanted:
                out = tmp / f"{row}-{bits}-{group}"
                label, setting = LABELS[row], f"W{bits} g{group}"
                try:
                    if row.startswith("ar"):
                        best = row == "ar-best"
                        seconds, rss, note, out = autoround(
                            ref, ids_file, out, bits=bits, group=group,
                            iters=args.best_iters if best else args.iters,
                            nsamples=min(args.best_samples, args.samples) if best else args.samples,
                            threads=args.threads, venv=args.autoround_venv, timeout=args.timeout)
                    else:
                        seconds, rss, note = ours(ref, cal, out, bits=bits, group=group, row=row, iters=args.iters,
                                                  batch_size=args.batch_size, verbose=args.verbose)
                    q = fp.compare(out)
                    rec = dict(row=label, setting=setting, perplexity=q.perplexity, kl=q.kl, top1=q.top1,
                               seconds=seconds, maxrss_mb=rss, note=note)
                except Exception as e:  # a failing tool is a row with its error, not a crash
                    rec = dict(row=label, setting=setting, perplexity=None, kl=None, top1=None, seconds=None,
                               maxrss_mb=None, note=f"FAILED: {c.failure_reason(e)}")
                records.append(rec)
                table.append([rec["row"], setting, rec["perplexity"], rec["kl"], rec["top1"], rec["seconds"],
                              rec["maxrss_mb"], rec["note"]])
                kl = "-" if rec["kl"] is None else f"{rec['kl']:.5f}"
                sec = "-" if rec["seconds"] is None else f"{rec['seconds']:.0f}s"
                print(f"  done: {label:20} {setting:8} KL {kl} ({sec}) {rec['note']}", flush=True)
                if args.json:
                    args.json.write_text(json.dumps(records, indent=1))
    print()
    c.print_table(["weights", "setting", "perplexity", "KL vs fp", "top-1 agree", "quantize s", "peak RSS MB", "note"],
                  table)
    print()
    for bits, group in settings:
        s = f"W{bits} g{group}"
        by = {r["row"]: r["kl"] for r in records if r["setting"] == s and r["kl"] is not None}
        ours_best = min((by[LABELS[r]], LABELS[r]) for r in ("gptq+sr", "rtn+sr", "gptq", "rtn") if LABELS[r] in by) \
            if any(LABELS[r] in by for r in ("gptq+sr", "rtn+sr", "gptq", "rtn")) else None
        peers = [(by[LABELS[r]], LABELS[r]) for r in ("ar", "ar-best") if LABELS[r] in by]
        if ours_best and peers:
            peer = min(peers)
            verdict = "PASS" if ours_best[0] <= peer[0] else "FAIL"
            print(f"{verdict}: {s}: our best {ours_best[1]} KL {ours_best[0]:.5f} vs {peer[1]} KL {peer[0]:.5f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
