"""`quantize check DIR [--engine auto|transformers|llama.cpp|gptqmodel|vllm|exllamav2|all] [--json]`."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .. import manifest as mf
from ..check.engines import CHOICES, engines_for
from ..errors import GateFailed, InputError


def _line(r: mf.CheckRecord) -> str:
    s = f"{r.engine:<13} {r.engine_version or '-':<10} {r.verdict}"
    if r.figures is not None:
        f = r.figures
        s += f"  KL {f.kl:.3g}  top-1 {f.top1:.3f}  max|diff| {f.max_abs_diff:.3g} (rel {f.rel:.2e})"
    return s + (f"  -- {r.reason}" if r.reason else "")


@click.command("check")
@click.argument("directory", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--engine", type=click.Choice(CHOICES), default="auto", show_default=True,
              help="auto/all: every engine that serves the output's format; or one engine.")
@click.option("--json", "as_json", is_flag=True, help="Print the verdicts as JSON.")
def check_command(directory: Path, engine: str, as_json: bool):
    """Load DIR with the engine(s) that serve it and compare their logits with our read-back.

    Verdicts are appended to DIR/manifest.json `checks` (the outputs' hashes are untouched, so
    `quantize verify` still holds). Exit 1 when an engine fails, or when the one engine named is not
    installed; an engine that is not installed is never a pass.
    """
    from ..check import check_output, detect_format, model_type

    fmt = detect_format(directory)
    if engine not in ("auto", "all") and engine not in engines_for(fmt, model_type(directory)):
        served = ", ".join(engines_for(fmt, model_type(directory))) or "none"
        raise InputError(f"{directory}: --engine {engine} does not serve {fmt} outputs (engines for {fmt}: {served})")
    fmt, engines, records = check_output(directory, engine)
    if not engines:
        from ..check.engines import refused_by

        known = [f"{e}: {refused_by(e, fmt, directory)}" for e in engines_for(fmt, model_type(directory))
                 if refused_by(e, fmt, directory)]
        why = f" ({'; '.join(known)})" if known else ""
        raise InputError(f"{directory}: no engine serves {fmt} outputs of this model{why}")
    if mf.load_manifest(directory) is not None:
        mf.append_checks(directory, records)
        where = f"recorded in {directory / mf.MANIFEST_NAME}"
    else:
        where = f"not recorded: {directory} has no manifest.json"
    if as_json:
        click.echo(json.dumps({"format": fmt, "checks": [r.model_dump(mode="json") for r in records]}, indent=2))
    else:
        click.echo(f"format       {fmt}")
        for r in records:
            click.echo("check        " + _line(r))
        click.echo(f"verdicts     {where}")
    failed = [r for r in records if r.verdict == "fail"]
    if failed:
        raise GateFailed("; ".join(f"{r.engine}: {r.reason}" for r in failed))
    if engine not in ("auto", "all") and records[0].verdict in ("not installed", "no kernel here"):
        raise GateFailed(f"{engine}: {records[0].verdict} ({records[0].reason})")
