"""The ``prmbench-fast`` command.

Every user error (a bad file, path, option or model folder, a run folder of another run or in use, an endpoint that
refuses the key) ends the command with one line on stderr, ``prmbench-fast: error: <file>, line N, field 'x':
problem``, and exit status 2, without a traceback. Ctrl-C exits with status 130; what finished is kept.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import sys
import warnings

from .extras import MissingExtraError
from .io import FileWarning
from .tasks import TASK_HELP, TASK_NAMES

#: Errors that are the user's to fix: shown as one line, exit status 2. ValueError covers every file, data,
#: prediction, family and run-folder error of the package; OSError covers paths, locks and refusing endpoints.
USER_ERRORS = (ValueError, OSError, MissingExtraError)
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a command stopped by Ctrl-C


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    value = _finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _evaluate(args: argparse.Namespace) -> int:
    from .tasks import get_task

    return get_task(args.task).evaluate_command(args)  # each task wires its own command


def _report(args: argparse.Namespace) -> int:
    from .io import check_not_an_input
    from .report import write_report

    if args.output:
        # Never write the page over a file the report reads (a run folder's report.json or results, the data).
        inputs = {"--data": args.data}
        for run_dir in args.run_dirs:
            for name in ("report.json", "run.json", "results.jsonl", "table.txt"):
                inputs[f"{run_dir}'s {name}"] = os.path.join(run_dir, name)
        check_not_an_input(args.output, inputs)
    path = write_report(args.run_dirs, args.output, data=args.data)
    print(f"wrote {path} (its figures as PNG files beside it)")
    return 0


def _check_score_args(args: argparse.Namespace) -> None:
    """What can be checked before loading data or a model: the output folder, the model folder, the device."""
    from .io import check_checkpoint_files, check_output_dir, looks_like_hub_id
    from .models import check_device, check_model_folder

    if args.critic:
        _check_critic_args(args)
    elif args.pooling_api:
        _check_pooling_api_args(args)
    else:
        _check_prm_args(args)
    if args.limit_per_split is not None and args.task != "processbench":
        raise ValueError("--limit-per-split applies to --task processbench only (PRMBench: --limit-per-class)")
    if args.output_dir:
        check_output_dir(args.output_dir)
    if args.cache_dir:
        check_output_dir(args.cache_dir)
    if args.model is not None and (os.path.exists(args.model) or not looks_like_hub_id(args.model)):
        check_model_folder(args.model)
        check_checkpoint_files(args.model)
    if args.device:
        check_device(args.device)


#: Options of a PRM run (a checkpoint scored locally) and of a critic run (an endpoint asked), by their attribute;
#: given to the other kind of run they would be silently ignored, so they are refused.
PRM_OPTIONS = ("model", "family", "max_length", "batch_tokens", "dtype", "device", "backend", "cache_dir",
               "validity_threshold", "redundancy_threshold", "engine", "tensor_parallel_size", "pooling_api")
CRITIC_OPTIONS = ("api_base", "api_model", "shots", "critique_template", "concurrency", "timeout", "max_retries",
                  "retry_invalid")


def _given(args: argparse.Namespace, names: tuple[str, ...]) -> list[str]:
    """The options among ``names`` given a value other than their default, as their flags."""
    defaults = vars(build_parser().parse_args(["score"]))
    return [f"--{n.replace('_', '-')}" for n in names if getattr(args, n) != defaults[n]]


def _check_critic_args(args: argparse.Namespace) -> None:
    if not args.api_model:
        raise ValueError("--critic needs --api-model (the model name the endpoint serves)")
    if args.task not in ("prmbench", "processbench"):
        raise ValueError(f"--critic scores --task prmbench or processbench, not {args.task}")
    if args.task == "processbench" and args.shots is not None:
        raise ValueError("--shots: for PRMBench critics; the ProcessBench critic sends one message without examples")
    if args.task != "processbench" and args.critique_template:
        raise ValueError("--critique-template applies to --task processbench only")
    prm_only = _given(args, PRM_OPTIONS)
    if prm_only:
        raise ValueError(f"{', '.join(prm_only)}: for PRM checkpoints, not for --critic (a critic is the model "
                         "--api-model names at --api-base; its labels are score > 0, as in the official adapters)")
    if args.api_base:
        from .critic import check_api_base

        check_api_base(args.api_base)


def _check_prm_args(args: argparse.Namespace) -> None:
    critic_only = _given(args, CRITIC_OPTIONS)
    if critic_only:
        raise ValueError(f"{', '.join(critic_only)}: for --critic runs only (add --critic to ask an endpoint)")
    if args.tensor_parallel_size != 1 and args.engine != "vllm":
        raise ValueError("--tensor-parallel-size applies to --engine vllm only")
    if args.engine == "vllm" and args.model is None:
        raise ValueError("--engine vllm needs --model (the checkpoint folder vLLM loads)")


def _check_pooling_api_args(args: argparse.Namespace) -> None:
    from .endpoint import check_api_base

    if not args.api_model or not args.model:
        raise ValueError("--pooling-api needs --api-model (the model name the server serves) and --model (the local "
                         "checkpoint folder, for its tokenizer and config)")
    wrong = _given(args, ("dtype", "device", "backend", "engine", "tensor_parallel_size", "api_base", "shots",
                          "critique_template", "retry_invalid"))
    if wrong:
        raise ValueError(f"{', '.join(wrong)}: not for --pooling-api (the server runs the model; its URL is "
                         "--pooling-api)")
    check_api_base(args.pooling_api, "--pooling-api", "http://localhost:8000")


def _score_critic(args: argparse.Namespace, dataset) -> int:
    from .critic import score_critic  # not through score(): the critic needs neither torch's compiler nor a model

    template = None
    if args.critique_template:
        from .io import FileError, read_lines
        from .tasks.processbench import check_critique_template

        template = "".join(text for _, text in read_lines(args.critique_template))
        try:
            check_critique_template(template)
        except ValueError as err:
            raise FileError(args.critique_template, None, None, str(err)) from None
    report = score_critic(dataset, api_model=args.api_model, api_base=args.api_base, task=args.task,
                          shots=args.shots, critique_template=template, concurrency=args.concurrency,
                          timeout=args.timeout, max_retries=args.max_retries, output_dir=args.output_dir, overwrite=args.overwrite, retry_invalid=args.retry_invalid,
                          progress=not args.no_progress)
    run = report.run
    print(report.format_table())
    print(f"\ncritic {args.api_model}: {run['requests']} requests, {run['invalid_predictions']} invalid predictions, "
          f"{run['seconds']:.1f} s")
    return 0


def _score(args: argparse.Namespace) -> int:
    from .data import load_prmbench

    _check_score_args(args)
    dataset = load_prmbench(args.data, task=args.task, limit_per_class=args.limit_per_class)
    if args.limit_per_split is not None:
        dataset = dataset.subset(limit_per_split=args.limit_per_split)
    if args.critic:
        return _score_critic(args, dataset)

    import torch

    from .scoring import score

    dtype = getattr(torch, args.dtype) if args.dtype else None
    engine_options = {}
    if args.pooling_api:
        engine_options = {"engine": "pooling-api", "api_base": args.pooling_api, "api_model": args.api_model,
                          "concurrency": args.concurrency, "timeout": args.timeout, "max_retries": args.max_retries}
    elif args.engine == "vllm":
        engine_options = {"engine": "vllm", "tensor_parallel_size": args.tensor_parallel_size}
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
        **engine_options,
        overwrite=args.overwrite,
        cache_dir=args.cache_dir,
        progress=not args.no_progress,
        validity_threshold=args.validity_threshold,
        redundancy_threshold=args.redundancy_threshold,
        task=args.task,
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
        from .tasks import get_task

        if get_task(args.task).leaderboard:  # the PRMBench leaderboard and report page
            _print_summary(report, run, args.output_dir, samples=len(dataset))
    return 0


def _print_summary(report, run, output_dir, *, samples: int) -> None:
    """The run's row among the published leaderboard and the trivial predictors, and where its report page is."""
    from .extras import MissingExtraError
    from .report import summary_text, write_report

    try:
        html = write_report([output_dir])
    except MissingExtraError as err:  # no matplotlib: the summary still says where the run stands
        html = None
        print(f"prmbench-fast: note: {err}")
    name = pathlib.PurePath(run["model"]).name or run["model"]  # a checkpoint folder: its last part
    print(summary_text(report.table, report.analysis["baselines"], name=name, samples=samples,
                       report_path=html))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prmbench-fast", description="Fast, exact PRMBench evaluation.")
    commands = parser.add_subparsers(dest="command", required=True)

    ev = commands.add_parser(
        "evaluate", help="score an official PRMBench predictions file (result or checkpoint lines)"
    )
    ev.add_argument("--data", default=None, help="PRMBench jsonl file, folder or hub id (default: $PRMBENCH_DATA, else the "
                    "hub); for --task bon, the BoN jsonl file or folder")
    ev.add_argument("--task", default="prmbench", choices=TASK_NAMES, help=TASK_HELP)
    ev.add_argument("--predictions", required=True, help="jsonl (or .jsonl.gz) of official result lines")
    ev.add_argument("--output", help="write the report JSON here (atomically)")
    ev.add_argument("--output-dir", help="write a run folder like score's (results.jsonl, report.json with the "
                    "analyses, table.txt) for `prmbench-fast report`; a folder of another run (score, critic, or an "
                    "evaluation of other predictions or settings) is refused")
    ev.add_argument("--overwrite", action="store_true",
                    help="replace the --output-dir folder's run (needed when it holds another run)")
    ev.add_argument("--seed", type=int, default=0, help="--task bon: seed of the random tie-breaks")
    ev.add_argument(
        "--only-predicted", action="store_true",
        help="evaluate only the predicted samples (and their correct partners) instead of the whole data",
    )
    ev.add_argument("--validity-threshold", type=_finite_float, default=0.5,
                    help="for predictions with scores but no labels")
    ev.add_argument("--redundancy-threshold", type=_finite_float, default=0.15,
                    help="for predictions with scores but no labels")
    ev.add_argument("--backend", default="auto", choices=["auto", "cpu", "cuda", "torch"], help="counting op backend")
    ev.set_defaults(run=_evaluate)

    sc = commands.add_parser("score", help="run a PRM on PRMBench and print the leaderboard row")
    sc.add_argument("--model", help="checkpoint folder (default: the embedded SmolLM2-135M-Instruct as an lm_judge); "
                    "not with --critic, whose model is --api-model")
    sc.add_argument("--family", default="auto", help="PRM family (default: from the model's config and name)")
    sc.add_argument("--data", default=None, help="PRMBench jsonl file, folder or hub id (default: $PRMBENCH_DATA, else the "
                    "hub); for --task bon, the BoN jsonl file or folder")
    sc.add_argument("--task", default="prmbench", choices=TASK_NAMES, help=TASK_HELP)
    sc.add_argument("--limit-per-class", type=_positive_int,
                    help="score a stratified subset of at most N samples per class")
    sc.add_argument("--limit-per-split", type=_positive_int,
                    help="--task processbench: score at most N solutions per split (the first N/2 correct and N/2 "
                    "erroneous ones)")
    sc.add_argument("--max-length", type=_positive_int, default=2048, help="official truncation length in tokens")
    sc.add_argument("--batch-tokens", type=_positive_int, default=16384, help="tokens per packed batch")
    sc.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="weights dtype when loading a checkpoint")
    sc.add_argument("--device", help="device when loading a checkpoint (default: cpu)")
    sc.add_argument("--backend", default="auto", choices=["auto", "triton", "torch"], help="reward-head kernel backend")
    sc.add_argument("--validity-threshold", type=_finite_float,
                    help="override the family's official validity threshold (label = score > threshold; Skywork: "
                    "of the score difference), as the official adapters' model_args do; recorded in the run")
    sc.add_argument("--redundancy-threshold", type=_finite_float,
                    help="override the official redundancy threshold (families with redundancy scores: reasoneval)")
    sc.add_argument("--output-dir", help="write per-sample results, report.json and table.txt; re-run to resume")
    sc.add_argument("--overwrite", action="store_true",
                    help="start the --output-dir run over (needed when it holds a run of another model or settings)")
    sc.add_argument("--cache-dir", help="keep tokenized samples here across runs")
    sc.add_argument("--no-progress", action="store_true", help="no progress bar")
    sc.add_argument("--engine", default="torch", choices=["torch", "vllm"],
                    help="what runs --model: this package's torch pipeline (default), or vLLM in this process "
                    "(STEP pooling; needs vLLM installed, e.g. the environment of make vllm-env)")
    sc.add_argument("--tensor-parallel-size", type=_positive_int, default=1,
                    help="--engine vllm: GPUs to shard the model over")
    sc.add_argument("--pooling-api", metavar="URL",
                    help="score --model's family with a running vLLM server at URL (its root, e.g. "
                    "http://localhost:8000) serving --api-model with STEP pooling; --model is the local checkpoint "
                    "folder, for its tokenizer and config")
    sc.add_argument("--critic", action="store_true", help="evaluate an LLM critic behind an OpenAI-compatible API")
    sc.add_argument("--api-base", help="critic endpoint base URL (default: $OPENAI_BASE_URL)")
    sc.add_argument("--api-model", help="critic or --pooling-api: the model name the endpoint serves")
    sc.add_argument("--shots", type=int, choices=[0, 1, 2], help="PRMBench critic: few-shot examples (default 2)")
    sc.add_argument("--critique-template", metavar="FILE",
                    help="ProcessBench critic: the prompt template ({problem}, {tagged_response}), e.g. the official "
                    "code/templates/critique_template.txt (default: this package's wording of it)")
    sc.add_argument("--concurrency", type=_positive_int, default=16, help="critic or --pooling-api: requests in flight")
    sc.add_argument("--timeout", type=_positive_float, default=60.0,
                    help="critic or --pooling-api: seconds per request")
    sc.add_argument("--max-retries", type=_positive_int, default=5,
                    help="critic or --pooling-api: attempts per request (timeouts, connection errors, HTTP 429/5xx)")
    sc.add_argument("--retry-invalid", action="store_true",
                    help="critic: ask again about the samples stored invalid in --output-dir (by default they are "
                    "resumed as they are, as the official toolkit does)")
    sc.set_defaults(run=_score)

    rp = commands.add_parser("report", help="write the HTML report of run folders (figures embedded, PNGs beside it)")
    rp.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders of score/evaluate --output-dir")
    rp.add_argument("--output", help="the HTML file (default: report.html in the first RUN_DIR)")
    rp.add_argument("--data", help="the PRMBench data, only for run folders whose report.json has no analyses")
    rp.set_defaults(run=_report)

    en = commands.add_parser("env", help="print versions, GPUs, the compiled op and which kernels will run here")
    en.add_argument("--json", action="store_true", help="print it as JSON")
    en.set_defaults(run=_env)
    return parser


def _env(args: argparse.Namespace) -> int:
    from . import environment

    facts = environment.describe()
    print(json.dumps(facts, indent=2) if args.json else environment.format_report(facts))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings():
        warnings.showwarning = _warning_printer(warnings.showwarning)
        try:
            return args.run(args)
        except KeyboardInterrupt:
            output_dir = getattr(args, "output_dir", None)
            kept = f"; finished results are kept in {output_dir} (run the same command to resume)" if output_dir else ""
            print(f"prmbench-fast: interrupted{kept}", file=sys.stderr)
            return EXIT_INTERRUPTED
        except USER_ERRORS as err:
            message = " ".join(str(err).split()) or type(err).__name__  # one line, whatever the library wrote
            print(f"prmbench-fast: error: {message}", file=sys.stderr)
            return EXIT_USER_ERROR


def _warning_printer(default):
    """``warnings.showwarning`` that prints the package's file and threshold warnings as ``prmbench-fast: warning:
    <message>`` (they already name the file and line, or the threshold) and leaves every other warning to
    ``default``."""

    def show(message, category, filename, lineno, file=None, line=None):
        from .predictions import ThresholdWarning  # here: the command's start does not import torch

        if issubclass(category, (FileWarning, ThresholdWarning)):
            print(f"prmbench-fast: warning: {message}", file=sys.stderr)
        else:
            default(message, category, filename, lineno, file, line)

    return show


def entry() -> None:
    """The ``prmbench-fast`` command: :func:`main`, then exit with its status.

    After Ctrl-C the process ends at once with ``os._exit``: every finished result is already fsync'ed, and the
    interpreter's normal shutdown could otherwise wait on requests still in flight (critic worker threads)."""
    status = main()
    if status == EXIT_INTERRUPTED:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)


if __name__ == "__main__":
    entry()
