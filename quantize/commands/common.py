"""Options shared by every stage command."""

from __future__ import annotations

import functools
from pathlib import Path

import click

from .. import log


def out_option(required: bool = True):
    return click.option(
        "--out", "out", type=click.Path(path_type=Path, file_okay=False), required=required,
        help="Output directory (written atomically: OUT.partial/ then renamed).",
    )


def stage_options(f):
    """--device, --seed, --json-logs, --overwrite (plus --out, added per command)."""

    @click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
    @click.option("--seed", default=0, show_default=True, type=int, help="Random seed (recorded in the manifest).")
    @click.option("--json-logs", is_flag=True, help="One JSON object per line on stderr, for batch jobs.")
    @click.option("--overwrite", is_flag=True, help="Replace an existing output directory.")
    @functools.wraps(f)
    def wrapper(*args, json_logs: bool = False, **kwargs):
        if json_logs:
            log.configure(True)
        return f(*args, **kwargs)

    return wrapper


def existing_dir(help_text: str, **kw):
    return dict(type=click.Path(path_type=Path, exists=True, file_okay=False), help=help_text, **kw)
