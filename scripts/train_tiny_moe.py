"""Train a small Qwen3-MoE on the bundled WikiText-2 text: the trained MoEs the MoE benchmarks measure.

    python scripts/train_tiny_moe.py --out out/bench-cache/tiny-qwen3-moe    # ~15 min on 2 loaded CPU cores
    python scripts/train_tiny_moe.py --preset a3b --out out/bench-cache/a3b-qwen3-moe    # ~25-30 min

``tiny`` (the default): 4 layers, hidden 128, 8 routed experts (2 per token, expert width 128).
``a3b``: Qwen3-30B-A3B's shape in miniature, where the experts are most of the weights as in the
released model: 16 layers, hidden 256, 128 routed experts of width 128, 8 per token; 206M parameters
(822 MB in fp32), 98% of them in experts. Router auxiliary loss on so that the experts share the
tokens as in released MoE models, trained like the embedded tiny Llama (scripts/train_tiny.py: same
tokenizer, data, schedule and optimiser). ``a3b`` trains through transformers' ``grouped_mm`` experts
(the same function; the eager loop's per-expert backward allocates a dense gradient of the whole 3D
tensor for each of the 128 experts). Deterministic for a fixed seed, thread count and torch build.
Not committed: the benchmarks build them on first use.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from quantize.testing.tiny import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE, tokenizer_dir  # noqa: E402
from train_tiny import SEQ_LEN, TEST_TEXT, TRAIN_TEXT, lr_at, perplexity, tokenize  # noqa: E402

MODEL = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=128,
    intermediate_size=352,
    moe_intermediate_size=128,
    num_experts=8,
    num_experts_per_tok=2,
    norm_topk_prob=True,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    max_position_embeddings=512,
    tie_word_embeddings=False,
    rms_norm_eps=1e-5,
    output_router_logits=True,
    router_aux_loss_coef=0.01,
    bos_token_id=BOS_ID,
    eos_token_id=EOS_ID,
    pad_token_id=PAD_ID,
)

PRESETS = {
    "tiny": (MODEL, "eager"),
    "a3b": (dict(MODEL, hidden_size=256, intermediate_size=1024, moe_intermediate_size=128, num_experts=128,
                 num_experts_per_tok=8, num_hidden_layers=16, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=64), "grouped_mm"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--out", type=Path, default=None, help="default out/bench-cache/{tiny,a3b}-qwen3-moe")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    from transformers import GenerationConfig, Qwen3MoeConfig, Qwen3MoeForCausalLM

    spec, experts_impl = PRESETS[args.preset]
    if args.out is None:
        args.out = ROOT / "out" / "bench-cache" / f"{args.preset}-qwen3-moe"
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    train, test = tokenize(TRAIN_TEXT), tokenize(TEST_TEXT)
    config = Qwen3MoeConfig(**spec)
    model = (Qwen3MoeForCausalLM(config) if experts_impl == "eager"
             else Qwen3MoeForCausalLM._from_config(config, experts_implementation=experts_impl)).float()
    params = sum(p.numel() for p in model.parameters())
    print(f"-- {params:,} parameters; {train.numel():,} train tokens", flush=True)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(args.seed)
    model.train()
    t0 = time.time()
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        starts = torch.randint(0, train.numel() - SEQ_LEN - 1, (args.batch,), generator=gen)
        ids = torch.stack([train[s: s + SEQ_LEN + 1] for s in starts.tolist()])
        out = model(input_ids=ids[:, :-1])
        lm = F.cross_entropy(out.logits.reshape(-1, out.logits.size(-1)), ids[:, 1:].reshape(-1))
        loss = lm + spec["router_aux_loss_coef"] * out.aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == args.steps - 1:
            print(f"-- step {step:4d}  loss {lm.item():.3f}  aux {out.aux_loss.item():.3f}  {time.time() - t0:6.1f}s",
                  flush=True)
    model.eval()
    model.config.output_router_logits = False
    model.config._experts_implementation = "eager"  # not a property of the checkpoint
    staging = args.out.with_name(args.out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    model.generation_config = GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    model.save_pretrained(staging)
    for f in tokenizer_dir().iterdir():
        shutil.copy2(f, staging / f.name)
    saved = Qwen3MoeForCausalLM.from_pretrained(staging, dtype=torch.float32).eval()
    metrics = {"preset": args.preset, "parameters": params, "steps": args.steps, "train_seconds": round(time.time() - t0, 1),
               "test_perplexity": round(perplexity(saved, test), 3)}
    (staging / "training.json").write_text(json.dumps(metrics, indent=1))
    if args.out.exists():
        shutil.rmtree(args.out)
    os.replace(staging, args.out)
    print(json.dumps(metrics))


if __name__ == "__main__":
    main()
