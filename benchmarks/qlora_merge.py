"""QLoRA-exact merge on ref-llama: which merged base reproduces the trained QLoRA model, before and after GPTQ.

1. a LoRA (every linear) is trained briefly by PEFT on the bitsandbytes NF4 base of ref-llama (double
   quantization, bf16 compute, on CPU) over WikiText-2 validation windows: the "trained QLoRA model";
2. the adapter is merged twice with ``quantize merge lora``: onto the bf16 base (``--base-quant
   none``, what other merge tools do) and onto the NF4 round trip (``--base-quant nf4-dq``);
3. each merge is quantized with our GPTQ (4-bit g128, act-order, sym; calibrated on its own merged
   model with WikiText-2 validation windows);
4. on WikiText-2 test windows: KL(trained QLoRA || model) per token, top-1 agreement and perplexity,
   the reference being the PeftModel on the 4-bit base as it ran during training (bf16 compute),
   the others read back and evaluated by our eval (fp32 compute).

    python benchmarks/qlora_merge.py [--steps 40] [--windows 40] [--seq-len 256] [--samples 64]

Needs bitsandbytes (the ``test`` extra) and peft; skips (exit 0) without ../shared (ref-llama,
WikiText-2) or without them.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as c  # noqa: E402


def train_qlora(model: Path, windows, adapter: Path, *, steps: int, lr: float, batch: int, rank: int):
    """PEFT LoRA on the NF4 (double quant, bf16) base; returns the PeftModel (eval mode) and the losses."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                            bnb_4bit_compute_dtype=torch.bfloat16)
    base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16, quantization_config=qc)
    torch.manual_seed(0)  # PEFT draws lora_A's initial values from the global generator
    p = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", lora_dropout=0.0))
    opt = torch.optim.AdamW([t for t in p.parameters() if t.requires_grad], lr=lr)
    g = torch.Generator().manual_seed(0)
    losses = []
    p.train()
    for _ in range(steps):
        ids = windows[torch.randint(0, windows.shape[0], (batch,), generator=g)].long()
        loss = p(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    p.eval()
    p.save_pretrained(adapter)
    return p, losses


def peft_reference(p, windows, batch_size: int) -> c.FpReference:
    """An :class:`common.FpReference` whose log-probs are the trained PeftModel's (4-bit base)."""
    import torch
    import torch.nn.functional as F

    ref = c.FpReference.__new__(c.FpReference)
    ref.windows, ref.batch_size, ref.logprobs = windows, batch_size, []
    with torch.no_grad():
        for s in range(0, windows.shape[0], batch_size):
            logits = p(windows[s: s + batch_size].long()).logits
            ref.logprobs.append(F.log_softmax(logits[:, :-1].float(), dim=-1))
    ref.fp = ref._quality(ref.logprobs, with_baseline=False)
    return ref


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40, help="LoRA training steps")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--train-batch", type=int, default=4)
    ap.add_argument("--samples", type=int, default=64, help="GPTQ calibration samples")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--windows", type=int, default=40, help="test windows for KL / perplexity")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--work", type=Path, default=None, help="keep the outputs here (default: a temp dir)")
    args = ap.parse_args(argv)

    model, valid, test = c.ref_llama(), c.wikitext("valid"), c.wikitext("test")
    if model is None or valid is None or test is None:
        c.skip("needs ../shared/models/ref-llama and ../shared/data/wikitext-2")
    try:
        import bitsandbytes  # noqa: F401
        import peft  # noqa: F401
    except ImportError as e:
        c.skip(f"needs bitsandbytes and peft (pip install -e .[test]): {e}")
    threads, threads_desc = c.set_threads(args.threads)

    from quantize.merge import merge_lora

    with tempfile.TemporaryDirectory(prefix="qlora-merge-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        train_windows = c.eval_windows(model, str(valid), args.seq_len, 400)
        test_windows = c.eval_windows(model, str(test), args.seq_len, args.windows)

        t0 = time.perf_counter()
        with c.quiet():
            p, losses = train_qlora(model, train_windows, work / "adapter", steps=args.steps, lr=args.lr,
                                    batch=args.train_batch, rank=args.rank)
        train_s = time.perf_counter() - t0
        ref = peft_reference(p, test_windows, args.batch_size)
        del p

        rows = [["trained QLoRA (PEFT on the bnb NF4 base, bf16)", ref.fp.perplexity, 0.0, 1.0]]
        base_q = ref.compare(model)
        rows.append(["base model, no adapter (bf16)", base_q.perplexity, base_q.kl, base_q.top1])
        results = {}
        for label, mode in (("bf16-base merge (--base-quant none)", "none"),
                            ("NF4-base merge (--base-quant nf4-dq)", "nf4-dq")):
            merged = work / f"merged-{mode}"
            with c.quiet():
                merge_lora(model, work / "adapter", merged, base_quant=mode, overwrite=True)
            q = ref.compare(merged)
            rows.append([label, q.perplexity, q.kl, q.top1])
            cal = c.calibrate(merged, str(valid), args.samples, args.seq_len, work / f"cal-{mode}")
            _, secs = c.quantize(merged, cal, work / f"gptq-{mode}", bits=4, group_size=128, act_order=True,
                                 batch_size=args.batch_size)
            g = ref.compare(work / f"gptq-{mode}")
            rows.append([f"{label} -> GPTQ 4-bit g128", g.perplexity, g.kl, g.top1])
            results[mode] = (q, g)

        print(f"ref-llama ({model}); LoRA r={args.rank} alpha={2 * args.rank} on every linear, {args.steps} steps "
              f"x {args.train_batch} x {args.seq_len} tokens of WikiText-2 valid, lr {args.lr} "
              f"(mean batch loss of the first/last 5 steps {sum(losses[:5]) / 5:.3f} -> {sum(losses[-5:]) / 5:.3f}, "
              f"{train_s:.0f}s); eval: {test_windows.shape[0]} x "
              f"{args.seq_len} WikiText-2 test tokens; GPTQ calibration {args.samples} x {args.seq_len}; "
              f"torch threads {threads_desc}; {c.cpu_model()}")
        print()
        c.print_table(["model", "perplexity", "KL to trained QLoRA", "top-1 agreement"], rows)
        ratio = results["none"][0].kl / max(results["nf4-dq"][0].kl, 1e-12)
        ratio_g = results["none"][1].kl / max(results["nf4-dq"][1].kl, 1e-12)
        print(f"\nKL ratio bf16-base / NF4-base merge: {ratio:.1f}x merged, {ratio_g:.2f}x after GPTQ")
    return 0


if __name__ == "__main__":
    sys.exit(main())
