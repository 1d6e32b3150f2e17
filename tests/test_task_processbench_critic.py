"""LLM critics on ProcessBench (score_critic(task="processbench"), score --critic --task processbench) against the
local scripted OpenAI-compatible server: the prompt as the server received it, the official reading of the boxed
answer (malformed ones included), retries, resume, and the numbers of an independent transcription of run_eval.py."""

import json

import pytest

pytest.importorskip("openai")

from critic_server import serve  # noqa: F401 (a fixture)
from prmbench_fast.cli import main
from prmbench_fast.critic import score_critic
from prmbench_fast.results_store import RunMismatchError
from prmbench_fast.tasks.processbench import (
    ProcessBenchDataset,
    ProcessBenchSample,
    critique_result,
    parse_critique,
)

FAST = dict(retry_interval=0.01, timeout=5.0, progress=False, api_key="k")


def pb_sample(sample_id, steps, label):
    return ProcessBenchSample(sample_id, f"Problem {sample_id}: compute x.", tuple(steps), label,
                              sample_id.split("-")[0], "test-generator", label == -1)


STEPS = ["x = 2 + 2.", "So x = 4.", "  Then 2x = 8.\n"]

# (sample, script, the prediction run_eval.py derives from the final answer)
CASES = [
    (pb_sample("gsm8k-0", STEPS, -1), [("answer", "All paragraphs are right. \\boxed{-1}")], -1),
    (pb_sample("gsm8k-1", STEPS, 1), [("answer", "Paragraph 1 is wrong: \\boxed{ 1 }")], 1),
    # The LAST box counts.
    (pb_sample("gsm8k-2", STEPS, 2), [("answer", "First \\boxed{0}, on reflection \\boxed{2}.")], 2),
    # int() of "+0" is 0.
    (pb_sample("gsm8k-3", STEPS, -1), [("answer", "\\boxed{+0}")], 0),
    # No box, a non-int, a nested brace (the regex stops at the first "}"), an empty box: None, never a match.
    (pb_sample("math-0", STEPS, -1), [("answer", "The answer is -1.")], None),
    (pb_sample("math-1", STEPS, 0), [("answer", "\\boxed{0.0}")], None),
    (pb_sample("math-2", STEPS, 0), [("answer", "\\boxed{\\text{0}}")], None),
    (pb_sample("math-3", STEPS, -1), [("answer", "\\boxed{}")], None),
    # An index past the last paragraph is an int that never matches.
    (pb_sample("math-4", STEPS, 2), [("answer", "\\boxed{7}")], 7),
    # A server error, then an answer: asked again.
    (pb_sample("math-5", STEPS, 0), [("status", 500), ("answer", "\\boxed{0}")], 0),
    # Every attempt fails: stored invalid, prediction None.
    (pb_sample("math-6", STEPS, -1), [("status", 503)], None),
]
MAX_RETRIES = 3
DATASET = ProcessBenchDataset(s for s, _, _ in CASES)


def problem_of(body):
    """The problem in the default template's layout, as the server keys its script."""
    content = body["messages"][-1]["content"]
    return content[content.index("[Math Problem]\n\n") + 16:content.index("\n\n[Solution]")]


@pytest.fixture
def server(serve):
    return serve({s.question: script for s, script, _ in CASES}, key=problem_of)


def run_eval_numbers(samples, predictions):
    """An independent transcription of run_eval.py's numbers: per split, match = prediction == label, the two
    accuracies in percent and their harmonic mean."""
    out = {}
    for split in dict.fromkeys(s.split for s in samples):
        rows = [s for s in samples if s.split == split]
        error = [predictions[s.id] == s.label for s in rows if s.label != -1]
        correct = [predictions[s.id] == s.label for s in rows if s.label == -1]
        acc1 = sum(error) / len(error) * 100
        acc2 = sum(correct) / len(correct) * 100
        out[split] = {"error_acc": acc1, "correct_acc": acc2,
                      "f1": 2 * acc1 * acc2 / (acc1 + acc2) if acc1 + acc2 else float("nan")}
    return out


def test_the_prompt_as_the_server_received_it(serve):
    s = CASES[1][0]
    server = serve({s.question: [("answer", "\\boxed{1}")]}, key=problem_of)
    score_critic(ProcessBenchDataset([s]), task="processbench", api_base=server.url, api_model="critic-test", **FAST)
    (body,) = server.bodies
    assert body["model"] == "critic-test" and body["temperature"] == 0
    (message,) = body["messages"]
    assert message["role"] == "user"
    tagged = ("<paragraph_0>\nx = 2 + 2.\n</paragraph_0>\n\n<paragraph_1>\nSo x = 4.\n</paragraph_1>\n\n"
              "<paragraph_2>\n  Then 2x = 8.\n\n</paragraph_2>")
    content = message["content"]
    assert content.startswith("Below are a math problem and a proposed solution.")
    assert f"[Math Problem]\n\n{s.question}\n\n[Solution]\n\n{tagged}\n\n" in content
    assert content.endswith("Write your final answer (the index alone) inside \\boxed{}.")

    # A template of one's own (e.g. the official file's text) is filled and stripped as run_eval.py does.
    template = "  {problem}\n--\n{tagged_response}\nPut it in \\boxed{{}}.\n\n"
    server.bodies.clear()
    server.key = lambda body: body["messages"][-1]["content"].split("\n--\n")[0]
    score_critic(ProcessBenchDataset([s]), task="processbench", critique_template=template, api_base=server.url,
                 api_model="critic-test", **FAST)
    assert server.bodies[0]["messages"] == [{"role": "user",
                                             "content": f"{s.question}\n--\n{tagged}\nPut it in \\boxed{{}}."}]


def test_boxed_answers_give_the_official_predictions_and_numbers(server, tmp_path):
    report = score_critic(DATASET, task="processbench", api_base=server.url, api_model="critic-test",
                          max_retries=MAX_RETRIES, output_dir=tmp_path, **FAST)
    expected = {s.id: prediction for s, _, prediction in CASES}
    assert report.predictions == expected
    oracle = run_eval_numbers(DATASET.samples, expected)
    for split, numbers in oracle.items():
        assert report.official[split] == pytest.approx(numbers, rel=1e-12, nan_ok=True)
    assert report.official["average_f1"] == pytest.approx(sum(n["f1"] for n in oracle.values()) / 2, rel=1e-12)
    assert report.counts["math"]["invalid"] == 5  # the four unreadable answers and the failed requests
    assert server.calls[CASES[9][0].question] == 2 and server.calls[CASES[10][0].question] == MAX_RETRIES
    assert report.run["task"] == "processbench" and report.run["requests"] == len(CASES) + 1 + MAX_RETRIES - 1

    # The run folder: result lines that read back through `evaluate --task processbench`, run.json, report.json.
    lines = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert {r["idx"]: r.get("prediction") for r in lines} == expected
    assert json.loads((tmp_path / "run.json").read_text())["task"] == "processbench"
    assert json.loads((tmp_path / "report.json").read_text())["task"] == "processbench"


def test_score_with_the_critic_family_passes_the_task(server):
    """score(family="critic", task="processbench") is score_critic(task="processbench"): the ProcessBench protocol,
    not the PRMBench one (which refuses ProcessBench data)."""
    from prmbench_fast import score

    options = dict(api_base=server.url, max_retries=MAX_RETRIES, **FAST)
    report = score("critic-test", DATASET, family="critic", task="processbench", **options)
    direct = score_critic(DATASET, task="processbench", api_model="critic-test", **options)
    assert report.run["task"] == "processbench"
    assert report.predictions == direct.predictions == {s.id: prediction for s, _, prediction in CASES}
    assert report.official == direct.official


def test_resume_asks_only_what_is_missing(server, tmp_path):
    options = dict(task="processbench", api_base=server.url, api_model="critic-test", max_retries=MAX_RETRIES,
                   output_dir=tmp_path, **FAST)
    first = score_critic(DATASET, **options)
    asked = len(server.bodies)
    again = score_critic(DATASET, **options)
    assert len(server.bodies) == asked and again.run["samples_resumed"] == len(DATASET)
    assert again.official == first.official and again.predictions == first.predictions

    # A run killed halfway: only the samples whose result line is gone are asked again.
    results = tmp_path / "results.jsonl"
    kept = results.read_text().splitlines()[::2]
    results.write_text("".join(line + "\n" for line in kept))
    before = len(server.bodies)
    resumed = score_critic(DATASET, **options)
    kept_ids = {json.loads(line)["idx"] for line in kept}
    assert {problem_of(b) for b in server.bodies[before:]} == {s.question for s in DATASET if s.id not in kept_ids}
    assert resumed.predictions == first.predictions and resumed.official == first.official

    # Another prompt is another run.
    with pytest.raises(RunMismatchError, match="prompt"):
        score_critic(DATASET, **options, critique_template="{problem} {tagged_response} \\boxed{{}}")


def test_options_of_the_other_protocol_are_refused(server):
    options = dict(api_base=server.url, api_model="critic-test", **FAST)
    with pytest.raises(ValueError, match="shots"):
        score_critic(DATASET, task="processbench", shots=1, **options)
    with pytest.raises(ValueError, match="tagged_response"):
        score_critic(DATASET, task="processbench", critique_template="{problem} {solution}", **options)
    with pytest.raises(TypeError, match="prmbench task's data.*got ProcessBenchDataset"):
        score_critic(DATASET, **options)  # task="prmbench" with ProcessBench data


@pytest.mark.parametrize("text, expected", [
    ("\\boxed{3}", 3), ("\\boxed{ -1 }\n", -1), ("a \\boxed{1} b \\boxed{2}", 2), ("\\boxed{2} \\boxed{two}", None),
    ("\\boxed{1_0}", 10), ("\\boxed{}", None), ("\\boxed{-1.}", None), ("boxed{1}", None), (None, None),
    ("\\boxed{\\boxed{1}}", None),
])
def test_parse_critique(text, expected):
    assert parse_critique(text) == expected


def test_critique_result_lines():
    s = pb_sample("gsm8k-9", ["a", "b", "c"], 1)
    assert critique_result(s, "\\boxed{1}") == {"idx": "gsm8k-9", "prediction": 1, "validity": True,
                                                "scores": {"step_level_validity_labels": [True, False, True]}}
    assert critique_result(s, "\\boxed{-1}")["scores"]["step_level_validity_labels"] == [True, True, True]
    assert critique_result(s, "\\boxed{3}") == {"idx": "gsm8k-9", "prediction": 3, "validity": False,
                                                "original_response": "\\boxed{3}"}


def test_the_cli_scores_a_processbench_critic(server, tmp_path, capsys):
    folder = tmp_path / "data"
    folder.mkdir()
    rows = [{"id": s.id, "generator": s.generator, "problem": s.question, "steps": list(s.steps),
             "final_answer_correct": s.final_answer_correct, "label": s.label} for s, _, _ in CASES[:4]]
    (folder / "gsm8k.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = ["score", "--critic", "--task", "processbench", "--api-base", server.url, "--api-model", "critic-test",
            "--data", str(folder), "--no-progress"]
    assert main([*base, "--output-dir", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "gsm8k" in out and "average" in out
    written = [json.loads(line) for line in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    assert {r["idx"]: r["prediction"] for r in written} == {s.id: p for s, _, p in CASES[:4]}

    assert main([*base, "--shots", "1"]) == 2
    assert "--shots" in capsys.readouterr().err
    bad = tmp_path / "template.txt"
    bad.write_text("{question}\n")
    assert main([*base, "--critique-template", str(bad)]) == 2
    assert str(bad) in capsys.readouterr().err
