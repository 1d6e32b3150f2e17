"""PRMBenchMetric: streamed in random batches and order it equals evaluate() on the same predictions; the first
update of a sample wins; bad arguments are named; two gloo ranks equal one process."""

import json
import random

import pytest
import torch

from conftest import PRMBENCH_JSONL, REPO_ROOT
from prmbench_fast import PRMBenchMetric, evaluate, load_prmbench
from prmbench_fast.predictions import PredictionError
from subprocess_testing import rank_results, run_two_ranks


@pytest.fixture(scope="module")
def full():
    return load_prmbench(PRMBENCH_JSONL)


def random_step_outputs(dataset, seed):
    """Per sample: fewer, as many or more steps than the data has; float32 scores; ReasonEval-style redundancy."""
    rng = random.Random(seed)
    outputs = []
    for sample in dataset:
        n = max(0, len(sample.steps) + rng.choice([0, 0, 0, -2, 1]))
        outputs.append((
            torch.rand(n, generator=torch.Generator().manual_seed(rng.randrange(2**31))),
            torch.rand(n, generator=torch.Generator().manual_seed(rng.randrange(2**31))),
        ))
    return outputs


def stream(metric, dataset, outputs, order, rng, *, with_redundancy):
    """Feed ``outputs`` to the metric in ``order``, in random batch sizes; returns the official result dicts in
    the same order, labelled as the metric labels them."""
    results = []
    i = 0
    while i < len(order):
        batch = order[i:i + rng.randint(1, 400)]
        i += len(batch)
        scores = torch.cat([outputs[p][0] for p in batch])
        redundancy = torch.cat([outputs[p][1] for p in batch])
        cu_steps = torch.zeros(len(batch) + 1, dtype=torch.int32)
        cu_steps[1:] = torch.tensor([outputs[p][0].numel() for p in batch]).cumsum(0)
        metric.update(torch.tensor(batch), scores, cu_steps,
                      redundancy_scores=redundancy if with_redundancy else None)
        for p in batch:
            fields = {"step_level_validity_scores": outputs[p][0].tolist(),
                      "step_level_validity_labels": (outputs[p][0] > 0.5).tolist()}
            if with_redundancy:
                fields["step_level_redundancy_labels"] = (outputs[p][1] > 0.15).tolist()
            results.append({"idx": dataset.samples[p].id, "scores": fields})
    return results


@pytest.mark.parametrize("seed,with_redundancy", [(0, False), (1, True)])
def test_streamed_in_random_batches_and_order_equals_evaluate(full, seed, with_redundancy):
    rng = random.Random(seed)
    outputs = random_step_outputs(full, seed)
    order = list(range(len(full)))
    rng.shuffle(order)
    metric = PRMBenchMetric(full)
    results = stream(metric, full, outputs, order, rng, with_redundancy=with_redundancy)
    streamed = metric.compute()
    expected = evaluate(full, results)
    assert streamed.official == expected.official  # same predictions in the same order: bit for bit
    assert streamed.table == expected.table
    assert torch.equal(streamed.class_counts, expected.class_counts)
    assert torch.equal(streamed.sample_counts, expected.sample_counts)
    assert streamed.sample_ids == expected.sample_ids
    # The redundancy rule really was exercised: without it NR/NCL would differ.
    if with_redundancy:
        plain = evaluate(full, [{"idx": r["idx"], "scores": {"step_level_validity_labels":
                                 r["scores"]["step_level_validity_labels"]}} for r in results])
        assert plain.table["NR"] != streamed.table["NR"]


def test_first_update_of_a_sample_wins_and_reset_forgets(full):
    small = full.subset(limit_per_class=1)
    first = {s.id: torch.ones(len(s.steps)) for s in small}  # everything judged correct
    metric = PRMBenchMetric(small)
    for position, sample in enumerate(small):
        cu = torch.tensor([0, len(sample.steps)], dtype=torch.int32)
        metric.update(torch.tensor([position]), first[sample.id], cu)
        metric.update(torch.tensor([position]), torch.zeros(len(sample.steps)), cu)  # ignored: second
    all_positive = evaluate(small, {s.id: {"step_level_validity_labels": [True] * len(s.steps)} for s in small})
    report = metric.compute()
    assert report.official == all_positive.official
    assert report.diagnostics["duplicate_predictions"] == len(small)
    metric.reset()
    metric.update(torch.tensor([0]), torch.zeros(len(small[0].steps)), torch.tensor([0, len(small[0].steps)]))
    assert len(metric.compute().sample_ids) == 1


@pytest.mark.parametrize("change,argument", [
    (lambda a: {**a, "sample_pos": a["sample_pos"].float()}, "sample_pos"),
    (lambda a: {**a, "sample_pos": torch.tensor([10**6])}, "sample_pos"),
    (lambda a: {**a, "cu_steps": torch.tensor([0, 2, 3])}, "cu_steps"),
    (lambda a: {**a, "cu_steps": torch.tensor([0, 5])}, "cu_steps"),
    (lambda a: {**a, "step_scores": a["step_scores"].long()}, "step_scores"),
    (lambda a: {**a, "step_scores": a["step_scores"][None]}, "step_scores"),
    (lambda a: {**a, "step_labels": torch.ones(2, dtype=torch.bool)}, "step_labels"),
    (lambda a: {**a, "step_labels": torch.ones(3)}, "step_labels"),
    (lambda a: {**a, "redundancy_scores": torch.ones(4)}, "redundancy_scores"),
], ids=["float positions", "position out of range", "offsets shape", "offsets past S", "integer scores",
        "2-D scores", "labels length", "float labels", "redundancy length"])
def test_bad_arguments_raise_a_value_error_naming_the_argument(full, change, argument):
    metric = PRMBenchMetric(full)
    good = {"sample_pos": torch.tensor([0]), "step_scores": torch.rand(3), "cu_steps": torch.tensor([0, 3])}
    with pytest.raises(ValueError, match=argument):
        metric.update(**change(good))
    assert issubclass(PredictionError, ValueError)


CHILD = """
import random, sys, torch
sys.path.insert(0, {tests!r})
from prmbench_fast import PRMBenchMetric, load_prmbench
from subprocess_testing import write_rank_result
from test_metric import random_step_outputs, stream
torch.distributed.init_process_group("gloo")
rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
data = load_prmbench({data!r}, limit_per_class=40)
outputs = random_step_outputs(data, 3)
order = list(range(len(data)))[rank::world]
metric = PRMBenchMetric(data)
stream(metric, data, outputs, order, random.Random(rank), with_redundancy=True)
report = metric.compute()
write_rank_result({out!r}, rank, {{"official": report.official, "table": report.table}})
torch.distributed.destroy_process_group()
"""


def test_two_gloo_ranks_equal_one_process(tmp_path):
    data = load_prmbench(PRMBENCH_JSONL, limit_per_class=40)
    outputs = random_step_outputs(data, 3)
    # One process, in the order the ranks' predictions are gathered (rank 0's, then rank 1's).
    order = list(range(len(data)))[0::2] + list(range(len(data)))[1::2]
    metric = PRMBenchMetric(data)
    stream(metric, data, outputs, order, random.Random(0), with_redundancy=True)
    single = metric.compute()

    script = tmp_path / "child.py"
    script.write_text(CHILD.format(tests=str(REPO_ROOT / "tests"), data=str(PRMBENCH_JSONL), out=str(tmp_path)))
    run_two_ranks(script, timeout=300)
    for got in rank_results(tmp_path):
        assert got["official"] == json.loads(json.dumps(single.official))
        assert got["table"] == json.loads(json.dumps(single.table))
