"""Our GPTQ into compressed-tensors vs llm-compressor's GPTQ (W4A16) on CPU: same model, same tokens.

llm-compressor (vLLM's quantizer, whose checkpoints are the compressed-tensors format) runs in its
own environment (``scripts/setup_llmcompressor.sh`` -> .venv-llmcompressor: llm-compressor 0.14.0.1
pins transformers 5.15-5.17 and compressed-tensors 0.19.0) as a child process with
.venv-llmcompressor/bin/python; it gets the calibration tokens as JSON and imports nothing of this
package. Everything else (sampling, our quantization, the eval) runs in the environment that runs
this script, the project's own (``make bench``: .venv). The script exits 0 with ``SKIP:`` where
.venv-llmcompressor or shared/models/ref-llama (with shared WikiText-2) is absent.

* model: shared/models/ref-llama (bf16 checkpoint);
* calibration: one ``quantize sample`` set, 128 x 256 tokens of WikiText-2 valid.txt; llm-compressor
  gets the very same token windows (as JSON) and is handed them as a ``datasets.Dataset`` of
  ``input_ids`` + all-ones ``attention_mask`` (already tokenized: it neither re-tokenizes nor
  concatenates), batch 8 like ours, ``num_calibration_samples`` = 128, ``max_seq_length`` = 256;
* settings: 4-bit, group 128, symmetric, damp 0.01, ``lm_head`` left in bf16.
  - ours: ``quantize gptq --model M --calibration C --bits 4 --group-size 128 --format
    compressed-tensors --out O``, the CLI of this script's environment, with its defaults: act-order
    with static groups (group parameters fixed before the permutation, contiguous groups, no
    g_idx: the act-order compressed-tensors stores, and llm-compressor's default "static"), damp
    0.01, fp32 compute on CPU;
  - llm-compressor: ``oneshot(model, dataset, recipe=GPTQModifier(targets="Linear",
    scheme="W4A16", ignore=["lm_head"]))`` with everything else as it ships (actorder "static",
    block 128, ``dampening_frac`` 0.01, its default "independent" -> sequential pipeline on CPU),
    then ``save_pretrained(save_compressed=True)`` (pack-quantized). The model is loaded the way
    its examples do (``dtype="auto"``: bf16 here, so its layer forwards run in bf16 and GPTQ's
    Hessian and solve in fp32) and, for the fp32 row, with ``dtype=torch.float32`` (our compute
    dtype on CPU). On CPU it needs nothing special: with no accelerator it logs "Compressing model
    on CPU instead" and runs on the CPU as is;
* each quantization runs in a fresh process: wall time end to end (interpreter start, imports,
  load, quantize, write) measured by this script around the child; peak RSS of the quantizing
  process (ours: ``ru_maxrss`` of the ``quantize`` process, read by a thin wrapper that does not
  import torch; llm-compressor: its own ``ru_maxrss``); torch threads the same on both sides
  (``OMP_NUM_THREADS``, see common.set_threads);
* every output is evaluated by *our* eval (``common.FpReference``: the first 60 windows x 256 of
  WikiText-2 test, perplexity, mean KL to the bf16 model, top-1 agreement), each read back with
  our ``DequantReader`` (``quantize/io/quantized.py``). A peer that fails, or whose output our
  reader rejects, gets a row saying why and the script still exits 0; our own failure exits 1.

    .venv/bin/python benchmarks/ct_vs_llmcompressor.py [--samples 128] [--windows 60] [--tools ...] [--repeat N]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as c  # noqa: E402

SETTINGS = dict(bits=4, group_size=128, sym=True, damp=0.01)
SETTINGS_LLMC = dict(bits=4, group_size=128, sym=True)  # damp 0.01: its default
LLMC_PYTHON = c.LLMC_PYTHON
CHILD_TIMEOUT_S = 3 * 3600
TOOLS = ("ours", "llmcompressor", "llmcompressor-fp32")
OURS = ("ours",)  # its failure is an error; a peer's is a row
OUR_FORMAT = "compressed-tensors"


def child_ours(model: Path, cal: Path, out: Path, batch_size: int) -> dict:
    """Run the ``quantize`` CLI of this environment; report the peak RSS of that process.

    This wrapper imports nothing heavy (no torch), and the CLI is its only child, so
    ``RUSAGE_CHILDREN``'s ``ru_maxrss`` is the CLI's own peak (also across its re-execution with
    jemalloc, which keeps the process)."""
    cli = Path(sys.executable).parent / "quantize"
    cmd = [str(cli) if cli.is_file() else sys.executable, *([] if cli.is_file() else ["-m", "quantize"]),
           "gptq", "--model", str(model), "--calibration", str(cal), "--bits", str(SETTINGS["bits"]),
           "--group-size", str(SETTINGS["group_size"]), *(["--format", OUR_FORMAT] if OUR_FORMAT != "gptq" else []),
           *(["--batch-size", str(batch_size)] if batch_size != 8 else []), "--out", str(out)]  # sym, damp 0.01: defaults
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(proc.returncode)
    return {"seconds": seconds, "peak_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
            "command": " ".join(cmd[1:])}


def child_llmcompressor(model: Path, tokens_json: Path, out: Path, batch_size: int, dtype: str = "auto") -> dict:
    """Runs under .venv-llmcompressor (common.llmcompressor_quantize, at W4A16 g128)."""
    r = c.llmcompressor_quantize(model, tokens_json, out, batch_size, dtype, **SETTINGS_LLMC)
    return {k: r[k] for k in ("load_s", "quantize_s", "save_s", "model_dtype", "peak_mb", "versions")}


CHILDREN = {
    "ours": child_ours,
    "llmcompressor": child_llmcompressor,
    "llmcompressor-fp32": lambda *a: child_llmcompressor(*a, dtype="float32"),
}


failure_reason = c.failure_reason


def saved_config(out: Path) -> dict:
    cfg = out / "config.json"
    return json.loads(cfg.read_text()).get("quantization_config", {}) if cfg.is_file() else {}


def describe(cfg: dict) -> str:
    """The essentials of a saved ``quantization_config`` (compressed-tensors or GPTQ)."""
    if cfg.get("quant_method") == "compressed-tensors":
        w = next(iter(cfg.get("config_groups", {}).values()), {}).get("weights", {})
        return (f"compressed-tensors {cfg.get('format')}, {w.get('num_bits')}-bit {w.get('strategy')} "
                f"{w.get('group_size')}, sym={w.get('symmetric')}, actorder={w.get('actorder')}, "
                f"ignore={cfg.get('ignore')}, version {cfg.get('version')}")
    keys = ("quant_method", "bits", "group_size", "desc_act", "sym", "checkpoint_format")
    return ", ".join(f"{k}={cfg[k]}" for k in keys if k in cfg) or "no quantization_config"


def disk_mb(out: Path) -> float:
    return sum(f.stat().st_size for f in out.glob("*.safetensors")) / 2**20


def weight_distances(model: Path, outs: dict[str, Path]) -> dict[str, dict[str, float]]:
    """Relative Frobenius distance of each output's dequantized layer linears to the original and
    to ours (``ours`` must be in ``outs``)."""
    import torch

    from quantize.io.quantized import open_model

    orig = open_model(model)
    readers = {k: open_model(p) for k, p in outs.items()}
    names = [n for n in readers["ours"].names() if n.endswith("_proj.weight")]
    ref, to_fp, to_ours = 0.0, {k: 0.0 for k in outs}, {k: 0.0 for k in outs}
    for n in names:
        w0 = orig.get(n, dtype=torch.float32)
        ws = {k: r.get(n, dtype=torch.float32) for k, r in readers.items()}
        ref += float(w0.square().sum())
        for k, w in ws.items():
            to_fp[k] += float((w - w0).square().sum())
            to_ours[k] += float((w - ws["ours"]).square().sum())
    return {"to_fp": {k: (v / ref) ** 0.5 for k, v in to_fp.items()},
            "to_ours": {k: (v / ref) ** 0.5 for k, v in to_ours.items() if k != "ours"}}


def main() -> int:
    global OUR_FORMAT
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    c.add_peer_args(ap)
    ap.add_argument("--tools", nargs="+", choices=TOOLS, default=list(TOOLS),
                    help="quantizers to run (ours always runs)")
    ap.add_argument("--our-format", default=OUR_FORMAT, choices=("compressed-tensors", "gptq"),
                    help="ours: --format of `quantize gptq` (gptq: leave the option out, the command's default)")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each tool, alternating; the fastest is kept")
    args = ap.parse_args()
    OUR_FORMAT = args.our_format

    if args.child:
        tool, model, cal, out = args.child
        if tool in OURS:  # no torch in this process: the peak reported is the quantize command's
            res = CHILDREN[tool](Path(model), Path(cal), Path(out), args.batch_size)
        else:
            import torch

            torch.set_num_threads(args.threads or torch.get_num_threads())
            with c.quiet():
                res = CHILDREN[tool](Path(model), Path(cal), Path(out), args.batch_size)
        print(json.dumps(res), flush=True)
        return 0

    model, valid, test = c.ref_llama(), c.wikitext("valid"), c.wikitext("test")
    if model is None or valid is None or test is None:
        c.skip("shared/models/ref-llama or shared/data/wikitext-2/{valid,test}.txt not found "
               "(set QUANTIZE_SHARED); this comparison needs a model trained on real text")
    if not LLMC_PYTHON.is_file():
        c.skip(f"no {LLMC_PYTHON.parent.parent.name} (run scripts/setup_llmcompressor.sh or `make peers`)")
    n_threads, threads = c.set_threads(args.threads)

    tools = [t for t in TOOLS if t == "ours" or t in args.tools]
    with tempfile.TemporaryDirectory(prefix="ct_vs_llmcompressor-") as tmp:
        tmp = Path(tmp)
        print(f"model: {model}")
        print(f"device: {c.cpu_model()}, torch threads {threads}; load average at start {os.getloadavg()[0]:.2f}")
        print(f"settings: {SETTINGS}, ours --format {OUR_FORMAT}; calibration {args.samples} x {args.seq_len} tokens of "
              f"{valid.name}, batch {args.batch_size}; eval: first {args.windows} windows x {args.seq_len} of {test.name}")
        cal = c.calibrate(model, str(valid), args.samples, args.seq_len, tmp / "cal")

        # for llm-compressor, whose environment needs no `quantize`
        tokens_json = c.write_tokens_json(cal, tmp / "calibration_tokens.json")

        # Alternate the tools and keep each one's fastest run (and highest peak): on a shared machine a
        # burst of outside load then hits every side alike.
        runs: dict[str, dict] = {}
        failed: dict[str, str] = {}
        for rep in range(args.repeat):
            for tool in [t for t in tools if t not in failed]:
                python, cal_arg = (sys.executable, cal) if tool in OURS else (str(LLMC_PYTHON), tokens_json)
                out = tmp / tool
                shutil.rmtree(out, ignore_errors=True)
                cmd = [python, __file__, "--threads", str(n_threads), "--batch-size", str(args.batch_size),
                       "--our-format", OUR_FORMAT, "--child", tool, str(model), str(cal_arg), str(out)]
                t0 = time.perf_counter()
                try:
                    r = c.run_json_child(cmd, env={"OMP_NUM_THREADS": str(n_threads)}, timeout=CHILD_TIMEOUT_S)
                except (RuntimeError, subprocess.TimeoutExpired) as e:
                    failed[tool] = f"failed: {failure_reason(e)}"
                    runs.pop(tool, None)
                    print(f"  {tool}: {failed[tool]}", flush=True)
                    continue
                r["seconds"] = time.perf_counter() - t0
                print(f"  run {rep + 1}/{args.repeat} {tool}: {r['seconds']:.1f}s, peak RSS {r['peak_mb']:.0f} MB; "
                      f"load average {os.getloadavg()[0]:.2f}", flush=True)
                best = runs.get(tool)
                runs[tool] = r if best is None else {**r, "seconds": min(best["seconds"], r["seconds"]),
                                                     "peak_mb": max(best["peak_mb"], r["peak_mb"])}

        windows = c.eval_windows(model, str(test), args.seq_len, args.windows)
        fp = c.FpReference(model, windows)
        quality = {}
        for tool in runs:
            try:
                quality[tool] = fp.compare(tmp / tool)
            except Exception as e:  # noqa: BLE001  (an output our reader rejects: its row says why)
                failed[tool] = f"failed: our eval cannot read its output: {failure_reason(e) or type(e).__name__}"
                print(f"  {tool}: {failed[tool]}", flush=True)
        cfgs = {t: describe(saved_config(tmp / t)) for t in runs}
        sizes = {t: disk_mb(tmp / t) for t in runs}
        dist = None
        if "ours" in quality and len(quality) > 1:
            try:
                dist = weight_distances(model, {t: tmp / t for t in quality})
            except Exception as e:  # noqa: BLE001
                print(f"weight distances not computed: {failure_reason(e)}")

    versions = next((r["versions"] for r in runs.values() if "versions" in r), {})
    lc = f"llm-compressor {versions.get('llmcompressor', '0.14')}"
    labels = {"ours": f"quantize (ours), --format {OUR_FORMAT}",
              "llmcompressor": f"{lc}, bf16 model (dtype=auto)", "llmcompressor-fp32": f"{lc}, fp32 model"}
    print()
    rows = [["bf16 (unquantized)", None, None, 0.0, 1.0, fp.fp.perplexity]]
    for tool in tools:
        if tool in quality:
            q, r = quality[tool], runs[tool]
            rows.append([labels[tool], r["seconds"], r["peak_mb"], q.kl, q.top1, q.perplexity])
        else:
            rows.append([f"{labels[tool]}: {failed[tool]}", None, None, None, None, None])
    c.print_table(["tool", "wall s", "peak RSS MB", "KL vs bf16", "top-1", "ppl"], rows, digits=5)
    print(f"(wall: the whole child process, imports included, best of {args.repeat}; shared cores, noisy)")
    if versions:
        print("llm-compressor environment: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    for tool in runs:
        r = runs[tool]
        split = (f"; load {r['load_s']:.1f}s, oneshot {r['quantize_s']:.1f}s, save {r['save_s']:.1f}s, "
                 f"model dtype {r['model_dtype']}") if "load_s" in r else ""
        print(f"{labels[tool]}: {cfgs[tool]}; {sizes[tool]:.2f} MB of safetensors{split}")
    if dist is not None:
        print("dequantized layer linears, relative Frobenius distance to the original: "
              + ", ".join(f"{labels[k]} {v:.4f}" for k, v in dist["to_fp"].items())
              + "; to ours: " + ", ".join(f"{labels[k]} {v:.4f}" for k, v in dist["to_ours"].items()))
    ours_failed = [t for t in tools if t in OURS and t in failed]
    if ours_failed:
        print(f"error: our own run failed: {', '.join(f'{t} ({failed[t]})' for t in ours_failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
