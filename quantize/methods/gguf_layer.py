"""GGUF quantization as a plug-in of the layer loop: every decoder linear to the type llama.cpp's
mix gives it (formats/gguf_mix.py), its bytes chosen

- without calibration: exactly as llama.cpp's reference quantizer chooses them (no forward runs);
- with calibration: on the grid llama.cpp's importance-weighted search picks from the Hessian's
  diagonal (``E[x²] = diag(H)/2``, what an imatrix holds), with the codes then chosen by GPTQ's column
  loop on that fixed grid (act-order, full-Hessian error feedback: ``gptq_on_fixed_grid``). The
  same bytes llama.cpp reads; the rounding sees every input correlation, not only the diagonal.

Mixture-of-Experts: every routed expert's gate/up/down is solved on its own (``ctx.sequential``'s
experts callback, executor/moe.py): with calibration on the grid from its own Hessian (the tokens
routed to it, or the declared fallback), without on llama.cpp's reference rounding; the results
stay 2D per expert and the output format stacks them into ``ffn_*_exps``. An expert solved by RTN
(no statistics) gets llama.cpp's reference bytes.

DeepSeek-V3's ``kv_b_proj`` is written as llama.cpp's converter splits it (formats/gguf.py
``split_kv_b``): ``attn_v_b`` holds kv_b's v rows as they are -- the same inputs (the normalised kv
latent), so with calibration it is GPTQ-solved on kv_b's Hessian; ``attn_k_b`` holds kv_b's k rows
*transposed* per head, so its rows' inputs are q_nope's channels, not kv_b's: no Hessian of ours
applies and it always takes llama.cpp's reference rounding (recorded in the manifest's params,
``reference_rounding``). The layer continues with kv_b re-assembled from both dequantized parts. Every
other DeepSeek linear's GGUF rows are its HF rows (q_a, q_b -- or q_proj without q_lora_rank --, kv_a,
o, the MLPs, experts, shared expert): GPTQ on its own Hessian.

Types outside the K/legacy set we solve (llama.cpp's shape fallbacks Q5_0/Q5_1) are quantized by
gguf-py's reference quantizer; F16/BF16 are cast.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..formats import gguf_blocks, gguf_legacy
from ..formats.gguf import KV_B
from ..formats.gguf_mix import ModelShape, gguf_stem, tensor_type
from . import kquants
from .gptq import gptq_on_fixed_grid, prepare_hessian_inverse
from .grid import QuantSpec, check_weight
from .hessian import HessianAccumulator
from .layer import relative_errors

SOLVED = kquants.QTYPES  # Q8_0, Q4_0, Q4_K, Q5_K, Q6_K
FLOAT = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor as GGUF stores it (rows in the checkpoint's order; the writer permutes q/k)."""

    qtype: str
    raw: Tensor  # uint8 [N, bytes per row]
    W_hat: Tensor  # fp32 [N, K]: what llama.cpp (and gguf-py) dequantize
    solver: str  # "gptq" (Hessian), "reference" (llama.cpp's rounding), "cast", "gguf-py"
    # a linear written as several GGUF tensors (DeepSeek's kv_b: ("k_b", ...), ("v_b", ...)); W_hat is
    # then the whole linear's, and qtype/raw/solver are the last part's
    parts: tuple[tuple[str, "GGUFTensor"], ...] = ()


def _gguf_py(W: Tensor, qtype: str) -> tuple[Tensor, Tensor]:
    import gguf

    t = getattr(gguf.GGMLQuantizationType, qtype)
    raw = gguf.quants.quantize(W.detach().to(torch.float32).cpu().numpy(), t)
    W_hat = gguf.quants.dequantize(raw, t).astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(raw)), torch.from_numpy(W_hat)


def quantize_tensor(W: Tensor, qtype: str, H: Tensor | None = None, *, prepared=None, damp: float = 0.01,
                    name: str = "weight") -> GGUFTensor:
    """``W [N, K]`` as GGUF ``qtype``; with ``H`` (or its ``prepared`` inverse) Hessian-aware."""
    W32 = check_weight(W, name)
    N, K = W32.shape
    if qtype in FLOAT:
        stored = W32.to(FLOAT[qtype])
        return GGUFTensor(qtype, stored.view(torch.uint8).reshape(N, -1).clone(), stored.to(torch.float32), "cast")
    if qtype not in SOLVED:
        if qtype in gguf_legacy.LEGACY and (H is not None or prepared is not None):
            return _legacy_on_grid(W32, qtype, H, prepared, damp, name)
        raw, W_hat = _gguf_py(W32, qtype)
        return GGUFTensor(qtype, raw, W_hat, "gguf-py")
    if H is None and prepared is None:
        grid = kquants.block_grid(W32, qtype)
        codes = kquants.quantize_codes(W32, grid)
        return GGUFTensor(qtype, gguf_blocks.pack(codes, grid, qtype), kquants.dequantize(codes, grid), "reference")
    if H is None:
        raise ValueError(f"{name}: the Hessian-aware path needs H (its diagonal is the importance)")
    prepared = prepared or prepare(H, damp, name)
    grid = kquants.block_grid(W32, qtype, importance(H))

    def column(w: Tensor, k: int):
        codes = kquants.quantize_codes(w.unsqueeze(1), grid, columns=k)
        return codes[:, 0].to(torch.float32), kquants.dequantize(codes, grid, columns=k)[:, 0]

    codes, W_hat, _ = gptq_on_fixed_grid(W32, prepared, column, name=name)
    codes = codes.to(torch.uint8)
    return GGUFTensor(qtype, gguf_blocks.pack(codes, grid, qtype), kquants.dequantize(codes, grid), "gptq")


def quantize_kv_b(W: Tensor, config, layer: int, ftype: str, shape: ModelShape, H: Tensor | None = None, *,
                  prepared=None, damp: float = 0.01, name: str = "kv_b_proj") -> GGUFTensor:
    """DeepSeek-V3's ``kv_b_proj`` ``[H*(nope+v), kv_lora]`` as llama.cpp's ``attn_k_b`` / ``attn_v_b``
    (module docstring): v_b on ``H`` when given, k_b (transposed: other inputs) always by llama.cpp's
    reference rounding; ``W_hat`` is kv_b re-assembled from both."""
    from ..formats.gguf import join_kv_b, mla_dims, split_kv_b

    heads, nope, v, r = mla_dims(config)
    k_b, v_b = split_kv_b(check_weight(W, name), config)
    tk = tensor_type(f"blk.{layer}.attn_k_b.weight", nope, ftype, shape)
    tv = tensor_type(f"blk.{layer}.attn_v_b.weight", r, ftype, shape)
    rk = quantize_tensor(k_b.reshape(heads * r, nope), tk, name=name + " (k_b)")
    rv = quantize_tensor(v_b.reshape(heads * v, r), tv, H, prepared=prepared, damp=damp, name=name + " (v_b)")
    W_hat = join_kv_b(rk.W_hat, rv.W_hat, config)
    return GGUFTensor(rv.qtype, rv.raw, W_hat, rv.solver, parts=(("k_b", rk), ("v_b", rv)))


def _legacy_on_grid(W32: Tensor, qtype: str, H: Tensor | None, prepared, damp: float, name: str) -> GGUFTensor:
    """Q5_0/Q5_1/Q4_1 (llama.cpp's shape fallbacks): GPTQ on the grid of the reference bytes."""
    prepared = prepared or prepare(H, damp, name)
    N, K = W32.shape
    ref = gguf_legacy.reference(W32, qtype)
    d, m = gguf_legacy.grid(ref, qtype, N, K)

    def column(w: Tensor, k: int):
        return gguf_legacy.round_column(w, d[:, k // gguf_legacy.BLOCK], m[:, k // gguf_legacy.BLOCK], qtype)

    codes, _, _ = gptq_on_fixed_grid(W32, prepared, column, name=name)
    raw = gguf_legacy.repack(ref, codes, qtype)
    return GGUFTensor(qtype, torch.from_numpy(raw), gguf_legacy.dequantize(raw, qtype), "gptq")


def prepare(H: Tensor, damp: float, name: str):
    """The inverse Hessian factor GPTQ rounds on a fixed grid with: act-order (the grid does not
    depend on the order), static groups (the grid is the format's)."""
    return prepare_hessian_inverse(H, QuantSpec(act_order=True, static_groups=True, damp=damp), name=name)


def importance(H: Tensor) -> Tensor:
    """``E[x²]`` per input column, llama.cpp's imatrix value (``in_sum2 / counts``): ``diag(H)/2``
    for our ``H = 2/n XᵀX``."""
    return (torch.diagonal(H).to(torch.float32) / 2).clamp_min(0.0).cpu()


class GGUFMethod:
    """Layer plug-in: each decoder linear to its GGUF type (Hessian-aware with calibration data)."""

    name = "gguf"
    solves_experts = True  # sparse layers: ctx.sequential hands each expert's linears to ``quantize``

    def __init__(self, ftype: str, shape: ModelShape, *, calibrated: bool, damp: float = 0.01,
                 imatrix: bool = False, moe=None):
        from ..executor.moe import MoEOptions

        self.ftype = ftype
        self.shape = shape
        self.calibrated = calibrated
        self.damp = damp
        self.moe = moe or MoEOptions()
        # keep each linear's Σx² and token count in the layer metrics (resume-safe, like every
        # per-layer result), for llama.cpp's imatrix file
        self.imatrix = imatrix

    def process_layer(self, ctx) -> Any:
        from ..executor.context import LayerResult

        results: dict[str, GGUFTensor] = {}
        metrics: dict[str, dict] = {"types": {}, "rel_error": {}, "reference_rel_error": {}}
        groups = {g[0]: g for g in ctx.groups}
        sums: dict[str, tuple[list[float], int | None]] = {}  # imatrix: Σx² per input column, tokens

        def solve(first: str, acc: HessianAccumulator | None) -> None:
            H = acc.H if acc is not None and acc.n > 0 else None
            quantize(groups[first], H, acc.n if acc is not None else 0)

        def quantize(names: list[str], H: Tensor | None, n: int | None = None) -> None:
            """The linears ``names`` sharing the input Hessian ``H`` (None: llama.cpp's rounding);
            ``n``: the tokens behind ``H`` (None for an expert: counted from the coverage record)."""
            if H is not None and not bool((torch.diagonal(H) > 0).any()):
                H = None  # no signal reached these inputs (an expert routed no token)
            prepared = prepare(H, self.damp, f"{ctx.prefix}{names[0]} Hessian") if H is not None else None
            for name in names:
                W = ctx.weight(name)
                if ctx.arch.name == "deepseek_v3" and name == KV_B:
                    r = quantize_kv_b(W, ctx.streamer.reader.config, ctx.index, self.ftype, self.shape, H,
                                      prepared=prepared, name=ctx.prefix + name)
                    metrics["types"].update({f"self_attn.{role}_proj": t.qtype for role, t in r.parts})
                else:
                    qtype = tensor_type(f"blk.{ctx.index}.{gguf_stem(ctx.arch, name)}.weight", W.shape[1], self.ftype,
                                        self.shape)
                    r = quantize_tensor(W, qtype, H, prepared=prepared, name=ctx.prefix + name)
                    metrics["types"][name] = qtype
                ctx.set_weight(name, r.W_hat)
                results[name] = r
                if H is not None:
                    if r.parts:
                        ref = quantize_kv_b(W, ctx.streamer.reader.config, ctx.index, self.ftype, self.shape, None,
                                            name=ctx.prefix + name).W_hat
                    else:
                        ref = quantize_tensor(W, r.qtype, name=ctx.prefix + name).W_hat
                    errs = relative_errors(W, H, ours=r.W_hat, reference=ref)
                    metrics["rel_error"][name], metrics["reference_rel_error"][name] = errs["ours"], errs["reference"]
                if self.imatrix:  # E[x²] now, times the tokens once they are known
                    sums[name] = (importance(H).double().tolist() if H is not None else [0.0] * W.shape[1], n)

        experts = ctx.experts_module
        if not self.calibrated:
            for first, names in groups.items():
                if first == experts:  # every expert on llama.cpp's reference rounding
                    E = ctx.arch.num_experts(ctx.streamer.reader.config)
                    for e in range(E):
                        quantize([ctx.arch.expert_linear(e, j) for j in range(3)], None)
                else:
                    quantize(names, None)
        else:
            accs = {first: HessianAccumulator() for first in groups}
            ctx.sequential(list(groups), lambda first, x: accs[first].add(x), lambda first: solve(first, accs.pop(first)),
                           experts=lambda jobs: [quantize(names, H) for names, H in jobs], moe=self.moe)
        if self.imatrix and sums:
            metrics["imatrix"] = {ctx.prefix + name: [[v * n for v in s], n]
                                  for name, (s, n) in _expert_counts(ctx, sums).items()}
        if not metrics["rel_error"]:
            del metrics["rel_error"], metrics["reference_rel_error"]
        return LayerResult(results, metrics)

    def process_head(self, streamer) -> Any:
        """An untied head, Hessian-aware on the final-norm outputs of the quantized model (after the
        last layer), as for the decoder linears; a tied head is the embedding (rounded as llama.cpp
        rounds it, at compile time), and without calibration the compile step rounds it too."""
        from ..executor.context import LayerResult

        arch = streamer.arch
        if not self.calibrated or self.shape.tied:
            return LayerResult({}, {})
        W = streamer.reader.get(arch.lm_head_path + ".weight").float()
        qtype = tensor_type("output.weight", W.shape[1], self.ftype, self.shape)
        if qtype in FLOAT:
            return LayerResult({}, {})
        H = streamer.head_hessian()
        if H is None:
            return LayerResult({}, {})
        H = H.to(torch.float32).cpu()
        r = quantize_tensor(W, qtype, H, damp=self.damp, name=arch.lm_head_path)
        ref = quantize_tensor(W, qtype, name=arch.lm_head_path).W_hat
        errs = relative_errors(W, H, ours=r.W_hat, reference=ref)
        return LayerResult({arch.lm_head_path: r}, {"type": qtype, "rel_error": errs["ours"],
                                                     "reference_rel_error": errs["reference"]})


def _expert_counts(ctx, sums: dict[str, tuple[list[float], int | None]]) -> dict[str, tuple[list[float], int]]:
    """``sums`` with every expert's token count filled in from the layer's coverage record: the
    tokens its Hessian came from (routed: those routed to it; ``all`` or the all-token fallback:
    every token; RTN: none), as llama-imatrix counts an expert's routed tokens."""
    record = ctx.extra_metrics.get("moe")
    out = {}
    for name, (s, n) in sums.items():
        if n is None:
            slot = ctx.arch.expert_slot(name)
            e = slot[0] if slot is not None else 0
            how = "rtn" if not any(s) else ("routed" if record["mode"] == "routed" and e not in record["fallback_experts"]
                                             else "all")
            n = {"rtn": 0, "routed": record["seen"][e], "all": record["tokens"]}[how]
        out[name] = (s, int(n))
    return out
