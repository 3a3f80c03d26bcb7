"""compressed-tensors outputs on ref-llama: quality side by side, and the GPTQ-vs-CT identity.

* the same GPTQ run (4-bit g128, sym, act-order with static groups, bf16 scale grid) written as a
  GPTQ checkpoint and as compressed-tensors: every linear must read back to identical weights;
* KL / top-1 / perplexity vs the bf16 model (our eval, WikiText-2 test windows) for: GPTQ in the
  GPTQ format (fp16 scale grid, the default there), GPTQ as CT W4A16 (bf16 grid: what vLLM's bf16
  kernels compute), AWQ as CT W4A16 (asymmetric), GPTQ CT W8A16, FP8 W8A8 dynamic and static (our
  eval applies the FP8 activation quantization the engine applies, per token or per tensor).

    python benchmarks/ct_quality.py [--samples 128] [--seq-len 256] [--windows 60]

Skips (exit 0) without ../shared (ref-llama and WikiText-2).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as c  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--windows", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--work", type=Path, default=None, help="keep the outputs here (default: a temp dir)")
    args = ap.parse_args(argv)

    model, valid, test = c.ref_llama(), c.wikitext("valid"), c.wikitext("test")
    if model is None or valid is None or test is None:
        c.skip("needs ../shared/models/ref-llama and ../shared/data/wikitext-2")

    import torch

    from quantize.commands.awq import quantize_awq
    from quantize.commands.fp8 import quantize_fp8
    from quantize.commands.gptq import quantize_gptq
    from quantize.io.quantized import open_model

    cfg = c.exec_config(args.batch_size)
    with tempfile.TemporaryDirectory(prefix="ct-quality-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        cal = c.calibrate(model, str(valid), args.samples, args.seq_len, work / "calibration")
        windows = c.eval_windows(model, str(test), args.seq_len, args.windows)
        ref = c.FpReference(model, windows, args.batch_size)

        g4 = dict(model_dir=model, calibration=cal, exec_cfg=cfg, bits=4, group_size=128, act_order=True, sym=True,
                  damp=0.01, block_size=128, rtn=False, overwrite=True)
        runs = {
            "GPTQ W4 g128, GPTQ format (fp16 scales)": lambda o: quantize_gptq(out=o, static_groups=False, **g4),
            "GPTQ W4 g128 static groups, GPTQ format, bf16 grid": lambda o: quantize_gptq(
                out=o, static_groups=True, scale_dtype="bfloat16", **g4),
            "GPTQ W4 g128 static groups, compressed-tensors": lambda o: quantize_gptq(
                out=o, static_groups=None, format="compressed-tensors", **g4),
            "AWQ W4 g128, compressed-tensors (asym)": lambda o: quantize_awq(
                model_dir=model, calibration=cal, exec_cfg=cfg, group_size=128, format="compressed-tensors",
                overwrite=True, out=o),
            "GPTQ W8 per channel, compressed-tensors": lambda o: quantize_gptq(
                out=o, static_groups=None, format="compressed-tensors",
                **{**g4, "bits": 8, "group_size": -1}),
            "FP8 W8A8 dynamic, compressed-tensors": lambda o: quantize_fp8(model_dir=model, out=o, exec_cfg=cfg,
                                                                          overwrite=True),
            "FP8 W8A8 static, compressed-tensors": lambda o: quantize_fp8(
                model_dir=model, out=o, exec_cfg=cfg, scheme="static", calibration=cal, overwrite=True),
        }
        rows, outs = [["bf16 (fp32 compute)", f"{ref.fp.perplexity:.3f}", "0", "1", "-"]], {}
        for i, (label, run) in enumerate(runs.items()):
            out = work / f"q{i}"
            t0 = time.perf_counter()
            with c.quiet():
                run(out)
            seconds = time.perf_counter() - t0
            q = ref.compare(out)
            outs[label] = out
            rows.append([label, f"{q.perplexity:.3f}", f"{q.kl:.3g}", f"{q.top1:.4f}", f"{seconds:.1f}"])
            print(f"{label}: ppl {q.perplexity:.3f} KL {q.kl:.4g} top-1 {q.top1:.4f} ({seconds:.1f} s)", flush=True)

        a = open_model(outs["GPTQ W4 g128 static groups, GPTQ format, bf16 grid"])
        b = open_model(outs["GPTQ W4 g128 static groups, compressed-tensors"])
        packed = [n for n in a.names() if n.endswith("_proj.weight")]
        same = a.names() == b.names() and all(torch.equal(a.get(n), b.get(n)) for n in a.names())

    print(f"\n{model.name}: calibration {args.samples} x {args.seq_len} tokens of valid.txt; eval {windows.shape[0]} x "
          f"{args.seq_len} tokens of test.txt; {c.cpu_model()}, {torch.get_num_threads()} threads\n")
    c.print_table(["weights", "perplexity", "KL vs bf16", "top-1", "wall s"], rows)
    print(f"\nsame GPTQ run written as GPTQ and as compressed-tensors: {len(packed)} quantized linears, "
          f"{'identical' if same else 'DIFFERENT'} read-back weights (every tensor compared)")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
