# One-command entry points for a fresh machine (Python 3.11, nothing else installed).
#   make demo   sets everything up and runs the main job on the embedded default
#   make test   sets everything up and runs the whole test suite (what CI runs)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DATA   ?= ../shared/prmbench/prmbench_preview.jsonl

.PHONY: setup test test-fast demo bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# The stamp is rebuilt whenever the pins, the build or the C++/CUDA sources change.
$(VENV)/.installed: $(BIN)/python requirements.txt setup.py pyproject.toml $(wildcard csrc/*)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -r requirements.txt
	$(BIN)/pip install --no-build-isolation --no-deps -e .
	touch $@

setup: $(VENV)/.installed

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

demo: setup
	$(BIN)/prmbench-fast evaluate --data $(DATA) --predictions examples/skywork7b_first1000_predictions.jsonl.gz --only-predicted \
		--output runs/demo/report.json

bench: setup
	$(BIN)/python bench/bench_evaluate.py --data $(DATA)

clean:
	rm -rf build *.egg-info prmbench_fast/_C*.so
