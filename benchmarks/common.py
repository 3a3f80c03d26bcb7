"""Shared helpers for the benchmark scripts (run as ``python benchmarks/<name>.py``).

* where things are: ``repo_root``, ``shared_dir``/``ref_llama`` (the optional /work/shared assets),
  ``skip`` (print why and exit 0, which ``run_all`` reports as skipped);
* models: ``build_synthetic_llama`` streams random tensors through ``ShardedWriter`` (never a whole
  model in memory), plus config.json and the bundled tokenizer;
* running our pipeline: ``calibrate``, ``quantize`` (``quantize_gptq`` with benchmark defaults,
  timed), ``FpReference`` (fp log-probs of eval windows computed once, then perplexity / KL / top-1
  of any output against them, with the same formulas as ``quantize.eval.perplexity``);
* measuring: ``maxrss_mb``, ``rss_mb``, ``run_json_child`` (a fresh interpreter per measurement so
  peaks do not mix), ``cpu_model``;
* output: ``print_table``, ``quiet`` (hide the pipeline's progress lines, keep its warnings).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

SKIP_PREFIX = "SKIP:"


# -- locations ---------------------------------------------------------------------------------

def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def shared_dir() -> Path | None:
    """The shared assets directory: $QUANTIZE_SHARED, ../shared next to the checkout, or /work/shared."""
    candidates = [os.environ.get("QUANTIZE_SHARED"), repo_root().parent / "shared", "/work/shared"]
    for c in candidates:
        if c and Path(c).is_dir():
            return Path(c)
    return None


def ref_llama() -> Path | None:
    """``shared/models/ref-llama`` (a small Llama trained on real text), when present."""
    s = shared_dir()
    p = s / "models" / "ref-llama" if s else None
    return p if p is not None and (p / "config.json").is_file() else None


def wikitext(split: str) -> Path | None:
    """``shared/data/wikitext-2/{valid,test}.txt`` when present."""
    s = shared_dir()
    p = s / "data" / "wikitext-2" / f"{split}.txt" if s else None
    return p if p is not None and p.is_file() else None


def skip(reason: str) -> None:
    """Print why the benchmark cannot run here and exit 0 (``run_all`` lists it as skipped)."""
    print(f"{SKIP_PREFIX} {reason}")
    sys.exit(0)


# -- measuring -----------------------------------------------------------------------------------

def maxrss_mb() -> float:
    """Peak resident set of this process so far (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    """Current resident set (Linux /proc; falls back to the peak)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 2**20
    except OSError:
        return maxrss_mb()


def add_peer_args(ap) -> None:
    """Arguments shared by the side-by-side peer benchmarks (``*_vs_gptqmodel.py``): calibration and
    eval sizes, batch, threads, and the hidden ``--child TOOL MODEL CAL OUT`` used to run one
    quantizer in a fresh process."""
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--windows", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=0, help="torch threads in each run (0: auto, see common.set_threads)")
    ap.add_argument("--child", nargs=4, metavar=("TOOL", "MODEL", "CAL", "OUT"), help=argparse.SUPPRESS)


# The host-memory set-ups our runs compare (executor/memory.py, quantize/allocator.py): a label ->
# (ExecConfig.host_heap, extra environment of the child process). "jemalloc" is what the quantize
# command uses where libjemalloc is installed (it re-executes itself with it preloaded); "flat" is its
# default elsewhere.
def heap_setups() -> dict[str, tuple[str, dict[str, str]]]:
    from quantize.allocator import find_jemalloc

    glibc = {"LD_PRELOAD": "", "QUANTIZE_MALLOC": "glibc"}
    setups = {"flat": ("flat", glibc), "pooled": ("pooled", glibc)}
    lib = find_jemalloc() if sys.platform.startswith("linux") else None
    if lib is not None:
        setups["jemalloc"] = ("flat", {"LD_PRELOAD": lib})
    return setups


def run_json_child(cmd: Sequence[str], env: dict[str, str] | None = None, timeout: float | None = None) -> dict:
    """Run ``cmd`` in a fresh process and return the last JSON object it printed on a line of its own
    (other output, e.g. a library's logging on stdout, is ignored)."""
    proc = subprocess.run(list(cmd), capture_output=True, text=True, env={**os.environ, **(env or {})},
                          timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-4000:]}{proc.stdout[-2000:]}")
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    raise RuntimeError(f"{' '.join(cmd)} printed no JSON result; stderr:\n{proc.stderr[-4000:]}")


def cpu_model() -> str:
    """``"<model name> (N logical CPUs available)"`` from /proc/cpuinfo."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} ({available_cpus()} logical CPUs available)"


def available_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def set_threads(requested: int = 0) -> tuple[int, str]:
    """Set torch's intra-op threads; returns ``(threads, description)``.

    ``requested`` > 0 is used as is. 0 = auto: one thread when the machine is oversubscribed (1-min
    load average >= the CPUs available), else torch's default. On a shared machine OpenMP threads of
    a multi-threaded torch op wait for each other while descheduled; measured here at load ~10 on 2
    cores, a GPTQ solve ran 10-40x slower with 2 threads than with 1.
    """
    import torch

    if requested > 0:
        torch.set_num_threads(requested)
        return requested, f"{requested} (requested)"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if load >= available_cpus():
        torch.set_num_threads(1)
    n = torch.get_num_threads()
    return n, f"{n} (auto: load average {load:.1f} on {available_cpus()} CPUs)"


class Timer:
    """``with Timer() as t: ...`` then ``t.seconds``."""

    def __enter__(self) -> "Timer":
        self.t0 = time.perf_counter()
        self.seconds = float("nan")
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.t0


# -- output --------------------------------------------------------------------------------------

def fmt(v: Any, digits: int = 4) -> str:
    """Numbers for tables: ``digits`` significant digits, fixed-point from 1e-5 up to 1e6."""
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return str(v)
        if v == 0:
            return "0"
        mag = math.floor(math.log10(abs(v)))
        if mag < -5 or mag >= 6:
            return f"{v:.{digits - 1}e}"
        return f"{v:.{max(digits - 1 - mag, 0)}f}"
    return str(v)


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 4) -> None:
    """A Markdown table (readable as text, pastes into a README); numbers right-aligned, text left."""
    cells = [[fmt(v, digits) for v in row] for row in rows]
    numeric = [[v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]

    def line(cs: Sequence[str], right: Sequence[bool]) -> str:
        return "| " + " | ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cs, widths, right)) + " |"

    print(line(headers, [False] * len(headers)))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r, num in zip(cells, numeric):
        print(line(r, num))
    sys.stdout.flush()


@contextlib.contextmanager
def quiet(enabled: bool = True) -> Iterator[None]:
    """Swallow the pipeline's progress/event lines on stderr; re-emit its warnings ("!!")."""
    if not enabled:
        yield
        return
    buf = io.StringIO()
    try:
        with contextlib.redirect_stderr(buf):
            yield
    finally:
        for ln in buf.getvalue().splitlines():
            if ln.startswith("!!"):
                print(ln, file=sys.stderr)


# -- models ----------------------------------------------------------------------------------------

def llama_config(*, layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int,
                 vocab: int = 1024, head_dim: int | None = None, max_positions: int = 4096) -> dict[str, Any]:
    """A config.json dict for a Llama of these shapes (bf16, untied, the bundled tokenizer's ids)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim or hidden // heads,
        "vocab_size": vocab,
        "max_position_embeddings": max_positions,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 2,
        "dtype": "bfloat16",
        "use_cache": False,
    }


def _write_synthetic(out: Path, family: str, cfg: dict[str, Any], seed: int, std: float, max_shard_bytes: int) -> Path:
    """Every tensor the architecture table expects for ``cfg``, random (linears and routers
    ~ N(0, std²), norms ~ 1 + N(0, 0.1²)), bf16, written one at a time (peak memory: one tensor);
    then config.json and the bundled tokenizer. Deterministic in ``seed``."""
    import torch

    from quantize.arch import by_name
    from quantize.io.writer import ShardedWriter
    from quantize.testing.tiny import tokenizer_dir

    out, arch = Path(out), by_name(family)
    d = arch.dims(cfg)
    gates = {lin.name: lin for lin in (arch.moe.never_quantized if arch.moe else ())}
    gen = torch.Generator().manual_seed(seed)

    def shape(name: str) -> tuple[int, ...]:
        i = arch.layer_index(name)
        if i is None:  # embeddings and head, or the final norm
            embed = name.startswith((arch.embed_path + ".", arch.lm_head_path + "."))
            return (int(cfg["vocab_size"]), d["hidden"]) if embed else (d["hidden"],)
        rel = name[len(arch.layer_prefix(i)):].removesuffix(".weight")
        if arch.is_quantizable(name):
            return arch.linear_shape(rel, cfg)
        if rel in gates:  # a router
            return arch.shape_of(gates[rel], cfg)
        return (d["head_dim"],) if rel.endswith(("q_norm", "k_norm")) else (d["hidden"],)  # a layer norm

    with ShardedWriter(out, max_shard_bytes=max_shard_bytes) as w:
        for name in arch.expected_tensor_names(cfg):
            s = shape(name)
            t = torch.randn(s, generator=gen)
            t = 1.0 + 0.1 * t if len(s) == 1 else std * t
            w.add(name, t.to(torch.bfloat16))
            del t
        w.close()
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    for f in tokenizer_dir().iterdir():
        if f.is_file():
            shutil.copy2(f, out / f.name)
    return out


def build_synthetic_llama(out: Path, *, layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int,
                          vocab: int = 1024, seed: int = 0, std: float = 0.02,
                          max_shard_bytes: int = 2 * 10**9) -> Path:
    """A random bf16 Llama checkpoint written tensor by tensor (peak memory: one tensor).

    Linear weights ~ N(0, std²); norms ~ 1 + N(0, 0.1²); the bundled tokenizer (vocab 1024) is
    copied, so ``vocab`` must be 1024 for calibration with it. Deterministic in ``seed``.
    """
    cfg = llama_config(layers=layers, hidden=hidden, intermediate=intermediate, heads=heads, kv_heads=kv_heads,
                       vocab=vocab)
    return _write_synthetic(out, "llama", cfg, seed, std, max_shard_bytes)


def build_synthetic_moe(out: Path, *, layers: int, hidden: int, moe_intermediate: int, experts: int, top_k: int,
                        heads: int, kv_heads: int, vocab: int = 1024, seed: int = 0, std: float = 0.02,
                        max_shard_bytes: int = 2 * 10**9) -> Path:
    """A random bf16 Qwen3-MoE checkpoint (every layer sparse) written tensor by tensor, as
    :func:`build_synthetic_llama` (per-expert 2D tensors, routers, q/k norms)."""
    cfg = {**llama_config(layers=layers, hidden=hidden, intermediate=4 * moe_intermediate, heads=heads,
                          kv_heads=kv_heads, vocab=vocab, head_dim=hidden // heads),
           "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "num_experts": experts,
           "num_experts_per_tok": top_k, "moe_intermediate_size": moe_intermediate, "norm_topk_prob": True,
           "decoder_sparse_step": 1, "mlp_only_layers": []}
    cfg.pop("mlp_bias")
    return _write_synthetic(out, "qwen3_moe", cfg, seed, std, max_shard_bytes)


# -- our pipeline ------------------------------------------------------------------------------------

def exec_config(batch_size: int = 8, host_heap: str = "flat"):
    import torch

    from quantize.executor.loop import ExecConfig

    return ExecConfig(device="cpu", dtype=torch.float32, batch_size=batch_size, host_heap=host_heap)


def calibrate(model_dir: Path, dataset: str, n: int, seq_len: int, out: Path, seed: int = 0) -> Path:
    """``quantize sample`` into ``out`` (reused when already there)."""
    from quantize.calibration import sample_calibration

    if not (Path(out) / "manifest.json").is_file():
        with quiet():
            sample_calibration(Path(model_dir), dataset, n, seq_len, seed, Path(out))
    return Path(out)


def quantize(model_dir: Path, calibration: Path, out: Path, *, bits: int = 4, group_size: int = 128,
             act_order: bool = True, sym: bool = True, rtn: bool = False, damp: float = 0.01,
             batch_size: int = 8, host_heap: str = "flat", verbose: bool = False,
             static_groups: bool = False, grid: str = "minmax") -> tuple[Any, float]:
    """Our GPTQ (or RTN) into ``out`` (overwritten): ``(manifest, wall seconds)``. ``grid`` is pinned to
    min/max (the figures these benchmarks published, and GPTQModel's ``mse=0.0`` work); "auto" is the
    command's default (mse at 3-4 bits, benchmarks/lowbit_quality.py)."""
    from quantize.commands.gptq import quantize_gptq

    t0 = time.perf_counter()
    with quiet(not verbose):
        m = quantize_gptq(model_dir=Path(model_dir), calibration=Path(calibration), out=Path(out), bits=bits,
                          group_size=group_size, act_order=act_order, sym=sym, damp=damp, static_groups=static_groups,
                          block_size=128, rtn=rtn, grid=grid, exec_cfg=exec_config(batch_size, host_heap),
                          overwrite=True)
    return m, time.perf_counter() - t0


@dataclass
class Quality:
    perplexity: float
    kl: float
    top1: float


class FpReference:
    """The unquantized model's next-token log-probs on ``windows`` [W, L], computed once.

    ``compare(dir)`` streams another checkpoint (any output of ours, read back dequantized) over
    the same windows: perplexity, mean KL(fp ‖ quantized) per position (summed over the
    vocabulary) and top-1 agreement, exactly as ``quantize.eval.perplexity.evaluate_windows``.
    """

    def __init__(self, model_dir: Path, windows, batch_size: int = 8):
        import torch

        self.windows = windows
        self.batch_size = batch_size
        self.logprobs = [lp.to(torch.float32) for lp in self._logprobs(model_dir)]
        self.fp = self._quality(self.logprobs, with_baseline=False)

    def _logprobs(self, model_dir: Path):
        import torch.nn.functional as F

        from quantize.eval.perplexity import final_logits

        with quiet():
            for logits in final_logits(Path(model_dir), self.windows, exec_config(self.batch_size)):
                yield F.log_softmax(logits[:, :-1].float(), dim=-1)

    def _quality(self, logprobs, with_baseline: bool) -> Quality:
        nll, n, kl, agree, offset = 0.0, 0, 0.0, 0, 0
        for bi, lp in enumerate(logprobs):
            b = lp.shape[0]
            target = self.windows[offset: offset + b, 1:].long()
            offset += b
            nll += float(-lp.gather(-1, target.unsqueeze(-1)).sum())
            n += target.numel()
            if with_baseline:
                base = self.logprobs[bi]
                kl += float((base.exp() * (base - lp)).sum())
                agree += int((base.argmax(-1) == lp.argmax(-1)).sum())
        if not with_baseline:
            return Quality(math.exp(nll / n), 0.0, 1.0)
        return Quality(math.exp(nll / n), kl / n, agree / n)

    def compare(self, model_dir: Path) -> Quality:
        return self._quality(self._logprobs(model_dir), with_baseline=True)


def eval_windows(model_dir: Path, dataset: str, seq_len: int, n: int):
    """Non-overlapping windows from the start of ``dataset`` (the eval stage's tokenization)."""
    from quantize.eval.perplexity import eval_windows_from_dataset

    windows, _ = eval_windows_from_dataset(Path(model_dir), dataset, seq_len, n)
    return windows


def gptqmodel_quantize(model: Path, cal: Path, out: Path, qcfg, batch_size: int, dtype: str = "float32") -> dict:
    """GPTQModel's own quantization of ``model`` (fp32 unless ``dtype``, CPU) on our calibration
    windows (as ``input_ids`` + all-ones ``attention_mask``), saved to ``out``; wall and CPU seconds
    from the load on (its imports excluded), split into load / quantize / save, and its version.
    Runs in .venv-interop (needs ``quantize`` there too, to read the calibration)."""
    import gptqmodel
    import torch
    from gptqmodel import GPTQModel

    from quantize.calibration import load_calibration

    ids, _ = load_calibration(cal)
    data = [{"input_ids": row.tolist(), "attention_mask": [1] * len(row)} for row in ids.long()]
    t0, cpu0 = time.perf_counter(), time.process_time()
    m = GPTQModel.load(str(model), qcfg, device="cpu", dtype=dtype if dtype == "auto" else getattr(torch, dtype))
    t1 = time.perf_counter()
    m.quantize(data, batch_size=batch_size)
    t2 = time.perf_counter()
    m.save(str(out))
    t3 = time.perf_counter()
    return {"seconds": t3 - t0, "cpu_s": time.process_time() - cpu0, "load_s": t1 - t0, "quantize_s": t2 - t1,
            "save_s": t3 - t2, "version": gptqmodel.__version__}


def failure_reason(err: BaseException) -> str:
    """One line for a failed peer child: the last exception (or ``error:``) line of its output, else
    its last line (a timeout says so)."""
    import re
    import subprocess

    if isinstance(err, subprocess.TimeoutExpired):
        return f"timed out after {err.timeout:.0f}s"
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    for ln in reversed(lines):
        if re.match(r"^([\w.]*(Error|Exception|Interrupt|Exit)\b|error:)", ln):
            return ln[:200]
    return (lines[-1] if lines else type(err).__name__)[:200]



# -- peers in their own environments (child processes) -----------------------------------------------

LLMC_PYTHON = repo_root() / ".venv-llmcompressor" / "bin" / "python"
INTEROP_PYTHON = repo_root() / ".venv-interop" / "bin" / "python"


def llmcompressor_quantize(model: Path, tokens_json: Path, out: Path, batch_size: int, dtype: str = "auto", *,
                           bits: int = 4, group_size: int = 128, sym: bool = True) -> dict:
    """llm-compressor's GPTQ (``oneshot`` + ``GPTQModifier``, everything else as it ships: actorder
    "static", block 128, dampening 0.01, ``lm_head`` left unquantized) on the token windows in
    ``tokens_json`` (a JSON list of lists, handed over as an already tokenized ``datasets.Dataset``
    of ``input_ids`` + all-ones ``attention_mask``), saved compressed (pack-quantized) to ``out``.
    W4 g128 sym is its "W4A16" preset; other widths are the same weights args in ``config_groups``.

    Runs under .venv-llmcompressor and needs nothing of this package (whose requirements may not fit
    there: scripts/setup_llmcompressor.sh): start it as a child with :data:`LLMC_PYTHON`. Seconds
    from the load on (imports excluded), split into load / quantize / save."""
    import importlib.metadata as md

    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = json.loads(Path(tokens_json).read_text())
    n, seq_len = len(rows), len(rows[0])
    data = Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * seq_len for _ in rows]})
    if (bits, group_size, sym) == (4, 128, True):
        recipe = GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"])
    else:
        weights = {"num_bits": bits, "type": "int", "symmetric": sym, "strategy": "group", "group_size": group_size}
        recipe = GPTQModifier(config_groups={"group_0": {"targets": ["Linear"], "weights": weights}},
                              ignore=["lm_head"])
    t0, cpu0 = time.perf_counter(), time.process_time()
    m = AutoModelForCausalLM.from_pretrained(str(model), dtype=dtype if dtype == "auto" else getattr(torch, dtype))
    tok = AutoTokenizer.from_pretrained(str(model))
    t1 = time.perf_counter()
    oneshot(model=m, tokenizer=tok, dataset=data, recipe=recipe, num_calibration_samples=n, max_seq_length=seq_len,
            batch_size=batch_size)
    t2 = time.perf_counter()
    m.save_pretrained(str(out), save_compressed=True)
    tok.save_pretrained(str(out))
    t3 = time.perf_counter()
    return {"seconds": t3 - t0, "cpu_s": time.process_time() - cpu0, "load_s": t1 - t0, "quantize_s": t2 - t1,
            "save_s": t3 - t2, "model_dtype": str(m.dtype).removeprefix("torch."), "peak_mb": maxrss_mb(),
            "version": md.version("llmcompressor"),
            "versions": {p: md.version(p) for p in ("llmcompressor", "compressed-tensors", "transformers", "torch")}}


def write_tokens_json(cal: Path, out: Path) -> Path:
    """The calibration token ids of a ``quantize sample`` output as JSON (for peers whose environment
    has no ``quantize``)."""
    from quantize.calibration import load_calibration

    Path(out).write_text(json.dumps(load_calibration(cal)[0].tolist()))
    return Path(out)
