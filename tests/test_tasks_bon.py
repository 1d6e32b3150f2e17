"""The BoN task equals a plain transcription of the official ``prmbench_bon`` loader and evaluator, quirks included.

There is no public BoN data here: the tests write small synthetic BoN files (the official input format) in tmp_path.
"""

import json
import math
import random
import re
from collections import Counter

import pytest

from prmbench_fast import PRMBenchDataError, PredictionError
from prmbench_fast.tasks import get_task
from prmbench_fast.tasks.bon import BoNReport, evaluate_bon, load_bon

DATASETS = ["gsm8k", "math", "olympiadbench", "mmluChoice"]


# -- the official task, transcribed plainly (mr_eval/tasks/prmbench_bon/task.py) ---------------------------------------
# Two deliberate differences, both about randomness: `rng` replaces the global `random` module, and the datasets are
# visited in order of first appearance instead of a set's order, so the random draws are reproducible.
def official_load(rows):
    meta = []
    for item in rows:
        for response_id, response in enumerate(item["responses"]):
            steps = []
            for raw_step in response.split("\n\n"):
                step = raw_step.strip()
                if step and len(step) > 0:
                    steps.append(step)
            meta.append(dict(idx=f"{item['id']}/{response_id}", question=item["question"], steps=steps,
                             step_str=response, dataset=item["id"].split("_")[0].strip(),
                             label=item["labels"][response_id]))
    seen, kept = {}, []
    for item in meta:
        if seen.get(item["idx"]) is None:
            seen[item["idx"]] = 1
            kept.append(item)
    return kept


def official_extract(text):
    matches = re.findall(r"\\boxed\{(.*?)\}", text)
    return str(matches[-1]) if matches else None


def official_evaluate(results, meta, rng):
    small = {m["idx"]: m for m in meta}
    dataset_list = list(dict.fromkeys(m["dataset"] for m in meta))
    big = {}
    for m in meta:
        big.setdefault(m["idx"].split("/")[0].strip(), []).append(m)
    filtered, seen = [], {}
    for r in results:
        if seen.get(r["idx"]) is None and small.get(r["idx"]) is not None:
            seen[r["idx"]] = 1
            filtered.append(r)
    res_big = {}
    for r in filtered:
        res_big.setdefault(r["idx"].split("/")[0].strip(), []).append(r)

    pass_at_n = {}
    for name in dataset_list:
        passed = total = 0
        for items in big.values():
            if items[0]["dataset"] == name:
                total += 1
                for item in items:
                    if item["label"] == "correct":
                        passed += 1
                        break
        pass_at_n[name] = passed / total if total > 0 else -1

    maj = {}
    for name in dataset_list:
        passed = total = 0
        for items in big.values():
            if items[0]["dataset"] == name:
                total += 1
                answers = [official_extract(item["step_str"]) for item in items]
                counter = Counter(answers)
                max_count = max(counter.values())
                most_common = [a for a, f in counter.items() if f == max_count and a is not None]
                candidates = [i for i, a in enumerate(answers) if a in most_common]
                if len(candidates) > 0:
                    if items[rng.choice(candidates)]["label"] == "correct":
                        passed += 1
        maj[name] = passed / total if total > 0 else -1

    prm_bon = {"qualified_rate": {}, "result": {}}
    for name in dataset_list:
        passed = total = not_qualify = 0
        for big_id, big_res in res_big.items():
            items = big[big_id]
            if items[0]["dataset"] == name:
                total += 1
                all_scores = []
                for r in big_res:
                    if "validity" in r and not r["validity"]:
                        continue
                    all_scores.extend(r["scores"].get("step_level_validity_scores", []))
                min_score = min(all_scores) - 0.01 if len(all_scores) > 0 else -0.01
                info = []
                for r in big_res:
                    if "validity" in r and not r["validity"]:
                        continue
                    adjusted = [s - min_score for s in r["scores"].get("step_level_validity_scores", [])]
                    info.append({"idx": r["idx"], "completion_score": math.prod(adjusted)})
                info = sorted(info, key=lambda x: x["completion_score"], reverse=True)
                if len(info) == 0:
                    not_qualify += 1
                    selected = rng.choice(items)
                else:
                    selected = info[0]
                if small[selected["idx"]]["label"] == "correct":
                    passed += 1
        prm_bon["result"][name] = passed / total if total > 0 else -1
        prm_bon["qualified_rate"][name] = (total - not_qualify) / total if total > 0 else -1
    return {"pass_at_n": pass_at_n, "maj_of_n": maj, "prm_bon": prm_bon}


# -- synthetic data ---------------------------------------------------------------------------------------------------
def synthetic_rows(seed, questions=40, n=8):
    rng = random.Random(seed)
    rows = []
    for q in range(questions):
        name = rng.choice(DATASETS)
        p_correct = rng.choice([0.0, 0.2, 0.7])  # some questions have no correct response (pass@n misses)
        responses, labels = [], []
        for _ in range(n):
            steps = [f"step {i} of {q}" + rng.choice(["", "  ", "\n"]) for i in range(rng.randint(0, 5))]
            ending = rng.choice(["\\boxed{1}", "\\boxed{2}", "\\boxed{3}", "no box", "\\boxed{\\frac{1}{2}}", ""])
            text = "\n\n".join(steps + [ending] + rng.choice([[], [""], ["   "]]))
            responses.append(text)
            labels.append("correct" if rng.random() < p_correct else "incorrect")
        rows.append({"id": f"{name}_{q}", "question": f"question {q}?", "responses": responses,
                     "ans_str": "#### 1", "answer": "1", "labels": labels})
    return rows


def synthetic_predictions(rows, seed):
    rng = random.Random(seed)
    results = []
    for row in rows:
        if rng.random() < 0.1:
            continue  # a question without any prediction
        invalid_rate = rng.choice([0.1, 0.1, 1.0])  # 1.0: no valid prediction, PRM-BoN draws at random
        for k, response in enumerate(row["responses"]):
            if rng.random() < 0.1:
                continue  # a response without a prediction
            steps = [s for s in response.split("\n\n") if s.strip()]
            # One decimal: equal products happen, so the first-of-equal rule is exercised.
            scores = [round(rng.random(), 1) for _ in steps]
            result = {"idx": f"{row['id']}/{k}", "scores": {"step_level_validity_scores": scores}}
            if rng.random() < invalid_rate:
                result["validity"] = False
            if rng.random() < 0.05:
                result["scores"] = {"step_level_validity_labels": [True] * len(steps)}  # no scores: product 1
            results.append(result)
    rng.shuffle(results)
    return results + [{"idx": "nope/0", "scores": {}}, dict(results[0], scores={"step_level_validity_scores": [9.0]})]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# -- tests ------------------------------------------------------------------------------------------------------------
def test_loader_equals_the_official_loader(tmp_path):
    rows = synthetic_rows(0)
    rows.append(dict(rows[0], responses=rows[0]["responses"] + ["extra"], labels=rows[0]["labels"] + ["correct"]))
    data = load_bon(write_jsonl(tmp_path / "bon.jsonl", rows))
    expected = official_load(rows)
    assert [s.id for s in data] == [m["idx"] for m in expected]
    assert [list(s.steps) for s in data] == [m["steps"] for m in expected]
    assert [(s.question, s.dataset, s.label, s.response) for s in data] == [
        (m["question"], m["dataset"], m["label"], m["step_str"]) for m in expected
    ]
    assert all(s.source_idx == s.id.rsplit("/", 1)[0] for s in data)  # score() groups a question's responses
    assert data.diagnostics["duplicate_responses"] == 8  # the repeated row keeps only its new 9th response


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_evaluator_equals_the_official_evaluator(tmp_path, seed):
    rows = synthetic_rows(seed)
    data = load_bon(write_jsonl(tmp_path / "bon.jsonl", rows))
    results = synthetic_predictions(rows, seed)
    report = evaluate_bon(data, results, seed=seed)
    assert report.official == official_evaluate(results, official_load(rows), random.Random(seed))
    assert report.seed == seed
    assert report.diagnostics["unknown_prediction_ids"] == ["nope/0"]
    assert report.diagnostics["duplicate_predictions"] == 1


def one_question(tmp_path, answers, labels, name="math_0"):
    row = {"id": name, "question": "q", "responses": [f"a\n\n{a}" for a in answers], "ans_str": "", "answer": "",
           "labels": labels}
    return load_bon(write_jsonl(tmp_path / f"{name}.jsonl", [row]))


def test_maj_none_is_counted_for_the_majority_but_never_chosen(tmp_path):
    # None (no box) is the strict majority: no candidate, a miss, even though "\boxed{1}" answers are correct.
    data = one_question(tmp_path, ["x", "y", "z", "\\boxed{1}", "\\boxed{1}"], ["w", "w", "w", "correct", "correct"])
    assert evaluate_bon(data, []).official["maj_of_n"] == {"math": 0.0}
    # None ties with "1": "1" is the only candidate.
    data = one_question(tmp_path, ["x", "y", "\\boxed{1}", "\\boxed{1}"], ["w", "w", "correct", "correct"])
    assert evaluate_bon(data, []).official["maj_of_n"] == {"math": 1.0}


def test_prm_bon_min_shift_product_and_first_of_equal_products(tmp_path):
    data = one_question(tmp_path, ["\\boxed{1}"] * 3, ["wrong", "correct", "wrong"])
    # Raw products: r0 0.9*0.9 = 0.81 > r1 0.8 > r2 0.2. Shifted by -(0.2 - 0.01): r0 0.71*0.71 = 0.5041 < r1 0.61,
    # so the official pick is r1 (correct), while the product of raw scores picks r0.
    results = [{"idx": "math_0/0", "scores": {"step_level_validity_scores": [0.9, 0.9]}},
               {"idx": "math_0/1", "scores": {"step_level_validity_scores": [0.8]}},
               {"idx": "math_0/2", "scores": {"step_level_validity_scores": [0.2]}}]
    report = evaluate_bon(data, results)
    assert report.official["prm_bon"]["result"] == {"math": 1.0}
    assert report.aggregations["product"] == {"math": 0.0}
    # Equal products: the first in prediction order wins, whatever the response order.
    equal = [{"idx": "math_0/1", "scores": {"step_level_validity_scores": [0.7]}},
             {"idx": "math_0/0", "scores": {"step_level_validity_scores": [0.7]}}]
    assert evaluate_bon(data, equal).official["prm_bon"]["result"] == {"math": 1.0}
    assert evaluate_bon(data, equal[::-1]).official["prm_bon"]["result"] == {"math": 0.0}


def test_prm_bon_counts_only_predicted_questions_and_draws_for_unqualified_ones(tmp_path):
    rows = [{"id": f"gsm8k_{q}", "question": "q", "responses": ["a", "b"], "ans_str": "", "answer": "",
             "labels": ["correct", "wrong"]} for q in range(3)]
    data = load_bon(write_jsonl(tmp_path / "bon.jsonl", rows))
    results = [{"idx": "gsm8k_0/0", "scores": {"step_level_validity_scores": [0.9]}},
               {"idx": "gsm8k_1/0", "validity": False}]
    report = evaluate_bon(data, results, seed=3)
    assert report.official["prm_bon"]["qualified_rate"] == {"gsm8k": 0.5}  # gsm8k_2 has no prediction: not counted
    assert report.diagnostics["questions_without_predictions"] == ["gsm8k_2"]
    expected = official_evaluate(results, official_load(rows), random.Random(3))
    assert report.official == expected
    # Same seed, same draw; the seed is what makes the unqualified question's pick reproducible.
    assert {evaluate_bon(data, results, seed=3).official["prm_bon"]["result"]["gsm8k"] for _ in range(3)} == {
        expected["prm_bon"]["result"]["gsm8k"]}


def test_aggregations_equal_a_plain_computation(tmp_path):
    rows = synthetic_rows(5)
    data = load_bon(write_jsonl(tmp_path / "bon.jsonl", rows))
    results = synthetic_predictions(rows, 5)
    report = evaluate_bon(data, results)
    first = {}
    for r in results:
        first.setdefault(r["idx"], r)
    rules = {"min": min, "last": lambda s: s[-1], "mean": lambda s: sum(s) / len(s), "product": math.prod}
    for how, rule in rules.items():
        for name in {r["id"].split("_")[0] for r in rows}:
            questions = [r for r in rows if r["id"].split("_")[0] == name]
            solved = 0
            for row in questions:
                best, best_label = None, None
                for k, label in enumerate(row["labels"]):
                    r = first.get(f"{row['id']}/{k}")
                    if r is None or r.get("validity") is False:
                        continue
                    scores = r["scores"].get("step_level_validity_scores")
                    if scores and (best is None or rule(scores) > best):
                        best, best_label = rule(scores), label
                solved += best_label == "correct"
            assert report.aggregations[how][name] == solved / len(questions), (how, name)


def test_task_registry_and_table(tmp_path):
    rows = synthetic_rows(1, questions=8)
    task = get_task("bon")
    data = task.load(write_jsonl(tmp_path / "bon.jsonl", rows))
    report = task.evaluate(data, synthetic_predictions(rows, 1), seed=7)
    assert isinstance(report, BoNReport) and report.to_json()["seed"] == 7
    lines = report.format_table().splitlines()
    assert lines[0].split(" | ")[1:4] == ["   pass@n", "    maj@n", "  PRM-BoN"]
    assert len(lines) == 2 + len(report.official["pass_at_n"])


GOOD = {"id": "math_1", "question": "q", "responses": ["a", "b"], "ans_str": "", "answer": "", "labels": ["correct", "x"]}


@pytest.mark.parametrize(
    "change, field, problem",
    [
        ({"id": 3}, "id", "expected str"),
        ({"id": "math/1"}, "id", "contain no '/'"),
        ({"responses": []}, "responses", "no responses"),
        ({"responses": ["a", 2]}, "responses[1]", "expected str"),
        ({"labels": ["correct"]}, "labels", "1 labels for 2 responses"),
        ({"question": None}, "question", "expected str"),
        ({"answer": ...}, "answer", "missing field"),
    ],
)
def test_malformed_rows_are_named_by_file_line_and_field(tmp_path, change, field, problem):
    bad = {k: v for k, v in {**GOOD, **change}.items() if v is not ...}
    path = write_jsonl(tmp_path / "bon.jsonl", [GOOD, bad])
    with pytest.raises(PRMBenchDataError, match=re.escape(f"bon.jsonl, line 2, field '{field}': ") + ".*" + re.escape(problem)):
        load_bon(path)


def test_bad_prediction_values_are_named(tmp_path):
    data = load_bon(write_jsonl(tmp_path / "bon.jsonl", [GOOD]))
    for scores, match in [([0.5, float("nan")], r"'math_1/0'.*\[1\]: not a finite number"),
                          ([True], r"\[0\]: not a finite number"), ("0.5", "expected a list")]:
        with pytest.raises(PredictionError, match=match):
            evaluate_bon(data, [{"idx": "math_1/0", "scores": {"step_level_validity_scores": scores}}])
    with pytest.raises(PredictionError, match="'scores': missing"):
        evaluate_bon(data, [{"idx": "math_1/0"}])


def test_score_command_scores_bon_responses_with_a_prm_family(tmp_path, capsys):
    from prmbench_fast.cli import main
    from prmbench_fast.io import read_predictions
    from prmbench_fast.testing.tiny_models import tiny_llama, train_tokenizer

    rows = synthetic_rows(3, questions=6)
    data = write_jsonl(tmp_path / "bon.jsonl", rows)
    texts = [r["question"] for r in rows] + [t for r in rows for t in r["responses"]] + ["Verdict: +", "Verdict: -"] * 30
    tok = train_tokenizer(texts)
    tiny_llama(len(tok), head="causal").save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    run = tmp_path / "run"
    assert main(["score", "--model", str(tmp_path / "model"), "--family", "lm_judge", "--task", "bon", "--data",
                 str(data), "--max-length", "256", "--no-progress", "--output-dir", str(run)]) == 0
    assert "PRM-BoN" in capsys.readouterr().out
    results = read_predictions(run / "results.jsonl")
    dataset = load_bon(data)
    assert {r["idx"] for r in results} == {s.id for s in dataset}  # every response scored, steps as split
    assert all(len(r["scores"]["step_level_validity_scores"]) <= len(dataset.by_id[r["idx"]].steps) for r in results)
    written = json.loads((run / "report.json").read_text())
    assert written["official"] == json.loads(json.dumps(evaluate_bon(dataset, results).official))
