"""PRMBenchCallback in a real transformers.Trainer: a tiny token-classification PRM trained on CPU, scored on a PRMBench
subset at the expected steps, logged into the log history and to the other callbacks, on the live weights."""

import json
import subprocess
import sys

import pytest
from transformers import DataCollatorForTokenClassification, Trainer, TrainerCallback, TrainingArguments

import prmbench_fast
from conftest import PRMBENCH_JSONL, REPO_ROOT
from prmbench_fast import load_prmbench, score
from prmbench_fast.testing.tiny_models import tiny_llama, train_tokenizer
from subprocess_testing import rank_results, run_two_ranks

PREFIX = "prmbench/"
SCORE_OPTIONS = dict(family="generic", max_length=512)

# Synthetic step-labelled problems: (question, [(step, step is correct)]).
PROBLEMS = [
    ("What is 2 + 3 * 4?", [("3 * 4 = 12.", True), ("2 + 12 = 14.", True), ("The answer is 14.", True)]),
    ("Solve x + 5 = 9.", [("Subtract 5 from both sides.", True), ("x = 9 + 5 = 14.", False)]),
    ("How many legs do 3 spiders have?", [("A spider has 8 legs.", True), ("3 * 8 = 21.", False),
                                          ("The answer is 21.", False)]),
    ("What is half of 18?", [("18 / 2 = 9.", True), ("The answer is 9.", True)]),
]  # fmt: skip


@pytest.fixture(scope="module")
def subset():
    return load_prmbench(PRMBENCH_JSONL, limit_per_class=1)


def make_tokenizer(dataset):
    texts = [s.question for s in dataset] + [step for s in dataset for step in s.steps]
    return train_tokenizer(texts + [q for q, _ in PROBLEMS] + [step for _, steps in PROBLEMS for step, _ in steps])


@pytest.fixture(scope="module")
def tokenizer(subset):
    return make_tokenizer(subset)


def prm_examples(tokenizer):
    """The TRL PRMTrainer convention, which the generic family reads: BOS, the question, then each step followed by
    the separator "\\n"; the step's label (1: correct) sits at the separator's last token, -100 everywhere else."""
    separator = tokenizer("\n", add_special_tokens=False)["input_ids"]
    examples = []
    for question, steps in PROBLEMS:
        ids = [tokenizer.bos_token_id] + tokenizer(question, add_special_tokens=False)["input_ids"]
        labels = [-100] * len(ids)
        for step, correct in steps:
            step_ids = tokenizer(step, add_special_tokens=False)["input_ids"] + separator
            ids += step_ids
            labels += [-100] * (len(step_ids) - 1) + [int(correct)]
        examples.append({"input_ids": ids, "labels": labels})
    return examples


class Recorder(TrainerCallback):
    """Stands for a reporter (wandb, tensorboard): what reaches the callbacks' on_log."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append((state.global_step, dict(logs)))


class TrainingMode(TrainerCallback):
    """Added after PRMBenchCallback: the model's mode right after the callback scored it."""

    def __init__(self):
        self.modes = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.modes.append((state.global_step, all(m.training for m in model.modules())))


def train(tmp_path, model, tokenizer, dataset, *, max_steps, eval_steps, **callback_options):
    examples = prm_examples(tokenizer)
    args = TrainingArguments(
        output_dir=str(tmp_path / "trainer"), max_steps=max_steps, ddp_timeout=120, per_device_train_batch_size=2,
        per_device_eval_batch_size=2, learning_rate=1e-2, eval_strategy="steps", eval_steps=eval_steps,
        logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, seed=0,
    )  # fmt: skip
    recorder = Recorder()
    trainer = Trainer(model=model, args=args, train_dataset=examples, eval_dataset=examples,
                      data_collator=DataCollatorForTokenClassification(tokenizer), callbacks=[recorder])
    trainer.add_callback(prmbench_fast.PRMBenchCallback(dataset, tokenizer=tokenizer, trainer=trainer, prefix=PREFIX,
                                                        **SCORE_OPTIONS, **callback_options))
    mode = TrainingMode()
    trainer.add_callback(mode)
    trainer.train()
    return trainer, recorder, mode


def prmbench_logs(entries):
    """(step, {prefixed column: value}) of the entries that carry PRMBench columns."""
    return [(step, {k: v for k, v in logs.items() if k.startswith(PREFIX)})
            for step, logs in entries if any(k.startswith(PREFIX) for k in logs)]


def logged(table):
    return {PREFIX + column: value for column, value in table.items() if value is not None}


def test_logs_at_every_n_steps_and_evaluations_on_the_live_weights(tmp_path, subset, tokenizer):
    model = tiny_llama(len(tokenizer), head="token_classification")
    trainer, recorder, mode = train(tmp_path, model, tokenizer, subset, max_steps=6, eval_steps=3, every_n_steps=2)

    history = prmbench_logs((entry["step"], entry) for entry in trainer.state.log_history)
    # every_n_steps=2 -> 2, 4, 6; evaluations -> 3, 6; step 6 (both) is scored and logged once.
    assert [step for step, _ in history] == [2, 3, 4, 6]
    # The other callbacks' on_log (the reporters) got the same values.
    assert prmbench_logs(recorder.logs) == history
    # Every column of the leaderboard row, prefixed (the subset has every class, so none is None).
    assert set(history[-1][1]) == {PREFIX + c for c in ("Overall", "NR", "NCL", "S1", "ES", "SC", "DC", "CI", "S2",
                                                        "PS", "DR", "MS", "S3")}
    # The Trainer's own loss log still happens at every step, including those the callback logged at.
    assert sorted(e["step"] for e in trainer.state.log_history if "loss" in e) == [1, 2, 3, 4, 5, 6]
    # The callback scored the live weights: training moved the row, and the last one is exactly a fresh score() of the
    # final weights.
    assert history[0][1] != history[-1][1]
    # Scored in eval mode, then back in training mode for the next step.
    assert mode.modes == [(step, True) for step in range(1, 7)]
    final = score(model, subset, tokenizer=tokenizer, progress=False, **SCORE_OPTIONS)
    assert history[-1][1] == logged(final.table)


def test_output_dir_keeps_one_fresh_folder_per_step_and_skips_absent_columns(tmp_path, subset, tokenizer):
    data = subset.subset(classes=["circular", "counterfactual"])  # no NR, DC, MS... in this set
    out = tmp_path / "prmbench"
    # A folder from an earlier run (other weights) at a step this run will score: it must be started over, not
    # resumed and not refused.
    stale = tiny_llama(len(tokenizer), head="token_classification", seed=1)
    score(stale, data, tokenizer=tokenizer, output_dir=out / "step-2", progress=False, **SCORE_OPTIONS)

    model = tiny_llama(len(tokenizer), head="token_classification")
    trainer, _, _ = train(tmp_path, model, tokenizer, data, max_steps=4, eval_steps=100, every_n_steps=2,
                       output_dir=out)

    history = dict(prmbench_logs((entry["step"], entry) for entry in trainer.state.log_history))
    assert sorted(history) == [2, 4]
    assert sorted(p.name for p in out.iterdir()) == ["cache", "step-2", "step-4"]
    for step, values in history.items():
        report = json.loads((out / f"step-{step}" / "report.json").read_text())
        assert report["run"]["samples_resumed"] == 0 and report["run"]["samples_scored"] == len(data)
        assert values == logged(report["table"])
        assert len((out / f"step-{step}" / "results.jsonl").read_text().splitlines()) == len(data)
        # Columns of absent classes are None in the table and not logged.
        absent = {column for column, value in report["table"].items() if value is None}
        assert absent and not {PREFIX + column for column in absent} & set(values)


# Runs under torchrun with 2 ranks (DDP on gloo, through the Trainer); each rank writes its result to its own file.
DDP_CHILD = r"""
import json, pathlib, sys
import torch
sys.path.insert(0, sys.argv[1])
from prmbench_fast import load_prmbench, score
from subprocess_testing import write_rank_result
from test_callback import SCORE_OPTIONS, logged, make_tokenizer, prmbench_logs, train
from prmbench_fast.testing.tiny_models import tiny_llama

data = load_prmbench(sys.argv[2], limit_per_class=1)
tokenizer = make_tokenizer(data)
model = tiny_llama(len(tokenizer), head="token_classification")
trainer, recorder, mode = train(pathlib.Path(sys.argv[3]), model, tokenizer, data, max_steps=4, eval_steps=100,
                                every_n_steps=2)
final = score(model, data, tokenizer=tokenizer, progress=False, **SCORE_OPTIONS)  # every rank: it is collective
history = prmbench_logs((entry["step"], entry) for entry in trainer.state.log_history)
rank = trainer.args.process_index
write_rank_result(sys.argv[3], rank, {"rank": rank, "world": trainer.args.world_size, "history": history,
                                      "final": logged(final.table)})
torch.distributed.barrier()  # both results are written before either rank tears the group down
torch.distributed.destroy_process_group()  # a rank leaving with the group open can abort the other (gloo)
"""


def test_under_ddp_every_rank_scores_and_rank_zero_logs(tmp_path):
    script = tmp_path / "ddp_child.py"
    script.write_text(DDP_CHILD)
    run_two_ranks(script, REPO_ROOT / "tests", PRMBENCH_JSONL, tmp_path)
    ranks = rank_results(tmp_path)
    assert [(r["rank"], r["world"]) for r in ranks] == [(0, 2), (1, 2)]
    # Both ranks scored (score() gathers across ranks: one skipping it would hang the other); only rank 0 logged.
    assert [step for step, _ in ranks[0]["history"]] == [2, 4] and ranks[1]["history"] == []
    assert ranks[0]["history"][-1][1] == ranks[0]["final"] == ranks[1]["final"]


def test_arguments_are_checked(subset, tokenizer):
    with pytest.raises(ValueError, match="every_n_steps must be a positive int"):
        prmbench_fast.PRMBenchCallback(subset, tokenizer=tokenizer, trainer=None, every_n_steps=0)
    with pytest.raises(TypeError, match="trainer must be the transformers.Trainer"):
        prmbench_fast.PRMBenchCallback(subset, tokenizer=tokenizer, trainer=None)


def test_import_is_light():
    code = "import sys, prmbench_fast\nassert 'transformers' not in sys.modules\nprmbench_fast.PRMBenchCallback\n"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
