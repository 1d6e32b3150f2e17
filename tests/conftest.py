"""Test configuration shared by every test module.

Without CUDA (the development and CI machines) the Triton kernels run in the interpreter on CPU tensors:
TRITON_INTERPRET must then be set before any ``@triton.jit`` decorator runs, i.e. before prmbench_fast is imported.
With CUDA it stays unset, so the kernels compile for the GPU and the ``gpu`` tests (tests/test_gpu.py) run them there;
tests that need the interpreter skip themselves. ``torch.cuda.is_available()`` initialises no CUDA context.

With PRMBENCH_FAST_INSTALLED_WHEEL=1 (.ci/test-stack) the suite runs against a wheel installed into another stack and
refuses to start if ``prmbench_fast`` would come from the source tree.

Markers (registered in pyproject.toml): ``gpu`` tests are always collected and skipped without CUDA; ``slow`` and
``aot_full`` (the full ahead-of-time compile sweep, minutes) run in the whole suite (``make test``, CI) and are left
out by ``make test-fast``.
"""

import os
import pathlib
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"
PRMBENCH_JSONL = SHARED / "prmbench" / "prmbench_preview.jsonl"
SUBSET400_JSONL = SHARED / "prmbench" / "subset400_official.jsonl"
FIXTURES = SHARED / "prmbench" / "fixtures"
#: Set by .ci/test-stack: the suite tests an installed wheel under another stack, never the source tree.
INSTALLED_WHEEL = os.environ.get("PRMBENCH_FAST_INSTALLED_WHEEL") == "1"


def read_pyproject() -> dict:
    """The repository's pyproject.toml, parsed (tomllib from Python 3.11, its backport tomli on 3.10)."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:
        import tomli as tomllib
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


@pytest.fixture(scope="session")
def prmbench_jsonl() -> pathlib.Path:
    """The full benchmark file from ../shared (never copied into the repository)."""
    if not PRMBENCH_JSONL.exists():
        pytest.fail(f"benchmark data not found at {PRMBENCH_JSONL}: tests need ../shared beside the checkout")
    return PRMBENCH_JSONL


@pytest.fixture(scope="session")
def subset400_jsonl() -> pathlib.Path:
    """The official subset400 task's own data file (394 rows of the full data), from ../shared."""
    if not SUBSET400_JSONL.exists():
        pytest.fail(f"subset400 data not found at {SUBSET400_JSONL}: tests need ../shared beside the checkout")
    return SUBSET400_JSONL


def pytest_configure(config):
    if INSTALLED_WHEEL:
        import prmbench_fast

        where = pathlib.Path(prmbench_fast.__file__).resolve()
        if REPO_ROOT in where.parents:
            raise pytest.UsageError(
                f"PRMBENCH_FAST_INSTALLED_WHEEL is set but prmbench_fast was imported from the source tree ({where}); "
                "run pytest from a folder outside the repository (.ci/test-stack does)"
            )


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
