"""pytest-benchmark suite: ``evaluate()`` against the official ``evaluate_function`` loop on the full benchmark.

Not part of the test run (see bench/suite_kernels.py); ``make bench-kernels`` runs both suites. One group per
realistic prediction set (bench/bench_evaluate.py's), its providers side by side; every provider's numbers are
checked equal to the official loop's before it is timed.
"""

from __future__ import annotations

import os
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench_evaluate import prediction_set  # noqa: E402

from prmbench_fast import evaluate, load_prmbench  # noqa: E402
from prmbench_fast.predictions import parse_results  # noqa: E402
from prmbench_fast.testing.official_oracle import evaluate_official  # noqa: E402

DATA = os.environ.get("PRMBENCH_DATA", str(pathlib.Path(__file__).resolve().parents[2] / "shared" / "prmbench"
                                           / "prmbench_preview.jsonl"))


@pytest.fixture(scope="module")
def dataset():
    return load_prmbench(DATA)


@pytest.fixture(scope="module")
def oracle_samples(dataset):
    return [{"idx": s.id, "steps": list(s.steps), "error_steps": list(s.error_steps),
             "classification": s.classification} for s in dataset]


@pytest.mark.parametrize("provider", ["official_loop", "evaluate_dicts", "evaluate_flat"])
@pytest.mark.parametrize("kind", ["labels", "scores+labels", "reasonEval", "critic"])
def test_evaluate(benchmark, dataset, oracle_samples, kind, provider):
    results = prediction_set(dataset, kind)
    benchmark.group = f"evaluate full benchmark, {kind} predictions"
    official, _ = evaluate_official(results, oracle_samples)
    if provider == "official_loop":
        benchmark.pedantic(lambda: evaluate_official(results, oracle_samples), rounds=5, warmup_rounds=1)
        return
    given = results if provider == "evaluate_dicts" else parse_results(dataset, results).predictions
    ours = evaluate(dataset, given).official
    assert ours["total_hallucination_results"] == official["total_hallucination_results"]
    assert ours["hallucination_type_results"] == official["hallucination_type_results"]
    benchmark.pedantic(lambda: evaluate(dataset, given), rounds=20, warmup_rounds=2)
