"""`quantize exl2`: measure (or reuse a measurement), optimize the bit allocation, quantize to EXL2.

Dense families and the Mixture-of-Experts families exllamav2 loads (Mixtral, Qwen3-MoE with every
layer sparse and ``norm_topk_prob``); any other MoE model exits 2 naming `quantize gptq`/`awq`/`gguf`."""

from __future__ import annotations

import math
from pathlib import Path

import click

from .common import exec_options, make_exec_config, moe_options, out_option, stage_options, quantize_output_options

BPW_RANGE = (2.0, 8.0)
DEFAULT_MEASUREMENT_ROWS = 16  # exllamav2 measures on 16 rows by default (-mr)


def quantize_exl2(*, model_dir: Path, calibration: Path, out: Path, bpw: float, head_bits: int = 6,
                  measurement: Path | None = None, measurement_rows: int = DEFAULT_MEASUREMENT_ROWS,
                  norm: float | None = 1.0, damp: float | None = None, exec_cfg, seed: int = 0,
                  overwrite: bool = False, resume: bool = False, max_shard_bytes: int = 5 * 10**9,
                  moe_calibration: str = "routed", moe_min_tokens: float = 0.005, moe_fallback: str = "all"):
    """Library entry point (the CLI and `quantize run` call this). Returns the completed manifest.

    1. measurement: the first ``measurement_rows`` calibration rows, every candidate option of every
       slot (``measurement.json``; or ``measurement``, a previous run's file, reused as is);
    2. optimizer: one option row per slot with ``Σ storage bits ≤ bpw · Σ decoder weights``,
       minimising ``Σ err^norm`` (``norm=None``: exllamav2's exponent sweep);
    3. quantization pass through the streaming executor on all calibration rows, then ``lm_head``
       with ``head_bits`` (untied heads whose vocabulary is a multiple of 32; else kept as is).

    Mixture-of-Experts (the families exllamav2 loads: Mixtral, Qwen3-MoE; others InputError): a
    sparse layer's routed experts are one slot (``block_sparse_moe``) whose option row all its
    experts share, its cost every expert's bits; each expert is GPTQ-solved on its own routed
    Hessian (``moe_*``: executor/moe.py's rules, recorded in the manifest with the coverage).
    """
    import torch

    from .. import log
    from .. import manifest as mf
    from ..errors import InputError
    from ..executor.moe import MoEOptions
    from ..executor.stage import fingerprint, preflight, run_quantize_stage
    from ..formats.exl2 import EXL2Format, achieved_bpw, measurement_bytes
    from ..io.atomic import StagedOutput, staging_path
    from ..methods.exl2 import EXL2_DAMP, HEAD_OPTIONS, PAD_COLUMNS, exllamav2_moe_refusal
    from ..methods.exl2_layer import MEASUREMENT_FILE, Exl2QuantMethod, run_measurement
    from ..methods.exl2_optimize import (
        cheapest_bits,
        decoder_weights,
        load_measurement,
        measurement_document,
        optimize,
        plan_from_solution,
        slots_from_measurement,
    )

    if not BPW_RANGE[0] <= bpw <= BPW_RANGE[1]:
        raise InputError(f"--bpw {bpw}: must be between {BPW_RANGE[0]} and {BPW_RANGE[1]}")
    if head_bits not in HEAD_OPTIONS:
        raise InputError(f"--head-bits {head_bits}: choose one of {sorted(HEAD_OPTIONS)}")
    if measurement_rows < 1:
        raise InputError(f"--measurement-rows {measurement_rows}: must be at least 1")
    damp = EXL2_DAMP if damp is None else damp
    torch.manual_seed(seed)
    model_dir, calibration, out = Path(model_dir), Path(calibration), Path(out)
    reader, arch, input_ids, calib = preflight(model_dir, calibration, StagedOutput(out, overwrite=overwrite))
    config = reader.config
    why = exllamav2_moe_refusal(arch, config)
    if why is not None:
        raise InputError(f"{model_dir}: {why}")
    moe = MoEOptions(mode=moe_calibration, min_tokens=moe_min_tokens, fallback=moe_fallback)
    for lin in arch.linear_kinds(config):
        N, _ = arch.linear_shape(lin, config)
        if N % PAD_COLUMNS:
            raise InputError(f"{model_dir / 'config.json'}: {lin} has {N} outputs, not a multiple of {PAD_COLUMNS}; "
                             f"EXL2 kernels need padded columns, which this writer supports only for lm_head")
    weights = decoder_weights(arch, config)
    floor = cheapest_bits(arch, config)
    if int(bpw * weights) < floor:
        raise InputError(f"--bpw {bpw}: the cheapest EXL2 options need {floor / weights:.3f} bpw for this model "
                         f"({model_dir}); choose --bpw {math.ceil(floor / weights * 100) / 100} or more")
    cp = calib.params
    ds = cp.get("dataset", {})
    cal_info = {"rows": int(input_ids.shape[0]), "length": int(input_ids.shape[1]),
                "dataset": ds.get("name", str(ds)) if isinstance(ds, dict) else str(ds)}

    # 1. measurement
    if measurement is not None:
        doc = load_measurement(Path(measurement))
        source = str(measurement)
    else:
        rows = min(measurement_rows, int(input_ids.shape[0]))
        inputs = [mf.describe_input("model", model_dir), mf.describe_input("calibration", calibration)]
        run_id = fingerprint({"stage": "exl2-measure", "rows": rows, "damp": damp,
                              **(moe.params() if arch.moe is not None else {}),
                              "inputs": [i.model_dump() for i in inputs],
                              "compute_dtype": str(exec_cfg.dtype), "device": exec_cfg.device})
        staging = staging_path(out)
        staging.mkdir(parents=True, exist_ok=True)
        cached = staging / MEASUREMENT_FILE
        doc = load_measurement(cached) if cached.is_file() else None
        if doc is None or doc.get("quantize", {}).get("run_id") != run_id:
            log.info(f"measuring {arch.num_layers(config)} layers on {rows} x {input_ids.shape[1]} tokens")
            entries = run_measurement(model_dir=model_dir, reader=reader, arch=arch, input_ids=input_ids[:rows],
                                      exec_cfg=exec_cfg, work_dir=staging / "measure", run_id=run_id, damp=damp,
                                      moe=moe)
            info = {"run_id": run_id, "rows": rows, "length": int(input_ids.shape[1]), "dataset": cal_info["dataset"],
                    "damp": damp, "model": str(model_dir)}
            if arch.moe is not None:
                info.update(moe.params())
            doc = measurement_document(entries, arch.num_layers(config), info)
            tmp = cached.with_name(cached.name + ".tmp")
            tmp.write_bytes(measurement_bytes(doc))
            tmp.replace(cached)
        source = str(cached)
    slots = slots_from_measurement(doc, arch, config, source=source)

    # 2. optimizer
    sol = optimize(slots, int(bpw * weights), norm=norm, target=f"--bpw {bpw}")
    plan = plan_from_solution(sol, arch, config)
    log.info(f"exl2 plan: {sol.total_bits / weights:.4f} bpw planned for target {bpw} "
             f"(max slot error {sol.max_error:.4g}, sum {sol.sum_error:.4g}, norm {sol.norm})")

    # 3. quantization pass (+ head)
    vocab = config.get("vocab_size")
    head = HEAD_OPTIONS[head_bits]
    if arch.is_tied(config):
        log.warning("lm_head is tied to the embeddings: kept unquantized (head_bits recorded as 16)")
        head, head_bits_used = None, 16
    elif not isinstance(vocab, int) or vocab % PAD_COLUMNS:
        log.warning(f"vocab_size {vocab} is not a multiple of {PAD_COLUMNS}: lm_head kept unquantized")
        head, head_bits_used = None, 16
    else:
        head_bits_used = head_bits
    method = Exl2QuantMethod(plan, head=head, damp=damp, moe=moe)
    meas_bytes = measurement_bytes(doc)
    fmt = EXL2Format(bpw, head_bits_used, cal_info, meas_bytes)
    params = {"method": "exl2", "bpw": bpw, "head_bits": head_bits_used, "norm": norm, "damp": damp, "seed": seed,
              "format": "exl2", "measurement_sha256": mf.sha256_bytes(meas_bytes),
              "measurement": str(measurement) if measurement is not None else None,
              "measurement_rows": doc.get("quantize", {}).get("rows"),
              "planned_bits": sol.total_bits, "decoder_weights": weights,
              "strategy": [s.key + ":" + str(j) for s, j in zip(slots, sol.choice)]}
    if arch.moe is not None:  # absent for dense models: earlier runs' fingerprints stay valid
        params.update(moe.params())
    m = run_quantize_stage(stage="exl2", model_dir=model_dir, calibration_dir=calibration, out=out, method=method,
                           fmt=fmt, params=params, exec_cfg=exec_cfg, overwrite=overwrite, resume=resume,
                           max_shard_bytes=max_shard_bytes)
    got = achieved_bpw(out, head_prefix=arch.lm_head_path)
    log.event("exl2_bpw", f"exl2: {got['decoder']['bpw']:.4f} bpw in the files (target {bpw})",
              bpw=got["decoder"]["bpw"], head_bpw=got.get("head", {}).get("bpw"))
    return m


@click.command("exl2")
@click.option("--model", "model_dir", required=True, type=click.Path(path_type=Path, exists=True, file_okay=False),
              help="HF model directory or a merge output.")
@click.option("--calibration", required=True, type=click.Path(path_type=Path, exists=True, file_okay=False),
              help="Output of `quantize sample` for this model.")
@click.option("--bpw", required=True, type=float,
              help="Target bits per weight over the decoder linears (2.0 to 8.0), every stored bit counted.")
@click.option("--head-bits", default="6", show_default=True, type=click.Choice(["2", "3", "4", "5", "6", "8"]),
              help="Bit allocation of lm_head (exllamav2's head options).")
@click.option("--measurement", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="Reuse a measurement.json (e.g. OUT/measurement.json of an earlier run) instead of measuring.")
@click.option("--measurement-rows", default=DEFAULT_MEASUREMENT_ROWS, show_default=True, type=click.IntRange(min=1),
              help="Calibration rows used by the measurement pass (the first N).")
@click.option("--norm", default="1", show_default=True,
              help="Optimizer objective: minimise the sum of error^NORM over slots; 'auto': exllamav2's exponent sweep.")
@quantize_output_options
@moe_options
@out_option()
@exec_options
@stage_options
def exl2_command(model_dir, calibration, bpw, head_bits, measurement, measurement_rows, norm, max_shard_size, resume,
                 out, batch_size, offload_activations, compute_dtype, lockstep, host_heap, device, seed, overwrite,
                 moe_calibration="routed", moe_min_tokens=0.005, moe_fallback="all", expert_chunk=None):
    """Quantize to EXL2 (exllamav2): measure candidate bit mixtures per layer, choose them to meet
    --bpw, GPTQ-quantize with act-order and per-group bit widths, one decoder layer resident.
    Mixture-of-Experts: Mixtral and Qwen3-MoE (what exllamav2 loads), each expert on its own tokens."""
    from ..errors import InputError
    from ..formats.exl2 import achieved_bpw

    try:
        norm_value = None if norm == "auto" else float(norm)
    except ValueError:
        raise InputError(f"--norm {norm!r}: a positive number or 'auto'") from None
    if norm_value is not None and norm_value <= 0:
        raise InputError(f"--norm {norm}: must be positive")
    cfg = make_exec_config(device, batch_size, offload_activations, compute_dtype, lockstep, host_heap, expert_chunk)
    m = quantize_exl2(model_dir=model_dir, calibration=calibration, out=out, bpw=bpw, head_bits=int(head_bits),
                      measurement=measurement, measurement_rows=measurement_rows, norm=norm_value, exec_cfg=cfg,
                      seed=seed, overwrite=overwrite, resume=resume, max_shard_bytes=int(max_shard_size * 1e9),
                      moe_calibration=moe_calibration, moe_min_tokens=moe_min_tokens, moe_fallback=moe_fallback)
    got = achieved_bpw(out)
    head = got.get("head")
    click.echo(f"wrote {out} ({len(m.outputs)} files); {got['decoder']['bpw']:.4f} bpw over the decoder linears "
               f"(target {bpw})" + (f", lm_head {head['bpw']:.4f} bpw" if head else ""))
