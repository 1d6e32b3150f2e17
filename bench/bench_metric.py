"""PRMBenchMetric.compute() after many small updates, beside evaluate() on the same predictions.

A validation loop feeds the metric one small batch at a time, so compute() meets the whole benchmark in many pieces.
The predictions: every sample of the full benchmark once, float32 scores in [0, 1) (labels ``score > 0.5``), in
``--updates`` batches of consecutive samples (1,000 by default: ~7 samples each). For each provider the best and the
median of ``--repeats`` runs, steps/s (94k steps) and the ratio to ``evaluate()`` on the same predictions already as
one flat ``StepPredictions`` (the floor: one call of the counting op plus the host arithmetic):

- ``evaluate_steps (flat)``: the floor.
- ``metric.compute() (first)``: a fresh metric fed the batches, compute() once (joins them and evaluates); the target
  is at most 10 ms on the project's CPU.
- ``metric.compute() (again)``: a second compute() with nothing new (the joined state is kept).
- ``metric.update() x N``: the updates themselves, for scale.

Every provider's official result is checked equal to evaluate()'s first.
Usage: python bench/bench_metric.py [--data PATH] [--updates N] [--repeats N]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from common import environment_line  # noqa: E402

from prmbench_fast import PRMBenchMetric, StepPredictions, evaluate_steps, load_prmbench  # noqa: E402

TARGET_SECONDS = 0.010


def batches(dataset, updates: int, seed: int = 0):
    """(sample_pos, scores, cu_steps) for ``updates`` batches covering every sample once."""
    generator = torch.Generator().manual_seed(seed)
    counts = torch.tensor([len(s.steps) for s in dataset], dtype=torch.int64)
    scores = torch.rand(int(counts.sum()), generator=generator)
    cu = torch.zeros(len(dataset) + 1, dtype=torch.int64)
    cu[1:] = counts.cumsum(0)
    out = []
    for positions in torch.arange(len(dataset)).tensor_split(updates):
        lo, hi = int(positions[0]), int(positions[-1]) + 1
        out.append((positions, scores[cu[lo]:cu[hi]], (cu[lo:hi + 1] - cu[lo]).to(torch.int32)))
    return out, scores, cu


def timed(fn, repeats: int):
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        seconds.append(time.perf_counter() - start)
    return min(seconds), statistics.median(seconds), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.environ.get("PRMBENCH_DATA"))
    parser.add_argument("--updates", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    data = load_prmbench(args.data)
    parts, scores, cu = batches(data, args.updates)
    flat = StepPredictions(torch.arange(len(data)), cu, scores > 0.5, scores)
    num_steps = scores.numel()

    def fed() -> PRMBenchMetric:
        metric = PRMBenchMetric(data)
        for positions, part_scores, part_cu in parts:
            metric.update(positions, part_scores, part_cu)
        return metric

    def first():
        metric = fed()
        start = time.perf_counter()
        report = metric.compute()
        return time.perf_counter() - start, report

    expected = evaluate_steps(data, flat)
    rows = []
    best, median, report = timed(lambda: evaluate_steps(data, flat), args.repeats)
    rows.append(("evaluate_steps (flat)", best, median, report))
    runs = [first() for _ in range(args.repeats)]
    rows.append(("metric.compute() (first)", min(r[0] for r in runs), statistics.median(r[0] for r in runs),
                 runs[0][1]))
    again = fed()
    again.compute()
    best, median, report = timed(again.compute, args.repeats)
    rows.append(("metric.compute() (again)", best, median, report))
    best, median, _ = timed(fed, max(args.repeats // 4, 3))
    rows.append((f"metric.update() x {args.updates}", best, median, None))
    for name, _, _, report in rows:
        if report is not None and report.official != expected.official:
            raise SystemExit(f"{name}: result differs from evaluate_steps()")

    print(environment_line())
    print(f"load: {os.getloadavg()[0]:.2f} (1-min average) | data: {len(data)} samples, {num_steps} steps, "
          f"{args.updates} updates | best and median of {args.repeats} runs")
    floor = rows[0][1]
    print(f"{'provider':<28} {'best ms':>9} {'median ms':>10} {'M steps/s':>10} {'x floor':>8}")
    for name, best, median, _ in rows:
        print(f"{name:<28} {best * 1e3:9.2f} {median * 1e3:10.2f} {num_steps / best / 1e6:10.1f} {best / floor:8.2f}")
    verdict = "met" if rows[1][1] <= TARGET_SECONDS else "NOT met"
    print(f"target: first compute() after {args.updates} updates <= {TARGET_SECONDS * 1e3:.0f} ms: {verdict}")


if __name__ == "__main__":
    main()
