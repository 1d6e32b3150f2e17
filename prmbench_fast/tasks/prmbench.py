"""The default task: the whole benchmark (the official ``prmtest_classified`` task), as ``load_prmbench`` and
``evaluate`` do it without a task."""

from __future__ import annotations

from typing import Any, Iterable

from ..data import PRMBenchDataset, load_prmbench
from ..evaluate import Report, evaluate


class PRMBenchTask:
    name = "prmbench"
    dataset_type = PRMBenchDataset
    loaded_by = 'load_prmbench(task="prmbench")'

    def load(
        self, source: Any = None, *, classes: Iterable[str] | None = None, limit_per_class: int | None = None
    ) -> PRMBenchDataset:
        return load_prmbench(source, classes=classes, limit_per_class=limit_per_class)

    def evaluate(self, dataset: PRMBenchDataset, predictions: Any, **options: Any) -> Report:
        return evaluate(dataset, predictions, **options)


TASK = PRMBenchTask()
