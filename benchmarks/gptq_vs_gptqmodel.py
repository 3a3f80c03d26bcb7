"""Our GPTQ vs GPTQModel's GPTQ on CPU: same model, same calibration tokens, same settings.

Runs in the interop environment (``scripts/setup_interop.sh`` -> .venv-interop); prints a message
and exits 0 where ``gptqmodel`` cannot be imported.

* model: shared/models/ref-llama when present, else a synthetic 4-layer Llama (hidden 256) with the
  bundled tokenizer and bundled WikiText-2;
* calibration: one ``quantize sample`` set; GPTQModel gets the very same token windows (as
  ``input_ids`` + all-ones ``attention_mask``, batch 8 like ours);
* settings: 4-bit, group 128, desc_act (act-order), sym, damp 0.01, true-sequential, v1 ``gptq``
  format, fp32 model (GPTQModel: ``dtype=float32``, ``offload_to_disk=False``,
  ``act_group_aware=False``; ``GPTQMODEL_CPU_WORKERS=2``);
* each quantization runs in a fresh subprocess (wall time end to end: load, quantize, write; and
  peak RSS); both outputs are then evaluated by *our* eval, GPTQModel's read back with our
  ``DequantReader`` (same checkpoint format): perplexity, KL vs fp, top-1 agreement.

    .venv-interop/bin/python benchmarks/gptq_vs_gptqmodel.py [--samples 128] [--windows 60]
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

SETTINGS = dict(bits=4, group_size=128, act_order=True, sym=True, damp=0.01)
# Our runs, one per host-memory set-up (common.heap_setups: glibc flat -- the default without
# jemalloc --, glibc pooled, and jemalloc where installed -- the quantize command's default there);
# GPTQModel runs under glibc and, where jemalloc is installed, under jemalloc too (same allocator).
SETUPS = c.heap_setups()
OURS = {("ours" if k == "flat" else f"ours-{k}"): v for k, v in SETUPS.items()}
PEERS = {"gptqmodel": {}, **({"gptqmodel-jemalloc": SETUPS["jemalloc"][1]} if "jemalloc" in SETUPS else {})}
LABELS = {"ours": "ours, glibc --host-heap flat", "ours-pooled": "ours, glibc --host-heap pooled",
          "ours-jemalloc": "ours, jemalloc", "gptqmodel-jemalloc": "GPTQModel {version}, jemalloc",
          "gptqmodel": "GPTQModel {version}, glibc"}


def child_ours(model: Path, cal: Path, out: Path, host_heap: str = "flat") -> dict:
    # import what the pipeline imports lazily first: GPTQModel's timing starts after its (larger) imports
    import transformers.models.llama.modeling_llama  # noqa: F401
    from transformers import AutoConfig

    AutoConfig.from_pretrained(str(model))
    cpu0 = time.process_time()
    _, seconds = c.quantize(model, cal, out, host_heap=host_heap, **SETTINGS)
    return {"seconds": seconds, "cpu_s": time.process_time() - cpu0}


def child_gptqmodel(model: Path, cal: Path, out: Path, batch_size: int) -> dict:
    from gptqmodel.quantization.config import GPTQConfig

    qcfg = GPTQConfig(bits=SETTINGS["bits"], group_size=SETTINGS["group_size"], desc_act=SETTINGS["act_order"],
                      sym=SETTINGS["sym"], damp_percent=SETTINGS["damp"], static_groups=False, true_sequential=True,
                      act_group_aware=False, mse=0.0, offload_to_disk=False)
    return c.gptqmodel_quantize(model, cal, out, qcfg, batch_size)


def weight_agreement(model: Path, ours: Path, theirs: Path) -> dict:
    """Relative Frobenius distances over every quantized linear: ours vs GPTQModel's dequantized
    weights, and each vs the original weights (the quantization error, for scale)."""
    import torch

    from quantize.io.quantized import open_model

    orig, a, b = open_model(model), open_model(ours), open_model(theirs)
    names = [n for n in a.names() if n.endswith("_proj.weight")]
    sums = {"ours_vs_gptqmodel": 0.0, "ours_vs_fp": 0.0, "gptqmodel_vs_fp": 0.0}
    ref, same, total = 0.0, 0, 0
    for n in names:
        w0, wa, wb = (r.get(n, dtype=torch.float32) for r in (orig, a, b))
        sums["ours_vs_gptqmodel"] += float((wa - wb).square().sum())
        sums["ours_vs_fp"] += float((wa - w0).square().sum())
        sums["gptqmodel_vs_fp"] += float((wb - w0).square().sum())
        ref += float(w0.square().sum())
        same += int((wa == wb).sum())
        total += wa.numel()
    return {"linears": len(names), "identical": same / total, **{k: (v / ref) ** 0.5 for k, v in sums.items()}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    c.add_peer_args(ap)
    ap.add_argument("--repeat", type=int, default=2, help="runs of each tool, alternating; the fastest is kept")
    args = ap.parse_args()
    n_threads, threads = c.set_threads(args.threads)

    if args.child:
        tool, model, cal, out = args.child
        with c.quiet():
            res = child_ours(Path(model), Path(cal), Path(out), OURS[tool][0]) if tool in OURS else \
                child_gptqmodel(Path(model), Path(cal), Path(out), args.batch_size)
        print(json.dumps({**res, "peak_mb": c.maxrss_mb()}), flush=True)
        return 0

    if importlib.util.find_spec("gptqmodel") is None:
        c.skip(f"gptqmodel is not installed in {sys.prefix}; run scripts/setup_interop.sh and use .venv-interop/bin/python")
    import gptqmodel  # noqa: F401  (a broken install should fail here, loudly, not in the child)

    with tempfile.TemporaryDirectory(prefix="gptq_vs_gptqmodel-") as tmp:
        tmp = Path(tmp)
        ref = c.ref_llama()
        if ref is not None and c.wikitext("valid") and c.wikitext("test"):
            model, cal_data, eval_data = ref, str(c.wikitext("valid")), str(c.wikitext("test"))
        else:
            from quantize.testing.tiny import build_tiny_model

            print("shared/models/ref-llama not found: using a synthetic 4-layer Llama (hidden 256); "
                  "its KL/top-1 say little about quality, only about agreement")
            model = build_tiny_model("llama", tmp / "model", num_layers=4, hidden=256)
            cal_data, eval_data = "wikitext2", "wikitext2-test"
        print(f"model: {model}")
        print(f"device: {c.cpu_model()}, torch threads {threads}, GPTQMODEL_CPU_WORKERS "
              f"{os.environ.get('GPTQMODEL_CPU_WORKERS', '2')}")
        print(f"settings: {SETTINGS}; calibration {args.samples} x {args.seq_len} tokens of {Path(cal_data).name}, "
              f"batch {args.batch_size}; eval: first {args.windows} windows of {Path(eval_data).name}")
        cal = c.calibrate(model, cal_data, args.samples, args.seq_len, tmp / "cal")

        # Alternate the tools (ours, theirs, ours, ...) and keep each one's fastest run: on a shared
        # machine a burst of outside load then hits both sides alike. CPU seconds (all threads) are
        # reported too: they move far less with outside load than wall time.
        runs: dict[str, dict] = {}
        for rep in range(args.repeat):
            for tool in (*OURS, *PEERS):
                out = tmp / tool
                cmd = [sys.executable, __file__, "--threads", str(n_threads), "--batch-size", str(args.batch_size),
                       "--child", tool, str(model), str(cal), str(out)]
                env = {"LD_PRELOAD": "", **(OURS[tool][1] if tool in OURS else PEERS[tool])}
                r = c.run_json_child(cmd, env={"GPTQMODEL_CPU_WORKERS": os.environ.get("GPTQMODEL_CPU_WORKERS", "2"),
                                               **env})
                print(f"  run {rep + 1}/{args.repeat} {tool}: {r['seconds']:.1f}s wall, {r['cpu_s']:.1f}s CPU, "
                      f"peak RSS {r['peak_mb']:.0f} MB", flush=True)
                best = runs.get(tool)
                runs[tool] = r if best is None else {**r, "seconds": min(best["seconds"], r["seconds"]),
                                                     "cpu_s": min(best["cpu_s"], r["cpu_s"]),
                                                     "peak_mb": max(best["peak_mb"], r["peak_mb"])}

        windows = c.eval_windows(model, eval_data, args.seq_len, args.windows)
        fp = c.FpReference(model, windows)
        quality = {tool: fp.compare(tmp / tool) for tool in runs}
        agreement = weight_agreement(model, tmp / "ours", tmp / "gptqmodel")
        same_bytes = all((tmp / "ours" / f.name).read_bytes() == f.read_bytes()
                         for tool in OURS for f in sorted((tmp / tool).glob("*.safetensors")))

    print()
    rows = [["fp", None, None, None, fp.fp.perplexity, 0.0, 1.0]]
    for tool, r in runs.items():
        q = quality[tool]
        label = LABELS[tool].format(version=r.get("version", ""))
        rows.append([label, r["seconds"], r["cpu_s"], r["peak_mb"], q.perplexity, q.kl, q.top1])
    c.print_table(["quantizer", "wall s", "CPU s", "peak RSS MB", "perplexity", "KL vs fp", "top-1 agree"], rows)
    g = runs["gptqmodel"]
    print(f"GPTQModel split: load {g['load_s']:.1f}s, quantize {g['quantize_s']:.1f}s, save {g['save_s']:.1f}s")
    pairs = [(tool, "gptqmodel") for tool in OURS]
    if "gptqmodel-jemalloc" in runs:
        pairs.append(("ours-jemalloc", "gptqmodel-jemalloc"))
    for tool, peer in pairs:
        o, g = runs[tool], runs[peer]
        print(f"{LABELS[tool]} / {LABELS[peer].format(version=g.get('version', ''))} (best of {args.repeat} each): wall time "
              f"{o['seconds'] / g['seconds']:.2f}, CPU time {o['cpu_s'] / g['cpu_s']:.2f}; speed-up "
              f"{g['seconds'] / o['seconds']:.2f}x (goal >= 2x), peak RSS {o['peak_mb'] / g['peak_mb']:.2f}x")
    print(f"KL ours / GPTQModel: {quality['ours'].kl / quality['gptqmodel'].kl:.3f}; "
          f"our outputs byte-identical across {', '.join(SETUPS)}: {same_bytes}")
    print(f"dequantized weights over {agreement['linears']} linears, relative Frobenius distance: "
          f"ours vs GPTQModel {agreement['ours_vs_gptqmodel']:.4f}; to the original: ours {agreement['ours_vs_fp']:.4f}, "
          f"GPTQModel {agreement['gptqmodel_vs_fp']:.4f}; identical weights {100 * agreement['identical']:.1f}%")
    print("(GPTQ's error feedback is chaotic: one rounding decision that differs, e.g. from another float summation\n"
          " order of the Hessian, changes every later column, and each layer's Hessians depend on the previous\n"
          " quantized layers; equal quality with different weights is expected, see KL)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
