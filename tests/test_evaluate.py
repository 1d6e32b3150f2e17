"""evaluate() equals the official PRMBench evaluator: counts bit for bit, ratios to 1e-12, every quirk of SPEC §2.6."""

import json
import math
import random

import pytest

from prmbench_fast.testing.official_oracle import evaluate_official
from prmbench_fast import PredictionError, evaluate, load_prmbench
from prmbench_fast.data import PRMBenchDataset, Sample
from prmbench_fast.ratios import leaderboard_table

BACKENDS = ["cpu", "torch"]


@pytest.fixture(scope="module")
def full(prmbench_jsonl):
    return load_prmbench(prmbench_jsonl)


def oracle_samples(dataset):
    return [
        {"idx": s.id, "steps": list(s.steps), "error_steps": list(s.error_steps), "classification": s.classification}
        for s in dataset
    ]


def assert_official_equal(expected, actual, path="official"):
    """Same keys; ints identical; floats within 1e-12 (the metric bar); no silent type drift to numpy."""
    if isinstance(expected, dict):
        assert set(actual) == set(expected), f"{path}: keys differ: {set(actual) ^ set(expected)}"
        for key in expected:
            assert_official_equal(expected[key], actual[key], f"{path}.{key}")
        return
    assert type(actual) in (int, float), f"{path}: {type(actual).__name__}"
    if isinstance(expected, int) and isinstance(actual, int):
        assert actual == expected, f"{path}: {actual} != {expected}"
    else:
        assert abs(actual - expected) <= 1e-12, f"{path}: {actual} != {expected}"


def random_predictions(dataset, seed, *, label_count_noise=True, invalid_rate=0.02, redundancy_rate=0.1):
    rng = random.Random(seed)
    results = []
    for s in dataset:
        n = len(s.steps)
        if label_count_noise:
            n = max(0, n + rng.choice([0, 0, 0, 0, 1, 2, -1, -4]))
        p_true = rng.choice([0.2, 0.7, 0.9, 1.0])
        scores = {"step_level_validity_labels": [rng.random() < p_true for _ in range(n)]}
        if rng.random() < redundancy_rate:
            scores["step_level_redundancy_labels"] = [rng.random() < 0.3 for _ in range(n)]
        result = {"idx": s.id, "scores": scores}
        if rng.random() < invalid_rate:
            result["validity"] = False
        results.append(result)
    rng.shuffle(results)
    return results


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", [0, 1])
def test_random_predictions_on_full_data_equal_the_official_evaluator(full, backend, seed):
    results = random_predictions(full, seed)
    # Duplicates and unknown ids on top: the first result per id wins, unknown ids are ignored.
    results += [dict(results[0], scores={"step_level_validity_labels": []}), {"idx": "nope", "scores": {}}]
    expected, details = evaluate_official(results, oracle_samples(full))
    report = evaluate(full, results, backend=backend)
    assert_official_equal(expected, report.official)
    per_sample = report.sample_results()
    assert set(per_sample) == set(details)
    for sample_id, d in details.items():
        for key in ("correct_step_acc", "wrong_step_acc", "total_step_acc", "first_error_acc", "model_response_acc", "f1_matrix"):
            assert per_sample[sample_id][key] == d[key], (sample_id, key)
    assert report.diagnostics["duplicate_predictions"] == 1
    assert report.diagnostics["unknown_prediction_ids"] == ["nope"]


def test_mapping_and_list_inputs_agree(full):
    results = random_predictions(full, 3)
    as_mapping = {r["idx"]: {k: v for k, v in r.items() if k != "idx"} for r in results}
    assert evaluate(full, as_mapping).official == evaluate(full, results).official


def test_skywork_official_per_sample_results(full):
    """Real official output: the first 1,000 detailed logs of the official Skywork-PRM-7B run."""
    from conftest import FIXTURES

    logs = [json.loads(line) for line in open(FIXTURES / "skywork7b_detailed_logs_first1000.jsonl")]
    predictions = [log["prediction"] for log in logs]
    report = evaluate(full.restrict_to(log["idx"] for log in logs), predictions)
    ours = report.sample_results()
    assert len(ours) == 1000
    for log in logs:
        expected = log["results"]
        got = ours[log["idx"]]
        for key in ("correct_step_acc", "wrong_step_acc", "total_step_acc", "first_error_acc", "model_response_acc", "f1_matrix"):
            assert got[key] == expected[key], (log["idx"], key, got[key], expected[key])


def test_leaderboard_row_from_the_official_skywork_summary():
    """The published leaderboard row (SPEC §6.1) from the official aggregate of the full Skywork-PRM-7B run."""
    from conftest import FIXTURES

    summary = json.loads((FIXTURES / "skywork7b_prmtest_classified_summary.json").read_text())
    table = leaderboard_table(summary)
    published = {"Overall": 65.1, "NR": 56.4, "NCL": 62.8, "S1": 59.6, "ES": 69.4, "SC": 67.1, "DC": 67.7, "CI": 69.9,
                 "S2": 68.5, "PS": 60.9, "DR": 65.8, "MS": 93.2, "S3": 73.3}
    assert {k: round(v, 1) for k, v in table.items()} == published
    assert table["Overall"] == pytest.approx(65.0712, abs=5e-5)  # full precision printed in the BoN notebook


@pytest.mark.parametrize("label, expected_overall", [(True, 45.7), (False, 13.6)])
def test_trivial_predictors_reproduce_the_spec_values(full, label, expected_overall):
    predictions = {s.id: {"scores": {"step_level_validity_labels": [label] * len(s.steps)}} for s in full}
    report = evaluate(full, predictions)
    assert round(report.table["Overall"], 1) == expected_overall
    if label:
        assert report.official["total_hallucination_results"]["f1"] == pytest.approx(0.9144, abs=5e-5)
        # NP = TN / (TN + FN) = -1 (empty), NR = TN / (TN + FP) = 0: the sentinel arithmetic gives NF1 = 0.0 (SPEC §2.5).
        assert report.official["total_hallucination_results"]["negative_precision"] == -1
        assert report.official["total_hallucination_results"]["negative_f1"] == 0.0


# ---------------------------------------------------------------------------------------------------------------------
# SPEC §2.6, one named test per quirk, on small hand-made data sets checked against the oracle.


def tiny_dataset(*samples):
    return PRMBenchDataset(
        Sample(id=f"{cls}_{idx}" if cls != "correct" else f"correct_{idx}", question="q", steps=tuple(["s"] * n_steps),
               error_steps=tuple(errors), classification=cls, source_idx=idx)
        for cls, idx, n_steps, errors in samples
    )


def check_against_oracle(dataset, results):
    expected, _ = evaluate_official(results, oracle_samples(dataset))
    report = evaluate(dataset, results)
    assert_official_equal(expected, report.official)
    return report


def labels(sample_id, values, **extra):
    return {"idx": sample_id, "scores": {"step_level_validity_labels": values}, **extra}


def test_quirk_01_fewer_labels_leave_steps_unscored_and_extra_labels_count_as_correct_steps():
    ds = tiny_dataset(("correct", "p", 4, ()), ("circular", "p", 4, (2,)), ("deception", "p", 3, (3, 5)))
    report = check_against_oracle(ds, [
        labels("correct_p", [True] * 4),
        labels("circular_p", [True]),  # steps 2..4 unscored; the first error (step 2) too
        labels("deception_p", [True, True, False, True, False]),  # label 5 hits the out-of-range error step 5
    ])
    counts = dict(zip(report.sample_ids, report.sample_counts.tolist()))
    assert counts["circular_p"][:4] == [1, 0, 0, 0] and counts["circular_p"][5] == -1
    assert counts["deception_p"][:4] == [3, 0, 2, 0]  # label 4 (extra) is TP, label 5 on error step 5 is TN
    assert report.diagnostics["steps_left_unscored"] == 3
    assert report.diagnostics["extra_labels"] == 2
    assert report.diagnostics["first_errors_left_unscored"] == 1


def test_quirk_01_perfect_labels_plus_one_extra_true_on_full_data(full):
    """SPEC §2.6: perfect labels plus one extra True give PRMScore 99.88 and wrong_step_acc .9958 (official run)."""
    predictions = {
        s.id: {"scores": {"step_level_validity_labels": [i + 1 not in s.error_steps for i in range(len(s.steps))] + [True]}}
        for s in full
    }
    report = evaluate(full, predictions)
    assert round(report.table["Overall"], 2) == 99.88
    assert round(report.official["total_hallucination_results"]["wrong_step_acc"], 4) == 0.9958


def test_quirk_02_out_of_range_error_steps_are_never_scored_otherwise():
    ds = tiny_dataset(("correct", "p", 2, ()), ("counterfactual", "p", 2, (7,)))
    report = check_against_oracle(ds, [labels("correct_p", [True, True]), labels("counterfactual_p", [True, False])])
    assert report.official["hallucination_type_results"]["wrong_step_acc"]["counterfactual"] == -1
    assert report.official["hallucination_type_results"]["first_error_acc"]["counterfactual"] == -1


def test_quirk_03_first_result_per_id_wins():
    ds = tiny_dataset(("correct", "p", 2, ()), ("confidence", "p", 2, (1,)))
    report = check_against_oracle(ds, [
        labels("correct_p", [True, True]), labels("confidence_p", [False, True]), labels("confidence_p", [True, True]),
    ])
    assert report.official["hallucination_type_results"]["first_error_acc"]["confidence"] == 1.0
    assert report.diagnostics["duplicate_predictions"] == 1


def test_quirk_04_correct_samples_feed_similarity_but_not_the_totals():
    ds = tiny_dataset(("correct", "p", 4, ()), ("deception", "p", 4, (2,)))
    report = check_against_oracle(ds, [labels("correct_p", [False, True, True, True]), labels("deception_p", [True, False, True, True])])
    totals = report.official["total_hallucination_results"]
    assert totals["precision"] == 1.0 and totals["recall"] == 1.0  # the correct sample's FN is not pooled
    assert report.official["hallucination_type_results"]["recall"]["correct"] == 0.75
    assert totals["similarity"] == 0.0  # |3/4 - 3/4|


def test_quirk_05_redundancy_labels_are_inverted_on_nr_and_ncl_only():
    ds = tiny_dataset(("correct", "p", 2, ()), ("redundency", "p", 2, (2,)), ("circular", "p", 2, (2,)), ("confidence", "p", 2, (2,)))
    both = {"step_level_validity_labels": [True, True], "step_level_redundancy_labels": [False, True]}
    report = check_against_oracle(ds, [
        labels("correct_p", [True, True]),
        {"idx": "redundency_p", "scores": both}, {"idx": "circular_p", "scores": both}, {"idx": "confidence_p", "scores": both},
    ])
    per_class = report.official["hallucination_type_results"]
    assert per_class["wrong_step_acc"]["redundency"] == 1.0  # NOT(redundant) = negative on the error step
    assert per_class["wrong_step_acc"]["circular"] == 1.0
    assert per_class["wrong_step_acc"]["confidence"] == 0.0  # validity labels used


def test_quirk_06_sentinel_arithmetic_inside_f1():
    ds = tiny_dataset(
        ("correct", "p", 2, ()), ("step_contradiction", "p", 3, (2,)), ("multi_solutions", "p", 2, ()),
        ("correct", "q", 1, ()), ("multi_solutions", "q", 1, ()),
    )
    report = check_against_oracle(ds, [
        labels("correct_p", [True, True]),
        labels("step_contradiction_p", [False, True, False]),  # TP = 0, FP > 0, FN > 0: P = R = 0 -> F1 = -1
        labels("multi_solutions_p", [True, False]),  # no error steps, FN > 0: NR = -1, NP = 0 -> NF1 = 0.0
        labels("correct_q", [True]), labels("multi_solutions_q", [True]),
    ])
    per_class = report.official["hallucination_type_results"]
    assert per_class["f1"]["step_contradiction"] == -1
    assert per_class["negative_f1"]["multi_solutions"] == 0.0
    assert per_class["negative_f1"]["correct"] == -1  # both sides -1
    assert report.table["SC"] == 0.0  # clamped on the leaderboard


def test_quirk_07_similarity_skips_a_partner_of_exactly_zero_but_keeps_minus_one():
    ds = tiny_dataset(("correct", "a", 2, ()), ("circular", "a", 2, ()), ("correct", "b", 2, ()), ("circular", "b", 2, ()))
    report = check_against_oracle(ds, [
        labels("correct_a", [False, False]),  # model_response_acc 0.0: falsy, the pair is dropped
        labels("circular_a", [True, True]),
        labels("correct_b", []),  # no labels: -1, truthy, the pair is kept: |1.0 - (-1)| = 2
        labels("circular_b", [True, True]),
    ])
    assert report.official["hallucination_type_results"]["similarity"]["circular"] == 2.0


def test_quirk_08_validity_denominator_subtracts_correct_predictions_not_correct_samples():
    ds = tiny_dataset(("correct", "a", 1, ()), ("deception", "a", 1, ()), ("correct", "b", 1, ()), ("deception", "b", 1, ()))
    report = check_against_oracle(ds, [
        labels("correct_a", [True], validity=False),  # an invalid correct prediction still counts as a correct prediction
        labels("deception_a", [True]), labels("deception_b", [True], validity=False),
    ])  # correct_b has no prediction at all
    assert report.official["validitiy_rate"] == 1 / 3  # valid 1 / (4 samples - 1 correct prediction)
    assert report.diagnostics["missing_ids"] == ["correct_b"]
    assert report.diagnostics["invalid_predictions"] == ["correct_a", "deception_b"]


def test_quirk_09_scores_are_labelled_by_a_strict_threshold():
    ds = tiny_dataset(("correct", "p", 3, ()), ("confidence", "p", 3, (3,)))
    report = evaluate(ds, [
        {"idx": "correct_p", "scores": {"step_level_validity_scores": [0.5, 0.5000001, 0.9]}},
        {"idx": "confidence_p", "scores": {"step_level_validity_scores": [0.6, 0.2, 0.5]}},
    ])
    counts = dict(zip(report.sample_ids, report.sample_counts.tolist()))
    assert counts["correct_p"][:4] == [2, 0, 0, 1]  # 0.5 is not > 0.5
    assert counts["confidence_p"][:4] == [1, 0, 1, 1]
    explicit = check_against_oracle(ds, [labels("correct_p", [False, True, True]), labels("confidence_p", [True, False, False])])
    assert explicit.official == report.official


def test_quirk_10_first_error_acc_ignores_labels_before_the_first_error():
    ds = tiny_dataset(("correct", "p", 3, ()), ("counterfactual", "p", 3, (3, 2)))
    report = check_against_oracle(ds, [labels("correct_p", [True] * 3), labels("counterfactual_p", [False, False, True])])
    assert report.official["hallucination_type_results"]["first_error_acc"]["counterfactual"] == 1.0  # step 2 (min)


def test_quirk_11_official_key_spellings():
    ds = tiny_dataset(("correct", "p", 1, ()), ("redundency", "p", 1, ()))
    report = check_against_oracle(ds, [labels("correct_p", [True]), labels("redundency_p", [True])])
    assert set(report.official) == {"total_hallucination_results", "hallucination_type_results", "validitiy_rate"}
    assert "redundency" in report.official["hallucination_type_results"]["f1"]


def test_scores_only_redundancy_predictions_are_labelled_then_inverted():
    ds = tiny_dataset(("correct", "p", 2, ()), ("circular", "p", 2, (2,)))
    report = evaluate(ds, [
        labels("correct_p", [True, True]),
        {"idx": "circular_p", "scores": {"step_level_redundancy_scores": [0.1, 0.15000001]}},
    ], redundancy_threshold=0.15)
    explicit = evaluate(ds, [
        labels("correct_p", [True, True]),
        {"idx": "circular_p", "scores": {"step_level_redundancy_labels": [False, True]}},
    ])
    assert report.official == explicit.official


@pytest.mark.parametrize(
    "scores, match",
    [
        ({"step_level_validity_labels": [True, None]}, r"'step_level_validity_labels'\[1\]: a label must be"),
        ({"step_level_validity_labels": [True, "yes"]}, r"'step_level_validity_labels'\[1\]: a label must be"),
        ({"step_level_validity_labels": [2]}, r"'step_level_validity_labels'\[0\]: a label must be"),
        ({"step_level_validity_labels": "TT"}, r"'step_level_validity_labels': expected a list"),
        ({"step_level_validity_scores": [0.1, None]}, r"'step_level_validity_scores'\[1\]: not a number"),
        ({"other": []}, "has neither"),
    ],
)
def test_bad_predictions_name_the_sample_and_field(scores, match):
    ds = tiny_dataset(("correct", "p", 2, ()), ("confidence", "p", 2, ()))
    with pytest.raises(PredictionError, match="sample 'confidence_p'.*" + match):
        evaluate(ds, [labels("correct_p", [True, True]), {"idx": "confidence_p", "scores": scores}])


def test_table_domains_are_means_of_clamped_class_scores(full):
    report = evaluate(full, random_predictions(full, 5, label_count_noise=False))
    t = report.table
    assert t["S1"] == pytest.approx((t["NR"] + t["NCL"]) / 2, abs=1e-12)
    assert t["S2"] == pytest.approx((t["ES"] + t["SC"] + t["DC"] + t["CI"]) / 4, abs=1e-12)
    assert t["S3"] == pytest.approx((t["PS"] + t["DR"] + t["MS"]) / 3, abs=1e-12)
    per_class = report.official["hallucination_type_results"]
    assert t["MS"] == pytest.approx(100 * per_class["f1"]["multi_solutions"], abs=1e-12)
    assert t["NR"] == pytest.approx(50 * (per_class["f1"]["redundency"] + per_class["negative_f1"]["redundency"]), abs=1e-12)
    assert not math.isnan(t["Overall"])


@pytest.mark.parametrize("entry", [{"scores": {}}, ["correct_p"], None])
def test_list_entries_without_an_idx_are_named(entry):
    ds = tiny_dataset(("correct", "p", 1, ()))
    with pytest.raises(PredictionError, match=r"prediction #1: a result in a list must be a dict with an 'idx' field"):
        evaluate(ds, [labels("correct_p", [True]), entry])
