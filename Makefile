# The two commands a newcomer needs: `make demo` and `make test`. Both set up
# .venv themselves from a fresh clone (Python >= 3.10 and pip are all it takes).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The demo needs the library and a server only (the `demo` extra), not the
# development toolchain: its own stamp, so `make test` still installs `.[dev]`
# after `make demo`, and `make demo` after `make test` installs nothing new.
DEMO_STAMP := $(VENV)/.demo-installed

.PHONY: demo test lint typecheck pytest format docs clean bench

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# pip is upgraded only when the one the venv came with cannot install the
# project in editable mode (pip < 21.3): the upgrade costs more than the demo.
$(DEMO_STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[demo]' \
		|| { $(BIN)/python -m pip install --quiet --upgrade pip \
		&& $(BIN)/python -m pip install --quiet -e '.[demo]'; }
	touch $(DEMO_STAMP)

demo: $(DEMO_STAMP)
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
