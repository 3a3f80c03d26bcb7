"""`quantize fp8`: FP8 W8A8 (per-channel e4m3 weights; dynamic per-token or static per-tensor FP8
activations) as compressed-tensors ``float-quantized``, the checkpoint vLLM runs on FP8 hardware."""

from __future__ import annotations

from pathlib import Path

import click

from .. import log
from ..errors import InputError
from .common import exec_options, make_exec_config, moe_options, out_option, quantize_output_options, stage_options

SCHEMES = ("dynamic", "static")


def quantize_fp8(*, model_dir: Path, out: Path, exec_cfg, scheme: str = "dynamic", calibration: Path | None = None,
                 seed: int = 0, overwrite: bool = False, resume: bool = False, max_shard_bytes: int = 5 * 10**9,
                 moe_calibration: str = "routed", moe_min_tokens: float = 0.005, moe_fallback: str = "all"):
    """Library entry point. ``dynamic`` needs no calibration (and ignores one); ``static`` observes
    each linear's largest input on ``calibration``. A Mixture-of-Experts model: every expert per
    expert; ``static`` writes per-tensor weights (what vLLM's FP8 fused-MoE takes with static
    activations) and takes the experts' statistics from the tokens routed to them (``moe_*``: as
    for GPTQ, executor/moe.py; recorded for static MoE runs only)."""
    import torch

    from ..arch import get_arch
    from ..executor.moe import MoEOptions
    from ..executor.stage import run_quantize_stage
    from ..formats.compressed_tensors import CompressedTensorsFP8Format, model_dtype
    from ..formats.registry import model_config
    from ..methods.fp8 import FP8Method

    if scheme not in SCHEMES:
        raise InputError(f"--scheme {scheme!r}: use dynamic (per-token activation scales at run time) or static")
    if scheme == "static" and calibration is None:
        raise InputError("--scheme static observes activation ranges: pass --calibration DIR (from `quantize sample`)")
    if scheme == "dynamic" and calibration is not None:
        log.info("--scheme dynamic needs no calibration data; --calibration is not used")
        calibration = None
    moe = MoEOptions(mode=moe_calibration, min_tokens=moe_min_tokens, fallback=moe_fallback)
    static = scheme == "static"
    per_tensor = static and get_arch(model_config(model_dir)).moe is not None
    dtype = model_dtype(model_config(model_dir))
    scale_dtype = str(dtype).removeprefix("torch.")
    torch.manual_seed(seed)
    method = FP8Method(scale_dtype=scale_dtype, static=static, per_tensor=per_tensor, moe=moe)
    fmt = CompressedTensorsFP8Format(static=static, dtype=dtype, per_tensor=per_tensor)
    params = {"method": "fp8", "format": "compressed-tensors", "scheme": scheme, "scale_dtype": scale_dtype,
              "seed": seed}
    if per_tensor:  # absent otherwise: earlier runs' fingerprints stay valid
        params.update(weights="tensor", **moe.params())
    return run_quantize_stage(stage="fp8", model_dir=model_dir, calibration_dir=calibration, out=out, method=method,
                              fmt=fmt, params=params, exec_cfg=exec_cfg, overwrite=overwrite, resume=resume,
                              max_shard_bytes=max_shard_bytes)


@click.command("fp8")
@click.option("--model", "model_dir", required=True, type=click.Path(path_type=Path, exists=True, file_okay=False),
              help="HF model directory or a merge output.")
@click.option("--scheme", default="dynamic", show_default=True, type=click.Choice(SCHEMES),
              help="Activation scales: dynamic (per token, at run time; no calibration) or static (per tensor, "
                   "observed on --calibration). Weights per output channel; static on a Mixture-of-Experts model: "
                   "per tensor (what vLLM's FP8 fused-MoE takes with static activations).")
@click.option("--calibration", default=None, type=click.Path(path_type=Path, exists=True, file_okay=False),
              help="Output of `quantize sample` (only for --scheme static).")
@quantize_output_options
@moe_options
@out_option()
@exec_options
@stage_options
def fp8_command(model_dir, scheme, calibration, max_shard_size, resume, out, batch_size, offload_activations,
                compute_dtype, lockstep, host_heap, device, seed, overwrite, moe_calibration, moe_min_tokens,
                moe_fallback, expert_chunk):
    """FP8 W8A8 into compressed-tensors, one decoder layer resident at a time (Mixture-of-Experts:
    every expert per expert)."""
    cfg = make_exec_config(device, batch_size, offload_activations, compute_dtype, lockstep, host_heap, expert_chunk)
    m = quantize_fp8(model_dir=model_dir, out=out, exec_cfg=cfg, scheme=scheme, calibration=calibration, seed=seed,
                     overwrite=overwrite, resume=resume, max_shard_bytes=int(max_shard_size * 1e9),
                     moe_calibration=moe_calibration, moe_min_tokens=moe_min_tokens, moe_fallback=moe_fallback)
    errs = [e for layer in m.metrics.get("layers", []) for e in layer.get("weight_rel_error", {}).values()]
    mean = sum(errs) / len(errs) if errs else float("nan")
    click.echo(f"wrote {out} ({len(m.outputs)} files); mean relative weight error {mean:.4g}")
