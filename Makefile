# Everything installs into .venv from nothing: `make demo` (the main job), `make test`, `make lint`.
# It installs the versions the suite last passed with: constraints.txt (held by hand) and
# constraints-lock.txt (every other package, written by `make lock`).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
EXTRAS := .[dev,demo,transformers,rl]

.PHONY: demo test test-floor test-latest lock lint schema fuzz clean

$(STAMP): pyproject.toml constraints.txt constraints-lock.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt -c constraints-lock.txt -e '$(EXTRAS)'
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
	tests/test_fused_support.py tests/test_kind_plugin.py tests/test_dtensor.py
FLOOR_SELECT ?= torch_compile or loss_kind_matches_reference or without_gradient or test_fused_regressions \
	or test_fused_support or fused_chunks or only_the_gradients or test_kind_plugin or test_dtensor

$(FLOOR_STAMP): pyproject.toml constraints-floor.txt
	$(PYTHON) -m venv $(FLOOR_VENV)
	$(FLOOR_VENV)/bin/pip install -q --no-cache-dir -c constraints-floor.txt -e '.[dev]'
	touch $(FLOOR_STAMP)

test-floor: $(FLOOR_STAMP)
	TRITON_INTERPRET=1 $(FLOOR_VENV)/bin/python -m pytest -q -m "not slow" $(FLOOR_TESTS) -k "$(FLOOR_SELECT)"

# The newest release of every package but those constraints.txt holds, in .venv-latest, as a user's fresh
# install gets them: a weekly job (not in .ci/run), so that a new release that breaks lossgraph shows up
# here before a user meets it.
LATEST_VENV ?= .venv-latest

test-latest:
	rm -rf $(LATEST_VENV)
	$(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/pip install -q --no-cache-dir -c constraints.txt -e '$(EXTRAS)'
	TRITON_INTERPRET=1 $(LATEST_VENV)/bin/python -m pytest -q
	touch $(LATEST_VENV)/.passed

# After test-latest passed: pin what it installed, so `make test` and CI install exactly that.
lock: $(LATEST_VENV)/.passed
	{ echo "# Written by \`make lock\` after \`make test-latest\` passed on Python $$($(LATEST_VENV)/bin/python -c 'import platform; print(platform.python_version())'), $$(date -u +%Y-%m-%d)."; \
	  echo "# \`make test\` and CI install these versions; constraints.txt holds torch, triton and numpy by hand."; \
	  echo "# The marker leaves Python 3.10 free: most of these releases need 3.11 or newer."; \
	  $(LATEST_VENV)/bin/pip freeze --exclude-editable | grep -viE '^(torch|triton|numpy)==' \
	    | sed 's/$$/; python_version >= "3.11"/'; } > constraints-lock.txt

$(LATEST_VENV)/.passed:
	@echo "make lock pins what make test-latest installed once its suite passed: run make test-latest first" >&2
	@exit 1

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
	rm -rf $(VENV) $(FLOOR_VENV) $(LATEST_VENV) *.egg-info .pytest_cache .ruff_cache
