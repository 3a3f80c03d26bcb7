"""Shared fixtures: tiny random checkpoints, built once per session and cached.

Cached directories are shared between tests: treat them as read-only (copy before editing).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from quantize.testing import build_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Callable[..., Path]:
    """Factory ``tiny_model_dir(family, **kwargs) -> Path`` (kwargs as for ``build_tiny_model``)."""
    cache: dict[tuple, Path] = {}

    def make(family: str, **kwargs) -> Path:
        key = (family, tuple(sorted((k, repr(v)) for k, v in kwargs.items())))
        if key not in cache:
            cache[key] = build_tiny_model(family, tmp_path_factory.mktemp(f"tiny-{family}"), **kwargs)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_llama(tiny_model_dir) -> Path:
    """A 2-layer random Llama (hidden 64, GQA 4/2 heads) with the bundled tokenizer."""
    return tiny_model_dir("llama")
