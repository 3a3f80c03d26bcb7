"""Our AWQ vs GPTQModel's AWQ on CPU: same model, same calibration tokens, same settings.

Mirrors ``gptq_vs_gptqmodel.py``. Runs in the interop environment (``scripts/setup_interop.sh`` ->
.venv-interop); prints a message and exits 0 where ``gptqmodel`` cannot be imported or
shared/models/ref-llama (with shared WikiText-2) is absent.

* model: shared/models/ref-llama (fp32 math on both sides);
* calibration: one ``quantize sample`` set from WikiText-2 valid.txt; GPTQModel gets the very same
  token windows (``input_ids`` + all-ones ``attention_mask``, batch 8 like ours);
* settings: 4-bit, group 128, zero point (asymmetric), GEMM format; both sides use duo scaling,
  a 20-point scale grid and weight clipping (20-point grid, max shrink 0.5). Known differences:
  ours searches scales on at most ``search_tokens`` (8192) calibration tokens, GPTQModel on all of
  them (it samples 512 tokens for clipping, as ours does per its own rule);
  GPTQModel: ``AWQConfig(sym=False, format=gemm)``, ``offload_to_disk=False``, ``GPTQMODEL_CPU_WORKERS=2``;
* each quantization runs in a fresh subprocess (wall time end to end: load, quantize, write; and
  peak RSS); both outputs are evaluated by *our* eval, GPTQModel's read back with our
  ``DequantReader`` (same AWQ GEMM checkpoint format): perplexity, KL vs fp, top-1 agreement.

    .venv-interop/bin/python benchmarks/awq_vs_gptqmodel.py [--samples 128] [--windows 60]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as c  # noqa: E402

SETTINGS = dict(bits=4, group_size=128, zero_point=True)


def child_ours(model: Path, cal: Path, out: Path, batch_size: int) -> dict:
    # import what the pipeline imports lazily first: GPTQModel's timing starts after its (larger) imports
    import transformers.models.llama.modeling_llama  # noqa: F401
    from transformers import AutoConfig

    from quantize.commands.awq import quantize_awq

    AutoConfig.from_pretrained(str(model))
    t0 = time.perf_counter()
    quantize_awq(model_dir=model, calibration=cal, out=out, exec_cfg=c.exec_config(batch_size),
                 bits=SETTINGS["bits"], group_size=SETTINGS["group_size"], overwrite=True)
    return {"seconds": time.perf_counter() - t0}


def child_gptqmodel(model: Path, cal: Path, out: Path, batch_size: int) -> dict:
    import torch
    from gptqmodel import GPTQModel
    from gptqmodel.quantization.config import AWQConfig, FORMAT

    from quantize.calibration import load_calibration

    ids, _ = load_calibration(cal)
    data = [{"input_ids": row.tolist(), "attention_mask": [1] * len(row)} for row in ids.long()]
    qcfg = AWQConfig(bits=SETTINGS["bits"], group_size=SETTINGS["group_size"], sym=not SETTINGS["zero_point"],
                     format=FORMAT.GEMM, offload_to_disk=False)
    t0 = time.perf_counter()
    m = GPTQModel.load(str(model), qcfg, device="cpu", dtype=torch.float32)
    t1 = time.perf_counter()
    m.quantize(data, batch_size=batch_size)
    t2 = time.perf_counter()
    m.save(str(out))
    t3 = time.perf_counter()
    import gptqmodel

    return {"seconds": t3 - t0, "load_s": t1 - t0, "quantize_s": t2 - t1, "save_s": t3 - t2,
            "version": gptqmodel.__version__}


def saved_config(out: Path) -> dict:
    """The quantization config GPTQModel wrote (quantize_config.json or config.json's quantization_config)."""
    q = out / "quantize_config.json"
    if q.is_file():
        return json.loads(q.read_text())
    cfg = out / "config.json"
    return json.loads(cfg.read_text()).get("quantization_config", {}) if cfg.is_file() else {}


def weight_distances(model: Path, ours: Path, theirs: Path) -> dict:
    """Relative Frobenius distances of the dequantized weights over every quantized linear: ours vs
    GPTQModel's, and each vs the original (AWQ folds its scales into the previous norm/linear, so
    per-tensor distances to the original include that rescaling; the ratio is what matters)."""
    import torch

    from quantize.io.quantized import open_model

    orig, a, b = open_model(model), open_model(ours), open_model(theirs)
    names = [n for n in a.names() if n.endswith("_proj.weight")]
    sums = {"ours_vs_gptqmodel": 0.0, "ours_vs_fp": 0.0, "gptqmodel_vs_fp": 0.0}
    ref = 0.0
    for n in names:
        w0, wa, wb = (r.get(n, dtype=torch.float32) for r in (orig, a, b))
        sums["ours_vs_gptqmodel"] += float((wa - wb).square().sum())
        sums["ours_vs_fp"] += float((wa - w0).square().sum())
        sums["gptqmodel_vs_fp"] += float((wb - w0).square().sum())
        ref += float(w0.square().sum())
    return {"linears": len(names), **{k: (v / ref) ** 0.5 for k, v in sums.items()}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--windows", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=0, help="torch threads in each run (0: auto, see common.set_threads)")
    ap.add_argument("--child", nargs=4, metavar=("TOOL", "MODEL", "CAL", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    n_threads, threads = c.set_threads(args.threads)

    if args.child:
        tool, model, cal, out = args.child
        child = child_ours if tool == "ours" else child_gptqmodel
        with c.quiet():
            res = child(Path(model), Path(cal), Path(out), args.batch_size)
        print(json.dumps({**res, "peak_mb": c.maxrss_mb()}), flush=True)
        return 0

    if importlib.util.find_spec("gptqmodel") is None:
        c.skip(f"gptqmodel is not installed in {sys.prefix}; run scripts/setup_interop.sh and use .venv-interop/bin/python")
    import gptqmodel  # noqa: F401  (a broken install should fail here, loudly, not in the child)

    model, valid, test = c.ref_llama(), c.wikitext("valid"), c.wikitext("test")
    if model is None or valid is None or test is None:
        c.skip("shared/models/ref-llama or shared/data/wikitext-2/{valid,test}.txt not found "
               "(set QUANTIZE_SHARED); this comparison needs a model trained on real text")

    with tempfile.TemporaryDirectory(prefix="awq_vs_gptqmodel-") as tmp:
        tmp = Path(tmp)
        print(f"model: {model}")
        print(f"device: {c.cpu_model()}, torch threads {threads}, GPTQMODEL_CPU_WORKERS "
              f"{os.environ.get('GPTQMODEL_CPU_WORKERS', '2')}")
        print(f"settings: {SETTINGS}, GEMM format; calibration {args.samples} x {args.seq_len} tokens of "
              f"{valid.name}, batch {args.batch_size}; eval: first {args.windows} windows x {args.seq_len} of {test.name}")
        cal = c.calibrate(model, str(valid), args.samples, args.seq_len, tmp / "cal")

        runs = {}
        for tool in ("ours", "gptqmodel"):
            cmd = [sys.executable, __file__, "--threads", str(n_threads), "--batch-size", str(args.batch_size),
                   "--child", tool, str(model), str(cal), str(tmp / tool)]
            runs[tool] = c.run_json_child(cmd, env={"GPTQMODEL_CPU_WORKERS": os.environ.get("GPTQMODEL_CPU_WORKERS", "2")})
            print(f"  {tool}: {runs[tool]['seconds']:.1f}s, peak RSS {runs[tool]['peak_mb']:.0f} MB", flush=True)
        their_cfg = saved_config(tmp / "gptqmodel")

        windows = c.eval_windows(model, str(test), args.seq_len, args.windows)
        fp = c.FpReference(model, windows)
        quality = {tool: fp.compare(tmp / tool) for tool in runs}
        dist = weight_distances(model, tmp / "ours", tmp / "gptqmodel")

    print()
    rows = [["fp", None, None, fp.fp.perplexity, 0.0, 1.0]]
    for tool, r in runs.items():
        q = quality[tool]
        label = "ours" if tool == "ours" else f"GPTQModel {r.get('version', '')}"
        rows.append([label, r["seconds"], r["peak_mb"], q.perplexity, q.kl, q.top1])
    c.print_table(["AWQ quantizer", "wall s", "peak RSS MB", "perplexity", "KL vs fp", "top-1 agree"], rows)
    g = runs["gptqmodel"]
    keys = ("quant_method", "bits", "group_size", "zero_point", "sym", "version", "format", "checkpoint_format")
    print(f"GPTQModel saved config: {({k: their_cfg[k] for k in keys if k in their_cfg})}")
    print(f"GPTQModel split: load {g['load_s']:.1f}s, quantize {g['quantize_s']:.1f}s, save {g['save_s']:.1f}s")
    print(f"wall time ours / GPTQModel: {runs['ours']['seconds'] / g['seconds']:.2f} (2 shared cores: noisy)")
    print(f"KL ours / GPTQModel: {quality['ours'].kl / quality['gptqmodel'].kl:.3f}")
    print(f"dequantized weights over {dist['linears']} linears, relative Frobenius distance: ours vs GPTQModel "
          f"{dist['ours_vs_gptqmodel']:.4f}; to the original: ours {dist['ours_vs_fp']:.4f}, "
          f"GPTQModel {dist['gptqmodel_vs_fp']:.4f} (includes the folded AWQ scales)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
