"""Shared fixtures: tiny random checkpoints and their calibration sets, built once per session and cached.

Cached directories are shared between tests: treat them as read-only (copy before editing).
Plain helpers shared between test files are in ``helpers.py``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from quantize.calibration import sample_calibration
from quantize.testing import build_tiny_model


# Engines this run must have (comma list of their virtualenvs' names, e.g. ".venv-interop,.venv-vllm"):
# CI sets it (`.ci/run` builds them first), so that a test skipped because its engine is absent fails
# there instead of passing quietly. Every engine test's skip reason names the virtualenv it needs.
REQUIRED_ENGINES = tuple(e for e in os.environ.get("QUANTIZE_REQUIRE_ENGINES", "").split(",") if e.strip())


def _required_engine_missing(report) -> str | None:
    # a skip's longrepr is (path, line, reason); an xfail is reported as skipped too, with its
    # traceback as longrepr (and `wasxfail`): never an absent engine
    if not REQUIRED_ENGINES or not report.skipped or hasattr(report, "wasxfail"):
        return None
    if not isinstance(report.longrepr, tuple):
        return None
    reason = str(report.longrepr[-1])
    hit = next((e for e in REQUIRED_ENGINES if e.strip() in reason), None)
    return None if hit is None else f"{hit.strip()} is required here (QUANTIZE_REQUIRE_ENGINES) but absent: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    why = _required_engine_missing(rep)
    if why:
        rep.outcome, rep.longrepr = "failed", why


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    rep = outcome.get_result()
    why = _required_engine_missing(rep)
    if why:  # a module-level importorskip of the engine's library
        rep.outcome, rep.longrepr = "failed", why


@pytest.fixture(autouse=True)
def _no_vllm_outside_the_interop_tier(request, monkeypatch):
    """vLLM starts in ~30-70 s per model on this CPU: only tests marked ``interop`` may run it.
    Elsewhere (recipes with ``check: auto``) `quantize check` sees it as not installed."""
    if request.node.get_closest_marker("interop") is None:
        monkeypatch.setenv("QUANTIZE_VLLM_PYTHON", "/nonexistent/.venv-vllm/bin/python")


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
