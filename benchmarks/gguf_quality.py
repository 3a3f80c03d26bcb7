"""GGUF on ref-llama: our Hessian-aware bytes vs llama.cpp's reference rounding, type by type.

For each file type, two GGUFs of the same type mix (so the same size, to the byte):

* "llama.cpp rounding": `quantize gguf --type T` without calibration -- the bytes llama.cpp's own
  imatrix-free quantizer writes (our re-implementation is bit-exact against its C code:
  tests/test_gguf_blocks.py, and against llama-quantize itself in the llama.cpp interop tier);
* "ours (GPTQ on the grid)": `quantize gguf --type T --calibration C`.

KL to the bf16 model, top-1 agreement and perplexity by our eval (WikiText-2 test windows). ref-llama
is 384 wide, so llama.cpp's K mixes fall back to Q5_0/Q5_1/Q8_0 for every tensor of that width (only
down_proj, 1024 wide, and the mixes' Q6_K tensors stay K types); both columns use the same mix.

    python benchmarks/gguf_quality.py [--types Q4_K_M,Q5_K_M,Q6_K,Q4_0,Q8_0] [--samples 128] [--windows 60]
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
    ap.add_argument("--types", default="Q4_K_M,Q5_K_M,Q6_K,Q4_0,Q8_0")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--windows", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args(argv)
    model, valid, test = c.ref_llama(), c.wikitext("valid"), c.wikitext("test")
    if model is None or valid is None or test is None:
        c.skip("needs ../shared/models/ref-llama and ../shared/data/wikitext-2")

    import torch

    from quantize.commands.gguf import quantize_gguf

    cfg = c.exec_config(args.batch_size)
    rows = []
    with tempfile.TemporaryDirectory(prefix="gguf-quality-") as tmp:
        work = Path(tmp)
        cal = c.calibrate(model, str(valid), args.samples, args.seq_len, work / "calibration")
        windows = c.eval_windows(model, str(test), args.seq_len, args.windows)
        ref = c.FpReference(model, windows, args.batch_size)
        rows.append(["bf16", "-", "-", f"{ref.fp.perplexity:.3f}", "0", "1", "-"])
        for t in args.types.split(","):
            kls = {}
            for label, kw in (("llama.cpp rounding", {}), ("ours (GPTQ on the grid)", {"calibration": cal})):
                out = work / f"{t}-{len(kw)}"
                t0 = time.perf_counter()
                with c.quiet():
                    quantize_gguf(model_dir=model, out=out, exec_cfg=cfg, ftype=t, overwrite=True, **kw)
                seconds = time.perf_counter() - t0
                q = ref.compare(out)
                kls[label] = q.kl
                size = (out / "model.gguf").stat().st_size
                rows.append([t, label, f"{size / 1e6:.2f}", f"{q.perplexity:.3f}", f"{q.kl:.4g}", f"{q.top1:.4f}",
                             f"{seconds:.1f}"])
                print(f"{t} {label}: {size} bytes, ppl {q.perplexity:.3f} KL {q.kl:.4g} top-1 {q.top1:.4f} "
                      f"({seconds:.1f} s)", flush=True)
            rows.append([t, "ratio ours / llama.cpp", "", "", f"{kls['ours (GPTQ on the grid)'] / kls['llama.cpp rounding']:.3f}",
                         "", ""])
    print(f"\n{model.name}: calibration {args.samples} x {args.seq_len} tokens of valid.txt; eval {windows.shape[0]} x "
          f"{args.seq_len} tokens of test.txt; {c.cpu_model()}, {torch.get_num_threads()} threads\n")
    c.print_table(["type", "bytes chosen by", "file MB", "perplexity", "KL vs bf16", "top-1", "wall s"], rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
