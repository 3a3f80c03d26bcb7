"""`quantize sample`: draw seeded token windows from a dataset for calibration."""

from __future__ import annotations

from pathlib import Path

import click

from .common import existing_dir, out_option, stage_options


@click.command("sample")
@click.option(
    "--model", "model_dir", required=True,
    **existing_dir("Model directory; only its tokenizer files and config.json are read."),
)
@click.option(
    "--dataset", default="wikitext2", show_default=True,
    help="Registry name (wikitext2, wikitext2-test, c4, pileval, ...), a local .txt/.jsonl/.json/.parquet "
    "file or directory of them, or a hub id org/name[:config] (needs the hub).",
)
@click.option("--samples", "n_samples", default=128, show_default=True, type=int, help="Number of windows (rows).")
@click.option(
    "--seq-len", default=2048, show_default=True, type=int,
    help="Tokens per window; must not exceed the model's max_position_embeddings.",
)
@click.option("--text-field", default=None, help="Column holding the text for jsonl/parquet/hub data (default: text).")
@click.option("--split", default=None, help="Split of a hub dataset (default: the registry entry's split, else train).")
@out_option()
@stage_options
def sample_command(model_dir: Path, dataset: str, n_samples: int, seq_len: int, text_field: str | None,
                   split: str | None, out: Path, device: str, seed: int, overwrite: bool):
    """Tokenize a dataset with the model's tokenizer and write N seeded, non-overlapping windows of
    L tokens to OUT/calibration.safetensors (input_ids int32 [N, L]) plus manifest.json.

    Same model tokenizer, dataset and --seed: byte-identical output. Sampling runs on the CPU
    (--device is accepted for uniformity with the other stages).
    """
    from ..calibration import CALIBRATION_FILE, sample_calibration

    m = sample_calibration(
        model_dir, dataset, n_samples, seq_len, seed, out, text_field=text_field, split=split, overwrite=overwrite
    )
    p = m.params
    click.echo(
        f"sampled {p['n_samples']} x {p['seq_len']} tokens from '{p['dataset']['name']}' "
        f"({p['tokens_available']} tokens available, seed {p['seed']}) -> {out / CALIBRATION_FILE}"
    )
