#!/usr/bin/env bash
# Create the AutoAWQ virtualenv (.venv-autoawq): AutoAWQ 0.2.9 for benchmarks/awq_vs_gptqmodel.py,
# which runs its quantization in a child process with .venv-autoawq/bin/python.
#
# A separate environment because AutoAWQ 0.2.9 (its last release, deprecated upstream; last tested
# with transformers 4.51.3) needs transformers 4.x, while this project and .venv-interop run 5.x.
# This project is NOT installed here: the benchmark hands AutoAWQ its calibration tokens as JSON.
#
# AutoAWQ is installed with --no-deps because it declares `triton` (GPU kernels, unused on CPU:
# awq/utils/utils.py imports it only when present) and `datasets` for hub calibration sets; we
# install what its import path and CPU quantization actually need: transformers (and through it
# tokenizers, huggingface_hub, safetensors), accelerate, typing_extensions, and datasets (imported
# unconditionally by awq/utils/calib_data.py, although a list of token lists never reaches it).
# torch is pinned to the local CPU wheel through a constraints file: if any package asked for
# another torch, pip fails instead of downloading GBs of CUDA wheels.
#
#   scripts/setup_autoawq.sh            # idempotent; reinstalls only when this script changed
#   VENV_AUTOAWQ=/path scripts/setup_autoawq.sh
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV_AUTOAWQ:-.venv-autoawq}
PYTHON=${PYTHON:-python3}
TORCH_VERSION=2.13.0
AUTOAWQ_VERSION=0.2.9
TRANSFORMERS_VERSION=4.51.3  # AutoAWQ 0.2.9's last tested transformers
STAMP="$VENV/.autoawq-installed"

if [ -f "$STAMP" ] && [ "$STAMP" -nt scripts/setup_autoawq.sh ]; then
    echo "autoawq: $VENV is up to date"
    exit 0
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install -q)
CONSTRAINTS="$VENV/constraints.txt"
printf 'torch==%s\ntriton<0\n' "$TORCH_VERSION" > "$CONSTRAINTS"  # triton<0: never installable

echo "autoawq: torch $TORCH_VERSION (CPU wheel)"
"${PIP[@]}" -c "$CONSTRAINTS" "torch==$TORCH_VERSION"
echo "autoawq: transformers $TRANSFORMERS_VERSION, accelerate, datasets"
"${PIP[@]}" -c "$CONSTRAINTS" "transformers==$TRANSFORMERS_VERSION" accelerate datasets "typing_extensions>=4.8.0"
echo "autoawq: autoawq $AUTOAWQ_VERSION (--no-deps: no triton)"
"${PIP[@]}" -c "$CONSTRAINTS" --no-deps "autoawq==$AUTOAWQ_VERSION"

# The torch we pinned is the torch we have, no triton, and AutoAWQ imports on CPU.
"$VENV/bin/python" - "$TORCH_VERSION" <<'EOF'
import importlib.metadata as md
import importlib.util
import sys
import warnings

want = sys.argv[1]
have = md.version("torch")
if have.split("+")[0] != want:
    sys.exit(f"autoawq: torch {have} installed, expected {want}")
if importlib.util.find_spec("triton") is not None:
    sys.exit("autoawq: triton is installed; this environment is CPU-only")
with warnings.catch_warnings(record=True):
    # record=True: AutoAWQ (deprecated upstream) resets the filters and warns at import; keep the output short
    from awq import AutoAWQForCausalLM  # noqa: F401
print("autoawq: torch", have, "| transformers", md.version("transformers"), "| autoawq", md.version("autoawq"),
      "| accelerate", md.version("accelerate"))
EOF
touch "$STAMP"
