#!/usr/bin/env bash
# Create the AutoRound virtualenv (.venv-autoround): Intel's auto-round 0.16 (SignRound, arXiv:2309.05516)
# for benchmarks/lowbit_quality.py, which runs AutoRound in a child process with
# .venv-autoround/bin/python on our calibration token ids and reads back what it saved (GPTQ format).
#
# torch is installed FIRST, pinned to the CPU wheel 2.13.0 through a constraints file, so that
# auto-round's own requirements resolve against it: if any package asked for another torch, pip
# fails instead of downloading GBs of CUDA wheels (triton<0: never installable).
# This project is not installed here: the child script only imports auto_round and transformers.
#
#   scripts/setup_autoround.sh              # idempotent; reinstalls only when this script changed
#   scripts/setup_autoround.sh --dry-run    # show what pip would install, change nothing
#   VENV_AUTOROUND=/path scripts/setup_autoround.sh
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV_AUTOROUND:-.venv-autoround}
PYTHON=${PYTHON:-python3}
TORCH_VERSION=2.13.0
AUTOROUND_SPEC="auto-round==0.16.*"
STAMP="$VENV/.autoround-installed"
DRY=()
if [ "${1:-}" = "--dry-run" ]; then DRY=(--dry-run); fi

if [ ${#DRY[@]} -eq 0 ] && [ -f "$STAMP" ] && [ "$STAMP" -nt scripts/setup_autoround.sh ]; then
    echo "autoround: $VENV is up to date"
    exit 0
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install -q)
CONSTRAINTS="$VENV/constraints.txt"
printf 'torch==%s\ntriton<0\n' "$TORCH_VERSION" > "$CONSTRAINTS"

echo "autoround: torch $TORCH_VERSION (CPU wheel) first"
"${PIP[@]}" ${DRY[@]+"${DRY[@]}"} -c "$CONSTRAINTS" "torch==$TORCH_VERSION"
echo "autoround: $AUTOROUND_SPEC"
if [ ${#DRY[@]} -gt 0 ]; then
    "$VENV/bin/python" -m pip install --dry-run -c "$CONSTRAINTS" "$AUTOROUND_SPEC"
    exit 0
fi
"${PIP[@]}" -c "$CONSTRAINTS" "$AUTOROUND_SPEC"

# The torch we pinned is the torch we have, no triton, and auto-round imports.
"$VENV/bin/python" - "$TORCH_VERSION" <<'PY'
import importlib.metadata as md
import importlib.util
import sys

want = sys.argv[1]
have = md.version("torch")
if have.split("+")[0] != want:
    sys.exit(f"autoround: torch {have} installed, expected {want}")
if importlib.util.find_spec("triton") is not None:
    sys.exit("autoround: triton is installed; this environment is CPU-only")
from auto_round import AutoRound  # noqa: F401,E402

print("autoround: torch", have, "| transformers", md.version("transformers"), "| auto-round",
      md.version("auto-round"))
PY
touch "$STAMP"
