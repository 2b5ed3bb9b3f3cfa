# `make train` and `make test` each set everything up on a fresh machine (a .venv here) and then run.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: train test install clean

# pip's own lines (Collecting / Downloading / Installing) show what is being installed; the bars are off so that
# logs (CI) stay readable. The elapsed time is printed at the end.
$(STAMP): pyproject.toml
	@echo ">>> Setting up $(VENV) from pyproject.toml: torch and torchvision (with torch's CUDA libraries: about"
	@echo ">>> 3 GB to download on a first install, 6-7 GB installed), lightning, hydra-core, torch-fidelity,"
	@echo ">>> datasets, wandb, scikit-learn, diffusers and the test tools. A few minutes; pip's cache makes reruns faster."
	@start=$$(date +%s) && \
	{ test -x $(BIN)/python || $(PYTHON) -m venv $(VENV); } && \
	$(BIN)/python -m pip install --progress-bar off --upgrade pip && \
	$(BIN)/python -m pip install --progress-bar off -e '.[dev]' && \
	touch $(STAMP) && \
	echo ">>> $(VENV) ready in $$(( $$(date +%s) - start )) s"

install: $(STAMP)

## The default run: a DDPM on the embedded 8x8 digits (README: time measured and on which CPU; the run logs its own
## estimate after 20 steps). Extra Hydra overrides: ARGS="..."
train: $(STAMP)
	$(BIN)/diffusion-lab-train $(ARGS)

## The test suite (CPU, no network).
test: $(STAMP)
	$(BIN)/python -m pytest $(ARGS)

clean:
	rm -rf $(VENV) runs multirun outputs .pytest_cache
