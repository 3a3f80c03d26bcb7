#!/usr/bin/env bash
# Create the llama.cpp virtualenv (.venv-llamacpp): llama-cpp-python 0.3.36 built from source (CPU
# only) for tests/test_interop_llamacpp.py (llama.cpp loads our GGUF files, its logits and
# tokenization are compared with ours, its own quantizer is compared byte for byte with ours) and
# benchmarks/gguf_vs_llamacpp.py. This project is installed here too (editable, with its test
# extras), so both run here.
#
# Built from the sdist (--no-binary), never a prebuilt wheel: the binary wheels on the llama-cpp-python
# index are CUDA/Metal builds or lag behind, and the build lets us choose the CPU code paths. It
# needs a C/C++ compiler and cmake >= 3.21 (Debian `build-essential cmake`; installed with apt-get
# when missing and we are root). With the CMAKE_ARGS below (140 compile steps: libllama, libggml*,
# llama.cpp's common library) the build took 11 min on 2 shared cores (675 s, load 2-4; 13 min for
# the whole script); a default build also compiles the tools, the server and libmtmd. pip keeps the built
# wheel in its cache (~/.cache/pip/wheels), so a rerun after `rm -rf .venv-llamacpp` skips the build.
#
# CMAKE_ARGS build only the shared libraries the Python bindings load (libllama, libggml*):
#   -DLLAVA_BUILD=OFF                 llama-cpp-python's own switch: no libmtmd (multimodal; imported
#                                     only by the llava chat handlers)
#   -DLLAMA_BUILD_TOOLS/EXAMPLES/TESTS/SERVER/APP=OFF   no executables (llama-cli, llama-quantize, ...:
#                                     the quantizer we need is the library's llama_model_quantize)
#   -DLLAMA_OPENSSL=OFF               no HTTPS model downloads (curl is already off in the bindings)
#   -DGGML_NATIVE=OFF                 the generic x86-64 AVX2/FMA/F16C build instead of -march=native:
#                                     pip's wheel cache is keyed by the sdist only (not by CMAKE_ARGS
#                                     or the CPU), so a cached native wheel would crash with SIGILL on
#                                     an older CPU reusing the cache; AVX2 is what llama.cpp's
#                                     K-quant dot products (Q4_K x Q8_K, ...) use on most CPUs.
#   -DGGML_BLAS=OFF                   ggml's own matmuls (what llama.cpp users run on CPU)
# (llama-cpp-python forces LLAMA_BUILD_COMMON on; it cannot be turned off from CMAKE_ARGS.)
# To rebuild with other flags: `.venv-llamacpp/bin/python -m pip cache remove llama_cpp_python` first.
#
# torch is pinned to the local CPU wheel through a constraints file: if any package asked for
# another torch, pip fails instead of downloading GBs of CUDA wheels (triton<0: never installable).
# llama-cpp-python 0.3.36 needs numpy>=1.20, jinja2, diskcache, typing-extensions: no conflict
# with this project's requirements (checked below with `pip check`).
#
#   scripts/setup_llamacpp.sh            # idempotent; reinstalls only when this script or pyproject changed
#   VENV_LLAMACPP=/path scripts/setup_llamacpp.sh
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV_LLAMACPP:-.venv-llamacpp}
PYTHON=${PYTHON:-python3}
TORCH_VERSION=2.13.0
LLAMACPP_PYTHON_VERSION=0.3.36
STAMP="$VENV/.llamacpp-installed"

if [ -f "$STAMP" ] && [ "$STAMP" -nt scripts/setup_llamacpp.sh ] && [ "$STAMP" -nt pyproject.toml ]; then
    echo "llamacpp: $VENV is up to date"
    exit 0
fi

# Build tools: a C++ compiler and cmake >= 3.21 (scikit-build-core's minimum for llama-cpp-python).
cmake_ok() {
    command -v cmake >/dev/null 2>&1 || return 1
    local v
    v=$(cmake --version | head -1 | awk '{print $3}')
    [ "$(printf '%s\n3.21\n' "$v" | sort -V | head -1)" = 3.21 ]
}
if ! command -v c++ >/dev/null 2>&1 || ! command -v make >/dev/null 2>&1 || ! cmake_ok; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "llamacpp: installing build-essential cmake (apt-get)"
        apt-get update -q
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q build-essential cmake
    else
        echo "llamacpp: need a C++ compiler, make and cmake >= 3.21 (Debian: apt-get install build-essential cmake)" >&2
        exit 1
    fi
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install -q)
CONSTRAINTS="$VENV/constraints.txt"
printf 'torch==%s\ntriton<0\n' "$TORCH_VERSION" > "$CONSTRAINTS"

echo "llamacpp: torch $TORCH_VERSION (CPU wheel)"
"${PIP[@]}" -c "$CONSTRAINTS" "torch==$TORCH_VERSION"
echo "llamacpp: this project (editable, with its test extras)"
"${PIP[@]}" -c "$CONSTRAINTS" -e ".[test]"

export CMAKE_ARGS="-DLLAVA_BUILD=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF \
-DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF -DGGML_NATIVE=OFF -DGGML_BLAS=OFF"
echo "llamacpp: llama-cpp-python $LLAMACPP_PYTHON_VERSION from source (CPU; ~11 min on 2 cores unless pip's wheel cache has it)"
echo "llamacpp: CMAKE_ARGS=$CMAKE_ARGS"
start=$(date +%s)
"$VENV/bin/python" -m pip install -c "$CONSTRAINTS" --no-binary llama-cpp-python \
    ${LLAMACPP_PIP_VERBOSE:+-v} "llama-cpp-python==$LLAMACPP_PYTHON_VERSION"
echo "llamacpp: llama-cpp-python installed in $(( $(date +%s) - start )) s"

BROKEN=$("$VENV/bin/python" -m pip check | grep -v '^No broken requirements' || true)
if [ -n "$BROKEN" ]; then
    echo "llamacpp: pip check failed:" >&2
    echo "$BROKEN" >&2
    exit 1
fi

# The torch we pinned is the torch we have, no triton, and llama.cpp loads on the CPU backend only.
"$VENV/bin/python" - "$TORCH_VERSION" "$LLAMACPP_PYTHON_VERSION" <<'EOF'
import importlib.metadata as md
import importlib.util
import sys

want_torch, want_llama = sys.argv[1], sys.argv[2]
have = md.version("torch")
if have.split("+")[0] != want_torch:
    sys.exit(f"llamacpp: torch {have} installed, expected {want_torch}")
if importlib.util.find_spec("triton") is not None:
    sys.exit("llamacpp: triton is installed; this environment is CPU-only")
import llama_cpp  # noqa: E402

if llama_cpp.__version__ != want_llama:
    sys.exit(f"llamacpp: llama-cpp-python {llama_cpp.__version__} installed, expected {want_llama}")
if llama_cpp.llama_supports_gpu_offload():
    sys.exit("llamacpp: this llama.cpp build has a GPU backend; expected CPU only")
info = llama_cpp.llama_print_system_info().decode()
import quantize  # noqa: E402,F401

print("llamacpp: torch", have, "| llama-cpp-python", llama_cpp.__version__, "| transformers",
      md.version("transformers"), "| gguf", md.version("gguf"), "| numpy", md.version("numpy"))
print("llamacpp: llama.cpp system info:", info.strip())
EOF
touch "$STAMP"
