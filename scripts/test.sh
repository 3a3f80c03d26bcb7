#!/usr/bin/env bash
# The test command (`make test`): the unit tier, then every engine tier whose virtualenv is built.
#
#   scripts/test.sh [all|unit|engines]      (default all)
#
# unit     .venv: every test not marked `interop` (no engine needed; ~12-17 min on 2 cores).
# engines  the interop tiers, each in the interpreter that holds its engine:
#          .venv           tests marked `interop` that run an engine in a subprocess (`quantize check`
#                          with vLLM in .venv-vllm and llama.cpp in .venv-llamacpp), PEFT and
#                          bitsandbytes merges;
#          .venv-interop   GPTQModel/optimum load our GPTQ/AWQ (scripts/setup_interop.sh);
#          .venv-llamacpp  llama.cpp loads and runs our GGUF (scripts/setup_llamacpp.sh).
#          A tier whose virtualenv is absent is reported as skipped, and a test whose engine is absent
#          skips with the reason -- unless QUANTIZE_REQUIRE_ENGINES lists it (CI: .ci/run), where
#          either is a failure. `make engines` builds them all.
#
# QUANTIZE_ENGINES_BUILD_RC=FILE (set by .ci/run, which builds the engines while the unit tier runs):
# the engine phase first waits for FILE (the exit status of that build) and fails if it is not 0.
# Exit status: non-zero if any tier failed (pytest's 5, no tests collected, counts as a failure).
set -uo pipefail
cd "$(dirname "$0")/.."

PHASE=${1:-all}
PYTEST=(-m pytest -q -p no:cacheprovider -rs)
GPTQMODEL_TIER=(tests/test_interop_gptq.py tests/test_interop_awq.py tests/test_interop_moe.py)
LLAMACPP_TIER=(tests/test_interop_llamacpp.py tests/test_interop_llamacpp_moe.py tests/test_gguf_container.py)
failed=()

run() {  # run NAME PYTHON ARGS...: one pytest run; exit 5 (nothing collected) is a failure
    local name=$1 python=$2
    shift 2
    echo "== tier $name: $python ${*}"
    local start=$SECONDS
    "$python" "${PYTEST[@]}" "$@"
    local rc=$?
    echo "== tier $name: exit $rc in $((SECONDS - start)) s"
    [ $rc -eq 0 ] || failed+=("$name (exit $rc)")
}

required() { [[ ",${QUANTIZE_REQUIRE_ENGINES:-}," == *",$1,"* ]]; }

venv_tier() {  # venv_tier NAME VENV SETUP FILES...: the tier in its engine's virtualenv, where built
    local name=$1 venv=$2 setup=$3
    shift 3
    if [ -x "$venv/bin/python" ]; then
        GPTQMODEL_CPU_WORKERS=${GPTQMODEL_CPU_WORKERS:-2} run "$name" "$venv/bin/python" -m interop "$@"
    elif required "$venv"; then
        echo "error: tier $name: $venv is required here (QUANTIZE_REQUIRE_ENGINES) but absent ($setup builds it)" >&2
        failed+=("$name (absent)")
    else
        echo "== tier $name: skipped, $venv absent ($setup builds it; \`make engines\` builds every engine)"
    fi
}

if [ "$PHASE" = all ] || [ "$PHASE" = unit ]; then
    # (no engine is required here: the engine tiers' modules are collected, then deselected)
    QUANTIZE_REQUIRE_ENGINES= run unit .venv/bin/python -m "not interop" tests
fi

if [ "$PHASE" = all ] || [ "$PHASE" = engines ]; then
    if [ -n "${QUANTIZE_ENGINES_BUILD_RC:-}" ]; then
        echo "== waiting for the engine environments (make engines: ${QUANTIZE_ENGINES_BUILD_LOG:-its log})"
        while [ ! -f "$QUANTIZE_ENGINES_BUILD_RC" ]; do sleep 5; done
        if [ "$(cat "$QUANTIZE_ENGINES_BUILD_RC")" != 0 ]; then
            echo "error: make engines failed (exit $(cat "$QUANTIZE_ENGINES_BUILD_RC"))" >&2
            [ -n "${QUANTIZE_ENGINES_BUILD_LOG:-}" ] && tail -n 40 "$QUANTIZE_ENGINES_BUILD_LOG" >&2
            exit 1
        fi
    fi
    ignore=()
    for f in "${GPTQMODEL_TIER[@]}" "${LLAMACPP_TIER[@]}"; do ignore+=("--ignore=$f"); done
    run engines-subprocess .venv/bin/python -m interop tests "${ignore[@]}"
    venv_tier gptqmodel .venv-interop scripts/setup_interop.sh "${GPTQMODEL_TIER[@]}"
    venv_tier llama.cpp .venv-llamacpp scripts/setup_llamacpp.sh "${LLAMACPP_TIER[@]}"
fi

if [ ${#failed[@]} -gt 0 ]; then
    echo "FAILED tiers: ${failed[*]}" >&2
    exit 1
fi
echo "all tiers passed"
