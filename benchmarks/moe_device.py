"""Mixture-of-Experts on the compute device: the experts resident vs ``--expert-chunk N``, side by side.

For a random Qwen3-MoE whose experts dominate the layer (``common.build_synthetic_moe``), GPTQ and
AWQ each run twice in this process on ``--device`` (a GPU session: cuda): the whole sparse layer on
the device, then ``--expert-chunk N`` (the experts in host memory, N at a time on the device). It
prints, for each run, the wall time, the device's peak allocated memory (CUDA) or the process's peak
RSS (CPU), and whether the chunked output's bytes equal the resident one's (they must: the same
solve). Exits 1 if any pair differs.

    python benchmarks/moe_device.py --device cuda [--layers 2 --hidden 2048 --experts 64 --width 768 --chunk 4]
    python benchmarks/moe_device.py --device cpu --hidden 256 --experts 8 --width 128   # a smoke run
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as c  # noqa: E402


def digest(out: Path) -> str:
    """One fingerprint of the output's shards (each hashed as the manifest hashes files: streamed)."""
    from quantize.manifest import sha256_bytes, sha256_file

    return sha256_bytes("".join(sha256_file(f) for f in sorted(out.glob("*.safetensors"))).encode())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--width", type=int, default=768, help="expert intermediate size")
    ap.add_argument("--chunk", type=int, default=4)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--methods", default="gptq,awq")
    args = ap.parse_args()

    import torch

    from quantize.commands.awq import quantize_awq
    from quantize.commands.common import make_exec_config
    from quantize.commands.gptq import quantize_gptq

    cuda = args.device.startswith("cuda")
    with tempfile.TemporaryDirectory(prefix="moe-device-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        model = c.build_synthetic_moe(tmp / "model", layers=args.layers, hidden=args.hidden, moe_intermediate=args.width,
                                      experts=args.experts, top_k=8 if args.experts >= 32 else 2,
                                      heads=max(1, args.hidden // 128), kv_heads=max(1, args.hidden // 512))
        cal = c.calibrate(model, str(c.repo_root() / "calibration" / "wikitext2" / "valid.txt"), args.samples,
                          args.seq_len, tmp / "cal")
        layer_bytes = 3 * args.experts * args.hidden * args.width * 2
        print(f"synthetic Qwen3-MoE: {args.layers} layers, hidden {args.hidden}, {args.experts} experts of width "
              f"{args.width} ({layer_bytes / 2**30:.2f} GiB of experts a layer in bf16); calibration "
              f"{args.samples} x {args.seq_len}; built in {time.perf_counter() - t0:.0f} s; device {args.device}",
              flush=True)
        rows, bad = [], 0
        for method in [m for m in args.methods.split(",") if m]:
            digests = {}
            for chunk in (None, args.chunk):
                cfg = make_exec_config(args.device, 8, False, "auto", expert_chunk=chunk)
                out = tmp / f"{method}-{chunk}"
                if cuda:
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                t = time.perf_counter()
                with c.quiet():
                    if method == "gptq":
                        quantize_gptq(model_dir=model, calibration=cal, out=out, bits=4, group_size=128, act_order=True,
                                      sym=True, damp=0.01, static_groups=None, block_size=128, rtn=False,
                                      exec_cfg=cfg, overwrite=True)
                    else:
                        quantize_awq(model_dir=model, calibration=cal, out=out, exec_cfg=cfg, overwrite=True)
                if cuda:
                    torch.cuda.synchronize()
                secs = time.perf_counter() - t
                peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else c.maxrss_mb()
                digests[chunk] = digest(out)
                rows.append([method, "resident" if chunk is None else f"--expert-chunk {chunk}", round(secs, 1),
                             round(peak), digests[chunk][:12]])
                print(f"  {rows[-1]}", flush=True)
            same = digests[None] == digests[args.chunk]
            bad += not same
            print(f"{method}: chunked bytes {'identical to' if same else 'DIFFER from'} the resident run", flush=True)
        c.print_table(["method", "experts", "wall s", "peak device MiB" if cuda else "peak RSS MB (process)",
                       "sha256 of the shards"], rows)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
