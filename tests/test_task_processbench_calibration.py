"""ProcessBench calibration (analysis.processbench_calibration, report.analysis["calibration"]): F1 per split against
the validity threshold, each split's best threshold, and gsm8k's best applied to every split, checked against a
brute-force recomputation (every threshold, labels = score > t, the official rule and numbers written out plainly)."""

import math
import random

import pytest
import torch

import prmbench_fast as pf
from prmbench_fast.analysis import processbench_calibration
from prmbench_fast.predictions import StepPredictions
from prmbench_fast.tasks.processbench import evaluate_processbench
from prmbench_fast.testing.processbench_data import write_processbench


@pytest.fixture(scope="module")
def pb_data(prmbench_jsonl, tmp_path_factory):
    folder = tmp_path_factory.mktemp("processbench_calibration")
    write_processbench(prmbench_jsonl, folder, limit_per_class=3)
    return pf.load_prmbench(folder, task="processbench")


def random_run(data, seed):
    """Per predicted sample (positions, a repeat, some missing): scores on a coarse grid (ties), sometimes fewer than
    the steps (truncation), sometimes an invalid prediction; labels = score > 0.5."""
    rng = random.Random(seed)
    entries = []  # (position, scores or None: invalid)
    for pos, sample in enumerate(data.samples):
        if rng.random() < 0.1:
            continue  # no prediction
        if rng.random() < 0.08:
            entries.append((pos, None))
            continue
        n = len(sample.steps) - (rng.randrange(len(sample.steps)) if rng.random() < 0.2 else 0)
        entries.append((pos, [rng.choice([0.0, 0.25, 0.5, 0.75, 1.0, float(rng.randrange(100)) / 100])
                              for _ in range(n)]))
    entries.append((entries[0][0], [0.0] * len(data.samples[entries[0][0]].steps)))  # a repeat: the first wins
    return entries


def to_steps(entries, threshold=0.5):
    scores = [s for _, sc in entries for s in (sc or [])]
    cu = [0]
    for _, sc in entries:
        cu.append(cu[-1] + len(sc or []))
    return StepPredictions(
        sample_pos=torch.tensor([p for p, _ in entries]), cu_steps=torch.tensor(cu, dtype=torch.int32),
        validity_labels=torch.tensor([s > threshold for s in scores], dtype=torch.bool),
        validity_scores=torch.tensor(scores, dtype=torch.float64),
        valid=torch.tensor([sc is not None for _, sc in entries]))


def brute_f1(data, entries, t):
    """split -> F1 at threshold t: the official PRM rule (first step not above t, -1 if none), run_eval.py's numbers."""
    prediction = {}
    for pos, scores in entries:
        if pos in prediction:
            continue
        prediction[pos] = None if scores is None else next((k for k, s in enumerate(scores) if not s > t), -1)
    out = {}
    for split in data.splits:
        rows = [(pos, s) for pos, s in enumerate(data.samples) if s.split == split]
        if not any(pos in prediction for pos, _ in rows):
            continue
        err = [prediction.get(pos) == s.label for pos, s in rows if s.label != -1]
        cor = [prediction.get(pos) == s.label for pos, s in rows if s.label == -1]
        a = sum(err) / len(err) * 100 if err else math.nan
        c = sum(cor) / len(cor) * 100 if cor else math.nan
        out[split] = 2 * a * c / (a + c) if a + c else math.nan
    return out


def same(a, b):
    return (b is None or math.isnan(b)) if a is None else a == pytest.approx(b, rel=0, abs=1e-9)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_calibration_equals_a_brute_force_sweep(pb_data, seed):
    entries = random_run(pb_data, seed)
    cal = processbench_calibration(pb_data, to_steps(entries), validity_threshold=0.5)
    assert cal["applicable"] and cal["run_threshold"] == 0.5
    splits = list(cal["f1"])
    assert splits == [s for s in pb_data.splits if s in brute_f1(pb_data, entries, 0.5)]

    # Every point of the curve.
    for k, t in enumerate(cal["thresholds"]):
        brute = brute_f1(pb_data, entries, t)
        for split in splits:
            assert same(cal["f1"][split][k], brute[split]), (t, split)
        assert same(cal["average_f1"][k], sum(brute.values()) / len(brute))

    # The best threshold per split, over every threshold that can matter (each score, one below them all, and some
    # between and beyond), the lowest of equal ones; gsm8k's applied to every split.
    scores = sorted({s for _, sc in entries for s in (sc or [])})
    grid = sorted(set(scores) | {scores[0] - 1, scores[-1] + 1} | {(a + b) / 2 for a, b in zip(scores, scores[1:])})
    curves = {t: brute_f1(pb_data, entries, t) for t in grid}
    for split in splits:
        values = [(-math.inf if math.isnan(curves[t][split]) else curves[t][split]) for t in grid]
        best_value = max(values)
        assert same(cal["best"][split]["f1"], best_value)
        best_t = cal["best"][split]["threshold"]
        assert same(cal["best"][split]["f1"], brute_f1(pb_data, entries, best_t)[split])
        # The lowest of the best: every lower threshold that labels differently scores less.
        below = [v for t, v in zip(grid, values) if t < best_t and not (t < scores[0] and best_t < scores[0])]
        assert all(v < best_value for v in below)
    assert cal["calibrated"]["split"] == "gsm8k"
    at = brute_f1(pb_data, entries, cal["calibrated"]["threshold"])
    assert cal["calibrated"]["threshold"] == cal["best"]["gsm8k"]["threshold"]
    for split in splits:
        assert same(cal["calibrated"]["f1"][split], at[split])
    assert same(cal["calibrated"]["average_f1"], sum(at.values()) / len(at))


def test_run_threshold_point_is_the_report(pb_data):
    entries = random_run(pb_data, 5)
    report = evaluate_processbench(pb_data, to_steps(entries))
    report.run = {"validity_threshold": 0.5}
    cal = report.to_json()["analysis"]["calibration"]
    k = cal["thresholds"].index(0.5)
    for split in report.splits:
        assert same(cal["f1"][split][k], report.official[split]["f1"])


def test_not_applicable_without_a_threshold_rule(pb_data):
    steps = to_steps(random_run(pb_data, 3))
    flipped = StepPredictions(steps.sample_pos, steps.cu_steps, ~steps.validity_labels, steps.validity_scores,
                              valid=steps.valid)
    assert processbench_calibration(pb_data, flipped)["applicable"] is False
    no_scores = StepPredictions(steps.sample_pos, steps.cu_steps, steps.validity_labels, valid=steps.valid)
    assert processbench_calibration(pb_data, no_scores) == {"applicable": False,
                                                            "reason": "the predictions carry no validity scores"}
