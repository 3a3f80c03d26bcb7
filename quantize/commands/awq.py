"""`quantize awq`: AWQ into the AWQ GEMM checkpoint format (4-bit, asymmetric, grouped) or
compressed-tensors (``--format``; the same grid, W4A16 asymmetric)."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import InputError
from .common import (exec_options, format_options, make_exec_config, moe_options, out_option, quantize_output_options,
                     stage_options)


def quantize_awq(*, model_dir: Path, calibration: Path, out: Path, exec_cfg, bits: int = 4, group_size: int = 128,
                 scale_search: bool = True, clip: bool = True, duo_scaling: bool = True, n_grid: int = 20,
                 search_tokens: int | None = None, rerun_top: int | None = None, rerun_dtype: str | None = None,
                 clip_grid: int | None = None,
                 max_shrink: float = 0.5, seed: int = 0,
                 overwrite: bool = False, resume: bool = False, max_shard_bytes: int = 5 * 10**9, format: str = "awq",
                 scale_dtype: str = "auto", moe_calibration: str = "routed", moe_min_tokens: float = 0.005,
                 moe_fallback: str = "all"):
    """Library entry point (the CLI and `quantize run` call this). Returns the output manifest.
    ``moe_*``: a Mixture-of-Experts model's per-expert statistics and fallback (executor/moe.py;
    for AWQ the ``rtn`` fallback is the AWQ grid without scale or clip); recorded for MoE models only.
    ``exec_cfg.expert_chunk``: a sparse layer's experts stay in host memory and reach the device one at
    a time in the searches and quantization (``expert_chunk`` at a time in its forward); the bytes are
    those of the run without it."""
    import torch

    from ..arch import get_arch
    from ..executor.moe import MoEOptions
    from ..executor.stage import run_quantize_stage
    from ..formats.registry import model_config, resolve_scale_dtype
    from ..methods.awq_layer import AWQMethod, AWQParams

    if format not in ("awq", "compressed-tensors"):
        raise InputError(f"--format {format!r}: `quantize awq` writes awq or compressed-tensors")
    if bits != 4:
        raise InputError(f"--bits {bits}: AWQ here is 4-bit only; use --bits 4 (or `quantize gptq` for other widths)")
    awq = AWQParams.parse(dict(group_size=group_size, scale_search=scale_search, clip=clip, duo_scaling=duo_scaling,
                               n_grid=n_grid, search_tokens=search_tokens, max_shrink=max_shrink,
                               **{k: v for k, v in (("rerun_top", rerun_top), ("rerun_dtype", rerun_dtype),
                                                    ("clip_grid", clip_grid))
                                  if v is not None}))
    torch.manual_seed(seed)
    moe = MoEOptions(mode=moe_calibration, min_tokens=moe_min_tokens, fallback=moe_fallback)
    method = AWQMethod(awq, resolve_scale_dtype(format, scale_dtype, model_dir), moe)
    if format == "compressed-tensors":
        from ..formats.compressed_tensors import CompressedTensorsIntFormat

        fmt = CompressedTensorsIntFormat.for_model(method.spec, model_config(model_dir))
        params = {"method": "awq", "bits": bits, **awq.model_dump(), "seed": seed, "format": format}
    else:
        from ..formats.awq import AWQFormat

        fmt = AWQFormat(group_size)
        params = {"method": "awq", "bits": bits, **awq.model_dump(), "seed": seed, "format": "awq", "version": "gemm"}
    params["scale_dtype"] = method.spec.scale_dtype
    if get_arch(model_config(model_dir)).moe is not None:  # absent for dense models: their fingerprints stay
        params.update(moe.params())
    return run_quantize_stage(stage="awq", model_dir=model_dir, calibration_dir=calibration, out=out, method=method,
                              fmt=fmt, params=params, exec_cfg=exec_cfg, overwrite=overwrite, resume=resume,
                              max_shard_bytes=max_shard_bytes)


def _ratio(layers: list[dict]) -> float:
    """Mean over pairs of (scale-search loss / round-to-nearest loss) on the search tokens."""
    r = [m["scale_loss"][k] / m["rtn_loss"][k] for m in layers for k in m.get("scale_loss", {}) if m["rtn_loss"][k] > 0]
    return sum(r) / len(r) if r else float("nan")


@click.command("awq")
@click.option("--model", "model_dir", required=True, type=click.Path(path_type=Path, exists=True, file_okay=False),
              help="HF model directory or a merge output.")
@click.option("--calibration", required=True, type=click.Path(path_type=Path, exists=True, file_okay=False),
              help="Output of `quantize sample` for this model.")
@click.option("--bits", default=4, show_default=True, type=int, help="Weight bits; AWQ here is 4-bit only.")
@click.option("--group-size", default=128, show_default=True, type=int, help="Columns per quantization group; -1: one group per row.")
@click.option("--scale-search/--no-scale-search", default=True, show_default=True,
              help="Search and fold per-channel activation-aware scales (off: round-to-nearest plus clipping).")
@click.option("--clip/--no-clip", default=True, show_default=True, help="Search per-group clipping thresholds.")
@click.option("--duo-scaling/--no-duo-scaling", default=True, show_default=True,
              help="Scales from activation and weight magnitudes (x^a / w^(1-a)); off: x^a.")
@click.option("--grid", "n_grid", default=20, show_default=True, type=click.IntRange(min=1), help="Grid points of the scale search.")
@click.option("--search-tokens", default=None, type=click.IntRange(min=1),
              help="Calibration tokens (whole sequences) the scale search re-runs sub-blocks on  [default: all]; "
                   "statistics use all tokens.")
@click.option("--rerun-top", default=None, type=click.IntRange(min=-1),
              help="Scale candidates (best by the all-token output error of the linears) whose attention/MLP "
                   "sub-block error is measured by re-running it; -1: all, 0: none  [default: 6].")
@click.option("--clip-grid", default=None, type=click.IntRange(min=1),
              help="Steps of the clip search: thresholds max|w|·(1 − i/N) down to half the range  [default: 100].")
@click.option("--rerun-dtype", default=None, type=click.Choice(["float32", "bfloat16"]),
              help="Dtype of those re-runs (a copy of the sub-block)  [default: float32].")
@format_options(["awq", "compressed-tensors"])
@quantize_output_options
@moe_options
@out_option()
@exec_options
@stage_options
def awq_command(model_dir, calibration, bits, group_size, scale_search, clip, duo_scaling, n_grid, search_tokens, rerun_top,
                clip_grid, rerun_dtype, format, scale_dtype, max_shard_size, resume, out, batch_size, offload_activations, compute_dtype, lockstep,
                host_heap, device, seed, overwrite, moe_calibration, moe_min_tokens, moe_fallback, expert_chunk):
    """Quantize with AWQ (activation-aware scales + clipping), one decoder layer resident at a time."""
    cfg = make_exec_config(device, batch_size, offload_activations, compute_dtype, lockstep, host_heap, expert_chunk)
    m = quantize_awq(model_dir=model_dir, calibration=calibration, out=out, exec_cfg=cfg, bits=bits,
                     group_size=group_size, scale_search=scale_search, clip=clip, duo_scaling=duo_scaling,
                     n_grid=n_grid, search_tokens=search_tokens, rerun_top=rerun_top, rerun_dtype=rerun_dtype,
                     clip_grid=clip_grid, seed=seed,
                     overwrite=overwrite, resume=resume,
                     max_shard_bytes=int(max_shard_size * 1e9), format=format, scale_dtype=scale_dtype,
                     moe_calibration=moe_calibration, moe_min_tokens=moe_min_tokens, moe_fallback=moe_fallback)
    layers = m.metrics.get("layers", [])
    click.echo(f"wrote {out} ({len(m.outputs)} files); mean relative error {m.metrics.get('mean_rel_error', float('nan')):.4g}; "
               f"sub-block error vs round-to-nearest {_ratio(layers):.3f}x")
