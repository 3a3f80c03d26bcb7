"""One engine, run inside its own virtualenv:

    python -m quantize.check.runner ENGINE DIR PROMPTS_JSON OUT_JSON

PROMPTS_JSON: a JSON list of token-id lists (already tokenized by the parent with DIR's tokenizer).
Writes OUT_JSON: ``{"engine", "engine_version", "status", "reason", "logits"}`` where status is
``ok`` (``logits``: an .npz beside OUT_JSON holding ``p0, p1, ...``, float32 [len(prompt), vocab],
the next-token logits at every position), ``loaded`` (the engine loaded DIR but could not run a
forward here, reason says why), ``unsupported`` (the engine does not serve this format) or ``error``
(loading or running failed: reason is the exception, one line). Exit status 0 whenever OUT_JSON
was written. Imports only numpy and the engine's own library (no quantize code beyond
``quantize.check.engines``), so an engine venv needs nothing else of ours.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from .engines import MOE_MODEL_TYPES, NO_TRANSFORMERS_GGUF, detect_format, model_type


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: " + " ".join(str(e).split())[:400]


def _ct_asymmetric(directory: Path) -> bool:
    qc = json.loads((directory / "config.json").read_text()).get("quantization_config") or {}
    for group in (qc.get("config_groups") or {}).values():
        w = (group or {}).get("weights") or {}
        if w.get("symmetric") is False:
            return True
    return False


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001
        return None


def run_transformers(directory: Path, prompts: list[list[int]]) -> tuple[str, str, list[np.ndarray]]:
    import torch
    from transformers import AutoModelForCausalLM

    fmt = detect_format(directory)
    kw: dict = {"dtype": torch.float32}
    note = ""
    if fmt == "gguf":
        if model_type(directory) in NO_TRANSFORMERS_GGUF:
            return "unsupported", f"transformers' GGUF loader does not load {model_type(directory)} back", []
        kw["gguf_file"] = "model.gguf"
    elif fmt == "compressed-tensors" and _ct_asymmetric(directory):
        from transformers import CompressedTensorsConfig

        # compressed-tensors 0.20's compressed-module path rejects packed asymmetric zero points
        # (llm-compressor#1618); dequantize=True decompresses them at load instead
        kw["quantization_config"] = CompressedTensorsConfig(dequantize=True)
        note = "asymmetric: loaded with CompressedTensorsConfig(dequantize=True)"
    elif fmt in ("gptq", "awq"):
        if model_type(directory) in MOE_MODEL_TYPES:
            return ("unsupported", f"transformers' from_pretrained leaves {fmt} experts of {model_type(directory)} "
                    "unloaded (fused experts in transformers 5); gptqmodel's loader takes them", [])
        kw = {"device_map": "cpu"}  # the quantized kernels pick their own dtype
    model = AutoModelForCausalLM.from_pretrained(str(directory), **kw).eval()
    out = []
    try:
        with torch.no_grad():
            for ids in prompts:
                out.append(model(torch.tensor([ids])).logits[0].float().numpy())
    except Exception as e:  # noqa: BLE001 - a kernel this machine lacks: loaded, forward not run
        if fmt in ("gptq", "awq"):
            return "loaded", _one_line(e), []
        raise
    return "ok", note, out


def run_llamacpp(directory: Path, prompts: list[list[int]]) -> tuple[str, str, list[np.ndarray]]:
    import logging

    import llama_cpp

    if detect_format(directory) != "gguf":
        return "unsupported", "llama.cpp loads GGUF only", []
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
    n_ctx = max(64, max(len(p) for p in prompts) + 8)
    # an fp32 KV cache (type 0 = GGML_TYPE_F32) and no flash attention: only the weights and
    # llama.cpp's activation rounding differ from our read-back
    llm = llama_cpp.Llama(model_path=str(directory / "model.gguf"), n_ctx=n_ctx, logits_all=True, verbose=False,
                          n_threads=1, n_threads_batch=1, type_k=0, type_v=0, flash_attn=False)
    out = []
    for ids in prompts:
        llm.reset()
        llm.eval(ids)
        out.append(np.array(llm.scores[: len(ids)], dtype=np.float32))
    return "ok", "", out


def run_gptqmodel(directory: Path, prompts: list[list[int]]) -> tuple[str, str, list[np.ndarray]]:
    import torch
    from gptqmodel import GPTQModel

    if detect_format(directory) not in ("gptq", "awq"):
        return "unsupported", "gptqmodel loads GPTQ/AWQ only", []
    model = GPTQModel.load(str(directory), device="cpu")
    out = []
    try:
        with torch.no_grad():
            for ids in prompts:
                out.append(model.model(torch.tensor([ids])).logits[0].float().numpy())
    except Exception as e:  # noqa: BLE001
        return "loaded", _one_line(e), []
    return "ok", "", out


RUNNERS = {"transformers": (run_transformers, "transformers"), "llama.cpp": (run_llamacpp, "llama_cpp"),
           "gptqmodel": (run_gptqmodel, "gptqmodel")}


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        sys.stderr.write("usage: python -m quantize.check.runner ENGINE DIR PROMPTS_JSON OUT_JSON\n")
        return 2
    engine, directory, prompts_path, out_path = argv[0], Path(argv[1]), Path(argv[2]), Path(argv[3])
    prompts = json.loads(prompts_path.read_text())
    fn, module = RUNNERS[engine]
    result = {"engine": engine, "engine_version": None, "status": "error", "reason": "", "logits": None}
    try:
        status, reason, logits = fn(directory, prompts)
        result.update(status=status, reason=reason)
        if logits:
            npz = out_path.with_name(out_path.name + ".npz")
            np.savez(npz, **{f"p{i}": a for i, a in enumerate(logits)})
            result["logits"] = str(npz)
    except Exception as e:  # noqa: BLE001 - reported to the parent as a failed load/run
        result.update(status="error", reason=_one_line(e))
    result["engine_version"] = _version(module)
    out_path.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
