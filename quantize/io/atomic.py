"""Atomic, resumable stage outputs.

A stage writes into ``OUT.partial/`` next to the final directory; only when every file and a
complete manifest are in place is the staging directory renamed to ``OUT``. A crash leaves
``OUT.partial/`` (clearly not a finished output), which ``keep_partial=True`` keeps for the stage
to resume from.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..errors import InputError


def staging_path(out: Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".partial")


class StagedOutput:
    """Context manager owning a stage's output directory.

    >>> with StagedOutput(out, overwrite=False) as staging:
    ...     write files into staging
    ...     manifest.complete(staging, m)
    ...     publish happens on clean exit
    """

    def __init__(self, out: Path, *, overwrite: bool = False, keep_partial: bool = False):
        self.out = Path(out)
        self.staging = staging_path(self.out)
        self.overwrite = overwrite
        self.keep_partial = keep_partial
        self.published = False

    def preflight(self) -> None:
        """Refuse an existing output unless --overwrite (cheap; call before heavy work)."""
        if self.out.exists() and not self.overwrite:
            raise InputError(f"{self.out}: output exists; pass --overwrite to replace it (or choose another --out)")
        if self.out.exists() and not self.out.is_dir():
            raise InputError(f"{self.out}: exists and is not a directory; choose another --out")

    def __enter__(self) -> Path:
        self.preflight()
        if self.staging.exists() and not self.keep_partial:
            shutil.rmtree(self.staging)
        self.staging.mkdir(parents=True, exist_ok=True)
        return self.staging

    def publish(self) -> Path:
        if self.published:
            return self.out
        old = None
        if self.out.exists():
            old = self.out.with_name(self.out.name + f".old-{os.getpid()}")
            os.replace(self.out, old)
        os.replace(self.staging, self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        self.published = True
        return self.out

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.publish()
        # On failure the staging directory stays for --resume; it is named *.partial and carries no
        # complete manifest, so it never looks like a finished output.
        return False
