"""Benchmark of the evaluator on the full PRMBench data (6,969 samples, ~94k scored steps) with random predictions.

(a) The counting op alone on flat tensors: compiled CPU op, its torch reference, and a plain per-step Python loop
    with the same semantics.
(b) evaluate() from Python prediction dicts, end to end, against the official evaluator's Python loop (an
    independent transcription in tests/official_oracle.py).

Prints one table (median times, derived steps/s, ratios) with the device, versions and a timestamp.
Targets (issue #2): the op under 2 ms; evaluate() at least 10x faster than the official loop.
Usage: python bench/bench_evaluate.py [--data PATH] [--repeats N]
"""

from __future__ import annotations

import argparse
import pathlib
import random
import statistics
import sys
import time

import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))

from common import environment_line  # noqa: E402
from official_oracle import evaluate_official, score_one_sample  # noqa: E402

from prmbench_fast import evaluate, load_prmbench  # noqa: E402
from prmbench_fast.classes import CLASS_ID  # noqa: E402
from prmbench_fast.ops import step_confusion  # noqa: E402


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
    args = parser.parse_args()

    dataset = load_prmbench(args.data)
    predictions = random_predictions(dataset)
    inputs = flat_inputs(dataset, predictions)
    steps = int(inputs[0].numel())
    oracle_samples = [
        {"idx": s.id, "steps": list(s.steps), "error_steps": list(s.error_steps), "classification": s.classification}
        for s in dataset
    ]

    op_cpu = median_seconds(lambda: step_confusion(*inputs, backend="cpu"), args.repeats * 10)
    op_torch = median_seconds(lambda: step_confusion(*inputs, backend="torch"), args.repeats)
    op_python = median_seconds(lambda: python_step_loop(dataset, predictions), max(3, args.repeats // 4))
    end_to_end = median_seconds(lambda: evaluate(dataset, predictions), args.repeats)
    official = median_seconds(lambda: evaluate_official(predictions, oracle_samples), max(3, args.repeats // 4))

    print(environment_line())
    print(f"full PRMBench: {len(dataset)} samples, {steps} scored steps, random labels; median of repeats\n")
    rows = [
        ("(a) counting op", "C++ CPU op (prmbench_fast._C)", op_cpu, op_python),
        ("(a) counting op", "torch reference", op_torch, op_python),
        ("(a) counting op", "plain Python per-step loop", op_python, op_python),
        ("(b) end to end", "evaluate() from prediction dicts", end_to_end, official),
        ("(b) end to end", "official evaluator loop (Python)", official, official),
    ]
    print(f"{'part':<17}{'provider':<36}{'time (ms)':>11}{'Msteps/s':>10}{'speed-up':>10}")
    for part, provider, seconds, baseline in rows:
        print(f"{part:<17}{provider:<36}{seconds * 1e3:>11.3f}{steps / seconds / 1e6:>10.2f}{baseline / seconds:>9.1f}x")
    print("\nspeed-up: against the plain Python loop of the same part. Targets: C++ op < 2 ms; evaluate() >= 10x.")


if __name__ == "__main__":
    main()
