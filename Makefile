# The two commands of the README. Each creates/updates its own virtual environment.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test test-fast venv lint

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

venv: $(BIN)/.installed

run: venv
	$(BIN)/sparsetrace run $(ARGS)

lint: venv
	$(BIN)/ruff check src tests benchmarks scripts examples
	$(BIN)/ruff format --check src tests benchmarks scripts examples

# pytest exits 5 when it collected no test: that is a failure here, as any non-zero code is.
test: lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The fast tier: every test module, without the end-to-end trainings (under 2 minutes on 2 cores).
test-fast: lint
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)
