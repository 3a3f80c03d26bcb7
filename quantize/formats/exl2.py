"""The EXL2 checkpoint format (exllamav2; FORMATS.md §3.6–§3.10): packing, dequantization, the
loader's checks, config entries, and :class:`EXL2Format` for the pipeline.

Tensors per quantized linear ``<prefix>``:

==============  =======  ===============================  ===========================================
suffix          dtype    shape                            content
==============  =======  ===============================  ===========================================
``q_weight``    int32    ``[Σ_g ceil(rows_g·b_g/32), Np]`` per group an LSB-first bitstream along K
``q_scale``     int32    ``[G, Np/8]``                    4-bit scale codes − 1, column ``8w+i`` in nibble i
``q_scale_max`` fp16     ``[G]``                          per-group maximum scale
``q_groups``    int16    ``[2G]``                         ``[b_0, qrow_0, b_1, qrow_1, …]``
``q_invperm``   int32    ``[K]``                          ``argsort(perm)``
==============  =======  ===============================  ===========================================

``Np`` = out_features padded to a multiple of 32 (padded columns hold code ``2^(b−1)`` = 0.0).
``q_perm`` is not written (the loader derives it from ``q_invperm``); a third-party ``q_perm`` is
checked against ``q_invperm`` on read. The bias of a quantized linear is stored fp16 (§3.10).

Mixture-of-Experts (Mixtral, Qwen3-MoE): every routed expert's gate/up/down is an EXL2 linear of its
own under the name exllamav2's ``ExLlamaV2MoEMLP`` loads (architecture.py ``mlp_gate``/``mlp_up``/
``mlp_down`` with ``*`` the expert index): Mixtral ``block_sparse_moe.experts.{e}.w1|w3|w2``, Qwen3-MoE
``mlp.experts.{e}.gate_proj|up_proj|down_proj``, no bias; the router (``block_sparse_moe.gate`` /
``mlp.gate``) stays an unquantized ``.weight`` (the loader casts it to fp16). exllamav2 itself needs
CUDA and has not run these files here (tests/test_exl2_moe.py checks them against its source).

Pure functions only: no Hessians, no files (except :func:`achieved_bpw`, which reads headers).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import InputError
from ..methods.exl2 import (
    BIT_WIDTHS,
    MAX_IN_FEATURES,
    PAD_COLUMNS,
    Exl2Result,
    fake_quant_values,
    fp16_scales,
    padded_columns,
)

# exllamav2 release whose format this reproduces (config.json quantization_config.version).
EXL2_FORMAT_VERSION = "0.3.2"
SUFFIXES = ("q_weight", "q_scale", "q_scale_max", "q_groups", "q_invperm", "q_perm")
PACKED_SUFFIXES = SUFFIXES[:5]  # what the writer emits


# -- bit streams ---------------------------------------------------------------------------------


def _to_int32(words: Tensor) -> Tensor:
    """uint32 values held in int64 -> int32 with the same bits."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_bitstream(codes: Tensor, bits: int) -> Tensor:
    """``codes [rows, N]`` (each < 2^bits) -> int32 ``[ceil(rows·bits/32), N]``: per column, value
    ``i`` occupies bits ``[i·b, (i+1)·b)`` of ``word0 | word1<<32 | …`` (LSB first, may straddle)."""
    rows, N = codes.shape
    c = codes.to(torch.int64)
    if rows and (int(c.min()) < 0 or int(c.max()) >= 1 << bits):
        raise ValueError(f"codes outside 0..{(1 << bits) - 1} for {bits}-bit packing")
    shifts = torch.arange(bits, device=c.device)
    stream = ((c[:, None, :] >> shifts[None, :, None]) & 1).reshape(rows * bits, N)
    nwords = -(-rows * bits // 32)
    stream = torch.cat([stream, stream.new_zeros(nwords * 32 - rows * bits, N)])
    words = (stream.reshape(nwords, 32, N) << torch.arange(32, device=c.device)[None, :, None]).sum(dim=1)
    return _to_int32(words)


def unpack_bitstream(words: Tensor, bits: int, rows: int) -> Tensor:
    """Inverse of :func:`pack_bitstream`: int32 ``[nwords, N]`` -> int64 codes ``[rows, N]``."""
    nwords, N = words.shape
    if rows * bits > nwords * 32:
        raise ValueError(f"{nwords} words hold {nwords * 32 // bits} {bits}-bit values, {rows} requested")
    w = words.to(torch.int64) & 0xFFFFFFFF
    stream = ((w[:, None, :] >> torch.arange(32, device=w.device)[None, :, None]) & 1).reshape(nwords * 32, N)
    stream = stream[: rows * bits].reshape(rows, bits, N)
    return (stream << torch.arange(bits, device=w.device)[None, :, None]).sum(dim=1)


def pack_scale_codes(scale_codes: Tensor) -> Tensor:
    """``[G, Np]`` codes 1..16 -> int32 ``[G, Np/8]``: code − 1 in nibble ``i`` of word ``w`` for column ``8w+i``."""
    G, Np = scale_codes.shape
    if Np % 8:
        raise ValueError("scale codes need a multiple of 8 columns")
    c = scale_codes.to(torch.int64) - 1
    if G and (int(c.min()) < 0 or int(c.max()) > 15):
        raise ValueError("scale codes outside 1..16")
    nib = c.reshape(G, Np // 8, 8) << (4 * torch.arange(8, device=c.device))
    return _to_int32(nib.sum(dim=2))


def unpack_scale_codes(q_scale: Tensor) -> Tensor:
    """int32 ``[G, Np/8]`` -> codes 1..16 ``[G, Np]``."""
    G, W = q_scale.shape
    w = q_scale.to(torch.int64) & 0xFFFFFFFF
    nib = (w[:, :, None] >> (4 * torch.arange(8, device=w.device))) & 15
    return nib.reshape(G, W * 8) + 1


# -- pack / dequantize ---------------------------------------------------------------------------


def pack_exl2(codes: Tensor, group_bits: tuple[int, ...] | list[int], group_rows: tuple[int, ...] | list[int],
              scale_codes: Tensor, scale_max: Tensor, perm: Tensor) -> dict[str, Tensor]:
    """The EXL2 tensors of one linear from its parts (§3.6).

    ``codes [K, N]`` unsigned, rows in storage order (stored row ``j`` = input channel ``perm[j]``);
    ``group_bits``/``group_rows`` per group in storage order (non-increasing widths);
    ``scale_codes [G, N]`` 1..16; ``scale_max [G]`` (rounded to fp16); ``perm [K]`` a permutation.
    Columns are padded to a multiple of 32 with code ``2^(b−1)`` and scale code 1.
    """
    K, N = codes.shape
    G = len(group_bits)
    if len(group_rows) != G or sum(group_rows) != K or scale_codes.shape != (G, N) or scale_max.shape != (G,):
        raise ValueError(f"inconsistent EXL2 parts: K={K}, N={N}, {G} group widths, {len(group_rows)} group sizes "
                         f"covering {sum(group_rows)} rows, scale codes {tuple(scale_codes.shape)}, scale max {tuple(scale_max.shape)}")
    if any(b not in BIT_WIDTHS for b in group_bits) or any(a < b for a, b in zip(group_bits, group_bits[1:])):
        raise ValueError(f"group bit widths must be among {BIT_WIDTHS} and non-increasing, got {list(group_bits)}")
    if K > MAX_IN_FEATURES:
        raise ValueError(f"in_features {K} > {MAX_IN_FEATURES}")
    perm = perm.to(torch.int64)
    if perm.shape != (K,) or not torch.equal(torch.sort(perm).values, torch.arange(K, device=perm.device)):
        raise ValueError("perm is not a permutation of 0..K-1")
    Np = padded_columns(N)
    words, qgroups, row, qrow = [], [], 0, 0
    for g, (b, rows) in enumerate(zip(group_bits, group_rows)):
        if g < G - 1 and (rows * b) % 32:
            raise ValueError(f"group {g}: {rows} rows of {b} bits do not fill whole words (only the last group may)")
        c = codes[row : row + rows].to(torch.int64)
        if Np > N:
            c = torch.cat([c, c.new_full((rows, Np - N), 1 << (b - 1))], dim=1)
        w = pack_bitstream(c, b)
        words.append(w)
        qgroups += [b, qrow]
        qrow += w.shape[0]
        row += rows
    sc = scale_codes.to(torch.int64)
    if Np > N:
        sc = torch.cat([sc, sc.new_ones(G, Np - N)], dim=1)
    return {
        "q_weight": torch.cat(words).contiguous(),
        "q_scale": pack_scale_codes(sc),
        "q_scale_max": scale_max.to(torch.float16).reshape(G).contiguous(),
        "q_groups": torch.tensor(qgroups, dtype=torch.int16),
        "q_invperm": torch.argsort(perm).to(torch.int32),
    }


def pack_result(r: Exl2Result) -> dict[str, Tensor]:
    """The EXL2 tensors of a quantized linear (CPU tensors)."""
    return {k: v.cpu() for k, v in pack_exl2(r.codes, r.group_bits, r.group_rows, r.scale_codes,
                                             r.scale_max, r.perm).items()}


def group_table(tensors: dict[str, Tensor], name: str = "linear") -> list[tuple[int, int, int, int]]:
    """``[(bits, first word row, word rows, input rows), ...]`` per group, as the loader walks them."""
    qg = tensors["q_groups"].to(torch.int64).tolist()
    nwords = tensors["q_weight"].shape[0]
    K = tensors["q_invperm"].shape[0]
    G = len(qg) // 2
    out, row = [], 0
    for g in range(G):
        b, r0 = qg[2 * g], qg[2 * g + 1]
        r1 = qg[2 * g + 3] if g < G - 1 else nwords
        if b not in BIT_WIDTHS or r1 < r0:
            raise InputError(f"{name}.q_groups: invalid entry for group {g} (bits {b}, rows {r0}..{r1}); the file is corrupt")
        nrows = (r1 - r0) * 32 // b if g < G - 1 else K - row
        out.append((b, r0, r1 - r0, nrows))
        row += nrows
    return out


def dequantize_exl2(tensors: dict[str, Tensor], name: str = "linear") -> Tensor:
    """Dense fp32 weight ``[Np, K]`` exactly as exllamav2 reconstructs it (fp16 arithmetic, §3.7)."""
    q_weight = tensors["q_weight"]
    K = tensors["q_invperm"].shape[0]
    Np = q_weight.shape[1]
    perm = torch.argsort(tensors["q_invperm"].to(torch.int64))
    codes_all = unpack_scale_codes(tensors["q_scale"])
    scale_max = tensors["q_scale_max"]
    Wt = torch.empty(K, Np, dtype=torch.float32)
    row = 0
    for g, (b, r0, nw, nrows) in enumerate(group_table(tensors, name)):
        codes = unpack_bitstream(q_weight[r0 : r0 + nw], b, nrows)
        scale = fp16_scales(codes_all[g], scale_max[g])
        Wt[perm[row : row + nrows]] = fake_quant_values(codes, b, scale)
        row += nrows
    if row != K:
        raise InputError(f"{name}: q_groups cover {row} input rows, q_invperm has {K}; the file is corrupt")
    return Wt.T.contiguous()


def check_exl2_tensors(tensors: dict[str, Tensor], name: str = "linear") -> None:
    """The checks exllamav2's loader applies to one EXL2 linear (§3.10), plus the layout rules its
    kernels rely on (§3.6). InputError naming the tensor on the first violation."""
    need = [s for s in PACKED_SUFFIXES if s not in tensors]
    if need:
        raise InputError(f"{name}: EXL2 linear lacks {', '.join(need)}")
    qw, qs, qsm, qg, inv = (tensors[s] for s in PACKED_SUFFIXES)
    want = {"q_weight": (qw, torch.int32), "q_scale": (qs, torch.int32), "q_scale_max": (qsm, torch.float16),
            "q_groups": (qg, torch.int16), "q_invperm": (inv, torch.int32)}
    for suffix, (t, dtype) in want.items():
        if t.dtype != dtype:
            raise InputError(f"{name}.{suffix}: dtype {t.dtype}, the EXL2 loader needs {dtype}")
    if qw.ndim != 2 or qs.ndim != 2 or qsm.ndim != 1 or qg.ndim != 1 or inv.ndim != 1:
        raise InputError(f"{name}: EXL2 tensors have the wrong number of dimensions")
    if qs.shape[1] * 8 != qw.shape[1]:
        raise InputError(f"{name}.q_scale: {qs.shape[1]}·8 columns != q_weight's {qw.shape[1]}")
    if qw.shape[1] % PAD_COLUMNS:
        raise InputError(f"{name}.q_weight: {qw.shape[1]} columns, not a multiple of {PAD_COLUMNS}")
    if qsm.shape[0] != qs.shape[0] or qg.shape[0] != 2 * qs.shape[0]:
        raise InputError(f"{name}: q_scale_max/q_groups lengths do not match {qs.shape[0]} groups in q_scale")
    K = inv.shape[0]
    if K > MAX_IN_FEATURES:
        raise InputError(f"{name}.q_invperm: {K} rows exceed the loader's 16-bit permutation")
    if not torch.equal(torch.sort(inv.to(torch.int64)).values, torch.arange(K)):
        raise InputError(f"{name}.q_invperm: not a permutation of 0..{K - 1}")
    if "q_perm" in tensors and not torch.equal(tensors["q_perm"].to(torch.int64), torch.argsort(inv.to(torch.int64))):
        raise InputError(f"{name}.q_perm: does not equal argsort(q_invperm)")
    table = group_table(tensors, name)
    bits = [b for b, *_ in table]
    if any(a < b for a, b in zip(bits, bits[1:])):
        raise InputError(f"{name}.q_groups: bit widths {bits} are not non-increasing (the loader walks 8,6,5,4,3,2)")
    if table[0][1] != 0:
        raise InputError(f"{name}.q_groups: first group does not start at row 0")
    for g, (b, r0, nw, nrows) in enumerate(table):
        if g < len(table) - 1 and (nw * 32) % b:
            raise InputError(f"{name}.q_groups: group {g} spans {nw} words, not whole {b}-bit rows")
        if nrows <= 0 or nrows * b > nw * 32:
            raise InputError(f"{name}.q_groups: group {g} ({nrows} rows of {b} bits) does not fit its {nw} words")
    if not torch.isfinite(qsm.float()).all():
        raise InputError(f"{name}.q_scale_max: non-finite values")
    bias = tensors.get("bias")
    if bias is not None and (bias.dtype != torch.float16 or tuple(bias.shape) != (qw.shape[1],)):
        raise InputError(f"{name}.bias: {bias.dtype} {tuple(bias.shape)}, the EXL2 loader needs float16 ({qw.shape[1]},)")


def pad_bias(bias: Tensor) -> Tensor:
    """A quantized linear's bias as the loader needs it: fp16, zero-padded to ``Np``."""
    b = bias.detach().reshape(-1).to(torch.float16)
    Np = padded_columns(b.numel())
    return torch.cat([b, b.new_zeros(Np - b.numel())]) if Np > b.numel() else b


# -- config and accounting -----------------------------------------------------------------------


def quantization_config(bits: float, head_bits: int, calibration: dict[str, Any]) -> dict[str, Any]:
    """config.json ``quantization_config`` (§3.8); exllamav2's loader does not read it."""
    return {"quant_method": "exl2", "version": EXL2_FORMAT_VERSION, "bits": float(bits), "head_bits": int(head_bits),
            "calibration": dict(calibration)}


def packed_linears(reader) -> dict[str, dict[str, tuple[tuple[int, ...], torch.dtype]]]:
    """``{prefix: {suffix: (shape, dtype)}}`` for every EXL2 linear of a checkpoint (headers only)."""
    out: dict[str, dict[str, tuple[tuple[int, ...], torch.dtype]]] = {}
    for n in reader.names():
        prefix, _, suffix = n.rpartition(".")
        if suffix in SUFFIXES:
            out.setdefault(prefix, {})[suffix] = (tuple(reader.shape(n)), reader.dtype(n))
    return {p: s for p, s in out.items() if "q_weight" in s}


def achieved_bpw(directory: Path, head_prefix: str = "lm_head") -> dict[str, Any]:
    """Bits per weight computed from the files: bytes of every EXL2 tensor of a linear (bias excluded)
    over its ``K·N`` weights, for the decoder linears and for the head separately.

    ``N`` is taken as the padded width ``q_weight.shape[1]`` (equal to out_features when that is a
    multiple of 32, as for every linear this project quantizes).
    """
    from ..io.reader import CheckpointReader

    reader = CheckpointReader(Path(directory))
    acc = {"decoder": [0, 0], "head": [0, 0]}
    for prefix, parts in packed_linears(reader).items():
        bits = sum(8 * torch.tensor([], dtype=dt).element_size() * _numel(shape) for shape, dt in parts.values())
        weights = parts["q_invperm"][0][0] * parts["q_weight"][0][1]
        key = "head" if prefix == head_prefix else "decoder"
        acc[key][0] += bits
        acc[key][1] += weights
    out: dict[str, Any] = {}
    for key, (bits, weights) in acc.items():
        if weights:
            out[key] = {"bits": bits, "weights": weights, "bpw": bits / weights}
    return out


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


class EXL2Format:
    """EXL2 as the pipeline's ``Format``: packs :class:`Exl2Result`, reads EXL2 linears back.

    ``measurement`` (the ``measurement.json`` bytes) is written beside the weights, as exllamav2's
    converter leaves it in its working directory, so the run's measurement can be reused.
    """

    name = "exl2"
    suffixes = SUFFIXES

    def __init__(self, bits: float, head_bits: int, calibration: dict[str, Any] | None = None,
                 measurement: bytes | None = None):
        self.bits = bits
        self.head_bits = head_bits
        self.calibration = calibration or {}
        self.measurement = measurement

    @classmethod
    def from_quantization_config(cls, qc: dict[str, Any], source: str = "config.json") -> "EXL2Format":
        try:
            bits = float(qc.get("bits", 0.0))
            head_bits = int(qc.get("head_bits", 0))
        except (TypeError, ValueError):
            raise InputError(f"{source}: quantization_config bits/head_bits are not numbers") from None
        return cls(bits, head_bits, qc.get("calibration") or {})

    def pack(self, result: Exl2Result) -> dict[str, Tensor]:
        return pack_result(result)

    def pack_bias(self, bias: Tensor) -> Tensor:
        return pad_bias(bias)

    def dequantize(self, tensors: dict[str, Tensor]) -> Tensor:
        return dequantize_exl2(tensors)

    def weight_shape(self, shapes: dict[str, tuple[int, ...]]) -> tuple[int, int]:
        return (shapes["q_weight"][1], shapes["q_invperm"][0])

    def quantization_config(self) -> dict[str, Any]:
        return quantization_config(self.bits, self.head_bits, self.calibration)

    def extra_files(self) -> dict[str, bytes]:
        return {"measurement.json": self.measurement} if self.measurement is not None else {}


def measurement_bytes(measurement: dict[str, Any]) -> bytes:
    return (json.dumps(measurement, indent=1) + "\n").encode()
