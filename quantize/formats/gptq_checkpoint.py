"""The GPTQ checkpoint format as the pipeline's ``Format``: packing, config, read-back."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import InputError
from ..methods.grid import QuantResult, QuantSpec
from . import gptq as _gptq


class GPTQFormat:
    name = "gptq"
    suffixes = ("qweight", "qzeros", "scales", "g_idx")

    def __init__(self, spec: QuantSpec, checkpoint_format: str = "gptq"):
        self.spec = spec
        self.checkpoint_format = checkpoint_format

    @classmethod
    def from_quantization_config(cls, qc: dict[str, Any], source: str = "config.json") -> "GPTQFormat":
        spec = QuantSpec.parse(
            {"bits": qc.get("bits"), "group_size": qc.get("group_size", 128), "sym": qc.get("sym", True),
             "act_order": qc.get("desc_act", False), "static_groups": qc.get("static_groups", False)},
            source=source,
        )
        fmt = qc.get("checkpoint_format") or qc.get("format") or "gptq"
        return cls(spec, checkpoint_format=fmt)

    def pack(self, result: QuantResult) -> dict[str, torch.Tensor]:
        return _gptq.pack_quant_result(result, checkpoint_format=self.checkpoint_format)

    def dequantize(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        return _gptq.dequantize_gptq(tensors, self.spec.bits, self.checkpoint_format)

    def weight_shape(self, shapes: dict[str, tuple[int, ...]]) -> tuple[int, int]:
        k_words, n = shapes["qweight"]
        return (n, k_words * 32 // self.spec.bits)

    def quantization_config(self) -> dict[str, Any]:
        return _gptq.quantization_config(self.spec, checkpoint_format=self.checkpoint_format)

    def extra_files(self) -> dict[str, bytes]:
        return {"quantize_config.json": _gptq.quantize_config_json(self.spec, checkpoint_format=self.checkpoint_format).encode()}

    # -- GPT-OSS experts in gptqmodel's layout (``Experts.served``; interleaved gate_up) ------------
    # defuser (gptqmodel's loader) splits GptOssExperts per expert by chunking the gate_up output
    # columns: ``{disk}.{e}.gate_proj`` holds the first I of the interleaved columns (gate 0, up 0,
    # gate 1, ...), ``up_proj`` the last I, and the biases per expert (``.bias``: halves of
    # gate_up_proj_bias[e], down_proj_bias[e]); its forward re-interleaves gate and up outputs.

    def _columns(self, suffix: str, t: torch.Tensor) -> torch.Tensor:
        """A packed tensor with one column per output row (qzeros unpacked; qweight and scales are so)."""
        return _gptq.unpack_lsb_bitstream(t, self.spec.bits) if suffix == "qzeros" else t

    def _stored(self, suffix: str, t: torch.Tensor, what: str) -> torch.Tensor:
        """The inverse of :meth:`_columns`."""
        return _gptq.pack_lsb_bitstream(t, self.spec.bits, what=what) if suffix == "qzeros" else t.contiguous()

    def pack_served_expert(self, arch, lins: list[str], results: list[QuantResult],
                           biases: list[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        packed = [self.pack(r) for r in results]
        out: dict[str, torch.Tensor] = {}
        if len(lins) == 2:
            g, u = packed
            if not torch.equal(g["g_idx"], u["g_idx"]):
                raise InputError(f"{lins[0]}/{lins[1]}: gate and up have different g_idx; gptqmodel's GPT-OSS layout "
                                 "needs one column order for both")
            for s in ("qweight", "scales", "qzeros"):  # columns re-interleaved (gate 0, up 0, ...), cut in halves
                a, b = self._columns(s, g[s]), self._columns(s, u[s])
                halves = torch.stack([a, b], dim=-1).reshape(a.shape[0], -1).chunk(2, dim=1)
                for lin, h in zip(lins, halves):
                    out[f"{lin}.{s}"] = self._stored(s, h, f"{lin} {s}")
            for lin, p in zip(lins, packed):
                out[f"{lin}.g_idx"] = p["g_idx"]
            if biases is not None:
                for lin, b in zip(lins, biases[0].chunk(2)):
                    out[f"{lin}.bias"] = b.clone()
        else:
            out.update({f"{lins[0]}.{s}": t for s, t in packed[0].items()})
            if biases is not None:
                out[f"{lins[0]}.bias"] = biases[0].clone()
        return {k: t.contiguous() for k, t in out.items()}

    def served_experts(self, arch, names) -> dict[str, tuple[str, int]]:
        """Dense gate/up weight name -> (``{prefix}{disk}.{e}``, j) for GPT-OSS outputs in gptqmodel's
        layout (marked by the per-expert gate bias); down and older outputs read as plain linears."""
        if arch is None or arch.moe is None or not arch.moe.experts.interleaved:
            return {}
        ex = arch.moe.experts
        names = set(names)
        out = {}
        for n in names:
            if not n.endswith(f".{ex.linears[0]}.bias"):
                continue
            stem = n[: -len(f".{ex.linears[0]}.bias")]
            if f"{stem}.{ex.linears[1]}.bias" in names and f"{stem}.{ex.linears[0]}.qweight" in names:
                for j in (0, 1):
                    out[f"{stem}.{ex.linears[j]}.weight"] = (stem, j)
        return out

    def served_hidden(self, arch, stem: str) -> list[str]:
        ex = arch.moe.experts
        return [f"{stem}.{lin}.{s}" for lin in ex.linears for s in (*self.suffixes, "bias")]

    def served_tensors(self, arch, get, stem: str, j: int) -> dict[str, torch.Tensor]:
        """Gate's (j 0) or up's (j 1) own columns: the halves put back together, every other column."""
        ex = arch.moe.experts
        out = {"g_idx": get(f"{stem}.{ex.linears[0]}.g_idx")}
        for s in ("qweight", "scales", "qzeros"):
            both = torch.cat([self._columns(s, get(f"{stem}.{lin}.{s}")) for lin in ex.linears[:2]], dim=1)
            out[s] = self._stored(s, both[:, j::2], f"{stem} {s}")
        return out

    def served_shape(self, arch, inner, stem: str, j: int) -> tuple[int, int]:
        ex = arch.moe.experts
        return self.weight_shape({"qweight": tuple(inner.shape(f"{stem}.{ex.linears[j]}.qweight"))})
