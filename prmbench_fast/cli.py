"""The ``prmbench-fast`` command."""

from __future__ import annotations

import argparse
import sys

from .data import PRMBenchDataError


def _evaluate(args: argparse.Namespace) -> int:
    from .data import load_prmbench
    from .evaluate import evaluate
    from .io import read_predictions, write_json_atomic

    dataset = load_prmbench(args.data)
    predictions = read_predictions(args.predictions)
    if args.only_predicted:
        predicted = {r["idx"] for r in predictions}
        dataset = dataset.restrict_to(predicted)
    report = evaluate(
        dataset,
        predictions,
        validity_threshold=args.validity_threshold,
        redundancy_threshold=args.redundancy_threshold,
        backend=args.backend,
    )
    print(report.format_table())
    diag = report.diagnostics
    print(
        f"\n{len(report.sample_ids)} samples scored of {diag['samples']}; missing {len(diag['missing_ids'])}, "
        f"invalid {len(diag['invalid_predictions'])}, steps left unscored {diag['steps_left_unscored']}, "
        f"extra labels {diag['extra_labels']}"
    )
    if args.output:
        write_json_atomic(args.output, {"official": report.official, "table": report.table, "diagnostics": diag})
        print(f"wrote {args.output}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prmbench-fast", description="Fast, exact PRMBench evaluation.")
    commands = parser.add_subparsers(dest="command", required=True)

    ev = commands.add_parser(
        "evaluate", help="score an official PRMBench predictions file (result or checkpoint lines)"
    )
    ev.add_argument("--data", default=None, help="PRMBench jsonl file, folder or hub id (default: $PRMBENCH_DATA, else the hub)")
    ev.add_argument("--predictions", required=True, help="jsonl (or .jsonl.gz) of official result lines")
    ev.add_argument("--output", help="write the report JSON here (atomically)")
    ev.add_argument(
        "--only-predicted", action="store_true",
        help="evaluate only the predicted samples (and their correct partners) instead of the whole data",
    )
    ev.add_argument("--validity-threshold", type=float, default=0.5, help="for predictions with scores but no labels")
    ev.add_argument("--redundancy-threshold", type=float, default=0.15, help="for predictions with scores but no labels")
    ev.add_argument("--backend", default="auto", choices=["auto", "cpu", "cuda", "torch"], help="counting op backend")
    ev.set_defaults(run=_evaluate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (PRMBenchDataError, ValueError, FileNotFoundError) as err:
        print(f"prmbench-fast: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
