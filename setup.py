"""Build of prmbench_fast and its compiled extension ``prmbench_fast._C``.

The CPU implementation of the ops is always built (with OpenMP, without which ``at::parallel_for`` silently runs on one
thread). The CUDA implementation is added only when the installed torch is a CUDA build: with a CPU torch,
``CUDAExtension`` cannot link (no c10_cuda). Nothing here probes for a GPU.

Switches (environment variables):
    PRMBENCH_FAST_FORCE_CUDA=1  build the CUDA sources even where nvcc is not found on PATH (CUDA_HOME must be set).
    PRMBENCH_FAST_SKIP_CUDA=1   build the CPU extension only, even with a CUDA torch.
    MAX_JOBS=N                  parallel compile jobs (read by torch's BuildExtension / ninja).
"""

import glob
import os
import shutil

import torch
from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes")


def _build_cuda() -> bool:
    if _flag("PRMBENCH_FAST_SKIP_CUDA") or torch.version.cuda is None:
        return False
    return _flag("PRMBENCH_FAST_FORCE_CUDA") or shutil.which("nvcc") is not None


def _extension():
    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cxx_flags = ["-O3", "-fopenmp", "-std=c++17"]
    if not _build_cuda():
        return CppExtension(
            "prmbench_fast._C",
            cpp_sources,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
            py_limited_api=True,
        )
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    return CUDAExtension(
        "prmbench_fast._C",
        cpp_sources + cuda_sources,
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++17"]},
        extra_link_args=["-fopenmp"],
        py_limited_api=True,
    )


setup(
    packages=["prmbench_fast", "prmbench_fast.kernels"],
    # The Triton kernels live in the top-level kernels/ folder but install as prmbench_fast.kernels: a top-level
    # `kernels` package would collide with the unrelated `kernels` distribution on PyPI.
    package_dir={"prmbench_fast": "prmbench_fast", "prmbench_fast.kernels": "kernels"},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
