"""Peak RSS of ``quantize merge lora`` versus PEFT ``merge_and_unload``, at two model depths.

Builds synthetic bf16 Llama checkpoints (default hidden 1024, intermediate 2816, 16/4 heads, vocab
32000) with 4 and 32 layers, plus a PEFT-format LoRA adapter (r=16, fp32 factors, all seven
linears of every layer), written tensor by tensor so building them stays small. Then, each in a
fresh subprocess so peaks do not mix:

* ours: ``quantize.merge.merge_lora`` (streaming: one tensor at a time);
* peft: ``AutoModelForCausalLM.from_pretrained(dtype=bf16)`` + ``PeftModel.from_pretrained`` +
  ``merge_and_unload()`` + ``save_pretrained`` (the usual recipe; whole model resident).

Reports RSS after the imports (baseline; the kernel's peak counter is reset there, so import-time
peaks do not count), the peak RSS (VmHWM) at the end and the peak minus the baseline, next to the model size and the largest tensor. The streaming peak should stay flat from
4 to 32 layers (bounded by the largest tensor and the adapter), PEFT's should grow with the model.
Finally both outputs are compared tensor for tensor (fp32 factors on a bf16 base: PEFT rounds
once too, so they should be identical).

    python benchmarks/merge_rss.py [--layers 4 32] [--hidden 1024] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM), so import-time peaks do not count (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_mb() -> float:
    return _status_mb("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------------------------------------
# children


def _child(mode: str, base: Path, adapter: Path, out: Path) -> None:
    import torch

    import transformers  # noqa: F401  (both pay it: the manifest records the transformers version)

    torch.set_num_threads(2)
    if mode == "ours":
        from quantize.merge import merge_lora
    else:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
    import gc

    gc.collect()
    reset = _reset_peak()
    baseline = _status_mb("VmRSS") or _peak_mb()
    t0 = time.perf_counter()
    if mode == "ours":
        merge_lora(base, adapter, out)
    else:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
        model.save_pretrained(out)
    print(json.dumps({"mode": mode, "baseline_mb": baseline, "peak_mb": _peak_mb(), "peak_reset": reset,
                      "seconds": time.perf_counter() - t0}))


# ---------------------------------------------------------------------------------------------
# synthetic inputs


def _build(root: Path, layers: int, hidden: int, inter: int, vocab: int, rank: int) -> tuple[Path, Path, dict]:
    import torch

    from quantize.io.writer import ShardedWriter
    from quantize.testing.tiny import tiny_config

    base, adapter = root / "base", root / "adapter"
    cfg = tiny_config("llama", num_layers=layers, hidden=hidden, intermediate_size=inter, vocab_size=vocab,
                      num_attention_heads=16, num_key_value_heads=4, head_dim=hidden // 16, tie_word_embeddings=False)
    cfg.dtype = torch.bfloat16
    base.mkdir(parents=True)
    cfg.save_pretrained(base)
    g = torch.Generator().manual_seed(0)
    q, kv = hidden, 4 * (hidden // 16)
    shapes = {"self_attn.q_proj": (q, hidden), "self_attn.k_proj": (kv, hidden), "self_attn.v_proj": (kv, hidden),
              "self_attn.o_proj": (hidden, q), "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden),
              "mlp.down_proj": (hidden, inter)}

    def rnd(*shape, std=0.02, dtype=torch.bfloat16):
        return (std * torch.randn(*shape, generator=g)).to(dtype)

    total, largest = 0, 0
    with ShardedWriter(base, max_shard_bytes=2 * 10**9) as w:
        def add(name, t):
            nonlocal total, largest
            w.add(name, t)
            total += t.numel() * t.element_size()
            largest = max(largest, t.numel() * t.element_size())

        add("model.embed_tokens.weight", rnd(vocab, hidden))
        for i in range(layers):
            p = f"model.layers.{i}."
            add(p + "input_layernorm.weight", 1 + rnd(hidden))
            add(p + "post_attention_layernorm.weight", 1 + rnd(hidden))
            for lin, shape in shapes.items():
                add(f"{p}{lin}.weight", rnd(*shape))
        add("model.norm.weight", 1 + rnd(hidden))
        add("lm_head.weight", rnd(vocab, hidden))
        w.close()

    lora = {}
    for i in range(layers):
        for lin, (o, n) in shapes.items():
            key = f"base_model.model.model.layers.{i}.{lin}"
            lora[f"{key}.lora_A.weight"] = rnd(rank, n, std=0.05, dtype=torch.float32)
            lora[f"{key}.lora_B.weight"] = rnd(o, rank, std=0.05, dtype=torch.float32)
    adapter.mkdir()
    from safetensors.torch import save_file

    save_file(lora, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    (adapter / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": [x.split(".")[1] for x in LINEARS],
        "task_type": "CAUSAL_LM", "bias": "none", "base_model_name_or_path": str(base)}))
    adapter_bytes = sum(t.numel() * t.element_size() for t in lora.values())
    return base, adapter, {"model_mb": total / 2**20, "largest_tensor_mb": largest / 2**20,
                           "adapter_mb": adapter_bytes / 2**20}


def _run(mode: str, base: Path, adapter: Path, out: Path) -> dict:
    r = subprocess.run([sys.executable, __file__, "--child", mode, str(base), str(adapter), str(out)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{mode} child failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _same_tensors(a: Path, b: Path) -> bool:
    from quantize.io.reader import CheckpointReader

    import torch

    ra, rb = CheckpointReader(a), CheckpointReader(b)
    return ra.names() == rb.names() and all(torch.equal(ra.get(n), rb.get(n)) for n in ra.names())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", nargs=4, metavar=("MODE", "BASE", "ADAPTER", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--layers", type=int, nargs="+", default=[4, 32])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--keep", type=Path, help="work directory to keep (default: a temp dir, removed)")
    args = ap.parse_args()
    if args.child:
        mode, base, adapter, out = args.child
        _child(mode, Path(base), Path(adapter), Path(out))
        return

    root = Path(args.keep or tempfile.mkdtemp(prefix="merge_rss_"))
    rows = []
    try:
        for n in args.layers:
            work = root / f"L{n}"
            base, adapter, sizes = _build(work, n, args.hidden, args.intermediate, args.vocab, args.rank)
            ours = _run("ours", base, adapter, work / "ours")
            peft = _run("peft", base, adapter, work / "peft")
            same = _same_tensors(work / "ours", work / "peft")
            rows.append({"layers": n, **sizes, "ours": ours, "peft": peft, "identical_to_peft": same})
            shutil.rmtree(work / "peft")
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)

    print(f"{'layers':>6} {'model MiB':>9} {'largest':>8} {'adapter':>8} | {'ours peak':>9} {'(+base)':>8} {'s':>5} | "
          f"{'PEFT peak':>9} {'(+base)':>8} {'s':>5} | identical")
    for r in rows:
        o, p = r["ours"], r["peft"]
        print(f"{r['layers']:>6} {r['model_mb']:>9.0f} {r['largest_tensor_mb']:>8.1f} {r['adapter_mb']:>8.1f} | "
              f"{o['peak_mb']:>9.0f} {o['peak_mb'] - o['baseline_mb']:>+8.0f} {o['seconds']:>5.1f} | "
              f"{p['peak_mb']:>9.0f} {p['peak_mb'] - p['baseline_mb']:>+8.0f} {p['seconds']:>5.1f} | {r['identical_to_peft']}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
