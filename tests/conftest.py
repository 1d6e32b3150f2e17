"""Test configuration shared by every test module.

TRITON_INTERPRET must be set before any ``@triton.jit`` decorator runs, i.e. before prmbench_fast is imported:
there is no GPU on the development and CI machines, so the Triton kernels run in the interpreter on CPU tensors.
"""

import os
import pathlib

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"
PRMBENCH_JSONL = SHARED / "prmbench" / "prmbench_preview.jsonl"
FIXTURES = SHARED / "prmbench" / "fixtures"


@pytest.fixture(scope="session")
def prmbench_jsonl() -> pathlib.Path:
    """The full benchmark file from ../shared (never copied into the repository)."""
    if not PRMBENCH_JSONL.exists():
        pytest.fail(f"benchmark data not found at {PRMBENCH_JSONL}: tests need ../shared beside the checkout")
    return PRMBENCH_JSONL
