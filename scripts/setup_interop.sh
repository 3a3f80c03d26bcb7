#!/usr/bin/env bash
# Create the interop virtualenv (.venv-interop): this project plus the peer GPTQ tools
# (GPTQModel, optimum) so tests/test_interop_gptq.py and benchmarks/gptq_vs_gptqmodel.py can load
# our checkpoints with them and quantize the same model with them.
#
# It is a separate environment because GPTQModel pins its own numpy/transformers floor and pulls
# many packages the project itself does not need. torch is pinned to the local CPU wheel through a
# constraints file: if any package asked for another torch, pip fails instead of downloading GBs.
#
#   scripts/setup_interop.sh            # idempotent; reinstalls only when this script or pyproject changed
#   VENV_INTEROP=/path scripts/setup_interop.sh
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV_INTEROP:-.venv-interop}
PYTHON=${PYTHON:-python3}
TORCH_VERSION=2.13.0
GPTQMODEL_VERSION=7.6.0
OPTIMUM_VERSION=2.3.0
STAMP="$VENV/.interop-installed"

if [ -f "$STAMP" ] && [ "$STAMP" -nt scripts/setup_interop.sh ] && [ "$STAMP" -nt pyproject.toml ]; then
    echo "interop: $VENV is up to date"
    exit 0
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install -q)
CONSTRAINTS="$VENV/constraints.txt"
echo "torch==$TORCH_VERSION" > "$CONSTRAINTS"

echo "interop: torch $TORCH_VERSION (CPU wheel)"
"${PIP[@]}" -c "$CONSTRAINTS" "torch==$TORCH_VERSION"
echo "interop: this project"
"${PIP[@]}" -c "$CONSTRAINTS" -e ".[test]"
echo "interop: gptqmodel $GPTQMODEL_VERSION, optimum $OPTIMUM_VERSION, accelerate"
"${PIP[@]}" -c "$CONSTRAINTS" "gptqmodel==$GPTQMODEL_VERSION" "optimum==$OPTIMUM_VERSION" accelerate

# The torch we pinned is the torch we have (no second wheel slipped in through a dependency).
"$VENV/bin/python" - "$TORCH_VERSION" <<'EOF'
import importlib.metadata as md
import sys

want = sys.argv[1]
have = md.version("torch")
if have.split("+")[0] != want:
    sys.exit(f"interop: torch {have} installed, expected {want}")
print("interop: torch", have, "| transformers", md.version("transformers"), "| gptqmodel", md.version("gptqmodel"),
      "| optimum", md.version("optimum"), "| accelerate", md.version("accelerate"))
EOF
touch "$STAMP"
