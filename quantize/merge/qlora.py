"""Which base a (Q)LoRA adapter was trained against, and which tensors bitsandbytes quantized there.

A QLoRA adapter was optimised against the bitsandbytes 4-bit round trip of the base's linear weights
(MERGE.md §5.3). ``merge --base-quant`` reproduces it (:mod:`bnb4`); this module decides the setting
and records why:

* explicit ``--base-quant`` / ``--base-quant-dtype`` (a recipe's ``merge.base_quant``);
* what the training run recorded: Lit-GPT ``hyperparameters.yaml`` (``quantize: bnb.nf4[-dq]``,
  ``precision``), an Axolotl config (``adapter: qlora`` + ``load_in_4bit``, ``bnb_4bit_*`` keys,
  ``bnb_config_kwargs``), a PEFT adapter directory whose ``config.json`` carries the 4-bit
  ``quantization_config`` of the training model, or whose ``README.md`` has PEFT's
  "The following `bitsandbytes` quantization config was used during training" block;
* otherwise none (the 16-bit base, as every other merge tool does).

An explicit choice that contradicts a record is refused (exit 2): merging onto the wrong base is
the silent error this option exists to remove.

Which tensors: the weights of the modules bitsandbytes replaced by ``Linear4bit`` while training.
transformers (PEFT, Axolotl) converts every ``nn.Linear`` except the output embedding (``lm_head``)
and ``llm_int8_skip_modules``; Lightning's ``BitsandbytesPrecision`` (Lit-GPT) converts every
``nn.Linear`` including ``lm_head``. Embeddings and norms are never quantized.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict

from ..errors import InputError
from ..io.yamlfile import load_yaml_mapping
from .bnb4 import BASE_QUANT_DTYPES, BASE_QUANTS, BLOCKSIZE, NESTED_BLOCKSIZE, Bnb4Setting

RECORD_VERSION = 1
_DTYPE_NAMES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "bf16": "bf16", "fp16": "fp16",
                "fp32": "fp32", "half": "fp16", "float": "fp32"}
_PEFT_CARD_MARK = "The following `bitsandbytes` quantization config was used during training:"


class BaseQuantRecord(BaseModel):
    """``params.base_quant`` of a merge manifest: what base the adapter was merged onto, and why."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: Literal[1] = RECORD_VERSION
    method: Literal["none", "nf4", "nf4-dq", "fp4", "fp4-dq"]
    dtype: Literal["bf16", "fp16", "fp32"] | None = None  # the weights' dtype when quantized/dequantized
    blocksize: int | None = None
    nested_blocksize: int | None = None  # double quantization of the absmax statistics
    source: str  # "--base-quant", a file, or "default"
    reason: str
    dtype_source: str | None = None
    lm_head_quantized: bool | None = None
    skip_modules: list[str] = []
    tensors: int | None = None  # base tensors replaced by their round trip (filled in by the planner)


@dataclass(frozen=True)
class TrainingRecord:
    """What one training artefact says about the base the adapter saw."""

    source: str  # file (and key) that says it
    method: str  # one of BASE_QUANTS
    dtype: str | None = None  # bf16 / fp16 / fp32 when the artefact says
    skip_modules: tuple[str, ...] = ()
    blocksize: int | None = None


@dataclass(frozen=True)
class BaseQuant:
    """The resolved setting (``setting`` None: merge onto the 16-bit base) and its manifest record."""

    setting: Bnb4Setting | None
    record: BaseQuantRecord
    skip_modules: tuple[str, ...] = field(default=())

    @property
    def method(self) -> str:
        return self.record.method


# ---------------------------------------------------------------------------------------------
# reading what the training run recorded


def _dtype_name(value: Any) -> str | None:
    if value is None:
        return None
    name = str(value).removeprefix("torch.")
    return _DTYPE_NAMES.get(name)


def _truthy(value: Any) -> bool:
    return value is True or (isinstance(value, str) and value.strip().lower() in ("true", "yes", "1", "auto"))


def _from_bnb_config(qc: Mapping[str, Any], source: str) -> TrainingRecord | None:
    """A transformers ``BitsAndBytesConfig`` (dict form); None when it is not a 4-bit config."""
    if str(qc.get("quant_method", "bitsandbytes")) != "bitsandbytes":
        return TrainingRecord(source, f"unsupported:{qc.get('quant_method')}")
    if not (_truthy(qc.get("load_in_4bit")) or _truthy(qc.get("_load_in_4bit"))):
        if _truthy(qc.get("load_in_8bit")) or _truthy(qc.get("_load_in_8bit")):
            return TrainingRecord(source, "unsupported:bitsandbytes 8-bit (LLM.int8)")
        return None
    qt = str(qc.get("bnb_4bit_quant_type") or "fp4")  # BitsAndBytesConfig's default
    dq = _truthy(qc.get("bnb_4bit_use_double_quant"))
    skip = qc.get("llm_int8_skip_modules") or ()
    return TrainingRecord(source, qt + ("-dq" if dq else ""), _dtype_name(qc.get("bnb_4bit_compute_dtype")),
                          tuple(skip) if isinstance(skip, (list, tuple)) else (str(skip),))


def _read_card(path: Path) -> TrainingRecord | None:
    """PEFT's adapter model card lists the training model's quantization config as ``- key: value``."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    at = text.find(_PEFT_CARD_MARK)
    if at < 0:
        return None
    qc: dict[str, Any] = {}
    for line in text[at + len(_PEFT_CARD_MARK):].splitlines()[1:]:
        m = re.match(r"^- ([A-Za-z0-9_]+): (.*)$", line.strip())
        if not m:
            break
        key, raw = m.groups()
        try:
            qc[key] = yaml.safe_load(raw)
        except yaml.YAMLError:
            qc[key] = raw
    return _from_bnb_config(qc, f"{path} (bitsandbytes config block)")


def peft_records(adapter_dir: Path) -> list[TrainingRecord]:
    """Records of a PEFT adapter directory: its ``config.json`` (the training model's config, as
    Axolotl and HF Trainer runs leave it) and its ``README.md`` (PEFT's model card)."""
    records = []
    cfg_path = Path(adapter_dir) / "config.json"
    if cfg_path.is_file():
        try:
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(f"{cfg_path}: not valid JSON ({e}); fix or remove it") from None
        qc = cfg.get("quantization_config") if isinstance(cfg, dict) else None
        if isinstance(qc, dict):
            rec = _from_bnb_config(qc, f"{cfg_path} quantization_config")
            if rec is not None:
                records.append(rec)
    card = Path(adapter_dir) / "README.md"
    if card.is_file():
        rec = _read_card(card)
        if rec is not None:
            records.append(rec)
    return records


def axolotl_record(path: Path) -> TrainingRecord:
    """An Axolotl training YAML: ``adapter: qlora`` with ``load_in_4bit`` loads the base through
    bitsandbytes as NF4 with double quantization in ``torch_dtype`` (``bf16``/``fp16`` flags), unless
    ``bnb_4bit_*`` keys or ``bnb_config_kwargs`` say otherwise; anything else trained on the 16-bit base."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"--axolotl-config {path}: no such file; pass the YAML the adapter was trained with")
    cfg = load_yaml_mapping(path, not_mapping="is not a YAML mapping; pass the Axolotl training config",
                            fix="pass the Axolotl training config")
    if _truthy(cfg.get("bf16")) or _truthy(cfg.get("bfloat16")):
        dtype = "bf16"
    elif _truthy(cfg.get("fp16")) or _truthy(cfg.get("float16")) or _truthy(cfg.get("load_in_8bit")):
        dtype = "fp16"
    else:
        dtype = "fp32"
    if _truthy(cfg.get("load_in_8bit")):
        return TrainingRecord(f"{path} load_in_8bit", "unsupported:bitsandbytes 8-bit (LLM.int8)", dtype)
    if not (cfg.get("adapter") == "qlora" and _truthy(cfg.get("load_in_4bit"))):
        why = "load_in_4bit" if cfg.get("adapter") == "qlora" else f"adapter: {cfg.get('adapter')}"
        return TrainingRecord(f"{path} (no {why})" if cfg.get("adapter") == "qlora" else f"{path} ({why})", "none", dtype)
    bnb: dict[str, Any] = {"bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True}
    bnb.update({k: v for k, v in cfg.items() if k.startswith("bnb_4bit_") or k == "llm_int8_skip_modules"})
    if isinstance(cfg.get("bnb_config_kwargs"), dict):
        bnb.update(cfg["bnb_config_kwargs"])
    qt = str(bnb["bnb_4bit_quant_type"])
    dq = _truthy(bnb["bnb_4bit_use_double_quant"])
    skip = bnb.get("llm_int8_skip_modules") or ()
    return TrainingRecord(f"{path} (adapter: qlora, load_in_4bit)", qt + ("-dq" if dq else ""), dtype,
                          tuple(skip) if isinstance(skip, (list, tuple)) else (str(skip),))


def litgpt_record(hparams: Mapping[str, Any], path: Path) -> TrainingRecord:
    """Lit-GPT ``hyperparameters.yaml``: ``quantize: bnb.nf4|bnb.nf4-dq|bnb.fp4|bnb.fp4-dq`` and the
    ``precision`` the weights were loaded in (``bf16-true`` / ``16-true`` / ``32-true``)."""
    q = hparams.get("quantize")
    prec = str(hparams.get("precision") or "")
    dtype = {"bf16-true": "bf16", "16-true": "fp16", "32-true": "fp32"}.get(prec)
    if q in (None, "", "null"):
        return TrainingRecord(f"{path} (quantize: null)", "none", dtype)
    q = str(q)
    method = q.removeprefix("bnb.")
    if not q.startswith("bnb.") or method not in BASE_QUANTS:
        return TrainingRecord(f"{path} (quantize: {q})", f"unsupported:{q}", dtype)
    return TrainingRecord(f"{path} (quantize: {q}, precision: {prec or '?'})", method, dtype)


# ---------------------------------------------------------------------------------------------
# deciding


def resolve(
    requested: str | None,
    requested_dtype: str | None,
    records: Iterable[TrainingRecord],
    base_dtype: torch.dtype,
    *,
    lm_head_quantized: bool,
) -> BaseQuant:
    """The setting to merge with. ``requested``/``requested_dtype``: the user's choice (None: not given).

    A record naming a 4-bit base decides when nothing is requested; a request contradicting a record
    is refused; records contradicting each other are refused. The dtype comes from the request, else
    the record, else the base checkpoint's dtype (the dtype transformers loads it in by default).
    """
    from .. import log

    if requested is not None and requested not in BASE_QUANTS:
        raise InputError(f"--base-quant {requested!r} is not one of {', '.join(BASE_QUANTS)}")
    records = list(records)
    for r in [r for r in records if r.method.startswith("unsupported:")]:
        what = r.method.removeprefix("unsupported:")
        if requested not in (None, "none"):
            raise InputError(
                f"{r.source}: the adapter was trained on a {what} base, which --base-quant cannot reproduce "
                "(bitsandbytes 4-bit only); drop --base-quant to merge onto the 16-bit base"
            )
        log.warning(f"{r.source}: the adapter was trained on a {what} base; merging onto the 16-bit base (not reproduced)")
        records.remove(r)
    methods = {r.method for r in records}
    if len(methods) > 1:
        a, b = records[0], next(r for r in records if r.method != records[0].method)
        raise InputError(
            f"{a.source} says the base was {a.method} but {b.source} says {b.method}: the training records "
            "disagree; pass --base-quant explicitly after checking which run produced this adapter"
        )
    recorded = records[0] if records else None
    if requested == "none" and recorded is not None and recorded.method != "none":
        log.warning(f"{recorded.source} records a {recorded.method} base; merging onto the 16-bit base as requested")
    elif requested is not None and recorded is not None and requested != recorded.method:
        raise InputError(
            f"--base-quant {requested} does not match the base the adapter was trained on: {recorded.source} "
            f"records {recorded.method}; drop --base-quant (or pass {recorded.method})"
        )
    if requested is not None:
        method, source = requested, "--base-quant"
        reason = "requested" + (f"; the training run recorded {recorded.method} ({recorded.source})" if recorded else "")
    elif recorded is not None:
        method, source = recorded.method, recorded.source
        reason = "recorded by the training run"
    else:
        method, source, reason = "none", "default", "no training record of a quantized base; merged onto the 16-bit base"
    if method == "none":
        return BaseQuant(None, BaseQuantRecord(method="none", source=source, reason=reason))

    base_name = _dtype_name(str(base_dtype))
    if requested_dtype is not None:
        dtype, dtype_source = requested_dtype, "--base-quant-dtype"
    elif recorded is not None and recorded.dtype is not None:
        dtype, dtype_source = recorded.dtype, recorded.source
    elif base_name in ("bf16", "fp16", "fp32"):
        dtype, dtype_source = base_name, "the base checkpoint's dtype"
    else:
        dtype, dtype_source = "bf16", "default"
    if dtype not in BASE_QUANT_DTYPES:
        raise InputError(f"--base-quant-dtype {dtype!r} is not one of {', '.join(BASE_QUANT_DTYPES)}")
    skip = tuple(recorded.skip_modules) if recorded is not None else ()
    setting = Bnb4Setting.parse(method, dtype, BLOCKSIZE)
    record = BaseQuantRecord(
        method=method, dtype=dtype, blocksize=setting.blocksize,
        nested_blocksize=NESTED_BLOCKSIZE if setting.double_quant else None, source=source, reason=reason,
        dtype_source=dtype_source, lm_head_quantized=lm_head_quantized, skip_modules=list(skip),
    )
    return BaseQuant(setting, record, skip)


def apply_to_jobs(jobs: Iterable[Any], bq: BaseQuant, selects: Any) -> BaseQuant:
    """Put the round trip first on every :class:`~stream.TensorJob` whose output ``selects``
    (a predicate on the tensor name) and that starts from the base tensor; returns ``bq`` with the
    count recorded. A job whose tensor is replaced by the adapter (``modules_to_save``) is left alone."""
    from .bnb4 import Bnb4RoundTrip
    from .stream import Replace, TensorJob

    if bq.setting is None:
        return bq
    n = 0
    for job in jobs:
        if isinstance(job, TensorJob) and job.source is not None and selects(job.name):
            if job.updates and isinstance(job.updates[0], Replace):
                continue
            job.updates.insert(0, Bnb4RoundTrip(bq.setting))
            n += 1
    return BaseQuant(bq.setting, bq.record.model_copy(update={"tensors": n}), bq.skip_modules)


def skipped(module: str, patterns: Iterable[str]) -> bool:
    """transformers' ``should_convert_module`` inverted: ``module`` matches a skip pattern from the
    start up to a module boundary, as a regex with that boundary, or as a suffix."""
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    for key in patterns:
        try:
            if re.match(rf"(?:{key}){boundary}", module):
                return True
        except re.error:
            pass
        if module.endswith(key):
            return True
    return False
