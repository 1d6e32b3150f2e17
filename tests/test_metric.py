"""PRMBenchMetric: streamed in random batches and order it equals evaluate() on the same predictions; the first
update of a sample wins; bad arguments are named; two gloo ranks equal one process."""

import gc
import json
import math
import random
import weakref

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


def flat_batch(dataset, positions, seed=0):
    """(sample_pos, scores, cu_steps) of one update: as many random scores as each sample has steps."""
    counts = [len(dataset.samples[p].steps) for p in positions]
    cu_steps = torch.zeros(len(positions) + 1, dtype=torch.int32)
    cu_steps[1:] = torch.tensor(counts).cumsum(0)
    return torch.tensor(positions), torch.rand(sum(counts), generator=torch.Generator().manual_seed(seed)), cu_steps


def results_of(dataset, positions, scores, cu_steps, redundancy=None):
    """The official result dicts the metric's labels correspond to (scores > 0.5, redundancy > 0.15)."""
    out = []
    for b, p in enumerate(positions):
        piece = scores[cu_steps[b]:cu_steps[b + 1]]
        fields = {"step_level_validity_labels": (piece > 0.5).tolist()}
        if redundancy is not None:
            fields["step_level_redundancy_labels"] = (redundancy[cu_steps[b]:cu_steps[b + 1]] > 0.15).tolist()
        out.append({"idx": dataset.samples[p].id, "scores": fields})
    return out


@pytest.fixture(scope="module")
def small(full):
    return full.subset(limit_per_class=10)


def test_ragged_updates_equal_flat_ones(small):
    positions = list(range(len(small)))
    sample_pos, scores, cu_steps = flat_batch(small, positions)
    flat = PRMBenchMetric(small)
    flat.update(sample_pos, scores, cu_steps)
    per_sample = [scores[cu_steps[b]:cu_steps[b + 1]] for b in range(len(positions))]
    ragged = PRMBenchMetric(small)
    ragged.update(positions[:5], per_sample[:5])  # a list of ints and per-sample tensors
    ragged.update(sample_pos[5:], [t.tolist() for t in per_sample[5:]],  # per-sample lists of numbers, with labels
                  step_labels=[(t > 0.5).tolist() for t in per_sample[5:]])
    assert ragged.compute().official == flat.compute().official == evaluate(
        small, results_of(small, positions, scores, cu_steps)).official
    with pytest.raises(ValueError, match="cu_steps must not be given"):
        ragged.update(positions[:2], per_sample[:2], cu_steps[:3])
    with pytest.raises(ValueError, match="step_labels: per-sample lengths"):
        ragged.update(positions[:2], per_sample[:2], step_labels=[[True], [False]])
    with pytest.raises(ValueError, match=r"step_scores: expected one sequence per sample \(2\)"):
        ragged.update(positions[:2], per_sample[:3])


def test_compute_is_incremental_and_mixes_updates_with_and_without_redundancy(small):
    """Updates joined by one compute() and updates after it; half of them with redundancy scores (the others are
    scored by validity labels alone, as result dicts without redundancy labels are), half of them in float16."""
    order = list(range(len(small)))
    random.Random(0).shuffle(order)
    metric = PRMBenchMetric(small)
    results = []
    for i in range(0, len(order), 7):
        positions = order[i:i + 7]
        sample_pos, scores, cu_steps = flat_batch(small, positions, seed=i)
        redundancy = torch.rand(scores.shape, generator=torch.Generator().manual_seed(i + 1)) if i % 2 else None
        if i % 3 == 0:
            scores = scores.half()
        metric.update(sample_pos, scores, cu_steps, redundancy_scores=redundancy)
        results += results_of(small, positions, scores, cu_steps, redundancy)
        if i == 7 * 10:
            assert metric.compute().official == evaluate(small, results).official
    assert metric.compute().official == evaluate(small, results).official
    assert metric.compute().official == evaluate(small, results).official  # the joined state is kept as it was


def test_update_keeps_no_autograd_graph(small):
    sample_pos, scores, cu_steps = flat_batch(small, [0, 1])
    saved = torch.rand(scores.shape, requires_grad=True).exp()  # a tensor the graph of `live` keeps for backward
    alive = weakref.ref(saved)
    live = scores * saved
    del saved
    metric = PRMBenchMetric(small)
    metric.update(sample_pos, live, cu_steps)
    metric.update(sample_pos[:1], [live[: cu_steps[1]]])  # ragged, too
    del live
    gc.collect()
    assert alive() is None  # the metric holds detached scores, so nothing keeps the graph's tensors
    metric.compute()


@pytest.mark.parametrize("argument", ["step_scores", "redundancy_scores"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_scores_are_refused_naming_the_argument(small, argument, value):
    sample_pos, scores, cu_steps = flat_batch(small, [0, 1])
    bad = scores.clone()
    bad[1] = value
    metric = PRMBenchMetric(small)
    options = {"step_scores": scores, "redundancy_scores": scores, argument: bad}
    with pytest.raises(ValueError, match=f"{argument}: non-finite"):
        metric.update(sample_pos, options.pop("step_scores"), cu_steps, **options)
    with pytest.raises(ValueError, match=f"{argument}: non-finite"):  # per-sample lists too
        ragged = {name: [t[: cu_steps[1]], t[cu_steps[1]:]] for name, t in
                  {"step_scores": scores, "redundancy_scores": scores, argument: bad}.items()}
        metric.update(sample_pos, ragged.pop("step_scores"), **ragged)
    with pytest.raises(ValueError, match="no predictions"):  # the refused batches did not enter the state
        metric.compute()


@pytest.mark.parametrize("options,error,argument", [
    ({"validity_threshold": math.nan}, ValueError, "validity_threshold"),
    ({"validity_threshold": None}, TypeError, "validity_threshold"),
    ({"validity_threshold": "0.5"}, TypeError, "validity_threshold"),
    ({"redundancy_threshold": math.inf}, ValueError, "redundancy_threshold"),
    ({"redundancy_threshold": True}, TypeError, "redundancy_threshold"),
    ({"backend": "gpu"}, ValueError, "backend"),
    ({"device": 0}, TypeError, "device"),
], ids=["nan threshold", "None threshold", "string threshold", "inf redundancy threshold", "bool threshold",
        "unknown backend", "int device"])
def test_bad_construction_is_refused_naming_the_argument(small, options, error, argument):
    with pytest.raises(error, match=argument):
        PRMBenchMetric(small, **options)


@pytest.mark.parametrize("dataset", [[], "prmbench_preview.jsonl", None], ids=["list", "path", "None"])
def test_a_dataset_that_is_not_one_is_refused_at_construction(dataset):
    with pytest.raises(TypeError, match="dataset must be a PRMBenchDataset"):
        PRMBenchMetric(dataset)


def test_compute_with_nothing_updated_raises_as_evaluate_does(small):
    metric = PRMBenchMetric(small)
    with pytest.raises(PredictionError, match="no predictions"):
        metric.compute()
    with pytest.raises(PredictionError, match="no predictions"):
        evaluate(small, [])
    metric.update(*flat_batch(small, [0]))
    metric.compute()
    metric.reset()
    with pytest.raises(PredictionError, match="no predictions"):
        metric.compute()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_values_are_checked_in_compute_without_a_sync_in_update(small):
    sample_pos, scores, cu_steps = (t.cuda() for t in flat_batch(small, [0, 1]))
    scores[0] = math.nan
    metric = PRMBenchMetric(small)
    metric.update(sample_pos, scores, cu_steps)  # accepted: reading the value would synchronise the host
    with pytest.raises(ValueError, match="step_scores: non-finite"):
        metric.compute()
    empty = PRMBenchMetric(small, device="cuda")
    assert empty.device == torch.device("cuda")


EMPTY_RANK_CHILD = """
import sys, torch
sys.path.insert(0, {tests!r})
from prmbench_fast import PRMBenchMetric, load_prmbench
from subprocess_testing import write_rank_result
from test_metric import flat_batch
torch.distributed.init_process_group("gloo")
rank = torch.distributed.get_rank()
data = load_prmbench({data!r}, limit_per_class=2)
metric = PRMBenchMetric(data, device="cpu")
if rank == 0:  # rank 1 has nothing to update: its empty state still joins the gathers
    metric.update(*flat_batch(data, list(range(len(data)))))
write_rank_result({out!r}, rank, {{"table": metric.compute().table}})
torch.distributed.destroy_process_group()
"""


def test_a_rank_without_updates_joins_compute(tmp_path):
    data = load_prmbench(PRMBENCH_JSONL, limit_per_class=2)
    metric = PRMBenchMetric(data)
    metric.update(*flat_batch(data, list(range(len(data)))))
    single = metric.compute()
    script = tmp_path / "child.py"
    script.write_text(EMPTY_RANK_CHILD.format(tests=str(REPO_ROOT / "tests"), data=str(PRMBENCH_JSONL),
                                              out=str(tmp_path)))
    run_two_ranks(script, timeout=300)
    for got in rank_results(tmp_path):
        assert got["table"] == json.loads(json.dumps(single.table))
