"""Tasks: which samples a run evaluates and which evaluator rule scores them (the official toolkit's tasks, SPEC §5).

- ``"prmbench"`` (default): the full benchmark, the official ``prmtest_classified`` task.
- ``"subset400"``: the official ``prmtest_classified_subset400`` quick task: its 394 rows (+ the clean partners of its
  ``redundency`` rows), scored with that task's validity-rate denominator.
- ``"bon"``: the official ``prmbench_bon`` best-of-n task: pass@n, maj@n and PRM-BoN.
- ``"processbench"``: ProcessBench (QwenLM), the other benchmark PRM papers report: the first wrong step of single
  solutions, F1 per split.

The contract every task follows (what ``load_prmbench(task=)``, ``evaluate(task=)``, ``score(task=)`` and the CLI's
``--task`` call)::

    task = get_task(name)
    dataset = task.load(source, **load_options)          # samples with .id, .question, .steps, .source_idx
    report = task.evaluate(dataset, predictions, **evaluate_options)

Tasks are modules imported on first use, so the BoN task's imports cost nothing to the others.
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol

#: name -> module (in this package) defining ``TASK``.
_MODULES = {"prmbench": "prmbench", "subset400": "subset400", "bon": "bon", "processbench": "processbench"}
TASK_NAMES = tuple(_MODULES)
DEFAULT_TASK = "prmbench"


class Task(Protocol):
    """What a task provides. ``load`` builds the samples; ``evaluate`` scores predictions on them."""

    name: str
    dataset_type: type  # what load() returns: the data its evaluator accepts

    def load(self, source: Any = None, **options: Any) -> Any:
        """The task's evaluation set from ``source`` (a file, a folder, a hub id; None: the task's default)."""

    def evaluate(self, dataset: Any, predictions: Any, **options: Any) -> Any:
        """Score ``predictions`` (official result dicts, ``{id: result}``, or flat step predictions) on ``dataset``."""


def get_task(name: str) -> Task:
    """The task registered under ``name``; a ValueError listing the tasks otherwise."""
    if name not in _MODULES:
        raise ValueError(f"unknown task {name!r}; choose one of: {', '.join(TASK_NAMES)}")
    return importlib.import_module(f"{__name__}.{_MODULES[name]}").TASK


def check_task_dataset(task: str, dataset: Any, argument: str = "dataset") -> None:
    """Raise TypeError naming ``argument`` when ``dataset`` is not the kind of data ``task`` evaluates (the task's
    ``dataset_type``: BoN data for "bon", ProcessBench data for "processbench", PRMBench data for the others)."""
    wanted = get_task(task).dataset_type
    if not isinstance(dataset, wanted):
        how = f'load_prmbench(path, task="{task}")' if task in ("bon", "processbench") else f'load_prmbench(task="{task}")'
        raise TypeError(f"{argument} must be the {task} task's data (from {how}), got {type(dataset).__name__}: "
                        "pass the task= its data was loaded for")


__all__ = ["DEFAULT_TASK", "TASK_NAMES", "Task", "check_task_dataset", "get_task"]
