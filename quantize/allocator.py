"""Which malloc serves the ``quantize`` command: jemalloc when it is installed (see
executor/memory.py for why), by re-executing the command line with it preloaded at start-up.

Kept free of torch imports: it runs before anything else, and a re-execution should not pay for them.

``QUANTIZE_MALLOC``: ``auto`` (default: jemalloc when found), ``glibc`` (never), ``jemalloc``
(required: exit 2 when it is not installed).
"""

from __future__ import annotations

import ctypes.util
import os
import sys
from typing import Callable

MALLOC_ENV = "QUANTIZE_MALLOC"
_EXEC_MARK = "QUANTIZE_MALLOC_EXEC"  # set in the re-executed process: never re-execute twice
JEMALLOC = "jemalloc"


def find_jemalloc() -> str | None:
    """The installed jemalloc shared library (e.g. ``libjemalloc.so.2``), or None."""
    return ctypes.util.find_library("jemalloc")


def jemalloc_exec_env(environ: dict[str, str],
                      find: Callable[[], str | None] = find_jemalloc) -> dict[str, str] | None:
    """The environment to re-execute this process with so that jemalloc serves malloc (module
    docstring), or None to carry on as is: ``QUANTIZE_MALLOC=glibc``, jemalloc already preloaded,
    a re-executed process, or no library (``find()``, called only when the answer depends on it:
    it runs ldconfig). Raises InputError when jemalloc is required (``QUANTIZE_MALLOC=jemalloc``)
    but not installed, or the setting is unknown."""
    from .errors import InputError

    want = environ.get(MALLOC_ENV, "auto").strip().lower() or "auto"
    if want not in ("auto", "glibc", JEMALLOC):
        raise InputError(f"{MALLOC_ENV}={environ[MALLOC_ENV]!r}: use auto, glibc or jemalloc")
    if want == "glibc" or environ.get(_EXEC_MARK) or JEMALLOC in environ.get("LD_PRELOAD", ""):
        return None
    library = find()
    if library is None:
        if want == JEMALLOC:
            raise InputError(f"{MALLOC_ENV}=jemalloc but no jemalloc library is installed "
                             f"(Debian/Ubuntu: apt-get install libjemalloc2), or unset {MALLOC_ENV}")
        return None
    preload = environ.get("LD_PRELOAD", "")
    return {**environ, "LD_PRELOAD": f"{library} {preload}".strip(), _EXEC_MARK: "1"}


def reexec_with_jemalloc() -> None:
    """At the start of the ``quantize`` command: re-execute the same command line with jemalloc
    preloaded when it is installed (``jemalloc_exec_env``); returns when there is nothing to do."""
    if not sys.platform.startswith("linux") or not sys.executable or not getattr(sys, "orig_argv", None):
        return
    env = jemalloc_exec_env(dict(os.environ))
    if env is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
