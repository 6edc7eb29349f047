# The two commands of the README:
#   make demo   installs into .venv and runs the whole pipeline at demo scale (CPU, minutes)
#   make test   installs into .venv (with the dev extra) and runs the tests
PYTHON ?= python3
VENV   ?= .venv
CORES  ?= 2
BIN    := $(VENV)/bin

.PHONY: demo test install lint clean-demo

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,keops]'
	touch $@

install: $(BIN)/.installed

# the rules call `sashimi ...`: put the virtualenv first on PATH
demo: install
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/snakemake --cores $(CORES) all

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check src tests

clean-demo:
	rm -rf results/runs results/logs data/prepared .snakemake
