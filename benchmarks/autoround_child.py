"""Run AutoRound 0.16 (Intel's SignRound, arXiv:2309.05516) on given calibration token ids; save in
the GPTQ format (``auto_gptq``, symmetric), which our reader (quantize/io/quantized.py) takes.

Runs in .venv-autoround (scripts/setup_autoround.sh), started by benchmarks/lowbit_quality.py:

    .venv-autoround/bin/python benchmarks/autoround_child.py MODEL IDS.pt OUT --bits 3 --group-size 128 \
        --iters 200 --nsamples 128 [--threads N]

Prints one JSON line: {"seconds": wall seconds of quantize_and_save, "maxrss_mb": ..., "version": ...}.
"""

from __future__ import annotations

import argparse
import json
import resource
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("ids", help="torch.save'd int64 [N, L] calibration token ids")
    ap.add_argument("out")
    ap.add_argument("--bits", type=int, required=True)
    ap.add_argument("--group-size", type=int, required=True)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()

    import importlib.metadata as md

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from auto_round import AutoRound

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    ids = torch.load(args.ids)
    n = min(args.nsamples, ids.shape[0])
    dataset = [ids[i:i + 1] for i in range(n)]
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(args.model)
    t0 = time.perf_counter()
    ar = AutoRound(model, tokenizer=tok, bits=args.bits, group_size=args.group_size, sym=True, dataset=dataset,
                   iters=args.iters, nsamples=n, seqlen=ids.shape[1], batch_size=args.batch_size, device_map="cpu")
    ar.quantize_and_save(args.out, format="auto_gptq")
    seconds = time.perf_counter() - t0
    # 0.16 saves into a subfolder named after the model and scheme (e.g. OUT/ref-llama-w3g128)
    from pathlib import Path

    saved = [p.parent for p in sorted(Path(args.out).rglob("config.json"))]
    print(json.dumps({"seconds": seconds, "path": str(saved[0]) if saved else args.out, "nsamples": n, "iters": args.iters,
                      "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "version": md.version("auto-round")}))


if __name__ == "__main__":
    main()
