"""GPTQ quality at the defaults, and low bits: ours (RTN, GPTQ variants, SignRound refinement) against
GPTQModel, llm-compressor and AutoRound on ref-llama, same calibration ids, same eval.

Every row quantizes shared/models/ref-llama with the SAME calibration token ids (``quantize sample``
of wikitext-2 valid, seed 0; peers get them as ids) in a fresh child process, and is evaluated by
OUR eval on the first ``--windows`` windows of wikitext-2 test: mean KL(fp || quantized) per token
and top-1 agreement with the fp model; plus the child's quantization wall seconds (model load,
quantize, save; interpreter start and imports excluded, on every side; with ``--repeat N`` the
fastest of N alternating runs) and its peak RSS (imports included).

Rows per setting (default W4 g128, W3 g128 and W2 g64, all symmetric; ``DEFAULT_ROWS`` unless ``--rows``):
  rtn            ``quantize rtn``
  gptq           ``quantize gptq`` at its defaults (static act-order, --grid auto: mse at 3-4 bits, else minmax)
  gptq-minmax    the defaults with ``--grid minmax`` (each group's min/max range)
  gptq-mse       the defaults with ``--grid mse`` (range shrunk to minimise |w - w_hat|^2.4)
  gptq-dynamic   ``--no-static-groups``: dynamic act-order (desc_act true; vLLM refuses it)
  gptq-noact     ``--no-act-order``
  gptq+sr        ``quantize gptq --refine signround`` (methods/signround.py)
  rtn+sr         ``quantize rtn --refine signround``
  gptq-full      ``--grid full``: the full-range symmetric grid (signed scale, the group's largest-magnitude
                 weight on the extra level -2^(b-1)·s; llama.cpp / AutoRound sym)
  gptq-full-mse  ``--grid full-mse``: that grid with the MSE clip search
  gptq-full+sr   ``--grid full --refine signround``;  rtn-full+sr: ``quantize rtn --grid full --refine signround``
  exl2           ``quantize exl2`` at GPTQ's stored bits per weight, bits + (16 + bits) / group (codes, fp16
                 scale and zero-point per group; g_idx left out), measured on the first 2048 calibration
                 rows like the command; lm_head at 8 bits (EXL2's widest head; GPTQ leaves it in bf16)
  gptqmodel      GPTQModel (.venv-interop) GPTQ as a user gets it: ``GPTQConfig(bits, group_size, sym=True)``,
                 everything else its defaults (damp 0.05, desc_act False with act_group_aware, mse 0,
                 offload to disk), fp32 model, v1 ``gptq`` format
  llmc           llm-compressor (.venv-llmcompressor) ``GPTQModifier`` as it ships (actorder static,
                 dampening 0.01; W4 g128 is its W4A16 preset, other widths the same weights args),
                 bf16 model as its examples load it (dtype auto), pack-quantized compressed-tensors
  ar             AutoRound default recipe: iters 200, batch 8 (nsamples: ours, see below)
  ar-best        AutoRound "best" recipe (auto-round-best): iters 1000, nsamples 512 -- run on at
                 most our ``--samples`` calibration windows (``--best-iters`` to shorten)
Ours run the library entry point (what ``quantize gptq`` runs) under jemalloc where installed (what
the command re-executes itself with), the peers under glibc; torch threads the same everywhere.
AutoRound runs in .venv-autoround (scripts/setup_autoround.sh) and saves the GPTQ format
(``auto_gptq``, sym), which our reader dequantizes; its wall seconds are of ``quantize_and_save``.
A failing peer is a row with its error. AutoRound's recipes use seqlen 2048; here every tool gets
the same ``--seq-len`` windows. The summary says, per setting, whether our GPTQ at its defaults has
KL <= each peer's at no more than its wall time (issue #21).

    python benchmarks/lowbit_quality.py [--samples 128] [--seq-len 256] [--settings 4:128,3:128,2:64]
        [--iters 200] [--best-iters 1000] [--rows rtn,gptq,...] [--repeat 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as c  # noqa: E402

# our rows -> quantize_gptq keywords on top of the defaults (grid: None = the command's default)
OURS = {
    "rtn": dict(rtn=True, act_order=False),
    "gptq": dict(),
    "gptq-minmax": dict(grid="minmax"),
    "gptq-mse": dict(grid="mse"),
    "gptq-dynamic": dict(static_groups=False),
    "gptq-noact": dict(act_order=False),
    "gptq+sr": dict(refine="signround"),
    "rtn+sr": dict(rtn=True, act_order=False, refine="signround"),
    "gptq-full": dict(grid="full"),
    "gptq-full-mse": dict(grid="full-mse"),
    "gptq-full+sr": dict(grid="full", refine="signround"),
    "rtn-full+sr": dict(rtn=True, act_order=False, grid="full", refine="signround"),
    "exl2": dict(exl2=True),
}
PEERS = ("gptqmodel", "llmc")
ROWS = [*OURS, *PEERS, "ar", "ar-best"]
# what `make bench` runs (about an hour on 2 cores): the defaults, the grids they were chosen from, the peers, and
# the best low-bit method against AutoRound's default recipe
DEFAULT_ROWS = ["gptq", "gptq-minmax", "gptq-mse", "rtn", "exl2", "gptq-full+sr", "gptqmodel", "llmc", "ar"]
LABELS = {"rtn": "RTN", "gptq": "GPTQ (defaults)", "gptq-minmax": "GPTQ --grid minmax",
          "gptq-mse": "GPTQ --grid mse", "gptq-dynamic": "GPTQ dynamic act-order", "gptq-noact": "GPTQ no act-order",
          "gptq+sr": "GPTQ + signround", "rtn+sr": "RTN + signround", "gptqmodel": "GPTQModel",
          "llmc": "llm-compressor", "ar": "AutoRound default", "ar-best": "AutoRound best",
          "exl2": "EXL2 (same bpw)", "gptq-full": "GPTQ --grid full", "gptq-full-mse": "GPTQ --grid full-mse",
          "gptq-full+sr": "GPTQ full + signround", "rtn-full+sr": "RTN full + signround"}


def child_ours(row: str, model: Path, cal: Path, out: Path, *, bits: int, group: int, iters: int,
               batch_size: int, refine_lr: float | None = None) -> dict:
    """One of our rows in this (fresh) process: ``quantize_gptq`` as the command calls it."""
    import transformers.models.llama.modeling_llama  # noqa: F401  (imports outside the timing, as for peers)

    from quantize.commands.gptq import DEFAULT_GRID, quantize_gptq, resolve_grid

    if OURS[row].get("exl2"):
        from quantize.commands.exl2 import quantize_exl2
        from quantize.formats.exl2 import achieved_bpw

        bpw = exl2_bpw(bits, group)
        t0, cpu0 = time.perf_counter(), time.process_time()
        with c.quiet():
            quantize_exl2(model_dir=model, calibration=cal, out=out, bpw=bpw, head_bits=8,
                          exec_cfg=c.exec_config(batch_size), overwrite=True)
        seconds = time.perf_counter() - t0
        return {"seconds": seconds, "cpu_s": time.process_time() - cpu0, "peak_mb": c.maxrss_mb(),
                "note": f"target {bpw:.3f} bpw, {achieved_bpw(out)['decoder']['bpw']:.3f} from the files (decoder; head 8-bit)",
                "malloc": "jemalloc" if "jemalloc" in os.environ.get("LD_PRELOAD", "") else "glibc"}
    kw = {**dict(act_order=True, static_groups=None, grid=DEFAULT_GRID, rtn=False), **OURS[row]}
    if kw.get("refine"):
        kw["refine_iters"], kw["refine_lr"] = iters, refine_lr
    t0, cpu0 = time.perf_counter(), time.process_time()
    with c.quiet():
        m = quantize_gptq(model_dir=model, calibration=cal, out=out, bits=bits, group_size=group, sym=True, damp=0.01,
                          block_size=128, exec_cfg=c.exec_config(batch_size), overwrite=True, **kw)
    seconds = time.perf_counter() - t0
    grid = resolve_grid(kw["grid"], bits, kw["rtn"])
    note = f"grid {kw['grid']}" + (f" ({grid})" if grid != kw["grid"] else "")
    if kw.get("refine"):
        layers = [lm["signround"] for lm in m.metrics["layers"]]
        gain = [lm["mse_after"] / lm["mse_before"] for lm in layers if lm["mse_before"]]
        if refine_lr is not None:
            note += f"; --refine-iters {iters} --refine-lr {refine_lr:g}"
        note += (f"; layer output MSE after/before: mean {sum(gain) / len(gain):.3f}, "
                 f"kept {[lm['kept'] for lm in layers]}")
    return {"seconds": seconds, "cpu_s": time.process_time() - cpu0, "peak_mb": c.maxrss_mb(), "note": note,
            "malloc": "jemalloc" if "jemalloc" in os.environ.get("LD_PRELOAD", "") else "glibc"}


def exl2_bpw(bits: int, group: int) -> float:
    """GPTQ's stored bits per weight at ``bits``/``group`` (code + fp16 scale + zero-point per group)."""
    return bits + (16 + bits) / group


def child_gptqmodel(model: Path, cal: Path, out: Path, *, bits: int, group: int, batch_size: int) -> dict:
    """Runs under .venv-interop: GPTQModel at its defaults but for bits / group / sym."""
    from gptqmodel.quantization.config import GPTQConfig

    qcfg = GPTQConfig(bits=bits, group_size=group, sym=True)
    r = c.gptqmodel_quantize(model, cal, out, qcfg, batch_size, dtype="float32")
    settings = {k: getattr(qcfg, k, None) for k in ("damp_percent", "desc_act", "act_group_aware", "static_groups",
                                                    "mse", "true_sequential")}
    return {**r, "peak_mb": c.maxrss_mb(), "note": f"GPTQModel {r['version']}, fp32 model, "
            + ", ".join(f"{k} {v}" for k, v in settings.items())}


def child_llmc(model: Path, tokens_json: Path, out: Path, *, bits: int, group: int, batch_size: int) -> dict:
    """Runs under .venv-llmcompressor: GPTQModifier as it ships but for bits / group / sym."""
    r = c.llmcompressor_quantize(model, tokens_json, out, batch_size, "auto", bits=bits, group_size=group, sym=True)
    note = f"llm-compressor {r['version']}, {r['model_dtype']} model, actorder static, damp 0.01"
    if bits not in (2, 4, 8):  # our reader takes pack-quantized int 2/4/8 only: the library decompresses
        r["path"] = str(decompress_ct(out, Path(str(out) + "-dense")))
        note += f"; {bits}-bit read back by compressed-tensors' own decompressor (bf16)"
    return {**r, "note": note}


def decompress_ct(src: Path, dst: Path) -> Path:
    """A compressed-tensors checkpoint decompressed by transformers + compressed-tensors (the
    library's own dequantization, in the checkpoint's dtype), written as a plain dense checkpoint
    without ``quantization_config``. Outside the timing."""
    import shutil

    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    m = AutoModelForCausalLM.from_pretrained(str(src), dtype="auto",
                                             quantization_config=CompressedTensorsConfig(run_compressed=False))
    drop = ("weight_scale", "weight_zero_point", "weight_g_idx", "weight_shape", "weight_global_scale")
    sd = {k: v.detach().to(torch.bfloat16).contiguous().clone() for k, v in m.state_dict().items()
          if not k.endswith(drop)}
    dst.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg.pop("quantization_config", None)
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    for f in src.iterdir():
        if f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json", "generation_config.json"):
            shutil.copy2(f, dst / f.name)
    return dst


def run_child(row: str, model: Path, data: Path, out: Path, *, bits: int, group: int, iters: int, batch_size: int,
              threads: int, timeout: float, refine_lr: float | None = None) -> dict:
    """``row`` in a fresh process of its tool's environment (ours: this interpreter)."""
    python = {"gptqmodel": c.INTEROP_PYTHON, "llmc": c.LLMC_PYTHON}.get(row, Path(sys.executable))
    if not python.exists():
        raise RuntimeError(f"error: {python} not found (run `make peers`)")
    env = {"OMP_NUM_THREADS": str(threads), "LD_PRELOAD": "",
           "GPTQMODEL_CPU_WORKERS": os.environ.get("GPTQMODEL_CPU_WORKERS", "2")}
    if row in OURS:
        env.update(c.heap_setups().get("jemalloc", ("flat", {}))[1])
    cmd = [str(python), str(Path(__file__).resolve()), "--threads", str(threads), "--batch-size", str(batch_size),
           "--iters", str(iters), "--settings", f"{bits}:{group}", "--child", row, str(model), str(data), str(out)]
    if refine_lr is not None:
        cmd[2:2] = ["--refine-lr", repr(refine_lr)]
    return c.run_json_child(cmd, env=env, timeout=timeout)


def autoround(ref, ids_file, out, *, bits, group, iters, nsamples, threads, venv, timeout):
    py = Path(venv) / "bin" / "python"
    if not py.exists():
        raise RuntimeError(f"{py} not found: run scripts/setup_autoround.sh")
    cmd = [str(py), str(Path(__file__).resolve().parent / "autoround_child.py"), str(ref), str(ids_file), str(out),
           "--bits", str(bits), "--group-size", str(group), "--iters", str(iters), "--nsamples", str(nsamples)]
    if threads > 0:
        cmd += ["--threads", str(threads)]
    r = c.run_json_child(cmd, timeout=timeout)
    return (r["seconds"], r["maxrss_mb"], f"auto-round {r['version']}, iters {r['iters']}, nsamples {r['nsamples']}",
            Path(r["path"]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=128, help="calibration windows of --seq-len tokens")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--windows", type=int, default=60)
    ap.add_argument("--settings", default="4:128,3:128,2:64", help="bits:group_size,...")
    ap.add_argument("--rows", default=",".join(DEFAULT_ROWS),
                    help=f"subset of {','.join(ROWS)} (default: {','.join(DEFAULT_ROWS)}; ar-best takes ~5x ar's hours)")
    ap.add_argument("--iters", type=int, default=200, help="SignRound steps per layer (ours and AutoRound default)")
    ap.add_argument("--refine-lr", type=float, default=None,
                    help="our signround rows' initial step (quantize --refine-lr); default: the command's")
    ap.add_argument("--best-iters", type=int, default=1000, help="AutoRound best recipe's steps")
    ap.add_argument("--best-samples", type=int, default=512, help="AutoRound best recipe's nsamples (capped at --samples)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--autoround-venv", default=str(c.repo_root() / ".venv-autoround"))
    ap.add_argument("--timeout", type=float, default=7200, help="seconds per child run")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each row per setting, alternating; the fastest is kept")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    ap.add_argument("--child", nargs=4, metavar=("ROW", "MODEL", "DATA", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    settings = [(int(b), int(g)) for b, g in (s.split(":") for s in args.settings.split(","))]

    if args.child:  # one row in a fresh process (run_child)
        row, model, data, out = args.child
        bits, group = settings[0]
        c.set_threads(args.threads)
        kw = dict(bits=bits, group=group, batch_size=args.batch_size)
        if row in OURS:
            res = child_ours(row, Path(model), Path(data), Path(out), iters=args.iters, refine_lr=args.refine_lr, **kw)
        else:
            with c.quiet():
                res = (child_gptqmodel if row == "gptqmodel" else child_llmc)(Path(model), Path(data), Path(out), **kw)
        print(json.dumps(res), flush=True)
        return 0

    ref, valid, test = c.ref_llama(), c.wikitext("valid"), c.wikitext("test")
    if ref is None or valid is None or test is None:
        c.skip("needs shared/models/ref-llama and shared/data/wikitext-2/{valid,test}.txt (not in this checkout)")
    rows_wanted = [r for r in args.rows.split(",") if r]
    bad = [r for r in rows_wanted if r not in ROWS]
    if bad:
        print(f"error: unknown rows {bad}; choose from {ROWS}", file=sys.stderr)
        return 2
    n_threads, threads = c.set_threads(args.threads)
    from quantize.commands.gptq import DEFAULT_GRID, resolve_grid

    print(f"model: {ref}")
    print(f"device: {c.cpu_model()}, torch threads {threads}; load average at start {os.getloadavg()[0]:.2f}")
    print(f"calibration: {args.samples} x {args.seq_len} tokens of {valid.name} (seed 0), the same ids for every tool; "
          f"eval: first {args.windows} windows of {args.seq_len} tokens of {test.name}; sym everywhere; "
          f"our default grid: {DEFAULT_GRID}; signround {args.iters} steps/layer", flush=True)

    import torch

    from quantize.calibration import load_calibration

    table, records = [], []
    with tempfile.TemporaryDirectory(prefix="lowbit-") as tmp:
        tmp = Path(tmp)
        cal = c.calibrate(ref, str(valid), args.samples, args.seq_len, tmp / "cal")
        ids_file = tmp / "ids.pt"
        torch.save(load_calibration(cal)[0].to(torch.int64), ids_file)
        tokens_json = c.write_tokens_json(cal, tmp / "ids.json")
        windows = c.eval_windows(ref, str(test), args.seq_len, args.windows)
        fp = c.FpReference(ref, windows)
        table.append(["fp", "-", fp.fp.perplexity, 0.0, 1.0, None, None, ""])
        for bits, group in settings:
            setting = f"W{bits} g{group}"
            runs: dict[str, dict] = {}  # row -> fastest run (seconds), highest peak, output path, note
            for rep in range(args.repeat):  # alternating: a burst of outside load hits every row alike
                for row in [r for r in rows_wanted if "error" not in runs.get(r, {})]:
                    out = tmp / f"{row}-{bits}-{group}"
                    shutil.rmtree(out, ignore_errors=True)
                    load = os.getloadavg()[0]
                    try:
                        if row.startswith("ar"):
                            best = row == "ar-best"
                            seconds, rss, note, path = autoround(
                                ref, ids_file, out, bits=bits, group=group,
                                iters=args.best_iters if best else args.iters,
                                nsamples=min(args.best_samples, args.samples) if best else args.samples,
                                threads=args.threads, venv=args.autoround_venv, timeout=args.timeout)
                        else:
                            r = run_child(row, ref, tokens_json if row == "llmc" else cal, out, bits=bits, group=group,
                                          iters=args.iters, batch_size=args.batch_size, threads=n_threads,
                                          timeout=args.timeout, refine_lr=args.refine_lr)
                            seconds, rss, note, path = r["seconds"], r["peak_mb"], r["note"], Path(r.get("path", out))
                            if row in OURS:
                                note = f"{note}; {r['malloc']}".removeprefix("; ")
                    except Exception as e:  # a failing tool is a row with its error, not a crash
                        runs[row] = {"error": f"FAILED: {c.failure_reason(e)}", "load": [load]}
                        print(f"  run {rep + 1}/{args.repeat} {LABELS[row]:24} {setting:8} {runs[row]['error']}", flush=True)
                        continue
                    prev = runs.get(row)
                    runs[row] = {"seconds": seconds if prev is None else min(prev["seconds"], seconds),
                                 "maxrss_mb": rss if prev is None else max(prev["maxrss_mb"] or 0, rss or 0) or None,
                                 "note": note, "path": path, "load": [*(prev or {}).get("load", []), load],
                                 "all_seconds": [*(prev or {}).get("all_seconds", []), seconds]}
                    print(f"  run {rep + 1}/{args.repeat} {LABELS[row]:24} {setting:8} {seconds:.1f}s "
                          f"(load {load:.1f}) {note}", flush=True)
            for row in rows_wanted:
                run = runs[row]
                label = LABELS[row]
                rec = dict(row=label, key=row, setting=setting, perplexity=None, kl=None, top1=None, seconds=None,
                           maxrss_mb=None, note=run.get("error", run.get("note")), load=run["load"],
                           all_seconds=run.get("all_seconds"))
                if "error" not in run:
                    try:
                        q = fp.compare(run["path"])
                        rec.update(perplexity=q.perplexity, kl=q.kl, top1=q.top1, seconds=run["seconds"],
                                   maxrss_mb=run["maxrss_mb"])
                    except Exception as e:  # an output our reader rejects: its row says why
                        rec["note"] = f"FAILED: our eval cannot read its output: {c.failure_reason(e)}"
                records.append(rec)
                table.append([rec["row"], setting, rec["perplexity"], rec["kl"], rec["top1"], rec["seconds"],
                              rec["maxrss_mb"], rec["note"]])
                kl = "-" if rec["kl"] is None else f"{rec['kl']:.6f}"
                sec = "-" if rec["seconds"] is None else f"{rec['seconds']:.1f}s"
                print(f"  done: {label:24} {setting:8} KL {kl} ({sec}, best of {args.repeat}) {rec['note']}", flush=True)
                if args.json:
                    args.json.write_text(json.dumps(records, indent=1))
    print()
    c.print_table(["weights", "setting", "perplexity", "KL vs fp", "top-1 agree", "quantize s", "peak RSS MB", "note"],
                  table)
    print()
    for bits, group in settings:
        s = f"W{bits} g{group}"
        ours_default = "gptq" if "gptq" in rows_wanted else f"gptq-{resolve_grid(DEFAULT_GRID, bits, False)}"
        if ours_default not in OURS:
            ours_default = "gptq"
        by = {r["key"]: r for r in records if r["setting"] == s and r["kl"] is not None}
        if "gptq-minmax" in by and "gptq-mse" in by:
            a, b = by["gptq-minmax"], by["gptq-mse"]
            print(f"{s}: --grid mse / minmax: KL {b['kl'] / a['kl']:.3f}x, wall {b['seconds'] / a['seconds']:.2f}x")
        o = by.get(ours_default)
        for peer in ("gptqmodel", "llmc", "ar", "ar-best"):
            if o is None or peer not in by:
                continue
            p = by[peer]
            ok_kl, ok_t = o["kl"] <= p["kl"], o["seconds"] <= p["seconds"]
            print(f"{'PASS' if ok_kl and ok_t else 'FAIL'}: {s}: ours ({LABELS[ours_default]}) KL {o['kl']:.6f} "
                  f"{'<=' if ok_kl else '>'} {LABELS[peer]} {p['kl']:.6f} ({o['kl'] / p['kl']:.3f}x); wall "
                  f"{o['seconds']:.1f}s {'<=' if ok_t else '>'} {p['seconds']:.1f}s ({o['seconds'] / p['seconds']:.2f}x)")
        best = min(((r["kl"], k) for k, r in by.items() if k in OURS), default=None)
        if best:
            print(f"{s}: our lowest KL: {LABELS[best[1]]} {best[0]:.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
