"""llama.cpp's own quantizer through llama-cpp-python's C API, for the interop tier and the peer
benchmark (``.venv-llamacpp``, scripts/setup_llamacpp.sh). Never imported by the pipeline."""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np

LLAMA_FTYPE_MOSTLY_Q4_K_M = 15  # llama.h's enum llama_ftype


def llama_model_quantize(src: Path, dst: Path, ftype: int = LLAMA_FTYPE_MOSTLY_Q4_K_M, *, threads: int = 1,
                         imatrix: dict | None = None) -> Path:
    """``llama_model_quantize(src -> dst)``. ``imatrix``: GGUF tensor name -> ``E[x²]`` per input
    column (a tensor), handed over as llama-quantize's ``load_imatrix`` does: a NULL-terminated
    array of {name, data, size}. RuntimeError when llama.cpp reports a failure."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads
    keep = []  # the arrays must outlive the call
    if imatrix is not None:
        entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, v) in enumerate(sorted(imatrix.items())):
            arr = np.ascontiguousarray(np.asarray(v), dtype=np.float32)
            keep.append(arr)
            entries[i].name = name.encode()
            entries[i].data = arr.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entries[i].size = arr.size
        entries[len(imatrix)].name = None
        params.imatrix = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
        keep.append(entries)
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({src}) returned {rc}")
    return Path(dst)
