"""AWQ quality on a model trained on real text: fp vs RTN vs AWQ (vs GPTQ), 4-bit, same group size.

Uses /work/shared/models/ref-llama (12.6 M parameters, trained on WikiText-2 validation and other
public text) when present; otherwise says so and exits 0. Everything runs through quantize's own
library functions:

* calibration: ``sample_calibration`` on ``wikitext-2/valid.txt`` (default 128 x 256 tokens, seed 0);
* RTN: ``quantize_gptq(rtn=True, sym=False)``: round-to-nearest on the same asymmetric min/max grid
  AWQ stores (identical to ``quantize_awq(scale_search=False, clip=False)``);
* AWQ: ``quantize_awq`` (and the two halves alone: scales only, clipping only);
* GPTQ: ``quantize_gptq`` with the CLI defaults (symmetric, act-order);
* eval: ``evaluate_windows`` on the first 60 windows of 256 tokens of ``wikitext-2/test.txt``
  (never seen in training): perplexity, mean KL(fp || quantized) of the next-token distributions,
  top-1 agreement with the fp model. KL and top-1 move clearly on this model; perplexity barely does.

    python benchmarks/awq_quality.py [--samples 128] [--seq-len 256] [--windows 60] [--group-size 128]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

SHARED = Path("/work/shared")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=SHARED / "models" / "ref-llama")
    ap.add_argument("--data", type=Path, default=SHARED / "data" / "wikitext-2", help="directory with valid.txt and test.txt")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--windows", type=int, default=60)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-gptq", action="store_true", help="skip the GPTQ row")
    ap.add_argument("--work", type=Path, default=None, help="keep the outputs here (default: a temp dir)")
    ap.add_argument("--json", type=Path, default=None, help="also write the table as JSON")
    args = ap.parse_args(argv)

    if not (args.model / "config.json").is_file() or not (args.data / "valid.txt").is_file():
        print(f"SKIP: {args.model} or {args.data}/valid.txt is not present; nothing to measure")
        return 0

    from quantize import log
    from quantize.calibration import sample_calibration
    from quantize.commands.awq import quantize_awq
    from quantize.commands.common import make_exec_config
    from quantize.commands.gptq import quantize_gptq
    from quantize.eval.perplexity import eval_windows_from_dataset, evaluate_windows

    torch.manual_seed(0)
    cfg = make_exec_config(args.device, args.batch_size, False, "float32")
    g = args.group_size
    with tempfile.TemporaryDirectory(prefix="awq-quality-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        cal = work / "calibration"
        sample_calibration(args.model, str(args.data / "valid.txt"), args.samples, args.seq_len, 0, cal, overwrite=True)
        windows, _ = eval_windows_from_dataset(args.model, str(args.data / "test.txt"), args.seq_len, args.windows)

        awq = dict(model_dir=args.model, calibration=cal, exec_cfg=cfg, group_size=g, overwrite=True)
        gptq = dict(model_dir=args.model, calibration=cal, exec_cfg=cfg, bits=4, group_size=g, damp=0.01,
                    static_groups=False, block_size=128, overwrite=True)
        runs = {
            f"RTN 4-bit g{g} (asym)": lambda out: quantize_gptq(out=out, act_order=False, sym=False, rtn=True, **gptq),
            f"AWQ 4-bit g{g}": lambda out: quantize_awq(out=out, **awq),
            f"AWQ scales only g{g}": lambda out: quantize_awq(out=out, clip=False, **awq),
            f"AWQ clip only g{g}": lambda out: quantize_awq(out=out, scale_search=False, **awq),
        }
        if not args.no_gptq:
            runs[f"GPTQ 4-bit g{g} (sym, act-order)"] = lambda out: quantize_gptq(out=out, act_order=True, sym=True,
                                                                                 rtn=False, **gptq)
        rows = []
        fp_ppl = None
        for i, (label, run) in enumerate(runs.items()):
            out = work / f"q{i}"
            t0 = time.time()
            run(out)
            seconds = time.time() - t0
            r = evaluate_windows(out, windows, cfg, baseline=args.model)
            fp_ppl = r.baseline_perplexity
            rows.append({"weights": label, "perplexity": r.perplexity, "kl": r.kl, "top1": r.top1_agreement,
                         "seconds": seconds})
            log.info(f"{label}: ppl {r.perplexity:.3f} KL {r.kl:.5f} top-1 {r.top1_agreement:.4f} ({seconds:.1f}s)")
        rows.insert(0, {"weights": "fp (bf16 checkpoint, fp32 compute)", "perplexity": fp_ppl, "kl": 0.0, "top1": 1.0,
                        "seconds": None})

    print(f"\n{args.model.name}: calibration {args.samples} x {args.seq_len} tokens of valid.txt; "
          f"eval {windows.shape[0]} x {args.seq_len} tokens of test.txt; device {cfg.device}, "
          f"{torch.get_num_threads()} threads\n")
    print("| weights | perplexity | KL vs fp | top-1 agreement | seconds |")
    print("|---|---|---|---|---|")
    for r in rows:
        sec = "-" if r["seconds"] is None else f"{r['seconds']:.1f}"
        print(f"| {r['weights']} | {r['perplexity']:.3f} | {r['kl']:.5f} | {r['top1']:.4f} | {sec} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
