"""quantize: fine-tuned LLM checkpoints -> deployable quantized models, streamed layer by layer."""

__version__ = "0.1.0"
