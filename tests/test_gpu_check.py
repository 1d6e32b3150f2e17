"""bench/gpu_check.py (``make gpu-check``): what can be checked without a GPU.

Its no-GPU exit; the GPU machine's missing packages (datasets, openai, matplotlib) are never imported; a phase that
raises is recorded and the others still run, with the JSON rewritten atomically after each; the label verdict.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import torch

from conftest import PRMBENCH_JSONL, REPO_ROOT

SCRIPT = REPO_ROOT / "bench" / "gpu_check.py"


def _gpu_check_module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a CUDA machine the script runs the whole check")
def test_without_cuda_says_so_and_exits_2():
    result = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, cwd=REPO_ROOT)
    assert result.returncode == 2
    assert result.stdout.strip().splitlines() == [
        "gpu_check: no CUDA GPU is visible (torch.cuda.is_available() is False); nothing was checked"
    ]
    assert "Traceback" not in result.stderr and result.stderr.strip() == ""


# Every module the phases import, loaded with datasets, openai and matplotlib made unimportable (as on the GPU
# machine): an import of one of them anywhere in the chain fails here.
IMPORT_CHAIN = """
import importlib.abc, importlib.util, sys
class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("datasets", "openai", "matplotlib", "gguf"):
            raise ImportError(f"{name} is not installed on the GPU machine")
sys.meta_path.insert(0, Absent())
spec = importlib.util.spec_from_file_location("gpu_check", sys.argv[1])
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)
sys.path.insert(0, sys.argv[2])
import bench_score
import prmbench_fast, prmbench_fast.families.lm_judge, prmbench_fast.kernels.step_reward, prmbench_fast.ops
import prmbench_fast.packing, prmbench_fast.reference, prmbench_fast.testing.tiny_models, prmbench_fast.token_cache
import transformers, triton.testing
from transformers import Qwen2Config, Qwen2ForCausalLM
dataset = gpu_check.evaluation_set(sys.argv[3])
print(len(dataset), sorted(m for m in ("datasets", "openai", "matplotlib", "gguf") if m in sys.modules))
"""


def test_the_phases_import_nothing_the_gpu_machine_lacks(tmp_path):
    # From a folder outside the checkout, so that `prmbench_fast` is the installed package (the editable install here,
    # the wheel under .ci/test-stack), never the bare source tree that `python -c` would put first on sys.path.
    result = subprocess.run(
        [sys.executable, "-c", IMPORT_CHAIN, str(SCRIPT), str(REPO_ROOT / "bench"), str(PRMBENCH_JSONL)],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["442", "[]"]


def test_a_failing_phase_is_recorded_and_the_others_run(tmp_path):
    gpu_check = _gpu_check_module()
    output = tmp_path / "out" / "gpu_check.json"
    results = gpu_check.Results(output)
    seen = []

    def broken():
        seen.append(json.loads(output.read_text()))  # the JSON of the phases before, already complete
        raise RuntimeError("the CUDA op has no kernel\nsecond line")

    assert results.run("first", lambda: {"value": 1}) == {"value": 1}
    assert results.run("second", broken) is None
    results.run("third", lambda: {"passed": False})
    data = json.loads(output.read_text())
    assert seen == [{"phases": {"first": {"status": "passed", "value": 1, "seconds": data["phases"]["first"]["seconds"]}}}]
    assert [(name, phase["status"]) for name, phase in data["phases"].items()] == [
        ("first", "passed"), ("second", "error"), ("third", "failed")
    ]
    error = data["phases"]["second"]["error"]
    assert error["type"] == "RuntimeError" and error["message"] == "the CUDA op has no kernel\nsecond line"
    assert "in broken" in error["traceback"] and "RuntimeError" in error["traceback"]
    assert not results.passed
    assert [p.name for p in output.parent.iterdir()] == ["gpu_check.json"]  # no temporary file left behind
    gpu_check.print_table(data)  # the table prints whatever the phases left


def test_the_synthetic_batch_is_one_packed_batch():
    gpu_check = _gpu_check_module()
    batch = gpu_check._synthetic_batch(2048, 500, sample_tokens=256, device="cpu")
    assert batch.num_tokens == 2048 and batch.cu_seqlens.tolist() == list(range(0, 2049, 256))


def test_labels_are_compared_only_beyond_rounding_reach():
    gpu_check = _gpu_check_module()
    bound = gpu_check.ROUNDING_BOUND
    official = {"a": ([True, False, True], [0.9, 0.5, 0.5 + bound / 2]), "b": ([False], [0.2])}
    same = gpu_check.compare_labels(official, official)
    assert (same["steps"], same["compared"], same["near_threshold"], same["disagreeing"], same["passed"]) == (
        4, 2, 2, 0, True
    )
    # Within the bound of 0.5, a label may flip by rounding: counted, not compared.
    near = {"a": ([True, True, False], [0.9, 0.5 + bound / 4, 0.5 - bound / 4]), "b": ([False], [0.2])}
    verdict = gpu_check.compare_labels(near, official)
    assert (verdict["compared"], verdict["near_threshold"], verdict["disagreeing"], verdict["passed"]) == (2, 2, 0, True)
    # A flipped label far from the threshold is a real error, and so is a probability moved by more than the bound
    # even when no label flips.
    far = {"a": official["a"], "b": ([True], [0.7])}
    assert gpu_check.compare_labels(far, official)["disagreeing"] == 1
    moved = {"a": official["a"], "b": ([False], [0.2 + 2 * bound])}
    verdict = gpu_check.compare_labels(moved, official)
    assert verdict["disagreeing"] == 0 and not verdict["passed"]
    # A missing label is an error whatever the values.
    short = {"a": ([True, False], [0.9, 0.5]), "b": ([False], [0.2])}
    assert gpu_check.compare_labels(short, official)["passed"] is False
