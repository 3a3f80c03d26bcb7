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
_BASE_QUANT = click.option(
    "--base-quant", type=click.Choice(["nf4", "nf4-dq", "fp4", "fp4-dq", "none"]), default=None,
    help="QLoRA-exact merge: add the LoRA to the bitsandbytes 4-bit round trip of the base's linear weights "
         "(what a QLoRA adapter was trained against; -dq: double quantization). Default: as the training run "
         "recorded it (hyperparameters.yaml, --axolotl-config, the adapter's config.json/README.md), else none.",
)
_BASE_QUANT_DTYPE = click.option(
    "--base-quant-dtype", type=click.Choice(["bf16", "fp16", "fp32"]), default=None,
    help="dtype the base weights were quantized from and dequantize to (the training load/compute dtype). "
         "Default: the training record's, else the base checkpoint's.",
)


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
@_BASE_QUANT
@_BASE_QUANT_DTYPE
@click.option("--axolotl-config", type=click.Path(path_type=Path), default=None,
              help="The Axolotl YAML the adapter was trained with (adapter: qlora + load_in_4bit selects the NF4 base).")
def merge_lora_command(base: Path, adapter: Path, out: Path, dtype: str, overwrite: bool, base_quant: str | None,
                       base_quant_dtype: str | None, axolotl_config: Path | None):
    """Merge a PEFT LoRA / rsLoRA / DoRA adapter into its base model (or its NF4 round trip for a QLoRA)."""
    from ..merge import merge_lora

    m = merge_lora(base, adapter, out, dtype=dtype, overwrite=overwrite, base_quant=base_quant,
                   base_quant_dtype=base_quant_dtype, axolotl_config=axolotl_config)
    click.echo(f"wrote {out} ({m.metrics.get('tensors_modified', 0)} tensors modified{_base_note(m)})")


@merge_command.command("litgpt")
@click.option("--checkpoint", required=True, **existing_dir("Lit-GPT checkpoint directory (lit_model.pth + model_config.yaml)."))
@click.option("--lora", default=None, **existing_dir("Lit-GPT LoRA output directory (lit_model.pth.lora + hyperparameters.yaml)."))
@out_option()
@_DTYPE
@_OVERWRITE
@_BASE_QUANT
@_BASE_QUANT_DTYPE
def merge_litgpt_command(checkpoint: Path, lora: Path | None, out: Path, dtype: str, overwrite: bool,
                         base_quant: str | None, base_quant_dtype: str | None):
    """Convert a Lit-GPT checkpoint (optionally with a Lit-GPT LoRA merged on the fly) to HF."""
    from ..merge import merge_litgpt

    m = merge_litgpt(checkpoint, out, lora=lora, dtype=dtype, overwrite=overwrite, base_quant=base_quant,
                     base_quant_dtype=base_quant_dtype)
    click.echo(f"wrote {out} ({m.metrics.get('tensors_modified', 0)} tensors modified{_base_note(m)})")


def _base_note(m) -> str:
    bq = m.params.get("base_quant") or {}
    if bq.get("method", "none") == "none":
        return ""
    return f"; base: {bq['method']} round trip in {bq['dtype']} of {bq['tensors']} linear weights, from {bq['source']}"
