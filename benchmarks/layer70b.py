"""Per-layer cost of GPTQ on a Llama-3-70B-shaped decoder layer, projected to the whole model.

One random fp32 decoder layer of Llama-3-70B's shape (hidden 8192, intermediate 28672, 64 query /
8 KV heads, head_dim 128: 0.86 B parameters, 3.4 GB) and a few calibration tokens (default 2 x 128).
Timed with the pipeline's own pure functions, in the order the GPTQ layer method runs them:

  forward   one full layer forward: the executor's lock-step pattern (every batch paused at each
            sequential group, one forward per layer; used when all batches' paused activations fit,
            ~tokens x (2 hidden + intermediate) values), and its lean pattern: one stopped forward
            per group (q/k/v, o, gate/up, down) + one full forward that propagates the outputs;
  hessian   ``accumulate_hessian`` of each group's input (2 T K^2 flops: linear in tokens);
  prepare   ``prepare_hessian_inverse`` per group (damping, act-order, one Cholesky + one triangular solve);
  solve     ``gptq_quantize_shared`` per group (its linears stacked by rows), 4-bit g128 act-order
            (independent of the token count);
  metrics   what ``GPTQMethod`` adds per linear for its report: ``rtn_quantize`` and
            ``relative_errors`` (GPTQ and RTN, on at most 512 rows);
  pack      ``GPTQFormat.pack`` (qweight/qzeros/scales/g_idx).

down_proj has 28672 inputs: its K x K Hessian is 3.3 GB and its prepare (two O(K^3) LAPACK
calls) takes minutes on this CPU. By default its prepare/solve/metrics/pack are
measured on the leading ``--down-k`` (14336) input columns (and the matching Hessian block) and
scaled by K^3 (prepare), K^2 (solve, metrics) and K (pack); every scaled number is marked. ``--full``
measures it at full size (needs ~15 GB of RAM for the Hessian, its copy, factors and inverse).

The projection to 80 layers at 128 x 2048 calibration tokens scales forward and Hessian time by the
token count (the attention part of the forward grows with sequence length too; its share is printed)
and keeps prepare/solve/metrics/pack as measured.

On a GPU (``--device cuda``, where one is lent) the layer forward runs in bf16 as the pipeline runs it
there (``--dtype auto``), everything else in fp32 on the GPU, down_proj at full size, and every step
is timed between CUDA synchronizations; the projection is then the H200 figure (goal: 80 layers at
128 x 2048 tokens within 15 minutes; give a GPU enough tokens to fill it, e.g. ``--tokens 8x2048``). ``--shrink N`` divides hidden, intermediate and the head
counts by N (a smoke test of the script itself, tests/test_benchmarks_smoke.py).

    python benchmarks/layer70b.py [--tokens 2x128] [--down-k 14336 | --full] [--threads 0]
                                  [--device cpu|cuda] [--dtype auto|float32|bfloat16] [--shrink 1]
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as c  # noqa: E402

HIDDEN, INTER, HEADS, KV_HEADS, HEAD_DIM = 8192, 28672, 64, 8, 128
LAYERS, TARGET_SEQS, TARGET_LEN = 80, 128, 2048
GROUPS = [("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
          ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",)]


class _Stop(Exception):
    pass


def shrink(n: int) -> None:
    """Divide the layer's widths and head counts by ``n`` (head_dim kept): a smoke-test shape."""
    global HIDDEN, INTER, HEADS, KV_HEADS
    HIDDEN, INTER, HEADS, KV_HEADS = HIDDEN // n, INTER // n, max(1, HEADS // n), max(1, KV_HEADS // n)
    if HIDDEN != HEADS * HEAD_DIM or HEADS % KV_HEADS:
        raise SystemExit(f"--shrink {n}: hidden {HIDDEN} is not {HEADS} heads x {HEAD_DIM}")


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)


@contextmanager
def timed(device: str):
    """``with timed(dev) as t: ...`` then ``t.seconds``: wall time between device synchronizations."""
    sync(device)
    t = c.Timer().__enter__()
    try:
        yield t
    finally:
        sync(device)
        t.__exit__()


def build_layer(device: str = "cpu", dtype=None, seed: int = 0):
    """A LlamaDecoderLayer of 70B shape with N(0, 0.02^2) weights (filled in place on ``device``, in
    ``dtype``, default fp32) and its rotary."""
    import torch
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    cfg = LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTER, num_attention_heads=HEADS,
                      num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, num_hidden_layers=1, vocab_size=1024,
                      max_position_embeddings=8192, rope_theta=500000.0)
    cfg._attn_implementation = "sdpa"
    with torch.device("meta"):
        layer = LlamaDecoderLayer(cfg, 0)
    layer = layer.to_empty(device=device).to(dtype or torch.float32).eval()
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if p.ndim == 1:
                p.fill_(1.0)
            else:
                for rows in p.split(1024):  # randn in slices: no full-size temporary
                    rows.normal_(0.0, 0.02, generator=gen)
    return layer, LlamaRotaryEmbedding(cfg).to(device), cfg


def forward_times(layer, rotary, seqs: int, seq_len: int, reps: int):
    """(full forward seconds, executor-pattern seconds, captured group inputs [T, K])."""
    import torch

    p0 = next(layer.parameters())
    device = str(p0.device)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(seqs, seq_len, HIDDEN, generator=gen).to(device=device, dtype=p0.dtype)
    pos = torch.arange(seq_len, device=device).unsqueeze(0).expand(seqs, -1)
    emb = rotary(x, pos)
    captured: dict[str, torch.Tensor] = {}

    def run(stop_at: str | None = None, capture: bool = False) -> float:
        handles = []
        if capture:
            for g in GROUPS:
                def hook(_m, args, _n=g[0]):
                    captured[_n] = args[0].reshape(-1, args[0].shape[-1]).clone()
                handles.append(layer.get_submodule(g[0]).register_forward_pre_hook(hook))
        if stop_at is not None:
            def stop(*_):
                raise _Stop
            handles.append(layer.get_submodule(stop_at).register_forward_pre_hook(stop))
        sync(device)
        t0 = time.perf_counter()
        try:
            with torch.no_grad():
                layer(x, position_embeddings=emb, attention_mask=None)
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
        sync(device)
        return time.perf_counter() - t0

    run(capture=True)  # warm-up, and the inputs of every group
    full = min(run() for _ in range(reps))
    pattern = sum(min(run(stop_at=g[0]) for _ in range(reps)) for g in GROUPS) + full
    return full, pattern, captured


def attention_flop_share(seq_len: int) -> float:
    """Share of a layer forward's flops in the attention scores/values (grows with sequence length)."""
    linear = 2 * (HIDDEN * (HEADS + 2 * KV_HEADS) * HEAD_DIM + HEADS * HEAD_DIM * HIDDEN + 3 * HIDDEN * INTER)
    attn = 2 * 2 * seq_len * HEADS * HEAD_DIM / 2  # QK^T and AV, causal (half), per token
    return attn / (linear + attn)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="2x128", help="calibration SEQSxLEN measured here")
    ap.add_argument("--down-k", type=int, default=14336, help="down_proj inputs measured (scaled to 28672)")
    ap.add_argument("--full", action="store_true", help="measure down_proj at full size (~15 GB RAM, slow)")
    ap.add_argument("--reps", type=int, default=2, help="forward repetitions (the minimum is kept)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: auto, see common.set_threads)")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda[:N] where a GPU is lent")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="the layer forward's dtype; auto: float32 on CPU, bfloat16 on CUDA (as the pipeline)")
    ap.add_argument("--shrink", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.shrink > 1:
        shrink(args.shrink)

    import torch

    from quantize.formats.gptq_checkpoint import GPTQFormat
    from quantize.methods.gptq import gptq_quantize_shared, prepare_hessian_inverse
    from quantize.methods.layer import relative_errors
    from quantize.methods.grid import QuantSpec
    from quantize.methods.hessian import accumulate_hessian
    from quantize.methods.rtn import rtn_quantize

    seqs, seq_len = (int(v) for v in args.tokens.lower().split("x"))
    tokens = seqs * seq_len
    dev = args.device
    gpu = dev.startswith("cuda")
    if gpu and not torch.cuda.is_available():
        c.skip(f"--device {dev}: no CUDA device here")
    fwd_dtype = {"auto": torch.bfloat16 if gpu else torch.float32, "float32": torch.float32,
                 "bfloat16": torch.bfloat16}[args.dtype]
    down_k = INTER if (args.full or gpu) else min(args.down_k, INTER)
    _, threads = c.set_threads(args.threads)
    spec = QuantSpec(bits=4, group_size=128, sym=True, act_order=True, damp=0.01, block_size=128)
    fmt = GPTQFormat(spec)
    where = torch.cuda.get_device_name(dev) if gpu else c.cpu_model()
    print(f"device: {dev} ({where}); torch {torch.__version__}, threads {threads}")
    print(f"layer: Llama-3-70B shape (hidden {HIDDEN}, intermediate {INTER}, {HEADS}/{KV_HEADS} heads, head_dim "
          f"{HEAD_DIM}), forward in {str(fwd_dtype).removeprefix('torch.')}, GPTQ math in fp32; calibration {seqs} x "
          f"{seq_len} = {tokens} tokens; GPTQ 4-bit g128 act-order sym")

    with timed(dev) as t:
        layer, rotary, _ = build_layer(dev, fwd_dtype)
    n_params = sum(p.numel() for p in layer.parameters())
    print(f"built the layer: {n_params / 1e9:.3f} B parameters, {n_params * 4 / 2**30:.2f} GiB fp32 ({t.seconds:.0f}s)",
          flush=True)

    full_fwd, pattern_fwd, inputs = forward_times(layer, rotary, seqs, seq_len, args.reps)
    print(f"forward: full (lock-step pattern) {full_fwd:.2f}s, lean pattern (4 stopped + 1 full) {pattern_fwd:.2f}s",
          flush=True)

    weights = {n: layer.get_submodule(n).weight.detach().float() for g in GROUPS for n in g}
    del layer
    gc.collect()

    rows = []  # (item, seconds, scaled?)
    totals = {"hessian": 0.0, "prepare": 0.0, "solve": 0.0, "metrics": 0.0, "pack": 0.0}
    for group in GROUPS:
        x = inputs.pop(group[0])
        K = x.shape[1]
        with timed(dev) as t:
            H, _ = accumulate_hessian(x, None, 0)
        del x
        totals["hessian"] += t.seconds
        rows.append((f"hessian  {group[0].split('.')[-1]:9} K={K}", t.seconds, ""))
        scale_k = 1.0
        if K > down_k:  # measure on the leading down_k inputs, scale up
            H = H[:down_k, :down_k].clone()
            scale_k = K / down_k
        gc.collect()
        with timed(dev) as t:
            prepared = prepare_hessian_inverse(H, spec)
        s = t.seconds * scale_k**3
        totals["prepare"] += s
        rows.append((f"prepare  {'/'.join(n.split('.')[-1] for n in group):9} K={K}", s, _mark(scale_k, 3, down_k)))
        Ws = [weights.pop(name) for name in group]
        Ws = [W[:, :down_k].contiguous() for W in Ws] if scale_k > 1 else Ws
        short = "/".join(n.split(".")[-1] for n in group)
        with timed(dev) as t:  # one row-stacked solve per group, as GPTQMethod runs it
            rs = gptq_quantize_shared(Ws, spec, prepared, names=list(group))
        s = t.seconds * scale_k**2
        totals["solve"] += s
        rows.append((f"solve    {short:9} {sum(W.shape[0] for W in Ws)}x{K}", s, _mark(scale_k, 2, down_k)))
        note = f" ({rows[-1][2]})" if rows[-1][2] else ""
        print(f"  {short}: solve {rows[-1][1]:.1f}s{note}", flush=True)
        with timed(dev) as t:
            for W, r in zip(Ws, rs):
                relative_errors(W, H, gptq=r.W_hat, rtn=lambda w: rtn_quantize(w, spec).W_hat)
        s = t.seconds * scale_k**2
        totals["metrics"] += s
        rows.append((f"metrics  {short:9}", s, _mark(scale_k, 2, down_k)))
        with timed(dev) as t:
            for r in rs:
                fmt.pack(r)
        s = t.seconds * scale_k
        totals["pack"] += s
        rows.append((f"pack     {short:9}", s, _mark(scale_k, 1, down_k)))
        del Ws, rs
        del H, prepared
        gc.collect()

    print()
    c.print_table(["step (one layer)", "seconds", "note"], [[a, b, n] for a, b, n in rows])

    # -- projection -------------------------------------------------------------------------------
    target_tokens = TARGET_SEQS * TARGET_LEN
    f = target_tokens / tokens
    lock_gb = target_tokens * (2 * HIDDEN + INTER) * 2 / 1e9  # bf16 paused activations, all batches
    per_layer = {
        "forward (lock-step: 1 full)": full_fwd * f,
        "hessian": totals["hessian"] * f,
        "prepare": totals["prepare"],
        "solve": totals["solve"],
        "metrics": totals["metrics"],
        "pack": totals["pack"],
    }
    layer_s = sum(per_layer.values())
    print()
    print(f"Projection to {LAYERS} layers at {TARGET_SEQS} x {TARGET_LEN} = {target_tokens} calibration tokens "
          f"(token factor f = {target_tokens}/{tokens} = {f:.0f}):")
    print(f"  per layer = (forward + hessian) * f + prepare + solve + metrics + pack")
    print(f"            = ({full_fwd:.2f} + {totals['hessian']:.2f}) * {f:.0f} + {totals['prepare']:.1f} + "
          f"{totals['solve']:.1f} + {totals['metrics']:.1f} + {totals['pack']:.1f} = {layer_s:.0f} s")
    lean_s = layer_s + (pattern_fwd - full_fwd) * f
    c.print_table(["per layer", "seconds", f"x {LAYERS} layers (h)"],
                  [[k, v, v * LAYERS / 3600] for k, v in per_layer.items()] + [["total", layer_s, layer_s * LAYERS / 3600]]
                  + [["total, lean pattern (4 stopped + 1 full)", lean_s, lean_s * LAYERS / 3600]])
    print(f"  lock-step holds ~{lock_gb:.1f} GB of bf16 activations at once (tokens x (2 hidden + intermediate)): "
          f"auto-selected where that is under a quarter of the free memory (an H200: yes; this 24 GB host: no)")
    share_meas, share_target = attention_flop_share(seq_len), attention_flop_share(TARGET_LEN)
    under = (1 - share_meas) / (1 - share_target) - 1  # per-token forward cost ratio, target / measured, - 1
    print(f"  caveats: attention is {100 * share_meas:.2f}% of forward flops at length {seq_len} and "
          f"{100 * share_target:.2f}% at {TARGET_LEN}, so the forward term is under-estimated by about "
          f"{100 * under:.1f}%" + (f"; {where}" if gpu else "; 2 shared cores, noisy; this CPU is not the target "
                                    "hardware for a 70B model."))
    if gpu:
        minutes = layer_s * LAYERS / 60
        print(f"  {LAYERS} layers at {TARGET_SEQS} x {TARGET_LEN}: {minutes:.1f} min projected on {where} "
              f"(goal <= 15 min on an H200: {'met' if minutes <= 15 else 'not met'})")
    act_gb = target_tokens * HIDDEN * 4 / 1e9
    print(f"  resident activations at {TARGET_SEQS} x {TARGET_LEN} (fp32 hidden states): {act_gb:.1f} GB; "
          f"down_proj Hessian: {INTER**2 * 4 / 1e9:.1f} GB (+ ~3 such buffers while preparing)")
    return 0


def _mark(scale: float, power: int, measured_k: int) -> str:
    return f"scaled from K={measured_k} by (K/{measured_k})^{power}" if scale > 1 else ""


if __name__ == "__main__":
    sys.exit(main())
