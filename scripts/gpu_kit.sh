#!/usr/bin/env bash
# The kit a GPU session carries to the device machine (see scripts/gpu_session.sh): the wheels its
# image lacks, into .whl/ (git-ignored). Run it here, where the package index is reachable; the
# device machine reaches nothing. Its image (python3.12, torch 2.11 + CUDA 13, transformers 5.17,
# safetensors, numpy, pyyaml, tqdm, sentencepiece, ninja, nvcc) lacks pydantic, compressed-tensors,
# gguf and exllamav2 (a pure-Python wheel: its CUDA extension is built on first import, with the
# image's nvcc and ninja).
#
#   scripts/gpu_kit.sh          # then: run(command="scripts/gpu_session.sh", carry=[".whl"])
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=${PIP:-.venv/bin/pip}
rm -rf .whl && mkdir -p .whl
TARGET=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any)
# pydantic with its own pins (pydantic-core must match it exactly); the rest without dependencies:
# the image holds them, and compressed-tensors' own (torch, transformers) must not be replaced
"$PIP" download -q -d .whl "${TARGET[@]}" "pydantic>=2.6,<3"
"$PIP" download -q -d .whl --no-deps "${TARGET[@]}" "compressed-tensors>=0.20,<0.21" "gguf>=0.19,<0.20" \
    "exllamav2==0.3.2"
rm -f .whl/typing_extensions-*.whl  # the image's is newer than pydantic's floor
ls -1 .whl
du -sh .whl
