"""Benchmark of the evaluator on the full PRMBench data (6,969 samples, ~94k scored steps).

(a) The counting op alone on flat tensors: compiled CPU op, its torch reference, and a plain per-step Python loop
    with the same semantics.
(b) End to end, per prediction set, side by side in one run: the official evaluator's Python loop (an independent
    transcription, prmbench_fast/testing/official_oracle.py), evaluate() from official result dicts, evaluate() on
    the flat predictions layout (StepPredictions, what score() and PRMBenchMetric hand it), and PRMBenchMetric fed
    in batches.
    The prediction sets are the kinds real runs produce:
      labels          validity labels only, one per step (the easy case)
      scores+labels   scores and labels, 1 in 5 samples with one label fewer or one more than its steps
      reasonEval      scores and labels plus redundancy scores and labels (the NR/NCL redundancy rule applies)
      critic          critic-style results: 3% invalid, redundancy labels, label counts off by one now and then
Prints one table (median times, derived steps/s, ratios to the official loop) with the device, versions and a
timestamp. Targets (issue #9): evaluate() from dicts >= 10x the official loop, from flat tensors >= 100x; every
provider's numbers are checked equal to the official loop's before timing.
With ``--busy N``, N CPU-bound background processes run during the measurement (other jobs sharing the cores;
each stops by itself after ``--busy-seconds`` and all are stopped when the benchmark ends). The targets hold quiet
and with two busy processes.
Usage: python bench/bench_evaluate.py [--data PATH] [--repeats N] [--busy N] [--busy-seconds S]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import random
import statistics
import sys
import time

import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from common import busy_processes, environment_line  # noqa: E402
from prmbench_fast.testing.official_oracle import evaluate_official, score_one_sample  # noqa: E402

from prmbench_fast import PRMBenchMetric, evaluate, load_prmbench  # noqa: E402
from prmbench_fast.classes import CLASS_ID  # noqa: E402
from prmbench_fast.ops import step_confusion  # noqa: E402
from prmbench_fast.predictions import parse_results  # noqa: E402


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up (first call pays for lazy initialisation)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def random_predictions(dataset, seed: int = 0):
    rng = random.Random(seed)
    return [
        {"idx": s.id, "scores": {"step_level_validity_labels": [rng.random() < 0.8 for _ in s.steps]}} for s in dataset
    ]


def prediction_set(dataset, kind: str, seed: int = 0):
    """Official result dicts of one of the kinds in the module docstring."""
    rng = random.Random(seed)
    results = []
    for s in dataset:
        n = len(s.steps)
        if kind != "labels" and rng.random() < 0.2:
            n = max(0, n + rng.choice((-1, 1)))
        if kind == "critic" and rng.random() < 0.03:
            results.append({"idx": s.id, "validity": False})
            continue
        validity = [round(rng.uniform(-1, 1), 3) if kind == "critic" else rng.random() for _ in range(n)]
        threshold = 0.0 if kind == "critic" else 0.5
        fields = {"step_level_validity_labels": [v > threshold for v in validity]}
        if kind != "labels":
            fields["step_level_validity_scores"] = validity
        if kind in ("reasonEval", "critic"):
            redundancy = [rng.random() for _ in range(n)]
            fields["step_level_redundancy_scores"] = redundancy
            fields["step_level_redundancy_labels"] = [r > 0.15 for r in redundancy]
        results.append({"idx": s.id, "validity": True, "scores": fields} if kind == "critic" else
                       {"idx": s.id, "scores": fields})
    return results


def metric_scores(flat):
    """The step scores PRMBenchMetric is fed: the flat layout's, with a step's label as its score where the layout
    holds NaN (labels without scores; update() refuses non-finite scores, and the labels given with them decide the
    counts). Made once, outside the timed calls."""
    labels = flat.validity_labels.to(torch.float64)
    scores = flat.validity_scores if flat.validity_scores is not None else labels
    return torch.where(torch.isnan(scores), labels.to(scores.dtype), scores)


def metric_in_batches(dataset, flat, scores, batch: int = 256):
    """PRMBenchMetric fed ``flat`` (``scores`` from :func:`metric_scores`) in batches of ``batch`` samples (sliced
    views, as a training loop hands them)."""
    metric = PRMBenchMetric(dataset)
    cu = flat.cu_steps.tolist()
    for start in range(0, flat.num_samples, batch):
        end = min(start + batch, flat.num_samples)
        lo, hi = cu[start], cu[end]
        metric.update(
            flat.sample_pos[start:end], scores[lo:hi], flat.cu_steps[start:end + 1] - lo,
            step_labels=flat.validity_labels[lo:hi],
            redundancy_labels=None if flat.redundancy_labels is None else flat.redundancy_labels[lo:hi],
            valid=None if flat.valid is None else flat.valid[start:end],
        )
    return metric.compute()


def flat_inputs(dataset, predictions):
    values, offsets, errors, error_offsets, classes = [], [0], [], [0], []
    for sample, result in zip(dataset, predictions):
        values.extend(result["scores"]["step_level_validity_labels"])
        offsets.append(len(values))
        errors.extend(e - 1 for e in sample.error_steps)
        error_offsets.append(len(errors))
        classes.append(CLASS_ID[sample.classification])
    return (
        torch.tensor(values, dtype=torch.bool),
        torch.zeros(len(classes), dtype=torch.float64),
        torch.tensor(offsets, dtype=torch.int64),
        torch.tensor(errors, dtype=torch.int64),
        torch.tensor(error_offsets, dtype=torch.int64),
        torch.tensor(classes, dtype=torch.int64),
        len(CLASS_ID),
    )


def python_step_loop(dataset, predictions):
    """The per-step counting with the official semantics, plain Python (the op's job, without the aggregation)."""
    return [
        score_one_sample(sample.error_steps, result["scores"]["step_level_validity_labels"])["f1_matrix"]
        for sample, result in zip(dataset, predictions)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "prmbench" / "prmbench_preview.jsonl"))
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--busy", type=int, default=0, help="CPU-bound background processes during the measurement")
    parser.add_argument("--busy-seconds", type=float, default=110.0,
                        help="the longest a background process runs (the whole benchmark takes ~1 min)")
    args = parser.parse_args()
    with busy_processes(args.busy, args.busy_seconds):
        run(args)


def run(args) -> None:

    dataset = load_prmbench(args.data)
    predictions = random_predictions(dataset)
    inputs = flat_inputs(dataset, predictions)
    steps = int(inputs[0].numel())
    oracle_samples = [
        {"idx": s.id, "steps": list(s.steps), "error_steps": list(s.error_steps), "classification": s.classification}
        for s in dataset
    ]
    print(environment_line() + f" | {args.busy} busy background processes | load {os.getloadavg()[0]:.2f}")
    print(f"full PRMBench: {len(dataset)} samples, {steps} steps; median of repeats\n")
    print(f"{'part':<26}{'provider':<34}{'time (ms)':>11}{'Msteps/s':>10}{'speed-up':>10}")

    op_python = median_seconds(lambda: python_step_loop(dataset, predictions), max(3, args.repeats // 4))
    for provider, seconds in (
        ("C++ CPU op (prmbench_fast._C)", median_seconds(lambda: step_confusion(*inputs, backend="cpu"), args.repeats * 10)),
        ("torch reference", median_seconds(lambda: step_confusion(*inputs, backend="torch"), args.repeats)),
        ("plain Python per-step loop", op_python),
    ):
        print(f"{'(a) counting op':<26}{provider:<34}{seconds * 1e3:>11.3f}{steps / seconds / 1e6:>10.2f}"
              f"{op_python / seconds:>9.1f}x")

    for kind in ("labels", "scores+labels", "reasonEval", "critic"):
        results = prediction_set(dataset, kind)
        flat = parse_results(dataset, results).predictions
        scores = metric_scores(flat)
        official_result, _ = evaluate_official(results, oracle_samples)
        providers = (
            ("evaluate() from result dicts", lambda: evaluate(dataset, results)),
            ("evaluate() on flat tensors", lambda: evaluate(dataset, flat)),
            ("PRMBenchMetric, batches of 256", lambda: metric_in_batches(dataset, flat, scores)),
        )
        for provider, run in providers:  # every provider's numbers equal the official loop's before it is timed
            ours = run().official
            assert ours["total_hallucination_results"] == official_result["total_hallucination_results"], provider
            assert ours["hallucination_type_results"] == official_result["hallucination_type_results"], provider
        official = median_seconds(lambda: evaluate_official(results, oracle_samples), max(3, args.repeats // 4))
        kind_steps = flat.num_steps
        rows = [("official evaluator loop (Python)", official)]
        rows += [(provider, median_seconds(run, args.repeats)) for provider, run in providers]
        for provider, seconds in rows:
            print(f"{'(b) ' + kind:<26}{provider:<34}{seconds * 1e3:>11.3f}{kind_steps / seconds / 1e6:>10.2f}"
                  f"{official / seconds:>9.1f}x")
    print("\nspeed-up: (a) against the plain Python loop, (b) against the official evaluator loop of the same "
          "predictions. Targets: evaluate() from dicts >= 10x, on flat tensors >= 100x.")


if __name__ == "__main__":
    main()
