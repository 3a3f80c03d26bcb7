"""Options shared by every stage command."""

from __future__ import annotations

import functools
from pathlib import Path

import click

from .. import log


def out_option(required: bool = True):
    return click.option(
        "--out", "out", type=click.Path(path_type=Path, file_okay=False), required=required,
        help="Output directory (written atomically: OUT.partial/ then renamed).",
    )


def stage_options(f):
    """--device, --seed, --json-logs, --overwrite (plus --out, added per command)."""

    @click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
    @click.option("--seed", default=0, show_default=True, type=int, help="Random seed (recorded in the manifest).")
    @click.option("--json-logs", is_flag=True, help="One JSON object per line on stderr, for batch jobs.")
    @click.option("--overwrite", is_flag=True, help="Replace an existing output directory.")
    @functools.wraps(f)
    def wrapper(*args, json_logs: bool = False, **kwargs):
        if json_logs:
            log.configure(True)
        return f(*args, **kwargs)

    return wrapper


def existing_dir(help_text: str, **kw):
    return dict(type=click.Path(path_type=Path, exists=True, file_okay=False), help=help_text, **kw)


_DTYPES = {"auto": None, "float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16"}


def exec_options(f):
    """Options of the streaming layer loop."""
    f = click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1),
                     help="Calibration sequences per forward pass.")(f)
    f = click.option("--offload-activations", is_flag=True,
                     help="Keep activations in host RAM between layers (saves device memory).")(f)
    f = click.option("--lockstep/--no-lockstep", default=None,
                     help="One forward per layer with every batch paused at each group of linears (fast; holds "
                          "all batches' activations at once) or one forward per group (lean). Default: lock-step "
                          "when those activations fit in a quarter of the free memory. Outputs are identical.")(f)
    f = click.option("--host-heap", default="flat", show_default=True, type=click.Choice(["flat", "pooled"]),
                     help="glibc allocation policy of the layer loop: flat (peak RSS = live memory, flat in depth; "
                          "every large temporary page-faulted afresh) or pooled (temporaries reused: ~20% faster "
                          "on CPU, a higher peak that creeps with depth). Where jemalloc is installed the command "
                          "runs under it instead (faster than both, flat in depth; QUANTIZE_MALLOC=glibc to opt "
                          "out). Outputs are identical.")(f)
    f = click.option("--dtype", "compute_dtype", default="auto", show_default=True,
                     type=click.Choice(sorted(_DTYPES)),
                     help="Compute dtype of the layer forward; auto: float32 on CPU, the model's dtype on CUDA.")(f)
    return f


def make_exec_config(device: str, batch_size: int, offload_activations: bool, compute_dtype: str,
                     lockstep: bool | None = None, host_heap: str = "flat", expert_chunk: int | None = None):
    import torch

    from ..device import resolve_device
    from ..executor.loop import ExecConfig

    dev = resolve_device(device)
    name = _DTYPES[compute_dtype]
    if name is None:
        name = "float32" if dev == "cpu" else "bfloat16"
    return ExecConfig(device=dev, dtype=getattr(torch, name), batch_size=batch_size, offload_activations=offload_activations,
                      lockstep=lockstep, host_heap=host_heap, expert_chunk=expert_chunk)


def quantize_output_options(f):
    """--max-shard-size and --resume, shared by the quantization commands."""
    f = click.option("--resume", is_flag=True,
                     help="Continue a killed run from OUT.partial (also automatic for an identical command).")(f)
    f = click.option("--max-shard-size", default=5.0, show_default=True, type=float, help="Shard size in GB.")(f)
    return f


def moe_options(f):
    """Mixture-of-Experts statistics and memory (executor/moe.py); dense models ignore them."""
    f = click.option("--expert-chunk", type=click.IntRange(min=1), default=None,
                     help="MoE: keep a layer's experts in host memory and bring this many at a time to the device "
                          "(a DeepSeek-V3 layer is 21 GiB in bf16: e.g. 32 of 256 on a 24 GiB card). Default: the "
                          "whole layer on the device.")(f)
    f = click.option("--moe-fallback", default="all", show_default=True, type=click.Choice(["all", "rtn"]),
                     help="MoE: how an expert that saw fewer than --moe-min-tokens is solved: from all tokens' "
                          "statistics (GPTQ/AWQ/GGUF: the all-token Hessian or activations; static FP8: the "
                          "all-token input range), or without statistics of its own (RTN on its weights; static "
                          "FP8: the other experts' input scale). Either way it is listed in the manifest.")(f)
    f = click.option("--moe-min-tokens", default=0.005, show_default=True, type=float,
                     help="MoE: fraction of the calibration tokens an expert must be routed to for statistics of its "
                          "own (a Hessian; static FP8: an input range) (GPTQModel's 0.5%%).")(f)
    f = click.option("--moe-calibration", default="routed", show_default=True, type=click.Choice(["routed", "all"]),
                     help="MoE: each expert's statistics from the tokens routed to it, or from all tokens (the "
                          "forward stays the model's own routing either way).")(f)
    return f


def format_options(formats: list[str]):
    """--format (the first is the default) and --scale-dtype, shared by the quantization commands."""
    def deco(f):
        f = click.option("--scale-dtype", default="auto", show_default=True,
                         type=click.Choice(["auto", "float16", "bfloat16"]),
                         help="dtype of the stored scales; the grid uses scales exact in it. auto: float16 for gptq/awq, "
                              "the model's dtype for compressed-tensors (what its loaders create).")(f)
        f = click.option("--format", "format", default=formats[0], show_default=True, type=click.Choice(formats),
                         help="Checkpoint format: " + ", ".join(formats) + " (compressed-tensors: vLLM's native "
                              "format, pack-quantized).")(f)
        return f
    return deco
