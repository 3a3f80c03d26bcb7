"""`quantize plan`: the memory a model needs, from config.json alone.

Weights: exact per-format byte counts (codes, scales, zeros, g_idx, and the tensors left
unquantized: embeddings, norms, lm_head, biases). KV cache: 2 x layers x kv_heads x head_dim x
context x batch x bytes. With a VRAM budget, the highest-quality setting that fits.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Mapping

from .arch import Arch, get_arch
from .errors import InputError

DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2,
               "fp8": 1, "float8": 1, "int8": 1, "q8": 1, "q4": 0.5}


@dataclass(frozen=True)
class Setting:
    method: str  # "fp16", "gptq", "awq", "exl2", "ct" (compressed-tensors WnA16), "fp8" (W8A8)
    bits: float  # bits, or bpw for exl2
    group_size: int = 128
    sym: bool = True  # ct: asymmetric adds packed zero points; fp8: False = static (input scales stored)
    gguf_type: str = ""  # gguf: the file type (Q4_K_M, Q8_0, ...)

    @property
    def label(self) -> str:
        if self.method in ("fp16", "bf16"):
            return self.method
        if self.method == "gguf":
            return f"gguf {self.gguf_type}"
        if self.method == "exl2":
            return f"exl2 {self.bits:g} bpw"
        if self.method == "fp8":
            return "ct fp8 w8a8" + (" static" if not self.sym else "")
        g = "" if self.group_size == -1 else f" g{self.group_size}"
        if self.method == "ct":
            return f"ct w{int(self.bits)}a16{g}" + ("" if self.sym else " asym")
        return f"{self.method} {int(self.bits)}-bit{g}"


def parse_size(text: str) -> int:
    """'24GiB', '24 GB', '80G', '1.5TiB' -> bytes (GB/G = 10^9; GiB = 2^30)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?)B?\s*", text, flags=re.I)
    if not m:
        raise InputError(f"--vram {text!r}: expected a size such as 24GiB, 80GB or 16G")
    num, unit, binary = float(m.group(1)), m.group(2).upper(), m.group(3)
    power = "KMGT".index(unit) + 1 if unit else 0
    return int(num * (1024 if binary else 1000) ** power)


def _source_dtype_bytes(config: Mapping[str, Any]) -> int:
    name = str(config.get("torch_dtype") or config.get("dtype") or "bfloat16").removeprefix("torch.")
    return int(DTYPE_BYTES.get(name, 2))


def linear_bytes(N: int, K: int, s: Setting, has_bias: bool, dtype_bytes: int) -> int:
    """Bytes of one linear [out N, in K] as the format stores it (bias kept in fp16)."""
    bias = 2 * N if has_bias else 0
    if s.method in ("fp16", "bf16"):
        return N * K * dtype_bytes + (N * dtype_bytes if has_bias else 0)
    g = K if s.group_size == -1 else s.group_size
    G = math.ceil(K / g)
    if s.method == "gptq":
        b = int(s.bits)
        qweight = math.ceil(K * b / 32) * N * 4
        qzeros = G * math.ceil(N * b / 32) * 4
        return qweight + qzeros + G * N * 2 + K * 4 + bias  # + scales fp16 + g_idx int32
    if s.method == "awq":
        return K * (N // 8) * 4 + G * (N // 8) * 4 + G * N * 2 + bias
    if s.method == "exl2":
        # bpw counts codes, scales, group table and permutation (FORMATS.md §3.3); q_scale_max fp16
        return math.ceil(N * K * s.bits / 8) + N * 2 + bias
    if s.method == "ct":
        # compressed-tensors pack-quantized: weight_packed int32 [N, ceil(K b/32)], weight_scale in the
        # model dtype [N, G], weight_zero_point int32 [ceil(N b/32), G] when asymmetric, weight_shape int64 [2]
        b = int(s.bits)
        zp = 0 if s.sym else math.ceil(N * b / 32) * G * 4
        bias = N * dtype_bytes if has_bias else 0
        return N * math.ceil(K * b / 32) * 4 + N * G * dtype_bytes + zp + 16 + bias
    if s.method == "fp8":
        # float-quantized: weight e4m3 [N, K], weight_scale [N, 1] (model dtype), input_scale [1] when static
        bias = N * dtype_bytes if has_bias else 0
        return N * K + N * dtype_bytes + (0 if s.sym else dtype_bytes) + bias
    raise InputError(f"unknown method {s.method!r}")


def weight_bytes(config: Mapping[str, Any], s: Setting, arch: Arch | None = None,
                 head_bits: int | None = None) -> dict[str, int]:
    arch = arch or get_arch(config)
    if s.method == "gguf":  # llama.cpp's per-tensor type mix (formats/gguf_mix.py)
        from .formats.gguf_mix import gguf_weight_bytes

        return gguf_weight_bytes(config, s.gguf_type, arch)
    d = arch.dims(config)
    n_layers = arch.num_layers(config)
    dt = _source_dtype_bytes(config)
    vocab = int(config["vocab_size"])
    layers = sum(n * _layer_bytes(arch, config, i, s, dt) for i, n in _layer_kinds(arch, config))
    embed = vocab * d["hidden"] * dt
    head = 0
    if not arch.is_tied(config):
        if s.method == "exl2" and head_bits:
            head = linear_bytes(vocab, d["hidden"], Setting("exl2", head_bits), False, dt)
        else:
            head = vocab * d["hidden"] * dt
    return {
        "layers": layers,
        "embeddings": embed,
        "lm_head": head,
        "final_norm": d["hidden"] * dt,
        "total": layers + embed + head + d["hidden"] * dt,
    }


def _layer_kinds(arch: Arch, config: Mapping[str, Any]) -> list[tuple[int, int]]:
    """``(representative layer, count)`` per kind of layer (dense, sparse): layers of a kind are alike."""
    kinds: dict[bool, list[int]] = {}
    for i in range(arch.num_layers(config)):
        kinds.setdefault(arch.is_sparse_layer(config, i), []).append(i)
    return [(idx[0], len(idx)) for idx in kinds.values()]


def _norm_width(name: str, d: Mapping[str, int]) -> int:
    if re.search(r"[qk]_norm$", name):
        return d["head_dim"]
    if name.endswith("q_a_layernorm"):
        return d["q_lora"]
    if name.endswith("kv_a_layernorm"):
        return d["kv_lora"]
    return d["hidden"]


def _layer_bytes(arch: Arch, config: Mapping[str, Any], i: int, s: Setting, dt: int) -> int:
    """Bytes of decoder layer ``i``: its linears as the format stores them, routers and norms dense."""
    d = arch.dims(config)
    total = sum(linear_bytes(*arch.linear_shape(n, config), s, arch.has_bias(n, config), dt)
                for n in arch.layer_linears(config, i))
    if arch.is_sparse_layer(config, i):
        total += sum(math.prod(arch.shape_of(lin, config)) * dt for lin in arch.moe.never_quantized)
    total += sum(numel * dt for _, numel, _ in arch.layer_other_params(config, i))  # sinks, router/expert biases
    return total + sum(_norm_width(n, d) * dt for n in arch.layer_norms)


def parameter_counts(config: Mapping[str, Any], arch: Arch | None = None) -> dict[str, int]:
    """Total parameters, and those active for one token (a Mixture-of-Experts model runs
    ``experts_per_token`` of its routed experts per layer; a dense model runs them all)."""
    arch = arch or get_arch(config)
    d = arch.dims(config)
    vocab = int(config["vocab_size"])
    total = active = vocab * d["hidden"] * (1 if arch.is_tied(config) else 2) + d["hidden"]
    E, k = arch.num_experts(config), arch.experts_per_token(config)
    for i, n in _layer_kinds(arch, config):
        layer = expert = 0
        for name in arch.layer_linears(config, i):
            N, K = arch.linear_shape(name, config)
            numel = N * K + (N if arch.has_bias(name, config) else 0)
            layer += numel
            expert += numel if arch.expert_slot(name) is not None else 0
        if arch.is_sparse_layer(config, i):
            layer += sum(math.prod(arch.shape_of(lin, config)) for lin in arch.moe.never_quantized)
        for _, numel, per_expert in arch.layer_other_params(config, i):  # sinks, router and expert biases
            layer += numel
            expert += numel if per_expert else 0
        layer += sum(_norm_width(nm, d) for nm in arch.layer_norms)
        total += n * layer
        active += n * (layer - expert + (expert * k // E if E else 0))
    return {"total": total, "active": active}


def run_memory(config: Mapping[str, Any], arch: Arch | None = None, compute_bytes: int = 2,
               expert_chunk: int | None = None) -> dict[str, int]:
    """What one quantization run holds per layer (besides activations): the largest decoder layer
    in the compute dtype on the device (one layer resident; the next one prefetched on the host), of
    which only ``expert_chunk`` experts at a time with ``--expert-chunk`` (the rest in host memory),
    and the largest set of Hessians alive at once (fp32: one group's, and in a sparse layer the
    solve workspace of the experts solved together, ``executor/moe.experts_per_solve``, plus the
    all-token Hessian), and
    the layer's results until it is written: a code byte per weight (``QuantResult.codes``, uint8)
    and fp32 scales and int32 zeros per group of 128 (the dequantized weights are the layer's own
    storage: ``LayerContext.place``)."""
    arch = arch or get_arch(config)
    layer_max = device_max = hess_max = results_max = 0
    E = arch.num_experts(config)
    for i, _ in _layer_kinds(arch, config):
        names = arch.layer_linears(config, i)
        experts = sum(math.prod(arch.linear_shape(n, config)) for n in names if arch.expert_slot(n) is not None)
        total = sum(math.prod(arch.linear_shape(n, config)) for n in names)
        layer_max = max(layer_max, total * compute_bytes)
        results_max = max(results_max, sum(N * K + 8 * N * math.ceil(K / 128)
                                           for N, K in (arch.linear_shape(n, config) for n in names)))
        resident = total - experts + (experts * min(expert_chunk, E) // E if expert_chunk and E else experts)
        device_max = max(device_max, resident * compute_bytes)
        for group in arch.layer_groups(config, i):
            if arch.moe is not None and group == [arch.moe.experts.module]:
                from .executor.moe import expert_solve_shapes, experts_per_solve, solve_bytes

                shapes = expert_solve_shapes(arch, config)
                K = shapes[0][1]
                # a batch of experts' solves (Hessians, factors, weights), gate/up then down; the
                # all-token Hessian beside
                hess_max = max(hess_max, experts_per_solve(shapes, E) * solve_bytes(shapes) + 4 * K * K)
            else:
                K = arch.linear_shape(group[0], config)[1]
                hess_max = max(hess_max, 4 * K * K)
    return {"layer_bytes_max": layer_max, "device_layer_bytes_max": device_max, "hessian_bytes_max": hess_max,
            "results_bytes_max": results_max}


def kv_cache_bytes(config: Mapping[str, Any], context: int, batch: int, kv_dtype: str = "fp16",
                   arch: Arch | None = None) -> int:
    arch = arch or get_arch(config)
    d = arch.dims(config)
    if kv_dtype not in DTYPE_BYTES:
        raise InputError(f"--kv-dtype {kv_dtype!r}: expected one of {', '.join(DTYPE_BYTES)}")
    return int(2 * arch.num_layers(config) * d["kv"] * context * batch * DTYPE_BYTES[kv_dtype])


DEFAULT_SETTINGS = [
    Setting("bf16", 16),
    Setting("fp8", 8), Setting("ct", 8, 128), Setting("gptq", 8, 128), Setting("exl2", 6.0), Setting("exl2", 5.0),
    Setting("ct", 4, 128), Setting("awq", 4, 128), Setting("gptq", 4, 128), Setting("exl2", 4.0),
    Setting("gptq", 3, 128), Setting("exl2", 3.0), Setting("exl2", 2.5), Setting("gptq", 2, 64),
    Setting("gguf", 8, gguf_type="Q8_0"), Setting("gguf", 6, gguf_type="Q6_K"), Setting("gguf", 5, gguf_type="Q5_K_M"),
    Setting("gguf", 4, gguf_type="Q4_K_M"),
]


# gptq / rtn into the GPTQ or compressed-tensors format, awq into AWQ GEMM or compressed-tensors,
# fp8 (dynamic: sym) into compressed-tensors; gguf (stacked ffn_*_exps) for the families
# formats/gguf.py writes; exl2 for the models exllamav2 runs (methods/exl2.exllamav2_moe_refusal)
MOE_METHODS = ("bf16", "fp16", "gptq", "ct", "awq", "fp8", "gguf", "exl2")
# experts 3D on disk (GPT-OSS): gptq / rtn into the GPTQ or compressed-tensors format only
FUSED_MOE_METHODS = ("bf16", "fp16", "gptq", "ct")


def effective_bits(config: Mapping[str, Any], s: Setting, arch: Arch) -> float:
    """Bits per quantized weight, overheads included (the quality ordering used for --vram)."""
    kinds = _layer_kinds(arch, config)
    n_params = sum(n * math.prod(arch.linear_shape(nm, config)) for i, n in kinds for nm in arch.layer_linears(config, i))
    if s.method == "gguf":
        return 8 * weight_bytes(config, s, arch)["layers"] / n_params
    dt = _source_dtype_bytes(config)
    b = sum(n * linear_bytes(*arch.linear_shape(nm, config), s, False, dt) for i, n in kinds
            for nm in arch.layer_linears(config, i))
    return 8 * b / n_params


def plan(config: Mapping[str, Any], *, settings: list[Setting] | None = None, context: int = 4096, batch: int = 1,
         kv_dtype: str = "fp16", vram: int | None = None, head_bits: int = 6, overhead: float = 0.0,
         expert_chunk: int | None = None) -> dict[str, Any]:
    """Rows per setting: weights, KV cache, total; ``best``: the highest-quality row within ``vram``."""
    arch = get_arch(config)
    kv = kv_cache_bytes(config, context, batch, kv_dtype, arch)
    rows = []
    settings = settings or DEFAULT_SETTINGS
    if arch.moe is not None:  # what `quantize` writes for Mixture-of-Experts models today
        from .formats.gguf import FAMILY_TO_GGUF
        from .methods.exl2 import exllamav2_moe_refusal

        methods = FUSED_MOE_METHODS if arch.moe.experts.fused_on_disk else MOE_METHODS
        exl2 = exllamav2_moe_refusal(arch, config) is None
        settings = [s for s in settings if s.method in methods and (s.method != "gguf" or arch.name in FAMILY_TO_GGUF)
                    and (s.method != "fp8" or s.sym) and (s.method != "exl2" or exl2)]
    for s in settings:
        w = weight_bytes(config, s, arch, head_bits=head_bits)
        total = w["total"] + kv + overhead
        rows.append({"setting": s.label, "method": s.method, "bits": s.bits, "group_size": s.group_size,
                     "effective_bits": round(effective_bits(config, s, arch), 3), "weights": w["total"],
                     "kv_cache": kv, "total": int(total), "fits": None if vram is None else total <= vram,
                     "detail": w})
    best = None
    if vram is not None:
        fitting = [r for r in rows if r["fits"]]
        best = max(fitting, key=lambda r: r["effective_bits"], default=None)
    return {"family": arch.name, "layers": arch.num_layers(config), "context": context, "batch": batch,
            "kv_dtype": kv_dtype, "vram": vram, "rows": rows, "best": best,
            "parameters": parameter_counts(config, arch), "run": run_memory(config, arch, expert_chunk=expert_chunk)}
