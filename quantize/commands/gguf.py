"""`quantize gguf`: a GGUF file for llama.cpp / Ollama / LM Studio, K-quants solved by GPTQ on the
Hessian when calibration data is given (llama.cpp's reference rounding without)."""

from __future__ import annotations

from pathlib import Path

import click

from .. import log
from .common import exec_options, make_exec_config, moe_options, out_option, quantize_output_options, stage_options


def quantize_gguf(*, model_dir: Path, out: Path, exec_cfg, ftype: str = "Q4_K_M", calibration: Path | None = None,
                  damp: float = 0.01, imatrix_out: Path | None = None, seed: int = 0, overwrite: bool = False,
                  resume: bool = False, moe_calibration: str = "routed", moe_min_tokens: float = 0.005,
                  moe_fallback: str = "all"):
    """Library entry point. Returns the output manifest. ``moe_*``: where a Mixture-of-Experts
    model's experts take their statistics from (executor/moe.py); recorded only for MoE models."""
    import torch

    from ..arch import get_arch
    from ..errors import InputError
    from ..executor.moe import MoEOptions
    from ..executor.stage import refuse_fused_experts, run_quantize_stage
    from ..formats.gguf_mix import FLOAT_FILE_TYPES, check_file_type, model_shape
    from ..formats.gguf_output import GGUFFormat
    from ..formats.registry import model_config
    from ..methods.gguf_layer import GGUFMethod

    ftype = check_file_type(ftype)
    if imatrix_out is not None and calibration is None:
        raise InputError("--imatrix-out writes the calibration statistics: pass --calibration DIR as well")
    if ftype in FLOAT_FILE_TYPES and calibration is not None:
        log.info(f"--type {ftype} quantizes nothing; --calibration is not used")
        calibration = None
    config = model_config(model_dir)
    arch = get_arch(config, source=str(Path(model_dir) / "config.json"))
    refuse_fused_experts(arch, Path(model_dir), "gguf")
    shape = model_shape(config, arch)
    torch.manual_seed(seed)
    moe = MoEOptions(mode=moe_calibration, min_tokens=moe_min_tokens, fallback=moe_fallback)
    method = GGUFMethod(ftype, shape, calibrated=calibration is not None, damp=damp, imatrix=imatrix_out is not None,
                        moe=moe)
    fmt = GGUFFormat(ftype, shape, Path(model_dir))
    params = {"method": "gguf", "format": "gguf", "type": ftype, "calibrated": calibration is not None,
              "damp": damp, "imatrix": imatrix_out is not None, "seed": seed}
    if arch.moe is not None and calibration is not None:
        params.update(moe.params())
    if arch.name == "deepseek_v3" and calibration is not None:
        # kv_b's k rows are written transposed (attn_k_b): their inputs are q_nope's, not kv_b's, so no
        # Hessian of ours applies; attn_v_b (kv_b's v rows, kv_b's inputs) is GPTQ-solved
        params["reference_rounding"] = {"attn_k_b": "kv_b_proj's k rows transposed per head (inputs: q_nope); "
                                                    "llama.cpp's reference rounding"}
    m = run_quantize_stage(stage="gguf", model_dir=model_dir, calibration_dir=calibration, out=out, method=method,
                           fmt=fmt, params=params, exec_cfg=exec_cfg, overwrite=overwrite, resume=resume)
    if imatrix_out is not None:
        write_imatrix_from_manifest(m, Path(out), Path(imatrix_out), calibration)
    return m


def write_imatrix_from_manifest(m, out: Path, imatrix_out: Path, calibration: Path) -> None:
    """The run's per-linear input statistics (kept in the layer metrics) as llama.cpp's imatrix file."""
    import torch

    from ..calibration import load_calibration
    from ..formats.gguf import expert_tensor, gguf_tensor_name, kv_b_parts
    from ..formats.gguf_imatrix import write_imatrix
    from ..formats.registry import model_config

    config = model_config(out)
    ids, calib = load_calibration(calibration)
    entries = {}
    stacks: dict[str, dict[int, tuple[list[float], int]]] = {}  # stacked experts: one entry, per-expert rows
    for layer in m.metrics["layers"]:
        for name, (sums, n) in layer.get("imatrix", {}).items():
            split = kv_b_parts(name + ".weight", config)
            if split is not None:  # DeepSeek's kv_b: only attn_v_b reads kv_b's inputs (one row per head)
                (_, _), (v_name, (heads, _, _)) = split
                entries[gguf_tensor_name(v_name, config)] = (torch.tensor([sums] * heads, dtype=torch.float32),
                                                             [int(n)] * heads)
                continue
            expert = expert_tensor(name + ".weight", config)
            if expert is not None:
                stacks.setdefault(expert[0], {})[expert[1]] = (sums, int(n))
                continue
            entries[gguf_tensor_name(name + ".weight", config)] = (torch.tensor(sums, dtype=torch.float32), int(n))
    for gname, experts in stacks.items():
        rows = [experts[e] for e in sorted(experts)]
        entries[gname] = (torch.tensor([s for s, _ in rows], dtype=torch.float32), [n for _, n in rows])
    ds = calib.params.get("dataset", {})
    write_imatrix(imatrix_out, entries, datasets=[str(ds.get("name", ds) if isinstance(ds, dict) else ds)],
                  chunk_count=int(ids.shape[0]), chunk_size=int(ids.shape[1]))
    log.info(f"wrote {imatrix_out} ({len(entries)} matrices)")


@click.command("gguf")
@click.option("--model", "model_dir", required=True, type=click.Path(path_type=Path, exists=True, file_okay=False),
              help="HF model directory or a merge output.")
@click.option("--type", "ftype", default="Q4_K_M", show_default=True,
              help="F16, BF16, Q8_0, Q4_0, Q6_K, Q5_K_M or Q4_K_M (the K mixes give tensors llama.cpp's types).")
@click.option("--calibration", default=None, type=click.Path(path_type=Path, exists=True, file_okay=False),
              help="Output of `quantize sample`: GPTQ on the Hessian chooses the block bytes (else llama.cpp's "
                   "reference rounding).")
@click.option("--damp", default=0.01, show_default=True, type=float, help="Hessian dampening (with --calibration).")
@click.option("--imatrix-out", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Also write the calibration statistics as llama.cpp's imatrix file (for llama-quantize --imatrix).")
@quantize_output_options
@moe_options
@out_option()
@exec_options
@stage_options
def gguf_command(model_dir, ftype, calibration, damp, imatrix_out, max_shard_size, resume, out, batch_size,
                 offload_activations, compute_dtype, lockstep, host_heap, device, seed, overwrite, moe_calibration,
                 moe_min_tokens, moe_fallback, expert_chunk=None):
    """GGUF for llama.cpp, one decoder layer resident at a time."""
    cfg = make_exec_config(device, batch_size, offload_activations, compute_dtype, lockstep, host_heap, expert_chunk)
    m = quantize_gguf(model_dir=model_dir, out=out, exec_cfg=cfg, ftype=ftype, calibration=calibration, damp=damp,
                      imatrix_out=imatrix_out, seed=seed, overwrite=overwrite, resume=resume,
                      moe_calibration=moe_calibration, moe_min_tokens=moe_min_tokens, moe_fallback=moe_fallback)
    errs = [(e, r) for layer in m.metrics.get("layers", []) for e, r in
            zip(layer.get("rel_error", {}).values(), layer.get("reference_rel_error", {}).values())]
    extra = ""
    if errs:
        ours, ref = sum(e for e, _ in errs) / len(errs), sum(r for _, r in errs) / len(errs)
        extra = f"; mean relative output error {ours:.4g} (llama.cpp's rounding on the same grid types: {ref:.4g})"
    click.echo(f"wrote {out}/model.gguf ({len(m.outputs)} files){extra}")
