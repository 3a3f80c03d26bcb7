"""Typed recipes (``recipes/<model>.yaml``); unknown keys are rejected.

Strings may reference the environment as ``${VAR}`` or ``${VAR:-default}``; ``--set a.b=value``
overrides any key from the command line.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..errors import InputError, invalid
from ..io.yamlfile import load_yaml_mapping


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Source(_Strict):
    model: str | None = None  # plain HF directory
    base: str | None = None  # base model for a PEFT adapter
    adapter: str | None = None
    litgpt: str | None = None  # Lit-GPT checkpoint directory
    lora: str | None = None  # Lit-GPT LoRA directory
    config: str | None = None  # config.json to plan with when the weights are not on this machine

    @model_validator(mode="after")
    def _one_kind(self):
        kinds = [self.model is not None, self.base is not None or self.adapter is not None, self.litgpt is not None]
        if sum(kinds) != 1:
            raise ValueError("set exactly one of: model, base+adapter, litgpt")
        if (self.base is None) != (self.adapter is None):
            raise ValueError("base and adapter go together")
        return self

    @property
    def needs_merge(self) -> bool:
        return self.model is None


class Merge(_Strict):
    """The merge stage (sources base+adapter or litgpt+lora): which base a QLoRA adapter trained on."""

    # QLoRA-exact merge: the LoRA goes onto the bitsandbytes 4-bit round trip of the base's linears;
    # None: as the training run recorded it (hyperparameters.yaml, axolotl_config, the adapter's files)
    base_quant: Literal["none", "nf4", "nf4-dq", "fp4", "fp4-dq"] | None = None
    base_quant_dtype: Literal["bf16", "fp16", "fp32"] | None = None  # None: the record's, else the base's
    axolotl_config: str | None = None  # the Axolotl YAML the adapter was trained with (base+adapter only)

    def kwargs(self) -> dict[str, Any]:
        return {"base_quant": self.base_quant, "base_quant_dtype": self.base_quant_dtype}


class GPTQParams(_Strict):
    act_order: bool = True
    sym: bool = True
    damp: float = 0.01
    static_groups: bool | None = None  # None: on with act-order (static activation ordering), off for rtn
    block_size: int = 128
    grid: Literal["auto", "minmax", "mse", "full", "full-mse"] = "auto"  # `quantize gptq --grid` (see commands/gptq.resolve_grid)


class MoESettings(_Strict):
    """Mixture-of-Experts statistics (gptq/rtn/awq; executor/moe.py); ignored by dense models."""

    calibration: Literal["routed", "all"] = "routed"
    min_tokens: float = Field(0.005, ge=0.0, lt=1.0)
    fallback: Literal["all", "rtn"] = "all"


class Calibration(_Strict):
    dataset: str = "wikitext2"
    samples: int = Field(128, ge=1)
    seq_len: int = Field(2048, ge=2)
    seed: int = 0
    text_field: str | None = None


class Eval(_Strict):
    enabled: bool = True
    dataset: str = "wikitext2-test"
    seq_len: int = Field(512, ge=2)
    max_windows: int | None = Field(None, ge=1)
    max_ppl_increase: float | None = None


class Resources(_Strict):
    ram: str  # host RAM the run expects, e.g. "32 GiB"
    vram: str  # device memory, e.g. "80 GiB" or "none (CPU)"
    notes: str | None = None


class Recipe(_Strict):
    name: str
    description: str = ""
    source: Source
    method: Literal["gptq", "rtn", "awq", "exl2", "fp8", "gguf"] = "gptq"
    # checkpoint format; None: the method's own (gptq/rtn: gptq, awq: awq, exl2: exl2, fp8: compressed-tensors,
    # gguf: gguf)
    format: Literal["gptq", "awq", "exl2", "compressed-tensors", "gguf"] | None = None
    fp8_scheme: Literal["dynamic", "static"] = "dynamic"
    # gguf: the file type; None: from bits (4 -> Q4_K_M, 5 -> Q5_K_M, 6 -> Q6_K, 8 -> Q8_0, 16 -> BF16)
    gguf_type: str | None = None
    # after quantizing, `quantize check` the output: off, auto (the engines that serve the format and
    # are installed), all. Off by default: the reference holds the whole dequantized model in fp32
    check: Literal["off", "auto", "all"] = "off"
    merge: Merge = Merge()
    bits: int = 4
    group_size: int = 128
    bpw: float | None = None
    gptq: GPTQParams = GPTQParams()
    moe: MoESettings | None = None  # None: the defaults (routed, 0.5%, all-token fallback)
    calibration: Calibration = Calibration()
    eval: Eval = Eval()
    output_dir: str = "out/{name}-{method}-{bits}bit"
    device: str = "auto"
    batch_size: int = Field(8, ge=1)
    resources: Resources

    @model_validator(mode="after")
    def _merge_source(self):
        m = self.merge
        if (m.base_quant, m.base_quant_dtype, m.axolotl_config) != (None, None, None) and not self.source.needs_merge:
            raise ValueError("merge settings need a source to merge (base+adapter or litgpt+lora), not source.model")
        if m.axolotl_config is not None and self.source.litgpt is not None:
            raise ValueError("merge.axolotl_config is for a PEFT adapter (source.base+adapter); Lit-GPT's "
                             "hyperparameters.yaml is read from source.lora")
        if m.base_quant not in (None, "none") and self.source.litgpt is not None and self.source.lora is None:
            raise ValueError("merge.base_quant applies to a LoRA trained on a 4-bit base; source.litgpt without "
                             "source.lora is a full checkpoint")
        return self

    @model_validator(mode="after")
    def _method_bits(self):
        if self.method == "awq" and self.bits != 4:
            raise ValueError(f"method awq: the AWQ GEMM format is 4-bit only (bits={self.bits}); use bits 4, or method gptq/exl2")
        if self.method == "fp8":
            self.bits = 8  # FP8 W8A8 has one width
        if self.format == "gguf" and self.method != "gguf":
            raise ValueError(f"format gguf is written by method gguf (set method: gguf), not {self.method}")
        if self.method == "gguf":
            from ..formats.gguf_mix import check_file_type

            by_bits = {4: "Q4_K_M", 5: "Q5_K_M", 6: "Q6_K", 8: "Q8_0", 16: "BF16"}
            if self.gguf_type is None and self.bits not in by_bits:
                raise ValueError(f"method gguf: bits {self.bits} has no GGUF type; use bits 4, 5, 6, 8 or 16, or gguf_type")
            self.gguf_type = check_file_type(self.gguf_type or by_bits[self.bits])
        native = self.native_format()
        allowed = {native, "compressed-tensors"} if self.method in ("gptq", "rtn", "awq") else {native}
        if self.format is not None and self.format not in allowed:
            raise ValueError(f"method {self.method} writes format {' or '.join(sorted(allowed))}, not {self.format!r}")
        if self.method == "exl2" and self.bpw is None:
            self.bpw = float(self.bits)
        return self

    def native_format(self) -> str:
        return {"gptq": "gptq", "rtn": "gptq", "awq": "awq", "exl2": "exl2", "fp8": "compressed-tensors",
                "gguf": "gguf"}[self.method]

    def out_dir(self) -> Path:
        fmt = self.format or self.native_format()
        path = Path(self.output_dir.format(name=self.name, method=self.method, bits=self.bits,
                                           group_size=self.group_size, bpw=self.bpw, format=fmt))
        if fmt != self.native_format() and "{format}" not in self.output_dir:
            path = path.with_name(f"{path.name}-{fmt}")  # never the same directory as the method's own format
        return path


_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand(value: Any, where: str) -> Any:
    if isinstance(value, dict):
        return {k: _expand(v, f"{where}.{k}" if where else k) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, where) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        var, default = m.group(1), m.group(2)
        if var in os.environ and os.environ[var] != "":
            return os.environ[var]
        if default is not None:
            return default
        raise InputError(f"recipe key {where}: environment variable {var} is not set; export {var}=... or use --set {where}=...")

    return _ENV.sub(sub, value)


def _set_dotted(data: dict, dotted: str, raw: str) -> None:
    keys = dotted.split(".")
    cur = data
    for k in keys[:-1]:
        cur = cur.setdefault(k, {})
        if not isinstance(cur, dict):
            raise InputError(f"--set {dotted}: {k} is not a section")
    cur[keys[-1]] = yaml.safe_load(raw) if raw != "" else None


def load_recipe(path: Path, overrides: list[str] | None = None) -> Recipe:
    path = Path(path)
    if not path.is_file():
        avail = ", ".join(sorted(p.stem for p in path.parent.glob("*.yaml"))) if path.parent.is_dir() else "none"
        raise InputError(f"{path}: no such recipe; available in {path.parent}: {avail}")
    data = load_yaml_mapping(path, not_mapping="a recipe is a YAML mapping")
    for ov in overrides or []:
        key, sep, val = ov.partition("=")
        if not sep:
            raise InputError(f"--set {ov!r}: expected KEY=VALUE (e.g. --set calibration.samples=64)")
        _set_dotted(data, key.strip(), val.strip())
    data = _expand(data, "")
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise invalid(path, "recipe", e) from None
