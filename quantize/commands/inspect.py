"""`quantize inspect DIR` and `quantize verify DIR`."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .. import manifest as mf
from ..errors import IntegrityError


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n} B"


def summarize(m: mf.Manifest) -> str:
    lines = [
        f"stage        {m.stage}  (status: {m.status})",
        f"created      {m.created}  quantize {m.tool_version}, schema v{m.schema_version}",
        f"environment  python {m.environment.python}, torch {m.environment.torch}, "
        f"transformers {m.environment.transformers}, device {m.environment.device}",
    ]
    for i in m.inputs:
        total = sum(f.bytes for f in i.files)
        parent = f", parent {i.stage} manifest {i.manifest_sha256[:12]}" if i.manifest_sha256 else ""
        lines.append(f"input        {i.role}: {i.path} ({len(i.files)} files, {_human_bytes(total)}{parent})")
    lines.append("params       " + json.dumps(m.params, sort_keys=True, default=str))
    total = sum(o.bytes for o in m.outputs)
    lines.append(f"outputs      {len(m.outputs)} files, {_human_bytes(total)}")
    for o in m.outputs:
        lines.append(f"  {o.sha256[:12]}  {_human_bytes(o.bytes):>10}  {o.path}")
    if isinstance(m.metrics.get("moe"), dict):  # Mixture-of-Experts coverage
        from ..executor.moe import coverage_lines

        lines += coverage_lines(m.metrics["moe"])
    for k, v in m.metrics.items():
        if k == "moe":
            continue
        if isinstance(v, (dict, list)):
            v = json.dumps(v, default=str)
            v = v if len(v) < 200 else v[:197] + "..."
        lines.append(f"metric       {k}: {v}")
    for c in m.checks:  # `quantize check` verdicts
        figs = ""
        if c.figures is not None:
            f = c.figures
            figs = f"  KL {f.kl:.3g}, top-1 {f.top1:.3f}, max|diff| {f.max_abs_diff:.3g} (rel {f.rel:.2e})"
        ver = f" {c.engine_version}" if c.engine_version else ""
        when = f" [{c.created}]" if c.created else ""
        lines.append(f"check        {c.engine}{ver}: {c.verdict}{figs}{' -- ' + c.reason if c.reason else ''}{when}")
    return "\n".join(lines)


@click.command("inspect")
@click.argument("directory", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def inspect_command(directory: Path, as_json: bool):
    """Print a summary of a stage output's manifest."""
    m = mf.load_manifest(directory, required=True)
    click.echo(mf.dump_manifest(m).decode().rstrip() if as_json else summarize(m))


@click.command("verify")
@click.argument("directory", type=click.Path(path_type=Path, exists=True, file_okay=False))
def verify_command(directory: Path):
    """Re-hash every output listed in DIR/manifest.json; exit 1 on any mismatch."""
    problems = mf.verify(directory)
    if problems:
        for p in problems[:-1]:
            click.echo(f"!! {p}", err=True)
        raise IntegrityError(f"{directory}: {len(problems)} problem(s); last: {problems[-1]}")
    m = mf.load_manifest(directory, required=True)
    click.echo(f"ok: {len(m.outputs)} outputs match {directory / mf.MANIFEST_NAME}")
