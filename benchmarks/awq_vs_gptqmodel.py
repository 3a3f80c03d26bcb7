"""Our AWQ vs GPTQModel's AWQ and AutoAWQ on CPU: same model, same calibration tokens, same settings.

Mirrors ``gptq_vs_gptqmodel.py``. Runs in the interop environment (``scripts/setup_interop.sh`` ->
.venv-interop); prints a message and exits 0 where ``gptqmodel`` cannot be imported or
shared/models/ref-llama (with shared WikiText-2) is absent. AutoAWQ runs in its own environment
(``scripts/setup_autoawq.sh`` -> .venv-autoawq: it needs transformers 4.x); without it, its rows say so.

* model: shared/models/ref-llama, fp32 math on every side except the "GPTQModel bf16" row;
* calibration: one ``quantize sample`` set from WikiText-2 valid.txt; the peers get the very same
  token windows (GPTQModel: ``input_ids`` + all-ones ``attention_mask``, batch 8 like ours;
  AutoAWQ: the windows as lists of token ids, ``max_calib_seq_len`` = the window length so its
  concatenate-and-split gives back exactly these windows, forwards in chunks of 8 samples);
* settings: 4-bit, group 128, zero point (asymmetric), AWQ GEMM checkpoint; all use duo scaling, a
  20-point scale grid and weight clipping (20-point grid, max shrink 0.5, 512 sampled tokens).
  Known differences: ours scores every scale candidate over all calibration tokens with the
  quadratic form of the linears' input Hessian and re-runs the attention/MLP sub-block (all tokens)
  on the identity and the 6 best of them only (``rerun_top``), the peers re-run every candidate; ours
  keeps s = 1 (plain RTN) as a candidate, the peers' duo grid does not; AutoAWQ rounds the final
  weights in fp16 (``_apply_quant`` casts each linear to half);
  GQA ref-llama: nobody scales v_proj -> o_proj (shapes differ);
* our other rows: "ours, bf16 sub-block re-runs" is the default with ``rerun_dtype="bfloat16"``
  (the re-runs on a bf16 copy of the sub-block); "ours, 8192 search tokens" is the previous default (every candidate re-run on the
  first 8192 tokens: ``search_tokens=8192, rerun_top=-1``); "ours, clip grid 20" (tool ``ours-clip20``, not
  run unless asked) is the default with the peers' 5% clip steps (``clip_grid=20``, the default before
  1% steps); "ours, every candidate re-run" (tool
  ``ours-rerun-all``, not run unless asked) re-runs all 21 on all tokens, like the peers;
* RTN row: our AWQ stage with ``scale_search=False, clip=False`` (round-to-nearest, same format);
* each quantization runs in a fresh subprocess (wall time end to end: load, quantize, write; the
  process's CPU time over the same span, all threads, less sensitive to other jobs on a shared
  machine; and peak RSS); every output is evaluated by *our* eval, the peers' read back with our
  ``DequantReader`` (same AWQ GEMM format; checked equal to GPTQModel's own ``dequantize_gemm`` on
  both peers' outputs): perplexity, KL vs fp, top-1 agreement. A peer that fails gets a
  ``failed: <reason>`` row and the script still exits 0; only our own failure is an error.

GPTQModel 7.6.0 on CPU (a shim in the child process only; nothing under site-packages changes):
``quantize()`` picks, for AWQ ``FORMAT.GEMM``, the CUDA kernel class ``AwqGEMMLinear`` as the module
its packed weights go into and validates that choice before quantizing ("AWQ: CUDA is not
available"). We pass ``quantize(backend=BACKEND.AWQ_TORCH)``, GPTQModel's portable torch kernel for
the same GEMM format (its ``pack`` writes the same qweight/qzeros/fp16-scales layout), and, for the
fp32 row, add fp32 to ``AwqTorchLinear.SUPPORTS_DTYPES`` (fp16/bf16 only, like ``AwqGEMMLinear``;
``pack`` casts scales to fp16 either way). The kernel does not enter the algorithm: the AWQ
processor uses it only in ``pack_module``; the script counts ``AwqTorchLinear.forward`` calls while
quantizing and prints them (0 expected).

CPU-only bugs in both peers: their scale search saves the original weights with ``.cpu()``/``.to()``,
which copy on a GPU but return the live tensor on CPU (same dtype), so the saved copy is the weight:
* GPTQModel 7.6.0, looper/awq_processor.py ``_search_best_scale``: ``orig_weights_cpu = {fc:
  fc.weight.detach().to(torch.float32).cpu().contiguous()}`` aliases an fp32 CPU weight; the
  per-candidate restore copies the weight onto itself, so the 20 candidates' scale, fake-quantize,
  unscale accumulate in the weights. A bf16 model gets a real copy (``.to(float32)``): hence the
  "GPTQModel bf16" row (bf16 is also what its AWQ kernels take), without the dtype shim.
* AutoAWQ 0.2.9, awq/quantize/quantizer.py ``_search_best_scale``: ``org_sd = {k: v.cpu() for k, v
  in module2inspect.state_dict().items()}`` aliases the weights; the first candidate's in-place
  ``fc.weight.mul_(scales)`` changes ``org_sd``, so every later candidate and the final scaling start
  from W·s(α=0). The "copy fix" row passes ``quantize(quantizer_cls=...)`` a subclass whose only
  change is that this ``state_dict`` returns clones (what ``.cpu()`` gives on a GPU).

    .venv-interop/bin/python benchmarks/awq_vs_gptqmodel.py [--samples 128] [--windows 60] [--tools ...]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as c  # noqa: E402

SETTINGS = dict(bits=4, group_size=128, zero_point=True)
AUTOAWQ_PYTHON = c.repo_root() / ".venv-autoawq" / "bin" / "python"
CHILD_TIMEOUT_S = 3 * 3600
TOOLS = ("ours", "ours-bf16", "ours-8192", "ours-rerun-all", "ours-clip20", "gptqmodel", "gptqmodel-bf16", "autoawq", "autoawq-copyfix", "rtn")
DEFAULT_TOOLS = tuple(t for t in TOOLS if t not in ("ours-rerun-all", "ours-clip20"))
OURS = ("ours", "ours-bf16", "ours-8192", "ours-rerun-all", "ours-clip20", "rtn")  # their failure is an error; a peer's is a row
OUR_SETTINGS = {"ours": {}, "ours-bf16": {"rerun_dtype": "bfloat16"},
                "ours-8192": {"search_tokens": 8192, "rerun_top": -1}, "ours-rerun-all": {"rerun_top": -1},
                "ours-clip20": {"clip_grid": 20},
                "rtn": {"scale_search": False, "clip": False}}


def child_ours(model: Path, cal: Path, out: Path, batch_size: int, tool: str = "ours") -> dict:
    # import what the pipeline imports lazily first: the peers' timing starts after their (larger) imports
    import transformers.models.llama.modeling_llama  # noqa: F401
    from transformers import AutoConfig

    from quantize.commands.awq import quantize_awq

    AutoConfig.from_pretrained(str(model))
    search = OUR_SETTINGS[tool]
    t0, c0 = time.perf_counter(), time.process_time()
    quantize_awq(model_dir=model, calibration=cal, out=out, exec_cfg=c.exec_config(batch_size),
                 bits=SETTINGS["bits"], group_size=SETTINGS["group_size"], overwrite=True, **search)
    return {"seconds": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}


def child_gptqmodel(model: Path, cal: Path, out: Path, batch_size: int, dtype: str = "float32") -> dict:
    import torch
    from gptqmodel import BACKEND, GPTQModel
    from gptqmodel.nn_modules.qlinear.torch_awq import AwqTorchLinear
    from gptqmodel.quantization.config import FORMAT, AWQConfig

    from quantize.calibration import load_calibration

    # The CPU shim (module docstring): GPTQModel's torch AWQ kernel receives the packed modules.
    torch_dtype = getattr(torch, dtype)
    if torch_dtype not in AwqTorchLinear.SUPPORTS_DTYPES:
        AwqTorchLinear.SUPPORTS_DTYPES = [*AwqTorchLinear.SUPPORTS_DTYPES, torch_dtype]
    kernel_calls = [0]
    kernel_forward = AwqTorchLinear.forward

    def counted_forward(self, x):
        kernel_calls[0] += 1
        return kernel_forward(self, x)

    AwqTorchLinear.forward = counted_forward

    ids, _ = load_calibration(cal)
    data = [{"input_ids": row.tolist(), "attention_mask": [1] * len(row)} for row in ids.long()]
    qcfg = AWQConfig(bits=SETTINGS["bits"], group_size=SETTINGS["group_size"], sym=not SETTINGS["zero_point"],
                     format=FORMAT.GEMM, offload_to_disk=False)
    t0, c0 = time.perf_counter(), time.process_time()
    m = GPTQModel.load(str(model), qcfg, device="cpu", dtype=torch_dtype)
    t1 = time.perf_counter()
    m.quantize(data, batch_size=batch_size, backend=BACKEND.AWQ_TORCH)
    t2 = time.perf_counter()
    calls = kernel_calls[0]
    m.save(str(out))
    t3, c3 = time.perf_counter(), time.process_time()
    import gptqmodel

    return {"seconds": t3 - t0, "cpu_s": c3 - c0, "load_s": t1 - t0, "quantize_s": t2 - t1, "save_s": t3 - t2,
            "version": gptqmodel.__version__, "kernel": m.qlinear_kernel.__name__, "kernel_forward_calls": calls}


def child_autoawq(model: Path, tokens_json: Path, out: Path, batch_size: int, copy_fix: bool = False) -> dict:
    """Runs under .venv-autoawq (transformers 4.x, no `quantize` package): tokens come as JSON."""
    import warnings

    import torch

    with warnings.catch_warnings(record=True):  # AutoAWQ warns at import that it is deprecated upstream
        import awq
        from awq import AutoAWQForCausalLM
        from awq.quantize.quantizer import AwqQuantizer

    class CopyingQuantizer(AwqQuantizer):
        """AutoAWQ's quantizer, except that the weights its scale search saves are a copy (module docstring)."""

        def _search_best_scale(self, module, prev_op, layers, inp, module2inspect=None, kwargs={}):  # noqa: B006
            target = module2inspect if module2inspect is not None else layers[0]
            live = target.state_dict
            target.state_dict = lambda *a, **k: {n: t.clone() for n, t in live(*a, **k).items()}
            try:
                return super()._search_best_scale(module, prev_op, layers, inp, module2inspect, kwargs)
            finally:
                del target.state_dict

    tokens = json.loads(tokens_json.read_text())
    t0, c0 = time.perf_counter(), time.process_time()
    m = AutoAWQForCausalLM.from_pretrained(str(model), torch_dtype=torch.float32, trust_remote_code=False,
                                           device_map=None)
    t1 = time.perf_counter()
    m.quantize(None, quant_config={"w_bit": SETTINGS["bits"], "q_group_size": SETTINGS["group_size"],
                                   "zero_point": SETTINGS["zero_point"], "version": "GEMM"},
               calib_data=tokens, max_calib_samples=len(tokens), max_calib_seq_len=len(tokens[0]),
               n_parallel_calib_samples=batch_size, duo_scaling=True, apply_clip=True,
               quantizer_cls=CopyingQuantizer if copy_fix else AwqQuantizer)
    t2 = time.perf_counter()
    m.save_quantized(str(out))
    t3, c3 = time.perf_counter(), time.process_time()
    return {"seconds": t3 - t0, "cpu_s": c3 - c0, "load_s": t1 - t0, "quantize_s": t2 - t1, "save_s": t3 - t2,
            "version": awq.__version__}


CHILDREN = {
    **{t: (lambda *a, _t=t: child_ours(*a, tool=_t)) for t in OUR_SETTINGS},
    "gptqmodel": child_gptqmodel,
    "gptqmodel-bf16": lambda *a: child_gptqmodel(*a, dtype="bfloat16"),
    "autoawq": child_autoawq,
    "autoawq-copyfix": lambda *a: child_autoawq(*a, copy_fix=True),
}


failure_reason = c.failure_reason


def saved_config(out: Path) -> dict:
    """The quantization config a peer wrote (quantize_config.json or config.json's quantization_config)."""
    q = out / "quantize_config.json"
    if q.is_file():
        return json.loads(q.read_text())
    cfg = out / "config.json"
    return json.loads(cfg.read_text()).get("quantization_config", {}) if cfg.is_file() else {}


def weight_distances(model: Path, ours: Path, peers: dict[str, Path]) -> dict[str, dict]:
    """Relative Frobenius distances of the dequantized weights over every quantized linear: each
    peer's vs ours, and each vs the original (AWQ folds its scales into the previous norm/linear, so
    distances to the original include that rescaling)."""
    import torch

    from quantize.io.quantized import open_model

    orig, mine = open_model(model), open_model(ours)
    theirs = {k: open_model(p) for k, p in peers.items()}
    names = [n for n in mine.names() if n.endswith("_proj.weight")]
    ref, to_fp, to_ours = 0.0, {"ours": 0.0, **{k: 0.0 for k in peers}}, {k: 0.0 for k in peers}
    for n in names:
        w0, wa = orig.get(n, dtype=torch.float32), mine.get(n, dtype=torch.float32)
        ref += float(w0.square().sum())
        to_fp["ours"] += float((wa - w0).square().sum())
        for k, r in theirs.items():
            wb = r.get(n, dtype=torch.float32)
            to_fp[k] += float((wb - w0).square().sum())
            to_ours[k] += float((wb - wa).square().sum())
    return {"linears": len(names), "to_fp": {k: (v / ref) ** 0.5 for k, v in to_fp.items()},
            "to_ours": {k: (v / ref) ** 0.5 for k, v in to_ours.items()}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    c.add_peer_args(ap)
    ap.add_argument("--tools", nargs="+", choices=TOOLS, default=list(DEFAULT_TOOLS),
                    help="quantizers to run (ours always runs: the ratios are ours / peer)")
    args = ap.parse_args()
    n_threads, threads = c.set_threads(args.threads)

    if args.child:
        tool, model, cal, out = args.child
        with c.quiet():
            res = CHILDREN[tool](Path(model), Path(cal), Path(out), args.batch_size)
        print(json.dumps({**res, "peak_mb": c.maxrss_mb()}), flush=True)
        return 0

    if importlib.util.find_spec("gptqmodel") is None:
        c.skip(f"gptqmodel is not installed in {sys.prefix}; run scripts/setup_interop.sh and use .venv-interop/bin/python")
    import gptqmodel  # noqa: F401  (a broken install should fail here, loudly, not in the child)

    model, valid, test = c.ref_llama(), c.wikitext("valid"), c.wikitext("test")
    if model is None or valid is None or test is None:
        c.skip("shared/models/ref-llama or shared/data/wikitext-2/{valid,test}.txt not found "
               "(set QUANTIZE_SHARED); this comparison needs a model trained on real text")

    tools = [t for t in TOOLS if t == "ours" or t in args.tools]
    workers = os.environ.get("GPTQMODEL_CPU_WORKERS", "2")
    with tempfile.TemporaryDirectory(prefix="awq_vs_gptqmodel-") as tmp:
        tmp = Path(tmp)
        print(f"model: {model}")
        print(f"device: {c.cpu_model()}, torch threads {threads}, GPTQMODEL_CPU_WORKERS {workers}; "
              f"load average at start {os.getloadavg()[0]:.2f}")
        print(f"settings: {SETTINGS}, GEMM format; calibration {args.samples} x {args.seq_len} tokens of "
              f"{valid.name}, batch {args.batch_size}; eval: first {args.windows} windows x {args.seq_len} of {test.name}")
        cal = c.calibrate(model, str(valid), args.samples, args.seq_len, tmp / "cal")
        from quantize.calibration import load_calibration

        tokens_json = tmp / "calibration_tokens.json"  # for AutoAWQ, whose environment lacks this package
        tokens_json.write_text(json.dumps(load_calibration(cal)[0].tolist()))

        runs: dict[str, dict] = {}
        failed: dict[str, str] = {}
        for tool in tools:
            python, cal_arg = sys.executable, cal
            if tool.startswith("autoawq"):
                if not AUTOAWQ_PYTHON.is_file():
                    failed[tool] = f"not run: no {AUTOAWQ_PYTHON.parent.parent.name} (run scripts/setup_autoawq.sh)"
                    print(f"  {tool}: {failed[tool]}", flush=True)
                    continue
                python, cal_arg = str(AUTOAWQ_PYTHON), tokens_json
            cmd = [python, __file__, "--threads", str(n_threads), "--batch-size", str(args.batch_size),
                   "--child", tool, str(model), str(cal_arg), str(tmp / tool)]
            try:
                runs[tool] = c.run_json_child(cmd, env={"GPTQMODEL_CPU_WORKERS": workers}, timeout=CHILD_TIMEOUT_S)
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                if tool in OURS:
                    raise
                failed[tool] = f"failed: {failure_reason(e)}"
                print(f"  {tool}: {failed[tool]}", flush=True)
                continue
            r = runs[tool]
            print(f"  {tool}: {r['seconds']:.1f}s (CPU {r.get('cpu_s', float('nan')):.1f}s), peak RSS {r['peak_mb']:.0f} MB; "
                  f"load average {os.getloadavg()[0]:.2f}", flush=True)
        peers = [t for t in tools if t not in OURS]
        peer_cfg = {t: saved_config(tmp / t) for t in peers if t in runs}

        windows = c.eval_windows(model, str(test), args.seq_len, args.windows)
        fp = c.FpReference(model, windows)
        quality = {}
        for tool in runs:
            try:
                quality[tool] = fp.compare(tmp / tool)
            except Exception as e:  # noqa: BLE001  (a peer's checkpoint our reader rejects: its row says why)
                if tool in OURS:
                    raise
                failed[tool] = f"failed: our eval cannot read its output: {failure_reason(e)}"
        dist = weight_distances(model, tmp / "ours", {t: tmp / t for t in peers if t in quality})

    def version(tool: str, default: str) -> str:
        return next((r["version"] for t, r in runs.items() if t.startswith(tool) and "version" in r), default)

    gm, aa = f"GPTQModel {version('gptqmodel', '7.6.0')}", f"AutoAWQ {version('autoawq', '0.2.9')}"
    labels = {"ours": "ours (default: all tokens)", "ours-bf16": "ours, bf16 sub-block re-runs",
              "ours-8192": "ours, 8192 search tokens (older default)", "ours-clip20": "ours, clip grid 20 (old default)",
              "ours-rerun-all": "ours, every candidate re-run", "rtn": "RTN (ours, no search)", "gptqmodel": f"{gm} fp32",
              "gptqmodel-bf16": f"{gm} bf16", "autoawq": f"{aa} fp32", "autoawq-copyfix": f"{aa} fp32, copy fix"}
    print()
    rows = [["fp", None, None, None, fp.fp.perplexity, 0.0, 1.0]]
    for tool in tools:
        if tool in quality:
            q, r = quality[tool], runs[tool]
            rows.append([labels[tool], r["seconds"], r.get("cpu_s"), r["peak_mb"], q.perplexity, q.kl, q.top1])
        else:
            rows.append([f"{labels[tool]}: {failed[tool]}", None, None, None, None, None, None])
    c.print_table(["AWQ quantizer", "wall s", "CPU s", "peak RSS MB", "perplexity", "KL vs fp", "top-1 agree"], rows)

    others = [t for t in tools if t != "ours" and t in quality]
    if others:
        print()
        mine, mq = runs["ours"], quality["ours"]
        nan = float("nan")
        c.print_table(["ours / peer", "wall s", "CPU s", "peak RSS MB", "perplexity", "KL vs fp", "top-1 agree"],
                      [[labels[t], mine["seconds"] / runs[t]["seconds"], mine.get("cpu_s", nan) / runs[t].get("cpu_s", nan),
                        mine["peak_mb"] / runs[t]["peak_mb"],
                        mq.perplexity / quality[t].perplexity, mq.kl / quality[t].kl, mq.top1 / quality[t].top1]
                       for t in others], digits=3)
    print("(wall times: 2 shared cores, noisy; CPU s: the process's CPU time over the same span, all threads; "
          "the peers' CPU bugs and the shim: see the script's docstring)")
    keys = ("quant_method", "bits", "group_size", "zero_point", "sym", "version", "format", "checkpoint_format")
    for tool, cfg in peer_cfg.items():
        r = runs[tool]
        print(f"{labels[tool]}: saved config {({k: cfg[k] for k in keys if k in cfg})}; load {r['load_s']:.1f}s, "
              f"quantize {r['quantize_s']:.1f}s, save {r['save_s']:.1f}s")
        if "kernel" in r:
            print(f"  CPU shim: backend=AWQ_TORCH, kernel {r['kernel']}, "
                  f"kernel forward calls while quantizing: {r['kernel_forward_calls']}")
    if dist["to_ours"]:
        print(f"dequantized weights over {dist['linears']} linears, relative Frobenius distance to ours: "
              + ", ".join(f"{labels[k]} {v:.4f}" for k, v in dist["to_ours"].items())
              + "; to the original (includes the folded AWQ scales): "
              + ", ".join(f"{labels[k]} {v:.4f}" for k, v in dist["to_fp"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
