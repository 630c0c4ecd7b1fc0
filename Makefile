# `make demo` and `make test` work on a fresh machine: each creates .venv when missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/genserve simulate --gpus 8 --rate 0.08 --duration 3600 --video-share 0.2 \
		--slo-scale 2 --arrival gamma --cv 2 --seed 0 \
		--policy fcfs,sjf,edf,static,tetriserve,genserve

test: $(STAMP)
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python bench/canonical.py

clean:
	rm -rf $(VENV) build *.egg-info
