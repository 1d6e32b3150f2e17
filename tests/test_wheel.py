"""The package as users install it: a wheel built from the working tree, installed into a throwaway venv, used from a
folder outside the repository.

Every other test imports the editable install, which reads the source folders directly and hides a wheel that misses a
subpackage or a data file (issue #13: ``prmbench_fast.families`` was missing from the wheel). Here:

- the wheel is built from a copy of the working tree (tracked and untracked, not ignored files, so no stale ``build/``
  or in-place ``_C*.so`` can leak in), with probe files added: a new subpackage without ``__init__.py`` in both
  prmbench_fast/ and kernels/, and data files, to show that discovery and the package-data rule are generic;
- the wheel must hold every module and data file of prmbench_fast/ and kernels/ (as ``prmbench_fast.kernels``), the
  compiled extension and the LICENSE, and nothing else at top level;
- it is installed without dependencies into a venv that reuses the test environment's packages through a ``.pth``
  path line (offline, seconds) -- a path line does not run that folder's own ``.pth`` files, so the editable install of
  prmbench_fast there stays inactive, and every import is checked to come from the throwaway venv;
- from outside the repository: every module of the installed package is imported, ``prmbench-fast evaluate`` runs on
  the bundled example, and ``score()`` runs on a tiny model; both agree with the working tree.

The sdist route (``python -m build``: sdist, then a wheel built from the sdist; ``twine check``) compiles the extension
a second time and is marked slow.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import time
import zipfile

import pytest

from conftest import INSTALLED_WHEEL, PRMBENCH_JSONL, REPO_ROOT

EXAMPLE = REPO_ROOT / "examples" / "skywork7b_first1000_predictions.jsonl.gz"

# Under .ci/test-stack the wheel under test is already installed (built once in the pinned environment); building
# another one from the tree with the stack's torch would test something else.
pytestmark = pytest.mark.skipif(INSTALLED_WHEEL, reason="the installed wheel is under test (.ci/test-stack)")

# Added to the copy of the working tree only. Names start with "_wheel_probe" so they cannot clash with real modules.
PROBES = {
    "prmbench_fast/_wheel_probe/probe.py": "VALUE = 1\n",  # a new subpackage, no __init__.py yet
    "prmbench_fast/_wheel_probe/ids.json": "[1, 2, 3]\n",
    "prmbench_fast/_wheel_probe/nested/leaderboard.tsv": "model\tOverall\n",
    "prmbench_fast/_wheel_probe_notes.txt": "data file at the package root\n",
    "kernels/_wheel_probe/probe_kernel.py": "VALUE = 2\n",
}

# Imports every module of the installed prmbench_fast (found by pkgutil and, for namespace subpackages that pkgutil
# does not enter, by their files), then reports where each one came from.
IMPORT_ALL = r"""
import importlib, json, pathlib, pkgutil, sys
import prmbench_fast, prmbench_fast.ops

root = pathlib.Path(prmbench_fast.__file__).parent
names = {m.name for m in pkgutil.walk_packages(prmbench_fast.__path__, "prmbench_fast.")}
walked = sorted(names)
for path in root.rglob("*.py"):
    parts = path.relative_to(root.parent).with_suffix("").parts
    if "__pycache__" not in parts:
        names.add(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
files = {}
for name in sorted(names - {"prmbench_fast.__main__"}):
    module = importlib.import_module(name)
    files[name] = getattr(module, "__file__", None) or list(module.__path__)[0]
print(json.dumps({
    "prefix": sys.prefix, "files": files, "walked": walked, "has_extension": prmbench_fast.ops.HAS_C_EXTENSION,
    "extension": getattr(sys.modules.get("prmbench_fast._C"), "__file__", None),
}))
"""

SCORE = r"""
import json, sys
import prmbench_fast
from prmbench_fast import load_prmbench, score

data = load_prmbench(sys.argv[1], limit_per_class=1)
report = score(sys.argv[2], data, family="generic", max_length=256, progress=False)
scores = {sid: r["scores"]["step_level_validity_scores"] for sid, r in report.predictions.items()}
print(json.dumps({"package": prmbench_fast.__file__, "samples": len(data), "scores": scores}))
"""


def setup_module_functions():
    spec = importlib.util.spec_from_file_location("prmbench_fast_setup_py", REPO_ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PACKAGE_DATA = setup_module_functions().PACKAGE_DATA


def run(command: list, **options) -> subprocess.CompletedProcess:
    result = subprocess.run([str(c) for c in command], capture_output=True, text=True, **options)
    assert result.returncode == 0, (
        f"{' '.join(map(str, command))} exited with {result.returncode}\n"
        f"--- stdout (tail)\n{result.stdout[-4000:]}\n--- stderr (tail)\n{result.stderr[-6000:]}"
    )
    return result


def clean_env(**extra: str) -> dict[str, str]:
    """The environment for the installed package: the test run's (TRITON_INTERPRET as conftest chose it), offline,
    with nothing pointing at the repository."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env.update(extra)
    return env


def copy_working_tree(dest: pathlib.Path) -> None:
    """The files a commit of the working tree would hold: tracked and untracked-but-not-ignored files."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=REPO_ROOT, capture_output=True, check=True,
        ).stdout.decode().split("\0")  # fmt: skip
    except (OSError, subprocess.CalledProcessError):  # not a git checkout (e.g. an unpacked sdist)
        ignore = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "*.so", "runs")
        shutil.copytree(REPO_ROOT, dest, ignore=ignore)
        return
    for name in filter(None, listed):
        source = REPO_ROOT / name
        if source.is_file():  # a tracked file deleted in the working tree is not part of it
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)


def expected_wheel_files(tree: pathlib.Path) -> set[str]:
    """Wheel paths of every module and data file under prmbench_fast/ and kernels/ of ``tree``."""
    expected = set()
    for folder, installed_as in (("prmbench_fast", "prmbench_fast"), ("kernels", "prmbench_fast/kernels")):
        for path in (tree / folder).rglob("*"):
            if not path.is_file() or "__pycache__" in path.parts:
                continue
            if path.suffix == ".py" or any(fnmatch.fnmatch(path.name, pattern) for pattern in PACKAGE_DATA):
                expected.add(f"{installed_as}/{path.relative_to(tree / folder).as_posix()}")
    return expected


def metadata_field(metadata: str, field: str) -> str:
    return next(line.split(": ", 1)[1] for line in metadata.splitlines() if line.startswith(f"{field}: "))


def make_throwaway_venv(path: pathlib.Path) -> pathlib.Path:
    """A venv without pip whose sys.path ends with the test environment's site-packages; returns its python."""
    run([sys.executable, "-m", "venv", "--without-pip", path])
    python = path / "bin" / "python"
    site_dir = pathlib.Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    reused = dict.fromkeys(sysconfig.get_paths()[key] for key in ("purelib", "platlib"))
    (site_dir / "_reuse_test_environment.pth").write_text("".join(f"{p}\n" for p in reused))
    return python


def install_wheel(wheel: pathlib.Path, venv: pathlib.Path) -> pathlib.Path:
    python = make_throwaway_venv(venv)
    run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", wheel])
    return python


def assert_inside(path: str, venv: pathlib.Path) -> None:
    assert pathlib.Path(path).resolve().is_relative_to(venv.resolve()), f"{path} is not inside the throwaway venv {venv}"


def check_installed_package(python: pathlib.Path, venv: pathlib.Path, outside: pathlib.Path) -> dict:
    """Import every module of the installed package from ``outside`` the repository; returns where they came from."""
    found = json.loads(run([python, "-c", IMPORT_ALL], cwd=outside, env=clean_env()).stdout)
    assert pathlib.Path(found["prefix"]).resolve() == venv.resolve()
    for name, file in found["files"].items():
        assert_inside(file, venv)
    assert found["has_extension"], "prmbench_fast._C did not load from the wheel"
    assert_inside(found["extension"], venv)
    assert set(found["walked"]) <= set(found["files"])
    for name in ("prmbench_fast.families", "prmbench_fast.kernels.step_reward", "prmbench_fast.scoring", "prmbench_fast.cli"):
        assert name in found["files"]
    return found


def check_evaluate_command(venv: pathlib.Path, outside: pathlib.Path, expected: dict) -> None:
    out = outside / "report.json"
    command = [
        venv / "bin" / "prmbench-fast", "evaluate", "--data", PRMBENCH_JSONL, "--predictions", EXAMPLE,
        "--only-predicted", "--output", out,
    ]  # fmt: skip
    printed = run(command, cwd=outside, env=clean_env()).stdout
    written = json.loads(out.read_text())
    assert printed.split()[0] == "Overall"
    assert written["official"] == expected["official"] and written["table"] == expected["table"]


@pytest.fixture(scope="module")
def working_tree_wheel(tmp_path_factory):
    """(wheel, source copy, seconds to build) for the working tree plus the probes."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    copy_working_tree(source)
    for name, text in PROBES.items():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_text(text)
    start = time.perf_counter()
    # An absolute path: a bare folder name would be looked up on the package index.
    run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "--no-index", "--wheel-dir",
         root / "dist", source.resolve()])  # fmt: skip
    seconds = time.perf_counter() - start
    (wheel,) = (root / "dist").glob("prmbench_fast-*.whl")
    return wheel, source, seconds


@pytest.fixture(scope="module")
def evaluate_expected(prmbench_jsonl, tmp_path_factory):
    """The working tree's (editable install's) report on the bundled example."""
    from prmbench_fast.cli import main

    out = tmp_path_factory.mktemp("evaluate") / "report.json"
    assert main(["evaluate", "--data", str(prmbench_jsonl), "--predictions", str(EXAMPLE), "--only-predicted",
                 "--output", str(out)]) == 0  # fmt: skip
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def tiny_model_folder(prmbench_jsonl, tmp_path_factory):
    from prmbench_fast import load_prmbench
    from prmbench_fast.testing.tiny_models import tiny_llama, train_tokenizer

    subset = load_prmbench(prmbench_jsonl, limit_per_class=1)
    tokenizer = train_tokenizer([s.question for s in subset] + [step for s in subset for step in s.steps])
    folder = tmp_path_factory.mktemp("tiny") / "model"
    tiny_llama(len(tokenizer), head="token_classification").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_wheel_holds_every_module_data_file_and_the_extension(working_tree_wheel, record_property):
    wheel, source, seconds = working_tree_wheel
    record_property("wheel_build_seconds", round(seconds, 1))
    record_property("wheel_bytes", wheel.stat().st_size)
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    missing = expected_wheel_files(source) - names
    assert not missing, f"the wheel lacks {sorted(missing)}"
    assert "prmbench_fast/families/__init__.py" in names  # issue #13
    assert {p for p in PROBES if p.startswith("prmbench_fast/")} <= names
    assert "prmbench_fast/kernels/_wheel_probe/probe_kernel.py" in names
    assert [n for n in names if n.startswith("prmbench_fast/_C") and n.endswith(".so")], "no compiled extension"
    tops = {n.split("/")[0] for n in names}
    dist_info = f"prmbench_fast-{metadata_field(metadata, 'Version')}.dist-info"
    assert tops == {"prmbench_fast", dist_info}, f"unexpected top-level entries: {tops}"  # no top-level `kernels`
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    assert f"{dist_info}/licenses/LICENSE" in names
    assert "License-Expression: Apache-2.0" in metadata and "Requires-Python: >=3.10" in metadata
    for extra in ("critic", "report", "test", "default-model"):
        assert f"Provides-Extra: {extra}" in metadata


def test_installed_wheel_imports_evaluates_and_scores_outside_the_repository(
    working_tree_wheel, evaluate_expected, tiny_model_folder, prmbench_jsonl, tmp_path, record_property
):
    wheel, _, build_seconds = working_tree_wheel
    start = time.perf_counter()
    venv = tmp_path / "venv"
    python = install_wheel(wheel, venv)
    outside = tmp_path / "elsewhere"
    outside.mkdir()

    found = check_installed_package(python, venv, outside)
    assert "prmbench_fast._wheel_probe.probe" in found["files"]
    assert "prmbench_fast.kernels._wheel_probe.probe_kernel" in found["files"]
    check_evaluate_command(venv, outside, evaluate_expected)

    result = json.loads(run([python, "-c", SCORE, prmbench_jsonl, tiny_model_folder], cwd=outside, env=clean_env()).stdout)
    assert_inside(result["package"], venv)
    assert len(result["scores"]) == result["samples"] > 0
    # The working tree's score() on the same model: same code, same weights, same machine.
    from prmbench_fast import load_prmbench, score

    report = score(tiny_model_folder, load_prmbench(prmbench_jsonl, limit_per_class=1), family="generic",
                   max_length=256, progress=False)  # fmt: skip
    for sample_id, result_scores in result["scores"].items():
        ours = report.predictions[sample_id]["scores"]["step_level_validity_scores"]
        assert result_scores == pytest.approx(ours, abs=1e-6), sample_id
    record_property("install_and_use_seconds", round(time.perf_counter() - start, 1))
    record_property("total_seconds_with_build", round(time.perf_counter() - start + build_seconds, 1))


@pytest.mark.slow
def test_sdist_and_the_wheel_built_from_it(working_tree_wheel, evaluate_expected, tmp_path, record_property):
    """``python -m build``: the sdist holds what a build needs, the wheel built from it equals the working tree's, and
    ``twine check`` passes. (No build isolation: offline, with the test environment's pinned torch.)"""
    _, source, _ = working_tree_wheel
    dist = tmp_path / "dist"
    start = time.perf_counter()
    run([sys.executable, "-m", "build", "--no-isolation", "--outdir", dist, source])
    record_property("sdist_then_wheel_seconds", round(time.perf_counter() - start, 1))
    (sdist,) = dist.glob("prmbench_fast-*.tar.gz")
    (wheel,) = dist.glob("prmbench_fast-*.whl")
    record_property("sdist_bytes", sdist.stat().st_size)

    with tarfile.open(sdist) as archive:
        members = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    for name in ("README.md", "LICENSE", "setup.py", "pyproject.toml", "MANIFEST.in", "PKG-INFO"):
        assert name in members
    for folder in ("csrc", "kernels", "prmbench_fast"):
        wanted = {p.relative_to(source).as_posix() for p in (source / folder).rglob("*") if p.is_file()}
        wanted = {w for w in wanted if "__pycache__" not in w and not w.endswith((".so", ".pyc"))}
        assert wanted <= members, f"the sdist lacks {sorted(wanted - members)}"
    assert not [m for m in members if m.startswith(("tests/", "bench/", ".git")) or m.endswith(".so")]

    with zipfile.ZipFile(wheel) as built, zipfile.ZipFile(working_tree_wheel[0]) as reference:
        assert set(built.namelist()) == set(reference.namelist())

    checked = run([sys.executable, "-m", "twine", "check", "--strict", sdist, wheel]).stdout
    assert checked.count("PASSED") == 2, checked

    venv = tmp_path / "venv"
    python = install_wheel(wheel, venv)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    check_installed_package(python, venv, outside)
    check_evaluate_command(venv, outside, evaluate_expected)
