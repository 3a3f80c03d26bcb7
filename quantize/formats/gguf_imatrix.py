"""llama.cpp's importance-matrix file (what ``llama-imatrix`` writes and ``llama-quantize --imatrix``
reads), from our Hessian diagonals: the same statistics, so a user can also feed llama.cpp's own
quantizer with them.

A GGUF file (written with gguf-py) with ``general.type = "imatrix"``, ``imatrix.datasets`` (list of
strings), ``imatrix.chunk_count`` and ``imatrix.chunk_size`` (u32), and per weight matrix two F32
tensors: ``<gguf name>.in_sum2`` ``[1, K]`` (Σ over tokens of x_k²; ours: ``diag(H)/2 · n`` for
``H = 2/n XᵀX``) and ``<gguf name>.counts`` ``[1, 1]`` (the tokens n). llama.cpp uses
``in_sum2 / counts = E[x²]``.

Stacked experts (``blk.N.ffn_*_exps``): one entry per stack, as llama-imatrix writes it: ``in_sum2``
``[E, K]`` (expert e's Σx² over the tokens routed to it) and ``counts`` ``[E, 1]`` (its tokens); an
expert with no tokens has zeros, which llama.cpp's quantize reads as importance 1.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def write_imatrix(path: Path, entries: dict[str, tuple[torch.Tensor, int]], *, datasets: list[str],
                  chunk_count: int, chunk_size: int) -> Path:
    """``entries``: GGUF tensor name (``blk.0.attn_q.weight``) -> (Σ x² per input column, tokens), or
    for stacked experts (Σ x² ``[E, K]``, tokens per expert ``[E]``)."""
    import gguf

    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    w = gguf.GGUFWriter(str(tmp), arch="")
    w.kv_data[0].pop("general.architecture", None)  # llama-imatrix writes no architecture
    w.add_string("general.type", "imatrix")
    w.add_array("imatrix.datasets", list(datasets))
    w.add_uint32("imatrix.chunk_count", int(chunk_count))
    w.add_uint32("imatrix.chunk_size", int(chunk_size))
    for name in sorted(entries):
        in_sum2, n = entries[name]
        counts = np.asarray(n, dtype=np.float32).reshape(-1, 1)
        w.add_tensor(f"{name}.in_sum2", in_sum2.detach().to(torch.float32).cpu().numpy().reshape(counts.shape[0], -1))
        w.add_tensor(f"{name}.counts", counts)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.replace(path)
    return path


def read_imatrix(path: Path) -> dict[str, torch.Tensor]:
    """GGUF tensor name -> ``E[x²]`` per input column (``in_sum2 / counts``); for stacked experts the
    ``E x K`` values expert by expert (flat, as llama.cpp's quantizer takes them), 1 where an expert
    saw no token."""
    import gguf

    r = gguf.GGUFReader(str(path))
    t = {x.name: np.asarray(x.data, dtype=np.float32).reshape(-1) for x in r.tensors}
    out = {}
    for n, v in t.items():
        if n.endswith(".in_sum2"):
            counts = t[n[: -len(".in_sum2")] + ".counts"]
            rows = v.reshape(len(counts), -1)
            safe = np.where(counts > 0, counts, 1.0)[:, None]
            out[n[: -len(".in_sum2")]] = torch.from_numpy(np.where(counts[:, None] > 0, rows / safe, 1.0)
                                                          .astype(np.float32).reshape(-1))
    return out
