#!/usr/bin/env bash
# What a GPU session checks, as ONE call of the device tool (the CPU cannot show these):
#
#   scripts/gpu_kit.sh                                  # here: the wheels the device image lacks -> .whl/
#   run(command="scripts/gpu_session.sh", carry=[".whl"], timeout_s=600)
#
# On the device machine (its image's python3: torch + CUDA, transformers; nothing can be fetched):
#   1. MoE on the GPU: GPTQ and AWQ with the experts resident vs --expert-chunk 4 on a synthetic
#      Qwen3-MoE whose experts dominate (benchmarks/moe_device.py): identical bytes, peak device memory;
#   2. one Llama-3-70B-shaped layer on the GPU (benchmarks/layer70b.py --device cuda): the H200 figure;
#   3. exllamav2 (0.3.2, its CUDA extension built on first import with the image's nvcc) loads our EXL2
#      outputs of a synthetic Llama and a synthetic Qwen3-MoE: `quantize check --engine exllamav2`.
# Each step has its own time limit; the figures go to $OUT (they come back with the reply). Exit 1 if
# any step failed. Runs from the tree (PYTHONPATH), nothing of ours is installed there.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-/tmp/gpu-session}  # the device tool sets OUT
mkdir -p "$OUT"
PY=${PY:-python3}
failed=()
step() {  # step NAME SECONDS CMD...: one check, its output also in $OUT/NAME.txt
    local name=$1 secs=$2; shift 2
    echo "== $name (limit ${secs}s)"
    local t0=$SECONDS
    timeout "$secs" "$@" 2>&1 | tee "$OUT/$name.txt"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc in $((SECONDS - t0)) s"
    [ "$rc" -eq 0 ] || failed+=("$name")
}

[ -d .whl ] || { echo "no .whl/: run scripts/gpu_kit.sh here and carry .whl"; exit 2; }
"$PY" -m pip install -q --no-index --no-deps .whl/*.whl 2>&1 | grep -v -i warning | tail -3
"$PY" -c "import torch, transformers, quantize; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())" \
    || { echo "the device image cannot import the package"; exit 1; }

step moe_device 240 "$PY" benchmarks/moe_device.py --device cuda
step layer70b 180 "$PY" benchmarks/layer70b.py --device cuda --tokens 8x2048

exl2() {
    set -e
    local root=$OUT/exl2 text=calibration/wikitext2/valid.txt
    rm -rf "$root" && mkdir -p "$root"
    "$PY" - "$root" <<'EOF'
import sys
from pathlib import Path
sys.path.insert(0, "benchmarks")
import common as c
root = Path(sys.argv[1])
c.build_synthetic_llama(root / "llama", layers=2, hidden=1024, intermediate=2816, heads=8, kv_heads=2)
c.build_synthetic_moe(root / "qwen3_moe", layers=2, hidden=1024, moe_intermediate=512, experts=8, top_k=2, heads=8, kv_heads=2)
EOF
    "$PY" -c "import exllamav2.ext" # the extension's build, timed on its own
    for m in llama qwen3_moe; do
        "$PY" -m quantize sample --model "$root/$m" --dataset "$text" --samples 16 --seq-len 256 --out "$root/$m-cal"
        "$PY" -m quantize exl2 --model "$root/$m" --calibration "$root/$m-cal" --bpw 4.0 --device cuda --out "$root/$m-exl2"
        QUANTIZE_EXLLAMAV2_PYTHON=$(command -v "$PY") "$PY" -m quantize check "$root/$m-exl2" --engine exllamav2
    done
}
export PY OUT
export -f exl2
step exllamav2 420 bash -c exl2

echo "== failed: ${failed[*]:-none}"
[ ${#failed[@]} -eq 0 ]
