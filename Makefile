# `make train` and `make test` each set everything up on a fresh machine (a .venv here) and then run.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: train test install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## The default run: a DDPM on the embedded 8x8 digits, ~12 minutes on a 2-core CPU. Extra Hydra overrides: ARGS="..."
train: $(STAMP)
	$(BIN)/diffusion-lab-train $(ARGS)

## The test suite (CPU, no network).
test: $(STAMP)
	$(BIN)/python -m pytest $(ARGS)

clean:
	rm -rf $(VENV) runs multirun outputs .pytest_cache
