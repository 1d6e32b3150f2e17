"""The subset400 task: the official quick task's samples (selected from the full data by shipped ids) and its
evaluator rule (the validity-rate denominator counts the correct predictions, SPEC §2.5)."""

import json

import pytest

from prmbench_fast.testing.official_oracle import build_eval_set, evaluate_official
from prmbench_fast import evaluate, load_prmbench
from prmbench_fast.tasks import get_task
from prmbench_fast.tasks.subset400 import subset_rows
from test_evaluate import assert_official_equal, oracle_samples, random_predictions


@pytest.fixture(scope="module")
def subset_file_rows(subset400_jsonl):
    with open(subset400_jsonl) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def subset(prmbench_jsonl):
    return get_task("subset400").load(prmbench_jsonl)


def test_shipped_ids_are_the_official_subset_file(subset_file_rows):
    # How prmbench_fast/tasks/subset400_ids.json was derived: these pairs, in file order.
    assert subset_rows() == tuple((r["classification"], r["idx"]) for r in subset_file_rows)


def test_samples_are_what_the_official_loader_builds_from_the_subset_file(subset, subset_file_rows):
    expected = build_eval_set(subset_file_rows)  # the official loader run on the subset task's own data file
    assert [s.id for s in subset] == [e["idx"] for e in expected]
    for sample, e in zip(subset, expected):
        assert (list(sample.steps), list(sample.error_steps), sample.classification) == (
            e["steps"], e["error_steps"], e["classification"])
    questions = {}
    for r in subset_file_rows:
        if r["classification"] == "redundency":  # only these rows build the clean partner (other rows' differ)
            questions.setdefault(f"correct_{r['idx']}", r["original_question"])
        questions[f"{r['classification']}_{r['idx']}"] = r["modified_question"]
    assert all(s.question == questions[s.id] for s in subset)
    # Only the 48 redundency rows bring a clean partner: 394 + 48 samples.
    assert len(subset) == 442 and sum(s.classification == "correct" for s in subset) == 48


@pytest.mark.parametrize("seed", [0, 1])
def test_evaluator_equals_the_official_subset_evaluator(subset, seed):
    results = random_predictions(subset, seed)
    expected, _ = evaluate_official(results, oracle_samples(subset), subset400=True)
    report = get_task("subset400").evaluate(subset, results)
    assert_official_equal(expected, report.official)
    # Everything but the validity rate is the main evaluator's.
    main = evaluate(subset, results).official
    assert report.official["total_hallucination_results"] == main["total_hallucination_results"]
    assert report.official["validitiy_rate"] < main["validitiy_rate"]


def test_all_valid_predictions_give_394_of_442(subset):
    results = [{"idx": s.id, "scores": {"step_level_validity_labels": [True] * len(s.steps)}} for s in subset]
    assert get_task("subset400").evaluate(subset, results).official["validitiy_rate"] == 394 / 442


def test_subset_rule_refuses_other_samples(prmbench_jsonl):
    with pytest.raises(ValueError, match="task='subset400'"):
        get_task("subset400").evaluate(load_prmbench(prmbench_jsonl, limit_per_class=2), [])


def test_evaluate_command_writes_the_official_subset_numbers(tmp_path, prmbench_jsonl, subset):
    from prmbench_fast.cli import main

    results = random_predictions(subset, 2)
    predictions = tmp_path / "p.jsonl"
    predictions.write_text("".join(json.dumps(r) + "\n" for r in results))
    out = tmp_path / "o.json"
    assert main(["evaluate", "--task", "subset400", "--data", str(prmbench_jsonl), "--predictions", str(predictions),
                 "--output", str(out)]) == 0
    expected, _ = evaluate_official(results, oracle_samples(subset), subset400=True)
    assert_official_equal(expected, json.loads(out.read_text())["official"])
