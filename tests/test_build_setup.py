"""setup.py's decisions, without building: which CUDA toolkit the extension is built with (fake folders and versions:
this machine has a CPU torch and a CUDA 13 nvcc), which packages the wheel holds, and the optional-import messages."""

from __future__ import annotations

import importlib.util
import pathlib
import re
import stat
import sys

import pytest

from conftest import REPO_ROOT, read_pyproject
from prmbench_fast.extras import MissingExtraError, require


def load_setup_module():
    # setup.py runs setup() only as __main__, so importing it under another name only defines its functions.
    spec = importlib.util.spec_from_file_location("prmbench_fast_setup_py", REPO_ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


setup_py = load_setup_module()


def versions(table: dict[str, str]):
    """A fake ``toolkit_version``: folder -> CUDA version; folders not in the table hold no toolkit."""
    return table.get


# -- the toolkit choice -----------------------------------------------------------------------------------------------
def test_mismatched_nvcc_on_path_is_passed_over_for_torchs_version():
    # The reported failure: torch built with CUDA 12.8, nvcc 13.0 first on PATH, /usr/local/cuda-12.8 installed.
    candidates = setup_py.cuda_toolkit_candidates(
        "12.8", {}, "/usr/local/cuda-13.0/bin/nvcc", ["/usr/local/cuda", "/usr/local/cuda-13.0", "/usr/local/cuda-12.8"]
    )
    found = versions({"/usr/local/cuda-13.0": "13.0", "/usr/local/cuda": "13.0", "/usr/local/cuda-12.8": "12.8"})
    choice = setup_py.choose_cuda_toolkit("12.8", candidates, found)
    assert choice.home == "/usr/local/cuda-12.8"
    assert "CUDA 12.8 toolkit at /usr/local/cuda-12.8" in choice.message


def test_only_a_mismatched_toolkit_skips_the_cuda_op_with_a_message():
    candidates = setup_py.cuda_toolkit_candidates("12.8", {}, "/usr/local/cuda-13.0/bin/nvcc", ["/usr/local/cuda-13.0"])
    choice = setup_py.choose_cuda_toolkit("12.8", candidates, versions({"/usr/local/cuda-13.0": "13.0"}))
    assert choice.home is None
    assert "no CUDA 12.x toolkit found for torch's CUDA 12.8" in choice.message
    assert "/usr/local/cuda-13.0 (nvcc on PATH): CUDA 13.0" in choice.message
    for part in ("CPU extension only", "torch reference", "CUDA_HOME"):
        assert part in choice.message


def test_force_turns_a_skip_into_an_error():
    candidates = [("nvcc on PATH", "/opt/cuda-13")]
    with pytest.raises(setup_py.ToolkitError, match=r"FORCE_CUDA is set, but no CUDA 12\.x toolkit .*CUDA_HOME"):
        setup_py.choose_cuda_toolkit("12.8", candidates, versions({"/opt/cuda-13": "13.0"}), force=True)
    with pytest.raises(setup_py.ToolkitError, match="torch is a CPU build"):
        setup_py.choose_cuda_toolkit(None, [], versions({}), force=True)


def test_cpu_torch_builds_the_cpu_extension_only():
    choice = setup_py.choose_cuda_toolkit(None, [], versions({}))
    assert choice.home is None and "torch is a CPU build" in choice.message


def test_skip_wins_over_a_matching_toolkit_and_over_force():
    candidates = [("$CUDA_HOME", "/opt/cuda")]
    choice = setup_py.choose_cuda_toolkit("12.8", candidates, versions({"/opt/cuda": "12.8"}), force=True, skip=True)
    assert choice.home is None and "PRMBENCH_FAST_SKIP_CUDA" in choice.message


def test_cuda_home_is_preferred_when_its_major_matches_even_if_its_minor_differs():
    # torch only warns about a minor difference; the user's explicit choice stands.
    env = {"CUDA_HOME": "/opt/cuda-12.4"}
    candidates = setup_py.cuda_toolkit_candidates("12.8", env, "/usr/local/cuda-12.8/bin/nvcc", ["/usr/local/cuda-12.8"])
    assert candidates[0] == ("$CUDA_HOME", "/opt/cuda-12.4")
    choice = setup_py.choose_cuda_toolkit("12.8", candidates, versions({"/opt/cuda-12.4": "12.4", "/usr/local/cuda-12.8": "12.8"}))
    assert choice.home == "/opt/cuda-12.4"


def test_a_mismatched_cuda_home_falls_through_to_a_matching_toolkit():
    env = {"CUDA_HOME": "/usr/local/cuda-13.0"}
    installed = ["/usr/local/cuda-13.0", "/usr/local/cuda-12.6"]
    candidates = setup_py.cuda_toolkit_candidates("12.8", env, None, installed)
    found = versions({"/usr/local/cuda-13.0": "13.0", "/usr/local/cuda-12.6": "12.6"})
    assert setup_py.choose_cuda_toolkit("12.8", candidates, found).home == "/usr/local/cuda-12.6"


def test_folders_without_a_toolkit_are_passed_over():
    # A wrapper script /usr/local/bin/nvcc makes torch guess CUDA_HOME=/usr/local, which has no CUDA headers.
    candidates = setup_py.cuda_toolkit_candidates("13.0", {}, "/usr/local/bin/nvcc", ["/usr/local/cuda", "/usr/local/cuda-13.0"])
    choice = setup_py.choose_cuda_toolkit("13.0", candidates, versions({"/usr/local/cuda-13.0": "13.0", "/usr/local/cuda": "13.0"}))
    assert choice.home == "/usr/local/cuda-13.0"  # the exact version comes before the PATH guess


def test_candidate_order_and_duplicates():
    env = {"CUDA_HOME": "/usr/local/cuda-12.8/", "CUDA_PATH": "/opt/cuda"}
    installed = ["/usr/local/cuda", "/usr/local/cuda-11.8", "/usr/local/cuda-12.8", "/usr/local/cuda-12.10", "/usr/local/cuda-12.6"]
    got = setup_py.cuda_toolkit_candidates("12.8", env, "/opt/cuda/bin/nvcc", installed)
    assert got == [
        ("$CUDA_HOME", "/usr/local/cuda-12.8"),
        ("$CUDA_PATH", "/opt/cuda"),
        ("the default folder", "/usr/local/cuda"),
        ("another installed toolkit", "/usr/local/cuda-12.10"),  # numeric order: 12.10 is newer than 12.6
        ("another installed toolkit", "/usr/local/cuda-12.6"),
        ("another installed toolkit", "/usr/local/cuda-11.8"),
    ]


def write_fake_toolkit(home: pathlib.Path, release: str, *, headers: bool = True) -> None:
    (home / "bin").mkdir(parents=True)
    nvcc = home / "bin" / "nvcc"
    nvcc.write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {release}, V{release}.1'\n")
    nvcc.chmod(nvcc.stat().st_mode | stat.S_IXUSR)
    if headers:
        (home / "include").mkdir()
        (home / "include" / "cuda_runtime.h").write_text("")


def test_toolkit_version_reads_nvcc_and_requires_the_headers(tmp_path):
    write_fake_toolkit(tmp_path / "cuda-12.8", "12.8")
    write_fake_toolkit(tmp_path / "wrapper", "13.0", headers=False)
    assert setup_py.toolkit_version(str(tmp_path / "cuda-12.8")) == "12.8"
    assert setup_py.toolkit_version(str(tmp_path / "wrapper")) is None
    assert setup_py.toolkit_version(str(tmp_path / "missing")) is None


@pytest.mark.parametrize(
    "toolkit, torch_cuda", [("13.0", "12.8"), ("12.4", "12.8"), ("12.8", "12.8"), ("12.8", "13.0"), ("13.2", "13.0")]
)
def test_the_rule_is_torchs_own_build_check(tmp_path, monkeypatch, toolkit, torch_cuda):
    # torch's check (run by BuildExtension before compiling) on the same fake toolkit: a choice must never fail it, and
    # a toolkit it accepts must not be passed over. The compiler-version bounds it also checks are not at issue here.
    torch = pytest.importorskip("torch")
    from torch.torch_version import TorchVersion
    from torch.utils import cpp_extension

    home = tmp_path / "cuda"
    write_fake_toolkit(home, toolkit)
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(home))
    monkeypatch.setattr(torch.version, "cuda", torch_cuda)
    monkeypatch.setenv("TORCH_DONT_CHECK_COMPILER_ABI", "1")
    try:
        cpp_extension._check_cuda_version("c++", TorchVersion("11.0"))
        torch_accepts = True
    except RuntimeError:
        torch_accepts = False
    ours = setup_py.choose_cuda_toolkit(torch_cuda, [("$CUDA_HOME", str(home))], setup_py.toolkit_version)
    assert (ours.home is not None) == torch_accepts


# -- packages ---------------------------------------------------------------------------------------------------------
def test_every_source_folder_is_a_package_and_kernels_install_under_prmbench_fast():
    packages, package_dir = setup_py.discover_packages()
    expected = {"prmbench_fast.kernels"}
    for top, name in ((REPO_ROOT / "prmbench_fast", "prmbench_fast"), (REPO_ROOT / "kernels", "prmbench_fast.kernels")):
        for source in top.rglob("*.py"):
            parts = source.parent.relative_to(top).parts
            if "__pycache__" not in parts:
                expected.add(".".join((name, *parts)))
    assert expected <= set(packages)
    assert "prmbench_fast.families" in packages
    assert not [p for p in packages if p == "kernels" or p.startswith("kernels.") or "__pycache__" in p]
    assert package_dir == {"prmbench_fast": "prmbench_fast", "prmbench_fast.kernels": "kernels"}


def test_new_folders_are_found_without_an_init_file(tmp_path):
    for folder in ("prmbench_fast/tasks", "prmbench_fast/report/templates", "kernels/extra", "prmbench_fast/__pycache__"):
        (tmp_path / folder).mkdir(parents=True)
    packages, _ = setup_py.discover_packages(str(tmp_path))
    assert packages == [
        "prmbench_fast", "prmbench_fast.kernels", "prmbench_fast.kernels.extra", "prmbench_fast.report",
        "prmbench_fast.report.templates", "prmbench_fast.tasks",
    ]  # fmt: skip


# -- optional dependencies --------------------------------------------------------------------------------------------
def test_require_names_the_extra_to_install():
    assert require("json", "critic", "x") is sys.modules["json"]
    with pytest.raises(MissingExtraError, match=r"LLM critics .* pip install 'prmbench-fast\[critic\]'") as info:
        require("surely_not_installed_module", "critic", "LLM critics")
    assert isinstance(info.value, ImportError) and info.value.name == "surely_not_installed_module"


def test_require_does_not_hide_a_broken_installation(tmp_path, monkeypatch):
    # The module exists but one of *its* imports is missing: that error is not "install the extra".
    (tmp_path / "half_installed.py").write_text("import surely_not_installed_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="surely_not_installed_dependency"):
        require("half_installed", "report", "the report")


def test_every_require_call_names_a_declared_extra_that_lists_the_module():
    extras = read_pyproject()["project"]["optional-dependencies"]
    declared = {extra: {re.split(r"[<>=!~;\[ ]", req)[0].lower() for req in reqs} for extra, reqs in extras.items()}
    calls = []
    for source in (REPO_ROOT / "prmbench_fast").rglob("*.py"):
        calls += re.findall(r"require\(\s*(?:module,|\"([\w.]+)\",)\s*\"([\w-]+)\"", source.read_text())
    assert calls, "no require() calls found"
    for module, extra in calls:
        assert extra in declared, f"require(..., {extra!r}) names an extra that pyproject.toml does not declare"
        if module:
            assert module.split(".")[0].lower() in declared[extra], f"[{extra}] does not install {module}"
    for module in ("gguf", "accelerate"):  # models.py loops over these
        assert module in declared["default-model"]
