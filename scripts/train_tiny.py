"""Train the embedded tiny Llama committed under models/tiny-llama/.

    python scripts/train_tiny.py            # ~1-2 minutes on 2 CPU cores
    python scripts/train_tiny.py --steps 20 --out /tmp/tiny-smoke

A 4-layer Llama (hidden 128, 4 heads / 2 KV heads, untied embeddings, ~1M parameters) trained on
the bundled WikiText-2 *validation* split with the bundled 1024-token BPE tokenizer, then evaluated
on the held-out *test* split. It gives the pipeline a real (non-random) model whose perplexity
moves measurably when quantization hurts it. Deterministic for a fixed seed, thread count and
torch build.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from quantize.testing.tiny import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE, tokenizer_dir  # noqa: E402

TRAIN_TEXT = ROOT / "calibration" / "wikitext2" / "valid.txt"
TEST_TEXT = ROOT / "calibration" / "wikitext2" / "test.txt"
SEQ_LEN = 128

MODEL = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=128,
    intermediate_size=352,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    max_position_embeddings=512,
    tie_word_embeddings=False,
    rms_norm_eps=1e-5,
    bos_token_id=BOS_ID,
    eos_token_id=EOS_ID,
    pad_token_id=PAD_ID,
)


def tokenize(path: Path) -> torch.Tensor:
    tok = Tokenizer.from_file(str(tokenizer_dir() / "tokenizer.json"))
    return torch.tensor(tok.encode(path.read_text(encoding="utf-8")).ids, dtype=torch.long)


@torch.no_grad()
def perplexity(model, tokens: torch.Tensor, seq_len: int = SEQ_LEN, batch: int = 32) -> float:
    """exp(mean next-token NLL) over non-overlapping ``seq_len`` windows (seq_len - 1 targets each)."""
    n = tokens.numel() // seq_len
    windows = tokens[: n * seq_len].view(n, seq_len)
    nll, count = 0.0, 0
    for i in range(0, n, batch):
        ids = windows[i : i + batch]
        logits = model(input_ids=ids).logits.float()
        nll += F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1), reduction="sum").item()
        count += ids[:, 1:].numel()
    return math.exp(nll / count)


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warmup, then cosine decay to 10% of peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def model_card(args, m: dict) -> str:
    return f"""# tiny-llama

A small Llama-architecture causal LM embedded in this repository so the quantization pipeline can be
tested end to end on CPU with a model that has actually learned something.

| | |
|---|---|
| architecture | `LlamaForCausalLM`, {MODEL['num_hidden_layers']} layers, hidden {MODEL['hidden_size']}, {MODEL['num_attention_heads']} heads / {MODEL['num_key_value_heads']} KV heads (head_dim {MODEL['head_dim']}), intermediate {MODEL['intermediate_size']}, untied lm_head |
| parameters | {m['parameters']:,} |
| weights | `model.safetensors`, {args.dtype} ({m['bytes']:,} bytes) |
| tokenizer | bundled byte-level BPE, vocab {VOCAB_SIZE} (bos {BOS_ID}, eos {EOS_ID}, pad {PAD_ID}) |

## Training

`python scripts/train_tiny.py --steps {args.steps} --seed {args.seed}`: {args.steps} AdamW steps
(lr {args.lr} peak, betas (0.9, 0.95), weight decay 0.1, {args.warmup} warmup steps then cosine to 10%,
grad-norm clip 1.0) on batches of {args.batch} random {SEQ_LEN}-token windows of the WikiText-2
**validation** split ({m['train_tokens']:,} tokens), fp32, `torch.set_num_threads({args.threads})`,
seed {args.seed}. Wall time {m['train_seconds']:.0f} s (median step {m['median_step_seconds']:.2f} s) on a 2-core CPU
shared with other jobs; on an idle 2-core CPU a step takes about 0.1 s (about 1.5 minutes for the run).
Bit-reproducible: two runs with the same seed, thread count and torch build (2.13.0+cpu) wrote
identical `model.safetensors`.

## Evaluation

Perplexity on the held-out WikiText-2 **test** split ({m['test_tokens']:,} tokens), non-overlapping
{SEQ_LEN}-token windows, {SEQ_LEN - 1} scored tokens each, exp(mean NLL):

| model | test perplexity |
|---|---|
| untrained (same init) | {m['ppl_untrained']:.1f} |
| trained, fp32 | {m['ppl_fp32']:.3f} |
| trained, as saved ({args.dtype}) | **{m['ppl_saved']:.3f}** |

Final training loss (mean of the last 20 steps): {m['final_train_loss']:.3f}.
This is a test fixture, not a useful language model.
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "models" / "tiny-llama")
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    args = ap.parse_args()

    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    train, test = tokenize(TRAIN_TEXT), tokenize(TEST_TEXT)
    model = LlamaForCausalLM(LlamaConfig(**MODEL)).float()
    params = sum(p.numel() for p in model.parameters())
    print(f"-- {params:,} parameters; {train.numel():,} train / {test.numel():,} test tokens", flush=True)
    ppl_untrained = perplexity(model.eval(), test)
    print(f"-- untrained test perplexity {ppl_untrained:.1f}", flush=True)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    gen = torch.Generator().manual_seed(args.seed)
    model.train()
    losses: list[float] = []
    step_seconds: list[float] = []
    t0 = time.time()
    for step in range(args.steps):
        t_step = time.time()
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        starts = torch.randint(0, train.numel() - SEQ_LEN - 1, (args.batch,), generator=gen)
        ids = torch.stack([train[s : s + SEQ_LEN + 1] for s in starts.tolist()])
        logits = model(input_ids=ids[:, :-1]).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        step_seconds.append(time.time() - t_step)
        if step % 50 == 0 or step == args.steps - 1:
            print(f"-- step {step:4d}  loss {loss.item():.3f}  {time.time() - t0:6.1f}s", flush=True)
    train_seconds = time.time() - t0
    model.eval()
    ppl_fp32 = perplexity(model, test)

    # Save in the release dtype into a staging directory, reload from disk, and evaluate that.
    dtype = getattr(torch, args.dtype)
    staging = args.out.with_name(args.out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.to(dtype)
    model.config.dtype = dtype
    model.generation_config = GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    model.save_pretrained(staging)
    for f in tokenizer_dir().iterdir():
        shutil.copy2(f, staging / f.name)
    saved = LlamaForCausalLM.from_pretrained(staging, dtype=torch.float32).eval()
    ppl_saved = perplexity(saved, test)
    metrics = dict(
        parameters=params,
        bytes=(staging / "model.safetensors").stat().st_size,
        train_tokens=train.numel(),
        test_tokens=test.numel(),
        train_seconds=train_seconds,
        median_step_seconds=sorted(step_seconds)[len(step_seconds) // 2],
        final_train_loss=sum(losses[-20:]) / len(losses[-20:]),
        ppl_untrained=ppl_untrained,
        ppl_fp32=ppl_fp32,
        ppl_saved=ppl_saved,
    )
    (staging / "README.md").write_text(model_card(args, metrics))
    if args.out.exists():
        shutil.rmtree(args.out)
    os.replace(staging, args.out)
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in metrics.items()}))


if __name__ == "__main__":
    main()
