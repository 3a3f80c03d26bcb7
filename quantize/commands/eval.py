"""`quantize eval`: perplexity, and KL / top-1 agreement against a baseline, as a gate."""

from __future__ import annotations

from pathlib import Path

import click

from .common import exec_options, make_exec_config, stage_options


@click.command("eval")
@click.option("--model", "model_dir", required=True, type=click.Path(path_type=Path, exists=True, file_okay=False),
              help="Model directory (plain HF or any quantized output of quantize).")
@click.option("--dataset", default="wikitext2-test", show_default=True, help="Registry name or local .txt/.jsonl/.parquet.")
@click.option("--text-field", default=None, help="Column holding the text (jsonl/parquet).")
@click.option("--seq-len", default=512, show_default=True, type=click.IntRange(min=2), help="Window length in tokens.")
@click.option("--max-windows", default=None, type=click.IntRange(min=1), help="Evaluate at most this many windows.")
@click.option("--baseline", default=None, type=click.Path(path_type=Path, exists=True, file_okay=False),
              help="Unquantized model to compare against (KL divergence, top-1 agreement).")
@click.option("--max-ppl-increase", default=None, type=float, help="Gate: exit 1 when perplexity rises more than PCT percent over --baseline.")
@click.option("--out", default=None, type=click.Path(path_type=Path, file_okay=False),
              help="Where to write the eval manifest (default: MODEL.eval next to the model).")
@exec_options
@stage_options
def eval_command(model_dir, dataset, text_field, seq_len, max_windows, baseline, max_ppl_increase, out,
                 batch_size, offload_activations, compute_dtype, lockstep, host_heap, device, seed, overwrite):
    """Perplexity over non-overlapping windows; with --baseline, KL and top-1 agreement."""
    from ..eval.perplexity import run_eval

    cfg = make_exec_config(device, batch_size, offload_activations, compute_dtype, lockstep, host_heap)
    out = out or model_dir.with_name(model_dir.name + ".eval")
    run_eval(model_dir=model_dir, dataset=dataset, seq_len=seq_len, out=out, baseline=baseline,
             max_windows=max_windows, max_ppl_increase=max_ppl_increase, cfg=cfg, overwrite=overwrite,
             text_field=text_field)
