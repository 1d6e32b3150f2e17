"""Analyses of a run: each one against a plain-Python computation on small hand-made predictions, and against the
official evaluator's numbers where it must reproduce them (the sweep at the run's threshold is the report's table)."""

import random

import numpy as np
import torch
import pytest

from prmbench_fast.testing.official_oracle import evaluate_official
from prmbench_fast import evaluate, load_prmbench
from prmbench_fast.analysis import _tables_from_counts, analyze
from prmbench_fast.classes import ALL_CLASSES, ERROR_CLASSES
from prmbench_fast.data import PRMBenchDataset, Sample
from prmbench_fast.ratios import f1_metrics, leaderboard_table
from test_evaluate import oracle_samples

# (class, source problem, number of steps, error steps): out-of-range and unsorted error steps included.
SAMPLES = [
    ("correct", "a", 3, ()), ("redundency", "a", 4, (2,)), ("circular", "a", 3, (1, 3)),
    ("counterfactual", "a", 4, (5, 3)), ("multi_solutions", "a", 3, ()), ("correct", "b", 4, ()),
    ("redundency", "b", 5, (4, 1)), ("deception", "b", 5, (2, 3)), ("circular", "b", 2, (2,)),
    ("confidence", "b", 6, (6,)), ("correct", "c", 2, ()), ("missing_condition", "c", 3, (1,)),
]


def hand_dataset():
    return PRMBenchDataset(
        Sample(f"{cls}_{idx}", "q", tuple(["s"] * n), errors, cls, idx) for cls, idx, n, errors in SAMPLES
    )


def hand_predictions(seed=0):
    """Scores on a coarse grid (ties), labels = score > 0.5; one prediction with extra labels, one short, one
    invalid, one with redundancy labels on a circular sample, one duplicate."""
    rng = random.Random(seed)
    results = []
    for cls, idx, n, _ in SAMPLES:
        sample_id = f"{cls}_{idx}"
        count = {"counterfactual_a": n + 2, "deception_b": n - 2}.get(sample_id, n)
        scores = [rng.choice([0.1, 0.3, 0.5, 0.7, 0.9]) for _ in range(count)]
        result = {"idx": sample_id, "scores": {"step_level_validity_scores": scores,
                                               "step_level_validity_labels": [s > 0.5 for s in scores]}}
        if sample_id == "circular_b":
            result["scores"]["step_level_redundancy_labels"] = [True, False]
        if sample_id == "missing_condition_c":
            result = {"idx": sample_id, "validity": False}
        results.append(result)
    return results + [{"idx": "deception_b", "scores": {"step_level_validity_labels": [False] * 5}}]


def kept(results):
    first = {}
    for r in results:
        first.setdefault(r["idx"], r)
    return [r for r in first.values() if r.get("validity", True)]


def scored_labels(sample, result):
    scores = result["scores"]
    if sample.classification in ("redundency", "circular") and "step_level_redundancy_labels" in scores:
        return [not x for x in scores["step_level_redundancy_labels"]]
    return scores["step_level_validity_labels"]


def counted_steps(dataset, results):
    """(class, 1-based position, is error, label, score) of every counted step, plainly."""
    out = []
    for r in kept(results):
        sample = dataset.by_id[r["idx"]]
        if sample.classification == "correct":
            continue
        labels = scored_labels(sample, r)
        scores = r["scores"].get("step_level_validity_scores")
        for i in range(min(len(sample.steps), len(labels))):
            out.append((sample.classification, i + 1, i + 1 in sample.error_steps, labels[i], scores[i] if scores else None))
    return out


@pytest.fixture(scope="module")
def hand():
    dataset, results = hand_dataset(), hand_predictions()
    report = evaluate(dataset, results, keep_scores=True)
    return dataset, results, report, analyze(dataset, report, bootstrap=200, validity_threshold=0.5)


def test_error_step_recall_by_position(hand):
    dataset, results, _, analysis = hand
    expected = {}
    for _, p, is_error, label, _ in counted_steps(dataset, results):
        if is_error:
            expected.setdefault(p, []).append(not label)
    assert analysis["error_step_recall_by_position"] == {
        p: {"steps": len(v), "recall": sum(v) / len(v)} for p, v in sorted(expected.items())}


def test_auroc_counts_pairs_and_half_ties(hand):
    dataset, results, _, analysis = hand
    steps = [(e, s) for _, _, e, _, s in counted_steps(dataset, results) if s is not None]
    correct = [s for e, s in steps if not e]
    error = [s for e, s in steps if e]
    wins = sum((c > w) + 0.5 * (c == w) for c in correct for w in error)
    assert analysis["auroc"] == {"value": pytest.approx(wins / (len(correct) * len(error)), abs=1e-12),
                                 "correct_steps": len(correct), "error_steps": len(error)}


def test_positive_bias(hand):
    dataset, results, report, analysis = hand
    steps = counted_steps(dataset, results)
    for name in [*{c for c, *_ in steps}, "overall"]:
        for kind, want_error in (("correct_steps", False), ("error_steps", True)):
            chosen = [(label, s) for c, _, e, label, s in steps if e == want_error and name in (c, "overall")]
            entry = analysis["positive_bias"][name][kind]
            assert entry["steps"] == len(chosen)
            if chosen:
                assert entry["positive_rate"] == pytest.approx(sum(l for l, _ in chosen) / len(chosen), abs=1e-12)
                assert entry["mean_score"] == pytest.approx(sum(s for _, s in chosen) / len(chosen), abs=1e-12)
        expected = report.official["total_hallucination_results" if name == "overall" else "hallucination_type_results"]["similarity"]
        assert analysis["positive_bias"][name]["similarity"] == (expected if name == "overall" else expected[name])


def relabelled(results, threshold):
    """The predictions with validity labels = score > threshold (redundancy labels kept)."""
    out = []
    for r in results:
        if "scores" in r and "step_level_validity_scores" in r["scores"]:
            r = dict(r, scores=dict(r["scores"], step_level_validity_labels=[
                s > threshold for s in r["scores"]["step_level_validity_scores"]]))
        out.append(r)
    return out


def test_sweep_equals_the_official_evaluator_at_every_threshold(hand):
    dataset, results, report, analysis = hand
    sweep = analysis["threshold_sweep"]
    assert sweep["applicable"] and sweep["run_threshold"] == 0.5
    assert sweep["at_run_threshold"] == report.table
    for i, t in enumerate(sweep["thresholds"]):
        official, _ = evaluate_official(relabelled(results, t), oracle_samples(dataset))
        assert {c: v[i] for c, v in sweep["table"].items()} == leaderboard_table(official), t
    # Best threshold: brute force over one threshold below every score and each distinct score of the swept labels
    # (non-correct samples, extra labels included, circular_b's redundancy labels excluded); the lowest of equals wins.
    distinct = sorted({s for r in kept(results) if r["idx"] != "circular_b" and not r["idx"].startswith("correct")
                       for s in r["scores"]["step_level_validity_scores"]})
    candidates = [distinct[0] - 0.05, *distinct]
    overall = [leaderboard_table(evaluate_official(relabelled(results, t), oracle_samples(dataset))[0])["Overall"]
               for t in candidates]
    best = overall.index(max(overall))
    assert sweep["best"]["table"]["Overall"] == max(overall)
    assert sweep["best"]["threshold"] == (candidates[best] if best else np.nextafter(distinct[0], -1))


def test_sweep_is_not_applicable_where_labels_are_not_a_threshold_of_the_scores(hand):
    dataset, results, _, analysis = hand
    assert analysis["threshold_sweep"]["applicable"]  # the later labels-only deception_b line is ignored
    # Skywork-like difference labels: label_i = score_i - score_{i-1} > -0.05.
    skywork = []
    for r in kept(results):
        s = r["scores"]["step_level_validity_scores"]
        labels = [True] + [b - a > -0.05 for a, b in zip(s, s[1:])]
        skywork.append({"idx": r["idx"], "scores": {"step_level_validity_scores": s, "step_level_validity_labels": labels}})
    report = evaluate(dataset, skywork, keep_scores=True)
    sweep = analyze(dataset, report, bootstrap=0)["threshold_sweep"]
    assert sweep == {"applicable": False, "reason": sweep["reason"]} and "threshold" in sweep["reason"]
    labels_only = [{"idx": r["idx"], "scores": {"step_level_validity_labels": r["scores"]["step_level_validity_labels"]}}
                   for r in kept(results)]
    sweep = analyze(dataset, evaluate(dataset, labels_only), bootstrap=0)["threshold_sweep"]
    assert not sweep["applicable"] and "without validity scores" in sweep["reason"]


def test_vectorised_table_equals_the_leaderboard_formulas():
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 4, size=(300, len(ALL_CLASSES), 4))  # small counts: every sentinel case occurs
    for present in (list(ERROR_CLASSES), ["redundency", "deception", "multi_solutions"]):
        tables = _tables_from_counts(counts, present)
        for r in range(len(counts)):
            per_class = {"f1": {}, "negative_f1": {}}
            for c in present:
                m = f1_metrics(*map(int, counts[r, ALL_CLASSES.index(c)]))
                per_class["f1"][c], per_class["negative_f1"][c] = m["f1"], m["negative_f1"]
            total = counts[r, 1:].sum(axis=0)
            expected = leaderboard_table({"total_hallucination_results": f1_metrics(*map(int, total)),
                                          "hallucination_type_results": per_class})
            for column, value in expected.items():
                if value is None:
                    assert tables[column] is None
                else:
                    assert abs(tables[column][r] - value) <= 1e-12, (r, column)


def test_intervals_are_seeded_and_resample_problems(hand):
    dataset, _, report, analysis = hand
    intervals = analysis["intervals"]
    assert intervals["problems"] == 2  # c's only non-correct prediction is invalid
    assert intervals == analyze(dataset, report, bootstrap=200, validity_threshold=0.5)["intervals"]
    assert intervals != analyze(dataset, report, bootstrap=200, seed=1)["intervals"]
    for column, entry in intervals["columns"].items():
        assert entry["value"] == report.table[column] and entry["low"] <= entry["high"]
    # One problem: every replicate is the data itself, so the interval is the point.
    one = PRMBenchDataset(s for s in dataset if s.source_idx == "a")
    results = [r for r in hand_predictions() if r["idx"] in one.by_id]
    single = analyze(one, evaluate(one, results, keep_scores=True), bootstrap=50)["intervals"]["columns"]
    assert all(e["low"] == e["high"] == pytest.approx(e["value"], abs=1e-12) for e in single.values())


def test_error_position_distribution(hand):
    dataset, _, _, analysis = hand
    domains = {"simplicity": ("redundency", "circular"), "soundness": ("counterfactual", "confidence"),
               "sensitivity": ("multi_solutions", "deception", "missing_condition")}
    for domain, members in domains.items():
        samples = [s for s in SAMPLES if s[0] in members]
        positions = [p for s in samples for p in s[3]]
        assert analysis["error_position_distribution"][domain] == {
            "samples": len(samples),
            "percent": {p: 100 * positions.count(p) / len(samples) for p in sorted(set(positions))},
        }


def test_full_benchmark_sweep_equals_the_table_and_baselines_are_the_official_ones(prmbench_jsonl):
    full = load_prmbench(prmbench_jsonl)
    rng = random.Random(0)
    results = []
    for s in full:
        scores = [rng.random() for _ in range(max(0, len(s.steps) + rng.choice([0, 0, 1, -1])))]
        result = {"idx": s.id, "scores": {"step_level_validity_scores": scores,
                                          "step_level_validity_labels": [x > 0.5 for x in scores]}}
        if rng.random() < 0.1:
            result["scores"]["step_level_redundancy_labels"] = [rng.random() < 0.3 for _ in scores]
        results.append(result)
    report = evaluate(full, results, keep_scores=True)
    analysis = analyze(full, report, validity_threshold=0.5)
    assert analysis["threshold_sweep"]["at_run_threshold"] == report.table
    assert abs(analysis["auroc"]["value"] - 0.5) < 0.02  # random scores
    assert round(analysis["baselines"]["all_positive"]["Overall"], 1) == 45.7  # SPEC §2.5 (run)
    assert round(analysis["baselines"]["all_negative"]["Overall"], 1) == 13.6
    for entry in analysis["intervals"]["columns"].values():
        assert entry["low"] <= entry["value"] <= entry["high"]


def test_best_threshold_equals_a_search_over_every_candidate():
    """The merged-order search against one count per candidate by the per-class sweep and the evaluator's formulas,
    on random steps with many ties, +-inf scores, redundancy-fixed labels and every class."""
    from prmbench_fast.analysis import _best_threshold, _Steps, _Sweep

    rng = np.random.default_rng(7)
    error_ids = [ALL_CLASSES.index(c) for c in ERROR_CLASSES]
    checked = 0
    for _ in range(200):
        n = int(rng.integers(1, 120))
        values = np.concatenate((rng.integers(-4, 5, size=6) * 0.25, [np.inf, -np.inf][:int(rng.integers(0, 3))]))
        score = rng.choice(values, size=n)
        steps = _Steps(class_id=rng.integers(0, len(ALL_CLASSES), size=n), position=np.zeros(n, dtype=np.int64),
                       in_range=np.ones(n, dtype=bool), is_error=rng.random(n) < 0.4, label=rng.random(n) < 0.5,
                       by_validity=rng.random(n) < 0.9, score=score)
        sweep = _Sweep(steps)
        if not len(sweep.scores):
            continue
        distinct = sorted(set(sweep.scores.tolist()))
        candidates = [np.nextafter(distinct[0], -np.inf), *distinct]
        overall = []
        for counts in sweep.counts(np.array(candidates)):
            f1 = f1_metrics(*(int(v) for v in counts[error_ids].sum(axis=0)))
            overall.append(0.5 * f1["f1"] + 0.5 * f1["negative_f1"])
        assert _best_threshold(sweep) == candidates[overall.index(max(overall))]
        checked += 1
    assert checked > 150


def _prepare_and_wait(dataset, device):
    import threading

    from prmbench_fast import analysis

    analysis.prepare_in_background(dataset, torch.device(device))
    for thread in threading.enumerate():
        if thread.name == "prmbench-analysis-prepare":
            thread.join()


def test_prepare_in_background_is_a_head_start_only():
    """What score() starts during the forwards leaves the bootstrap draws of the whole set and, off the CPU, the
    baselines where analyze() finds them, and analyze() gives what it gives from nothing."""
    from prmbench_fast import analysis

    dataset = hand_dataset()
    results = [{"idx": s.id, "scores": {"step_level_validity_scores": [0.1 * (i % 10) for i in range(len(s.steps))],
                                        "step_level_validity_labels": [i % 10 > 5 for i in range(len(s.steps))]}}
               for s in dataset]
    report = evaluate(dataset, results, keep_scores=True)
    analysis._WEIGHTS.clear()
    analysis._BASELINES.pop(dataset, None)
    cold = analyze(dataset, report)
    analysis._WEIGHTS.clear()
    analysis._BASELINES.pop(dataset, None)

    _prepare_and_wait(dataset, "cpu")  # the evaluator's single intra-op thread would slow a CPU model's forwards
    assert list(analysis._WEIGHTS) == [(3, analysis.BOOTSTRAP_SEED, analysis.BOOTSTRAP_REPLICATES)]
    assert dataset not in analysis._BASELINES
    _prepare_and_wait(dataset, "meta")  # any device but the CPU
    assert dataset in analysis._BASELINES
    assert analyze(dataset, report) == cold
    assert cold["intervals"]["problems"] == 3
