"""bench/gpu_check.py (``make gpu-check``): its no-GPU exit and its label verdict.

The check itself needs a CUDA GPU; here it must say so in one line and exit 2, without a traceback.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torch

from conftest import REPO_ROOT

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


def test_label_differences_must_sit_at_the_threshold():
    gpu_check = _gpu_check_module()
    official = {"a": ([True, False, True], [0.9, 0.5, 0.501]), "b": ([False], [0.2])}
    same = gpu_check.compare_labels(official, official)
    assert same == {"identical": True, "steps": 4, "differing": 0, "max_distance_to_threshold_of_a_difference": 0.0,
                    "within_margin": True}  # fmt: skip
    # One bf16 tie at 0.5 read as positive by the fp32 path, one label just above it: bf16 rounding, accepted.
    near = {"a": ([True, True, False], [0.9, 0.5002, 0.499]), "b": ([False], [0.2])}
    verdict = gpu_check.compare_labels(near, official)
    assert (verdict["identical"], verdict["differing"], verdict["within_margin"]) == (False, 2, True)
    # A flipped label far from the threshold is a real error.
    far = {"a": ([True, False, True], [0.9, 0.5, 0.501]), "b": ([True], [0.7])}
    assert gpu_check.compare_labels(far, official)["within_margin"] is False
    # A missing label is an error whatever the values.
    short = {"a": ([True, False], [0.9, 0.5]), "b": ([False], [0.2])}
    assert gpu_check.compare_labels(short, official)["within_margin"] is False
