"""Loading PyTorch pickle checkpoints (``.bin`` / ``.pth`` / ``.pt``) without executing code.

The only entry point into ``torch.load`` in this package. It always passes ``weights_only=True``, so
the restricted unpickler refuses any global outside torch's allow-list (a ``__reduce__`` calling
``os.system`` is rejected before it runs). A refusal is reported as untrusted input; there is no
fallback to ``weights_only=False``. Zip-format files (everything ``torch.save`` has written since
1.6) are memory-mapped, so only the pages a caller touches are read.
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError

TORCH_SUFFIXES = (".bin", ".pth", ".pt")


def torch_load(path: Path) -> Any:
    """``torch.load(path, weights_only=True, mmap=True, map_location="cpu")`` with one-line errors.

    Raises InputError for a refused pickle (code inside), a directory (a sharded DCP checkpoint) and a
    corrupt or truncated file. Legacy (pre-zip) files cannot be mmapped and are read fully.
    """
    path = Path(path)
    if path.is_dir():
        raise InputError(
            f"{path}: is a directory (a sharded/distributed checkpoint); consolidate it into one file first "
            "(e.g. torch.distributed.checkpoint.format_utils.dcp_to_torch_save)"
        )
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    mmap = zipfile.is_zipfile(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        # torch reports every weights_only refusal as UnpicklingError ("Weights only load failed ...").
        raise InputError(
            f"{path}: refused by torch.load(weights_only=True): contains pickled code; "
            "convert it to safetensors with a trusted tool"
        ) from e
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        reason = " ".join(str(e).split())[:160]
        raise InputError(
            f"{path}: not a readable PyTorch checkpoint (corrupt or truncated: {reason}); re-download or re-export it"
        ) from e


def load_torch_file(path: Path) -> dict[str, torch.Tensor]:
    """A ``{name: tensor}`` state dict from a PyTorch checkpoint, loaded safely (see ``torch_load``).

    Accepts a flat state dict (HF ``pytorch_model.bin``, Lit-GPT ``lit_model.pth``) or a training
    state whose ``"model"`` entry is the state dict (Lit-GPT ``final/lit_model.pth``, ``{"model": sd,
    "optimizer": ...}``). Keys are returned as stored (no prefix stripping; that is the caller's
    naming policy). Tensors may share storage (Lit-GPT ties ``lm_head``/``wte``) and may be
    memory-mapped views of the file.
    """
    path = Path(path)
    obj = torch_load(path)
    if isinstance(obj, Mapping) and not _all_tensors(obj) and isinstance(obj.get("model"), Mapping):
        obj = obj["model"]
    if not isinstance(obj, Mapping):
        raise InputError(f"{path}: holds a {type(obj).__name__}, not a state dict of tensors; pass a model checkpoint")
    out: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        if not isinstance(key, str):
            raise InputError(f"{path}: state dict key {key!r} is not a string; pass a model checkpoint")
        if not isinstance(value, torch.Tensor):
            raise InputError(
                f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor; pass a model state dict "
                "(not a training state or optimizer file)"
            )
        out[key] = value
    return out


def _all_tensors(obj: Mapping) -> bool:
    return all(isinstance(v, torch.Tensor) for v in obj.values())
