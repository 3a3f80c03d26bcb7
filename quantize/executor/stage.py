"""A quantization stage end to end: preflight, the layer loop, per-layer parts, compile, manifest.

Layout of the staging directory ``OUT.partial/`` while a run is under way:

    parts/layer-00007.safetensors   packed tensors of each finished layer
    resume/hidden-00008.safetensors inputs of the next layer (the propagated activations)
    resume/state.json               next layer, the run's fingerprint, per-layer metrics

A killed run rerun with the same command (or --resume) continues at ``next_layer``; outputs are
bit-identical to an uninterrupted run on the same device. Only when every layer is done are the
parts compiled into shards, the manifest completed and the directory renamed to ``OUT``.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .. import log
from .. import manifest as mf
from ..allocator import find_jemalloc
from ..arch import get_arch
from ..calibration import load_calibration, tokenizer_hash
from ..errors import InputError, RuntimeFault
from ..formats.base import Format
from ..formats.card import write_model_card
from ..io.atomic import StagedOutput
from ..io.quantized import detect_format, open_model
from ..io.reader import read_safetensors_header
from ..io.writer import ShardedWriter, copy_aux_files
from .context import LayerContext, LayerMethod
from .loop import ExecConfig, LayerStreamer
from .memory import allocator, frozen_gc, host_heap
from .resume import ResumePoint

_ST_META = {"format": "pt"}


def _atomic_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    os.replace(tmp, path)


def fingerprint(obj: Any) -> str:
    return mf.sha256_bytes(json.dumps(obj, sort_keys=True, default=str).encode())


def preflight(model_dir: Path, calibration_dir: Path | None, staged: StagedOutput):
    """Cheap checks before any heavy work. Returns (reader, arch, input_ids, calibration manifest);
    without a calibration set (a method that needs no activations) the last two are None."""
    staged.preflight()
    # a quantized output of this project (GPTQ, AWQ, EXL2, compressed-tensors, GGUF) is read back as
    # dense weights: re-quantizing it into another format streams like any checkpoint
    reader = open_model(Path(model_dir))
    arch = get_arch(reader.config, source=str(Path(model_dir) / "config.json"))
    if calibration_dir is None:
        _check_disk(staged, reader)
        return reader, arch, None, None
    input_ids, calib = load_calibration(Path(calibration_dir))
    want = calib.params.get("tokenizer_sha256")
    have = tokenizer_hash(Path(model_dir))
    if want != have:
        raise InputError(
            f"{calibration_dir}: calibration was tokenized with another tokenizer than {model_dir}'s "
            f"(tokenizer sha256 {str(want)[:12]} vs {have[:12]}); run `quantize sample --model {model_dir}` again"
        )
    limit = reader.config.get("max_position_embeddings")
    if limit and input_ids.shape[1] > limit:
        raise InputError(
            f"{calibration_dir}: seq_len {input_ids.shape[1]} exceeds the model's context "
            f"({limit}, config.json max_position_embeddings); sample again with a smaller --seq-len"
        )
    _check_disk(staged, reader)
    return reader, arch, input_ids, calib


def refuse_experts(arch, model_dir: Path, stage: str) -> None:
    """InputError for a Mixture-of-Experts model given to a method that does not solve experts."""
    if arch.moe is not None:
        raise InputError(
            f"{model_dir}: {arch.name} is a Mixture-of-Experts model and `quantize {stage}` does not solve experts yet; "
            "use `quantize gptq`, `quantize rtn` (--format gptq or compressed-tensors), `quantize awq` "
            "(--format awq or compressed-tensors) or `quantize fp8` (--scheme dynamic)"
        )


def refuse_fused_experts(arch, model_dir: Path, stage: str) -> None:
    """InputError for a model whose checkpoint holds its experts 3D (GPT-OSS) given to a stage that
    does not take them (only GPTQ and RTN into GPTQ / compressed-tensors do)."""
    if arch.moe is not None and arch.moe.experts.fused_on_disk:
        raise InputError(
            f"{model_dir}: {arch.name} holds its Mixture-of-Experts experts as 3D tensors and `quantize {stage}` "
            "does not take them yet; use `quantize gptq` or `quantize rtn` (--format gptq or compressed-tensors)"
        )


def _check_disk(staged: StagedOutput, reader) -> None:
    parent = staged.out.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(parent).free
    need = reader.total_bytes  # a <=8-bit output plus its parts is never larger than a 16-bit source
    if free < need:
        raise InputError(f"{parent}: {free / 2**30:.1f} GiB free, about {need / 2**30:.1f} GiB needed; free disk or choose another --out")


_hinted = False


def _allocator_hint(device: str) -> None:
    """Once per process, on CPU under glibc: say that jemalloc would be faster (executor/memory.py)."""
    global _hinted
    if _hinted or device != "cpu" or allocator() != "glibc":
        return
    _hinted = True
    if find_jemalloc() is None:
        log.info("CPU layers run ~20% faster under jemalloc: apt-get install libjemalloc2 "
                 "(the quantize command then uses it)")
    else:
        log.info("jemalloc is installed but not in use here (QUANTIZE_MALLOC=glibc, or called from Python); "
                 "the quantize command under it runs CPU layers ~20% faster")


def run_quantize_stage(
    *,
    stage: str,
    model_dir: Path,
    calibration_dir: Path | None,
    out: Path,
    method: LayerMethod,
    fmt: Format,
    params: dict[str, Any],
    exec_cfg: ExecConfig,
    overwrite: bool = False,
    resume: bool = False,
    max_shard_bytes: int = 5 * 10**9,
    card: dict[str, Any] | None = None,
) -> mf.Manifest:
    # A leftover OUT.partial from a killed run with the same fingerprint is resumed automatically;
    # ``resume=True`` only makes a missing or mismatched one worth a warning.
    host_heap("flat")  # until the layer loop picks its policy (LayerStreamer.apply_host_heap)
    staged = StagedOutput(Path(out), overwrite=overwrite, keep_partial=True)
    reader, arch, input_ids, calib = preflight(model_dir, calibration_dir, staged)
    if not getattr(method, "solves_fused_experts", False):
        refuse_fused_experts(arch, model_dir, stage)
    if not getattr(method, "solves_experts", False):
        refuse_experts(arch, model_dir, stage)
    if hasattr(method, "preflight"):
        method.preflight(arch, reader.config)
    if hasattr(fmt, "preflight"):  # what the output format can store (shapes, bits, group sizes)
        fmt.preflight(arch, reader.config)
    source = detect_format(model_dir)  # what the input is quantized with already, if anything
    if source != "dense":
        params = {**params, "requantized_from": source}
        log.warning(f"{model_dir} is already quantized ({source}): its dequantized weights are quantized again, "
                    "which adds the second rounding to the first; quantize the original weights where you have them")
    params = {**params, "device": exec_cfg.device, "batch_size": exec_cfg.batch_size,
              "compute_dtype": str(exec_cfg.dtype).removeprefix("torch."),
              "offload_activations": exec_cfg.offload_activations, "max_shard_bytes": max_shard_bytes}
    if exec_cfg.expert_chunk is not None:  # another forward (chunked experts): part of what the run is
        params["expert_chunk"] = exec_cfg.expert_chunk
    inputs = [mf.describe_input("model", Path(model_dir))]
    if calibration_dir is not None:
        inputs.append(mf.describe_input("calibration", Path(calibration_dir)))
    run_id = fingerprint({"stage": stage, "params": params, "inputs": [i.model_dump() for i in inputs]})
    layer_names, other_names = arch.split_tensor_names(reader.names())
    n_layers = arch.num_layers(reader.config)
    tokens = f"{input_ids.shape[0]}x{input_ids.shape[1]} calibration tokens" if input_ids is not None else "no calibration"
    log.event("stage_start", f"{stage}: {model_dir} -> {out} ({n_layers} layers, {tokens})",
              stage=stage, layers=n_layers)
    _allocator_hint(exec_cfg.device)
    t_start = time.time()

    with staged as staging, frozen_gc():
        parts, rdir = staging / "parts", staging / "resume"
        point = ResumePoint(rdir, run_id)
        loaded = point.load()
        state = loaded[0] if loaded else None
        if state is None and resume:
            log.warning(f"--resume: no resumable partial run at {staging}; starting from layer 0")
        if state is None:
            for p in (parts, rdir):
                shutil.rmtree(p, ignore_errors=True)
        parts.mkdir(exist_ok=True)
        rdir.mkdir(exist_ok=True)
        mf.write_manifest(staging, mf.new_manifest(stage, inputs=inputs, params=params, device=exec_cfg.device))

        streamer = LayerStreamer(Path(model_dir), reader, arch, exec_cfg)
        if input_ids is not None:  # else: weights only, no activations (every layer forward is a no-op)
            streamer.capture(input_ids)
        start, layer_metrics = 0, []
        if state is not None:
            start, layer_metrics = state["next_layer"], state["layers"]
            streamer.set_hidden_states(loaded[1], loaded[2])
            log.info(f"resuming at layer {start} of {n_layers}")
        heap = streamer.apply_host_heap()

        for i in log.progress(range(start, n_layers), total=n_layers - start, desc=f"{stage} layers"):
            t0, waited = time.time(), streamer.load_wait
            layer = streamer.load_layer(i)
            load_s = streamer.load_wait - waited
            ctx = LayerContext(streamer, i, layer)
            res = method.process_layer(ctx)
            if not ctx.propagated:
                streamer.run_layer(i, propagate=True)
                ctx.forward_passes += 1
            tensors = _layer_tensors(reader, arch, i, layer_names.get(i, []), res.results, fmt, res.tensors)
            save_file(tensors, str(parts / f"layer-{i:05d}.safetensors"), metadata=_ST_META)
            streamer.release_layer(i)
            m = {"layer": i, "seconds": round(time.time() - t0, 3), "forward_passes": ctx.forward_passes,
                 "load_seconds": round(load_s, 3), **res.metrics, **ctx.extra_metrics}
            layer_metrics.append(m)
            log.event("layer", f"layer {i}: {m['seconds']:.2f}s", **m)
            point.save(i + 1, streamer.hidden_states(), streamer.fp_hidden_states(), layers=layer_metrics)
            del layer, ctx, res, tensors  # not alive through the next layer (its results: 2x its weights)

        # optional head pass (EXL2 lm_head): after the last layer, on the quantized model's outputs
        head_metrics = _head_part(method, streamer, fmt, parts)
        compile_output = getattr(fmt, "compile", None)  # a container of its own (GGUF), else shards
        if compile_output is not None:
            compile_output(staging, reader=reader, arch=arch, other_names=other_names, n_layers=n_layers,
                           model_dir=Path(model_dir))
        else:
            _compile(staging, reader, arch, other_names, n_layers, max_shard_bytes)
        shutil.rmtree(parts)
        shutil.rmtree(rdir)
        copy_aux_files(Path(model_dir), staging)
        config = dict(reader.config)
        config.pop("quantization_config", None)  # the source's, when it was quantized already
        qc = fmt.quantization_config()
        if qc is not None:
            config["quantization_config"] = qc
        (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for name, data in fmt.extra_files().items():
            (staging / name).write_bytes(data)
        metrics = _summary(layer_metrics)
        if head_metrics:
            metrics["head"] = head_metrics
        if getattr(fmt, "tensor_types", None):  # a container that records every tensor's type (GGUF)
            metrics["tensor_types"] = dict(fmt.tensor_types)
        metrics["seconds"] = round(time.time() - t_start, 2)
        metrics["host_heap"] = heap
        metrics["allocator"] = allocator()
        metrics["layers"] = layer_metrics
        write_model_card(staging, stage=stage, model_dir=Path(model_dir), calibration=calib, params=params, metrics=metrics)
        done = mf.complete(staging, mf.load_manifest(staging), metrics=metrics)
    log.event("stage_end", f"{stage}: wrote {out} in {metrics['seconds']:.1f}s", stage=stage, out=str(out))
    return done


def _head_part(method: LayerMethod, streamer: LayerStreamer, fmt: Format, parts: Path) -> dict[str, Any]:
    """Run ``method.process_head(streamer)`` once (a method without it quantizes no head) and keep
    its packed tensors in ``parts/head.safetensors`` (metrics beside it), so a resumed run skips it."""
    process_head = getattr(method, "process_head", None)
    path, meta = parts / "head.safetensors", parts / "head.json"
    if process_head is None:
        return {}
    if not meta.is_file():
        res = process_head(streamer)
        tensors = {f"{prefix}.{suffix}": t.contiguous() for prefix, r in res.results.items()
                   for suffix, t in fmt.pack(r).items()}
        save_file(tensors, str(path) + ".tmp", metadata=_ST_META)
        os.replace(str(path) + ".tmp", path)
        _atomic_json(meta, {"metrics": res.metrics})
    return json.loads(meta.read_text())["metrics"]


def _layer_tensors(reader, arch, i: int, names: list[str], results: dict[str, Any], fmt: Format,
                   replaced: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    prefix = arch.layer_prefix(i)
    out: dict[str, torch.Tensor] = {}
    quantized = {prefix + lin + ".weight": lin for lin in results}
    replaced = {prefix + rel: t for rel, t in (replaced or {}).items()}
    pack_bias = getattr(fmt, "pack_bias", None)  # a format may store a quantized linear's bias its own way
    # experts whose checkpoint holds the 3D parameters (GPT-OSS, Llama-4 text): each is written as
    # its experts' linears (per expert, one group sharing an input: gate+up, then down)
    stacked = _stacked_experts(arch, reader.config, i) if quantized else {}
    written: set[str] = set()  # the quantized weights written in place of a 3D parameter
    ex = arch.moe.experts if stacked else None
    biases = ({prefix + ex.disk + "." + b: reader.get(prefix + ex.disk + "." + b) for b in ex.biases}
              if ex is not None and ex.biases and getattr(fmt, "pack_served_expert", None) is not None else None)
    for name in names:
        if name in stacked:
            for lins in stacked[name]:
                if not all(lin in results for lin in lins):
                    raise RuntimeFault(f"layer {i}: {name} holds {lins}, which were not all quantized")
                out.update(_pack_experts(fmt, arch, prefix, lins, results, biases))
                written.update(prefix + lin + ".weight" for lin in lins)
        elif name in quantized:
            for suffix, t in fmt.pack(results[quantized[name]]).items():
                out[f"{prefix}{quantized[name]}.{suffix}"] = t.contiguous()
        elif pack_bias is not None and name.endswith(".bias") and name[: -len("bias")] + "weight" in quantized:
            out[name] = pack_bias(reader.get(name)).contiguous()
        elif name in replaced:
            out[name] = replaced[name].to(device="cpu", dtype=reader.dtype(name)).contiguous()
        else:
            out[name] = reader.get(name).contiguous()
    missing = ((set(quantized) - written) | set(replaced)) - set(names)
    if missing:
        raise RuntimeFault(f"layer {i}: quantized {sorted(missing)} not found in the checkpoint")
    return out


def _stacked_experts(arch, config, i: int) -> dict[str, list[list[str]]]:
    """For a sparse layer whose checkpoint holds the experts' 3D parameters (``Experts.fused_on_disk``):
    each parameter's checkpoint name -> per expert, the linears it holds ([gate, up] or [down])."""
    if arch.moe is None or not arch.moe.experts.fused_on_disk or not arch.is_sparse_layer(config, i):
        return {}
    ex, E = arch.moe.experts, arch.num_experts(config)
    return {f"{arch.layer_prefix(i)}{ex.disk}.{ex.fused[0]}": [[arch.expert_linear(e, 0), arch.expert_linear(e, 1)]
                                                               for e in range(E)],
            f"{arch.layer_prefix(i)}{ex.disk}.{ex.fused[1]}": [[arch.expert_linear(e, 2)] for e in range(E)]}


def _pack_experts(fmt: Format, arch, prefix: str, lins: list[str], results: dict[str, Any],
                  biases: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """One expert's linears ``lins`` (sharing an input) as the format stores them: under the names
    the format serves experts by (``pack_served_expert``: for GPT-OSS, compressed-tensors under the
    names vLLM's loader maps, GPTQ in gptqmodel's layout with the expert's ``biases`` slice), else
    as 2D linears ``<linear>.<suffix>``."""
    serve = getattr(fmt, "pack_served_expert", None)
    if serve is not None and arch.moe.experts.served:
        ex = arch.moe.experts
        mine = None
        if biases is not None:
            e, j = arch.expert_slot(lins[0])
            mine = [biases[prefix + ex.disk + "." + ex.biases[0 if j < 2 else 1]][e]]
        return {prefix + k: t.contiguous() for k, t in serve(arch, lins, [results[lin] for lin in lins], mine).items()}
    return {f"{prefix}{lin}.{suffix}": t.contiguous() for lin in lins for suffix, t in fmt.pack(results[lin]).items()}


def _compile(staging: Path, reader, arch, other_names: list[str], n_layers: int, max_shard_bytes: int) -> None:
    """Parts -> final shards: embeddings first, then the layers in order, then the rest.

    Every tensor's name, dtype and shape is known up front (checkpoint and part headers), so the
    writer is given the plan and writes each byte once, at its final offset (no spool copy)."""
    first = [n for n in other_names if n.startswith(arch.embed_path + ".")]
    last = [n for n in other_names if n not in first]
    for stale in list(staging.glob("model*.safetensors")) + list(staging.glob("model.safetensors.index.json")):
        stale.unlink()  # a compile interrupted by a kill is redone from the parts

    def from_reader(names: list[str]):
        return [(n, reader.dtype(n), reader.shape(n)) for n in names], lambda: ((n, reader.get(n)) for n in names)

    def from_part(path: Path, names: list[str] | None = None):
        infos, _ = read_safetensors_header(path)
        names = sorted(infos) if names is None else names

        def load():
            part = load_file(str(path))
            for n in names:
                yield n, part.pop(n)
        return [(n, infos[n].dtype, infos[n].shape) for n in names], load

    sources = [from_reader(first)]
    sources += [from_part(staging / "parts" / f"layer-{i:05d}.safetensors") for i in range(n_layers)]
    head_path = staging / "parts" / "head.safetensors"
    head = read_safetensors_header(head_path)[0] if head_path.is_file() else {}
    replaced = {n.rsplit(".", 1)[0] + ".weight" for n in head}  # dense weights the head part packs
    for n in last:
        if n not in replaced:
            sources.append(from_reader([n]))
        else:
            sources.append(from_part(head_path, sorted(k for k in head if k.rsplit(".", 1)[0] + ".weight" == n)))
    writer = ShardedWriter(staging, max_shard_bytes=max_shard_bytes)
    writer.plan([e for entries, _ in sources for e in entries])
    for _, load in sources:
        for n, t in load():
            writer.add(n, t)
    writer.close()


def _summary(layer_metrics: list[dict]) -> dict[str, Any]:
    damps = [d for m in layer_metrics for d in m.get("damp_used", {}).values()]
    errs = [e for m in layer_metrics for e in m.get("rel_error", {}).values()]
    out: dict[str, Any] = {}
    if damps:
        out["max_damp_used"] = max(damps)
        out["healed_hessians"] = sum(1 for m in layer_metrics for v in m.get("healed", {}).values() if v)
    if errs:
        out["mean_rel_error"] = sum(errs) / len(errs)
        out["max_rel_error"] = max(errs)
    from .moe import coverage_summary

    coverage = coverage_summary(layer_metrics)
    if coverage is not None:  # Mixture-of-Experts: what each expert saw, what fell back
        out["moe"] = coverage
    weights = sum(m.get("quantized_weights", 0) for m in layer_metrics)
    if weights:  # methods that report the exact storage of what they quantized
        out["bpw"] = sum(m.get("storage_bits", 0) for m in layer_metrics) / weights
    return out
