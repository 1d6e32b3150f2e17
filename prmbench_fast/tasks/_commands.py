"""What the tasks' ``prmbench-fast evaluate`` wiring shares: the output checks, the official result lines read, a
prediction error turned into one naming the file's line, the duplicate and unknown-id notes, the run folder's store.

Each task's ``evaluate_command(args)`` (``args``: the parsed ``evaluate`` options of ``prmbench_fast.cli``) is built
from these; the command line itself only looks the task up.
"""

from __future__ import annotations

import contextlib
import hashlib
import pathlib
from typing import Any

from ..io import (
    PredictionFileError,
    check_not_an_input,
    check_output_dir,
    check_output_file,
    read_prediction_lines,
)
from ..predictions import PredictionError


def check_outputs(args: Any) -> None:
    """``--output`` and ``--output-dir`` checked before any work; ``--output`` never one of the inputs."""
    if args.output:
        check_output_file(args.output)
        check_not_an_input(args.output, {"--predictions": args.predictions, "--data": args.data})
    if args.output_dir:
        check_output_dir(args.output_dir)


def refuse_only_predicted(args: Any, task: str) -> None:
    if args.only_predicted:
        raise ValueError(f"--only-predicted applies to --task prmbench only; the {task} task scores its own samples")


def read_result_lines(path: str, dataset: Any) -> tuple[list[tuple[int, dict]], list[dict]]:
    """The official result lines of ``path`` (line number, record) and the records; an empty file, or one whose ids
    are all outside ``dataset``, is a PredictionFileError."""
    lines = read_prediction_lines(path)
    predictions = [record for _, record in lines]
    if not predictions:
        raise PredictionFileError(path, None, None, "no predictions (the file is empty)")
    predicted = {r["idx"] for r in predictions}
    if predicted.isdisjoint(dataset.by_id):
        raise PredictionFileError(path, None, "idx", f"none of its {len(predicted)} prediction ids is in the data "
                                  f"(e.g. {predictions[0]['idx']!r})")
    return lines, predictions


@contextlib.contextmanager
def naming_the_line(path: str, lines: list[tuple[int, dict]]):
    """A PredictionError about one sample's prediction becomes a PredictionFileError naming the file and the line
    (the first line of that id: the one the evaluator reads)."""
    try:
        yield
    except PredictionError as err:
        if err.sample_id is None:
            raise
        line = next(number for number, record in lines if record["idx"] == err.sample_id)
        raise PredictionFileError(path, line, None, str(err)) from None


def print_unknown_ids(unknown: list[str]) -> None:
    if unknown:
        print(f"{len(unknown)} prediction id(s) are not in the data and were ignored (e.g. {unknown[0]!r})")


def print_duplicates(predictions: list[dict]) -> None:
    """How many ids have more than one prediction, and how many of those disagree with the first (which is used)."""
    first: dict[str, dict] = {}
    repeated: set[str] = set()
    conflicting: set[str] = set()
    for record in predictions:
        kept = first.setdefault(record["idx"], record)
        if kept is not record:
            repeated.add(record["idx"])
            if _prediction_of(record) != _prediction_of(kept):
                conflicting.add(record["idx"])
    if repeated:
        print(f"{len(repeated)} prediction id(s) appear more than once, {len(conflicting)} of them with different "
              "predictions; the first line of each id is used, as the official evaluator does")


def _prediction_of(record: dict) -> tuple:
    return record.get("validity", True), record.get("scores")


def evaluate_store(args: Any, dataset: Any, settings: dict[str, Any]):
    """The evaluate run folder's store: its identity is the predictions file's content and the evaluation settings,
    so a score or critic run folder, or another evaluation's, is never written over (unless --overwrite)."""
    from ..results_store import ResultsStore

    identity = {"task": args.task, "data": dataset.content_hash,
                "predictions": hashlib.sha256(pathlib.Path(args.predictions).read_bytes()).hexdigest(),
                "only_predicted": args.only_predicted, **settings}
    return ResultsStore(args.output_dir, identity, overwrite=args.overwrite, kind="evaluate")


def write_evaluate_run(store: Any, report: Any, predictions: list[dict]) -> None:
    """The run folder's results.jsonl (the prediction lines read), report.json and table.txt."""
    store.replace_results(predictions)  # an evaluation is redone, never resumed: the folder holds this one's lines
    store.write_report(report)
    print(f"wrote the run folder {store.dir} (results.jsonl, report.json, table.txt); HTML: prmbench-fast report "
          f"{store.dir}")
