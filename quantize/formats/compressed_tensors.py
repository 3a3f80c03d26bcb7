"""compressed-tensors checkpoints (FORMATS.md §4), the format vLLM loads natively: ``pack-quantized``
integer weights (W4A16 / W8A16 from GPTQ, AWQ or RTN) and ``float-quantized`` FP8 W8A8.

Per quantized linear ``W [N, K]``:

``pack-quantized`` (b = 4 or 8 bits, groups of ``g`` columns or one per row, G = K / g):
- ``weight_packed`` int32 ``[N, ceil(K·b/32)]``: row n is the LSB-first bitstream of the codes
  ``u = q + 2^(b−1)`` (``q`` the signed code); our grid's codes are exactly ``u``;
- ``weight_scale`` ``[N, G]`` in the model's dtype (the dtype every loader creates the parameter in:
  compressed-tensors' ``initialize_qparams``, vLLM's ``params_dtype``), so the solver's grid must be
  exact in that dtype (``QuantSpec.scale_dtype``);
- ``weight_zero_point`` int32 ``[ceil(N·b/32), G]`` (asymmetric only): the stored zero points
  ``zp + 2^(b−1)`` (= our integer zero ``z``) packed along **N**;
- ``weight_shape`` int64 ``[2]`` = ``[N, K]``.
``W[n, k] = (u − z) · scale[n, k // g]`` with ``z = 2^(b−1)`` when symmetric. No ``g_idx``: act-order
is stored as the ``"weight"`` actorder (GPTQ processed columns by act-order, groups stay
contiguous), so it needs static groups.

``float-quantized`` FP8 (e4m3, per output channel, symmetric):
- ``weight`` float8_e4m3fn ``[N, K]``, ``weight_scale`` ``[N, 1]`` (model dtype);
- ``input_scale`` ``[1]`` per linear with static activation scales (dynamic per-token: none).
``W[n, k] = float(weight[n, k]) · weight_scale[n]``.

The ``quantization_config`` block is built with compressed-tensors' own pydantic classes and laid
out as its ``ModelCompressor.update_config`` writes it, so whatever the library accepts, we write.
Pure tensor functions and config objects: no files, no model.
"""

from __future__ import annotations

import re

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ..errors import InputError
from ..methods.fp8 import FP8Result
from ..methods.grid import QuantResult, QuantSpec, dequantize_grouped
from .gptq import pack_lsb_bitstream, unpack_lsb_bitstream

QUANT_METHOD = "compressed-tensors"
PACKED = "pack-quantized"
FLOAT = "float-quantized"
INT_BITS = (4, 8)  # what vLLM's WNA16 kernels (Marlin, Machete) run
GROUP_SIZES = (-1, 32, 64, 128)  # Marlin's group sizes (-1: one group per output channel)
INT_SUFFIXES = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")
FP8_SUFFIXES = ("weight_scale", "weight", "input_scale")  # first: what marks a quantized linear
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def model_dtype(config: Mapping[str, Any]) -> torch.dtype:
    """The dtype a loader builds the model in (config.json ``dtype``/``torch_dtype``; bf16 if unset)."""
    name = str(config.get("dtype") or config.get("torch_dtype") or "bfloat16").removeprefix("torch.")
    if name not in _DTYPES:
        raise InputError(f"config.json: dtype {name!r} is not a float dtype compressed-tensors stores scales in; "
                         f"use one of {', '.join(_DTYPES)}")
    return _DTYPES[name]


def grid_scale_dtype(dtype: torch.dtype) -> str:
    """The ``QuantSpec.scale_dtype`` whose scales a ``dtype`` checkpoint holds exactly."""
    return "bfloat16" if dtype == torch.bfloat16 else "float16"


def _pack_padded(values: Tensor, bits: int, *, what: str) -> Tensor:
    """Last dim as compressed-tensors' dense LSB-first bitstream: ``ceil(L·bits/32)`` int32 words,
    the tail padded with zero codes (for 4 and 8 bits no value straddles a word)."""
    per_word = 32 // bits
    pad = -values.shape[-1] % per_word
    if pad:
        values = torch.nn.functional.pad(values.to(torch.int64), (0, pad))
    return pack_lsb_bitstream(values, bits, what=what)


def pack_int(codes: Tensor, scales: Tensor, zeros: Tensor, *, bits: int, sym: bool, scale_dtype: torch.dtype,
             name: str = "weight") -> dict[str, Tensor]:
    """``pack-quantized`` tensors of one linear from our grid's ``codes [N, K]`` (in ``[0, 2^b−1]``),
    ``scales [G, N]`` and integer ``zeros [G, N]``, groups contiguous. InputError when a value cannot
    be stored exactly (so a written checkpoint always reproduces the solver's weights)."""
    if bits not in INT_BITS:
        raise InputError(f"{name}: compressed-tensors W{bits}A16 is not loadable by vLLM's kernels; use --bits 4 or 8")
    N, K = codes.shape
    G = scales.shape[0]
    half = 1 << (bits - 1)
    if tuple(scales.shape) != (G, N) or tuple(zeros.shape) != (G, N) or K % G:
        raise InputError(f"{name}: scales {tuple(scales.shape)} / zeros {tuple(zeros.shape)} do not fit codes {tuple(codes.shape)}")
    lo, hi = torch.aminmax(codes) if codes.numel() else (torch.tensor(0), torch.tensor(0))
    if int(lo) < 0 or int(hi) >= 2 * half:  # ints, not tensor comparisons: 256 is 0 as a uint8
        raise InputError(f"{name}: codes must lie in [0, {2 * half - 1}] for {bits}-bit")
    if sym and bool((zeros != half).any()):
        raise InputError(f"{name}: a symmetric scheme needs every zero point at {half}; quantize with --sym")
    if bool((zeros < 0).any() or (zeros >= 2 * half).any()):
        raise InputError(f"{name}: zero points must lie in [0, {2 * half - 1}] for {bits}-bit")
    stored = scales.to(scale_dtype)
    if not torch.equal(stored.to(torch.float32), scales.to(torch.float32)):
        raise InputError(f"{name}: scales are not exact in {str(scale_dtype).removeprefix('torch.')}, the dtype the "
                         f"checkpoint stores them in; quantize with --scale-dtype auto")
    out = {
        "weight_packed": _pack_padded(codes, bits, what=f"{name}: in_features").contiguous(),
        "weight_scale": stored.T.contiguous(),
    }
    if not sym:
        out["weight_zero_point"] = _pack_padded(zeros, bits, what=f"{name}: out_features").T.contiguous()
    out["weight_shape"] = torch.tensor([N, K], dtype=torch.int64)
    return out


def unpack_int(tensors: Mapping[str, Tensor], *, bits: int, sym: bool, group_size: int | None,
               name: str = "weight") -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(codes int32 [N, K], scales fp32 [G, N], zeros int32 [G, N], g_idx int32 [K])``."""
    for key in ("weight_packed", "weight_scale") + (() if sym else ("weight_zero_point",)):
        if key not in tensors:
            raise InputError(f"{name}.{key}: missing from the checkpoint; the compressed-tensors linear is incomplete")
    packed, scale = tensors["weight_packed"], tensors["weight_scale"]
    if packed.dtype != torch.int32 or packed.ndim != 2 or scale.ndim != 2:
        raise InputError(f"{name}.weight_packed: expected int32 [N, words] and a 2-D weight_scale, got "
                         f"{packed.dtype} {tuple(packed.shape)} / {tuple(scale.shape)}")
    N, G = scale.shape
    if "weight_shape" in tensors:
        n, K = (int(v) for v in tensors["weight_shape"].tolist())
    else:
        n, K = N, (G * group_size if group_size and group_size > 0 else packed.shape[1] * 32 // bits)
    if n != N or packed.shape[0] != N or packed.shape[1] * 32 < K * bits or K % G:
        raise InputError(f"{name}: weight_packed {tuple(packed.shape)}, weight_scale {tuple(scale.shape)} and "
                         f"weight_shape [{n}, {K}] are inconsistent for {bits}-bit")
    codes = unpack_lsb_bitstream(packed, bits, what=f"{name}.weight_packed")[:, :K].to(torch.int32).contiguous()
    if sym:
        zeros = torch.full((G, N), 1 << (bits - 1), dtype=torch.int32)
    else:
        zp = tensors["weight_zero_point"]
        if zp.dtype != torch.int32 or zp.ndim != 2 or zp.shape[1] != G or zp.shape[0] * 32 < N * bits:
            raise InputError(f"{name}.weight_zero_point: {zp.dtype} {tuple(zp.shape)}, expected int32 "
                             f"[{-(-N * bits // 32)}, {G}]")
        zeros = unpack_lsb_bitstream(zp.T.contiguous(), bits, what=f"{name}.weight_zero_point")[:, :N].to(torch.int32)
    g_idx = (torch.arange(K) // (K // G)).to(torch.int32)
    return codes, scale.to(torch.float32).T.contiguous(), zeros.contiguous(), g_idx


def dequantize_int(tensors: Mapping[str, Tensor], **kw: Any) -> Tensor:
    """What the loaders compute, in fp32 (exact: a small integer times a 16-bit scale)."""
    return dequantize_grouped(*unpack_int(tensors, **kw))


# -- FP8 -------------------------------------------------------------------------------------------


def pack_fp8(result: FP8Result, *, scale_dtype: torch.dtype, name: str = "weight", per_tensor: bool = False) -> dict[str, Tensor]:
    """``weight_scale`` [N, 1] per channel, [1] per tensor (the shapes compressed-tensors creates)."""
    stored = result.scale.to(scale_dtype)
    if not torch.equal(stored.to(torch.float32), result.scale.to(torch.float32)):
        raise InputError(f"{name}: FP8 scales are not exact in {scale_dtype}; quantize with this model's dtype")
    if stored.numel() != (1 if per_tensor else result.weight.shape[0]):
        raise InputError(f"{name}: {stored.numel()} FP8 weight scales for {result.weight.shape[0]} rows, but the format "
                         f"stores them per {'tensor' if per_tensor else 'channel'}")
    out = {"weight": result.weight.contiguous(),
           "weight_scale": stored.reshape(1 if per_tensor else (-1, 1)).contiguous()}
    if result.input_scale is not None:
        out["input_scale"] = torch.tensor([result.input_scale], dtype=torch.float32).to(scale_dtype)
    return out


def dequantize_fp8(tensors: Mapping[str, Tensor], name: str = "weight") -> Tensor:
    w, s = tensors.get("weight"), tensors.get("weight_scale")
    if w is None or s is None or w.dtype != torch.float8_e4m3fn or w.ndim != 2 or s.numel() not in (1, w.shape[0]):
        raise InputError(f"{name}: expected float8_e4m3fn weight [N, K] and weight_scale [N, 1] or [1]")
    return w.to(torch.float32) * s.to(torch.float32).reshape(-1, 1)


# -- config ----------------------------------------------------------------------------------------


def _ct():
    try:
        import compressed_tensors
        from compressed_tensors import quantization as q
    except ImportError as e:  # a dependency of this package; only a broken install gets here
        raise InputError(f"compressed-tensors is not importable ({e}); pip install 'compressed-tensors>=0.20'") from None
    return compressed_tensors, q


def build_config(*, weights: dict[str, Any], input_activations: dict[str, Any] | None, fmt: str,
                 ignore: list[str]) -> dict[str, Any]:
    """``config.json["quantization_config"]`` through compressed-tensors' own classes, with the
    top-level keys ``ModelCompressor.update_config`` adds (version, quant_method, sparsity and
    transform configs)."""
    ct, q = _ct()
    scheme = q.QuantizationScheme(
        targets=["Linear"], weights=q.QuantizationArgs(**weights),
        input_activations=q.QuantizationArgs(**input_activations) if input_activations else None,
    )
    cfg = q.QuantizationConfig(config_groups={"group_0": scheme}, format=fmt, ignore=ignore,
                               quantization_status=q.QuantizationStatus.COMPRESSED)
    return {"version": ct.__version__, "quant_method": QUANT_METHOD, "sparsity_config": {}, "transform_config": {},
            **cfg.model_dump(exclude={"quant_method"})}


def parse_config(qc: Mapping[str, Any], source: str) -> tuple[str, Any]:
    """(format, the one weight scheme) of a compressed-tensors config, validated by the library."""
    _, q = _ct()
    body = {k: v for k, v in qc.items() if k not in ("version", "quant_method", "sparsity_config", "transform_config")}
    try:
        cfg = q.QuantizationConfig.model_validate(body)
    except Exception as e:  # pydantic's ValidationError, or the library's own checks
        first = str(e).strip().splitlines()
        raise InputError(f"{source}: quantization_config is not a valid compressed-tensors config "
                         f"({first[0] if first else type(e).__name__}{': ' + first[-1].strip() if len(first) > 1 else ''})") from None
    groups = [g for g in cfg.config_groups.values() if getattr(g, "weights", None) is not None]
    if len(groups) != 1:
        raise InputError(f"{source}: {len(groups)} compressed-tensors weight schemes; this version reads checkpoints "
                         "with exactly one (mixed precision is not supported)")
    return str(cfg.format), groups[0]


# -- experts under the names a loader serves them by (``Experts.served``, GPT-OSS) ------------------

SERVED_SUFFIXES = ("weight_packed", "weight_scale")  # symmetric: no zero points; no weight_shape


def served_name(arch, linear: str, suffix: str) -> str:
    """``{disk}.{e}.{stem}_{suffix}`` for an expert linear (gate and up share the first stem)."""
    ex = arch.moe.experts
    e, j = arch.expert_slot(linear)
    return f"{ex.disk}.{e}.{ex.served[0 if j < 2 else 1]}_{suffix}"


def _rows_of(ex, parts: list[Tensor]) -> Tensor:
    """Gate's and up's row-wise tensors as one, in the experts' gate_up row order (one part: as is)."""
    if len(parts) == 1:
        return parts[0]
    if ex.interleaved:
        return torch.stack(parts, dim=1).reshape(-1, *parts[0].shape[1:])
    return torch.cat(parts)


def served_experts(arch, names) -> dict[str, tuple[str, int]]:
    if arch is None or arch.moe is None or not arch.moe.experts.served:
        return {}
    ex = arch.moe.experts
    out = {}
    pattern = re.compile(r"(.*\.)" + re.escape(ex.disk) + r"\.(\d+)\.(" + "|".join(map(re.escape, ex.served))
                         + ")_" + SERVED_SUFFIXES[0])
    for name in names:
        m = pattern.fullmatch(name)
        if m is None:
            continue
        stem = name[: -len(SERVED_SUFFIXES[0]) - 1]
        e, which = int(m.group(2)), ex.served.index(m.group(3))
        for j in ((0, 1) if which == 0 else (2,)):
            out[f"{m.group(1)}{arch.expert_linear(e, j)}.weight"] = (stem, j)
    return out


def _ignore(arch) -> list[str]:
    """Linear modules left dense: the head (tied or not, transformers builds it as a Linear), and an
    MoE model's routers and shared-expert gates (on-disk names, as vLLM's modules are named)."""
    if arch is None:
        return ["lm_head"]
    out = [arch.lm_head_path]
    if arch.moe is not None:
        out += ["re:.*" + re.escape(arch.disk_name(m.name)) + "$" for m in arch.moe.never_quantized]
    return out


class CompressedTensorsIntFormat:
    """``pack-quantized`` W4A16 / W8A16 as the pipeline's ``Format``."""

    name = "compressed-tensors"
    suffixes = INT_SUFFIXES

    def __init__(self, spec: QuantSpec, dtype: torch.dtype = torch.bfloat16, arch=None):
        self.spec = spec
        self.dtype = dtype
        self.arch = arch

    @staticmethod
    def check_spec(spec: QuantSpec) -> None:
        """What the format can store: InputError naming the setting to change."""
        if spec.bits not in INT_BITS:
            raise InputError(f"--bits {spec.bits}: compressed-tensors W{spec.bits}A16 has no vLLM kernel (Marlin/Machete "
                             f"run 4 and 8 bits); use --bits 4 or 8, or --format gptq for {spec.bits}-bit")
        if spec.group_size not in GROUP_SIZES:
            raise InputError(f"--group-size {spec.group_size}: vLLM's compressed-tensors kernels take group sizes "
                             f"32, 64, 128 or -1 (per channel); choose one of those")
        if spec.act_order and not spec.static_groups and spec.group_size != -1:
            raise InputError("--act-order without --static-groups: compressed-tensors stores no g_idx (act-order is "
                             "only its 'weight' ordering, with contiguous groups); add --static-groups or use --no-act-order")

    @classmethod
    def for_model(cls, spec: QuantSpec, config: Mapping[str, Any], arch=None) -> "CompressedTensorsIntFormat":
        cls.check_spec(spec)
        dtype = model_dtype(config)
        if dtype != torch.float32 and spec.scale_dtype != grid_scale_dtype(dtype):
            raise InputError(f"--scale-dtype {spec.scale_dtype}: compressed-tensors stores scales in the model's dtype "
                             f"({str(dtype).removeprefix('torch.')}), which loaders create them in; use --scale-dtype auto")
        return cls(spec, dtype, arch)

    @classmethod
    def from_scheme(cls, scheme, source: str) -> "CompressedTensorsIntFormat":
        w = scheme.weights
        if str(w.type) not in ("int", "QuantizationType.INT") or w.num_bits not in (2, 4, 8):
            raise InputError(f"{source}: pack-quantized {w.type} {w.num_bits}-bit weights are not readable by this "
                             "version (int 2/4/8-bit are)")
        if str(w.actorder) in ("group", "ActivationOrdering.GROUP", "dynamic"):
            raise InputError(f"{source}: actorder 'group' (g_idx) is not readable by this version")
        strategy = str(getattr(w.strategy, "value", w.strategy))
        if strategy not in ("group", "channel"):
            raise InputError(f"{source}: pack-quantized strategy {strategy!r} is not readable (group and channel are)")
        g = int(w.group_size) if strategy == "group" and w.group_size else -1
        spec = QuantSpec(bits=w.num_bits, group_size=g, sym=bool(w.symmetric), v1_safe_zeros=False)
        return cls(spec)

    def preflight(self, arch, config: Mapping[str, Any]) -> None:
        self.arch = arch
        if arch.moe is not None and arch.moe.experts.served and not self.spec.sym:
            raise InputError(f"--asym: vLLM's {arch.name} loader streams each expert's weight_packed and weight_scale "
                             "only (no zero points) from compressed-tensors; quantize with --sym, or use --format gptq")
        per_word = 32 // self.spec.bits
        for name in arch.linear_kinds(config):
            N, K = arch.linear_shape(name, config)
            self.spec.group_width(K, name=f"{arch.layer_prefix(0)}{name}")
            if K % per_word:
                raise InputError(f"{arch.layer_prefix(0)}{name}: in_features={K} is not a multiple of {per_word}; "
                                 f"vLLM cannot load it as {self.spec.bits}-bit compressed-tensors, use --format gptq")

    def pack_served_expert(self, arch, lins: list[str], results: list[QuantResult],
                           biases: list[Tensor] | None = None) -> dict[str, Tensor]:
        """One expert's gate+up (or down) under the names vLLM's loader streams for the family
        (``Experts.served``, GPT-OSS): ``{disk}.{e}.w13_weight_packed`` / ``w13_weight_scale`` with
        gate and up as one ``[2I, ·]`` tensor in the experts' gate_up order (interleaved rows for
        GPT-OSS), ``w2_*`` for down; no ``weight_shape`` (that loader has no slot for it). The
        expert's ``biases`` are not written here: vLLM maps the 3D bias tensors, written as on disk."""
        packed = [self.pack(r) for r in results]
        return {served_name(arch, lins[0], suffix): _rows_of(arch.moe.experts, [p[suffix] for p in packed])
                for suffix in SERVED_SUFFIXES}

    def served_experts(self, arch, names: list[str]) -> dict[str, tuple[str, int]]:
        """The inverse of ``pack_served_expert`` over a checkpoint's tensor names: each expert
        linear's dense weight name -> (served stem, linear index: 0 gate, 1 up, 2 down)."""
        return served_experts(arch, names)

    def served_hidden(self, arch, stem: str) -> list[str]:
        """The tensor names of a served expert group ``stem``, which the read-back shows as linears."""
        return [f"{stem}_{s}" for s in self.suffixes]

    def served_shape(self, arch, inner, stem: str, j: int) -> tuple[int, int]:
        """Linear ``j``'s ``[N, K]`` in a served expert group ``stem`` of checkpoint ``inner`` (gate and
        up share their stem's rows)."""
        per = 1 if j == 2 else 2
        shapes = {s: tuple(inner.shape(f"{stem}_{s}")) for s in self.suffixes if f"{stem}_{s}" in inner}
        return self.weight_shape({s: (v[0] // per, *v[1:]) for s, v in shapes.items()})

    def served_tensors(self, arch, get, stem: str, j: int) -> dict[str, Tensor]:
        """Linear ``j``'s own rows of a served expert tensor group ``stem`` (``get``: name -> tensor)."""
        ex = arch.moe.experts
        out = {}
        for suffix in SERVED_SUFFIXES:
            t = get(f"{stem}_{suffix}")
            if j < 2:
                t = t[j::2] if ex.interleaved else t.chunk(2, dim=0)[j]
            out[suffix] = t.contiguous()
        return out

    def pack(self, result: QuantResult) -> dict[str, Tensor]:
        K = result.g_idx.numel()
        width = K // result.scales.shape[0]
        if not torch.equal(result.g_idx.to(torch.int64), torch.arange(K, device=result.g_idx.device) // width):
            raise InputError("compressed-tensors stores contiguous groups only; quantize with --static-groups or --no-act-order")
        return pack_int(result.codes, result.scales, result.zeros, bits=result.bits, sym=self.spec.sym,
                        scale_dtype=self.dtype)

    def dequantize(self, tensors: dict[str, Tensor]) -> Tensor:
        return dequantize_int(tensors, bits=self.spec.bits, sym=self.spec.sym, group_size=self.spec.group_size)

    def weight_shape(self, shapes: dict[str, tuple[int, ...]]) -> tuple[int, int]:
        N, words = shapes["weight_packed"]
        G = shapes["weight_scale"][1]
        if self.spec.group_size > 0:
            return (N, G * self.spec.group_size)
        return (N, words * 32 // self.spec.bits)

    def weights_args(self) -> dict[str, Any]:
        s = self.spec
        return {"num_bits": s.bits, "type": "int", "symmetric": s.sym, "dynamic": False,
                "strategy": "channel" if s.group_size == -1 else "group",
                "group_size": None if s.group_size == -1 else s.group_size,
                "actorder": "weight" if s.act_order and s.group_size != -1 else None}

    def quantization_config(self) -> dict[str, Any]:
        return build_config(weights=self.weights_args(), input_activations=None, fmt=PACKED, ignore=_ignore(self.arch))

    def extra_files(self) -> dict[str, bytes]:
        return {}


class CompressedTensorsFP8Format:
    """``float-quantized`` FP8 W8A8 (per-channel weights, or per-tensor: ``per_tensor``; dynamic
    per-token or static per-tensor activations) as the pipeline's ``Format``."""

    name = "compressed-tensors"
    suffixes = FP8_SUFFIXES

    def __init__(self, static: bool = False, dtype: torch.dtype = torch.bfloat16, arch=None, per_tensor: bool = False):
        self.static = static
        self.dtype = dtype
        self.arch = arch
        self.per_tensor = per_tensor

    @classmethod
    def from_scheme(cls, scheme, source: str) -> "CompressedTensorsFP8Format":
        w, a = scheme.weights, scheme.input_activations
        strategy = str(getattr(w.strategy, "value", w.strategy))
        if str(getattr(w.type, "value", w.type)) != "float" or w.num_bits != 8 or strategy not in ("channel", "tensor"):
            raise InputError(f"{source}: float-quantized {w.type} {w.num_bits}-bit {strategy} weights are not readable "
                             "(FP8 per channel or per tensor is)")
        return cls(static=a is not None and not a.dynamic, per_tensor=strategy == "tensor")

    def preflight(self, arch, config: Mapping[str, Any]) -> None:
        self.arch = arch

    def pack(self, result: FP8Result) -> dict[str, Tensor]:
        return pack_fp8(result, scale_dtype=self.dtype, per_tensor=self.per_tensor)

    def input_quantizer(self, reader, prefix: str):
        """What the engine does to linear ``prefix``'s input (for eval): FP8 per token, or FP8 with
        the checkpoint's static ``input_scale``."""
        from ..methods.fp8 import fake_fp8, fake_fp8_per_token

        if not self.static:
            return fake_fp8_per_token
        key = f"{prefix}.input_scale"
        if key not in reader:
            raise InputError(f"{key}: missing; a static FP8 checkpoint stores an input scale for every quantized linear")
        scale = float(reader.get(key).float().reshape(-1)[0])
        return lambda x: fake_fp8(x, scale)

    def dequantize(self, tensors: dict[str, Tensor]) -> Tensor:
        return dequantize_fp8(tensors)

    def weight_shape(self, shapes: dict[str, tuple[int, ...]]) -> tuple[int, int]:
        return tuple(shapes["weight"])

    def quantization_config(self) -> dict[str, Any]:
        weights = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False,
                   "strategy": "tensor" if self.per_tensor else "channel"}
        acts = ({"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False, "strategy": "tensor"} if self.static
                else {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": True, "strategy": "token"})
        return build_config(weights=weights, input_activations=acts, fmt=FLOAT, ignore=_ignore(self.arch))

    def extra_files(self) -> dict[str, bytes]:
        return {}


def format_from_config(qc: Mapping[str, Any], source: str = "config.json"):
    fmt, scheme = parse_config(qc, source)
    if fmt == PACKED:
        return CompressedTensorsIntFormat.from_scheme(scheme, source)
    if fmt == FLOAT:
        return CompressedTensorsFP8Format.from_scheme(scheme, source)
    raise InputError(f"{source}: compressed-tensors format {fmt!r} is not readable by this version "
                     f"({PACKED!r} and {FLOAT!r} are)")
