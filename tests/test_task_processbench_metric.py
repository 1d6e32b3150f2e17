"""ProcessBenchMetric: fed in random batches (random sizes and order, flat or per-sample, repeats, invalid
predictions), compute() equals evaluate(..., task="processbench") on the same predictions."""

import math
import random

import pytest
import torch

import prmbench_fast as pf
from prmbench_fast.predictions import StepPredictions
from prmbench_fast.streaming_metric import ProcessBenchMetric
from prmbench_fast.testing.processbench_data import write_processbench


@pytest.fixture(scope="module")
def pb_data(prmbench_jsonl, tmp_path_factory):
    folder = tmp_path_factory.mktemp("processbench_metric")
    write_processbench(prmbench_jsonl, folder, limit_per_class=4)
    return pf.load_prmbench(folder, task="processbench")


def same_official(a, b):
    assert a.keys() == b.keys()
    for key, value in a.items():
        if isinstance(value, dict):
            same_official(value, b[key])
        else:
            assert value == b[key] or (math.isnan(value) and math.isnan(b[key])), key


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_batches_equal_evaluate(pb_data, seed):
    rng = random.Random(seed)
    positions = list(range(len(pb_data))) + rng.sample(range(len(pb_data)), 5)  # repeats: the first update wins
    positions = [p for p in positions if rng.random() > 0.1]  # some samples never predicted
    rng.shuffle(positions)
    entries = []
    for pos in positions:
        n = len(pb_data.samples[pos].steps) - (rng.randrange(len(pb_data.samples[pos].steps)) if rng.random() < .2 else 0)
        entries.append((pos, [rng.choice([0.1, 0.5, 0.9, rng.random()]) for _ in range(n)], rng.random() > 0.05))

    metric = ProcessBenchMetric(pb_data, validity_threshold=0.5)
    k = 0
    while k < len(entries):
        batch = entries[k:k + rng.randint(1, 40)]
        k += len(batch)
        sample_pos = [p for p, _, _ in batch]
        if rng.random() < 0.5:  # per-sample lists; they carry no valid flags, so these predictions are valid
            metric.update(sample_pos, [torch.tensor(s, dtype=torch.float64) for _, s, _ in batch])
            entries[k - len(batch):k] = [(p, s, True) for p, s, _ in batch]
        else:
            scores = torch.tensor([x for _, s, _ in batch for x in s], dtype=torch.float64)
            cu = torch.tensor([0] + [len(s) for _, s, _ in batch]).cumsum(0)
            metric.update(torch.tensor(sample_pos), scores, cu, valid=torch.tensor([v for _, _, v in batch]))

    scores = [x for _, s, _ in entries for x in s]
    flat = StepPredictions(
        sample_pos=torch.tensor([p for p, _, _ in entries]),
        cu_steps=torch.tensor([0] + [len(s) for _, s, _ in entries]).cumsum(0).int(),
        validity_labels=torch.tensor(scores, dtype=torch.float64) > 0.5,
        validity_scores=torch.tensor(scores, dtype=torch.float64),
        valid=torch.tensor([v for _, _, v in entries]))
    expected = pf.evaluate(pb_data, flat, task="processbench")
    got = metric.compute()
    same_official(got.official, expected.official)
    assert got.counts == expected.counts and got.predictions == expected.predictions


def test_refuses_prmbench_data(prmbench_jsonl):
    with pytest.raises(TypeError, match=r"ProcessBenchDataset \(prmbench_fast.load_prmbench\(path, task=\"processbench\"\)\)"):
        ProcessBenchMetric(pf.load_prmbench(prmbench_jsonl, limit_per_class=1))
