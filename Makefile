# Everything installs into .venv from nothing: `make demo` (the main job), `make test`, `make lint`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-floor lint schema fuzz clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt -e '.[dev,demo,transformers]'
	touch $(STAMP)

# DEMO_ARGS passes options through, e.g. make demo DEMO_ARGS="--steps 50 --out /tmp/demo"
demo: $(STAMP)
	$(BIN)/lossgraph demo $(DEMO_ARGS)

test: $(STAMP)
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q

# The torch floor (pyproject.toml: torch>=2.11) in a second venv: the torch.compile and fused-op tests
# through Triton's interpreter on torch 2.11.0 (a CUDA build from PyPI: several GB, a few minutes).
FLOOR_VENV ?= .venv-floor
FLOOR_STAMP := $(FLOOR_VENV)/.installed
FLOOR_TESTS ?= tests/test_fused_backend.py tests/test_fused_regressions.py tests/test_linear_heads.py \
	tests/test_fused_support.py tests/test_kind_plugin.py
FLOOR_SELECT ?= torch_compile or loss_kind_matches_reference or without_gradient or test_fused_regressions \
	or test_fused_support or fused_chunks or only_the_gradients or test_kind_plugin

$(FLOOR_STAMP): pyproject.toml constraints-floor.txt
	$(PYTHON) -m venv $(FLOOR_VENV)
	$(FLOOR_VENV)/bin/pip install -q --no-cache-dir -c constraints-floor.txt -e '.[dev]'
	touch $(FLOOR_STAMP)

test-floor: $(FLOOR_STAMP)
	TRITON_INTERPRET=1 $(FLOOR_VENV)/bin/python -m pytest -q -m "not slow" $(FLOOR_TESTS) -k "$(FLOOR_SELECT)"

lint: $(STAMP)
	$(BIN)/ruff check lossgraph kernels tests benchmarks examples
	$(BIN)/ruff format --check lossgraph kernels tests benchmarks examples

schema: $(STAMP)
	$(BIN)/lossgraph schema -o schemas/lossgraph.schema.json

# The long fuzz (make test runs a fixed slice of each): FUZZ_EXAMPLES random documents through
# `lossgraph validate` (prints the counts, time per document, slowest document and peak memory), then
# GRAPH_FUZZ_EXAMPLES random valid graphs on both backends (about a second each on two cores).
FUZZ_EXAMPLES ?= 10000
GRAPH_FUZZ_EXAMPLES ?= 300
fuzz: $(STAMP)
	$(BIN)/python tests/test_fuzz_documents.py $(FUZZ_EXAMPLES)
	GRAPH_FUZZ_EXAMPLES=$(GRAPH_FUZZ_EXAMPLES) TRITON_INTERPRET=1 $(BIN)/python -m pytest -q tests/test_fuzz_graphs.py

clean:
	rm -rf $(VENV) $(FLOOR_VENV) *.egg-info .pytest_cache .ruff_cache
