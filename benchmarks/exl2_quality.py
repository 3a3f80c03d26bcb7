"""EXL2 quality and size on the shared reference Llama (``shared/models/ref-llama``).

    python benchmarks/exl2_quality.py [--out DIR] [--bpw 2.5 3.0 4.0 5.0 6.0] [--threads N]

1. calibration: ``quantize sample`` on wikitext-2 ``valid.txt`` (64 windows of 256 tokens, seed 0);
2. EXL2 at each target: the first run measures (on ``--measurement-rows`` rows) and writes
   ``measurement.json``; every other target reuses it (``--measurement``);
3. GPTQ 4-bit g128 (act-order, symmetric) on the same calibration, for comparison;
4. each output is read back and evaluated against the bf16 model on ``test.txt`` (60 windows of
   256 tokens from the start): mean KL(fp ‖ quantized), top-1 agreement, perplexity.

Achieved bpw is computed from the written files (every EXL2 tensor of every decoder linear over its
weights); lm_head is reported separately. Prints a table, writes ``results.json`` under ``--out``,
and exits 1 if KL does not fall as bpw rises. Without the shared model it says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

SHARED = Path(os.environ.get("QUANTIZE_SHARED", "/work/shared"))
REF = SHARED / "models" / "ref-llama"
VALID = SHARED / "data" / "wikitext-2" / "valid.txt"
TEST = SHARED / "data" / "wikitext-2" / "test.txt"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("out/bench-exl2"))
    ap.add_argument("--bpw", type=float, nargs="+", default=[2.5, 3.0, 4.0, 5.0, 6.0])
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--measurement-rows", type=int, default=32)
    ap.add_argument("--windows", type=int, default=60)
    ap.add_argument("--norm", default="1", help="optimizer exponent, or 'auto'")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args(argv)
    missing = [p for p in (REF / "config.json", VALID, TEST) if not p.is_file()]
    if missing:
        print(f"SKIP: {missing[0]} not found (the shared reference model/data are not present here)")
        return 0

    import torch

    from quantize.calibration import sample_calibration
    from quantize.commands.exl2 import quantize_exl2
    from quantize.commands.gptq import quantize_gptq
    from quantize.eval.perplexity import eval_windows_from_dataset, evaluate_windows
    from quantize.executor.loop import ExecConfig
    from quantize.formats.exl2 import achieved_bpw

    if args.threads:
        torch.set_num_threads(args.threads)
    norm = None if args.norm == "auto" else float(args.norm)
    cfg = ExecConfig(device="cpu", dtype=torch.float32, batch_size=8)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    cal = out / "calibration"
    if not (cal / "manifest.json").is_file():
        sample_calibration(REF, str(VALID), args.samples, args.seq_len, 0, cal, overwrite=True)
    windows, _ = eval_windows_from_dataset(REF, str(TEST), 256, args.windows)

    rows = []

    def evaluate(name: str, path: Path, target, seconds: float, bpw_files: dict | None):
        r = evaluate_windows(path, windows, cfg, baseline=REF)
        row = {"method": name, "target": target, "seconds": round(seconds, 1), "kl": r.kl,
               "top1": r.top1_agreement, "ppl": r.perplexity, "ppl_fp": r.baseline_perplexity}
        if bpw_files:
            row["bpw"] = bpw_files["decoder"]["bpw"]
            row["head_bpw"] = bpw_files.get("head", {}).get("bpw")
        rows.append(row)
        print(json.dumps(row), flush=True)

    measurement = None
    for bpw in sorted(args.bpw):
        q = out / f"exl2-{bpw}"
        t0 = time.time()
        quantize_exl2(model_dir=REF, calibration=cal, out=q, bpw=bpw, head_bits=6, measurement=measurement,
                      measurement_rows=args.measurement_rows, norm=norm, exec_cfg=cfg, overwrite=True)
        seconds = time.time() - t0
        if measurement is None:
            measurement = out / "measurement.json"
            measurement.write_bytes((q / "measurement.json").read_bytes())
            print(f"measurement + quantization: {seconds:.0f}s", flush=True)
        evaluate("exl2", q, bpw, seconds, achieved_bpw(q))

    g = out / "gptq-4b-g128"
    t0 = time.time()
    quantize_gptq(model_dir=REF, calibration=cal, out=g, bits=4, group_size=128, act_order=True, sym=True, damp=0.01,
                  static_groups=False, block_size=128, rtn=False, exec_cfg=cfg, overwrite=True)
    gptq_seconds = time.time() - t0
    evaluate("gptq-4b-g128", g, 4, gptq_seconds, {"decoder": {"bpw": _gptq_bpw(g)}})

    print()
    print(f"{'method':<14} {'target':>6} {'bpw':>7} {'head bpw':>8} {'KL':>9} {'top-1':>7} {'ppl':>8} {'seconds':>7}")
    for r in rows:
        head = f"{r['head_bpw']:.2f}" if r.get("head_bpw") else "bf16"
        print(f"{r['method']:<14} {r['target']:>6} {r.get('bpw', float('nan')):7.4f} {head:>8} {r['kl']:9.2e} "
              f"{r['top1']:7.4f} {r['ppl']:8.3f} {r['seconds']:7.0f}")
    print(f"fp perplexity {rows[0]['ppl_fp']:.3f}")
    (out / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
    exl2 = [r for r in rows if r["method"] == "exl2"]
    falls = all(a["kl"] > b["kl"] for a, b in zip(exl2, exl2[1:]))
    within = all(abs(r["bpw"] - r["target"]) <= 0.05 for r in exl2)
    print(f"KL falls as bpw rises: {falls}; achieved bpw within ±0.05 of every target: {within}")
    return 0 if falls else 1


def _gptq_bpw(directory: Path) -> float:
    """Bits per weight of a GPTQ output from its files (qweight, qzeros, scales, g_idx per linear)."""
    from quantize.io.reader import CheckpointReader

    reader = CheckpointReader(directory)
    bits = weights = 0
    for name in reader.names():
        if name.endswith(".qweight"):
            prefix = name[: -len(".qweight")]
            k_words, n = reader.shape(name)
            for suffix in ("qweight", "qzeros", "scales", "g_idx"):
                t = f"{prefix}.{suffix}"
                if t in reader:
                    shape = reader.shape(t)
                    numel = 1
                    for d in shape:
                        numel *= d
                    bits += numel * 8 * _itemsize(reader.dtype(t))
            weights += reader.shape(f"{prefix}.g_idx")[0] * n
    return bits / weights


def _itemsize(dtype) -> int:
    import torch

    return torch.tensor([], dtype=dtype).element_size()


if __name__ == "__main__":
    sys.exit(main())
