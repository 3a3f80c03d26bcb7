"""`quantize gptq` / `quantize rtn`: GPTQ (or the RTN baseline) into the GPTQ checkpoint format or
compressed-tensors (``--format``)."""

from __future__ import annotations

from pathlib import Path

import click

from .common import (exec_options, format_options, make_exec_config, moe_options, out_option, quantize_output_options,
                     stage_options)


GRIDS = ("auto", "minmax", "mse", "full", "full-mse")
DEFAULT_GRID = "auto"


def resolve_grid(grid: str, bits: int, rtn: bool, sym: bool = True) -> str:
    """``auto`` (the default), chosen by measurement on ref-llama (README, "GPTQ at the defaults";
    benchmarks/lowbit_quality.py): symmetric GPTQ takes the full-range grid (``full``: signed scale,
    the group's largest-magnitude weight on the grid's extra level) at 2-4 bits, with the MSE clip
    search at 4 bits (``full-mse``); asymmetric GPTQ the MSE clip search at 3-4 bits; 8 bits and
    RTN (the plain baseline) the group's min/max range."""
    if grid != "auto":
        return grid
    if rtn or bits == 8:
        return "minmax"
    if not sym:
        return "mse" if bits in (3, 4) else "minmax"
    return "full-mse" if bits == 4 else "full"


def grid_flags(grid: str) -> dict[str, bool]:
    """``QuantSpec`` fields of a resolved ``--grid`` value."""
    return {"mse": grid.endswith("mse"), "full_range": grid.startswith("full")}


def resolve_static_groups(static_groups: bool | None, act_order: bool, rtn: bool) -> bool:
    """``None`` (the default): on with act-order -- static activation ordering, groups on the
    original columns, which every loader takes (vLLM refuses GPTQ ``desc_act: true``, and
    compressed-tensors stores no other act-order); off for RTN (no column order)."""
    if static_groups is None:
        return act_order and not rtn
    return static_groups


def quantize_gptq(*, model_dir: Path, calibration: Path, out: Path, bits: int, group_size: int, act_order: bool,
                  sym: bool, damp: float, static_groups: bool | None, block_size: int, rtn: bool, exec_cfg,
                  seed: int = 0, overwrite: bool = False, resume: bool = False, checkpoint_format: str = "gptq",
                  max_shard_bytes: int = 5 * 10**9, format: str = "gptq", scale_dtype: str = "auto",
                  moe_calibration: str = "routed", moe_min_tokens: float = 0.005, moe_fallback: str = "all",
                  refine: str = "none", refine_iters: int = 200, refine_lr: float | None = None,
                  refine_target: str = "fp", grid: str = DEFAULT_GRID):
    """Library entry point (the CLI and `quantize run` call this).

    ``format``: "gptq" (the GPTQ layout; ``checkpoint_format`` v1/v2 zeros) or "compressed-tensors"
    (pack-quantized). ``static_groups=None``: see :func:`resolve_static_groups`. ``scale_dtype``: see
    ``formats.registry.resolve_scale_dtype``. ``moe_*``: where a Mixture-of-Experts model's experts
    take their statistics from (executor/moe.py); recorded only for MoE models. ``refine``:
    "signround" refines each layer's results by SignRound (methods/signround.py; ``refine_iters``
    steps, ``refine_lr`` initial step, default 1/iters); dense models only. ``grid``: each group's
    scale and zero from its "minmax" range, or "mse": the range shrunk (up to 20% in 1% steps) to
    minimise sum |w - w_hat|^2.4 of the group (methods/grid.py, GPTQModel/IST ``mse=2.4``), or "auto":
    see :func:`resolve_grid`."""
    import torch

    from ..errors import InputError
    from ..arch import get_arch
    from ..executor.moe import MoEOptions
    from ..executor.stage import run_quantize_stage
    from ..formats.registry import model_config, resolve_scale_dtype
    from ..methods.grid import QuantSpec
    from ..methods.layer import GPTQMethod, RTNMethod

    if format not in ("gptq", "compressed-tensors"):
        raise InputError(f"--format {format!r}: `quantize gptq` writes gptq or compressed-tensors")
    ct = format == "compressed-tensors"
    if grid not in GRIDS:
        raise InputError(f"--grid {grid!r}: expected one of {', '.join(GRIDS)}")
    grid = resolve_grid(grid, bits, rtn, sym)
    if grid.startswith("full") and not sym:
        raise InputError(f"--grid {grid}: the full-range grid is symmetric; drop --asym or choose minmax/mse")
    static_groups = resolve_static_groups(static_groups, act_order, rtn)
    torch.manual_seed(seed)
    spec = QuantSpec(bits=bits, group_size=group_size, sym=sym, act_order=act_order, static_groups=static_groups,
                     damp=damp, block_size=block_size, **grid_flags(grid), scale_dtype=resolve_scale_dtype(format, scale_dtype, model_dir),
                     # v1 "gptq" stores zero-1, so zero 0 is unrepresentable there; v2 and CT use the full grid
                     v1_safe_zeros=not ct and checkpoint_format == "gptq")
    moe = MoEOptions(mode=moe_calibration, min_tokens=moe_min_tokens, fallback=moe_fallback)
    is_moe = get_arch(model_config(model_dir)).moe is not None
    if refine not in ("none", "signround"):
        raise InputError(f"--refine {refine!r}: expected none or signround")
    settings = None
    if refine == "signround":
        from ..methods.signround import SignRoundSettings

        if is_moe:
            raise InputError("--refine signround does not support Mixture-of-Experts models yet; drop --refine")
        settings = SignRoundSettings.parse({"iters": refine_iters, "lr": refine_lr, "seed": seed, "target": refine_target},
                                           "--refine-iters/--refine-lr/--refine-target")
    method = RTNMethod(spec, moe, settings) if rtn else GPTQMethod(spec, moe, settings)
    if ct:
        from ..formats.compressed_tensors import CompressedTensorsIntFormat

        # RTN has no column order: act-order is meaningless there and is not recorded
        fmt = CompressedTensorsIntFormat.for_model(spec.model_copy(update={"act_order": False}) if rtn else spec,
                                                   model_config(model_dir))
    else:
        from ..formats.gptq_checkpoint import GPTQFormat

        fmt = GPTQFormat(spec, checkpoint_format=checkpoint_format)
    params = {"method": method.name, "bits": bits, "group_size": group_size, "sym": sym, "act_order": act_order,
              "static_groups": static_groups, "damp": damp, "block_size": block_size, "seed": seed,
              "format": format, "scale_dtype": spec.scale_dtype}
    if grid != "minmax":  # absent for min/max: earlier runs' fingerprints stay valid
        params["grid"] = grid
    if not ct:
        params["checkpoint_format"] = checkpoint_format
    if is_moe:
        params.update(moe.params())
    if settings is not None:  # absent without --refine: earlier runs' fingerprints stay valid
        params.update(refine="signround", refine_iters=settings.iters, refine_lr=settings.step_size)
        if settings.target != "quantized":  # absent for the earlier target: those runs' fingerprints stay valid
            params["refine_target"] = settings.target
    return run_quantize_stage(stage=method.name, model_dir=model_dir, calibration_dir=calibration, out=out,
                              method=method, fmt=fmt, params=params, exec_cfg=exec_cfg, overwrite=overwrite,
                              resume=resume, max_shard_bytes=max_shard_bytes)


def _shared_options(calibration_help: str):
    """The options `quantize gptq` and `quantize rtn` share (model, calibration, grid, format, loop)."""
    def deco(f):
        for option in reversed([
            click.option("--model", "model_dir", required=True,
                         type=click.Path(path_type=Path, exists=True, file_okay=False),
                         help="HF model directory or a merge output."),
            click.option("--calibration", required=True, type=click.Path(path_type=Path, exists=True, file_okay=False),
                         help=calibration_help),
            click.option("--bits", default="4", show_default=True, type=click.Choice(["2", "3", "4", "8"])),
            click.option("--group-size", default=128, show_default=True, type=int,
                         help="Columns per quantization group; -1: one group per row."),
            click.option("--sym/--asym", default=True, show_default=True, help="Symmetric or asymmetric grid."),
            click.option("--grid", default=DEFAULT_GRID, show_default=True, type=click.Choice(GRIDS),
                         help="Each group's scale/zero: minmax: its min/max range; mse: the range shrunk (1% "
                              "steps, down to 21%) to minimise the group's |w - w_hat|^2.4; full: symmetric, signed "
                              "scale with the largest-magnitude weight on the extra level -2^(b-1)·s (llama.cpp/"
                              "AutoRound); full-mse: full with the mse search; auto: full-mse for symmetric GPTQ at "
                              "4 bits, full at 2-3, mse for asymmetric at 3-4, minmax at 8 bits and for RTN "
                              "(measured: README)."),
            click.option("--checkpoint-format", default="gptq", show_default=True, type=click.Choice(["gptq", "gptq_v2"]),
                         help="Zero-point convention of the written qzeros (--format gptq)."),
            click.option("--refine", default="none", show_default=True, type=click.Choice(["none", "signround"]),
                         help="Refine each layer's rounding and clip ranges by SignRound (arXiv:2309.05516) on the "
                              "layer's output error, starting from the GPTQ/RTN solution. Dense models only."),
            click.option("--refine-iters", default=200, show_default=True, type=int,
                         help="SignRound signed-gradient steps per layer."),
            click.option("--refine-lr", default=None, type=float, help="SignRound initial step size. Default: 1/iters."),
            click.option("--refine-target", default="fp", show_default=True, type=click.Choice(["fp", "quantized"]),
                         help="What each layer is tuned towards: fp: the unquantized model's output of that layer "
                              "(the layer learns to undo the error of the quantized layers before it, as AutoRound); "
                              "quantized: the unquantized layer on the quantized model's inputs."),
            format_options(["gptq", "compressed-tensors"]), quantize_output_options, moe_options, out_option(),
            exec_options, stage_options,
        ]):
            f = option(f)
        return f
    return deco


def _run(*, model_dir, calibration, bits, group_size, sym, grid, checkpoint_format, format, scale_dtype, max_shard_size,
         resume, out, batch_size, offload_activations, compute_dtype, lockstep, host_heap, device, seed, overwrite,
         expert_chunk=None, **solver):
    cfg = make_exec_config(device, batch_size, offload_activations, compute_dtype, lockstep, host_heap, expert_chunk)
    m = quantize_gptq(model_dir=model_dir, calibration=calibration, out=out, bits=int(bits), group_size=group_size,
                      sym=sym, grid=grid, exec_cfg=cfg, seed=seed, overwrite=overwrite, resume=resume,
                      checkpoint_format=checkpoint_format, max_shard_bytes=int(max_shard_size * 1e9), format=format,
                      scale_dtype=scale_dtype, **solver)
    click.echo(f"wrote {out} ({len(m.outputs)} files); mean relative error {m.metrics.get('mean_rel_error', float('nan')):.4g}")


@click.command("gptq")
@_shared_options("Output of `quantize sample` for this model.")
@click.option("--act-order/--no-act-order", default=True, show_default=True, help="Quantize columns in order of decreasing Hessian diagonal (desc_act).")
@click.option("--static-groups/--no-static-groups", default=None,
              help="With act-order: group parameters fixed on the original columns before the column permutation "
                   "(static activation ordering: desc_act false, loaded by every engine). Default: on. "
                   "--no-static-groups is dynamic act-order (desc_act true, g_idx indirection), which vLLM refuses "
                   "and compressed-tensors cannot store.")
@click.option("--damp", default=0.01, show_default=True, type=float, help="Dampening, as a fraction of the mean Hessian diagonal (raised automatically when needed).")
@click.option("--block-size", default=128, show_default=True, type=int, help="Columns per lazy-update block.")
@click.option("--rtn", is_flag=True, help="Round-to-nearest baseline on the same grid and format (no GPTQ updates).")
def gptq_command(**kw):
    """Quantize with GPTQ, one decoder layer resident at a time."""
    _run(**kw)


@click.command("rtn")
@_shared_options("Output of `quantize sample` (RTN uses no statistics; the tokens give the reported error).")
def rtn_command(**kw):
    """Round-to-nearest (the calibration-free baseline), same grid and formats as `quantize gptq`."""
    _run(act_order=False, damp=0.01, static_groups=False, block_size=128, rtn=True, **kw)
