"""Lazy, validated reading of Hugging Face checkpoints, one tensor at a time.

``CheckpointReader`` opens a model directory (``model.safetensors``, sharded safetensors with
``model.safetensors.index.json``, or ``pytorch_model.bin`` with or without its index) and
answers names, shapes and dtypes from the safetensors headers alone. ``get`` reads ONE tensor with a
positioned read (``os.preadv``) straight into a fresh CPU tensor: nothing is memory-mapped, so
resident memory stays at the size of the tensors the caller holds, independent of the model size
(file-backed mmapped pages would count toward RSS as they are touched).

safetensors layout: ``u64 little-endian N`` | ``N bytes of JSON header`` | data. The header maps
each tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the
start of the data) and may hold a ``"__metadata__"`` dict of strings. Every header is checked on
open, so a corrupt or truncated shard fails before any work starts.
"""

from __future__ import annotations

import json
import math
import os
import threading
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import InputError
from ..manifest import check_relative
from .torchfile import TORCH_SUFFIXES, load_torch_file

# safetensors dtype code -> torch dtype, in the order safetensors' own serializer lays tensors out
# (descending dtype rank, so wide types come first and every tensor stays aligned).
_DTYPE_ORDER: tuple[tuple[str, str], ...] = (
    ("U64", "uint64"), ("I64", "int64"), ("F64", "float64"), ("C64", "complex64"),
    ("F32", "float32"), ("U32", "uint32"), ("I32", "int32"),
    ("BF16", "bfloat16"), ("F16", "float16"), ("U16", "uint16"), ("I16", "int16"),
    ("F8_E5M2FNUZ", "float8_e5m2fnuz"), ("F8_E4M3FNUZ", "float8_e4m3fnuz"), ("F8_E8M0", "float8_e8m0fnu"),
    ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"),
    ("I8", "int8"), ("U8", "uint8"), ("BOOL", "bool"),
)  # fmt: skip
#: safetensors dtype code -> torch dtype (only the dtypes this torch build has).
DTYPES: dict[str, torch.dtype] = {
    code: getattr(torch, attr) for code, attr in _DTYPE_ORDER if isinstance(getattr(torch, attr, None), torch.dtype)
}
#: torch dtype -> safetensors dtype code.
DTYPE_CODES: dict[torch.dtype, str] = {dt: code for code, dt in DTYPES.items()}
#: Layout rank of a dtype code: safetensors writes higher ranks first.
DTYPE_RANK: dict[str, int] = {code: len(_DTYPE_ORDER) - i for i, (code, _) in enumerate(_DTYPE_ORDER)}

MAX_HEADER_BYTES = 100_000_000  # the limit safetensors itself enforces
SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
TORCH_INDEX = "pytorch_model.bin.index.json"
TORCH_SINGLE = "pytorch_model.bin"
_MAX_PREAD = 1 << 30  # bytes per read call (Linux caps one read at ~2 GiB)


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives. ``start``/``end`` are absolute byte offsets in ``file`` (safetensors)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: str  # shard path relative to the checkpoint directory
    start: int = 0
    end: int = 0

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


def read_safetensors_header(path: Path, label: str | None = None) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate one safetensors file's header: ``({name: TensorInfo}, metadata)``.

    Reads only the header. Raises InputError (naming the file and tensor) when the header length
    exceeds the file, the header is not a JSON object, an entry is malformed or of an unknown
    dtype, a data length disagrees with ``numel * itemsize``, or offsets overlap or run past the
    end of the file (a truncated download).
    """
    path = Path(path)
    label = label or path.name
    where = str(path)

    def corrupt(what: str) -> InputError:
        return InputError(f"{where}: corrupt or truncated safetensors file ({what}); re-download or re-export it")

    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise corrupt(f"{size} bytes, shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > MAX_HEADER_BYTES:
                raise corrupt(f"header length {n} is larger than the file ({size} bytes)")
            raw = f.read(n)
    except OSError as e:
        raise InputError(f"{where}: cannot read ({e.strerror or e}); check the path and permissions") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise corrupt(f"header is not valid JSON: {e}") from None
    if not isinstance(header, dict):
        raise corrupt("header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict):
        raise corrupt("__metadata__ is not an object")

    data_start, data_len = 8 + n, size - 8 - n
    infos: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        try:
            code, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            ok = (
                isinstance(code, str)
                and isinstance(shape, list)
                and all(type(d) is int and d >= 0 for d in shape)
                and type(begin) is int
                and type(end) is int
                and 0 <= begin <= end
            )
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise corrupt(f"tensor {name!r}: malformed entry {json.dumps(entry)[:120]}")
        if code not in DTYPES:
            raise InputError(
                f"{where}: tensor {name!r} has dtype {code}, which this torch {torch.__version__} cannot hold; "
                "convert the checkpoint to a supported dtype"
            )
        info = TensorInfo(name, DTYPES[code], tuple(shape), label, data_start + begin, data_start + end)
        if end - begin != info.nbytes:
            raise corrupt(
                f"tensor {name!r}: {end - begin} data bytes, but {code}{list(shape)} needs {info.nbytes}"
            )
        if end > data_len:
            raise corrupt(f"tensor {name!r}: data [{begin}, {end}) runs past the end of the data ({data_len} bytes)")
        infos[name] = info

    # Overlap check: sort by start; each non-empty range must begin at or after the previous end.
    prev_end, prev_name = data_start, None
    for info in sorted(infos.values(), key=lambda i: (i.start, i.end)):
        if info.nbytes and info.start < prev_end:
            raise corrupt(f"tensors {prev_name!r} and {info.name!r} overlap")
        if info.nbytes:
            prev_end, prev_name = info.end, info.name
    return infos, {str(k): str(v) for k, v in meta.items()}


class Closing:
    """``with`` support and close-on-collect for readers holding file descriptors (``close()``)."""

    def close(self) -> None:  # pragma: no cover - overridden
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


class CheckpointReader(Closing):
    """Read-only view of a checkpoint directory (or one weights file), loading one tensor at a time.

    >>> with CheckpointReader(Path("models/llama")) as ckpt:
    ...     for name in ckpt.names():
    ...         w = ckpt.get(name, dtype=torch.float32)

    Accepts a directory holding ``model.safetensors.index.json``, ``model.safetensors``,
    ``pytorch_model.bin.index.json`` or ``pytorch_model.bin`` (tried in that order), or a path to
    any ``*.safetensors``, ``*.safetensors.index.json``, ``*.bin``/``*.pth``/``*.pt`` or
    ``*.bin.index.json`` file. Everything is validated on open. Pickle (``.bin``) shards are loaded
    through ``load_torch_file`` (weights_only, mmapped), one shard cached at a time; their resident
    memory is bounded by one shard rather than one tensor.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        if not self.path.exists():
            raise InputError(f"{self.path}: no such file or directory")
        self.directory = self.path if self.path.is_dir() else self.path.parent
        self._fds: dict[str, int] = {}
        self._fd_lock = threading.Lock()
        self._torch_cache: tuple[str, dict[str, torch.Tensor]] | None = None
        self._config: dict | None = None
        self.index_file: str | None = None  # relative name of the index json, when sharded
        self.metadata: dict[str, dict[str, str]] = {}  # per safetensors shard: its __metadata__
        self._infos: dict[str, TensorInfo] = self._open()
        self._names = sorted(self._infos)
        self.shards: list[str] = sorted({i.file for i in self._infos.values()} | set(self.metadata))

    # ------------------------------------------------------------------ opening / validation

    def _open(self) -> dict[str, TensorInfo]:
        p = self.path
        if p.is_file():
            name = p.name
            if name.endswith(".index.json"):
                return self._open_index(name)
            if name.endswith(".safetensors"):
                return self._open_safetensors(name)
            if name.endswith(TORCH_SUFFIXES):
                return self._open_torch(name)
            raise InputError(
                f"{p}: not a checkpoint file; pass a model directory or a .safetensors, .bin, .pth or .index.json file"
            )
        for candidate, opener in (
            (SAFETENSORS_INDEX, self._open_index),
            (SAFETENSORS_SINGLE, self._open_safetensors),
            (TORCH_INDEX, self._open_index),
            (TORCH_SINGLE, self._open_torch),
        ):
            if (p / candidate).is_file():
                return opener(candidate)
        found = sorted(x.name + ("/" if x.is_dir() else "") for x in p.iterdir())
        shown = ", ".join(found[:12]) + (f", ... ({len(found)} entries)" if len(found) > 12 else "")
        raise InputError(
            f"{p}: no model weights found (looked for {SAFETENSORS_INDEX}, {SAFETENSORS_SINGLE}, {TORCH_INDEX}, "
            f"{TORCH_SINGLE}); found: {shown or 'nothing'}; point to a Hugging Face model directory"
        )

    def _open_safetensors(self, rel: str) -> dict[str, TensorInfo]:
        infos, meta = read_safetensors_header(self.directory / rel, rel)
        self.metadata[rel] = meta
        return infos

    def _open_torch(self, rel: str) -> dict[str, TensorInfo]:
        # mmapped load: only the pickle is parsed here; storages stay on disk until touched.
        state = load_torch_file(self.directory / rel)
        return {k: TensorInfo(k, t.dtype, tuple(t.shape), rel) for k, t in state.items()}

    def _open_index(self, rel: str) -> dict[str, TensorInfo]:
        index_path = self.directory / rel
        self.index_file = rel
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(f"{index_path}: not a readable JSON index ({e}); re-download or re-export it") from None
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise InputError(f"{index_path}: has no \"weight_map\" object; re-download or re-export it")
        by_shard: dict[str, list[str]] = {}
        for name, shard in weight_map.items():
            if not isinstance(shard, str):
                raise InputError(f"{index_path}: weight_map[{name!r}] is not a file name; re-download or re-export it")
            try:
                shard = check_relative(shard)
            except ValueError as e:
                raise InputError(
                    f"{index_path}: weight_map[{name!r}]: {e}; refusing to read outside the model directory"
                ) from None
            by_shard.setdefault(shard, []).append(name)

        infos: dict[str, TensorInfo] = {}
        for shard, names in sorted(by_shard.items()):
            shard_path = self.directory / shard
            if not shard_path.is_file():
                raise InputError(
                    f"{shard_path}: missing, but {rel} lists {len(names)} tensors in it (e.g. {names[0]!r}); "
                    "download the complete checkpoint"
                )
            if shard.endswith(".safetensors"):
                available = self._open_safetensors(shard)
            elif shard.endswith(TORCH_SUFFIXES):
                available = self._open_torch(shard)
            else:
                raise InputError(f"{index_path}: shard {shard!r} is neither .safetensors nor .bin; re-export the model")
            for name in names:
                if name not in available:
                    raise InputError(
                        f"{shard_path}: has no tensor {name!r}, but {rel} says it does; the index and shards are "
                        "out of sync; re-download or re-export the checkpoint"
                    )
                infos[name] = available[name]
        return infos

    # ------------------------------------------------------------------ metadata queries (no tensor reads)

    def names(self) -> list[str]:
        """Every tensor name, sorted."""
        return list(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._infos

    def __len__(self) -> int:
        return len(self._names)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise InputError(
                f"{self.path}: has no tensor {name!r} ({len(self._names)} tensors); check the model or the tensor name"
            ) from None

    def shape(self, name: str) -> tuple[int, ...]:
        return self.info(name).shape

    def dtype(self, name: str) -> torch.dtype:
        return self.info(name).dtype

    def nbytes(self, name: str) -> int:
        return self.info(name).nbytes

    def file_of(self, name: str) -> str:
        """The shard holding ``name``, relative to the checkpoint directory."""
        return self.info(name).file

    @property
    def total_bytes(self) -> int:
        return sum(i.nbytes for i in self._infos.values())

    @property
    def config(self) -> dict:
        """``config.json`` of the directory, parsed ({} when absent)."""
        if self._config is None:
            cfg_path = self.directory / "config.json"
            if not cfg_path.is_file():
                self._config = {}
            else:
                try:
                    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
                except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                    raise InputError(f"{cfg_path}: not valid JSON ({e}); fix or re-download it") from None
                if not isinstance(cfg, dict):
                    raise InputError(f"{cfg_path}: is not a JSON object; fix or re-download it")
                self._config = cfg
        return self._config

    # ------------------------------------------------------------------ tensor reads

    def get(
        self,
        name: str,
        dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu",
        *,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Load ONE tensor (a fresh, contiguous tensor the caller owns), optionally cast and moved.

        ``out``: a contiguous CPU ``uint8`` buffer of at least :meth:`nbytes` (its start aligned to
        the item size) to read into instead of a fresh allocation; the result is then a view of it
        (before any cast or move). Reusing one buffer across tensors saves the page faults of
        fresh memory, which cost about as much as the read itself.
        """
        info = self.info(name)
        if out is not None:
            _check_buffer(out, info)
        if info.file.endswith(".safetensors"):
            t = self._pread(info, info.start, info.nbytes, out).view(info.dtype).reshape(info.shape)
        else:
            t = self._torch_tensor(info, out=out)
        return _finish(t, dtype, device)

    def get_rows(
        self, name: str, start: int, stop: int, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
    ) -> torch.Tensor:
        """Rows ``[start, stop)`` of a tensor (along dim 0), reading only those bytes."""
        info = self.info(name)
        if not info.shape:
            raise ValueError(f"{name}: a 0-d tensor has no rows")
        rows = info.shape[0]
        start, stop, _ = slice(start, stop).indices(rows)
        stop = max(start, stop)
        shape = (stop - start, *info.shape[1:])
        if info.file.endswith(".safetensors"):
            row_bytes = math.prod(info.shape[1:]) * info.dtype.itemsize
            n = (stop - start) * row_bytes
            t = self._pread(info, info.start + start * row_bytes, n).view(info.dtype).reshape(shape)
        else:
            t = self._torch_tensor(info, slice(start, stop))
        return _finish(t, dtype, device)

    def _fd(self, rel: str) -> int:
        fd = self._fds.get(rel)
        if fd is None:
            with self._fd_lock:  # the layer loop reads from a prefetch thread too: open each shard once
                fd = self._fds.get(rel)
                if fd is None:
                    fd = self._fds[rel] = os.open(self.directory / rel, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        return fd

    def _pread(self, info: TensorInfo, offset: int, n: int, out: torch.Tensor | None = None) -> torch.Tensor:
        buf = torch.empty(n, dtype=torch.uint8) if out is None else out[:n]
        if n == 0:
            return buf
        view = memoryview(buf.numpy())
        fd, done = self._fd(info.file), 0
        while done < n:
            chunk = view[done : min(n, done + _MAX_PREAD)]
            got = _pread_into(fd, chunk, offset + done)
            if got <= 0:
                raise InputError(
                    f"{self.directory / info.file}: tensor {info.name!r}: file ended early (corrupt or truncated "
                    "since it was opened); re-download or re-export it"
                )
            done += got
        return buf

    def _torch_tensor(self, info: TensorInfo, rows: slice | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        if self._torch_cache is None or self._torch_cache[0] != info.file:
            self._torch_cache = None  # drop the previous shard (and its mapping) first
            self._torch_cache = (info.file, load_torch_file(self.directory / info.file))
        t = self._torch_cache[1][info.name]
        if rows is not None:
            t = t[rows]
        # Copy out of the mmapped storage so the caller never pins the shard's mapping.
        dst = torch.empty(t.shape, dtype=t.dtype) if out is None else out[: info.nbytes].view(t.dtype).view(t.shape)
        return dst.copy_(t)

    # ------------------------------------------------------------------ lifetime

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._torch_cache = None


    def __repr__(self) -> str:
        return f"CheckpointReader({str(self.path)!r}, {len(self._names)} tensors, {len(self.shards)} shards)"


def _pread_into(fd: int, chunk: memoryview, offset: int) -> int:
    """Positioned read straight into ``chunk`` (no intermediate bytes object where preadv exists)."""
    if hasattr(os, "preadv"):
        return os.preadv(fd, [chunk], offset)
    data = os.pread(fd, len(chunk), offset)
    chunk[: len(data)] = data
    return len(data)


def _check_buffer(out: torch.Tensor, info: TensorInfo) -> None:
    ok = (
        out.dtype == torch.uint8
        and out.device.type == "cpu"
        and out.dim() == 1
        and out.is_contiguous()
        and out.numel() >= info.nbytes
        and out.data_ptr() % max(info.dtype.itemsize, 1) == 0
    )
    if not ok:
        raise ValueError(
            f"{info.name}: out must be a contiguous 1-d CPU uint8 buffer of at least {info.nbytes} bytes, aligned to "
            f"{info.dtype.itemsize}; got {out.dtype} {tuple(out.shape)} at {out.data_ptr() % 64} mod 64"
        )


def _finish(t: torch.Tensor, dtype: torch.dtype | None, device: str | torch.device) -> torch.Tensor:
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)
    if torch.device(device) != t.device:
        t = t.to(device)
    return t
