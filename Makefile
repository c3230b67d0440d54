# The README's two commands: `make run` (the demo workflow) and `make test` (the whole suite).
# Both set up their own environment on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup setup-lf setup-vllm browser run test lint report bench clean demo

setup: $(STAMP)

# LLaMA-Factory and vLLM each need their own venv (conflicting transformers pins). Recipe measured in
# ../shared/reference/feasibility.md: CPU torch first, the spec as its own constraints file, then drop the
# CUDA torchvision/torchaudio/torchcodec wheels (they break imports); LLaMA-Factory gets a torchaudio stub.
# `workflow` is installed (editable, no deps) so `python -m workflow.llm.vllm_offline` runs from any directory.
VENV_LF    ?= .venv-lf
VENV_VLLM  ?= .venv-vllm
LF_STAMP   := $(VENV_LF)/.installed
VLLM_STAMP := $(VENV_VLLM)/.installed

setup-lf: $(LF_STAMP)
setup-vllm: $(VLLM_STAMP)

$(LF_STAMP): envs/llamafactory.txt envs/torchaudio_stub.py
	rm -rf $(VENV_LF)
	$(PYTHON) -m venv $(VENV_LF)
	$(VENV_LF)/bin/pip install -q $$(grep -E '^torch==' envs/llamafactory.txt)
	$(VENV_LF)/bin/pip install -q -r envs/llamafactory.txt -c envs/llamafactory.txt
	$(VENV_LF)/bin/pip uninstall -y -q torchvision torchaudio torchcodec
	SP=$$($(VENV_LF)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') && \
	  mkdir -p $$SP/torchaudio && cp envs/torchaudio_stub.py $$SP/torchaudio/__init__.py
	$(VENV_LF)/bin/pip install -q --no-deps -e .
	$(VENV_LF)/bin/llamafactory-cli version
	touch $@

$(VLLM_STAMP): envs/vllm.txt
	rm -rf $(VENV_VLLM)
	$(PYTHON) -m venv $(VENV_VLLM)
	$(VENV_VLLM)/bin/pip install -q $$(grep -E '^torch==' envs/vllm.txt)
	$(VENV_VLLM)/bin/pip install -q -r envs/vllm.txt -c envs/vllm.txt
	$(VENV_VLLM)/bin/pip uninstall -y -q torchvision torchaudio torchcodec
	$(VENV_VLLM)/bin/pip install -q --no-deps -e .
	$(VENV_VLLM)/bin/python -c 'import vllm; print("vllm", vllm.__version__)'
	touch $@

$(STAMP): envs/core.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r envs/core.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $@

# The review page's end-to-end test (tests/test_review.py) drives Debian's headless Chromium through
# Selenium; installed once (skipped when chromedriver is already there), with sudo unless root.
CHROMEDRIVER := /usr/bin/chromedriver
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

browser: $(CHROMEDRIVER)

$(CHROMEDRIVER):
	$(SUDO) apt-get update && $(SUDO) DEBIAN_FRONTEND=noninteractive apt-get install -y chromium chromium-driver

run: setup
	$(BIN)/snakemake --cores all $(if $(CONFIG),--configfile $(CONFIG))

test: setup $(LF_STAMP) $(VLLM_STAMP) $(CHROMEDRIVER)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/snakefmt --check Snakefile rules/
	$(BIN)/snakemake --lint
	$(BIN)/pytest tests --durations=20

# `make report CONFIG=cluster.yaml`: the report must be told the configuration the run used.
report: run
	$(BIN)/snakemake --report report.html $(if $(CONFIG),--configfile $(CONFIG))

bench: setup
	$(BIN)/python -m bench.run

# Regenerate the committed synthetic demo corpus (deterministic; tests/test_synth.py checks it is current).
demo: setup
	rm -rf data/demo/files data/demo/*.gz data/demo/*.zip data/demo/*.parquet
	$(BIN)/python -m tools.synth --out data/demo --studies 300 --patients 100 --seed 0

clean:
	rm -rf results logs .snakemake report.html
