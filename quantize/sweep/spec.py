"""Typed sweep files (``recipes/sweeps/*.yaml``) and their expansion into runs.

A sweep names recipes and a matrix of recipe overrides; every combination is one run, and a run is
exactly ``quantize run RECIPE --set KEY=VALUE ... --out OUTPUT_DIR/RUN``: the same recipe loader,
the same stages, its own run directory and manifest chain. Example::

    name: tiny-2x2
    output_dir: out/sweeps/{name}   # every node must see this path (shared storage)
    recipes: [recipes/tiny.yaml]    # or {recipe: PATH, name: NAME, set: {...}}
    set: {eval.max_windows: 8}      # overrides for every run
    matrix:                         # the runs are the product of these lists
      method: [gptq, rtn]
      bits: [3, 4]
    exclude: [{method: rtn, bits: 3}]

Unknown keys are rejected (here and, through the recipe loader, in every override). Matrix keys
are recipe keys (dotted for sections: ``calibration.samples``); ``type`` stands for ``gguf_type``.
Runs of one model with the same calibration settings share one calibration set, sampled once into
``OUTPUT_DIR/shared/<key>/calibration`` (key: the model path and the calibration section), which
each run directory links to as ``calibration``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..errors import InputError, invalid
from ..io.yamlfile import load_yaml_mapping
from ..pipeline.recipe import Recipe, _expand, load_recipe

SWEEP_SCHEMA_VERSION = 1
ALIASES = {"type": "gguf_type"}
RESERVED = {"shared", "logs", "sweep.json"}  # names inside OUTPUT_DIR that are not runs
Scalar = str | int | float | bool | None


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RecipeRef(_Strict):
    recipe: str  # path, relative to the working directory (as for `quantize run`)
    name: str | None = None  # prefix of the run names; default: the recipe's own name
    set: dict[str, Any] = Field(default_factory=dict)  # overrides for this recipe's runs only


class Sweep(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    description: str = ""
    output_dir: str = "out/sweeps/{name}"  # shared by every node; {name} is the sweep's name
    recipes: list[str | RecipeRef] = Field(min_length=1)
    set: dict[str, Any] = Field(default_factory=dict)
    matrix: dict[str, list[Any]] = Field(default_factory=dict)
    exclude: list[dict[str, Any]] = Field(default_factory=list)
    share_calibration: bool = True
    cpus_per_run: int = Field(1, ge=1)  # CPUs each run's task asks for (its torch threads)
    max_retries: int = Field(2, ge=0)  # retries of a run whose worker or node died

    @field_validator("matrix")
    @classmethod
    def _lists(cls, v: dict[str, list[Any]]) -> dict[str, list[Any]]:
        seen = set()
        for key, values in v.items():
            if not values:
                raise ValueError(f"matrix key {key!r} has no values")
            canon = ALIASES.get(key, key)
            if canon in seen:
                raise ValueError(f"matrix key {key!r} given twice")
            seen.add(canon)
        return v

    def refs(self) -> list[RecipeRef]:
        return [RecipeRef(recipe=r) if isinstance(r, str) else r for r in self.recipes]


@dataclass
class RunSpec:
    """One run: ``quantize run RECIPE --set ... --out OUT``."""

    name: str
    recipe_path: Path
    overrides: list[str]
    out: Path
    recipe: Recipe  # resolved by the same loader `quantize run` uses
    values: dict[str, Any] = field(default_factory=dict)  # the matrix values of this run
    env: dict[str, str] = field(default_factory=dict)  # variables the recipe reads, as set here
    calibration_key: str | None = None  # runs with the same key share one calibration set
    shared_calibration: Path | None = None  # that set's run directory (calibration/ inside)

    def argv(self) -> list[str]:
        """Arguments of ``quantize`` that make this run."""
        args = ["run", str(self.recipe_path)]
        for o in self.overrides:
            args += ["--set", o]
        return args + ["--out", str(self.out)]

    def command(self) -> str:
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(self.env.items()))
        return (env + " " if env else "") + shlex.join(["quantize", *self.argv()])


def set_value(value: Any) -> str:
    """The text of ``--set key=TEXT`` that the recipe loader (YAML) reads back as ``value``."""
    if isinstance(value, str):
        try:
            plain = value != "" and value.strip() == value and yaml.safe_load(value) == value
        except yaml.YAMLError:
            plain = False
        return value if plain else json.dumps(value)
    return json.dumps(value)  # JSON is YAML: numbers, booleans, null, lists, mappings


def _name_part(key: str, value: Any) -> str:
    if key in ("method", "format", "gguf_type"):
        part = str(value)
    elif key == "bits":
        part = f"{value}bit"
    elif key == "bpw":
        part = f"{value:g}bpw" if isinstance(value, (int, float)) else f"{value}bpw"
    elif key == "group_size":
        part = f"g{value}"
    else:
        part = f"{key.rsplit('.', 1)[-1]}{value}"
    return re.sub(r"[^A-Za-z0-9._+-]", "_", part)


def load_sweep(path: Path) -> Sweep:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such sweep file; see recipes/sweeps/ for examples")
    data = load_yaml_mapping(path, not_mapping="a sweep file is a YAML mapping (name, recipes, matrix, ...)")
    data = _expand(data, "")
    try:
        return Sweep.model_validate(data)
    except ValidationError as e:
        raise invalid(path, "sweep file", e) from None


def _env_refs(recipe_path: Path) -> list[str]:
    return sorted(set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", recipe_path.read_text())))


def calibration_key(recipe: Recipe) -> str | None:
    """Runs of the same model (``source.model``) with the same calibration section sample once."""
    if recipe.source.model is None:  # merged per run: its calibration is tokenized from the merge
        return None
    blob = json.dumps({"model": recipe.source.model, "calibration": recipe.calibration.model_dump(mode="json")},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def expand(sweep: Sweep, sweep_path: Path, *, out: Path | None = None) -> tuple[Path, list[RunSpec]]:
    """(the sweep's output directory, its runs in order). Every run's recipe is loaded and validated
    here, so a bad key or combination exits 2 before anything runs."""
    import os

    root = Path(out) if out is not None else Path(sweep.output_dir.format(name=sweep.name))
    matrix = {ALIASES.get(k, k): v for k, v in sweep.matrix.items()}
    keys = list(matrix)
    for i, ex in enumerate(sweep.exclude):
        unknown = [k for k in ex if ALIASES.get(k, k) not in matrix and k != "recipe"]
        if unknown:
            raise InputError(f"{sweep_path}: exclude[{i}] names {unknown[0]!r}, which is not a matrix key "
                             f"({', '.join(keys) or 'none'}) nor 'recipe'; fix the key")
    excludes = [{ALIASES.get(k, k): v for k, v in ex.items()} for ex in sweep.exclude]
    runs: list[RunSpec] = []
    for ri, ref in enumerate(sweep.refs()):
        rpath = Path(ref.recipe)
        try:
            base = load_recipe(rpath, [f"{k}={set_value(v)}" for k, v in {**sweep.set, **ref.set}.items()])
        except InputError as e:
            raise InputError(f"{sweep_path}: recipes[{ri}]: {e}") from None
        prefix = ref.name or base.name
        env = {k: os.environ[k] for k in _env_refs(rpath) if os.environ.get(k)}
        for combo in itertools.product(*(matrix[k] for k in keys)):
            values = dict(zip(keys, combo))
            if any(all((prefix if k == "recipe" else values[k]) == v for k, v in ex.items()) for ex in excludes):
                continue
            name = "-".join([re.sub(r"[^A-Za-z0-9._+-]", "_", prefix)] + [_name_part(k, v) for k, v in values.items()])
            overrides = [f"{k}={set_value(v)}" for k, v in {**sweep.set, **ref.set, **values}.items()]
            try:
                recipe = load_recipe(rpath, overrides)
            except InputError as e:
                raise InputError(f"{sweep_path}: run {name}: {e}; change the matrix or add it to exclude:") from None
            key = calibration_key(recipe) if sweep.share_calibration else None
            runs.append(RunSpec(name=name, recipe_path=rpath, overrides=overrides, out=root / name, recipe=recipe,
                                values=values, env=env, calibration_key=key,
                                shared_calibration=root / "shared" / key if key else None))
    names = [r.name for r in runs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise InputError(f"{sweep_path}: two runs are both named {dupes[0]!r}; give each recipes entry its own name:")
    bad = [n for n in names if n in RESERVED]
    if bad:
        raise InputError(f"{sweep_path}: run name {bad[0]!r} is reserved in the output directory; set a name: for its recipe")
    if not runs:
        raise InputError(f"{sweep_path}: every combination is excluded; nothing to run")
    return root, runs
