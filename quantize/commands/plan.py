"""`quantize plan`: memory of weights and KV cache per method and bit width, from config.json alone."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..errors import InputError


def _gib(n: int) -> str:
    return f"{n / 2**30:8.2f}"


def resolve_config(target: Path, overrides: tuple[str, ...] = ()) -> tuple[dict, str]:
    """config.json of a model directory, or of a recipe's source (``source.config`` when the
    weights are not on this machine)."""
    if target.is_dir():
        path = target / "config.json"
    elif target.suffix in (".yaml", ".yml"):
        from ..pipeline.recipe import load_recipe

        r = load_recipe(target, list(overrides))
        src = r.source
        candidates = [Path(p) / "config.json" for p in (src.model, src.base) if p] + ([Path(src.config)] if src.config else [])
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise InputError(f"{target}: no config.json at {', '.join(map(str, candidates)) or 'source'}; set source.config")
    elif target.name.endswith(".json"):
        path = target
    else:
        raise InputError(f"{target}: expected a model directory, a config.json or a recipe .yaml")
    if not path.is_file():
        raise InputError(f"{path}: missing; plan needs the model's config.json")
    try:
        return json.loads(path.read_text()), str(path)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON ({e})") from None


@click.command("plan")
@click.option("--model", "target", required=True, type=click.Path(path_type=Path, exists=True),
              help="Model directory, config.json, or recipe .yaml.")
@click.option("--bits", type=click.Choice(["2", "3", "4", "8"]), default=None, help="Only GPTQ/AWQ at this width.")
@click.option("--group-size", type=int, default=128, show_default=True, help="Group size for --bits.")
@click.option("--bpw", type=click.FloatRange(2.0, 8.0), default=None, help="Only EXL2 at this bits per weight.")
@click.option("--head-bits", type=click.Choice(["6", "8"]), default="6", show_default=True, help="EXL2 lm_head bits.")
@click.option("--context", type=click.IntRange(min=1), default=4096, show_default=True, help="Tokens of KV cache per sequence.")
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True, help="Concurrent sequences.")
@click.option("--kv-dtype", default="fp16", show_default=True, type=click.Choice(["fp16", "bf16", "fp32", "fp8", "int8"]))
@click.option("--vram", default=None, help="Device memory budget, e.g. 24GiB or 2x24GiB: pick the best setting that fits.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Recipe overrides (with a recipe).")
@click.option("--expert-chunk", type=click.IntRange(min=1), default=None,
              help="MoE: the device memory of a run that keeps this many experts of a layer on the device at once.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def plan_command(target, bits, group_size, bpw, head_bits, context, batch, kv_dtype, vram, overrides, as_json,
                 expert_chunk=None):
    """How much memory a model needs: exact quantized weight bytes + KV cache."""
    from ..plan import DEFAULT_SETTINGS, Setting, parse_size, plan

    config, source = resolve_config(target, overrides)
    settings = None
    if bits is not None or bpw is not None:
        settings = [Setting("bf16", 16)]
        if bits is not None:
            settings.append(Setting("gptq", int(bits), group_size))
            if bits in ("4", "8"):
                settings.append(Setting("ct", int(bits), group_size))
            if bits == "4":
                settings.append(Setting("awq", 4, group_size))
            if bits == "8":
                settings.append(Setting("fp8", 8))
            gguf = {"4": "Q4_K_M", "8": "Q8_0"}.get(bits)
            if gguf:
                settings.append(Setting("gguf", int(bits), gguf_type=gguf))
        if bpw is not None:
            settings.append(Setting("exl2", bpw))
    budget = None
    if vram:
        count, _, size = vram.partition("x") if "x" in vram.lower() else ("1", "", vram)
        budget = int(count) * parse_size(size) if size else parse_size(vram)
    p = plan(config, settings=settings, context=context, batch=batch, kv_dtype=kv_dtype, vram=budget,
             head_bits=int(head_bits), expert_chunk=expert_chunk)
    if as_json:
        click.echo(json.dumps({"config": source, **p}, indent=2))
        return
    click.echo(f"{source}: {p['family']}, {p['layers']} layers; KV cache for {batch} x {context} tokens in {kv_dtype}")
    n, r = p["parameters"], p["run"]
    click.echo(f"parameters: {n['total'] / 1e9:.2f} B total, {n['active'] / 1e9:.2f} B active per token; a run holds "
               f"one layer ({_gib(r['layer_bytes_max']).strip()} GiB in bf16) and at most "
               f"{_gib(r['hessian_bytes_max']).strip()} GiB of Hessians and solve workspace at once, and its results until written "
               f"({_gib(r['results_bytes_max']).strip()} GiB: a byte a weight)"
               + (f"; with --expert-chunk {expert_chunk} the device holds {_gib(r['device_layer_bytes_max']).strip()} GiB "
                  "of the layer" if expert_chunk else ""))
    click.echo(f"{'setting':<18} {'bits/w':>7} {'weights GiB':>12} {'KV GiB':>8} {'total GiB':>10}" + ("  fits" if budget else ""))
    for r in p["rows"]:
        fits = ("  yes" if r["fits"] else "  no") if budget else ""
        click.echo(f"{r['setting']:<18} {r['effective_bits']:>7.3f} {_gib(r['weights']):>12} {_gib(r['kv_cache']):>8} {_gib(r['total']):>10}{fits}")
    if budget:
        b = p["best"]
        click.echo(f"best within {vram}: {b['setting']} ({b['total'] / 2**30:.2f} GiB)" if b else
                   f"nothing fits in {vram}: reduce --context/--batch or use more devices")
