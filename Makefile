# Two commands do everything on a fresh machine:
#   make demo   -- create .venv, install, train the demo with the callbacks, print where the logs are
#   make test   -- create .venv, install, lint and run the whole test suite
#
# TORCH_SPEC picks the torch build. The default pins the CPU wheel this project is
# developed against; on a CUDA machine use e.g. `make test TORCH_SPEC=torch`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.gradguard-installed

.PHONY: demo test lint bench bench-clipping install clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[test,plots]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/demo.py

lint: $(STAMP)
	$(BIN)/ruff check lightning_gradguard tests examples benchmarks docs
	$(BIN)/ruff format --check lightning_gradguard tests examples benchmarks docs

test: lint
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[bench]"
	$(BIN)/python benchmarks/bench_overhead.py

bench-clipping: $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[bench]"
	$(BIN)/python benchmarks/bench_clipping.py

clean:
	rm -rf $(VENV) runs lightning_logs .pytest_cache .ruff_cache .hypothesis
