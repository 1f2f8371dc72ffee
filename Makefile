# The two commands of the README. Each creates/updates its own virtual environment.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test venv lint

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
