# The two commands a newcomer needs: `make demo` and `make test`. Both set up
# .venv themselves from a fresh clone (Python >= 3.10 and pip are all it takes).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck pytest format docs clean bench

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/asgi-matomo demo

test: lint typecheck docs pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/python -m pytest --cov --cov-branch --cov-report=term-missing $(PYTEST_ARGS)

# Delivery benchmarks (not part of `make test`): needs wrk (apt-get install -y wrk)
# and matplotlib in .venv for the plot; about 15 minutes on 2 cores.
bench: $(STAMP)
	$(BIN)/python bench/bench_overhead.py
	$(BIN)/python bench/bench_throughput.py --plot bench/throughput.png

# The documentation site, built the way CI checks it (warnings are errors).
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .coverage* .mypy_cache .pytest_cache .ruff_cache site
