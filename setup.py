"""Build of prmbench_fast and its compiled extension ``prmbench_fast._C``.

Metadata lives in pyproject.toml; this file holds what needs code: package discovery (kernels/ installs as
``prmbench_fast.kernels``) and the extension.

The extension uses LibTorch's stable ABI and Python's limited API only, so one build (``_C.abi3.so``) loads under every
torch from :data:`OLDEST_TORCH` on and every CPython from :data:`OLDEST_PYTHON` on, whichever torch it was built with.
The CPU implementation of the ops is always built. The CUDA implementation is added only when the installed torch is
a CUDA build (with a CPU torch, ``CUDAExtension`` cannot link: no c10_cuda) and a CUDA toolkit of torch's CUDA major
version is found: torch refuses to build with a toolkit of another major version, so a mismatched nvcc on PATH must
not fail ``pip install``. Without a matching toolkit the CUDA op is skipped with a printed message; CUDA tensors are
then counted by the torch reference (prmbench_fast/ops.py says so once, at the first such call). Nothing here probes
for a GPU: the toolkit is recognised by its files and ``nvcc --version``.

Switches (environment variables):
    PRMBENCH_FAST_FORCE_CUDA=1  fail instead of skipping the CUDA op when it cannot be built (CPU torch, no matching
                                toolkit).
    PRMBENCH_FAST_SKIP_CUDA=1   build the CPU extension only, even with a CUDA torch.
    CUDA_HOME / CUDA_PATH       the toolkit to try first (see cuda_toolkit_candidates for the whole order).
    MAX_JOBS=N                  parallel compile jobs (read by torch's BuildExtension / ninja).
"""

from __future__ import annotations

import glob
import os
import re
import subprocess
import sys
from typing import Callable, Iterable, Mapping, NamedTuple

from setuptools import find_namespace_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))

# Data files shipped inside the package (wheel and sdist), in every subpackage: task id lists, published leaderboard
# numbers, report templates. Kept to data suffixes so that a stale in-place build (prmbench_fast/_C*.so) never ships.
PACKAGE_DATA = ["*.json", "*.jsonl", "*.jsonl.gz", "*.tsv", "*.csv", "*.txt", "*.html", "*.css", "*.js", "py.typed"]


def _flag(name: str, env: Mapping[str, str] = os.environ) -> bool:
    return env.get(name, "0").lower() in ("1", "true", "yes", "on")


# -- packages ---------------------------------------------------------------------------------------------------------
def discover_packages(root: str = ROOT) -> tuple[list[str], dict[str, str]]:
    """Every package under prmbench_fast/ and kernels/ (the latter installed as prmbench_fast.kernels).

    Namespace discovery: a folder is a package whether or not it has an ``__init__.py`` yet, so no subpackage (and no
    data-only folder) can be left out of the wheel. Returns ``(packages, package_dir)`` for ``setup()``.
    """
    exclude = ["*.__pycache__", "*.__pycache__.*"]
    packages = find_namespace_packages(where=root, include=["prmbench_fast", "prmbench_fast.*"], exclude=exclude)
    kernels = find_namespace_packages(where=os.path.join(root, "kernels"), exclude=["__pycache__", *exclude])
    if "prmbench_fast.kernels" in packages:
        raise RuntimeError("prmbench_fast/kernels/ would shadow the top-level kernels/ folder; keep Triton kernels in kernels/")
    packages += ["prmbench_fast.kernels", *(f"prmbench_fast.kernels.{name}" for name in kernels)]
    # A top-level `kernels` package would collide with the unrelated `kernels` distribution on PyPI.
    return sorted(packages), {"prmbench_fast": "prmbench_fast", "prmbench_fast.kernels": "kernels"}


# -- CUDA toolkit choice ----------------------------------------------------------------------------------------------
class ToolkitChoice(NamedTuple):
    """``home`` is the CUDA toolkit to build with, or None for the CPU extension only; ``message`` says why."""

    home: str | None
    message: str


class ToolkitError(RuntimeError):
    """PRMBENCH_FAST_FORCE_CUDA=1 was set but the CUDA op cannot be built."""


def _major_minor(version: str) -> tuple[int, int]:
    major, minor = (version.split(".") + ["0"])[:2]
    return int(major), int(minor)


def cuda_toolkit_candidates(
    torch_cuda: str, env: Mapping[str, str], nvcc_on_path: str | None, installed: Iterable[str]
) -> list[tuple[str, str]]:
    """Folders that may hold a CUDA toolkit for a torch built with CUDA ``torch_cuda``, in order of preference,
    each as ``(where it came from, folder)``, without duplicates.

    Order: ``$CUDA_HOME``, ``$CUDA_PATH`` (the user's choice), ``/usr/local/cuda-<torch major.minor>`` (the exact
    version), the toolkit of ``nvcc`` on PATH, ``/usr/local/cuda``, then the other installed ``/usr/local/cuda-*``,
    newest first. ``installed`` lists the existing ``/usr/local/cuda*`` folders; ``nvcc_on_path`` is the resolved path
    of ``nvcc`` found on PATH (or None).
    """
    candidates = []
    for name in ("CUDA_HOME", "CUDA_PATH"):
        if env.get(name):
            candidates.append((f"${name}", env[name]))
    installed = list(installed)
    major, minor = _major_minor(torch_cuda)
    exact = f"/usr/local/cuda-{major}.{minor}"
    if exact in installed:
        candidates.append(("torch's CUDA version", exact))
    if nvcc_on_path:
        candidates.append(("nvcc on PATH", os.path.dirname(os.path.dirname(nvcc_on_path))))
    if "/usr/local/cuda" in installed:
        candidates.append(("the default folder", "/usr/local/cuda"))
    versioned = [path for path in installed if re.fullmatch(r"/usr/local/cuda-\d+\.\d+", path)]
    for path in sorted(versioned, key=lambda p: _major_minor(p.rsplit("-", 1)[1]), reverse=True):
        candidates.append(("another installed toolkit", path))
    unique, seen = [], set()
    for where, home in candidates:
        home = os.path.normpath(home)
        if home not in seen:
            seen.add(home)
            unique.append((where, home))
    return unique


def choose_cuda_toolkit(
    torch_cuda: str | None,
    candidates: list[tuple[str, str]],
    toolkit_version: Callable[[str], str | None],
    *,
    force: bool = False,
    skip: bool = False,
) -> ToolkitChoice:
    """The first candidate toolkit whose CUDA major version equals torch's (torch's own check refuses any other major;
    a different minor only warns), or None with the reason.

    Args:
        torch_cuda: ``torch.version.cuda`` ("12.8"), None for a CPU torch.
        candidates: ``(where, folder)`` pairs in order of preference (:func:`cuda_toolkit_candidates`).
        toolkit_version: the "major.minor" CUDA version of the toolkit in a folder, None when the folder holds none.
        force: PRMBENCH_FAST_FORCE_CUDA: raise :class:`ToolkitError` instead of returning ``home=None``.
        skip: PRMBENCH_FAST_SKIP_CUDA: CPU extension only (wins over ``force``).
    """
    fallback = "CUDA tensors are then counted by the torch reference"
    if skip:
        return ToolkitChoice(None, f"PRMBENCH_FAST_SKIP_CUDA is set: building the CPU extension only; {fallback}")
    if torch_cuda is None:
        reason = "torch is a CPU build (torch.version.cuda is None)"
        if force:
            raise ToolkitError(f"PRMBENCH_FAST_FORCE_CUDA is set, but {reason}: install a CUDA build of torch")
        return ToolkitChoice(None, f"{reason}: building the CPU extension only")
    wanted = _major_minor(torch_cuda)[0]
    seen = []
    for where, home in candidates:
        version = toolkit_version(home)
        if version is not None and _major_minor(version)[0] == wanted:
            return ToolkitChoice(
                home, f"building the CUDA op with the CUDA {version} toolkit at {home} ({where}); torch uses CUDA {torch_cuda}"
            )
        seen.append(f"{home} ({where}): {'CUDA ' + version if version else 'no toolkit'}")
    tried = "; ".join(seen) if seen else "none found"
    reason = f"no CUDA {wanted}.x toolkit found for torch's CUDA {torch_cuda} (tried: {tried})"
    if force:
        raise ToolkitError(f"PRMBENCH_FAST_FORCE_CUDA is set, but {reason}; set CUDA_HOME to a CUDA {wanted}.x toolkit")
    return ToolkitChoice(
        None,
        f"{reason}: skipping the CUDA op and building the CPU extension only; {fallback}. To build it, set CUDA_HOME to "
        f"a CUDA {wanted}.x toolkit and reinstall.",
    )


def toolkit_version(home: str) -> str | None:
    """The CUDA version ("13.0") of the toolkit in ``home``, read from ``nvcc --version`` as torch's own check reads
    it; None unless ``home`` holds both ``bin/nvcc`` and the headers (``include/cuda_runtime.h``)."""
    nvcc = os.path.join(home, "bin", "nvcc")
    if not (os.access(nvcc, os.X_OK) and os.path.isfile(os.path.join(home, "include", "cuda_runtime.h"))):
        return None
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"release (\d+\.\d+)", out)
    return found.group(1) if found else None


def _which_nvcc() -> str | None:
    from shutil import which

    nvcc = which("nvcc")
    return os.path.realpath(nvcc) if nvcc else None


# -- extension --------------------------------------------------------------------------------------------------------
#: The oldest torch the extension supports: csrc/ uses LibTorch's stable ABI only, compiled for this version
#: (TORCH_TARGET_VERSION), so the binary loads under it and every later torch. pyproject.toml's torch floor must match
#: (tests/test_build_setup.py checks it).
OLDEST_TORCH = (2, 10)
#: The oldest CPython: the module is built for Python's limited API (abi3) of this version, and loads under later ones.
OLDEST_PYTHON = (3, 10)


def stable_abi_macros(
    torch_version: tuple[int, int] = OLDEST_TORCH, python: tuple[int, int] = OLDEST_PYTHON
) -> list[str]:
    """Compiler definitions that make one binary load under every torch >= ``torch_version`` and every CPython >=
    ``python``: the stable-ABI target version (major in bits 56-63, minor in 48-55, as torch/csrc/stable/version.h
    encodes it), TORCH_STABLE_ONLY (torch's headers then refuse to be mixed with its unstable C++ API), and the
    limited Python API."""
    major, minor = torch_version
    return [
        f"-DTORCH_TARGET_VERSION=0x{(major << 56) | (minor << 48):016x}",
        "-DTORCH_STABLE_ONLY",
        f"-DPy_LIMITED_API=0x{python[0]:02x}{python[1]:02x}0000",
    ]


def check_build_torch(version: str) -> None:
    """Refuse a torch older than :data:`OLDEST_TORCH` at build time (its headers lack the stable ABI the op uses)."""
    found = _major_minor(version.split("+")[0])
    if found < OLDEST_TORCH:
        oldest = ".".join(map(str, OLDEST_TORCH))
        sys.exit(f"prmbench_fast: building needs torch >= {oldest} (LibTorch stable ABI); the installed one is {version}")


def _extension(cuda_home: str | None):
    # Imported only now: torch.utils.cpp_extension reads CUDA_HOME once, at import.
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cxx_flags = ["-O3", "-std=c++17", *stable_abi_macros()]
    if cuda_home is None:
        return CppExtension(
            "prmbench_fast._C", cpp_sources, extra_compile_args={"cxx": cxx_flags}, py_limited_api=True
        )
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    return CUDAExtension(
        "prmbench_fast._C",
        cpp_sources + cuda_sources,
        extra_compile_args={"cxx": [*cxx_flags, "-DUSE_CUDA"], "nvcc": nvcc_flags()},
        py_limited_api=True,
    )


def nvcc_flags() -> list[str]:
    """nvcc's flags for csrc/*.cu (tests/test_cuda_compile.py compiles with the same). USE_CUDA declares the CUDA part
    of the stable C shim (the current stream)."""
    return ["-O3", "-std=c++17", "-DUSE_CUDA", *stable_abi_macros()]


def main() -> None:
    import torch

    check_build_torch(torch.__version__)
    torch_cuda = torch.version.cuda
    candidates = []
    if torch_cuda is not None:
        installed = [p for p in glob.glob("/usr/local/cuda*") if os.path.isdir(p)]
        candidates = cuda_toolkit_candidates(torch_cuda, os.environ, _which_nvcc(), installed)
    try:
        choice = choose_cuda_toolkit(
            torch_cuda,
            candidates,
            toolkit_version,
            force=_flag("PRMBENCH_FAST_FORCE_CUDA"),
            skip=_flag("PRMBENCH_FAST_SKIP_CUDA"),
        )
    except ToolkitError as err:
        sys.exit(f"prmbench_fast: {err}")
    # pip shows a build's output only with -v or on failure; stderr is where such a note belongs either way.
    print(f"prmbench_fast: {choice.message}", file=sys.stderr)
    if choice.home is not None:
        os.environ["CUDA_HOME"] = choice.home
        import torch.utils.cpp_extension as cpp_extension

        cpp_extension.CUDA_HOME = choice.home  # in case it was imported (and read CUDA_HOME) before
    from torch.utils.cpp_extension import BuildExtension

    packages, package_dir = discover_packages()
    setup(
        packages=packages,
        package_dir=package_dir,
        package_data={"": PACKAGE_DATA},
        ext_modules=[_extension(choice.home)],
        cmdclass={"build_ext": BuildExtension},
        options={"bdist_wheel": {"py_limited_api": "cp310"}},
    )


# setuptools' build backend and `python setup.py` run this file as __main__; tests import it for the functions above.
if __name__ == "__main__":
    main()
