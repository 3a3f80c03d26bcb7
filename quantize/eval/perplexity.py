"""Streaming evaluation: perplexity over non-overlapping windows; with a baseline, mean KL
divergence of the next-token distributions and top-1 agreement.

Both models run through the same layer loop as quantization (one decoder layer resident), so a
70B model is evaluated in the memory of one layer. Small models hide quantization damage in
perplexity; the KL divergence to the unquantized model shows it.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .. import log
from .. import manifest as mf
from ..arch import get_arch
from ..errors import GateFailed, InputError
from ..executor.loop import ExecConfig, LayerStreamer
from ..executor.memory import host_heap
from ..io.atomic import StagedOutput
from ..io.quantized import open_model
from .activations import quantized_inputs


@dataclass
class EvalResult:
    perplexity: float
    nll: float
    tokens: int
    windows: int
    kl: float | None = None
    top1_agreement: float | None = None
    baseline_perplexity: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


def final_logits(model_dir: Path, windows: torch.Tensor, cfg: ExecConfig):
    """Stream ``windows`` [W, L] through every layer; yields fp32 logits per batch."""
    host_heap("flat")  # until the layer loop picks its policy (LayerStreamer.apply_host_heap)
    reader = open_model(model_dir)
    arch = get_arch(reader.config, source=str(Path(model_dir) / "config.json"))
    s = LayerStreamer(Path(model_dir), reader, arch, cfg)
    s.capture(windows)
    s.apply_host_heap()
    # a format that quantizes activations too (FP8 W8A8) says what the engine does to each input
    quantizer = getattr(getattr(reader, "fmt", None), "input_quantizer", None)
    for i in log.progress(range(s.num_layers), total=s.num_layers, desc=f"eval {Path(model_dir).name}"):
        layer = s.load_layer(i)
        with (quantized_inputs(layer, i, arch, reader.config, quantizer, reader.inner, cfg.device, cfg.expert_chunk)
              if quantizer else nullcontext()):
            s.run_layer(i, propagate=True)
        s.release_layer(i)
    yield from s.head_logits()


def evaluate_windows(model_dir: Path, windows: torch.Tensor, cfg: ExecConfig, baseline: Path | None = None) -> EvalResult:
    nll_sum, n_tok, kl_sum, agree = 0.0, 0, 0.0, 0
    base_nll = 0.0
    it = final_logits(Path(model_dir), windows, cfg)
    bit = final_logits(Path(baseline), windows, cfg) if baseline is not None else None
    offset = 0
    for logits in it:
        b = logits.shape[0]
        ids = windows[offset: offset + b].to(logits.device).long()
        offset += b
        lp = F.log_softmax(logits[:, :-1].float(), dim=-1)
        target = ids[:, 1:]
        nll_sum += float(-lp.gather(-1, target.unsqueeze(-1)).sum())
        n_tok += target.numel()
        if bit is not None:
            blp = F.log_softmax(next(bit)[:, :-1].float(), dim=-1)
            # KL(base || quantized), summed over the vocabulary, mean over positions
            kl_sum += float((blp.exp() * (blp - lp)).sum())
            agree += int((blp.argmax(-1) == lp.argmax(-1)).sum())
            base_nll += float(-blp.gather(-1, target.unsqueeze(-1)).sum())
    res = EvalResult(perplexity=math.exp(nll_sum / n_tok), nll=nll_sum / n_tok, tokens=n_tok, windows=windows.shape[0])
    if bit is not None:
        res.kl = kl_sum / n_tok
        res.top1_agreement = agree / n_tok
        res.baseline_perplexity = math.exp(base_nll / n_tok)
    return res


def eval_windows_from_dataset(model_dir: Path, dataset: str, seq_len: int, max_windows: int | None,
                              text_field: str | None = None, split: str | None = None) -> tuple[torch.Tensor, Any]:
    """Tokenize the dataset with the model's tokenizer; non-overlapping windows from the start."""
    from ..calibration.sample import load_tokenizer, tokenize_corpus
    from ..calibration.sources import resolve_dataset

    corpus = resolve_dataset(dataset, text_field=text_field, split=split)
    tokens = tokenize_corpus(corpus, load_tokenizer(Path(model_dir)))
    n = tokens.numel() // seq_len
    if max_windows:
        n = min(n, max_windows)
    if n < 1:
        raise InputError(f"dataset '{dataset}' has only {tokens.numel()} tokens, fewer than one window of --seq-len {seq_len}")
    return tokens[: n * seq_len].reshape(n, seq_len).to(torch.int64), corpus


def run_eval(*, model_dir: Path, dataset: str, seq_len: int, out: Path, baseline: Path | None = None,
             max_windows: int | None = None, max_ppl_increase: float | None = None, cfg: ExecConfig,
             overwrite: bool = False, text_field: str | None = None) -> mf.Manifest:
    staged = StagedOutput(Path(out), overwrite=overwrite)
    staged.preflight()
    reader = open_model(Path(model_dir))
    limit = reader.config.get("max_position_embeddings")
    if limit and seq_len > limit:
        raise InputError(f"--seq-len {seq_len} exceeds {model_dir}'s context ({limit}); choose a smaller --seq-len")
    if max_ppl_increase is not None and baseline is None:
        raise InputError("--max-ppl-increase needs --baseline DIR to compare against")
    windows, corpus = eval_windows_from_dataset(Path(model_dir), dataset, seq_len, max_windows, text_field)
    inputs = [mf.describe_input("model", Path(model_dir)), corpus.input_record("dataset")]
    if baseline is not None:
        inputs.append(mf.describe_input("baseline", Path(baseline)))
    params = {"dataset": corpus.identity.model_dump(), "seq_len": seq_len, "windows": int(windows.shape[0]),
              "max_windows": max_windows, "baseline": str(baseline) if baseline else None,
              "max_ppl_increase": max_ppl_increase, "device": cfg.device, "batch_size": cfg.batch_size,
              "compute_dtype": str(cfg.dtype).removeprefix("torch.")}
    t0 = time.time()
    res = evaluate_windows(Path(model_dir), windows, cfg, baseline)
    metrics = res.as_dict()
    metrics["seconds"] = round(time.time() - t0, 2)
    gate_failed = False
    if baseline is not None:
        metrics["ppl_increase_pct"] = 100.0 * (res.perplexity / res.baseline_perplexity - 1.0)
        if max_ppl_increase is not None:
            metrics["gate"] = {"max_ppl_increase_pct": max_ppl_increase,
                               "passed": metrics["ppl_increase_pct"] <= max_ppl_increase}
            gate_failed = not metrics["gate"]["passed"]
    with staged as staging:
        m = mf.new_manifest("eval", inputs=inputs, params=params, device=cfg.device)
        (staging / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
        done = mf.complete(staging, m, metrics=metrics)
    line = f"perplexity {res.perplexity:.3f} over {res.tokens} tokens"
    if baseline is not None:
        line += (f"; baseline {res.baseline_perplexity:.3f} ({metrics['ppl_increase_pct']:+.2f}%), "
                 f"KL {res.kl:.5f}, top-1 agreement {res.top1_agreement:.4f}")
    log.event("metric", line, **metrics)
    if gate_failed:
        raise GateFailed(f"perplexity rose {metrics['ppl_increase_pct']:.2f}%, above --max-ppl-increase {max_ppl_increase}%; results in {out}/manifest.json")
    return done
