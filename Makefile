# Everything installs into .venv from nothing: `make demo` (the main job), `make test`, `make lint`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint schema fuzz clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt -e '.[dev,demo,transformers]'
	touch $(STAMP)

# DEMO_ARGS passes options through, e.g. make demo DEMO_ARGS="--steps 50 --out /tmp/demo"
demo: $(STAMP)
	$(BIN)/lossgraph demo $(DEMO_ARGS)

test: $(STAMP)
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check lossgraph kernels tests benchmarks examples
	$(BIN)/ruff format --check lossgraph kernels tests benchmarks examples

schema: $(STAMP)
	$(BIN)/lossgraph schema -o schemas/lossgraph.schema.json

# The long fuzz of the YAML front door (make test runs a fixed slice): FUZZ_EXAMPLES random documents
# through `lossgraph validate`; prints the counts, time per document, slowest document and peak memory.
FUZZ_EXAMPLES ?= 10000
fuzz: $(STAMP)
	$(BIN)/python tests/test_fuzz_documents.py $(FUZZ_EXAMPLES)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
