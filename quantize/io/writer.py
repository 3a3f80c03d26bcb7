"""Streaming, sharded, byte-deterministic safetensors writing.

``ShardedWriter`` takes tensors one at a time and writes Hugging Face style shards
(``model-00001-of-00003.safetensors`` + ``model.safetensors.index.json``, or a single
``model.safetensors``). Memory: O(one tensor). A safetensors header has to precede the data, but a
shard's header is only known once its last tensor has arrived, so each tensor's bytes are appended
to a spool file next to the output as soon as ``add`` is called (the caller can free the tensor at
once); when a shard is full its file is assembled as header + data copied from the spool with
``os.copy_file_range`` (an in-kernel copy, a reflink on copy-on-write filesystems). The price is
writing the data twice and up to one shard of extra disk space while the spool exists; the
alternative (buffering a shard in RAM) would cost up to ``max_shard_bytes`` of memory. A caller that
knows every tensor (name, dtype, shape) in advance can announce them with ``plan``: shard
boundaries and headers are then fixed up front and each tensor is written once, straight to its
final offset (no spool, same bytes).

Layout is exactly what ``safetensors.torch.save`` produces for the same shard (verified by a test):
tensors ordered by descending dtype rank then name (so every tensor is aligned to its item size),
header entries in data order after ``__metadata__``, compact JSON, padded with spaces to a
multiple of 8. The output therefore depends only on the tensors, their names, the order in which
they were added (which decides the shard boundaries) and the metadata.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import InputError
from .reader import DTYPE_CODES, DTYPE_RANK

DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
DEFAULT_METADATA = {"format": "pt"}  # what transformers expects in every shard
_COPY_CHUNK = 1 << 30

#: Non-weight files of a Hugging Face model directory that a converted model needs alongside it.
AUX_FILES: tuple[str, ...] = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)


@dataclass(frozen=True)
class _Entry:
    name: str
    code: str  # safetensors dtype code
    shape: tuple[int, ...]
    spool_offset: int
    nbytes: int


@dataclass(frozen=True)
class _Planned:
    """A tensor announced by ``plan``: where its bytes go."""

    name: str
    code: str
    shape: tuple[int, ...]
    nbytes: int
    shard: int  # 0-based
    offset: int  # absolute offset in the shard file


def safetensors_header(entries: list[tuple[str, str, tuple[int, ...], int]], metadata: dict[str, str] | None) -> bytes:
    """The padded header (without the length prefix) for ``(name, code, shape, nbytes)`` in data order."""
    header: dict[str, object] = {}
    if metadata is not None:
        header["__metadata__"] = dict(sorted(metadata.items()))
    offset = 0
    for name, code, shape, nbytes in entries:
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return raw + b" " * (-len(raw) % 8)


def layout_order(entries: list[_Entry]) -> list[_Entry]:
    """safetensors' data order: descending dtype rank (widest first), then name."""
    return sorted(entries, key=lambda e: (-DTYPE_RANK[e.code], e.name))


class ShardedWriter:
    """Stream tensors into sharded safetensors files.

    >>> with ShardedWriter(out_dir, max_shard_bytes=2 * 10**9) as w:
    ...     for name in reader.names():
    ...         w.add(name, transform(reader.get(name)))
    ...     index = w.close(metadata={"format": "pt"})

    A shard is closed when adding the next tensor would push its tensor bytes past
    ``max_shard_bytes`` (a tensor larger than the limit gets a shard of its own), as in
    ``transformers``. Files appear under their final names only in ``close``; leaving the ``with``
    block on an exception removes everything the writer created.

    ``sha256=True``: after :meth:`plan`, shards whose tensors arrive in file order are hashed as
    they are written (on a helper thread, alongside the write); ``close`` leaves the digests in
    :attr:`sha256` (final file name -> hex), which saves reading them back to hash them.
    """

    def __init__(
        self, directory: Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, prefix: str = "model", *,
        sha256: bool = False,
    ):
        if max_shard_bytes <= 0:
            raise ValueError("max_shard_bytes must be positive")
        if not prefix or "/" in prefix or prefix.startswith("."):
            raise ValueError(f"invalid shard prefix {prefix!r}")
        self.directory = Path(directory)
        self.max_shard_bytes = int(max_shard_bytes)
        self.prefix = prefix
        self.directory.mkdir(parents=True, exist_ok=True)
        clash = [p.name for p in self.directory.iterdir() if self._is_output_name(p.name)]
        if clash:
            raise InputError(
                f"{self.directory}: already holds {', '.join(sorted(clash)[:3])}; write into an empty directory "
                "(stale shards would mix with the new ones)"
            )
        self._spool_path = self.directory / f".{prefix}.spool"
        self._spool = open(self._spool_path, "w+b", buffering=0)
        self._pending: list[_Entry] = []  # the open shard's tensors, in spool order
        self._pending_bytes = 0
        self._parts: list[Path] = []  # assembled shards, not yet under their final names
        self._weight_map: dict[str, int] = {}  # name -> shard number (0-based)
        self._total_bytes = 0
        self._metadata: dict[str, str] = dict(DEFAULT_METADATA)
        self.files: list[str] = []  # final file names, set by close()
        self.closed = False
        # plan() mode: every tensor's final place is known; add() writes it there directly
        self._planned: list[_Planned] | None = None
        self._headers: list[bytes] = []  # per planned shard: length prefix + header
        self._fd: int | None = None  # the planned shard being written (self._parts[-1])
        # sha256=True: hash planned shards whose tensors arrive in file order while writing them
        self._want_sha256 = sha256
        self._hashers: list[hashlib._Hash | None] = []  # per planned shard
        self._hash_pool: ThreadPoolExecutor | None = None
        self.sha256: dict[str, str] = {}  # final file name -> hex digest, for the shards hashed while written
        self._metadata_rewritten = False

    def _is_output_name(self, name: str) -> bool:
        p = re.escape(self.prefix)
        return bool(re.fullmatch(rf"{p}(\.safetensors(\.index\.json)?|-\d{{5}}-of-\d{{5}}\.safetensors)", name))

    # ------------------------------------------------------------------ streaming

    def plan(self, entries: Sequence[tuple[str, torch.dtype, Sequence[int]]]) -> None:
        """Announce every tensor, ``(name, dtype, shape)`` in the order they will be added.

        Without a plan a shard's header (which precedes its data and depends on all of its
        tensors) is only known when the shard is full, so each tensor goes to the spool first and
        is copied into place later: every byte is written twice. With the complete list, shard
        boundaries and headers are computed here (same rules, so the files are byte-identical) and
        :meth:`add` writes each tensor once, at its final offset. :meth:`add` must then receive
        exactly these tensors in this order (``ValueError`` otherwise) and :meth:`close` refuses a
        plan left unfinished. Call before the first ``add``, after :meth:`set_metadata` (different
        metadata in ``close`` costs a header rewrite, as without a plan).
        """
        if self.closed or self._weight_map or self._planned is not None:
            raise ValueError("plan must be called once, before the first add")
        seen: set[str] = set()
        shards: list[list[_Entry]] = [[]]
        shard_bytes = 0
        for name, dtype, shape in entries:
            if not isinstance(name, str) or not name or name == "__metadata__" or name in seen:
                raise ValueError(f"invalid or duplicate tensor name {name!r}")
            code = DTYPE_CODES.get(dtype)
            if code is None:
                raise ValueError(f"{name}: dtype {dtype} has no safetensors equivalent")
            seen.add(name)
            shape = tuple(int(d) for d in shape)
            nbytes = math.prod(shape) * dtype.itemsize
            if shards[-1] and shard_bytes + nbytes > self.max_shard_bytes:  # the rule of add()
                shards.append([])
                shard_bytes = 0
            shards[-1].append(_Entry(name, code, shape, 0, nbytes))
            shard_bytes += nbytes
        planned: dict[str, _Planned] = {}
        for i, shard in enumerate(shards):
            ordered = layout_order(shard)
            header = safetensors_header([(e.name, e.code, e.shape, e.nbytes) for e in ordered], self._metadata)
            self._headers.append(len(header).to_bytes(8, "little") + header)
            # the file is written front to back when the tensors arrive in layout order: hash as it goes
            sequential = [e.name for e in ordered] == [e.name for e in shard]
            self._hashers.append(hashlib.sha256() if self._want_sha256 and sequential else None)
            offset = len(self._headers[-1])
            for e in ordered:
                planned[e.name] = _Planned(e.name, e.code, e.shape, e.nbytes, i, offset)
                offset += e.nbytes
        self._planned = [planned[e.name] for shard in shards for e in shard]  # add order
        self._spool.close()  # not needed: tensors go straight to their shard
        self._spool_path.unlink()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Append one tensor (any device, any strides); its bytes are on disk when this returns."""
        if self.closed:
            raise ValueError("ShardedWriter is closed")
        if not isinstance(name, str) or not name or name == "__metadata__":
            raise ValueError(f"invalid tensor name {name!r}")
        if name in self._weight_map:
            raise ValueError(f"duplicate tensor name {name!r}")
        if not isinstance(tensor, torch.Tensor) or tensor.layout != torch.strided or tensor.is_meta:
            raise ValueError(f"{name}: only dense tensors with data can be written")
        code = DTYPE_CODES.get(tensor.dtype)
        if code is None:
            raise ValueError(f"{name}: dtype {tensor.dtype} has no safetensors equivalent")
        t = tensor.detach()
        if t.device.type != "cpu":
            t = t.to("cpu")
        t = t.resolve_conj().resolve_neg().contiguous()
        nbytes = t.numel() * t.element_size()
        if self._planned is not None:
            self._add_planned(name, code, t, nbytes)
            return

        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush_shard()
        offset = self._spool.tell()
        if nbytes:
            _write_all(self._spool.fileno(), memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        self._pending.append(_Entry(name, code, tuple(t.shape), offset, nbytes))
        self._pending_bytes += nbytes
        self._weight_map[name] = len(self._parts)
        self._total_bytes += nbytes

    def _add_planned(self, name: str, code: str, t: torch.Tensor, nbytes: int) -> None:
        i = len(self._weight_map)
        p = self._planned[i] if i < len(self._planned) else None
        if p is None or (p.name, p.code, p.shape) != (name, code, tuple(t.shape)):
            want = "nothing more" if p is None else f"{p.name} {p.code}{list(p.shape)}"
            raise ValueError(f"{name} {code}{list(t.shape)}: not the next planned tensor (expected {want})")
        if p.shard == len(self._parts):  # the first tensor of the next shard: start its file
            self._close_fd()
            part = self.directory / f".{self.prefix}-{p.shard + 1:05d}.safetensors.part"
            self._parts.append(part)
            self._fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o644)
            _pwrite_all(self._fd, memoryview(self._headers[p.shard]), 0)
            if self._hashers[p.shard] is not None:
                self._hashers[p.shard].update(self._headers[p.shard])
        if nbytes:
            data = memoryview(t.reshape(-1).view(torch.uint8).numpy())
            hasher = self._hashers[p.shard]
            if hasher is None:
                _pwrite_all(self._fd, data, p.offset)
            else:  # hash on a helper thread while this one writes (both release the GIL)
                if self._hash_pool is None:
                    self._hash_pool = ThreadPoolExecutor(1, thread_name_prefix="shard-sha256")
                hashed = self._hash_pool.submit(hasher.update, data)
                try:
                    _pwrite_all(self._fd, data, p.offset)
                finally:
                    hashed.result()
        self._weight_map[name] = p.shard
        self._total_bytes += nbytes

    def _close_fd(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._hash_pool is not None:
            self._hash_pool.shutdown()
            self._hash_pool = None

    def _flush_shard(self) -> None:
        """Assemble the open shard: header, then its tensors copied from the spool in layout order."""
        ordered = layout_order(self._pending)
        header = safetensors_header([(e.name, e.code, e.shape, e.nbytes) for e in ordered], self._metadata)
        part = self.directory / f".{self.prefix}-{len(self._parts) + 1:05d}.safetensors.part"
        with open(part, "wb", buffering=0) as out:
            _write_all(out.fileno(), memoryview(len(header).to_bytes(8, "little") + header))
            for e in ordered:
                _copy_range(self._spool.fileno(), out.fileno(), e.spool_offset, e.nbytes)
        self._parts.append(part)
        self._pending, self._pending_bytes = [], 0
        self._spool.seek(0)
        self._spool.truncate(0)

    # ------------------------------------------------------------------ finishing

    def close(self, metadata: dict[str, str] | None = None) -> dict:
        """Write the last shard, name the shards, write the index when there are several.

        ``metadata`` goes into every shard's ``__metadata__`` (default ``{"format": "pt"}``, which
        transformers expects). Returns the index: ``{"metadata": {"total_size": bytes},
        "weight_map": {name: file}}`` (also for a single shard, where no index file is written).
        """
        if self.closed:
            raise ValueError("ShardedWriter is closed")
        metadata = dict(DEFAULT_METADATA if metadata is None else metadata)
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise ValueError("safetensors metadata must map strings to strings")
        if not self._weight_map:
            raise ValueError("no tensors were added")
        if self._planned is not None:
            if len(self._weight_map) != len(self._planned):
                missing = self._planned[len(self._weight_map)]
                raise ValueError(f"{len(self._planned) - len(self._weight_map)} planned tensors were not added "
                                 f"(first: {missing.name})")
            self._close_fd()
        # Finished shards carry the metadata known when they were assembled; different metadata
        # here means re-assembling them (use set_metadata() up front to avoid that I/O).
        self._metadata_rewritten = bool(self._parts) and self._metadata != metadata
        if self._metadata_rewritten:
            self._rewrite_headers(metadata)
        self._metadata = metadata
        if self._planned is None:
            self._flush_shard()
            self._spool.close()
            self._spool_path.unlink()

        n = len(self._parts)
        names = (
            [f"{self.prefix}.safetensors"]
            if n == 1
            else [f"{self.prefix}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
        for part, final in zip(self._parts, names):
            os.replace(part, self.directory / final)
        if self._metadata_rewritten:
            self._hashers = []  # the headers changed after hashing
        self.sha256 = {names[i]: h.hexdigest() for i, h in enumerate(self._hashers) if h is not None}
        index = {
            "metadata": {"total_size": self._total_bytes},
            "weight_map": {k: names[i] for k, i in sorted(self._weight_map.items())},
        }
        self.files = list(names)
        if n > 1:
            index_name = f"{self.prefix}.safetensors.index.json"
            (self.directory / index_name).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
            self.files.append(index_name)
        self.closed = True
        return index

    def set_metadata(self, metadata: dict[str, str]) -> None:
        """Fix the shard metadata before the first shard is assembled (saves a header rewrite in close)."""
        if self._parts or self._planned is not None:
            raise ValueError("set_metadata must be called before plan and before the first shard is written")
        self._metadata = dict(metadata)

    def _rewrite_headers(self, metadata: dict[str, str]) -> None:
        """Re-assemble finished shards with new metadata (only when close() gets different metadata)."""
        for part in self._parts:
            tmp = part.with_suffix(".rewrite")
            with open(part, "rb", buffering=0) as src, open(tmp, "wb", buffering=0) as dst:
                n = int.from_bytes(src.read(8), "little")
                old = json.loads(src.read(n))
                old.pop("__metadata__", None)
                entries = [
                    (k, v["dtype"], tuple(v["shape"]), v["data_offsets"][1] - v["data_offsets"][0])
                    for k, v in old.items()
                ]
                header = safetensors_header(entries, metadata)
                data_len = os.fstat(src.fileno()).st_size - 8 - n
                _write_all(dst.fileno(), memoryview(len(header).to_bytes(8, "little") + header))
                _copy_range(src.fileno(), dst.fileno(), 8 + n, data_len)
            os.replace(tmp, part)

    def abort(self) -> None:
        """Remove everything this writer created (spool and unpublished shards)."""
        self._close_fd()
        if not self._spool.closed:
            self._spool.close()
        for p in [self._spool_path, *self._parts]:
            p.unlink(missing_ok=True)
        self.closed = True

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            if not self.closed:
                self.abort()
        elif not self.closed:
            self.close()
        return False


def _write_all(fd: int, data: memoryview) -> None:
    done, n = 0, len(data)
    while done < n:
        done += os.write(fd, data[done : done + _COPY_CHUNK])


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done, n = 0, len(data)
    while done < n:
        done += os.pwrite(fd, data[done : done + _COPY_CHUNK], offset + done)


def _copy_range(src: int, dst: int, offset: int, n: int) -> None:
    """Append ``n`` bytes of ``src`` starting at ``offset`` to ``dst`` (at its current position)."""
    done = 0
    if hasattr(os, "copy_file_range"):
        try:
            while done < n:
                got = os.copy_file_range(src, dst, min(n - done, _COPY_CHUNK), offset + done)
                if got == 0:
                    break
                done += got
        except OSError:
            pass  # e.g. a filesystem without support: finish with plain reads below
    while done < n:
        chunk = os.pread(src, min(n - done, 16 << 20), offset + done)
        if not chunk:
            raise OSError(f"spool file ended early at byte {offset + done}")
        _write_all(dst, memoryview(chunk))
        done += len(chunk)


def copy_aux_files(src_dir: Path, dst_dir: Path) -> list[str]:
    """Copy config, generation config and tokenizer files (those present) from ``src_dir``; returns their names."""
    src_dir, dst_dir = Path(src_dir), Path(dst_dir)
    if not src_dir.is_dir():
        raise InputError(f"{src_dir}: not a directory; pass the model directory to copy config/tokenizer files from")
    dst_dir.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in AUX_FILES:
        src = src_dir / name
        if src.is_file():
            shutil.copyfile(src, dst_dir / name)
            copied.append(name)
    return copied
