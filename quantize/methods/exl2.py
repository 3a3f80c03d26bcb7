"""EXL2 (exllamav2) as pure functions: candidate options, the exact cost model, and GPTQ with
per-group bit widths and the format's 4-bit scale codes (FORMATS.md §3.3, §3.5).

A :class:`QParams` splits the ``K`` input channels of one linear, *in act-order* (descending
``diag H``), into consecutive regions of decreasing bit width: the most salient inputs get the
most bits. Each region is cut into groups of ``group_size`` rows; every group has one fp16
``q_scale_max`` and one 4-bit scale code per output column. Codes are symmetric with a fixed zero
point ``2^(b-1)``.

Quantizing one linear::

    prepared = prepare_exl2_hessian(H)                 # act-order perm, 0.12 damping, Cholesky
    r = exl2_quantize(W, qp, prepared=prepared)        # Exl2Result; r.W_hat is what the loader computes

``r.W_hat`` is bit-identical to ``formats.exl2.dequantize_exl2(formats.exl2.pack_exl2(r))``: the
scale and every fake-quantized value go through the loader's fp16 arithmetic (§3.5/§3.7), so GPTQ's
error feedback sees exactly the weights the checkpoint will produce.

Costs: :func:`storage_bits` is the exact size in bits of the tensors written for one linear
(``q_weight`` with word padding, ``q_scale``, ``q_scale_max``, ``q_groups``, ``q_invperm``); the
optimizer budgets with it, so the bpw computed from the files is the bpw the optimizer planned.
:func:`exllamav2_total_bits` is exllamav2's own ``QParams.total_bits`` (recorded in
``measurement.json`` for compatibility).

Slots: the optimizer picks one option row per attention block and per MLP block; a Mixture-of-Experts
layer's routed experts are one slot (``block_sparse_moe``, the MLP rows shared by all its experts),
for the families exllamav2 loads (``EXL2_MOE_FAMILIES``; :func:`exllamav2_moe_refusal` says why any
other MoE model is refused).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import Tensor

from ..errors import InputError, RuntimeFault
from .gptq import PreparedHessian, prepare_hessian_inverse, resolve_prepared
from .grid import QuantSpec, check_weight

BIT_WIDTHS = (2, 3, 4, 5, 6, 8)  # exllamav2 kernels have no 7-bit path
SCALE_BITS = 4
EXL2_DAMP = 0.12  # exllamav2 AdaptiveGPTQ damping, fraction of mean(diag H)
ERR_NORM = 3.5  # exponent of the scale search's error |q·s − w|^3.5
P_GRID = tuple(0.70 + i * (1.20 - 0.70) / 96 for i in range(97))  # q_scale_max multipliers tried
MAX_IN_FEATURES = 65536  # the loader casts perm/invperm to int16 (read as uint16)
PAD_COLUMNS = 32  # output columns are padded to a multiple of 32
_SEARCH_CHUNK = 1 << 24  # elements per chunk of the scale search ([p, rows, N])
_COARSE_STEP = 8  # scale search: every 8th multiplier first, then the neighbours of the best


# -- candidate options -------------------------------------------------------------------------


@dataclass(frozen=True)
class QParams:
    """One EXL2 bit allocation for one linear: regions ``(bits[i], bits_prop[i], group_size[i])``.

    ``bits`` strictly decreasing (stored groups must have non-increasing widths, §3.6).
    """

    bits: tuple[int, ...]
    bits_prop: tuple[float, ...]
    group_size: tuple[int, ...]
    scale_bits: int = SCALE_BITS

    def __post_init__(self):
        if not (len(self.bits) == len(self.bits_prop) == len(self.group_size) >= 1):
            raise ValueError("QParams: bits, bits_prop and group_size need one entry per region")
        if any(b not in BIT_WIDTHS for b in self.bits):
            raise ValueError(f"QParams: bit widths must be among {BIT_WIDTHS}, got {self.bits}")
        if any(a <= b for a, b in zip(self.bits, self.bits[1:])):
            raise ValueError(f"QParams: bit widths must be strictly decreasing, got {self.bits}")
        for b, g in zip(self.bits, self.group_size):
            if g < 1 or g % (16 if b == 2 else 32):
                raise ValueError(f"QParams: group size {g} for {b}-bit rows is not a multiple of {16 if b == 2 else 32}")
        if self.scale_bits != SCALE_BITS:
            raise ValueError("QParams: EXL2 scale codes are 4-bit (scale_bits 4)")
        if abs(sum(self.bits_prop) - 1.0) > 1e-6 or any(p <= 0 for p in self.bits_prop):
            raise ValueError(f"QParams: proportions must be positive and sum to 1, got {self.bits_prop}")

    @property
    def desc(self) -> str:
        """exllamav2's description, e.g. ``0.05:3b_64g/0.95:2b_64g s4`` (unique per option)."""
        regions = "/".join(f"{p:g}:{b}b_{g}g" for b, p, g in zip(self.bits, self.bits_prop, self.group_size))
        return f"{regions} s{self.scale_bits}"

    def to_dict(self) -> dict[str, Any]:
        """The ``measurement.json`` form (group sizes keyed by bit width, as strings in JSON)."""
        return {"group_size": {str(b): g for b, g in zip(self.bits, self.group_size)}, "bits": list(self.bits),
                "bits_prop": list(self.bits_prop), "scale_bits": self.scale_bits}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "QParams") -> "QParams":
        try:
            bits = tuple(int(b) for b in d["bits"])
            gs = d["group_size"]
            if isinstance(gs, Mapping):
                gmap = {int(k): int(v) for k, v in gs.items()}
                group_size = tuple(gmap[b] for b in bits)
            elif isinstance(gs, (list, tuple)):
                group_size = tuple(int(g) for g in gs)
            else:
                group_size = (int(gs),) * len(bits)
            return cls(bits, tuple(float(p) for p in d["bits_prop"]), group_size, int(d.get("scale_bits", SCALE_BITS)))
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(f"{source}: not a valid EXL2 QParams entry ({' '.join(str(e).split())}); measure again") from None

    def groups(self, K: int) -> list[tuple[int, int]]:
        """``[(bits, rows), ...]`` per group in storage order for ``K`` input rows.

        Region ``i`` gets ``ceil(min(K·p_i, remaining) / g_i)`` groups (exllamav2's arithmetic; a
        negative count, possible only when ``K`` is smaller than a group, is taken as 0); only the
        very last group may be short.
        """
        out: list[tuple[int, int]] = []
        remaining, left = K, K
        for b, p, g in zip(self.bits, self.bits_prop, self.group_size):
            n = max(0, math.ceil(min(K * p, remaining) / g))
            remaining -= n * g
            for _ in range(n):
                rows = min(g, left)
                if rows <= 0:
                    raise RuntimeFault(f"QParams {self.desc}: empty group for K={K}")  # unreachable by construction
                out.append((b, rows))
                left -= rows
        if left != 0:
            raise RuntimeFault(f"QParams {self.desc}: groups cover {K - left} of {K} rows")
        return out


def _qp(group_size: int | list[int], bits: list[int], props: list[float]) -> QParams:
    gs = tuple(group_size) if isinstance(group_size, list) else (group_size,) * len(bits)
    return QParams(tuple(bits), tuple(props), gs)


def _rows(table: list[tuple], roles: tuple[str, ...]) -> tuple[dict[str, QParams], ...]:
    return tuple(dict(zip(roles, (_qp(*spec) for spec in row))) for row in table)


ATTN_ROLES = ("q", "k", "v", "o")
MLP_ROLES = ("gate", "up", "down")

_A32 = (64, [3, 2], [0.05, 0.95])
_A91 = (64, [3, 2], [0.1, 0.9])
_B43 = (128, [4, 3], [0.1, 0.9])
# exllamav2 qparams_attn (FORMATS.md §3.3): 19 rows of (q, k, v, o)
ATTN_OPTIONS = _rows([
    (_A32, _A32, _A32, _A32),
    (_A91, _A91, (64, [3, 2], [0.25, 0.75]), _A91),
    (_A91, _A91, _B43, _A91),
    (_A91, _A91, _B43, _B43),
    (_B43, _B43, _B43, _B43),
    (_B43, _B43, (64, [4, 3], [0.1, 0.9]), _B43),
    ((128, [4], [1]),) * 4,
    ((128, [4], [1]), (128, [4], [1]), (64, [4], [1]), (128, [4], [1])),
    ((64, [4], [1]), (64, [4], [1]), (32, [4], [1]), (64, [4], [1])),
    ((32, [4], [1]),) * 4,
    ((128, [5, 4], [0.1, 0.9]), (128, [5, 4], [0.1, 0.9]), (64, [5, 4], [0.1, 0.9]), (128, [5, 4], [0.1, 0.9])),
    ((64, [5, 4], [0.1, 0.9]), (64, [5, 4], [0.1, 0.9]), (32, [5, 4], [0.1, 0.9]), (64, [5, 4], [0.1, 0.9])),
    ((64, [5, 4], [0.1, 0.9]), (64, [5, 4], [0.1, 0.9]), (64, [5], [1]), (64, [5, 4], [0.1, 0.9])),
    ((32, [5, 4], [0.1, 0.9]), (32, [5, 4], [0.1, 0.9]), (32, [5], [1]), (32, [5, 4], [0.1, 0.9])),
    ((128, [6, 5], [0.1, 0.9]), (128, [6, 5], [0.1, 0.9]), (128, [6], [1]), (128, [6, 5], [0.1, 0.9])),
    ((32, [6, 5], [0.1, 0.9]), (32, [6, 5], [0.1, 0.9]), (32, [6], [1]), (32, [6, 5], [0.1, 0.9])),
    ((128, [6], [1]),) * 4,
    ((32, [6], [1]), (32, [6], [1]), (32, [8], [1]), (32, [6], [1])),
    ((128, [8], [1]),) * 4,
], ATTN_ROLES)

# exllamav2 qparams_mlp (FORMATS.md §3.3): 17 rows of (gate, up, down)
MLP_OPTIONS = _rows([
    (_A32, _A32, ([32, 64, 64], [6, 3, 2], [0.05, 0.2, 0.75])),
    (_A91, (64, [3, 2], [0.25, 0.75]), ([32, 64, 64], [6, 3, 2], [0.05, 0.2, 0.75])),
    (_A91, (64, [3, 2], [0.3, 0.7]), (32, [5, 3], [0.05, 0.95])),
    (_A91, (64, [3, 2], [0.3, 0.7]), (32, [5, 4], [0.05, 0.95])),
    (_B43, (128, [4, 3], [0.25, 0.75]), ([32, 128, 128], [8, 4, 3], [0.05, 0.1, 0.85])),
    ((32, [4, 3], [0.1, 0.9]), (32, [4, 3], [0.25, 0.75]), ([32, 32, 32], [8, 4, 3], [0.05, 0.1, 0.85])),
    ((32, [4, 3], [0.1, 0.9]), (32, [4, 3], [0.25, 0.75]), ([32, 128], [8, 4], [0.05, 0.95])),
    ((128, [4], [1]), (32, [4], [1]), ([32, 128], [8, 4], [0.05, 0.95])),
    ((32, [4], [1]), (32, [4], [1]), ([32, 32], [8, 4], [0.05, 0.95])),
    ((128, [5, 4], [0.1, 0.9]), (128, [5, 4], [0.25, 0.75]), ([32, 128, 128], [8, 5, 4], [0.05, 0.1, 0.85])),
    ((32, [5, 4], [0.1, 0.9]), (32, [5, 4], [0.25, 0.75]), ([32, 32, 32], [8, 5, 4], [0.05, 0.1, 0.85])),
    ((128, [6, 5], [0.1, 0.9]), (128, [6, 5], [0.25, 0.75]), ([32, 128, 128], [8, 6, 5], [0.05, 0.1, 0.85])),
    ((32, [6, 5], [0.1, 0.9]), (32, [6, 5], [0.25, 0.75]), ([32, 32, 32], [8, 6, 5], [0.05, 0.1, 0.85])),
    ((128, [6], [1]), (128, [6], [1]), ([32, 128], [8, 6], [0.05, 0.95])),
    ((128, [8, 6], [0.1, 0.9]), (128, [8, 6], [0.1, 0.9]), (128, [8, 6], [0.15, 0.85])),
    ((128, [8, 6], [0.1, 0.9]), (128, [8, 6], [0.1, 0.9]), (128, [8], [1])),
    ((128, [8], [1]),) * 3,
], MLP_ROLES)

# exllamav2 qparams_headoptions: lm_head allocation per --head-bits
HEAD_OPTIONS: dict[int, QParams] = {
    2: _qp(32, [4, 2], [0.3, 0.7]),
    3: _qp(32, [4, 3], [0.15, 0.85]),
    4: _qp(32, [6, 4], [0.15, 0.85]),
    5: _qp(128, [6, 5], [0.15, 0.85]),
    6: _qp(128, [8, 6], [0.15, 0.85]),
    8: _qp(128, [8], [1.0]),
}

# Module groups ("slots") the optimizer assigns one option row to, and their option tables. A
# Mixture-of-Experts layer's routed experts are one slot, ``block_sparse_moe`` (exllamav2's key for
# every MoE family): one MLP option row for all its experts (gate/up/down of each expert take the
# row's gate/up/down), as exllamav2's measure_moe_mlp / quant_moe_mlp apply ``strat["w1"|"w3"|"w2"]``.
MOE_SLOT = "block_sparse_moe"
SLOT_OPTIONS: dict[str, tuple[dict[str, QParams], ...]] = {"self_attn": ATTN_OPTIONS, "mlp": MLP_OPTIONS,
                                                           MOE_SLOT: MLP_OPTIONS}
# measurement.json keys of an MoE slot's options (exllamav2 measure.py: "w1", "w3", "w2" for every family)
MOE_LEAVES: dict[str, str] = {"gate": "w1", "up": "w3", "down": "w2"}

# Mixture-of-Experts families exllamav2 loads (exllamav2/architecture.py, snapshot da07fac:
# ``MixtralForCausalLM`` and ``Qwen3MoeForCausalLM`` set ``is_moe``; ExLlamaV2MoEMLP reads
# ``{mlp_gate|mlp_up|mlp_down}`` = ``block_sparse_moe.experts.*.w1|w3|w2`` resp.
# ``mlp.experts.*.gate_proj|up_proj|down_proj`` and the router ``mlp_expert_gate`` unquantized).
# Its other MoE archs (DBRX, GemMoE) are not in our table; Qwen2-MoE, DeepSeek, GPT-OSS and Llama-4
# are not in exllamav2's.
EXL2_MOE_FAMILIES = ("mixtral", "qwen3_moe")

# Role of a linear (by its leaf name) in the option rows. Fused projections (Phi-3 ``qkv_proj``,
# ``gate_up_proj``) are quantized as one matrix here (exllamav2 splits them into per-projection
# keys): they take the q (resp. up) column, the larger/more generous of the parts they fuse.
LINEAR_ROLES: dict[str, str] = {
    "q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "qkv_proj": "q",
    "gate_proj": "gate", "up_proj": "up", "down_proj": "down", "gate_up_proj": "up",
}


def linear_slot(rel_name: str) -> tuple[str, str]:
    """``("self_attn", "q")`` for ``"self_attn.q_proj"``: the linear's slot and role."""
    slot, _, leaf = rel_name.rpartition(".")
    if slot not in SLOT_OPTIONS or leaf not in LINEAR_ROLES:
        raise InputError(f"EXL2: no candidate options for linear {rel_name!r} (known slots {sorted(SLOT_OPTIONS)}, "
                         f"projections {sorted(LINEAR_ROLES)})")
    return slot, LINEAR_ROLES[leaf]


def slot_linears(arch) -> dict[str, list[str]]:
    """Layer linears grouped by slot, in execution order: ``{"self_attn": [...], "mlp": [...]}``."""
    out: dict[str, list[str]] = {}
    for name in arch.linear_names():
        out.setdefault(linear_slot(name)[0], []).append(name)
    return out


def layer_slots(arch, config: Mapping[str, Any], i: int) -> dict[str, list[tuple[str, str]]]:
    """Layer ``i``'s linears by slot with their roles, execution order: ``{"self_attn": [(linear,
    role), ...], "mlp" | "block_sparse_moe": [...]}``. In a sparse layer every routed expert's
    gate/up/down (on-disk names) is in the ``block_sparse_moe`` slot with role gate/up/down."""
    out: dict[str, list[tuple[str, str]]] = {}
    for name in arch.layer_linears(config, i):
        slot = arch.expert_slot(name)
        if slot is not None:
            out.setdefault(MOE_SLOT, []).append((name, MLP_ROLES[slot[1]]))
        else:
            s, role = linear_slot(name)
            out.setdefault(s, []).append((name, role))
    return out


def option_key(slot: str, linear: str, role: str) -> str:
    """The key of ``linear``'s options in a measurement entry: its leaf name (``q_proj``), or for
    an MoE slot exllamav2's ``w1``/``w3``/``w2`` (one per role, shared by every expert)."""
    return MOE_LEAVES[role] if slot == MOE_SLOT else linear.rpartition(".")[2]


def exllamav2_moe_refusal(arch, config: Mapping[str, Any]) -> str | None:
    """Why exllamav2 cannot run this Mixture-of-Experts model as transformers does (None: it can).

    exllamav2 (model.py) builds an ``ExLlamaV2MoEMLP`` for every layer of an ``is_moe`` arch, and
    its forward (moe_mlp.py) takes softmax -> top-k -> always renormalises the k weights; its
    Qwen3-MoE attention has no q/k/v bias (``attention_bias_qkv`` False)."""
    if arch.moe is None:
        return None
    if arch.name not in EXL2_MOE_FAMILIES:
        alts = ("`quantize gptq` or `quantize rtn`" if arch.moe.experts.fused_on_disk
                else "`quantize gptq`, `quantize awq` or `quantize gguf`")
        return (f"exllamav2 does not load {arch.name} Mixture-of-Experts models (its MoE architectures: "
                f"MixtralForCausalLM, Qwen3MoeForCausalLM), so `quantize exl2` does not write them; use {alts}")
    dense = [i for i in range(arch.num_layers(config)) if not arch.is_sparse_layer(config, i)]
    if dense:
        return (f"layers {dense} are dense (mlp_only_layers / decoder_sparse_step), but exllamav2 makes every layer "
                f"of an MoE model sparse; use `quantize gptq`, `quantize awq` or `quantize gguf`")
    if arch.name == "qwen3_moe" and not config.get("norm_topk_prob", False):
        return ("norm_topk_prob is false, but exllamav2 always renormalises the top-k routing weights, so it would "
                "compute another model; use `quantize gptq`, `quantize awq` or `quantize gguf`")
    if arch.name == "qwen3_moe" and config.get("attention_bias", False):
        return ("attention_bias is true, but exllamav2's Qwen3-MoE attention has no q/k/v/o bias; "
                "use `quantize gptq`, `quantize awq` or `quantize gguf`")
    return None


# -- cost model --------------------------------------------------------------------------------


def padded_columns(N: int) -> int:
    return -(-N // PAD_COLUMNS) * PAD_COLUMNS


def storage_bits(qp: QParams, K: int, N: int) -> int:
    """Exact bits of the tensors written for one ``[N, K]`` linear (bias excluded).

    ``q_weight`` (each group word-aligned, last group ceil-ed; columns padded to ``Np``) +
    ``q_scale`` (4 bits per group and padded column) + ``q_scale_max`` (fp16 per group) +
    ``q_groups`` (two int16 per group) + ``q_invperm`` (int32 per input row).
    """
    Np = padded_columns(N)
    groups = qp.groups(K)
    words = sum(-(-rows * b // 32) for b, rows in groups)
    G = len(groups)
    return words * 32 * Np + G * Np * 4 + G * 16 + G * 32 + K * 32


def exllamav2_total_bits(qp: QParams, K: int, N: int, bias: bool = False) -> int:
    """exllamav2 ``QParams.total_bits(shape=[K, N])`` (FORMATS.md §3.3), including its bias term."""
    groups = qp.groups(K)
    G = len(groups)
    bits = sum(rows * N * b for b, rows in groups) + G * 16 + G * 32 + G * N * qp.scale_bits + K * 32
    return bits + (16 * N if bias else 0)


# -- quantizer ---------------------------------------------------------------------------------


def _fp16(x: Tensor) -> Tensor:
    """Round to fp16 (round-half-even) and back to fp32."""
    return x.to(torch.float16).to(torch.float32)


def fp16_scales(scale_codes: Tensor, scale_max: Tensor) -> Tensor:
    """Per-column scales the loader reconstructs (§3.7): ``fp16(fp16(c²) · fp16(fp16(max) · 2⁻⁸))``.

    ``scale_codes`` are 1..16 (stored code + 1), ``[..., N]``; ``scale_max`` broadcasts against them.
    Every product of two fp16 values is exact in fp32, so one rounding gives the fp16 result.
    """
    m = _fp16(_fp16(scale_max.float()) * 2.0**-8)
    return _fp16(_fp16(scale_codes.float().square()) * m)


def fake_quant_values(codes: Tensor, bits: int, scale: Tensor) -> Tensor:
    """``fp16(fp16(code − 2^(b−1)) · scale)`` as fp32: the dequantized weights of one group."""
    return _fp16((codes.float() - float(1 << (bits - 1))) * scale)


def _search_errors(Wg: Tensor, unit: Tensor, p: Tensor, qzero: int, maxq: int) -> Tensor:
    """``Σ |clamp(rint(W/s), −qzero, maxq−qzero)·s − W|^3.5`` for ``s = unit·p_i``, one value per ``p_i``."""
    err = torch.empty_like(p)
    step = max(1, _SEARCH_CHUNK // max(1, Wg.numel()))
    for i in range(0, p.numel(), step):
        s = unit * p[i : i + step, None, None]  # [P, 1, N]
        d = torch.div(Wg, s).round_().clamp_(-qzero, maxq - qzero).mul_(s).sub_(Wg).abs_()
        err[i : i + step] = d.pow_(ERR_NORM).sum(dim=(1, 2))
    return err


def find_group_scales(Wg: Tensor, bits: int) -> tuple[Tensor, Tensor, Tensor]:
    """Scale search for one group ``Wg [rows, N]`` (fp32, rows in storage order), §3.5.

    Returns ``(scale fp32 [N], scale_codes int [N] in 1..16, scale_max fp16 scalar)`` where
    ``scale`` is exactly what the loader computes from the stored code and ``scale_max``.

    exllamav2 evaluates all 97 multipliers of :data:`P_GRID`; we evaluate every 8th, then the
    ±7 around the best of those (27 of 97, same grid, ~3.5× less work; the error is smooth in ``p``
    on this scale). Ties go to the smaller multiplier.
    """
    maxq = (1 << bits) - 1
    qzero = 1 << (bits - 1)
    base = (Wg.abs().amax(dim=0) + 1e-12) / (maxq / 2)
    smax = base.max()
    codes = torch.clamp(torch.round(16 * torch.sqrt(base / smax)), 1, 16)
    unit = (codes / 16).square() * smax  # [N]
    grid = torch.tensor(P_GRID, dtype=torch.float32, device=Wg.device)
    coarse = list(range(0, len(P_GRID), _COARSE_STEP))
    err_c = _search_errors(Wg, unit, grid[coarse], qzero, maxq)
    i0 = coarse[int(torch.argmin(err_c))]
    fine = [i for i in range(max(0, i0 - _COARSE_STEP + 1), min(len(P_GRID), i0 + _COARSE_STEP)) if i % _COARSE_STEP]
    err = dict(zip(coarse, err_c.tolist()))
    if fine:
        err.update(zip(fine, _search_errors(Wg, unit, grid[fine], qzero, maxq).tolist()))
    best = min(err, key=lambda i: (err[i], i))
    scale_max = (smax * grid[best]).to(torch.float16)
    if not torch.isfinite(scale_max):
        raise RuntimeFault("EXL2: a group's scale overflows fp16 (weights above ~1e6); the weights are corrupt")
    return fp16_scales(codes, scale_max), codes.to(torch.int32), scale_max


@dataclass
class Exl2Result:
    """One quantized linear. Rows of ``codes`` are in storage (act-order) order: stored row ``j``
    holds input channel ``perm[j]``. ``W_hat`` equals the dequantized packed tensors bit for bit."""

    qparams: QParams
    perm: Tensor  # int64 [K]
    codes: Tensor  # int32 [K, N], unsigned codes 0 .. 2^b − 1 of each row's group width
    group_bits: tuple[int, ...]
    group_rows: tuple[int, ...]
    scale_codes: Tensor  # int32 [G, N], 1..16 (stored as code − 1)
    scale_max: Tensor  # fp16 [G]
    W_hat: Tensor  # fp32 [N, K]
    loss: float = 0.0  # Σ over rows of the GPTQ error², = tr(ΔW (H+λI) ΔWᵀ)
    damp_used: float = 0.0
    dead_columns: int = 0

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.W_hat.shape)

    def storage_bits(self) -> int:
        N, K = self.W_hat.shape
        return storage_bits(self.qparams, K, N)


def prepare_exl2_hessian(H: Tensor, damp: float = EXL2_DAMP, *, name: str = "hessian") -> PreparedHessian:
    """Act-order permutation (descending ``diag H``, always on in EXL2), damping ``damp·mean(diag H)``
    (grown 10× on Cholesky failure) and the upper Cholesky factor of ``H⁻¹``; shared by the linears
    reading the same input (q/k/v, gate/up) and by all candidate options of the measurement."""
    return prepare_hessian_inverse(H, QuantSpec(act_order=True, damp=damp), name=name)


def exl2_quantize(W: Tensor, qp: QParams, H: Tensor | None = None, *, prepared: PreparedHessian | None = None,
                  damp: float = EXL2_DAMP, name: str = "weight") -> Exl2Result:
    """GPTQ-quantize ``W [N, K]`` to the EXL2 allocation ``qp`` (FORMATS.md §3.5). Pure; fp32.

    Rows of ``Wp = Wᵀ[perm]`` are processed in act-order, one group at a time (the lazy-update block
    is the group): the group's scales are searched on its current, error-updated rows, every row is
    rounded (half-even) with the loader's fp16 scale, its error is spread over the rest of the group
    through the Cholesky factor ``U``, and after the group over all later rows in one matmul.
    Dead inputs (``diag H == 0``) get weight 0 (their rows are quantized as zeros).
    """
    W32 = check_weight(W, name)
    N, K = W32.shape
    if K > MAX_IN_FEATURES:
        raise InputError(f"{name}: in_features {K} > {MAX_IN_FEATURES}; EXL2 stores the permutation as 16-bit")
    prepared = resolve_prepared(H, prepared, K, True, lambda: prepare_exl2_hessian(H, damp, name=f"{name} Hessian"),
                                name=name)
    U, perm, damp_used, dead = prepared

    device = U.device
    W32 = W32.to(device)
    W32[:, dead.to(device)] = 0.0
    Wp = W32[:, perm].T.contiguous()  # [K, N] in storage order
    Q = torch.empty_like(Wp)
    codes = torch.empty(K, N, dtype=torch.int32, device=device)
    layout = qp.groups(K)
    G = len(layout)
    scale_codes = torch.empty(G, N, dtype=torch.int32, device=device)
    scale_max = torch.empty(G, dtype=torch.float16, device=device)
    loss = Wp.new_zeros(())
    a = 0
    for g, (bits, rows) in enumerate(layout):
        c = a + rows
        maxq, qzero = (1 << bits) - 1, 1 << (bits - 1)
        scale, scale_codes[g], scale_max[g] = find_group_scales(Wp[a:c], bits)
        live = scale > 0  # a column whose scale underflowed fp16 is all zeros: code qzero (= 0.0)
        denom = torch.where(live, scale, torch.ones_like(scale))
        U1 = U[a:c, a:c]
        W1 = Wp[a:c]  # view: updated in place
        E = torch.empty_like(W1)
        for i in range(rows):
            w = W1[i]
            q = torch.clamp(torch.round(w / denom) + qzero, 0, maxq)
            q = torch.where(live, q, torch.full_like(q, qzero))
            v = fake_quant_values(q, bits, scale)
            Q[a + i] = v
            codes[a + i] = q.to(torch.int32)
            e = (w - v) / U1[i, i]
            E[i] = e
            if i + 1 < rows:
                W1[i + 1 :].addr_(U1[i, i + 1 :], e, alpha=-1.0)
        loss += E.square().sum()
        if c < K:
            Wp[c:].addmm_(U[a:c, c:].T, E, alpha=-1.0)
        a = c

    W_hat = torch.empty(N, K, dtype=torch.float32, device=device)
    W_hat[:, perm] = Q.T
    return Exl2Result(
        qparams=qp, perm=perm.to(torch.int64), codes=codes, group_bits=tuple(b for b, _ in layout),
        group_rows=tuple(r for _, r in layout), scale_codes=scale_codes, scale_max=scale_max, W_hat=W_hat,
        loss=float(loss), damp_used=float(damp_used), dead_columns=int(dead.sum()),
    )


def exl2_rtn(W: Tensor, qp: QParams, perm: Tensor | None = None, *, name: str = "weight") -> Exl2Result:
    """Round-to-nearest on the EXL2 grid: :func:`exl2_quantize` with ``U = I`` (same regions, same
    scale search, no error feedback). ``perm``: the storage order (pass GPTQ's act-order so that the
    regions hold the same inputs, for the manifest's GPTQ-vs-RTN error); None: the inputs' own order
    (an expert no calibration token reached: no Hessian, no salience order)."""
    K = W.shape[1]
    order = torch.arange(K) if perm is None else perm.to(torch.int64).cpu()
    prepared = PreparedHessian(torch.eye(K, device=W.device), order.to(W.device), 0.0,
                               torch.zeros(K, dtype=torch.bool))
    return exl2_quantize(W, qp, prepared=prepared, name=name)


def output_rel_error(ref: Tensor, out: Tensor, seq_len: int) -> list[float]:
    """Per calibration row: ``‖out − ref‖_F / ‖ref‖_F`` over the row's ``[seq_len, hidden]`` block
    (exllamav2's measurement metric, before ``accuracy = 1 − mean``)."""
    ref = ref.reshape(-1, seq_len, ref.shape[-1]).float()
    out = out.reshape(-1, seq_len, out.shape[-1]).float()
    num = torch.linalg.vector_norm(out - ref, dim=(1, 2))
    den = torch.linalg.vector_norm(ref, dim=(1, 2)).clamp_min(1e-30)
    return (num / den).tolist()
