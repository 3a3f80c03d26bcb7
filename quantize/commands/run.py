"""`quantize run RECIPE`: the whole pipeline from a recipe."""

from __future__ import annotations

from pathlib import Path

import click

from .. import log


@click.command("run")
@click.argument("recipe", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--bits", type=int, default=None, help="Override the recipe's bits.")
@click.option("--method", type=click.Choice(["gptq", "rtn", "awq", "exl2", "fp8", "gguf"]), default=None, help="Override the recipe's method.")
@click.option("--format", "fmt", type=click.Choice(["gptq", "awq", "exl2", "compressed-tensors", "gguf"]), default=None,
              help="Override the recipe's checkpoint format (compressed-tensors for gptq, rtn, awq).")
@click.option("--out", type=click.Path(path_type=Path, file_okay=False), default=None, help="Run directory (default: the recipe's output_dir).")
@click.option("--device", default=None, help="auto, cpu, cuda or cuda:N (default: the recipe's).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override any recipe key, e.g. --set calibration.samples=64.")
@click.option("--dry-run", is_flag=True, help="Print the resolved plan and exit.")
@click.option("--overwrite", is_flag=True, help="Redo a complete run.")
@click.option("--json-logs", is_flag=True, help="One JSON object per line on stderr, for batch jobs.")
def run_command(recipe, bits, method, fmt, out, device, overrides, dry_run, overwrite, json_logs):
    """Run a recipe: merge -> sample -> quantize -> eval; completed stages are skipped on rerun."""
    from ..pipeline.recipe import load_recipe
    from ..pipeline.run import run_recipe

    if json_logs:
        log.configure(True)
    overrides = list(overrides)
    if bits is not None:
        overrides.append(f"bits={bits}")
    if method is not None:
        overrides.append(f"method={method}")
    if fmt is not None:
        overrides.append(f"format={fmt}")
    r = load_recipe(recipe, overrides)
    run_recipe(r, recipe, out=out, device=device, overwrite=overwrite, dry_run=dry_run)
