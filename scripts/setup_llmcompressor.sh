#!/usr/bin/env bash
# Create the llm-compressor virtualenv (.venv-llmcompressor): llm-compressor 0.14 (vLLM's quantizer,
# which writes compressed-tensors checkpoints) for benchmarks/ct_vs_llmcompressor.py, which runs its
# GPTQ in a child process with .venv-llmcompressor/bin/python.
#
# A separate environment because llm-compressor 0.14.0.1 pins transformers to 5.15-5.17 (and
# compressed-tensors to exactly 0.19.0, accelerate, datasets, auto-round), while .venv follows the
# newest 5.x. This project is installed here too (editable, --no-deps), then those of its own
# requirements (pyproject.toml) that llm-compressor's versions satisfy, under a constraints file
# that freezes every package llm-compressor brought (nothing it resolved changes; transformers 5.17
# satisfies our >=5.0,<6). A requirement of ours that llm-compressor pinned otherwise (e.g.
# compressed-tensors>=0.20 against its ==0.19.0) is reported as a warning and left as llm-compressor
# needs it; `pip check` may report that and nothing else. benchmarks/ct_vs_llmcompressor.py runs
# only llm-compressor here (everything of ours runs in .venv).
#
# torch is pinned to the local CPU wheel through a constraints file: if any package asked for
# another torch, pip fails instead of downloading GBs of CUDA wheels (triton<0: never installable).
#
#   scripts/setup_llmcompressor.sh            # idempotent; reinstalls only when this script or pyproject changed
#   VENV_LLMCOMPRESSOR=/path scripts/setup_llmcompressor.sh
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV_LLMCOMPRESSOR:-.venv-llmcompressor}
PYTHON=${PYTHON:-python3}
TORCH_VERSION=2.13.0
LLMCOMPRESSOR_VERSION=0.14.0.1  # the newest 0.14.x (`pip index versions llmcompressor`)
TRANSFORMERS_SPEC="transformers>=5.15,<=5.17"  # llm-compressor 0.14's range; inside ours (>=5.0,<6)
STAMP="$VENV/.llmcompressor-installed"

if [ -f "$STAMP" ] && [ "$STAMP" -nt scripts/setup_llmcompressor.sh ] && [ "$STAMP" -nt pyproject.toml ]; then
    echo "llmcompressor: $VENV is up to date"
    exit 0
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install -q)
CONSTRAINTS="$VENV/constraints.txt"
printf 'torch==%s\ntriton<0\n' "$TORCH_VERSION" > "$CONSTRAINTS"

echo "llmcompressor: torch $TORCH_VERSION (CPU wheel)"
"${PIP[@]}" -c "$CONSTRAINTS" "torch==$TORCH_VERSION"
echo "llmcompressor: llmcompressor $LLMCOMPRESSOR_VERSION, $TRANSFORMERS_SPEC"
"${PIP[@]}" -c "$CONSTRAINTS" "llmcompressor==$LLMCOMPRESSOR_VERSION" "$TRANSFORMERS_SPEC"

echo "llmcompressor: this project (--no-deps), then those of its requirements llm-compressor's versions allow"
"${PIP[@]}" -c "$CONSTRAINTS" --no-deps -e .
LOCK="$VENV/llmcompressor-lock.txt"
"$VENV/bin/python" -m pip freeze --exclude-editable | grep -v -i '^quantize[= ]' > "$LOCK"
# One line per requirement of pyproject.toml: "ok REQ" (satisfied, or absent: installed below under
# the lock) or "conflict REQ VERSION" (llm-compressor installed VERSION, outside REQ).
VERDICTS=$("$VENV/bin/python" -c '
import importlib.metadata as md
import tomllib

from packaging.requirements import Requirement

for spec in tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]:
    req = Requirement(spec)
    name = str(req).replace(" ", "")
    try:
        have = md.version(req.name)
    except md.PackageNotFoundError:
        print("ok", name)
        continue
    print("ok" if req.specifier.contains(have, prereleases=True) else "conflict", name, have)
')
OURS=()
CONFLICTS=()
while read -r verdict req have; do
    if [ "$verdict" = ok ]; then OURS+=("$req"); else CONFLICTS+=("$req|$have"); fi
done <<< "$VERDICTS"
"${PIP[@]}" -c "$CONSTRAINTS" -c "$LOCK" "${OURS[@]}"

# pip check: this project's conflicting requirements may be reported, nothing else.
BROKEN=$("$VENV/bin/python" -m pip check | grep -v '^No broken requirements' || true)
for c in ${CONFLICTS[@]+"${CONFLICTS[@]}"}; do
    req=${c%|*}
    echo "llmcompressor: WARNING: this project requires $req, llm-compressor $LLMCOMPRESSOR_VERSION installed" \
         "${c#*|}; left so (benchmarks/ct_vs_llmcompressor.py runs only llm-compressor in $VENV)"
    BROKEN=$(printf '%s\n' "$BROKEN" | grep -v -i "^quantize .* has requirement ${req%%[<>=!~;]*}[<>=!~;]" || true)
done
if [ -n "$BROKEN" ]; then
    echo "llmcompressor: pip check failed:" >&2
    echo "$BROKEN" >&2
    exit 1
fi

# The torch we pinned is the torch we have, no triton, and llm-compressor imports.
"$VENV/bin/python" - "$TORCH_VERSION" <<'EOF'
import importlib.metadata as md
import importlib.util
import sys

want = sys.argv[1]
have = md.version("torch")
if have.split("+")[0] != want:
    sys.exit(f"llmcompressor: torch {have} installed, expected {want}")
if importlib.util.find_spec("triton") is not None:
    sys.exit("llmcompressor: triton is installed; this environment is CPU-only")
from llmcompressor import oneshot  # noqa: F401,E402
from llmcompressor.modifiers.gptq import GPTQModifier  # noqa: F401,E402

print("llmcompressor: torch", have, "| transformers", md.version("transformers"), "| llmcompressor",
      md.version("llmcompressor"), "| compressed-tensors", md.version("compressed-tensors"), "| accelerate",
      md.version("accelerate"))
EOF
touch "$STAMP"
