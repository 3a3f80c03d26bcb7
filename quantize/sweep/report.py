"""The sweep's result: one row per run (run, status, time, size, KL, gate), printed as a table and
written as ``OUTPUT_DIR/sweep.json`` (typed; each run's manifest hash, so the row points at the
exact run directory it describes)."""

from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .. import __version__
from .. import manifest as mf

SCHEMA_VERSION = 1
RunStatus = Literal["done", "skipped", "failed", "not run"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RunRecord(_Strict):
    name: str
    status: RunStatus
    command: str  # the `quantize run` command line that makes this run
    out: str
    seconds: float | None = None  # wall time of the task (done, failed) or of the stages (skipped)
    size_bytes: int | None = None  # the quantized model's files (model/ outputs in its manifest)
    kl: float | None = None  # eval: mean KL divergence to the unquantized model
    perplexity: float | None = None
    gate: Literal["pass", "fail"] | None = None  # eval's max_ppl_increase gate; None: no gate
    error: str | None = None  # the one line a failed run ended with
    exit_code: int | None = None
    attempts: int | None = None
    threads: int | None = None  # CPU threads of the run (torch on CPU rounds by its thread count)
    resumed_layers: list[int] = Field(default_factory=list)
    manifest_sha256: str | None = None  # the run's manifest.json
    calibration_manifest_sha256: str | None = None  # the calibration set the quantize stage used
    resources: dict[str, Any] = Field(default_factory=dict)


class SweepReport(_Strict):
    schema_version: int = SCHEMA_VERSION
    tool_version: str = __version__
    sweep: str
    file: str
    file_sha256: str
    ray: str  # "local" (embedded instance) or the cluster address
    created: str = Field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat())
    seconds: float
    runs: list[RunRecord]


def _manifest(d: Path) -> mf.Manifest | None:
    try:
        return mf.load_manifest(d) if d.is_dir() else None
    except Exception:  # noqa: BLE001 - a broken manifest is reported as missing figures, not a crash
        return None


def fill_from_manifests(rec: RunRecord) -> RunRecord:
    """Size, KL, gate and hashes from the run directory's manifests (whatever exists)."""
    out = Path(rec.out)
    upd: dict[str, Any] = {}
    run = _manifest(out)
    if run is not None and run.status == "complete":
        upd["manifest_sha256"] = mf.manifest_sha256(out)
        if rec.seconds is None:
            upd["seconds"] = round(sum(s.get("seconds", 0) for s in run.metrics.get("stages", [])), 2)
    model = _manifest(out / "model")
    if model is not None and model.status == "complete":
        upd["size_bytes"] = sum(o.bytes for o in model.outputs)
        cal = next((i for i in model.inputs if i.role == "calibration"), None)
        if cal is not None:
            upd["calibration_manifest_sha256"] = cal.manifest_sha256
    ev = _manifest(out / "eval")
    if ev is not None:
        upd["kl"] = ev.metrics.get("kl")
        upd["perplexity"] = ev.metrics.get("perplexity")
        gate = ev.metrics.get("gate")
        if isinstance(gate, dict) and "passed" in gate:
            upd["gate"] = "pass" if gate["passed"] else "fail"
    return rec.model_copy(update=upd)


def write_report(root: Path, report: SweepReport) -> Path:
    path = Path(root) / "sweep.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report.model_dump(mode="json"), indent=2) + "\n")
    os.replace(tmp, path)
    return path


def table(runs: list[RunRecord]) -> str:
    w = max([len("run")] + [len(r.name) for r in runs])
    lines = [f"{'run':<{w}}  {'status':<8} {'time s':>8} {'size MB':>9} {'KL':>10}  {'gate':<5} error"]
    for r in runs:
        t = f"{r.seconds:8.1f}" if r.seconds is not None else f"{'-':>8}"
        size = f"{r.size_bytes / 1e6:9.2f}" if r.size_bytes is not None else f"{'-':>9}"
        kl = f"{r.kl:10.6f}" if r.kl is not None else f"{'-':>10}"
        lines.append(f"{r.name:<{w}}  {r.status:<8} {t} {size} {kl}  {r.gate or '-':<5} {r.error or ''}".rstrip())
    return "\n".join(lines)
