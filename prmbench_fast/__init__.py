"""prmbench_fast: fast, exact PRMBench evaluation of process reward models.

Public API:
    load_prmbench(source=None, *, classes=None, limit_per_class=None, task="prmbench") -> PRMBenchDataset
    evaluate(dataset, predictions, *, validity_threshold=0.5, redundancy_threshold=0.15, backend="auto",
             task="prmbench") -> Report
    evaluate_steps(dataset, step_predictions, *, backend="auto") -> Report   (the flat predictions layout)
    PRMBenchMetric(dataset, ...): update(sample_pos, step_scores, cu_steps, ...) / compute() / reset()
    ProcessBenchMetric(dataset, ...): the same update(), compute() -> ProcessBenchReport
    load_processbench(source=None) -> ProcessBenchDataset  (= load_prmbench(source, task="processbench"); samples
        are ProcessBenchSample, a bad file raises ProcessBenchDataError)
    score(model, dataset=None, *, tokenizer=None, family="auto", max_length=2048, task="prmbench", ...) -> Report
    PRMBenchCallback(dataset, *, trainer, tokenizer=None, family="auto", every_n_steps=None, ...)  (transformers
        Trainer; prmbench_fast.integrations.lightning.PRMBenchCallback for Lightning)
    benchmark_batches(dataset, tokenizer, *, family="generic", ...) -> PackedBenchmark  (packed batches for your own
        forward, fed to PRMBenchMetric)
    step_rewards(hidden, step_pos, weight, bias=None, *, activation="softmax", backend="auto") -> (S, C) float32
    step_token_probs(hidden, step_pos, lm_head_weight, token_ids, *, lm_head_bias=None, backend="auto") -> (S, K)

Importing the package touches no GPU and does not import Triton or transformers; score() and the kernels load on
first use.
"""

from . import tasks  # noqa: F401 (the task registry: installs the task lookup load_prmbench/evaluate(task=) use)
from .data import PRMBenchDataError, PRMBenchDataset, Sample, load_prmbench
from .evaluate import PredictionError, Report, evaluate, evaluate_steps
from .streaming_metric import PRMBenchMetric, ProcessBenchMetric
from .predictions import StepPredictions
from .tasks.processbench import (
    ProcessBenchDataError,
    ProcessBenchDataset,
    ProcessBenchReport,
    ProcessBenchSample,
    load_processbench,
)

__version__ = "0.1.0"

_LAZY = {
    "PRMBenchCallback": ("prmbench_fast.integrations.transformers", "PRMBenchCallback"),
    "benchmark_batches": ("prmbench_fast.packed_benchmark", "benchmark_batches"),
    "score": ("prmbench_fast.scoring", "score"),
    "step_rewards": ("prmbench_fast.kernels.step_reward", "step_rewards"),
    "step_token_probs": ("prmbench_fast.kernels.step_reward", "step_token_probs"),
}

__all__ = [
    "PRMBenchDataError",
    "PRMBenchDataset",
    "PRMBenchMetric",
    "PredictionError",
    "ProcessBenchDataError",
    "ProcessBenchDataset",
    "ProcessBenchMetric",
    "ProcessBenchReport",
    "ProcessBenchSample",
    "Report",
    "Sample",
    "StepPredictions",
    "evaluate",
    "evaluate_steps",
    "load_prmbench",
    "load_processbench",
    *_LAZY,
]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module_name, attribute = _LAZY[name]
        return getattr(importlib.import_module(module_name), attribute)
    raise AttributeError(f"module 'prmbench_fast' has no attribute {name!r}")
