"""The model card (README.md) written next to every quantized checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import __version__


def write_model_card(directory: Path, *, stage: str, model_dir: Path, calibration, params: dict[str, Any],
                     metrics: dict[str, Any]) -> Path:
    cp = calibration.params if calibration is not None else {}
    ds = cp.get("dataset", {})
    ds_name = ds.get("name", ds) if isinstance(ds, dict) else ds
    lines = [
        "---",
        "tags: [quantized, " + stage + "]",
        "---",
        f"# {Path(model_dir).name} ({stage.upper()} {_setting(stage, params)})",
        "",
        f"Quantized with `quantize` {__version__} from `{model_dir}`.",
        "",
        "| | |",
        "|---|---|",
        f"| base model | `{model_dir}` |",
        f"| method | {stage} |",
    ]
    for key in ("format", "bits", "bpw", "group_size", "sym", "act_order", "static_groups", "damp", "head_bits",
                "scheme", "scale_dtype"):
        if key in params:
            lines.append(f"| {key.replace('_', ' ')} | {params[key]} |")
    if params.get("act_order") and params.get("static_groups") is False and params.get("method") == "gptq":
        lines.append("| activation ordering | dynamic (desc_act true, g_idx indirection): vLLM refuses it; "
                     "transformers/GPTQModel and exllama load it |")
    elif params.get("act_order") and params.get("static_groups") and params.get("method") == "gptq":
        lines.append("| activation ordering | static (solved in act-order, groups on the original columns): "
                     "every loader takes it |")
    lines += merge_rows(model_dir)
    lines += [
        *([f"| re-quantized | from a {params['requantized_from']} checkpoint: its dequantized weights were quantized "
           f"again (two roundings) |"] if params.get("requantized_from") else []),
        (f"| calibration | {ds_name}: {cp.get('n_samples')} x {cp.get('seq_len')} tokens, seed {cp.get('seed')} |"
         if calibration is not None else "| calibration | none (weights only) |"),
        f"| device | {params.get('device')} |",
    ]
    if "mean_rel_error" in metrics:
        lines.append(f"| mean relative output error per linear | {metrics['mean_rel_error']:.4g} (max {metrics['max_rel_error']:.4g}) |")
    if "max_damp_used" in metrics:
        lines.append(f"| largest Hessian damping used | {metrics['max_damp_used']:.4g} ({metrics.get('healed_hessians', 0)} healed) |")
    lines += [
        "",
        "Measured quality (perplexity, KL divergence and top-1 agreement against the base model) is added",
        "by `quantize eval --baseline`; see its manifest. `manifest.json` lists every input and output with",
        "its sha256; `quantize verify .` re-checks them.",
        "",
    ]
    path = Path(directory) / "README.md"
    path.write_text("\n".join(lines))
    return path


def merge_rows(model_dir: Path) -> list[str]:
    """Card rows from the merge that produced ``model_dir`` (its manifest), when it says something a
    reader of the quantized model must know: a QLoRA adapter merged onto the 4-bit round trip of its base."""
    from .. import manifest as mf

    try:
        m = mf.load_manifest(Path(model_dir))
    except Exception:  # a plain or foreign directory: nothing to say
        return []
    if m is None or m.stage != "merge":
        return []
    bq = m.params.get("base_quant") or {}
    if bq.get("method", "none") == "none":
        return []
    qt, dq = str(bq["method"]).partition("-")[::2]
    head = "lm_head included" if bq.get("lm_head_quantized") else "not embeddings, norms or lm_head"
    return [f"| merged base | {qt.upper()}-dequantized: the adapter was merged onto the bitsandbytes {qt.upper()} "
            f"round trip of the base's linear weights ({bq.get('tensors')} tensors, {head}; blocksize "
            f"{bq.get('blocksize')}{', double quantization' if dq else ''}, {bq.get('dtype')}), the base it was "
            f"trained against (from {bq.get('source')}) |"]


def _setting(stage: str, params: dict[str, Any]) -> str:
    if "bpw" in params:
        return f"{params['bpw']} bpw"
    if stage == "fp8":
        return f"W8A8, {params.get('scheme')} activation scales"
    g = params.get("group_size")
    return f"{params.get('bits')}-bit" + (f" g{g}" if g not in (None, -1) else "")
