"""The streaming layer loop.

    capture  : embed the calibration tokens with only the embedding resident; record, for every
               decoder layer, the positional/keyword arguments the model's own forward passes it
               (attention masks, rotary embeddings, position ids: no per-model code).
    per layer: load its weights -> the method collects statistics through hooks and solves,
               putting quantized-then-dequantized weights in place -> run the batch again to make
               the next layer's inputs (error propagation) -> free the layer.

Only one decoder layer, the activations and the statistics of one group of linears are resident.
Algorithms never move tensors between devices; this module does.
"""

from __future__ import annotations

import gc
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from ..errors import InputError, RuntimeFault
from ..methods.grid import all_finite
from . import memory, skeleton


class _StopForward(Exception):
    """Raised by a hook to end a forward pass early once the needed activations were seen."""


class _Abort(BaseException):
    """Ends a paused lock-step forward when the run is abandoned (an error elsewhere)."""


class _Prefetch:
    """The tensors of one decoder layer, read by a background thread (positioned reads release the
    GIL); quacks like the reader for ``skeleton.materialize``: ``get`` waits for the read, and a
    read error surfaces there, in the layer loop."""

    def __init__(self, reader, prefix: str, layer: nn.Module):
        self.reader = reader
        self.names = [prefix + local for local, _ in layer.named_parameters() if prefix + local in reader]
        self.tensors: dict[str, torch.Tensor] = {}
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=f"prefetch-{prefix}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            # off the heap in the pooled mode (it outlives this layer), where the reader reads into buffers
            offheap = memory.offheap() and hasattr(self.reader, "nbytes")
            for name in self.names:
                if offheap:
                    out = memory.offheap_empty(self.reader.nbytes(name))
                    self.tensors[name] = self.reader.get(name, out=out)
                else:
                    self.tensors[name] = self.reader.get(name)
        except BaseException as e:  # re-raised by get()
            self.error = e

    def get(self, name: str) -> torch.Tensor:
        self.thread.join()
        if self.error is not None:
            raise self.error
        t = self.tensors.pop(name, None)
        return t if t is not None else self.reader.get(name)

    def __getattr__(self, attr: str):  # path, shape, __contains__ helpers: the reader's
        return getattr(self.reader, attr)

    def __contains__(self, name: object) -> bool:
        return name in self.reader


class _Recorder(nn.Module):
    """Stands in for decoder layer ``index`` during capture: records its call, returns its input."""

    def __init__(self, index: int, original: nn.Module, sink: dict[int, tuple[tuple, dict]]):
        super().__init__()
        self.index = index
        self.sink = sink
        for k, v in vars(original).items():  # plain attributes some forwards read (attention_type)
            if not k.startswith("_") and not isinstance(v, (nn.Module, torch.Tensor)):
                setattr(self, k, v)

    def forward(self, *args, **kwargs):
        self.sink[self.index] = (args, kwargs)
        return args[0] if args else kwargs["hidden_states"]


@dataclass
class ExecConfig:
    device: str = "cpu"
    dtype: torch.dtype = torch.float32  # compute dtype of the layer forward
    batch_size: int = 8
    offload_activations: bool = False  # keep hidden states in host RAM between layers
    # one lock-step forward per layer (every batch's activations at a pause point resident at once)
    # instead of one forward per sequential group; None: when they fit in ``lockstep_budget``
    lockstep: bool | None = None
    lockstep_budget: int | None = None  # bytes; None: a quarter of the device's free memory
    prefetch: bool = True  # read the next layer's tensors while this one computes (one extra layer in RAM)
    host_heap: str = "flat"  # glibc policy for host memory (executor/memory.py): flat or pooled
    # Mixture-of-Experts: keep a sparse layer's experts in host memory and bring this many at a time
    # to the device (forward and solve); None: the whole layer on the device (executor/moe.py)
    expert_chunk: int | None = None

    def __post_init__(self) -> None:
        if self.host_heap not in memory.HEAP_MODES:
            raise ValueError(f"host_heap must be {' or '.join(memory.HEAP_MODES)}; got {self.host_heap!r}")


def free_memory(device: str) -> int:
    """Bytes free on ``device``: CUDA's free memory, or the host's MemAvailable (0 if unknown)."""
    if device.startswith("cuda"):
        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@dataclass
class Batch:
    hidden: torch.Tensor  # [B, L, H] (on the device, or on CPU when offloading)
    args: list[tuple]  # per layer: positional args after hidden_states
    kwargs: list[dict[str, Any]]  # per layer
    # The unquantized model's own hidden states at the current layer, where a method asks for them
    # (SignRound's fp targets: ``LayerContext.fp_layer_calls`` / ``set_fp_outputs``); None: not kept, or equal to ``hidden``
    # (before any layer was quantized).
    fp_hidden: torch.Tensor | None = None


def _replace_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


class LayerStreamer:
    """Owns the model skeleton, the device, the activations and the layer loop."""

    def __init__(self, model_dir: Path, reader, arch, cfg: ExecConfig):
        self.model_dir = Path(model_dir)
        # Mixture-of-Experts: the skeleton's fused expert parameters are assembled from the
        # checkpoint's per-expert tensors
        self.reader = skeleton.MemoryView(reader, arch) if arch.moe is not None else reader
        self.arch = arch
        self.cfg = cfg
        self.config = skeleton.load_config(model_dir)
        self.config.use_cache = False
        self.model = skeleton.build_skeleton(self.config)
        self.layers: nn.ModuleList = skeleton.get_submodule(self.model, arch.layers_path)
        self.num_layers = len(self.layers)
        self.batches: list[Batch] = []
        self._lockstep: bool | None = None  # decided on first use (lockstep_fits)
        self._prefetched: dict[int, _Prefetch] = {}  # at most the next layer
        self.load_wait = 0.0  # seconds spent in load_layer (waiting for weights)

    # -- capture ---------------------------------------------------------------------------------
    def capture(self, input_ids: torch.Tensor) -> None:
        """Embed ``input_ids`` [N, L] and record every layer's call arguments, per batch."""
        cfg, model = self.cfg, self.model
        embed = skeleton.get_submodule(model, self.arch.embed_path)
        skeleton.materialize(embed, self.arch.embed_path + ".", self.reader, device=cfg.device, dtype=cfg.dtype)
        for name, buf in list(model.named_buffers()):  # rotary inv_freq and friends
            owner, leaf = skeleton._owner(model, name)
            owner._buffers[leaf] = buf.to(cfg.device)
        originals = list(self.layers)
        sink: dict[int, tuple[tuple, dict]] = {}
        for i, layer in enumerate(originals):
            self.layers[i] = _Recorder(i, layer, sink)
        norm = skeleton.get_submodule(model, self.arch.final_norm_path)

        def stop(*_):
            raise _StopForward

        handle = norm.register_forward_pre_hook(stop)
        self.batches = []
        try:
            base = model.get_submodule(self.arch.layers_path.rsplit(".", 1)[0])
            for ids in input_ids.split(cfg.batch_size):
                sink.clear()
                try:
                    with torch.no_grad():
                        base(input_ids=ids.to(device=cfg.device, dtype=torch.long), use_cache=False)
                except _StopForward:
                    pass
                if len(sink) != self.num_layers:
                    raise RuntimeFault(f"capture saw {len(sink)} of {self.num_layers} decoder layers called")
                args0, kwargs0 = sink[0]
                hidden = args0[0] if args0 else kwargs0["hidden_states"]
                per_args, per_kwargs = [], []
                for i in range(self.num_layers):
                    a, k = sink[i]
                    a, k = _replace_hidden(a, k, None)  # hidden states are kept once, per batch
                    per_args.append(a)
                    per_kwargs.append(k)
                self.batches.append(Batch(self._park(hidden.to(cfg.dtype)), per_args, per_kwargs))
        finally:
            handle.remove()
            for i, layer in enumerate(originals):
                self.layers[i] = layer
            skeleton.release(embed)

    def apply_host_heap(self) -> str | None:
        """Apply ``cfg.host_heap`` to the process (executor/memory.py) and re-park the hidden states
        under it. Returns the mode applied (None without glibc)."""
        memory.host_heap(self.cfg.host_heap)
        for b in self.batches:
            b.hidden = self._park(b.hidden)
        return memory.heap_mode()

    def _park(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states kept until the next layer: on the host when offloading, and there off the
        heap in the pooled mode (executor/memory.py)."""
        if self.cfg.offload_activations:
            hidden = hidden.to("cpu")
        if hidden.device.type == "cpu" and memory.offheap():
            hidden = memory.offheap_copy(hidden)
        return hidden

    def hidden_states(self) -> list[torch.Tensor]:
        return [b.hidden for b in self.batches]

    def set_hidden_states(self, hidden: list[torch.Tensor], fp_hidden: list[torch.Tensor] | None = None) -> None:
        if len(hidden) != len(self.batches) or (fp_hidden is not None and len(fp_hidden) != len(self.batches)):
            raise RuntimeFault("resume state does not match the calibration batches")
        for j, (b, h) in enumerate(zip(self.batches, hidden)):
            b.hidden = self._park(h.to(self.cfg.dtype))
            b.fp_hidden = self._park(fp_hidden[j].to(self.cfg.dtype)) if fp_hidden is not None else None

    def fp_hidden_states(self) -> list[torch.Tensor] | None:
        """The unquantized stream's hidden states per batch, when a method keeps it (else None)."""
        if all(b.fp_hidden is None for b in self.batches):
            return None
        return [b.hidden if b.fp_hidden is None else b.fp_hidden for b in self.batches]

    # -- layers ----------------------------------------------------------------------------------
    def load_layer(self, i: int) -> nn.Module:
        """Materialize layer ``i`` (from the prefetched bytes when ``load_layer(i - 1)`` started
        them), then start reading layer ``i + 1`` in the background: shard I/O overlaps compute."""
        layer = self.layers[i]
        prefix = self.arch.layer_prefix(i)
        source = self._prefetched.pop(i, None) or self.reader
        chunked = self.cfg.expert_chunk is not None and self.arch.is_sparse_layer(self.reader.config, i)
        ex = self.arch.moe.experts if chunked else None
        host = frozenset(f"{ex.module}.{p}" for p in ex.fused) if chunked else frozenset()
        t0 = time.perf_counter()
        try:
            skeleton.materialize(layer, prefix, source, device=self.cfg.device, dtype=self.cfg.dtype, host=host)
        finally:
            self.load_wait += time.perf_counter() - t0
        if chunked:  # the experts' forward brings expert_chunk experts at a time to the device
            from .moe import chunked_experts_forward

            module = layer.get_submodule(ex.module)
            module.forward = chunked_experts_forward(module, ex, self.cfg.expert_chunk, self.cfg.device)
        if self.cfg.prefetch and i + 1 < self.num_layers and i + 1 not in self._prefetched:
            self._prefetched = {i + 1: _Prefetch(self.reader, self.arch.layer_prefix(i + 1), self.layers[i + 1])}
        for local, p in layer.named_parameters():
            if not all_finite(p):
                raise InputError(f"{self.reader.path}: tensor {prefix + local!r} contains NaN/Inf; "
                                 f"the checkpoint is corrupt or the fine-tune diverged: fix or re-export it")
        return layer

    def release_layer(self, i: int) -> None:
        if self.arch.moe is not None:
            experts = self.layers[i].get_submodule(self.arch.moe.experts.module) if self.arch.is_sparse_layer(
                self.reader.config, i) else None
            if experts is not None and "forward" in vars(experts):
                del experts.forward  # the chunked forward installed by load_layer
        skeleton.release(self.layers[i])
        gc.collect()
        memory.release()
        if self.cfg.device.startswith("cuda"):
            torch.cuda.empty_cache()

    def run_layer(self, i: int, *, propagate: bool, stop_hook: nn.Module | None = None,
                  on_batch: Callable[[int], None] | None = None) -> None:
        """Run every batch through layer ``i``.

        ``propagate``: replace the stored hidden states with the layer's outputs.
        ``stop_hook``: end each forward once this module's input was seen (hooks collect it).
        """
        layer = self.layers[i]
        handle = None
        if stop_hook is not None:
            def stop(*_):
                raise _StopForward
            # registered last, so the collecting hooks (registered earlier) run first
            handle = stop_hook.register_forward_pre_hook(stop)
        try:
            for bi, b in enumerate(self.batches):
                if on_batch is not None:
                    on_batch(bi)
                hidden = b.hidden.to(self.cfg.device)
                args, kwargs = _replace_hidden(b.args[i], b.kwargs[i], hidden)
                try:
                    with torch.no_grad():
                        out = layer(*args, **kwargs)
                except _StopForward:
                    continue
                if propagate:
                    self._store_output(i, b, out)
        finally:
            if handle is not None:
                handle.remove()

    def _store_output(self, i: int, b: Batch, out) -> None:
        out = out[0] if isinstance(out, tuple) else out
        if not all_finite(out):
            raise RuntimeFault(
                f"layer {i}: non-finite activations after quantization; "
                f"try a larger --damp or another --bits/--group-size"
            )
        b.hidden = self._park(out)

    def lockstep_bytes(self) -> int:
        """Activations every batch holds at once while paused in lock-step: about tokens x
        (2 hidden + intermediate) values (the residual, and the widest input: the MLP's)."""
        hidden = int(self.config.hidden_size)
        inter = int(getattr(self.config, "intermediate_size", None) or 4 * hidden)
        tokens = sum(b.hidden.shape[:-1].numel() for b in self.batches)
        return tokens * (2 * hidden + inter) * torch.empty((), dtype=self.cfg.dtype).element_size()

    def lockstep_fits(self) -> bool:
        """Whether layers run in lock-step: ``cfg.lockstep``, or (None) whether ``lockstep_bytes``
        fit in ``cfg.lockstep_budget`` (default a quarter of the free memory, decided once)."""
        if self._lockstep is None:
            self._lockstep = self.cfg.lockstep
            if self._lockstep is None:
                budget = self.cfg.lockstep_budget
                if budget is None:
                    budget = free_memory(self.cfg.device) // 4
                self._lockstep = self.lockstep_bytes() <= budget
        return self._lockstep

    def run_layer_lockstep(self, i: int, stops: list[nn.Module], on_stop: Callable[[int], None]) -> None:
        """One forward of every batch through layer ``i``, the batches in lock-step; propagates.

        Each batch's forward runs in a worker thread and pauses at the input of ``stops[0]``,
        ``stops[1]``, ... (execution order). Once every batch is paused at ``stops[k]`` (hooks
        registered on it before this call have seen each batch's input, in batch order),
        ``on_stop(k)`` runs in the calling thread -- it may replace the weights of ``stops[k]`` and
        later modules -- and the forwards go on. Exactly one thread computes at any time and each
        batch runs the same operations as in ``run_layer``, so the statistics and outputs are
        bit-identical to ``len(stops)`` stopped passes plus a propagating one, for one forward's
        cost. Memory: the activations alive at a pause point are resident for all batches at once.
        """
        layer, device, n, last = self.layers[i], self.cfg.device, len(self.batches), len(stops)
        go = [threading.Semaphore(0) for _ in range(n)]
        done = [threading.Semaphore(0) for _ in range(n)]
        where = [-1] * n  # the stop each worker is paused at; ``last`` once its forward ended
        outputs: list[Any] = [None] * n
        errors: list[BaseException | None] = [None] * n
        local = threading.local()
        abort = False

        def pause(k: int) -> None:
            b = local.batch
            where[b] = k
            done[b].release()
            go[b].acquire()
            if abort:
                raise _Abort

        def work(b: int) -> None:
            local.batch = b
            go[b].acquire()
            try:
                if abort:
                    raise _Abort
                if device.startswith("cuda"):
                    torch.cuda.set_device(torch.device(device))
                batch = self.batches[b]
                args, kwargs = _replace_hidden(batch.args[i], batch.kwargs[i], batch.hidden.to(device))
                with torch.no_grad():  # grad mode is per thread
                    outputs[b] = layer(*args, **kwargs)
            except _Abort:
                pass
            except BaseException as e:  # re-raised in the calling thread
                errors[b] = e
            finally:
                where[b] = last
                done[b].release()

        def step(b: int, k: int) -> None:
            go[b].release()
            done[b].acquire()
            if errors[b] is not None:
                raise errors[b]
            if where[b] != k:
                raise RuntimeFault(f"layer {i}: the forward of batch {b} did not pass the {k + 1}-th paused module "
                                   f"once, in order (a module skipped or called twice); run with --no-lockstep")

        handles = [m.register_forward_pre_hook(lambda _m, _a, k=k: pause(k)) for k, m in enumerate(stops)]
        threads = [threading.Thread(target=work, args=(b,), name=f"layer{i}-batch{b}", daemon=True) for b in range(n)]
        for t in threads:
            t.start()
        try:
            for k in range(last):
                for b in range(n):
                    step(b, k)
                on_stop(k)
            for b in range(n):
                step(b, last)
        except BaseException:
            abort = True
            for b in range(n):
                if where[b] != last:
                    go[b].release()
            for t in threads:
                t.join()
            raise
        finally:
            for h in handles:
                h.remove()
        for b, out in zip(self.batches, outputs):
            self._store_output(i, b, out)

    # -- head (eval) -----------------------------------------------------------------------------
    def head_hessian(self):
        """The input Hessian of lm_head (``2/n XᵀX`` of the final-norm outputs over every batch), for
        methods that quantize the head after the last layer. None when no token reached it."""
        from ..methods.hessian import HessianAccumulator

        acc = HessianAccumulator()
        head = skeleton.get_submodule(self.model, self.arch.lm_head_path)
        handle = head.register_forward_pre_hook(acc.pre_hook)
        try:
            for _ in self.head_logits():
                pass
        finally:
            handle.remove()
        return acc.H if acc.H is not None and acc.n else None

    def head_logits(self) -> Iterator[torch.Tensor]:
        """Final norm + lm_head over the current hidden states, one batch at a time (float32)."""
        norm = skeleton.get_submodule(self.model, self.arch.final_norm_path)
        head = skeleton.get_submodule(self.model, self.arch.lm_head_path)
        skeleton.materialize(norm, self.arch.final_norm_path + ".", self.reader, device=self.cfg.device, dtype=self.cfg.dtype)
        aliases = {self.arch.lm_head_path + ".weight": self.arch.embed_path + ".weight"}
        skeleton.materialize(head, self.arch.lm_head_path + ".", self.reader, device=self.cfg.device,
                             dtype=self.cfg.dtype, aliases=aliases)
        softcap = getattr(self.config, "final_logit_softcapping", None)
        try:
            for b in self.batches:
                with torch.no_grad():
                    logits = head(norm(b.hidden.to(self.cfg.device))).float()
                    if softcap:
                        logits = torch.tanh(logits / softcap) * softcap
                yield logits
        finally:
            skeleton.release(norm)
            skeleton.release(head)
