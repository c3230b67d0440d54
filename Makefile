# The README's two commands: `make run` (the demo workflow) and `make test` (the whole suite).
# Both set up their own environment on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup run test lint report bench clean

setup: $(STAMP)

$(STAMP): envs/core.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r envs/core.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $@

run: setup
	$(BIN)/snakemake --cores all

test: setup
	$(BIN)/ruff check .
	$(BIN)/snakemake --lint
	$(BIN)/pytest tests

report: run
	$(BIN)/snakemake --report report.html

bench: setup
	$(BIN)/python -m bench.run

clean:
	rm -rf results logs .snakemake report.html
