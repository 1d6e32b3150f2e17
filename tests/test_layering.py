"""The task registry is the top of the house: the loaders, evaluators and the flat predictions layout below it
(data.py, evaluate.py, predictions.py) never import ``prmbench_fast.tasks``, directly or through the package modules
they import, lazily inside a function included; they reach it through ``prmbench_fast.task_lookup``."""

import ast
import json
import pathlib

import pytest

import prmbench_fast
from prmbench_fast import task_lookup, tasks

PACKAGE = pathlib.Path(prmbench_fast.__file__).parent
LOWER = ("prmbench_fast.data", "prmbench_fast.evaluate", "prmbench_fast.predictions")


def module_file(name: str) -> pathlib.Path | None:
    """The source file of a package module, None for a name that is not one (an attribute, another package)."""
    parts = name.split(".")
    if parts[0] != "prmbench_fast":
        return None
    base = PACKAGE.joinpath(*parts[1:])
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def imported_modules(source: str, module: str, is_package: bool = False) -> set[str]:
    """Every package-internal module the source imports, anywhere in it (function bodies included), relative
    imports resolved; ``importlib.import_module``/``__import__`` of a constant name count too."""
    package = module if is_package else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(source)):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) in (
                "import_module", "__import__"):
            names = [arg.value for arg in node.args[:1] if isinstance(arg, ast.Constant)]
        found.update(n for n in names if module_file(n) is not None)
    return found


def reachable(start: str) -> set[str]:
    """The package modules ``start`` imports, transitively (the package's own __init__, which Python runs before
    any of its modules, left out: it is the top that imports everything)."""
    seen, todo = set(), [start]
    while todo:
        name = todo.pop()
        if name in seen or name == "prmbench_fast":
            continue
        seen.add(name)
        path = module_file(name)
        todo += imported_modules(path.read_text(), name, path.name == "__init__.py")
    return seen - {start}


@pytest.mark.parametrize("module", LOWER)
def test_the_lower_modules_never_import_the_task_registry(module):
    upward = sorted(m for m in reachable(module) if m == "prmbench_fast.tasks" or m.startswith("prmbench_fast.tasks."))
    assert upward == [], f"{module} imports {upward}"


def test_the_checker_sees_lazy_relative_and_dynamic_imports():
    lazy = "def load(task):\n    from .tasks import get_task\n    return get_task(task)\n"
    assert "prmbench_fast.tasks" in imported_modules(lazy, "prmbench_fast.data")
    assert "prmbench_fast.tasks.bon" in imported_modules("from .tasks import bon\n", "prmbench_fast.data")
    dynamic = "import importlib\nimportlib.import_module('prmbench_fast.tasks.bon')\n"
    assert "prmbench_fast.tasks.bon" in imported_modules(dynamic, "prmbench_fast.evaluate")
    assert imported_modules("from . import task_lookup\n", "prmbench_fast.data") == {"prmbench_fast",
                                                                                     "prmbench_fast.task_lookup"}
    assert "prmbench_fast.reference" in reachable("prmbench_fast.evaluate")  # through ops.py: followed transitively


def test_the_registry_is_what_the_lower_modules_look_up():
    assert task_lookup._lookup is tasks.get_task
    for name in tasks.TASK_NAMES:
        assert task_lookup.get_task(name) is tasks.get_task(name)
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        prmbench_fast.load_prmbench(task="nope")
    with pytest.raises(TypeError, match=r'bon task\'s data \(from load_prmbench\(path, task="bon"\)\), got list'):
        prmbench_fast.evaluate([], [{"idx": "x"}], task="bon")


def test_every_task_declares_its_wiring():
    for name in tasks.TASK_NAMES:
        task = tasks.get_task(name)
        assert task.name == name and isinstance(task.dataset_type, type) and isinstance(task.leaderboard, bool)
        assert f'task="{name}"' in task.loaded_by
        assert isinstance(task.evaluate_options, tuple)
        assert all(callable(getattr(task, f)) for f in ("load", "evaluate", "evaluate_command"))
        assert f"{name}: " in tasks.TASK_HELP


def test_the_command_line_leaves_the_tasks_to_the_registry():
    """cli.py names no task that needs no option of its own: their commands are wired in prmbench_fast/tasks/."""
    tree = ast.parse((PACKAGE / "cli.py").read_text())
    strings = {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)}
    assert not strings & {"bon", "subset400"}


def scores(sample):
    """Step k's validity score: 0.95, 0.6, 0.1, 0.95, ... (labels that move between thresholds 0.5 and 0.7)."""
    return [(0.95, 0.6, 0.1)[k % 3] for k in range(len(sample.steps))]


def test_evaluate_passes_a_task_the_options_it_takes(tmp_path, prmbench_jsonl):
    """evaluate(task=...) hands the thresholds to the task's evaluator (they were dropped: the defaults were used)."""
    from prmbench_fast.evaluate import evaluate
    from prmbench_fast.tasks.processbench import evaluate_processbench
    from prmbench_fast.testing.processbench_data import write_processbench

    write_processbench(prmbench_jsonl, tmp_path, limit_per_class=1)
    pb = prmbench_fast.load_processbench(tmp_path)
    results = [{"idx": s.id, "scores": {"step_level_validity_scores": scores(s)}} for s in pb]
    for threshold in (0.5, 0.7):
        got = prmbench_fast.evaluate(pb, results, task="processbench", validity_threshold=threshold)
        expected = evaluate_processbench(pb, results, validity_threshold=threshold)
        assert got.predictions == expected.predictions
        assert json.dumps(got.official) == json.dumps(expected.official)  # NaN F1s compare as text
    assert got.predictions != prmbench_fast.evaluate(pb, results, task="processbench").predictions

    sub = prmbench_fast.load_prmbench(prmbench_jsonl, task="subset400")
    results = [{"idx": s.id, "scores": {"step_level_validity_scores": scores(s)}} for s in sub]
    got = prmbench_fast.evaluate(sub, results, task="subset400", validity_threshold=0.7, keep_scores=True)
    expected = evaluate(sub, results, validity_denominator="all_samples", validity_threshold=0.7)
    assert got.official == expected.official != evaluate(sub, results, task="subset400").official
