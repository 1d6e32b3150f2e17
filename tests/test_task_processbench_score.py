"""score(task="processbench"): PRM families score ProcessBench solutions with their own input format and label rule;
the prediction of a sample is its first step labelled wrong (-1 if none), scored by the task's evaluator."""

import json

import pytest

import prmbench_fast as pf
from prmbench_fast.cli import main
from prmbench_fast.tasks.processbench import ProcessBenchReport, evaluate_processbench
from prmbench_fast.testing.processbench_data import write_processbench
from prmbench_fast.testing.tiny_models import tiny_llama, train_tokenizer

MAX_LENGTH = 256  # some solutions get truncated: their rewards past the cut vanish, as for PRMBench


@pytest.fixture(scope="module")
def pb_data(prmbench_jsonl, tmp_path_factory):
    folder = tmp_path_factory.mktemp("processbench")
    write_processbench(prmbench_jsonl, folder, limit_per_class=1)
    return folder, pf.load_prmbench(folder, task="processbench")


@pytest.fixture(scope="module")
def tokenizer(pb_data):
    data = pb_data[1]
    # " +" and " -" must be single tokens for lm_judge: the corpus repeats them so the BPE learns them.
    return train_tokenizer([s.question for s in data] + [t for s in data for t in s.steps] + ["Verdict: +", "Verdict: -"] * 30)


def official_prm_prediction(labels):
    """The official PRM scripts' rule: the first step not judged correct, else -1."""
    return next((k for k, correct in enumerate(labels) if not correct), -1)


@pytest.mark.parametrize("family, head", [("generic", "token_classification"), ("lm_judge", "causal")])
def test_score_predicts_the_first_wrong_step_and_resumes(pb_data, tokenizer, tmp_path, family, head):
    _, data = pb_data
    model = tiny_llama(len(tokenizer), head=head)
    options = dict(tokenizer=tokenizer, family=family, task="processbench", max_length=MAX_LENGTH, progress=False,
                   output_dir=tmp_path / "run")
    report = pf.score(model, data, **options)
    assert isinstance(report, ProcessBenchReport) and report.splits == list(data.splits)
    written = [json.loads(line) for line in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    assert {r["idx"] for r in written} == {s.id for s in data}
    # The prediction of each sample is the official rule applied to the labels the family wrote.
    for r in written:
        assert report.predictions[r["idx"]] == official_prm_prediction(r["scores"]["step_level_validity_labels"])
    assert evaluate_processbench(data, written).to_json()["official"] == report.to_json()["official"]  # NaN: None
    assert json.loads((tmp_path / "run" / "report.json").read_text())["task"] == "processbench"
    again = pf.score(model, data, **options)
    assert again.run["samples_resumed"] == len(data) and again.predictions == report.predictions


def test_validity_threshold_override_moves_the_predictions(pb_data, tokenizer):
    _, data = pb_data
    model = tiny_llama(len(tokenizer), head="token_classification")
    options = dict(tokenizer=tokenizer, family="generic", task="processbench", max_length=MAX_LENGTH, progress=False)
    low = pf.score(model, data, validity_threshold=0.0, **options)  # P(correct) > 0 everywhere: nothing wrong
    high = pf.score(model, data, validity_threshold=1.0, **options)  # never > 1: every first step wrong
    assert set(low.predictions.values()) == {-1} and set(high.predictions.values()) == {0}


def test_score_command_with_task_processbench(pb_data, tokenizer, tmp_path, capsys):
    folder, data = pb_data
    tiny_llama(len(tokenizer), head="causal").save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    assert main(["score", "--model", str(tmp_path / "model"), "--family", "lm_judge", "--task", "processbench",
                 "--data", str(folder), "--max-length", str(MAX_LENGTH), "--no-progress",
                 "--output-dir", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "correct acc" in out and "average" in out


def test_score_refuses_prmbench_data_for_the_processbench_task(prmbench_jsonl, tokenizer):
    with pytest.raises(TypeError, match="processbench task's data"):
        pf.score(tiny_llama(len(tokenizer)), pf.load_prmbench(prmbench_jsonl, limit_per_class=1), tokenizer=tokenizer,
                 family="lm_judge", task="processbench", progress=False)
