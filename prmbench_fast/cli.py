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


def _score(args: argparse.Namespace) -> int:
    import torch

    from .data import load_prmbench
    from .scoring import score

    dataset = load_prmbench(args.data, limit_per_class=args.limit_per_class)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    if args.critic:
        if not args.api_model:
            raise ValueError("--critic needs --api-model (the model name the endpoint serves)")
        report = score(args.api_model, dataset, family="critic", output_dir=args.output_dir,
                       progress=not args.no_progress, api_base=args.api_base, shots=args.shots,
                       concurrency=args.concurrency)
        run = report.run
        print(report.format_table())
        print(f"\ncritic {args.api_model}: {run['requests']} requests, {run['invalid_predictions']} invalid predictions, "
              f"{run['seconds']:.1f} s")
        return 0
    if args.model is None:
        from .models import load_default_model

        model, tokenizer = load_default_model(dtype=dtype or torch.float32)
        family = "lm_judge" if args.family == "auto" else args.family
    else:
        model, tokenizer, family = args.model, None, args.family
    report = score(
        model,
        dataset,
        tokenizer=tokenizer,
        family=family,
        max_length=args.max_length,
        batch_tokens=args.batch_tokens,
        dtype=dtype,
        device=args.device,
        backend=args.backend,
        output_dir=args.output_dir,
        cache_dir=args.cache_dir,
        progress=not args.no_progress,
    )
    run = report.run
    print(report.format_table())
    print(
        f"\n{run['family']} on {len(dataset)} samples: {run['samples_scored']} scored, {run['samples_resumed']} resumed; "
        f"{run['tokens']} tokens in {run['seconds']:.1f} s ({run['tokens_per_second'] or 0:.0f} tokens/s); "
        f"{run['truncated_samples']} samples truncated at {args.max_length} tokens"
    )
    if args.output_dir:
        print(f"results, report.json and table.txt in {args.output_dir}")
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

    sc = commands.add_parser("score", help="run a PRM on PRMBench and print the leaderboard row")
    sc.add_argument("--model", help="checkpoint folder (default: the embedded SmolLM2-135M-Instruct as an lm_judge)")
    sc.add_argument("--family", default="auto", help="PRM family (default: from the model's config and name)")
    sc.add_argument("--data", default=None, help="PRMBench jsonl file, folder or hub id (default: $PRMBENCH_DATA, else the hub)")
    sc.add_argument("--limit-per-class", type=int, help="score a stratified subset of at most N samples per class")
    sc.add_argument("--max-length", type=int, default=2048, help="official truncation length in tokens")
    sc.add_argument("--batch-tokens", type=int, default=16384, help="tokens per packed batch")
    sc.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="weights dtype when loading a checkpoint")
    sc.add_argument("--device", help="device when loading a checkpoint (default: cpu)")
    sc.add_argument("--backend", default="auto", choices=["auto", "triton", "torch"], help="reward-head kernel backend")
    sc.add_argument("--output-dir", help="write per-sample results, report.json and table.txt; re-run to resume")
    sc.add_argument("--cache-dir", help="keep tokenized samples here across runs")
    sc.add_argument("--no-progress", action="store_true", help="no progress bar")
    sc.add_argument("--critic", action="store_true", help="evaluate an LLM critic behind an OpenAI-compatible API")
    sc.add_argument("--api-base", help="critic endpoint base URL (default: $OPENAI_BASE_URL)")
    sc.add_argument("--api-model", help="critic model name as the endpoint serves it")
    sc.add_argument("--shots", type=int, default=2, choices=[0, 1, 2], help="critic few-shot examples")
    sc.add_argument("--concurrency", type=int, default=16, help="critic requests in flight")
    sc.set_defaults(run=_score)
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
