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
    leaderboard = True
    evaluate_options = ("validity_threshold", "redundancy_threshold", "backend", "validity_denominator", "keep_scores")

    def load(
        self, source: Any = None, *, classes: Iterable[str] | None = None, limit_per_class: int | None = None
    ) -> PRMBenchDataset:
        return load_prmbench(source, classes=classes, limit_per_class=limit_per_class)

    def evaluate(self, dataset: PRMBenchDataset, predictions: Any, **options: Any) -> Report:
        return evaluate(dataset, predictions, **options)

    def evaluate_command(self, args: Any) -> int:
        """``prmbench-fast evaluate`` (``--only-predicted``: the predicted samples and their partners only)."""
        return evaluate_command(self, args, restrictable=True)


def evaluate_command(task: Any, args: Any, *, restrictable: bool) -> int:
    """``prmbench-fast evaluate`` of a task on PRMBench data: print the table and the diagnostics, write ``--output``
    (official numbers, table, diagnostics) and ``--output-dir`` (a run folder with the analyses). ``restrictable``:
    whether ``--only-predicted`` applies (a task with its own samples refuses it)."""
    import contextlib

    from ..io import write_json_atomic
    from ._commands import (
        check_outputs,
        evaluate_store,
        naming_the_line,
        print_duplicates,
        print_unknown_ids,
        read_result_lines,
        refuse_only_predicted,
        write_evaluate_run,
    )

    check_outputs(args)
    if not restrictable:
        refuse_only_predicted(args, task.name)
    dataset = task.load(args.data)
    lines, predictions = read_result_lines(args.predictions, dataset)
    if args.only_predicted:
        dataset = dataset.restrict_to(r["idx"] for r in predictions)
    settings = {"validity_threshold": args.validity_threshold, "redundancy_threshold": args.redundancy_threshold}
    with contextlib.ExitStack() as stack:
        # The run folder is claimed (identity and lock) before the work, and held until its files are written.
        store = stack.enter_context(evaluate_store(args, dataset, settings)) if args.output_dir else None
        with naming_the_line(args.predictions, lines):
            report = task.evaluate(dataset, predictions, **settings, backend=args.backend,
                                   keep_scores=bool(args.output_dir))  # the run folder's analyses read the scores
        print(report.format_table())
        diag = report.diagnostics
        print(f"\n{len(report.sample_ids)} samples scored of {diag['samples']}; missing {len(diag['missing_ids'])}, "
              f"invalid {len(diag['invalid_predictions'])}, steps left unscored {diag['steps_left_unscored']}, "
              f"extra labels {diag['extra_labels']}")
        print_unknown_ids(diag.get("unknown_prediction_ids", []))
        print_duplicates(predictions)
        if args.output:
            write_json_atomic(args.output, {"official": report.official, "table": report.table,
                                            "diagnostics": report.diagnostics})
            print(f"wrote {args.output}")
        if store is not None:
            from ..analysis import analyze

            report.run = {"task": args.task, "data": args.data, "predictions": str(args.predictions), **settings}
            report.analysis = analyze(dataset, report)
            write_evaluate_run(store, report, predictions)
    return 0


TASK = PRMBenchTask()
