"""Writing a merged model directory: shards, config.json, tokenizer, manifest — atomically.

Shared by the PEFT and Lit-GPT paths. The output is staged in ``OUT.partial/`` and renamed only when
complete; on any failure the staging directory is removed, so nothing is left at the output path.
"""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from .. import log
from .. import manifest as mf
from ..errors import InputError
from ..io.atomic import StagedOutput
from ..io.reader import CheckpointReader
from ..io.writer import AUX_FILES, DEFAULT_MAX_SHARD_BYTES, ShardedWriter
from .stream import Job, run_jobs

DTYPES: dict[str, torch.dtype | None] = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


def parse_dtype(name: str) -> torch.dtype | None:
    """``auto`` (keep each base tensor's dtype) → None; ``bf16``/``fp16``/``fp32`` → the torch dtype."""
    try:
        return DTYPES[name]
    except KeyError:
        raise InputError(f"--dtype {name!r} is not one of {', '.join(DTYPES)}") from None


def patch_config(
    config: dict[str, Any], *, dtype: torch.dtype | None, vocab_size: int | None, tied: bool | None
) -> dict[str, Any]:
    """The merged model's config.json: the base one with vocab, tying and dtype made true."""
    out = dict(config)
    out.pop("quantization_config", None)
    if vocab_size is not None:
        out["vocab_size"] = vocab_size
    if tied is not None:
        out["tie_word_embeddings"] = tied
    if dtype is not None:
        keys = [k for k in ("dtype", "torch_dtype") if k in out] or ["dtype"]
        for k in keys:
            out[k] = _DTYPE_NAMES[dtype]
    return out


def refuse_quantized(config: dict[str, Any], source: Path) -> None:
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method", "?") if isinstance(config["quantization_config"], dict) else "?"
        raise InputError(
            f"{source}/config.json: the base is quantized ({method}); a LoRA delta cannot be folded into packed "
            "weights: merge into the original 16-bit base model"
        )


def write_output(
    out: Path,
    *,
    overwrite: bool,
    reader: CheckpointReader,
    jobs: Sequence[Job],
    aux_files: Sequence[tuple[Path, Sequence[str]]],
    make_config: Callable[[], dict[str, Any]],
    inputs: Callable[[], list[mf.InputRecord]],
    params: dict[str, Any],
    make_metrics: Callable[[list[dict[str, Any]]], dict[str, Any]],
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> mf.Manifest:
    """Stream ``jobs`` into ``out`` and finish it with config, aux files and a complete manifest.

    ``aux_files`` are ``(directory, names)`` pairs copied in order when present (later ones win:
    the base's config/tokenizer first, then the training output's tokenizer). ``make_config`` and ``make_metrics`` run after the tensors are written, when the
    jobs' decisions (tied embeddings) are known.
    """
    staged = StagedOutput(out, overwrite=overwrite)
    with staged as staging:
        try:
            hashed_inputs = _Background(inputs)  # hashing the inputs overlaps the merge
            with ShardedWriter(staging, max_shard_bytes=max_shard_bytes, sha256=True) as writer:
                modified = run_jobs(jobs, reader, writer, progress=lambda it: log.progress(it, total=len(it), desc="merge"))
                writer.close()
            for src, names in aux_files:
                for name in names:
                    if (Path(src) / name).is_file():
                        shutil.copyfile(Path(src) / name, staging / name)
            (staging / "config.json").write_text(json.dumps(make_config(), indent=2, sort_keys=True) + "\n")
            m = mf.new_manifest("merge", inputs=hashed_inputs.result(), params=params)
            return mf.complete(staging, m, metrics=make_metrics(modified), known_sha256=writer.sha256)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise


class _Background:
    """``fn()`` in a daemon thread; :meth:`result` joins it and returns its value or raises its error.

    For hashing the inputs while the tensors stream (file reads and hashlib release the GIL): on a
    large model that is minutes of one core. A daemon thread never holds up the exit of a failed run.
    """

    def __init__(self, fn: Callable[[], Any]):
        self._value: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn,), name="merge-hash-inputs", daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            self._value = fn()
        except BaseException as e:  # re-raised in the caller's thread by result()
            self._error = e

    def result(self) -> Any:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value


def checkpoint_files(reader: CheckpointReader) -> list[str]:
    """Relative paths of a checkpoint's weight files, index and aux files (what the manifest hashes)."""
    files = set(reader.shards)
    if reader.index_file:
        files.add(reader.index_file)
    files |= {n for n in AUX_FILES if (reader.directory / n).is_file()}
    return sorted(files)
