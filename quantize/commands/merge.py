"""`quantize merge lora` and `quantize merge litgpt`: fine-tuning outputs -> plain HF safetensors."""

from __future__ import annotations

from pathlib import Path

import click

from .common import existing_dir, out_option

_DTYPE = click.option(
    "--dtype", type=click.Choice(["auto", "bf16", "fp16", "fp32"]), default="auto", show_default=True,
    help="Output dtype of floating tensors; auto keeps each base tensor's dtype. Merging runs in fp32 and rounds once.",
)
_OVERWRITE = click.option("--overwrite", is_flag=True, help="Replace an existing output directory.")


@click.group("merge")
def merge_command():
    """Merge a PEFT LoRA adapter or a Lit-GPT checkpoint into a plain Hugging Face model directory.

    Streams tensor by tensor (memory ~ the largest tensor, not the model) and writes
    model*.safetensors, config.json, tokenizer files and manifest.json.
    """


@merge_command.command("lora")
@click.option("--base", required=True, **existing_dir("Base model directory (HF safetensors + config.json)."))
@click.option("--adapter", required=True, **existing_dir("PEFT adapter directory (adapter_config.json + adapter_model.*)."))
@out_option()
@_DTYPE
@_OVERWRITE
def merge_lora_command(base: Path, adapter: Path, out: Path, dtype: str, overwrite: bool):
    """Merge a PEFT LoRA / rsLoRA / DoRA adapter into its base model."""
    from ..merge import merge_lora

    m = merge_lora(base, adapter, out, dtype=dtype, overwrite=overwrite)
    click.echo(f"wrote {out} ({m.metrics.get('tensors_modified', 0)} tensors modified)")


@merge_command.command("litgpt")
@click.option("--checkpoint", required=True, **existing_dir("Lit-GPT checkpoint directory (lit_model.pth + model_config.yaml)."))
@click.option("--lora", default=None, **existing_dir("Lit-GPT LoRA output directory (lit_model.pth.lora + hyperparameters.yaml)."))
@out_option()
@_DTYPE
@_OVERWRITE
def merge_litgpt_command(checkpoint: Path, lora: Path | None, out: Path, dtype: str, overwrite: bool):
    """Convert a Lit-GPT checkpoint (optionally with a Lit-GPT LoRA merged on the fly) to HF."""
    from ..merge import merge_litgpt

    m = merge_litgpt(checkpoint, out, lora=lora, dtype=dtype, overwrite=overwrite)
    click.echo(f"wrote {out} ({m.metrics.get('tensors_modified', 0)} tensors modified)")
