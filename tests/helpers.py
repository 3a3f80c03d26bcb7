"""Plain helpers shared by several test files (fixtures live in ``conftest.py``).

Importable as ``from helpers import ...``: ``tests/`` has no ``__init__.py``, so pytest's default
("prepend") import mode puts this folder on ``sys.path`` before it imports the test modules.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from quantize import manifest as mf
from quantize.commands.gptq import quantize_gptq
from quantize.executor.loop import ExecConfig
from quantize.io.quantized import load_dequantized_model

# ---- pipeline runs ------------------------------------------------------------------------------

CPU = ExecConfig(device="cpu", dtype=torch.float32, batch_size=4)
READBACK_IDS = torch.tensor([[5, 17, 300, 42, 7, 99, 512, 3]])
READBACK_MAX_KL = 0.05  # KL(fp || dequantized read-back), batch mean, on READBACK_IDS


def run_gptq(model: Path, cal: Path, out: Path, **overrides: Any) -> mf.Manifest:
    """``quantize_gptq`` on CPU: 4-bit, group 32, act-order, symmetric unless ``overrides`` say otherwise."""
    args = dict(bits=4, group_size=32, act_order=True, sym=True, damp=0.01, static_groups=False, block_size=128,
                rtn=False, exec_cfg=CPU)
    return quantize_gptq(model_dir=model, calibration=cal, out=out, **{**args, **overrides})


def rtn_ct_and_gptq_outputs(model: Path, cal: Path, root: Path) -> dict[str, mf.Manifest]:
    """GPTQ (static groups) into the GPTQ and compressed-tensors formats, and RTN into
    compressed-tensors, under ``root/{gptq,ct,rtn}``: the three outputs the MoE family tests read."""
    return {
        "gptq": run_gptq(model, cal, root / "gptq", static_groups=True),
        "ct": run_gptq(model, cal, root / "ct", static_groups=True, format="compressed-tensors"),
        "rtn": run_gptq(model, cal, root / "rtn", act_order=False, static_groups=True, rtn=True,
                        format="compressed-tensors"),
    }


def hf_model(path: Path, dtype: torch.dtype = torch.float32, **kw: Any):
    """transformers' model of ``path`` in eval mode (fp32 unless told)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kw).eval()


def tiny_model_edited(family: str, out_dir: Path, edits: Mapping[str, Callable[[torch.Tensor], torch.Tensor]],
                      **kwargs: Any) -> Path:
    """``build_tiny_model(family, out_dir, **kwargs)`` with every tensor whose name ends with a key of
    ``edits`` replaced by ``edits[key](tensor)`` (a starved router, scaled experts, a router bias);
    each key must match a tensor."""
    from safetensors.torch import load_file, save_file

    from quantize.testing import build_tiny_model

    d = build_tiny_model(family, out_dir, **kwargs)
    sd = load_file(d / "model.safetensors")
    for key, fn in edits.items():
        hits = [k for k in sd if k.endswith(key)]
        assert hits, f"no tensor of the tiny {family} ends with {key!r}"
        for k in hits:
            sd[k] = fn(sd[k])
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    return d


def layer_context(model: Path, cal: Path, layer: int, samples: int = 4):
    """The layer loop's context for ``layer`` of ``model`` as a CPU run reaches it: the first ``samples``
    calibration sequences captured and propagated through the layers before, ``layer`` loaded."""
    from quantize.arch import get_arch
    from quantize.calibration import load_calibration
    from quantize.executor.context import LayerContext
    from quantize.executor.loop import LayerStreamer
    from quantize.io.reader import CheckpointReader

    ids, _ = load_calibration(cal)
    reader = CheckpointReader(model)
    s = LayerStreamer(model, reader, get_arch(reader.config), CPU)
    s.capture(ids[:samples])
    for j in range(layer):
        s.load_layer(j)
        s.run_layer(j, propagate=True)
        s.release_layer(j)
    return LayerContext(s, layer, s.load_layer(layer))


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def output_files(out: Path) -> list[str]:
    """The files ``out``'s manifest lists, less the README (which names the output folder)."""
    return [o.path for o in mf.load_manifest(out).outputs if o.path != "README.md"]


def assert_same_files(a: Path, b: Path, files: list[str]) -> None:
    """Every one of ``files`` is byte-identical under ``a`` and ``b``."""
    for f in files:
        assert sha256_file(a / f) == sha256_file(b / f), f


def assert_reads_back_close(reference: Path, quantized: Path, label: str) -> None:
    """``quantized`` loads as a transformers model with dequantized weights whose logits are finite,
    not identical to ``reference``'s, and within READBACK_MAX_KL of them."""
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(reference, dtype=torch.float32).eval()
    q = load_dequantized_model(quantized).eval()
    with torch.no_grad():
        a, b = ref(READBACK_IDS).logits, q(READBACK_IDS).logits
    assert torch.isfinite(b).all()
    assert not torch.equal(a, b)
    kl = torch.nn.functional.kl_div(b.log_softmax(-1), a.log_softmax(-1), log_target=True, reduction="batchmean")
    assert kl < READBACK_MAX_KL, f"{label}: KL {kl}"


def safetensors_in(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every ``*.safetensors`` file in ``folder`` (shards merged), by name."""
    from safetensors.torch import load_file

    sd: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        sd.update(load_file(f))
    return sd


@contextmanager
def replaced(owner: Any, name: str, value: Any) -> Iterator[None]:
    """Set ``owner.name = value`` for the ``with`` body; the original comes back however it exits."""
    orig = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, orig)


def killed_at(method_cls: type, index: int) -> Callable[..., Any]:
    """A ``process_layer`` for ``method_cls`` that simulates a kill (KeyboardInterrupt) on layer
    ``index`` and runs the real one on every other layer. Install it with ``replaced``."""
    orig = method_cls.process_layer

    def process_layer(self, ctx):
        if ctx.index == index:
            raise KeyboardInterrupt("simulated kill")
        return orig(self, ctx)

    return process_layer


def recording(method_cls: type, seen: list[int]) -> Callable[..., Any]:
    """A ``process_layer`` for ``method_cls`` that appends each layer index it runs to ``seen``."""
    orig = method_cls.process_layer

    def process_layer(self, ctx):
        seen.append(ctx.index)
        return orig(self, ctx)

    return process_layer



def keeping_outputs(method_cls: type, seen: dict[str, torch.Tensor],
                    check: Callable[[Any], None] | None = None) -> Callable[..., Any]:
    """A ``process_layer`` for ``method_cls`` that copies into ``seen`` every weight it solved
    (``{prefix}{name}.weight``: the ``W_hat`` the executor propagates with) and every extra tensor
    it returned (folded norms, biases, routers), then calls ``check(result)``. Install it with ``replaced``."""
    orig = method_cls.process_layer

    def process_layer(self, ctx):
        res = orig(self, ctx)
        for name, r in res.results.items():
            seen[ctx.prefix + name + ".weight"] = r.W_hat.clone()
        for rel, t in res.tensors.items():
            seen[ctx.prefix + rel] = t.clone()
        if check is not None:
            check(res)
        return res

    return process_layer


def refused_in_one_line(argv: list[str], out: Path, capsys) -> str:
    """Run the CLI ``argv`` (writing ``out``): it must exit 2 with exactly one ``!!`` error line, no
    traceback and no output or partial output. Returns that line."""
    from quantize.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    lines = [ln for ln in err if ln.startswith("!!")]
    assert len(lines) == 1, err
    assert "Traceback" not in "\n".join(err)
    assert not out.exists() and not out.with_name(out.name + ".partial").exists()
    return lines[0]


# ---- packed-format worked examples (FORMATS.md §1.8, §2.6) -------------------------------------


def u32(t: torch.Tensor) -> list[int]:
    """The int32 words of ``t`` (row-major) as unsigned 32-bit values."""
    return [x & 0xFFFFFFFF for x in t.flatten().tolist()]


def tensor_sha256(t: torch.Tensor) -> str:
    """Over the raw little-endian bytes, row-major (as FORMATS.md §1.8 hashes them)."""
    a = t.contiguous().numpy()
    return hashlib.sha256(a.astype(a.dtype.newbyteorder("<")).tobytes()).hexdigest()


def format_example(N: int, K: int, G: int, scale_den: int) -> tuple[torch.Tensor, ...]:
    """§1.8 inputs ``(codes, scales, zeros, g_idx)``: Q[n][k] = (3n+5k+2) mod 16, scales
    (n+1+N·g)/den, zeros 1+(n+3g) mod 15, K/G consecutive inputs per group."""
    n = torch.arange(N).unsqueeze(1)
    codes = (3 * n + 5 * torch.arange(K).unsqueeze(0) + 2) % 16
    g = torch.arange(G).unsqueeze(1)
    scales = (torch.arange(N).unsqueeze(0) + 1 + N * g).double() / scale_den
    zeros = 1 + (torch.arange(N).unsqueeze(0) + 3 * g) % 15
    g_idx = torch.arange(K) // (K // G)
    return codes, scales.float(), zeros, g_idx


# §1.8(a): the dequantized 8x8 example (N=K=8, G=2, den 256); identical for GPTQ and AWQ (§2.6)
EXAMPLE_A_W = [
    [0.00390625, 0.0234375, 0.04296875, 0.0, 0.0703125, 0.24609375, -0.140625, 0.03515625],
    [0.0234375, 0.0625, 0.1015625, 0.015625, 0.15625, 0.3515625, -0.078125, 0.1171875],
    [0.05859375, 0.1171875, -0.01171875, 0.046875, 0.2578125, -0.21484375, 0.0, 0.21484375],
    [0.109375, -0.0625, 0.015625, 0.09375, 0.375, -0.140625, 0.09375, 0.328125],
    [0.17578125, -0.0390625, 0.05859375, 0.15625, -0.3046875, -0.05078125, 0.203125, -0.35546875],
    [-0.1171875, 0.0, 0.1171875, -0.140625, -0.21875, 0.0546875, 0.328125, -0.2734375],
    [-0.08203125, 0.0546875, 0.19140625, -0.109375, -0.1171875, 0.17578125, -0.46875, -0.17578125],
    [-0.03125, 0.125, -0.21875, -0.0625, 0.0, -0.6875, -0.375, -0.0625],
]
