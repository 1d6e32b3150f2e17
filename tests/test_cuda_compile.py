"""Compile-check of the CUDA sources: no GPU and no CUDA torch here, so nvcc -c is the only check they get.

Flags follow /work/shared/docs/TOOLCHAIN.md: torch's headers need ``-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE`` with a CPU
torch, and are passed with ``-isystem`` so their own warnings do not bury ours. The .cu files include only light
ATen/c10 headers; each compiles in ~15-30 s here (``<torch/extension.h>`` would cost ~75 s).
"""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import sysconfig
import time

import pytest
from torch.utils.cpp_extension import include_paths

CSRC = pathlib.Path(__file__).resolve().parents[1] / "csrc"
NVCC = shutil.which("nvcc")
# Any CUDA-capable arch exercises the device code; sm_90 also checks the 64-bit shared-memory atomics.
ARCH = "sm_90"

pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH")


def torch_includes() -> list[str]:
    flags = []
    for path in [*include_paths(), sysconfig.get_paths()["include"]]:
        flags += ["-isystem", path]
    return flags


def run_compiler(command: list[str], record_property, source: pathlib.Path) -> None:
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    record_property(f"compile_seconds[{source.name}]", round(time.perf_counter() - start, 1))
    assert result.returncode == 0, f"{' '.join(command)}\nfailed with code {result.returncode}:\n{result.stderr}"


@pytest.mark.parametrize("source", sorted(CSRC.glob("*.cu")), ids=lambda path: path.name)
def test_cuda_source_compiles(source, tmp_path, record_property):
    command = [
        NVCC, "-c", str(source), "-o", str(tmp_path / (source.stem + ".o")),
        "-std=c++17", f"-arch={ARCH}", "-O3", "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE", *torch_includes(),
    ]  # fmt: skip
    run_compiler(command, record_property, source)


def test_there_are_cuda_sources():
    # Without this, a renamed csrc folder would turn the parametrized test above into a silent empty pass.
    assert sorted(CSRC.glob("*.cu")), f"no .cu files under {CSRC}"

