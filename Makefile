# Quick start: `make demo` (set up, train the report's best network) and `make test` (set up, run the tests).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Use the project's shared copy of MNIST when it sits beside the checkout and nothing else is set;
# otherwise mnistlab looks in its cache and downloads.
export MNISTLAB_DATA ?= $(if $(wildcard ../shared/data/mnist/SHA256SUMS),$(abspath ../shared/data/mnist),)

.PHONY: install install-dev demo serve test test-quick lint reproduce bench clean

# The stamp files make `make install` a no-op when nothing it depends on changed.
$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python pyproject.toml requirements.lock
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements.lock
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed requirements-dev.lock
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements-dev.lock
	touch $@

install: $(VENV)/.installed

install-dev: $(VENV)/.installed-dev

demo: install
	$(BIN)/mnistlab train --config seed-b --out runs/demo --force

# The draw-a-digit page with the bundled model on http://127.0.0.1:8000/ (Ctrl-C to stop).
serve: install
	$(BIN)/mnistlab serve

# The whole suite, as CI runs it (.ci/run).
test: install-dev
	$(BIN)/python -m pytest

# The edit loop: every test but those marked slow (training for more than a few seconds).
test-quick: install-dev
	$(BIN)/python -m pytest -m "not slow"

lint: install-dev
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

reproduce: install
	$(BIN)/mnistlab reproduce --out runs/reproduce

bench: install
	$(BIN)/python benchmarks/epoch_speed.py

clean:
	rm -rf $(VENV) runs build dist src/*.egg-info
