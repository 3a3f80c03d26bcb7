"""Shared fixtures: tiny random checkpoints and their calibration sets, built once per session and cached.

Cached directories are shared between tests: treat them as read-only (copy before editing).
Plain helpers shared between test files are in ``helpers.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from quantize.calibration import sample_calibration
from quantize.testing import build_tiny_model


@pytest.fixture
def one_thread():
    """Run the test on one torch thread (the CPU is shared); the previous count comes back after.
    Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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


@pytest.fixture(scope="session")
def calib_for(tmp_path_factory) -> Callable[..., Path]:
    """Factory ``calib_for(model_dir, n=8, seq_len=64) -> Path``: a wikitext2 calibration set (seed 0)
    tokenized for ``model_dir``, sampled once per (model, n, seq_len)."""
    cache: dict[tuple, Path] = {}

    def make(model_dir: Path, n: int = 8, seq_len: int = 64) -> Path:
        key = (str(model_dir), n, seq_len)
        if key not in cache:
            out = tmp_path_factory.mktemp("cal") / "cal"
            sample_calibration(model_dir, "wikitext2", n, seq_len, 0, out)
            cache[key] = out
        return cache[key]

    return make
