"""The LLM-as-critic path against a real OpenAI-compatible HTTP server on 127.0.0.1 (started here; nothing leaves
the machine): the messages as the server received them, the official parsing and labelling of the answers, retries,
timeouts, resume and concurrency, and the report equal to evaluate() on the expected official result dicts."""

import json

import pytest

# Every test here talks to an OpenAI-compatible endpoint through the `critic` extra's client; stacks without it (the
# GPU machine's) test the missing-extra message instead (tests/test_optional_extras.py).
pytest.importorskip("openai")

from critic_server import FakeCritic, serve  # noqa: F401 (serve is a fixture)
from prmbench_fast import evaluate
from prmbench_fast.classes import ALL_CLASSES
from prmbench_fast.critic import (
    FEW_SHOTS,
    SYSTEM_PROMPT,
    CriticEndpointError,
    build_messages,
    critic_query,
    critic_result,
    parse_critic_response,
    results_from_responses,
    score_critic,
)
from prmbench_fast.data import PRMBenchDataset, Sample
from prmbench_fast.results_store import RunMismatchError

FAST = dict(retry_interval=0.01, timeout=5.0, progress=False)  # short backoff in tests: 0.02 s, 0.03 s, ...


# ------------------------------------------------------------------------------------------------ the data


def sample(sample_id, classification, steps, error_steps=(), source="p1"):
    # One question per sample, so the server can key its script by question.
    return Sample(id=sample_id, question=f"Question of {sample_id}: find x.", steps=tuple(steps),
                  error_steps=tuple(error_steps), classification=classification, source_idx=source)


def answer(validity, redundancy):
    return json.dumps({"validity": validity, "redundancy": redundancy})


def labelled(sample_id, validity, redundancy):
    """The expected official result dict of a usable answer (labels: score > 0)."""
    return {"idx": sample_id, "validity": True, "scores": {
        "step_level_validity_scores": validity, "step_level_redundancy_scores": redundancy,
        "step_level_validity_labels": [v > 0 for v in validity],
        "step_level_redundancy_labels": [v > 0 for v in redundancy]}}


THREE = ["Step 1. Let x be the unknown.", "2. Then 2x = 0.15 * 40.", "  Step 3: so x = 3.  "]

# (sample, script, expected result) per case; the cases the brief lists, one sample each.
CASES = [
    (sample("correct_p1", "correct", THREE), [("answer", answer([1, 1, 0.5], [-1, 0, 0]))],
     labelled("correct_p1", [1, 1, 0.5], [-1, 0, 0])),
    # NR: scored by NOT(redundancy > 0); step 3 is the redundant one and judged redundant (perfect), although
    # every step is judged valid (validity labels would make step 3 a false positive).
    (sample("redundency_p1", "redundency", THREE + ["x = 3 again."], [3]),
     [("answer", "Here is my judgement:\n```json\n" + answer([1, 1, 1, 1], [-1, -1, 0.8, -0.2]) + "\n```\nDone.")],
     labelled("redundency_p1", [1, 1, 1, 1], [-1, -1, 0.8, -0.2])),
    # NCL with comments in the JSON (both // and #).
    (sample("circular_p1", "circular", THREE, [2]),
     [("answer", '{\n  "validity": [1, 1, 1], // all fine\n  "redundancy": [-1, 0.5, -1]  # step 2 circular\n}')],
     labelled("circular_p1", [1, 1, 1], [-1, 0.5, -1])),
    (sample("counterfactual_p1", "counterfactual", THREE, [2]),
     [("answer", '{"validity": [1, -1, 1], "redundancy": [-1, -1, -1]')], None),  # broken JSON: invalid
    (sample("step_contradiction_p1", "step_contradiction", THREE, [3]),
     [("answer", 'Note: } {"validity": [1, 1, -1], "redundancy": [0, 0, 0]}')], None),  # unbalanced "}": invalid
    # Fewer scores than steps: the missing step (the error step) is simply not scored.
    (sample("domain_inconsistency_p1", "domain_inconsistency", THREE, [3]),
     [("answer", answer([1, 0.5], [-1, -1]))], labelled("domain_inconsistency_p1", [1, 0.5], [-1, -1])),
    # More scores than steps: the extra one is scored as a non-error step.
    (sample("confidence_p1", "confidence", THREE, [2]),
     [("status", 429), ("answer", answer([1, -1, 1, 1, -0.5], [-1, -1, -1, 0, 0]))],
     labelled("confidence_p1", [1, -1, 1, 1, -0.5], [-1, -1, -1, 0, 0])),
    (sample("missing_condition_p1", "missing_condition", THREE, [1]),
     [("status", 500), ("answer", answer([-1, 1, 1], [-1, -1, -1]))],
     labelled("missing_condition_p1", [-1, 1, 1], [-1, -1, -1])),
    (sample("deception_p1", "deception", THREE, [2]),
     [("hang", 1.5), ("answer", answer([1, -0.5, -1], [-1, -1, -1]))],
     labelled("deception_p1", [1, -0.5, -1], [-1, -1, -1])),
    (sample("multi_solutions_p1", "multi_solutions", THREE), [("status", 503)], "failed"),  # always fails
]
MAX_RETRIES = 3
TIMEOUT = 0.4  # the hang above (1.5 s) is well past it; real answers take milliseconds


def expected_result(case):
    s, script, expected = case
    if expected is None:
        return {"validity": False, "idx": s.id, "original_response": script[-1][1]}
    if expected == "failed":
        return {"validity": False, "idx": s.id}
    return expected


@pytest.fixture
def cases_server(serve):
    return serve({s.question: script for s, script, _ in CASES})


DATASET = PRMBenchDataset([s for s, _, _ in CASES])


# ------------------------------------------------------------------------------------------------ end to end


def test_scripted_answers_give_the_official_results_and_report(cases_server, tmp_path, capsys):
    report = score_critic(DATASET, api_base=cases_server.url, api_model="critic-test", api_key="k",
                          max_retries=MAX_RETRIES, **{**FAST, "timeout": TIMEOUT, "progress": True}, output_dir=tmp_path)
    # The progress bar: one tick per sample, the invalid ones so far beside it.
    bar = capsys.readouterr().err
    assert "prmbench critic: 100%" in bar and f"{len(DATASET)}/{len(DATASET)}" in bar and "invalid=3" in bar
    expected = {s.id: expected_result(c) for c in CASES for s in [c[0]]}
    assert report.predictions == expected
    assert report.official == evaluate(DATASET, expected).official
    assert report.table == evaluate(DATASET, expected).table

    # The validity rate: 3 of the 9 non-correct samples are invalid (broken, unbalanced, failed).
    assert report.official["validitiy_rate"] == 6 / 9
    assert report.diagnostics == evaluate(DATASET, expected).diagnostics

    # NR and NCL are scored by NOT(redundancy label): both perfect here (TP, FP, TN, FN).
    counts = dict(zip(ALL_CLASSES, report.class_counts.tolist()))
    assert counts["redundency"] == [3, 0, 1, 0]
    assert counts["circular"] == [2, 0, 1, 0]
    # Label-count rules: 2 labels for 3 steps (the error step unscored); 5 labels for 3 steps (extras as TP/FN).
    assert counts["domain_inconsistency"] == [2, 0, 0, 0]
    assert counts["confidence"] == [3, 0, 1, 1]
    assert dict(zip(report.sample_ids, report.label_counts.tolist()))["confidence_p1"] == 5

    # Requests as the server saw them: one per answer, one more per scripted failure, MAX_RETRIES for the dead one.
    calls = {s.id: cases_server.calls[s.question] for s, _, _ in CASES}
    assert calls == {"correct_p1": 1, "redundency_p1": 1, "circular_p1": 1, "counterfactual_p1": 1,
                     "step_contradiction_p1": 1, "domain_inconsistency_p1": 1, "confidence_p1": 2,
                     "missing_condition_p1": 2, "deception_p1": 2, "multi_solutions_p1": MAX_RETRIES}
    run = report.run
    assert run["requests"] == sum(calls.values()) == 15
    assert run["retries"] == 5
    assert run["invalid_answers"] == 2 and run["failed_samples"] == 1 and run["invalid_predictions"] == 3
    assert run["samples_scored"] == 10 and run["samples_resumed"] == 0
    assert run["completion_tokens"] == 5 * 9  # the 9 requests answered with a completion
    assert run["requests_per_second"] > 0

    # Files: results in the official format, every raw answer kept, the report and the table.
    lines = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert {r["idx"]: r for r in lines} == expected
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["official"] == json.loads(json.dumps(report.official))
    assert saved["run"]["requests"] == 15
    assert (tmp_path / "table.txt").read_text() == report.format_table() + "\n"
    assert results_from_responses(DATASET, tmp_path) == expected
    raw = {r["idx"]: r for r in map(json.loads, (tmp_path / "responses.jsonl").read_text().splitlines())}
    assert raw["multi_solutions_p1"]["response"] is None and len(raw["multi_solutions_p1"]["errors"]) == MAX_RETRIES
    assert raw["deception_p1"]["attempts"] == 2 and "Timeout" in raw["deception_p1"]["errors"][0]


def test_messages_as_the_server_received_them(serve):
    s = sample("counterfactual_p9", "counterfactual", ["Step 1. Let x be the unknown.", "0.15 of 40 is 6.", "64."])
    server = serve({s.question: [("answer", answer([1, 1, 1], [0, 0, 0]))]})
    dataset = PRMBenchDataset([s])
    query = ("Question: Question of counterfactual_p9: find x.\n\n Solutions: "
             "Step 1: Let x be the unknown. \n\nStep 2: 15 of 40 is 6. \n\nStep 3:  \n\n")
    assert critic_query(s) == query

    score_critic(dataset, api_base=server.url, api_model="critic-test", **FAST)
    body = server.bodies[-1]
    assert body["model"] == "critic-test" and body["temperature"] == 0
    assert [m["role"] for m in body["messages"]] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert body["messages"][0]["content"] == SYSTEM_PROMPT
    assert [(m["content"]) for m in body["messages"][1:5]] == [t for shot in FEW_SHOTS for t in shot]
    assert body["messages"][-1]["content"] == query
    assert "max_tokens" not in body

    score_critic(dataset, api_base=server.url, api_model="critic-test", shots=1, max_tokens=64,
                 extra_body={"top_k": 1}, **FAST)
    body = server.bodies[-1]
    assert [m["role"] for m in body["messages"]] == ["system", "user", "assistant", "user"]
    assert body["max_tokens"] == 64 and body["top_k"] == 1

    # o1 models: the system prompt goes as "user" and temperature 1.0 (as the official adapter does).
    score_critic(dataset, api_base=server.url, api_model="o1-mini", shots=0, **FAST)
    body = server.bodies[-1]
    assert [m["role"] for m in body["messages"]] == ["user", "user"] and body["temperature"] == 1.0
    assert build_messages(s, shots=0, system_role="user") == body["messages"]
    with pytest.raises(ValueError, match="shots"):
        build_messages(s, shots=3)


def test_resume_asks_nothing_already_answered(cases_server, tmp_path):
    options = dict(api_base=cases_server.url, api_model="critic-test", max_retries=MAX_RETRIES,
                   output_dir=tmp_path, **{**FAST, "timeout": TIMEOUT})
    first = score_critic(DATASET, **options)
    asked = len(cases_server.bodies)

    again = score_critic(DATASET, **options)
    assert len(cases_server.bodies) == asked  # not one request: valid and invalid results are both kept
    assert again.official == first.official and again.predictions == first.predictions
    assert again.run["requests"] == 0 and again.run["samples_resumed"] == len(DATASET)

    # A run killed halfway: only the samples without a stored result are asked again.
    results = tmp_path / "results.jsonl"
    lines = results.read_text().splitlines()
    kept = [line for line in lines if not json.loads(line)["validity"] or "correct_p1" in line]
    results.write_text("".join(line + "\n" for line in kept))
    before = len(cases_server.bodies)
    resumed = score_critic(DATASET, **options)
    asked_again = {FakeCritic.question_of(b) for b in cases_server.bodies[before:]}
    assert asked_again == {s.question for s in DATASET if s.id not in {json.loads(x)["idx"] for x in kept}}
    assert resumed.official == first.official

    with pytest.raises(RunMismatchError):
        score_critic(DATASET, **{**options, "shots": 1})


def test_requests_overlap_up_to_the_concurrency(serve):
    samples = [sample(f"counterfactual_c{i}", "counterfactual", THREE, [2], source=f"c{i}") for i in range(8)]
    server = serve({s.question: [("slow", 0.15, answer([1, -1, 1], [0, 0, 0]))] for s in samples})
    report = score_critic(PRMBenchDataset(samples), api_base=server.url, api_model="m", concurrency=3, **FAST)
    assert 2 <= server.max_in_flight <= 3
    assert report.run["requests"] == 8


def test_rejected_and_refused_requests(serve, tmp_path):
    rejected = sample("counterfactual_r1", "counterfactual", THREE, [2])
    refused = sample("counterfactual_r2", "counterfactual", THREE, [2], source="r2")
    server = serve({rejected.question: [("status", 400)], refused.question: [("status", 401)]})
    # 400 (e.g. prompt too long): stored invalid at once, no retry can change it.
    report = score_critic(PRMBenchDataset([rejected]), api_base=server.url, api_model="m", **FAST)
    assert report.predictions == {rejected.id: {"validity": False, "idx": rejected.id}}
    assert server.calls[rejected.question] == 1
    # 401 (bad key): the run stops and nothing is stored, so a fixed re-run asks again.
    with pytest.raises(CriticEndpointError, match="401"):
        score_critic(PRMBenchDataset([refused]), api_base=server.url, api_model="m", output_dir=tmp_path, **FAST)
    assert not (tmp_path / "results.jsonl").exists()


def test_scores_that_are_not_numbers_are_asked_again_then_invalid(serve):
    s = sample("counterfactual_n1", "counterfactual", THREE, [2])
    server = serve({s.question: [("answer", answer(["1", "1", "-1"], [0, 0, 0]))]})
    report = score_critic(PRMBenchDataset([s]), api_base=server.url, api_model="m", max_retries=2, **FAST)
    # The official adapter labels inside its retry loop: a TypeError there is a failed request.
    assert server.calls[s.question] == 2
    assert report.predictions == {s.id: {"validity": False, "idx": s.id}}


def test_base_url_and_key_from_the_environment(serve, monkeypatch):
    s = sample("counterfactual_e1", "counterfactual", THREE, [2])
    server = serve({s.question: [("answer", answer([1, 1, 1], [0, 0, 0]))]})
    monkeypatch.setenv("OPENAI_BASE_URL", server.url)
    monkeypatch.setenv("OPENAI_API_KEY", "from-env")
    report = score_critic(PRMBenchDataset([s]), api_model="m", **FAST)
    assert report.run["api_base"].startswith(server.url)
    assert report.predictions[s.id]["validity"] is True


# ------------------------------------------------------------------------------------------------ parsing


VALID = {"validity": [1, 0.5], "redundancy": [-1, 0]}


@pytest.mark.parametrize("text, expected", [
    ('{"validity": [1, 0.5], "redundancy": [-1, 0]}', VALID),
    # Recorded-style answers: prose and a code fence around the JSON.
    ('Let me check each step.\n```json\n{"validity": [1, 0.5], "redundancy": [-1, 0]}\n```\nThat is all.', VALID),
    ('{\n  "validity": [1, 0.5], // step 2 skips a case\n  "redundancy": [-1, 0] # none redundant\n}', VALID),
    # Braces inside strings are counted as braces: balanced ones are harmless...
    ('{"comment": "the set {1, {2}}", "validity": [1, 0.5], "redundancy": [-1, 0]}',
     {"comment": "the set {1, {2}}", **VALID}),
    # ...a lone "}" in a string closes the block early, and the real closing brace is then unbalanced: invalid.
    ('{"comment": "a } here", "validity": [1, 0.5], "redundancy": [-1, 0]}', None),
    ('{"comment": "a { here", "validity": [1, 0.5], "redundancy": [-1, 0]}', None),  # never closes
    # "//" inside a string is cut as a comment too, so this no longer parses.
    ('{"validity": [1, 0.5], "redundancy": [-1, 0], "source": "http://example.org"}', None),
    # A block that does not parse is skipped; the next one counts.
    ('Scores: {validity: high}. JSON: {"validity": [1, 0.5], "redundancy": [-1, 0]}', VALID),
    # The first block that parses decides, even without the two keys.
    ('{"step": 1} {"validity": [1, 0.5], "redundancy": [-1, 0]}', None),
    ('{"validity": [1, 0.5]}', None),
    ('} {"validity": [1, 0.5], "redundancy": [-1, 0]}', None),  # unbalanced before: invalid
    ('{"validity": [1, 0.5], "redundancy": [-1, 0]} }', VALID),  # after: never reached
    ('{"validity": [1, 0.5], "redundancy": [-1, 0]', None),
    ("I cannot judge this solution.", None),
    ("", None),
    (None, None),
])
def test_parse_critic_response(text, expected):
    assert parse_critic_response(text) == expected


def test_critic_result_labels_and_invalid_form():
    s = sample("circular_u1", "circular", THREE, [2])
    text = '{"validity": [NaN, 0, 1e-9, true], "redundancy": [0.0, -0, 2, false]}'
    result = critic_result(s, text)
    assert result["validity"] is True and result["idx"] == s.id
    assert result["scores"]["step_level_validity_labels"] == [False, False, True, True]
    assert result["scores"]["step_level_redundancy_labels"] == [False, False, True, False]
    # Lengths are not checked (4 scores for 3 steps).
    assert len(result["scores"]["step_level_validity_scores"]) == 4
    assert critic_result(s, "no json") == {"validity": False, "idx": s.id, "original_response": "no json"}
    bad = '{"validity": ["high"], "redundancy": [0]}'
    assert critic_result(s, bad) == {"validity": False, "idx": s.id, "original_response": bad}


# ------------------------------------------------------------------------------------------------ entry points


def test_score_and_the_cli_reach_the_critic(cases_server, tmp_path, capsys):
    from prmbench_fast.cli import main
    from prmbench_fast.io import read_predictions
    from prmbench_fast import score

    direct = score_critic(DATASET, api_base=cases_server.url, api_model="critic-test", api_key="k",
                          max_retries=MAX_RETRIES, **{**FAST, "timeout": TIMEOUT})
    via_score = score("critic-test", DATASET, family="critic", api_base=cases_server.url, api_key="k",
                      max_retries=MAX_RETRIES, **{**FAST, "timeout": TIMEOUT})
    assert via_score.official == direct.official

    # The CLI on a data file; its results file (invalid lines without scores included) reads back as predictions.
    data = tmp_path / "data.jsonl"
    rows = [{"idx": "p1", "classification": "circular", "modified_question": CASES[2][0].question,
             "modified_process": list(CASES[2][0].steps), "error_steps": [2]}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    code = main(["score", "--critic", "--api-base", cases_server.url, "--api-model", "critic-test", "--data", str(data),
                 "--output-dir", str(out), "--no-progress"])
    assert code == 0
    assert "Overall" in capsys.readouterr().out
    assert [r["idx"] for r in read_predictions(out / "results.jsonl")] == ["circular_p1"]

    invalid = tmp_path / "invalid.jsonl"
    invalid.write_text(json.dumps({"validity": False, "idx": "circular_p1", "original_response": "no json"}) + "\n")
    assert read_predictions(invalid) == [{"validity": False, "idx": "circular_p1", "original_response": "no json"}]
