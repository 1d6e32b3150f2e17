"""Compile-check of the CUDA sources: no GPU and no CUDA torch here, so nvcc -c is the only check they get.

The flags are setup.py's own (``nvcc_flags()``: the stable-ABI target version and ``USE_CUDA``); torch's headers are
passed with ``-isystem`` so their own warnings do not bury ours. The .cu files include only stable-ABI headers.

Device code is built for sm_80 and sm_90 with ``-Xptxas -v``, whose report of every kernel must show no stack frame
and no spills (step_confusion: 34-44 registers).
"""

from __future__ import annotations

import pathlib
import re
import shutil
import subprocess
import sysconfig
import time

import pytest
from torch.utils.cpp_extension import include_paths

from test_build_setup import setup_py

CSRC = pathlib.Path(__file__).resolve().parents[1] / "csrc"
NVCC = shutil.which("nvcc")
# The archs the package targets (A100, H100 class); sm_90 also checks the 64-bit shared-memory atomics.
ARCHS = ("80", "90")
# ptxas -v, per kernel and arch: "Compiling entry function '<name>' for 'sm_90'" and then
# "<n> bytes stack frame, <n> bytes spill stores, <n> bytes spill loads".
ENTRY = re.compile(r"Compiling entry function '(\S+)' for '(sm_\d+)'")
FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")

pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH")


def torch_includes() -> list[str]:
    flags = []
    for path in [*include_paths(), sysconfig.get_paths()["include"]]:
        flags += ["-isystem", path]
    return flags


def run_compiler(command: list[str], record_property, source: pathlib.Path) -> str:
    """Runs nvcc; returns its stderr (where ptxas -v reports)."""
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    record_property(f"compile_seconds[{source.name}]", round(time.perf_counter() - start, 1))
    assert result.returncode == 0, f"{' '.join(command)}\nfailed with code {result.returncode}:\n{result.stderr}"
    return result.stderr


def kernel_frames(ptxas_report: str) -> dict[tuple[str, str], tuple[int, int, int]]:
    """(kernel, arch) -> (stack frame, spill stores, spill loads) bytes, from ``ptxas -v``."""
    frames, entry = {}, None
    for line in ptxas_report.splitlines():
        if match := ENTRY.search(line):
            entry = match.groups()
        elif (match := FRAME.search(line)) and entry is not None:
            frames[entry] = tuple(map(int, match.groups()))
            entry = None
    return frames


@pytest.mark.parametrize("source", sorted(CSRC.glob("*.cu")), ids=lambda path: path.name)
def test_cuda_source_compiles_without_spills(source, tmp_path, record_property):
    gencode = [flag for arch in ARCHS for flag in ("-gencode", f"arch=compute_{arch},code=sm_{arch}")]
    command = [
        NVCC, "-c", str(source), "-o", str(tmp_path / (source.stem + ".o")), *setup_py.nvcc_flags(), *gencode,
        "-Xptxas", "-v", *torch_includes(),
    ]  # fmt: skip
    frames = kernel_frames(run_compiler(command, record_property, source))
    # Every kernel of the file is reported for every arch (at least one kernel: a parse that found none proves nothing).
    assert frames and {arch for _, arch in frames} == {f"sm_{arch}" for arch in ARCHS}
    spilling = {kernel: frame for kernel, frame in frames.items() if frame != (0, 0, 0)}
    assert not spilling, f"stack frame / spill stores / spill loads (bytes): {spilling}"


def test_ptxas_report_is_parsed():
    report = (
        "ptxas info    : Compiling entry function '_Z1kPi' for 'sm_80'\n"
        "ptxas info    : Function properties for _Z1kPi\n"
        "    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads\n"
    )
    assert kernel_frames(report) == {("_Z1kPi", "sm_80"): (8, 4, 4)}


def test_there_are_cuda_sources():
    # Without this, a renamed csrc folder would turn the parametrized test above into a silent empty pass.
    assert sorted(CSRC.glob("*.cu")), f"no .cu files under {CSRC}"

