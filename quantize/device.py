"""Device selection: auto, cpu, cuda, cuda:i."""

from __future__ import annotations

import re

from .errors import InputError


def resolve_device(spec: str = "auto") -> str:
    import torch

    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    if spec == "cpu":
        return "cpu"
    m = re.fullmatch(r"cuda(?::(\d+))?", spec)
    if not m:
        raise InputError(f"--device {spec!r}: expected auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise InputError(f"--device {spec}: CUDA is not available on this machine; use --device cpu")
    idx = int(m.group(1) or 0)
    if idx >= torch.cuda.device_count():
        raise InputError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) present")
    return f"cuda:{idx}"
