"""Mixture-of-Experts GPTQ: ours (routed / all-token expert statistics) vs GPTQModel's own GPTQ on CPU.

Runs in the interop environment (``scripts/setup_interop.sh`` -> .venv-interop); exits 0 with a SKIP
line where ``gptqmodel`` cannot be imported.

* model: the small trained Qwen3-MoE of ``benchmarks/moe_quality.py`` (4 layers, 8 experts, top-2;
  ``scripts/train_tiny_moe.py`` builds it into out/bench-cache/tiny-qwen3-moe on first use); with
  ``--model a3b`` the trained Qwen3-30B-A3B miniature (16 layers, hidden 256, 128 experts of width
  128, top-8, 822 MB in fp32, 98% of it experts; ``--preset a3b``, ~25-30 min to train on first
  use), where, as in the released models, the experts are most of the weights and of the work;
* calibration: one ``quantize sample`` set of the bundled WikiText-2 validation text; GPTQModel gets
  the very same token windows, batch 8 like ours;
* settings: 4-bit, group 128, sym, damp 0.01, act-order with static groups (our default; GPTQModel
  ``desc_act=True, static_groups=True``), true-sequential, fp32, min/max group ranges (GPTQModel
  ``mse=0.0``; ours ``--grid minmax``, and ``ours-mse``: the clipping search that ``--grid auto``
  picks at 4 bits); GPTQModel's defaults otherwise (its MoE fallback: RTN below 0.5% of the
  tokens); RTN on the same grid for scale;
* each quantization runs in a fresh subprocess (wall time end to end, peak RSS); all outputs are
  evaluated by our eval (GPTQModel's read back by our reader: same checkpoint format).

    .venv-interop/bin/python benchmarks/moe_vs_gptqmodel.py [--samples 128] [--seq-len 256] [--windows 60]
    .venv-interop/bin/python benchmarks/moe_vs_gptqmodel.py --model a3b --tools ours-routed,ours-all,rtn,gptqmodel
    .venv-interop/bin/python benchmarks/moe_vs_gptqmodel.py --synthetic   # speed and memory where experts dominate
    .venv-interop/bin/python benchmarks/moe_vs_gptqmodel.py --synthetic --layers 16 --tools ours-routed,gptqmodel

``--synthetic``: a random Qwen3-MoE (``--layers``, default 4; hidden 1024, 8 experts of width 512,
top-2; ``common.build_synthetic_moe``) instead of the trained one: its KL says nothing about
quality, its time and peak RSS are those of a model whose experts dominate the work (and with more
layers, whose weights dominate the memory of a tool that loads the whole model).

Each child also reports its RSS after its imports (torch, transformers; GPTQModel's own), the part
of the peak that no quantization work can remove.
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

TOOLS = ("ours-routed", "ours-all", "rtn", "ours-mse", "gptqmodel")


def child(tool: str, model: Path, cal: Path, out: Path, batch_size: int) -> dict:
    if tool == "gptqmodel":
        import gptqmodel  # noqa: F401  (imports outside the timing)
        from gptqmodel.quantization.config import GPTQConfig

        imported = c.rss_mb()
        qcfg = GPTQConfig(bits=4, group_size=128, desc_act=True, static_groups=True, sym=True, damp_percent=0.01,
                          true_sequential=True, act_group_aware=False, mse=0.0, offload_to_disk=False)
        return {**c.gptqmodel_quantize(model, cal, out, qcfg, batch_size), "import_mb": imported}
    import transformers.models.qwen3_moe.modeling_qwen3_moe  # noqa: F401  (imports outside the timing, as GPTQModel's)
    from quantize.commands.gptq import quantize_gptq

    imported = c.rss_mb()
    t0, cpu0 = time.perf_counter(), time.process_time()
    m = quantize_gptq(model_dir=model, calibration=cal, out=out, bits=4, group_size=128, act_order=tool != "rtn",
                      sym=True, damp=0.01, static_groups=None, block_size=128, rtn=tool == "rtn",
                      exec_cfg=c.exec_config(batch_size), overwrite=True,
                      moe_calibration="all" if tool == "ours-all" else "routed",
                      grid="mse" if tool == "ours-mse" else "minmax")
    cov = m.metrics.get("moe", {})
    return {"seconds": time.perf_counter() - t0, "cpu_s": time.process_time() - cpu0, "import_mb": imported,
            "fallbacks": sum(len(v) for v in cov.get("fallback_experts", {}).values()),
            "accounted": sum(sum(r["moe"]["solved"].values()) for r in m.metrics["layers"] if "moe" in r)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    c.add_peer_args(ap)
    ap.add_argument("--repeat", type=int, default=1, help="runs of each tool, alternating; the fastest is kept")
    ap.add_argument("--model", choices=("tiny", "a3b"), default="tiny",
                    help="the trained MoE: tiny (4 layers, 8 experts) or a3b (Qwen3-30B-A3B's shape in miniature)")
    ap.add_argument("--synthetic", action="store_true", help="a random Qwen3-MoE of hidden 1024 (speed, memory)")
    ap.add_argument("--layers", type=int, default=4, help="--synthetic: decoder layers (more: the weights dominate memory)")
    ap.add_argument("--tools", default=",".join(TOOLS), help=f"comma-separated subset of {', '.join(TOOLS)}")
    args = ap.parse_args()
    n_threads, threads = c.set_threads(args.threads)
    if args.child:
        tool, model, cal, out = args.child
        with c.quiet():
            res = child(tool, Path(model), Path(cal), Path(out), args.batch_size)
        print(json.dumps({**res, "peak_mb": c.maxrss_mb()}), flush=True)
        return 0
    if importlib.util.find_spec("gptqmodel") is None:
        c.skip(f"gptqmodel is not installed in {sys.prefix}; run scripts/setup_interop.sh and use .venv-interop/bin/python")
    from moe_quality import trained_moe

    tools = [t for t in args.tools.split(",") if t]
    if "gptqmodel" not in tools or "ours-routed" not in tools or set(tools) - set(TOOLS):
        ap.error(f"--tools: a subset of {', '.join(TOOLS)} with ours-routed and gptqmodel")

    text = c.repo_root() / "calibration" / "wikitext2"
    with tempfile.TemporaryDirectory(prefix="moe_vs_gptqmodel-") as tmp:
        tmp = Path(tmp)
        model = (c.build_synthetic_moe(tmp / "synthetic-moe", layers=args.layers, hidden=1024, moe_intermediate=512, experts=8,
                                       top_k=2, heads=16, kv_heads=4) if args.synthetic else trained_moe(args.model))
        cal = c.calibrate(model, str(text / "valid.txt"), args.samples, args.seq_len, tmp / "cal")
        runs: dict[str, dict] = {}
        for rep in range(args.repeat):
            for tool in tools:
                cmd = [sys.executable, __file__, "--threads", str(n_threads), "--batch-size", str(args.batch_size),
                       "--child", tool, str(model), str(cal), str(tmp / tool)]
                r = c.run_json_child(cmd, env={"LD_PRELOAD": "",
                                               "GPTQMODEL_CPU_WORKERS": os.environ.get("GPTQMODEL_CPU_WORKERS", "2")})
                print(f"  run {rep + 1}/{args.repeat} {tool}: {r['seconds']:.1f}s wall, {r['cpu_s']:.1f}s CPU, "
                      f"peak RSS {r['peak_mb']:.0f} MB (after imports {r['import_mb']:.0f} MB)", flush=True)
                best = runs.get(tool)
                runs[tool] = r if best is None else {**r, "seconds": min(best["seconds"], r["seconds"]),
                                                     "cpu_s": min(best["cpu_s"], r["cpu_s"]),
                                                     "peak_mb": max(best["peak_mb"], r["peak_mb"])}
        windows = c.eval_windows(model, str(text / "test.txt"), args.seq_len, args.windows)
        fp = c.FpReference(model, windows)
        quality = {tool: fp.compare(tmp / tool) for tool in runs}

    version = runs["gptqmodel"].get("version", "")
    from quantize.arch import get_arch

    cfg = json.loads((model / "config.json").read_text())
    arch = get_arch(cfg)
    what = (f"{'random' if args.synthetic else 'trained'}, hidden {cfg['hidden_size']}, "
            f"expert width {cfg['moe_intermediate_size']}")
    print(f"\n{model.name}: Qwen3-MoE ({what}), {arch.num_layers(cfg)} layers, {arch.num_experts(cfg)} experts "
          f"(top-{arch.experts_per_token(cfg)}); calibration {args.samples} x {args.seq_len} tokens; "
          f"eval {args.windows} x {args.seq_len} tokens of WikiText-2 test; {c.cpu_model()}, torch threads {threads}\n")
    labels = {"ours-routed": "ours, GPTQ routed (default)", "ours-all": "ours, GPTQ all tokens", "rtn": "ours, RTN",
              "ours-mse": "ours, GPTQ routed, mse grid (default --grid auto)", "gptqmodel": f"GPTQModel {version}"}
    rows = [["bf16", None, None, None, None, fp.fp.perplexity, 0.0, 1.0, None]]
    for tool, r in runs.items():
        q = quality[tool]
        rows.append([labels[tool], r["seconds"], r["cpu_s"], r["peak_mb"], r["import_mb"], q.perplexity, q.kl, q.top1,
                     r.get("fallbacks")])
    c.print_table(["quantizer", "wall s", "CPU s", "peak RSS MB", "RSS after imports MB", "perplexity", "KL vs bf16",
                   "top-1", "fallback experts"], rows)
    o, g = runs["ours-routed"], runs["gptqmodel"]
    print(f"ours (routed) / GPTQModel: KL {quality['ours-routed'].kl / quality['gptqmodel'].kl:.3f}, "
          f"speed-up {g['seconds'] / o['seconds']:.2f}x wall, {g['cpu_s'] / o['cpu_s']:.2f}x CPU (goal >= 2x), peak RSS {o['peak_mb'] / g['peak_mb']:.2f}x "
          f"(goal <= 0.5x); experts accounted for in our manifest: {o['accounted']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
