"""Resolve ``--dataset NAME|PATH`` into documents plus a dataset identity for the manifest.

Resolution order:

1. a name in ``calibration/registry.yaml`` (bundled file, or hub entry);
2. an existing path: ``.txt`` (the whole file is one document), ``.jsonl`` / ``.json`` /
   ``.parquet`` (one document per row, read through ``datasets`` with ``text_field``), or a
   directory of such files (all of one kind; a directory of ``.txt`` files is one document per file);
3. a hub id ``org/name[:config]``, loaded through ``datasets`` unless the hub is offline.

The identity records where the text came from and a fingerprint: the sha256 of the file bytes for
local and bundled data, the ``datasets`` fingerprint for hub data.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict

from ..errors import InputError
from ..manifest import InputRecord, describe_input, sha256_file
from . import registry as reg

TEXT_SUFFIXES = (".txt",)
ROW_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?(:[\w.-]+)?$")
_TRUE = {"1", "on", "yes", "true"}
DEFAULT_TEXT_FIELD = "text"
DEFAULT_HUB_SPLIT = "train"
LOCAL_SPLIT = "train"  # what `datasets` calls the only split of local data files


class DatasetIdentity(BaseModel):
    """Where the calibration text came from; recorded in the sample manifest's params."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    kind: Literal["bundled", "local", "hub"]
    path: str | None = None  # bundled: relative to the calibration dir; local: as given
    repo: str | None = None
    config: str | None = None
    revision: str | None = None
    split: str | None = None
    text_field: str | None = None  # None for plain text files
    join: Literal["eos", "concat"] = "eos"
    fingerprint: str


@dataclass(frozen=True)
class Corpus:
    """Documents in source order, how to join them, and where they came from."""

    documents: list[str]
    identity: DatasetIdentity
    input_path: Path | None = None  # file or directory to hash into the manifest (None: hub)
    input_files: list[str] | None = None  # files under a directory input

    def input_record(self, role: str = "dataset") -> InputRecord:
        if self.input_path is None:
            repo = self.identity.repo + (f":{self.identity.config}" if self.identity.config else "")
            return InputRecord(role=role, path=f"hub:{repo}")
        return describe_input(role, self.input_path, self.input_files)


# ----------------------------------------------------------------------------------------------


def resolve_dataset(spec: str, *, text_field: str | None = None, split: str | None = None) -> Corpus:
    """Load the documents named by ``spec`` (a registry name, a local path, or a hub id)."""
    spec = (spec or "").strip()
    if not spec:
        raise InputError("--dataset is empty; pass a registry name (e.g. wikitext2) or a local .txt/.jsonl/.parquet")
    registry = _registry_or_none()
    if registry is not None and spec in registry.datasets:
        return _from_registry(spec, registry.datasets[spec], text_field, split)

    path = Path(spec).expanduser()
    if path.is_file():
        return _from_file(spec, path, text_field, split)
    if path.is_dir():
        return _from_directory(spec, path, text_field, split)
    if path.suffix.lower() in (*TEXT_SUFFIXES, *ROW_SUFFIXES) or spec.startswith((".", "/", "~")):
        raise InputError(
            f"dataset '{spec}': no such file or directory; pass an existing path or one of: {_bundled_names()}"
        )
    if not _HUB_ID.match(spec):
        raise InputError(
            f"dataset '{spec}': not a registry name, local path or hub id (org/name[:config]); "
            f"use one of: {_bundled_names()}"
        )
    repo, _, config = spec.partition(":")
    return _from_hub(
        spec, repo, config or None, None, None, split or DEFAULT_HUB_SPLIT, text_field or DEFAULT_TEXT_FIELD, "eos"
    )


# ----------------------------------------------------------------------------------------------
# registry


def _registry_or_none() -> reg.Registry | None:
    """The registry; None when no calibration directory exists (local paths still work then)."""
    directory = reg.find_calibration_dir()
    return None if directory is None else reg.load_registry(directory)


def _bundled_names() -> str:
    registry = _registry_or_none()
    names = registry.names("bundled") if registry else []
    return ", ".join(names) if names else "(no bundled datasets found)"


def _from_registry(name: str, entry: reg.DatasetEntry, text_field: str | None, split: str | None) -> Corpus:
    if split is not None and split != entry.split:
        raise InputError(
            f"dataset '{name}' is the {entry.split!r} split; --split {split} does not apply "
            f"(drop --split, or pass the hub id{f' {entry.repo}' if entry.repo else ''} to choose a split)"
        )
    if entry.source == "hub":
        return _from_hub(
            name, entry.repo, entry.config, entry.revision, entry.data_files, entry.split,
            text_field or entry.text_field, entry.join,
        )
    path = reg.bundled_file(entry)
    identity = DatasetIdentity(
        name=name, kind="bundled", path=entry.path, split=entry.split, join="concat",
        fingerprint=sha256_file(path),
    )
    return Corpus([_read_text(path)], identity, input_path=path)


# ----------------------------------------------------------------------------------------------
# local files


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text (byte {e.start}); convert it to UTF-8") from None


def _check_local_split(spec: str, split: str | None) -> None:
    if split not in (None, LOCAL_SPLIT):
        raise InputError(f"dataset '{spec}': local files have a single split; drop --split {split}")


def _from_file(spec: str, path: Path, text_field: str | None, split: str | None) -> Corpus:
    _check_local_split(spec, split)
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        identity = DatasetIdentity(
            name=spec, kind="local", path=str(path), join="concat", fingerprint=sha256_file(path)
        )
        return Corpus([_read_text(path)], identity, input_path=path)
    if suffix in ROW_SUFFIXES:
        field = text_field or DEFAULT_TEXT_FIELD
        docs = _load_rows(spec, ROW_SUFFIXES[suffix], [path], field)
        identity = DatasetIdentity(
            name=spec, kind="local", path=str(path), split=LOCAL_SPLIT, text_field=field, fingerprint=sha256_file(path)
        )
        return Corpus(docs, identity, input_path=path)
    raise InputError(f"{path}: unsupported file type {suffix or '(none)'}; use .txt, .jsonl, .json or .parquet")


def _from_directory(spec: str, root: Path, text_field: str | None, split: str | None) -> Corpus:
    _check_local_split(spec, split)
    supported = (*TEXT_SUFFIXES, *ROW_SUFFIXES)
    files = []
    for p in root.rglob("*"):
        rel = p.relative_to(root)
        if p.is_file() and p.suffix.lower() in supported and not any(s.startswith(".") for s in rel.parts):
            files.append(rel.as_posix())  # hidden files and folders are skipped
    files.sort()
    if not files:
        raise InputError(f"{root}: no .txt, .jsonl, .json or .parquet files in this directory")
    kinds = {"text" if Path(f).suffix.lower() in TEXT_SUFFIXES else ROW_SUFFIXES[Path(f).suffix.lower()] for f in files}
    if len(kinds) > 1:
        raise InputError(f"{root}: mixes {' and '.join(sorted(kinds))} files; keep one kind per dataset directory")
    # fingerprint: every file's path and content hash, in sorted order
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f}\0{sha256_file(root / f)}\n".encode())
    kind = kinds.pop()
    if kind == "text":
        docs = [_read_text(root / f) for f in files]
        identity = DatasetIdentity(name=spec, kind="local", path=str(root), fingerprint=h.hexdigest())
    else:
        field = text_field or DEFAULT_TEXT_FIELD
        docs = _load_rows(spec, kind, [root / f for f in files], field)
        identity = DatasetIdentity(
            name=spec, kind="local", path=str(root), split=LOCAL_SPLIT, text_field=field, fingerprint=h.hexdigest()
        )
    return Corpus(docs, identity, input_path=root, input_files=files)


def _load_rows(spec: str, builder: str, paths: list[Path], field: str) -> list[str]:
    """Rows of local json/parquet files through ``datasets`` (cache in a throw-away directory)."""
    import datasets

    where = str(paths[0]) if len(paths) == 1 else f"{paths[0].parent}/"
    tmp = tempfile.TemporaryDirectory(prefix="quantize-datasets-", ignore_cleanup_errors=True)
    with tmp as cache, _quiet_datasets():
        try:
            ds = datasets.load_dataset(
                builder, data_files=[str(p) for p in paths], split=LOCAL_SPLIT, cache_dir=cache
            )
        except Exception as e:  # noqa: BLE001 - any parse failure is a bad input file
            msg = " ".join(str(e).split())[:300]
            raise InputError(f"{where}: cannot be read as {builder} ({type(e).__name__}: {msg})") from None
        return _texts(ds, field, where)


def _texts(ds, field: str, where: str, keep_blank: bool = False) -> list[str]:
    """The strings of column ``field`` (blank ones dropped unless ``keep_blank``: they are lines of
    one text); a missing column lists the available ones."""
    if field not in ds.column_names:
        raise InputError(
            f"{where}: no field {field!r}; available columns: {', '.join(ds.column_names) or '(none)'}; "
            f"pass --text-field with one of them"
        )
    out = []
    for i, value in enumerate(ds[field]):
        if value is None:
            continue
        if not isinstance(value, str):
            raise InputError(
                f"{where}: field {field!r} holds {type(value).__name__} (row {i}), not text; pass another --text-field"
            )
        if keep_blank or value.strip():
            out.append(value)
    return out


# ----------------------------------------------------------------------------------------------
# hub


def hub_offline() -> bool:
    """True when the user asked for offline mode (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)."""
    return any(os.environ.get(k, "").strip().lower() in _TRUE for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


def hub_reachable(timeout: float = 3.0) -> bool:
    """A TCP connect to the hub endpoint (fails fast instead of minutes of HTTP retries).

    With a proxy configured the direct probe says nothing, so it is skipped (True).
    """
    if any(os.environ.get(k) for k in _PROXY_VARS):
        return True
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        with socket.create_connection((endpoint.hostname or "huggingface.co", port), timeout=timeout):
            return True
    except OSError:
        return False


def _offline_error(name: str, repo: str) -> InputError:
    if repo != name:  # a registry entry that lives on the hub
        what = f"dataset '{name}' ({repo}) is on the hub, which is unreachable (offline)"
    else:
        what = f"dataset '{name}': not a local file or bundled name, and the hub is unreachable (offline)"
    return InputError(f"{what}; pass a local .txt/.jsonl/.parquet or one of: {_bundled_names()}")


def _from_hub(
    name: str,
    repo: str,
    config: str | None,
    revision: str | None,
    data_files,
    split: str,
    field: str,
    join: Literal["eos", "concat"],
) -> Corpus:
    if hub_offline() or not hub_reachable():
        raise _offline_error(name, repo)
    import datasets

    cache = os.environ.get("QUANTIZE_DATASETS_CACHE")  # None: the usual HF datasets cache
    with _quiet_datasets():
        try:
            ds = datasets.load_dataset(
                repo, config, data_files=data_files, split=split, revision=revision, cache_dir=cache
            )
        except (ConnectionError, TimeoutError):  # DNS failure, refused, offline mode, retries exhausted
            raise _offline_error(name, repo) from None
        except datasets.exceptions.DatasetNotFoundError:
            raise InputError(
                f"dataset '{name}': {repo} not found on the hub (or gated: log in with `hf auth login`); "
                f"pass a local .txt/.jsonl/.parquet or one of: {_bundled_names()}"
            ) from None
        except (ValueError, FileNotFoundError) as e:  # unknown config / split / data files
            raise InputError(f"dataset '{name}' ({repo}): {' '.join(str(e).split())[:300]}") from None
        docs = _texts(ds, field, f"dataset '{name}' ({repo}, split {split})", keep_blank=join == "concat")
    identity = DatasetIdentity(
        name=name, kind="hub", repo=repo, config=config, revision=revision, split=split, text_field=field,
        join=join, fingerprint=getattr(ds, "_fingerprint", None) or "unknown",
    )
    if join == "concat":  # rows are lines of one text
        docs = ["".join(docs)]
    return Corpus(docs, identity)


@contextlib.contextmanager
def _quiet_datasets():
    """No progress bars or info/retry logging from ``datasets`` / ``huggingface_hub`` while we load
    (restored afterwards)."""
    import datasets
    from datasets.utils import logging as dlog
    from huggingface_hub.utils import logging as hlog

    bars = datasets.is_progress_bar_enabled()
    levels = dlog.get_verbosity(), hlog.get_verbosity()
    datasets.disable_progress_bars()
    dlog.set_verbosity_error()
    hlog.set_verbosity_error()
    try:
        yield
    finally:
        dlog.set_verbosity(levels[0])
        hlog.set_verbosity(levels[1])
        if bars:
            datasets.enable_progress_bars()
