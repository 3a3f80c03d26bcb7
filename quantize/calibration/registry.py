"""The registry of named calibration / evaluation datasets (``calibration/registry.yaml``).

Bundled entries are text files shipped next to the registry; hub entries name a Hugging Face
dataset. The registry directory is found, in order, from ``$QUANTIZE_CALIBRATION_DIR``, the
repository checkout the package lives in (editable installs), and ``./calibration``.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from ..errors import InputError, invalid
from ..manifest import check_relative

ENV_DIR = "QUANTIZE_CALIBRATION_DIR"
REGISTRY_NAME = "registry.yaml"


class DatasetEntry(BaseModel):
    """One named dataset. Bundled: ``path``; hub: ``repo`` (+ ``config``, ``data_files``, ``revision``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: Literal["bundled", "hub"]
    purpose: Literal["calibration", "eval"] = "calibration"
    path: str | None = None  # bundled: relative to the registry directory
    repo: str | None = None
    config: str | None = None
    revision: str | None = None
    data_files: str | dict[str, str] | None = None
    split: str
    text_field: str = "text"
    join: Literal["eos", "concat"] = "eos"
    licence: str
    description: str

    @field_validator("path")
    @classmethod
    def _relative(cls, v: str | None) -> str | None:
        return None if v is None else check_relative(v)

    @model_validator(mode="after")
    def _one_location(self) -> DatasetEntry:
        if self.source == "bundled" and (self.path is None or self.repo is not None):
            raise ValueError("a bundled entry needs `path` and no `repo`")
        if self.source == "hub" and (self.repo is None or self.path is not None):
            raise ValueError("a hub entry needs `repo` and no `path`")
        return self


class Registry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    version: Literal[1]
    datasets: dict[str, DatasetEntry]

    def names(self, source: str | None = None) -> list[str]:
        return [n for n, e in self.datasets.items() if source is None or e.source == source]


def _candidates() -> list[Path]:
    return [Path(__file__).resolve().parents[2] / "calibration", Path.cwd() / "calibration"]


def find_calibration_dir() -> Path | None:
    """The directory holding ``registry.yaml``, or None when there is none (a broken override raises)."""
    env = os.environ.get(ENV_DIR)
    if env:
        d = Path(env).expanduser()
        if not (d / REGISTRY_NAME).is_file():
            raise InputError(f"${ENV_DIR}={env}: no {REGISTRY_NAME} there; point it at the calibration/ directory")
        return d.resolve()
    return next((d for d in _candidates() if (d / REGISTRY_NAME).is_file()), None)


def calibration_dir() -> Path:
    """The directory holding ``registry.yaml`` and the bundled corpora."""
    d = find_calibration_dir()
    if d is not None:
        return d
    candidates = _candidates()
    raise InputError(
        f"bundled calibration data not found (looked in {', '.join(str(c) for c in candidates)}); "
        f"set ${ENV_DIR} to the repository's calibration/ directory or pass a local file as --dataset"
    )


@functools.lru_cache(maxsize=8)
def _load(path: Path, mtime_ns: int) -> Registry:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise InputError(f"{path}: cannot be read as YAML ({e})") from None
    try:
        return Registry.model_validate(data)
    except ValidationError as e:
        raise invalid(path, "registry", e) from None


def load_registry(directory: Path | None = None) -> Registry:
    path = Path(directory or calibration_dir()) / REGISTRY_NAME
    return _load(path.resolve(), path.stat().st_mtime_ns)


def bundled_file(entry: DatasetEntry, directory: Path | None = None) -> Path:
    """The file a bundled entry points at (checked to exist)."""
    assert entry.source == "bundled" and entry.path is not None
    path = Path(directory or calibration_dir()) / entry.path
    if not path.is_file():
        raise InputError(f"{path}: bundled dataset file is missing; restore it from the repository (git checkout)")
    return path
