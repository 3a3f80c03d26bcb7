"""Calibration sampling: documents -> one token stream -> N seeded windows of L tokens.

The rule (recorded in the manifest, so a set can be re-derived):

1. **Tokens.** Documents are tokenized with the model's own tokenizer, without special tokens. A
   plain-text file (bundled or local) is one document. For row data (jsonl/parquet/hub) every
   non-blank row is a document; documents are visited in a seeded random order and joined with the
   tokenizer's EOS id between documents (the tokens of ``"\\n\\n"`` when it has no EOS). Tokenizing
   stops once the stream holds ``max(4 * N * L, 2**20)`` tokens, so a large corpus is not tokenized
   whole and the first documents of a file are not favoured.
2. **Windows.** With ``T`` stream tokens and slack ``S = T - N * L``, draw ``N`` integers in
   ``[0, S]``, sort them and add ``i * L`` to the ``i``-th: ``N`` random, **non-overlapping** windows.
   Rows are then put in a seeded random order. ``T < N * L`` is an input error (no overlapping
   fallback). No BOS is prepended; windows may span document boundaries (packing).
3. **Randomness.** numpy PCG64, ``default_rng([seed, 0])`` for the document order and
   ``default_rng([seed, 1])`` for the windows: same inputs and seed, same bytes.

Output: ``calibration.safetensors`` with ``input_ids`` int32 ``[N, L]`` (fixed metadata, so the file
is byte-deterministic) and ``manifest.json`` (stage ``sample``).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import log
from ..errors import InputError, IntegrityError
from ..io.atomic import StagedOutput
from ..manifest import Manifest, complete, describe_input, load_manifest, new_manifest, sha256_file
from .sources import Corpus, resolve_dataset

if TYPE_CHECKING:
    import torch

CALIBRATION_FILE = "calibration.safetensors"
TENSOR_NAME = "input_ids"
# Files that define how text becomes ids (chat templates do not change ids and are left out).
TOKENIZER_FILES = (
    "added_tokens.json",
    "merges.txt",
    "sentencepiece.bpe.model",
    "special_tokens_map.json",
    "spiece.model",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "vocab.json",
    "vocab.txt",
)
BUDGET_FACTOR = 4
MIN_TOKEN_BUDGET = 1 << 20
_DOCS_PER_BATCH = 256
SAMPLING_RULE = "non-overlapping windows at sorted uniform offsets, rows shuffled; numpy PCG64 [seed, 1]"


# ----------------------------------------------------------------------------------------------
# tokenizer identity


def tokenizer_files(model_dir: Path) -> list[str]:
    """The tokenizer files present in a model directory (sorted names)."""
    d = Path(model_dir)
    return sorted(n for n in TOKENIZER_FILES if (d / n).is_file())


def _no_tokenizer(model_dir: Path) -> InputError:
    return InputError(
        f"{model_dir}: no tokenizer files (tokenizer.json, tokenizer.model, vocab.json, ...); "
        f"copy the tokenizer of the base model into this directory"
    )


def tokenizer_hash(model_dir: Path) -> str:
    """sha256 over the tokenizer files, in sorted name order: ``name NUL len(8 bytes LE) bytes``.

    Two model directories with the same hash turn text into the same ids; the quantize stages use
    it to check that a calibration set was sampled for their model.
    """
    model_dir = Path(model_dir)
    files = tokenizer_files(model_dir)
    if not files:
        raise _no_tokenizer(model_dir)
    h = hashlib.sha256()
    for name in files:
        data = (model_dir / name).read_bytes()
        h.update(name.encode() + b"\0" + len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def load_tokenizer(model_dir: Path):
    """The model's tokenizer from local files only (never the hub, never remote code)."""
    from transformers import AutoTokenizer

    model_dir = Path(model_dir)
    if not tokenizer_files(model_dir):
        raise _no_tokenizer(model_dir)
    try:
        return AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - any failure here is a broken tokenizer directory
        msg = " ".join(str(e).split())[:300]
        raise InputError(f"{model_dir}: tokenizer cannot be loaded ({type(e).__name__}: {msg})") from None


def _model_config(model_dir: Path) -> dict[str, Any]:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        return {}
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: not valid JSON ({e}); restore the model's config.json") from None
    if not isinstance(cfg, dict):
        raise InputError(f"{path}: expected a JSON object; restore the model's config.json")
    return cfg


def _config_int(cfg: dict[str, Any], *keys: str) -> int | None:
    for section in (cfg, cfg.get("text_config") or {}):
        for k in keys:
            v = section.get(k)
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
    return None


def max_positions(cfg: dict[str, Any]) -> int | None:
    """The model's context length from its config.json, when it states one."""
    return _config_int(cfg, "max_position_embeddings", "n_positions", "max_seq_len", "seq_length")


# ----------------------------------------------------------------------------------------------
# pure steps


def separator_ids(tokenizer) -> tuple[list[int], str]:
    """Ids put between documents: the EOS token, or the tokens of a blank line when there is none."""
    if tokenizer.eos_token_id is not None:
        return [int(tokenizer.eos_token_id)], "eos"
    return list(tokenizer("\n\n", add_special_tokens=False)["input_ids"]), "text:\\n\\n"


def token_stream(
    tokenizer,
    documents: list[str],
    separator: list[int],
    *,
    budget: int | None = None,
    rng: np.random.Generator | None = None,
) -> tuple[np.ndarray, int]:
    """Tokenize documents into one int64 stream, ``separator`` between documents.

    Documents are visited in a random order drawn from ``rng`` (source order when None) and
    tokenizing stops after the batch that brings the stream to ``budget`` tokens (None: all).
    Returns (stream, documents used).
    """
    if rng is not None and len(documents) > 1:
        order = rng.permutation(len(documents))
    else:
        order = np.arange(len(documents))
    sep = np.asarray(separator, dtype=np.int64)
    pieces: list[np.ndarray] = []
    total = used = 0
    for start in range(0, len(order), _DOCS_PER_BATCH):
        batch = [documents[i] for i in order[start : start + _DOCS_PER_BATCH]]
        for ids in tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]:
            if not ids:
                continue
            if pieces:
                pieces.append(sep)
                total += sep.size
            pieces.append(np.asarray(ids, dtype=np.int64))
            total += len(ids)
            used += 1
        if budget is not None and total >= budget:
            break
    stream = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
    return stream, used


def tokenize_corpus(corpus: Corpus, tokenizer) -> torch.Tensor:
    """The whole corpus as one 1-D int64 tensor: documents in source order, separator between.

    The evaluation rule (no shuffling, no budget), so held-out perplexity windows are the same for
    every model that shares a tokenizer.
    """
    import torch

    stream, _ = token_stream(tokenizer, corpus.documents, separator_ids(tokenizer)[0])
    return torch.from_numpy(stream)


def draw_windows(n_tokens: int, n_samples: int, seq_len: int, rng: np.random.Generator) -> np.ndarray:
    """Start offsets of ``n_samples`` non-overlapping windows of ``seq_len`` in ``[0, n_tokens)``.

    Sorted draws ``u_0 <= ... <= u_{N-1}`` from ``[0, S]`` (``S = T - N*L``) place window ``i`` at
    ``u_i + i*L``: window ``i`` ends at ``u_i + (i+1)*L <= u_{i+1} + (i+1)*L``, the next start, and the
    last ends at ``u_{N-1} + N*L <= T``. The rows come back in a seeded random order.
    """
    need = n_samples * seq_len
    if n_samples < 1 or seq_len < 1 or need > n_tokens:
        raise ValueError(f"cannot place {n_samples} x {seq_len} windows in {n_tokens} tokens")
    slack = n_tokens - need
    starts = np.sort(rng.integers(0, slack + 1, size=n_samples)) + np.arange(n_samples, dtype=np.int64) * seq_len
    return starts[rng.permutation(n_samples)]


def gather_windows(stream: np.ndarray, starts: np.ndarray, seq_len: int) -> np.ndarray:
    """``[N, L]`` int32 rows ``stream[s : s + L]``."""
    if stream.size and int(stream.max()) >= 2**31:
        raise InputError(f"token id {int(stream.max())} does not fit int32; this tokenizer is not supported")
    return np.ascontiguousarray(stream[starts[:, None] + np.arange(seq_len)], dtype=np.int32)


def write_calibration(path: Path, input_ids: np.ndarray) -> None:
    """Write ``input_ids`` with fixed metadata (same array, same bytes).

    The metadata holds a single key on purpose: safetensors serialises ``__metadata__`` from a Rust
    HashMap, so with two or more keys their order (and the file's bytes) varies from save to save.
    The tokenizer hash and everything else lives in manifest.json.
    """
    from safetensors.numpy import save_file

    save_file({TENSOR_NAME: input_ids}, str(path), metadata={"format": "pt"})


# ----------------------------------------------------------------------------------------------
# the stage


def _check_counts(n_samples: int, seq_len: int, seed: int) -> None:
    if n_samples < 1:
        raise InputError(f"--samples {n_samples}: must be at least 1")
    if seq_len < 1:
        raise InputError(f"--seq-len {seq_len}: must be at least 1")
    if seed < 0:
        raise InputError(f"--seed {seed}: must be a non-negative integer")


def sample_calibration(
    model_dir: Path,
    dataset: str,
    n_samples: int,
    seq_len: int,
    seed: int,
    out: Path,
    text_field: str | None = None,
    split: str | None = None,
    overwrite: bool = False,
) -> Manifest:
    """Sample ``n_samples`` windows of ``seq_len`` tokens from ``dataset`` into ``out``.

    Only the tokenizer files (and config.json, for the context length and vocab size) of
    ``model_dir`` are read. ``text_field=None`` uses the registry entry's field (or "text").
    Returns the completed manifest; raises InputError for bad input (nothing is written then).
    """
    t0 = time.perf_counter()
    model_dir, out = Path(model_dir), Path(out)
    _check_counts(n_samples, seq_len, seed)
    if not model_dir.is_dir():
        raise InputError(f"{model_dir}: model directory not found; pass --model DIR")
    tok_files = tokenizer_files(model_dir)
    if not tok_files:
        raise _no_tokenizer(model_dir)
    cfg = _model_config(model_dir)
    context = max_positions(cfg)
    if context is not None and seq_len > context:
        raise InputError(
            f"--seq-len {seq_len} exceeds the model's context of {context} tokens "
            f"({model_dir / 'config.json'}); pass --seq-len {context} or less"
        )
    staged = StagedOutput(out, overwrite=overwrite)
    staged.preflight()  # before any heavy work

    corpus = resolve_dataset(dataset, text_field=text_field, split=split)
    name = corpus.identity.name
    if not corpus.documents:
        where = f" in field {corpus.identity.text_field!r}" if corpus.identity.text_field else ""
        raise InputError(f"dataset '{name}' is empty (no text{where}); pass a dataset with text")

    tokenizer = load_tokenizer(model_dir)
    separator, separator_rule = separator_ids(tokenizer)
    need = n_samples * seq_len
    budget = max(BUDGET_FACTOR * need, MIN_TOKEN_BUDGET)
    log.info(f"tokenizing {len(corpus.documents)} document(s) of '{name}'")
    doc_rng = np.random.default_rng([seed, 0])
    stream, used = token_stream(tokenizer, corpus.documents, separator, budget=budget, rng=doc_rng)
    if stream.size == 0:
        raise InputError(f"dataset '{name}' is empty (it tokenizes to no tokens); pass a dataset with text")
    if stream.size < need:
        raise InputError(
            f"dataset '{name}' has only {stream.size} tokens; {n_samples} x {seq_len} = {need} needed; "
            f"lower --samples/--seq-len or use a larger dataset"
        )
    starts = draw_windows(stream.size, n_samples, seq_len, np.random.default_rng([seed, 1]))
    input_ids = gather_windows(stream, starts, seq_len)
    model_vocab = _config_int(cfg, "vocab_size")
    top = int(input_ids.max())
    if model_vocab is not None and top >= model_vocab:
        raise InputError(
            f"{model_dir}: the tokenizer produced id {top} but config.json has vocab_size {model_vocab}; "
            f"the tokenizer files do not belong to this model"
        )

    tok_sha = tokenizer_hash(model_dir)
    params = {
        "dataset": corpus.identity.model_dump(mode="json"),
        "split": corpus.identity.split,
        "text_field": corpus.identity.text_field,
        "n_samples": n_samples,
        "seq_len": seq_len,
        "seed": seed,
        "tokenizer_sha256": tok_sha,
        "vocab_size": len(tokenizer),
        "separator": separator_rule,
        "separator_ids": separator,
        "token_budget": budget,
        "tokens_available": int(stream.size),
        "documents_used": used,
        "documents_total": len(corpus.documents),
        "sampling": SAMPLING_RULE,
        "tensor": {"name": TENSOR_NAME, "dtype": "int32", "shape": [n_samples, seq_len]},
    }
    model_files = tok_files + (["config.json"] if (model_dir / "config.json").is_file() else [])
    inputs = [describe_input("model", model_dir, model_files), corpus.input_record("dataset")]
    manifest = new_manifest("sample", inputs=inputs, params=params, device="cpu")
    with staged as staging:
        write_calibration(staging / CALIBRATION_FILE, input_ids)
        metrics = {"coverage": round(need / stream.size, 6)}  # fraction of the stream the windows hold
        if len(separator) == 1:
            metrics["separators_in_windows"] = int((input_ids == separator[0]).sum())
        metrics["seconds"] = round(time.perf_counter() - t0, 3)
        done = complete(staging, manifest, metrics=metrics)
    log.event(
        "stage_end", f"sample: {n_samples} x {seq_len} tokens from '{name}' written to {out}",
        stage="sample", out=str(out), n_samples=n_samples, seq_len=seq_len, tokens_available=int(stream.size),
    )
    return done


# ----------------------------------------------------------------------------------------------
# reading a calibration set (for the quantize stages)


def load_calibration(directory: Path, *, model_dir: Path | None = None) -> tuple[torch.Tensor, Manifest]:
    """``(input_ids int32 [N, L], manifest)`` of a ``quantize sample`` output.

    Checks the manifest (stage "sample", complete), the file's sha256, the tensor's dtype and shape,
    and, when ``model_dir`` is given, that the set was sampled with that model's tokenizer.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    import torch

    directory = Path(directory)
    m = load_manifest(directory, required=True)
    if m.stage != "sample":
        raise InputError(
            f"{directory}: output of `quantize {m.stage}`, not a calibration set; pass the --out of `quantize sample`"
        )
    if m.status != "complete":
        raise InputError(f"{directory}: calibration set is {m.status}, not complete; re-run `quantize sample`")
    path = directory / CALIBRATION_FILE
    rec = m.output(CALIBRATION_FILE)
    if rec is None or not path.is_file():
        raise InputError(f"{path}: missing; re-run `quantize sample --out {directory}`")
    if rec.bytes != path.stat().st_size or sha256_file(path) != rec.sha256:
        raise IntegrityError(f"{path}: sha256 differs from {directory / 'manifest.json'}; re-run `quantize sample`")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise InputError(f"{path}: not a readable safetensors file ({e}); re-run `quantize sample`") from None
    ids = tensors.get(TENSOR_NAME)
    shape = (m.params.get("n_samples"), m.params.get("seq_len"))
    if ids is None:
        raise InputError(f"{path}: no tensor {TENSOR_NAME!r}; re-run `quantize sample`")
    if ids.dtype != torch.int32 or ids.dim() != 2 or tuple(ids.shape) != shape:
        raise InputError(
            f"{path}: tensor {TENSOR_NAME!r} is {ids.dtype} {list(ids.shape)}, expected int32 {list(shape)}; "
            f"re-run `quantize sample`"
        )
    if model_dir is not None:
        want = m.params.get("tokenizer_sha256")
        if tokenizer_hash(model_dir) != want:
            raise InputError(
                f"{directory}: sampled with a different tokenizer than {model_dir}'s; "
                f"re-run `quantize sample --model {model_dir}`"
            )
    return ids, m

