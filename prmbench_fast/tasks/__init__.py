"""Tasks: which samples a run evaluates and which evaluator rule scores them (the official toolkit's tasks, SPEC §5).

- ``"prmbench"`` (default): the full benchmark, the official ``prmtest_classified`` task.
- ``"subset400"``: the official ``prmtest_classified_subset400`` quick task: its 394 rows (+ the clean partners of its
  ``redundency`` rows), scored with that task's validity-rate denominator.
- ``"bon"``: the official ``prmbench_bon`` best-of-n task: pass@n, maj@n and PRM-BoN.
- ``"processbench"``: ProcessBench (QwenLM), the other benchmark PRM papers report: the first wrong step of single
  solutions, F1 per split.

The registry is the one place a task name is looked up: ``load_prmbench(task=)``, ``evaluate(task=)``,
``score(task=)``, the report and the CLI's ``--task`` all call::

    task = get_task(name)
    dataset = task.load(source, **load_options)          # samples with .id, .question, .steps, .source_idx
    report = task.evaluate(dataset, predictions, **evaluate_options)

Each task is one module here that declares everything about it (the :class:`Task` protocol), so adding a task
touches this folder only. The registry sits above the loaders and evaluators its tasks import (``data.py``,
``evaluate.py``, ``predictions.py``); those reach it through ``prmbench_fast.task_lookup``, which importing this
package fills, and never import it. Tasks are modules imported on first use, so the BoN task's imports cost nothing
to the others.
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol

from .. import task_lookup
from ..task_lookup import check_task_dataset

#: name -> (the module in this package defining ``TASK``, what the task is: the command line's --task help).
_TASKS = {
    "prmbench": ("prmbench", "the whole benchmark (default)"),
    "subset400": ("subset400", "the official 394-row quick task (its own validity rate)"),
    "bon": ("bon", "the official best-of-n task"),
    "processbench": ("processbench", "ProcessBench (--data: its files or folder)"),
}
TASK_NAMES = tuple(_TASKS)
TASK_HELP = "; ".join(f"{name}: {summary}" for name, (_, summary) in _TASKS.items())
DEFAULT_TASK = "prmbench"


class Task(Protocol):
    """What a task provides. ``load`` builds the samples; ``evaluate`` scores predictions on them."""

    name: str
    dataset_type: type  # what load() returns: the data its evaluator accepts
    loaded_by: str  # the call that loads it, for the error a wrong dataset gets
    leaderboard: bool  # `score --output-dir` places the run among PRMBench's published leaderboard and its report
    evaluate_options: tuple[str, ...]  # which of evaluate()'s options (thresholds, backend, ...) its evaluator takes

    def load(self, source: Any = None, **options: Any) -> Any:
        """The task's evaluation set from ``source`` (a file, a folder, a hub id; None: the task's default)."""

    def evaluate(self, dataset: Any, predictions: Any, **options: Any) -> Any:
        """Score ``predictions`` (official result dicts, ``{id: result}``, or flat step predictions) on ``dataset``."""

    def evaluate_command(self, args: Any) -> int:
        """``prmbench-fast evaluate --task NAME`` (``args``: its parsed options): print the report, write
        ``--output`` and the ``--output-dir`` run folder; the exit status."""


def get_task(name: str) -> Task:
    """The task registered under ``name``; a ValueError listing the tasks otherwise."""
    if name not in _TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of: {', '.join(TASK_NAMES)}")
    return importlib.import_module(f"{__name__}.{_TASKS[name][0]}").TASK


task_lookup.register(get_task)

__all__ = ["DEFAULT_TASK", "TASK_HELP", "TASK_NAMES", "Task", "check_task_dataset", "get_task"]
