"""GGUF Q4_K_M of ref-llama: llama.cpp's own quantizer vs ours, on the same model and calibration tokens.

Runs in .venv-llamacpp (``scripts/setup_llamacpp.sh`` or ``make peers``: llama-cpp-python 0.3.36
built from source, CPU only, with this project installed; ``benchmarks/run_all.py`` runs it with
that interpreter and skips it where the environment is absent). Elsewhere it exits 0 with ``SKIP:``,
as it does without ../shared/models/ref-llama and WikiText-2.

* model: shared/models/ref-llama (bf16, hidden 384, intermediate 1024, 6 layers, untied head). 384 is
  not a multiple of 256, so llama.cpp's Q4_K_M falls back for every tensor of that width (q/k/v/o,
  gate/up, token_embd: Q4_K -> Q5_0; attn_v's Q6_K -> Q8_0; output Q6_K -> Q8_0); only ffn_down
  (1024 wide) stays a K type (Q4_K, Q6_K in the layers ``use_more_bits`` picks). Our mix is the same
  (quantize/formats/gguf_mix.py), so every row below has the same types and the same size;
* calibration: one ``quantize sample`` set, 128 x 256 tokens of WikiText-2 valid.txt (seed 0);
* rows:
  - **BF16 GGUF (ours)**: ``quantize gguf --type BF16``; the input of llama.cpp's quantizer;
  - **llama.cpp Q4_K_M**: ``llama_model_quantize(bf16.gguf, out, {ftype: Q4_K_M})`` through the C
    API (what ``llama-quantize bf16.gguf out.gguf Q4_K_M`` runs), no imatrix. The script checks that
    our imatrix-free ``quantize gguf --type Q4_K_M`` writes these very bytes (a line says so);
  - **llama.cpp Q4_K_M + imatrix (ours)**: the same with our importance matrix (``quantize gguf
    --calibration C --imatrix-out F``, from the same calibration tokens): llama-cpp-python 0.3.36's
    ``llama_model_quantize_params.imatrix`` takes it as a NULL-terminated array of
    ``llama_model_imatrix_data{name, data, size}`` holding ``E[x^2]`` per input column -- what
    ``llama-quantize --imatrix`` loads from the file (``in_sum2 / counts``), so this is llama.cpp's
    own imatrix quantization, not our re-implementation of it;
  - **ours Q4_K_M + calibration**: ``quantize gguf --type Q4_K_M --calibration C`` (GPTQ on the
    Hessian, rounding on llama.cpp's grids);
* columns: file size; KL to the bf16 model, top-1 agreement and perplexity by *our* eval
  (``common.FpReference``: the first 60 windows x 256 of WikiText-2 test, the HF model in fp32 as
  the reference; our reader dequantizes any GGUF, llama.cpp's included); then llama.cpp's own
  numbers: each GGUF loaded in ``llama_cpp.Llama`` (fp32 KV cache, ``logits_all``), the same windows
  evaluated one by one from an empty context, perplexity and KL / top-1 against llama.cpp's run of
  the BF16 GGUF (as ``llama-perplexity --kl-divergence`` compares with its base model's logits).
  llama.cpp scores every position of each window as our eval does (``llama-perplexity`` itself
  scores only the second half of each context), so its perplexity column compares with ours. On CPU
  llama.cpp also rounds activations (Q8_K / Q8_0 / bf16) in every matmul: the KL of its BF16 run to
  the fp32 reference is printed as the engine's floor. "write s": ``quantize_gguf``'s wall time for
  our rows (GPTQ included), the ``llama_model_quantize`` call's for llama.cpp's.

    .venv-llamacpp/bin/python benchmarks/gguf_vs_llamacpp.py [--samples 128] [--windows 60] [--llama-windows 60]

MEASURED (2026-12-02, AMD EPYC, 2 shared CPUs, 1 torch thread; llama-cpp-python 0.3.36 = llama.cpp
0c1e57098, AVX2 build; gguf 0.19.0, torch 2.13.0+cpu; all Q4_K_M files 9,334,368 bytes: F32 13,
Q4_K 4, Q5_0 35, Q6_K 2, Q8_0 3 tensors):

| GGUF | file MB | KL vs bf16 (ours) | top-1 (ours) | ppl (ours) | llama.cpp ppl | llama.cpp KL vs its BF16 | llama.cpp top-1 |
|---|---|---|---|---|---|---|---|
| BF16 GGUF (ours) | 25.315 | 0 | 1 | 113.493 | 113.492 | 0 | 1 |
| llama.cpp Q4_K_M | 9.334 | 0.0003044 | 0.9829 | 113.504 | 113.501 | 0.0003363 | 0.9824 |
| llama.cpp Q4_K_M + imatrix (ours) | 9.334 | 0.0002856 | 0.9844 | 113.515 | 113.524 | 0.0003156 | 0.9822 |
| ours Q4_K_M + calibration | 9.334 | 0.000191 | 0.9860 | 113.521 | 113.518 | 0.0002212 | 0.9853 |

Ours without calibration is llama.cpp's Q4_K_M byte for byte (57/57 tensors); with calibration its
KL is 0.63x llama.cpp's (0.67x llama.cpp's with the imatrix of the same tokens), by our eval and by
llama.cpp's own logits alike (0.66x / 0.70x). llama.cpp running the BF16 GGUF is within KL 1.3e-6 of
the fp32 HF model. Perplexity does not separate the rows on this small model (see shared/models/README.md).
"""

from __future__ import annotations

import argparse
import ctypes
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as c  # noqa: E402

def llama_quantize(llama_cpp, src: Path, out_dir: Path, threads: int, imatrix=None) -> float:
    """llama.cpp's Q4_K_M of ``src`` into ``out_dir/model.gguf`` (config/tokenizer copied beside it for
    our reader); returns the seconds ``llama_model_quantize`` took."""
    from quantize.testing.llamacpp import llama_model_quantize

    t0 = time.perf_counter()
    llama_model_quantize(src, out_dir / "model.gguf", threads=threads,
                         imatrix=None if imatrix is None else {k: v.numpy() for k, v in imatrix.items()})
    seconds = time.perf_counter() - t0
    for f in src.parent.iterdir():
        if f.is_file() and f.suffix == ".json" and f.name != "manifest.json":
            shutil.copy2(f, out_dir / f.name)
    return seconds


def llama_logprobs(llama_cpp, gguf_path: Path, windows, threads: int):
    """llama.cpp's next-token log-probs [W, L-1, V] (fp32) on ``windows``, each from an empty context."""
    import numpy as np
    import torch

    L = int(windows.shape[1])
    llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=L, n_batch=L, n_ubatch=L, logits_all=True, verbose=False,
                          n_threads=threads, n_threads_batch=threads, type_k=0, type_v=0, flash_attn=False)
    out = []
    for w in windows:
        llm.reset()
        llm.eval(w.tolist())
        logits = torch.from_numpy(np.array(llm.scores[: L - 1], dtype=np.float32))
        out.append(torch.log_softmax(logits, dim=-1))
    del llm
    return out


def llama_quality(lps, windows, base=None) -> tuple[float, float | None, float | None]:
    """(perplexity, KL(base || lps), top-1 agreement with base), every position, as common.FpReference."""
    nll, n, kl, agree = 0.0, 0, 0.0, 0
    for i, lp in enumerate(lps):
        target = windows[i, 1:].long()
        nll += float(-lp.gather(-1, target.unsqueeze(-1)).sum())
        n += target.numel()
        if base is not None:
            b = base[i]
            kl += float((b.exp() * (b - lp)).sum())
            agree += int((b.argmax(-1) == lp.argmax(-1)).sum())
    if base is None:
        return math.exp(nll / n), None, None
    return math.exp(nll / n), kl / n, agree / n


def fp_logprobs_per_window(ref) -> list:
    out = []
    for batch in ref.logprobs:
        out.extend(batch.unbind(0))
    return out


def same_bytes(a: Path, b: Path) -> tuple[int, int, list[str]]:
    import gguf
    import numpy as np

    ta = {t.name: t for t in gguf.GGUFReader(str(a)).tensors}
    tb = {t.name: t for t in gguf.GGUFReader(str(b)).tensors}
    differ = [n for n in sorted(set(ta) | set(tb)) if n not in ta or n not in tb
              or ta[n].tensor_type != tb[n].tensor_type or not np.array_equal(np.asarray(ta[n].data), np.asarray(tb[n].data))]
    return len(ta) - len([n for n in differ if n in ta]), len(ta), differ


def type_counts(path: Path) -> str:
    import gguf

    counts: dict[str, int] = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--windows", type=int, default=60)
    ap.add_argument("--llama-windows", type=int, default=60, help="windows llama.cpp evaluates (0: none)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=0, help="torch and llama.cpp threads (0: auto, see common.set_threads)")
    args = ap.parse_args(argv)
    try:
        import llama_cpp
    except ImportError:
        c.skip("needs llama-cpp-python (.venv-llamacpp: scripts/setup_llamacpp.sh or `make peers`; "
               "run with .venv-llamacpp/bin/python)")
    model, valid, test = c.ref_llama(), c.wikitext("valid"), c.wikitext("test")
    if model is None or valid is None or test is None:
        c.skip("needs ../shared/models/ref-llama and ../shared/data/wikitext-2")

    import importlib.metadata as md

    import torch

    from quantize.commands.gguf import quantize_gguf
    from quantize.formats.gguf_imatrix import read_imatrix

    import logging

    # llama-cpp-python routes llama.cpp's log through this logger: keep errors, drop the per-tensor lines
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
    threads, threads_note = c.set_threads(args.threads)
    cfg = c.exec_config(args.batch_size)
    rows, notes = [], []
    with tempfile.TemporaryDirectory(prefix="gguf-vs-llamacpp-") as tmp:
        work = Path(tmp)
        cal = c.calibrate(model, str(valid), args.samples, args.seq_len, work / "calibration")
        windows = c.eval_windows(model, str(test), args.seq_len, args.windows)
        ref = c.FpReference(model, windows, args.batch_size)
        fp_lps = fp_logprobs_per_window(ref)
        lw = windows[: args.llama_windows]

        def ours(name: str, **kw) -> tuple[Path, float]:
            t0 = time.perf_counter()
            with c.quiet():
                quantize_gguf(model_dir=model, out=work / name, exec_cfg=cfg, overwrite=True, **kw)
            return work / name, time.perf_counter() - t0

        bf16, t_bf16 = ours("bf16", ftype="BF16")
        cal_dir, t_cal = ours("ours-cal", ftype="Q4_K_M", calibration=cal, imatrix_out=work / "imatrix.gguf")
        ref_dir, t_ref = ours("ours-nocal", ftype="Q4_K_M")
        imatrix = read_imatrix(work / "imatrix.gguf")
        t_ll = llama_quantize(llama_cpp, bf16 / "model.gguf", work / "llamacpp", threads)
        t_llimx = llama_quantize(llama_cpp, bf16 / "model.gguf", work / "llamacpp-imatrix", threads, imatrix=imatrix)

        same, total, differ = same_bytes(ref_dir / "model.gguf", work / "llamacpp" / "model.gguf")
        notes.append(f"ours without calibration (`quantize gguf --type Q4_K_M`) vs llama.cpp's Q4_K_M: {same}/{total} "
                     f"tensors byte-identical" + (f"; differ: {', '.join(differ)}" if differ else ""))
        notes.append(f"type mix (all Q4_K_M rows): {type_counts(work / 'llamacpp' / 'model.gguf')}")
        notes.append(f"imatrix: {len(imatrix)} matrices from {args.samples} x {args.seq_len} calibration tokens")

        variants = [
            ("BF16 GGUF (ours)", bf16, t_bf16),
            ("llama.cpp Q4_K_M (llama_model_quantize)", work / "llamacpp", t_ll),
            ("llama.cpp Q4_K_M + imatrix (ours, via the C API)", work / "llamacpp-imatrix", t_llimx),
            ("ours Q4_K_M + calibration (GPTQ on the grid)", cal_dir, t_cal),
        ]
        base_ll = None
        kls: dict[str, float] = {}
        for label, d, seconds in variants:
            q = ref.compare(d)
            size = (d / "model.gguf").stat().st_size
            ll_ppl = ll_kl = ll_top1 = None
            if len(lw):
                lps = llama_logprobs(llama_cpp, d / "model.gguf", lw, threads)
                if base_ll is None:
                    base_ll = lps
                    ll_ppl, _, _ = llama_quality(lps, lw)
                    _, floor_kl, floor_top1 = llama_quality(lps, lw, base=fp_lps[: len(lw)])
                    notes.append(f"llama.cpp running the BF16 GGUF vs the fp32 HF model ({len(lw)} windows): "
                                 f"KL {floor_kl:.3g}, top-1 {floor_top1:.4f} (the engine's own floor)")
                    ll_kl, ll_top1 = 0.0, 1.0
                else:
                    ll_ppl, ll_kl, ll_top1 = llama_quality(lps, lw, base=base_ll)
                del lps
            kls[label] = q.kl
            f = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
            rows.append([label, f"{size / 1e6:.3f}", f"{q.kl:.4g}", f"{q.top1:.4f}", f"{q.perplexity:.3f}",
                         f(ll_ppl, ".3f"), f(ll_kl, ".4g"), f(ll_top1, ".4f"), f"{seconds:.1f}"])
            print(f"{label}: {size} bytes, KL {q.kl:.4g}, top-1 {q.top1:.4f}, ppl {q.perplexity:.3f}; llama.cpp: "
                  f"ppl {c.fmt(ll_ppl)}, KL {c.fmt(ll_kl)}, top-1 {c.fmt(ll_top1)} ({seconds:.1f} s to write)", flush=True)

    print(f"\n{model.name}: calibration {args.samples} x {args.seq_len} tokens of valid.txt; eval {windows.shape[0]} x "
          f"{args.seq_len} tokens of test.txt (llama.cpp: the first {len(lw)}); {c.cpu_model()}; threads {threads_note}; "
          f"llama-cpp-python {llama_cpp.__version__}, gguf {md.version('gguf')}, torch {torch.__version__}\n")
    c.print_table(["GGUF", "file MB", "KL vs bf16 (ours)", "top-1 (ours)", "perplexity (ours)", "llama.cpp ppl",
                   "llama.cpp KL vs its BF16", "llama.cpp top-1", "write s"], rows)
    ours_kl = kls[variants[3][0]]
    notes.append(f"KL (our eval), ours with calibration / llama.cpp: {ours_kl / kls[variants[1][0]]:.3f} without its "
                 f"imatrix, {ours_kl / kls[variants[2][0]]:.3f} with it")
    for n in notes:
        print(f"- {n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
