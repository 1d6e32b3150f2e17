"""prmbench_fast.distributed: ranks whose predictions differ in dtype (bf16 scores on one rank, fp32 on another, an
empty rank whose missing scores are an fp32 NaN fill) gather to the single-process concatenation, value for value
and dtype for dtype, on every rank."""

from __future__ import annotations

import math

import torch

from conftest import REPO_ROOT
from prmbench_fast.predictions import StepPredictions
from subprocess_testing import rank_results, run_two_ranks

SCENARIOS = ("empty", "mixed")


def rank_predictions(scenario: str, rank: int) -> StepPredictions:
    """What rank ``rank`` holds in ``scenario``: rank 0 two samples with bf16 scores; rank 1 nothing ("empty") or
    one sample with fp32 validity scores and fp64 redundancy scores ("mixed")."""
    if rank == 0:
        scores = torch.tensor([0.25, 0.5078125, 0.9921875], dtype=torch.bfloat16)
        return StepPredictions(sample_pos=torch.tensor([0, 2]), cu_steps=torch.tensor([0, 1, 3], dtype=torch.int32),
                               validity_labels=scores > 0.5, validity_scores=scores)  # fmt: skip
    if scenario == "empty":
        return StepPredictions.empty()
    # 0.1 (as fp32) and 0.7 + 2**-20 are no bf16 numbers: a gather through bf16 would change them.
    scores = torch.tensor([0.1, 0.7 + 2**-20, 0.3], dtype=torch.float32)
    redundancy = torch.tensor([0.125, 0.1, 1.0], dtype=torch.float64)
    return StepPredictions(sample_pos=torch.tensor([1]), cu_steps=torch.tensor([0, 3], dtype=torch.int32),
                           validity_labels=scores > 0.5, validity_scores=scores, redundancy_labels=redundancy > 0.15,
                           redundancy_scores=redundancy, valid=torch.tensor([True]))  # fmt: skip


def as_json(predictions: StepPredictions) -> dict:
    """Each field as [dtype, values] (NaN as the string "nan": the comparison is exact, NaN included)."""
    out = {}
    for name in ("sample_pos", "cu_steps", "validity_labels", *StepPredictions.OPTIONAL_FIELDS):
        value = getattr(predictions, name)
        if value is not None:
            values = [("nan" if isinstance(v, float) and math.isnan(v) else v) for v in value.tolist()]
            out[name] = [str(value.dtype), values]
    return out


CHILD = """
import sys, torch
sys.path.insert(0, {tests!r})
from prmbench_fast.distributed import gather_predictions
from subprocess_testing import write_rank_result
from test_distributed import SCENARIOS, as_json, rank_predictions
torch.distributed.init_process_group("gloo")
rank = torch.distributed.get_rank()
write_rank_result({out!r}, rank, {{s: as_json(gather_predictions(rank_predictions(s, rank))) for s in SCENARIOS}})
torch.distributed.destroy_process_group()
"""


def test_two_gloo_ranks_with_different_dtypes_equal_one_process(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(tests=str(REPO_ROOT / "tests"), out=str(tmp_path)))
    run_two_ranks(script, timeout=300)
    results = rank_results(tmp_path)
    for scenario in SCENARIOS:
        # One process: the ranks' parts concatenated in rank order.
        single = as_json(StepPredictions.concat([rank_predictions(scenario, 0), rank_predictions(scenario, 1)]))
        assert single["validity_scores"][0] == "torch.float32"  # bf16 next to fp32 (or the fp32 NaN fill)
        for got in results:
            assert got[scenario] == single, scenario
