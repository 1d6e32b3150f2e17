"""How the loaders and evaluators below the task registry reach it: a slot that the registry fills.

The task registry (``prmbench_fast.tasks``: each task's loader, evaluator, report section and command-line wiring)
sits above ``data.py``, ``evaluate.py`` and ``predictions.py``, whose names its task modules import. The public entry
points down there that take a task name (``load_prmbench(task=)``, ``evaluate(task=)``) reach the task through
:func:`get_task` here, which the registry fills when it is imported (importing ``prmbench_fast`` imports it), as
Python's ``codecs`` module reaches the ``encodings`` package through ``codecs.register``: a lower module never imports
the registry, and adding a task touches ``prmbench_fast/tasks/`` only.
"""

from __future__ import annotations

from typing import Any, Callable

_lookup: Callable[[str], Any] | None = None


def register(lookup: Callable[[str], Any]) -> None:
    """Install the registry's ``get_task`` (``prmbench_fast.tasks`` does, when it is imported)."""
    global _lookup
    _lookup = lookup


def get_task(name: str) -> Any:
    """The task registered under ``name``; a ValueError listing the tasks for an unknown one."""
    if _lookup is None:  # a lower module imported on its own, outside the package's import
        raise RuntimeError("no task registry: import prmbench_fast (which imports prmbench_fast.tasks) first")
    return _lookup(name)


def check_task_dataset(task: str, dataset: Any, argument: str = "dataset") -> None:
    """Raise TypeError naming ``argument`` when ``dataset`` is not the kind of data ``task`` evaluates (the task's
    ``dataset_type``), with the call that loads it (the task's ``loaded_by``)."""
    wanted = get_task(task)
    if not isinstance(dataset, wanted.dataset_type):
        raise TypeError(f"{argument} must be the {task} task's data (from {wanted.loaded_by}), got "
                        f"{type(dataset).__name__}: pass the task= its data was loaded for")
