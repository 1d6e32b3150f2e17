"""The official quick-evaluation task ``prmtest_classified_subset400`` (SPEC §5).

Samples: the task's data file holds 394 rows of the full data (48 per error class, 10 multi_solutions). Its loader is
the main task's loader (SPEC §1.4) run on that file, so a ``redundency`` row also brings its clean ``correct_<idx>``
sample and no other row does: 48 correct samples, 442 samples in all, in the file's order. The package ships the
394 (classification, idx) pairs (``subset400_ids.json``, ids only, no data) and selects those samples from the full
data, which the full loader has already built identically (no subset row is a dropped duplicate of the full data).

Evaluator: the main evaluator, except that the validity-rate denominator is the number of samples: the subset task's
``evaluate_function`` lacks the main task's ``total_num -= len(correct_predictions)`` (SPEC §2.5).
"""

from __future__ import annotations

import functools
import json
import pathlib
from typing import Any

from ..classes import CORRECT, CORRECT_SOURCE_CLASS
from ..data import PRMBenchDataset, load_prmbench
from ..evaluate import Report, evaluate

IDS_FILE = pathlib.Path(__file__).with_name("subset400_ids.json")


@functools.cache
def subset_rows() -> tuple[tuple[str, str], ...]:
    """The (classification, bare idx) of the official subset file's 394 rows, in file order."""
    return tuple((cls, idx) for cls, idx in json.loads(IDS_FILE.read_text(encoding="utf-8"))["ids"])


def subset_sample_ids() -> list[str]:
    """The sample ids of the subset task's evaluation set, in the order its loader builds them."""
    ids: dict[str, None] = {}  # ordered, and a repeated correct_<idx> is added once, as the loader does
    for cls, idx in subset_rows():
        if cls == CORRECT_SOURCE_CLASS:
            ids.setdefault(f"{CORRECT}_{idx}")
        ids.setdefault(f"{cls}_{idx}")
    return list(ids)


def select_subset400(full: PRMBenchDataset) -> PRMBenchDataset:
    """The subset task's evaluation set, taken from the full benchmark's."""
    ids = subset_sample_ids()
    missing = [i for i in ids if i not in full.by_id]
    if missing:
        raise ValueError(
            f"the data lacks {len(missing)} of the subset400 samples (e.g. {missing[:3]}); load the full PRMBench data"
        )
    return PRMBenchDataset((full.by_id[i] for i in ids), full.diagnostics)


class Subset400Task:
    name = "subset400"
    dataset_type = PRMBenchDataset
    loaded_by = 'load_prmbench(task="subset400")'
    leaderboard = True
    evaluate_options = ("validity_threshold", "redundancy_threshold", "backend", "keep_scores")

    def load(self, source: Any = None) -> PRMBenchDataset:
        """``source``: the full PRMBench data (a file, folder or hub id; default as :func:`load_prmbench`)."""
        return select_subset400(load_prmbench(source))

    def evaluate(self, dataset: PRMBenchDataset, predictions: Any, **options: Any) -> Report:
        """The official subset task's numbers: :func:`prmbench_fast.evaluate` with the subset's validity rule."""
        from . import check_task_dataset

        check_task_dataset(self.name, dataset)
        if [s.id for s in dataset.samples] != subset_sample_ids():
            raise ValueError("the subset400 task evaluates its own samples: load them with task='subset400'")
        return evaluate(dataset, predictions, validity_denominator="all_samples", **options)

    def evaluate_command(self, args: Any) -> int:
        """``prmbench-fast evaluate --task subset400``: PRMBench's command on the task's own samples."""
        from .prmbench import evaluate_command

        return evaluate_command(self, args, restrictable=False)


TASK = Subset400Task()
