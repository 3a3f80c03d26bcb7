"""What one run asks the scheduler for, from config.json alone (no weights needed).

* GPUs: 0 for ``device: cpu``, else 1 (``auto``: 1 where the cluster has GPUs, else 0).
* Host memory: the larger of the recipe's ``resources.ram`` and an estimate of the layer loop's
  working set (below). Ray only places a task where that much is unclaimed; it is not a limit.
* The plan's figures (``quantize plan``, ``quantize/plan.py``): the source's bytes and the output's
  bytes in the run's format, exact from the config (the output is what a run directory adds to disk).

Estimate of the layer loop (``quantize/executor``), in its compute dtype (fp32 on CPU, bf16 on a
GPU): one decoder layer's weights; every calibration batch's hidden states (kept between layers);
lock-step's paused activations, tokens x (2 hidden + intermediate) (counted although the loop goes
without them where they do not fit in a quarter of the free memory: the estimate errs high); one
batch's MLP temporaries; for the Hessian methods the largest set of Hessians alive at once and
their prepared inverses (fp32); and the larger of the resident embedding (capture) and eval's
logits of a window for the quantized model and its baseline; the layer's results until it is
written (a code byte a weight plus group parameters: ``plan.run_memory``). On a GPU that is the
device's working set (with a dense layer's fp32 dequantized weights, which stay there beside the
bf16 layer); the host then holds the prefetched next layer, the embedding and the experts' results.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Mapping

from ..errors import InputError
from ..pipeline.recipe import Recipe
from ..plan import Setting, _source_dtype_bytes, run_memory, weight_bytes
from .spec import RunSpec

GiB = 2**30
HESSIAN_METHODS = ("gptq", "rtn", "exl2", "gguf", "awq")


@dataclass(frozen=True)
class RunResources:
    gpus: int | None  # None: "auto", decided against the cluster (1 where it has GPUs)
    cpus: int
    memory: int  # host bytes requested from the scheduler
    memory_estimate: int  # the layer loop's host working set (estimate)
    memory_recipe: int | None  # the recipe's resources.ram, parsed
    device_memory: int | None  # the working set on the GPU (estimate), None on CPU
    source_bytes: int | None  # the plan's bf16/fp16 weights of the source
    output_bytes: int | None  # the plan's weights in the run's format
    setting: str  # the plan's label of the run's setting
    note: str | None = None  # why the plan's figures are missing (no config.json to plan with)

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    def ray_options(self, cluster_gpus: float) -> dict[str, Any]:
        gpus = self.gpus if self.gpus is not None else (1 if cluster_gpus >= 1 else 0)
        return {"num_cpus": self.cpus, "num_gpus": gpus, "memory": self.memory}


def plan_setting(recipe: Recipe) -> Setting:
    """The ``quantize plan`` setting that describes a recipe's output."""
    fmt = recipe.format or recipe.native_format()
    if recipe.method == "fp8":
        return Setting("fp8", 8, sym=recipe.fp8_scheme == "dynamic")
    if recipe.method == "gguf":
        return Setting("gguf", recipe.bits, gguf_type=recipe.gguf_type or "")
    if recipe.method == "exl2":
        return Setting("exl2", float(recipe.bpw or recipe.bits))
    sym = recipe.gptq.sym if recipe.method in ("gptq", "rtn") else False
    if fmt == "compressed-tensors":
        return Setting("ct", recipe.bits, recipe.group_size, sym=sym)
    return Setting("awq" if recipe.method == "awq" else "gptq", recipe.bits, recipe.group_size)


def parse_ram(text: str | None) -> int | None:
    """The leading size of a recipe's ``resources.ram`` ("64 GiB (one layer + ...)"), or None."""
    m = re.match(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?)B", text or "", flags=re.I)
    if not m:
        return None
    unit = m.group(2).upper()
    power = "KMGT".index(unit) + 1 if unit else 0
    return int(float(m.group(1)) * (1024 if m.group(3) else 1000) ** power)


def working_set(config: Mapping[str, Any], recipe: Recipe, on_gpu: bool) -> tuple[int, int | None]:
    """(host bytes, device bytes or None) of one run's layer loop; see the module docstring. The
    largest layer and Hessian set are ``quantize plan``'s (``plan.run_memory``: MoE layers too)."""
    from ..arch import get_arch

    arch = get_arch(config)
    d = arch.dims(config)
    cb = 2 if on_gpu else 4
    src = _source_dtype_bytes(config)
    per_run = run_memory(config, arch, compute_bytes=cb)
    layer = per_run["layer_bytes_max"]
    cal = recipe.calibration
    tokens = cal.samples * cal.seq_len if not (recipe.method == "fp8" and recipe.fp8_scheme == "dynamic") else 0
    hidden_states = tokens * d["hidden"] * cb
    lockstep = tokens * (2 * d["hidden"] + d["intermediate"]) * cb
    batch_tmp = recipe.batch_size * cal.seq_len * 3 * d["intermediate"] * cb
    hessian = 2 * per_run["hessian_bytes_max"] if recipe.method in HESSIAN_METHODS and tokens else 0
    vocab = int(config["vocab_size"])
    embed = vocab * d["hidden"] * cb
    eval_logits = 2 * recipe.eval.seq_len * vocab * 4 if recipe.eval.enabled else 0
    work = layer + hidden_states + lockstep + batch_tmp + hessian + max(embed, eval_logits)
    next_layer = layer // cb * src  # read ahead on the host, in the source dtype
    results = per_run["results_bytes_max"]  # codes and group parameters until the layer is written
    if not on_gpu:
        return work + next_layer + results, None
    # on a GPU: a dense layer's results stay on the device, with their fp32 W_hat (the layer is
    # bf16); experts' go to the host (LayerContext.place): the device figure counts both, erring high
    return next_layer + vocab * d["hidden"] * src + hidden_states + results, work + results + 4 * (layer // cb)


def run_resources(run: RunSpec, cpus: int = 1) -> RunResources:
    """Resources of ``run`` from its recipe and the model's config.json (``source.config`` when the
    weights are not on this machine): nothing is loaded."""
    from ..commands.plan import resolve_config

    recipe = run.recipe
    gpus = 0 if recipe.device == "cpu" else (None if recipe.device == "auto" else 1)
    stated = parse_ram(recipe.resources.ram)
    setting = plan_setting(recipe)
    try:
        config, _ = resolve_config(run.recipe_path, tuple(run.overrides))
    except InputError as e:  # the run itself will stop on the missing source and say so
        return RunResources(gpus=gpus, cpus=cpus, memory=stated or GiB, memory_estimate=0, memory_recipe=stated,
                            device_memory=None, source_bytes=None, output_bytes=None, setting=setting.label,
                            note=str(e))
    host, device = working_set(config, recipe, on_gpu=gpus != 0)
    source = weight_bytes(config, Setting("bf16", 16))["total"]
    output = weight_bytes(config, setting)["total"]
    memory = max(host, stated or 0)
    return RunResources(gpus=gpus, cpus=cpus, memory=int(math.ceil(memory / 2**20) * 2**20), memory_estimate=host,
                        memory_recipe=stated, device_memory=device, source_bytes=source, output_bytes=output,
                        setting=setting.label)
