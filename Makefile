# `make demo` and `make test` work on a fresh machine: each creates .venv when missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The CPU wheel this machine has locally; only installed when torch is not importable.
TORCH_VERSION ?= 2.13.0

.PHONY: demo simulate test bench clean

# --system-site-packages: a torch already installed for the system (e.g. a CUDA build) is used.
$(BIN)/python:
	$(PY) -m venv --system-site-packages $(VENV)

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==$(TORCH_VERSION)
	$(BIN)/pip install -q -e '.[test,models,serve,ray]'
	touch $(STAMP)

# The server on tiny random-weight presets (CPU workers), a short mixed load over HTTP; then
# genserve vs the best baseline on 8 emulated H200 GPUs (about 35 s), SLO attainment per model.
demo: $(STAMP)
	$(BIN)/genserve demo --out demo-output

# All policies on a simulated 8-GPU cluster with the shipped H200 profile.
simulate: $(STAMP)
	$(BIN)/genserve simulate --gpus 8 --rate 0.08 --duration 3600 --video-share 0.2 \
		--slo-scale 2 --arrival gamma --cv 2 --seed 0 \
		--policy fcfs,sjf,edf,static,tetriserve,genserve

test: $(STAMP)
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python bench/canonical.py

clean:
	rm -rf $(VENV) build *.egg-info
