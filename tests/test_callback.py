"""PRMBenchCallback in a real transformers.Trainer: a tiny token-classification PRM trained on CPU, scored on a PRMBench
subset at the expected steps, logged into the log history and to the other callbacks, on the live weights; its values
in the evaluations' metrics pick the best checkpoint and drive early stopping; every mistake in its arguments raises
when it is built."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

# transformers' Trainer refuses to run without accelerate, so every Trainer run here needs it (any Trainer user has it).
pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate")
from transformers import (  # noqa: E402
    DataCollatorForTokenClassification, EarlyStoppingCallback, Trainer, TrainerCallback, TrainingArguments,
)

import prmbench_fast
from conftest import PRMBENCH_JSONL, REPO_ROOT
from prmbench_fast import load_prmbench, score
from prmbench_fast.analysis import analyze
from prmbench_fast.integrations._scoring import TrivialPredictorWarning
from prmbench_fast.ratios import TABLE_COLUMNS
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


def make_trainer(tmp_path, model, tokenizer, *, max_steps=1, eval_steps=100, callbacks=(), learning_rate=1e-2,
                 **arguments):
    """A Trainer whose processing_class is the tokenizer (the callback's default tokenizer)."""
    examples = prm_examples(tokenizer)
    args = TrainingArguments(
        output_dir=str(tmp_path / "trainer"), max_steps=max_steps, ddp_timeout=120, per_device_train_batch_size=2,
        per_device_eval_batch_size=2, learning_rate=learning_rate, eval_strategy="steps", eval_steps=eval_steps,
        logging_steps=1, save_strategy=arguments.pop("save_strategy", "no"), report_to="none", use_cpu=True,
        disable_tqdm=True, seed=0, **arguments,
    )  # fmt: skip
    return Trainer(model=model, args=args, train_dataset=examples, eval_dataset=examples, processing_class=tokenizer,
                   data_collator=DataCollatorForTokenClassification(tokenizer), callbacks=list(callbacks))


def train(tmp_path, model, tokenizer, dataset, *, max_steps, eval_steps, trainer_arguments=None, callbacks=(),
          learning_rate=1e-2, **callback_options):
    """Train with a PRMBenchCallback given only the dataset and options: tokenizer from the Trainer's
    processing_class, family "auto" (a LlamaForTokenClassification: generic)."""
    recorder = Recorder()
    trainer = make_trainer(tmp_path, model, tokenizer, max_steps=max_steps, eval_steps=eval_steps,
                           callbacks=[recorder, *callbacks], learning_rate=learning_rate, **(trainer_arguments or {}))
    callback_options.setdefault("max_length", SCORE_OPTIONS["max_length"])
    trainer.add_callback(prmbench_fast.PRMBenchCallback(dataset, trainer=trainer, prefix=PREFIX, **callback_options))
    mode = TrainingMode()
    trainer.add_callback(mode)
    trainer.train()
    return trainer, recorder, mode


def prmbench_logs(entries):
    """(step, {prefixed column: value}) of the entries that carry PRMBench columns."""
    return [(step, {k: v for k, v in logs.items() if k.startswith(PREFIX)})
            for step, logs in entries if any(k.startswith(PREFIX) for k in logs)]


def logged(table, prefix=PREFIX):
    return {prefix + column: value for column, value in table.items() if value is not None}


def row(values, prefix=PREFIX):
    """The leaderboard columns among logged values (without AUROC, best threshold, trivial)."""
    return {k: v for k, v in values.items() if k[len(prefix):] in TABLE_COLUMNS}


def test_logs_at_every_n_steps_and_evaluations_on_the_live_weights(tmp_path, subset, tokenizer):
    model = tiny_llama(len(tokenizer), head="token_classification")
    trainer, recorder, mode = train(tmp_path, model, tokenizer, subset, max_steps=6, eval_steps=3, every_n_steps=2)

    history = prmbench_logs((entry["step"], entry) for entry in trainer.state.log_history)
    # every_n_steps=2 -> 2, 4, 6; evaluations -> 3, 6; step 6 (both) is scored and logged once.
    assert [step for step, _ in history] == [2, 3, 4, 6]
    # The other callbacks' on_log (the reporters) got the same values.
    assert prmbench_logs(recorder.logs) == history
    # Every column of the leaderboard row, prefixed (the subset has every class, so none is None), and the analyses.
    assert set(history[-1][1]) == {PREFIX + c for c in ("Overall", "NR", "NCL", "S1", "ES", "SC", "DC", "CI", "S2",
                                                        "PS", "DR", "MS", "S3", "AUROC", "Overall_at_best_threshold",
                                                        "best_threshold", "trivial")}
    # The Trainer's own loss log still happens at every step, including those the callback logged at.
    assert sorted(e["step"] for e in trainer.state.log_history if "loss" in e) == [1, 2, 3, 4, 5, 6]
    # The callback scored the live weights: training moved the row, and the last one is exactly a fresh score() of the
    # final weights.
    assert history[0][1] != history[-1][1]
    # Scored in eval mode, then back in training mode for the next step.
    assert mode.modes == [(step, True) for step in range(1, 7)]
    final = score(model, subset, tokenizer=tokenizer, progress=False, **SCORE_OPTIONS)
    assert row(history[-1][1]) == logged(final.table)
    analysis = analyze(subset, final, bootstrap=0)
    assert history[-1][1][PREFIX + "AUROC"] == analysis["auroc"]["value"]
    assert history[-1][1][PREFIX + "Overall_at_best_threshold"] == analysis["threshold_sweep"]["best"]["table"]["Overall"]
    assert history[-1][1][PREFIX + "best_threshold"] == analysis["threshold_sweep"]["best"]["threshold"]
    # Flagged exactly when every label on the error classes' samples is the same (early in training the model labels
    # all steps correct, or all wrong, and the row is a trivial predictor's).
    error_sample = torch.tensor([s.classification != "correct" for s in subset])[final.step_predictions.sample_pos]
    labels = final.step_predictions.validity_labels[
        torch.repeat_interleave(error_sample, final.step_predictions.step_counts())]
    assert history[-1][1][PREFIX + "trivial"] == float(bool(labels.all()) or not labels.any())


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
        assert row(values) == logged(report["table"])
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
from subprocess_testing import leave_group, write_rank_result
from test_callback import SCORE_OPTIONS, logged, make_tokenizer, prmbench_logs, row, train
from prmbench_fast.testing.tiny_models import tiny_llama

data = load_prmbench(sys.argv[2], limit_per_class=1)
tokenizer = make_tokenizer(data)
model = tiny_llama(len(tokenizer), head="token_classification")
trainer, recorder, mode = train(pathlib.Path(sys.argv[3]), model, tokenizer, data, max_steps=4, eval_steps=100,
                                every_n_steps=2)
final = score(model, data, tokenizer=tokenizer, progress=False, **SCORE_OPTIONS)  # every rank: it is collective
history = [(step, row(values)) for step, values in prmbench_logs((e["step"], e) for e in trainer.state.log_history)]
metrics = trainer.evaluate()  # every rank: the evaluation loop and the callback's score() are collective
rank = trainer.args.process_index
write_rank_result(sys.argv[3], rank, {"rank": rank, "world": trainer.args.world_size, "history": history,
                                      "final": logged(final.table), "eval": metrics.get("eval_prmbench/Overall")})
leave_group()
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
    # Every rank's evaluation metrics carry the values (each rank's Trainer picks checkpoints and stops from them).
    assert ranks[0]["eval"] == ranks[1]["eval"] == ranks[0]["final"]["prmbench/Overall"]


def test_the_best_prmbench_checkpoint_is_loaded_and_early_stopping_reads_the_metric(tmp_path, subset, tokenizer):
    """metric_for_best_model="eval_prmbench/Overall" with load_best_model_at_end and an EarlyStoppingCallback given to
    the Trainer before the PRMBench callback is added (the usual order): the run stops where the logged Overall
    series says early stopping must, and ends on the checkpoint whose Overall is the best."""
    model = tiny_llama(len(tokenizer), head="token_classification")
    arguments = dict(save_strategy="steps", save_steps=1, load_best_model_at_end=True,
                     metric_for_best_model="eval_prmbench/Overall")
    stopper = EarlyStoppingCallback(early_stopping_patience=2)
    trainer, _, _ = train(tmp_path, model, tokenizer, subset, max_steps=12, eval_steps=1, trainer_arguments=arguments,
                          callbacks=[stopper], learning_rate=3e-2)
    history = prmbench_logs((entry["step"], entry) for entry in trainer.state.log_history)
    steps = [step for step, _ in history]
    overall = np.array([values[PREFIX + "Overall"] for _, values in history])
    # Early stopping (patience 2): the first evaluation that is the second in a row not better than the best before.
    worse = [i for i in range(1, len(overall)) if overall[i] <= overall[:i].max()]
    stop = next((steps[i] for k, i in enumerate(worse[1:]) if i == worse[k] + 1), 12)
    assert steps == list(range(1, stop + 1))
    best = steps[int(np.argmax(overall))]  # the first of equal values: the Trainer keeps a strictly better one only
    assert best != steps[-1], f"the series {overall} does not test loading an earlier checkpoint"
    assert trainer.state.best_metric == overall.max()
    assert trainer.state.best_model_checkpoint.endswith(f"checkpoint-{best}")
    # The model the run ends with is the best checkpoint's: a fresh score() of it gives the best Overall.
    final = score(trainer.model, subset, tokenizer=tokenizer, progress=False, **SCORE_OPTIONS)
    assert final.table["Overall"] == overall.max()


def test_several_sets_are_logged_under_their_names(tmp_path, subset, tokenizer):
    sets = {"simplicity": subset.subset(classes=["redundency", "circular"]),
            "sensitivity": subset.subset(classes=["deception", "multi_solutions"])}
    model = tiny_llama(len(tokenizer), head="token_classification")
    trainer, _, _ = train(tmp_path, model, tokenizer, sets, max_steps=2, eval_steps=2, analyses=False)
    history = prmbench_logs((entry["step"], entry) for entry in trainer.state.log_history)
    assert [step for step, _ in history] == [2]
    metrics = trainer.evaluate()
    for name, data in sets.items():
        report = score(model, data, tokenizer=tokenizer, progress=False, **SCORE_OPTIONS)
        expected = logged(report.table, f"{PREFIX}{name}/")
        assert row(history[0][1], f"{PREFIX}{name}/") == expected
        assert {k: metrics["eval_" + k] for k in expected} == expected
    assert PREFIX + "Overall" not in history[0][1]


def test_a_trivial_row_is_flagged(tmp_path, subset, tokenizer):
    """A zero head scores every step 0.5, which is not > 0.5: every step is labelled an error, the row is the
    all-negative predictor's (the full length kept, so that no step is cut), the flag is logged and a warning says so;
    the AUROC of constant scores is 1/2."""
    model = tiny_llama(len(tokenizer), head="token_classification")
    torch.nn.init.zeros_(model.score.weight)
    with pytest.warns(TrivialPredictorWarning, match="labels every step an error"):
        trainer, _, _ = train(tmp_path, model, tokenizer, subset, max_steps=1, eval_steps=100, every_n_steps=1,
                              learning_rate=0.0, max_length=2048)
    (_, values), = prmbench_logs((entry["step"], entry) for entry in trainer.state.log_history)
    all_negative = prmbench_fast.analysis.trivial_baselines(subset)["all_negative"]
    assert row(values) == logged(all_negative)
    assert values[PREFIX + "trivial"] == 1.0 and values[PREFIX + "AUROC"] == 0.5


@pytest.fixture
def trainer_for_checks(tmp_path, tokenizer):
    return make_trainer(tmp_path, tiny_llama(len(tokenizer), head="token_classification"), tokenizer)


@pytest.mark.parametrize("change,error,message", [
    (dict(evry_n_steps=5), TypeError, "unexpected keyword argument 'evry_n_steps' .did you mean 'every_n_steps'"),
    (dict(max_lenght=512), TypeError, "unexpected keyword argument 'max_lenght' .did you mean 'max_length'"),
    (dict(step_seperator="\n\n"), TypeError, "did you mean 'step_separator'"),
    (dict(family="generik"), ValueError, "unknown PRM family 'generik'"),
    (dict(family="math_shepherd", threshold=0.3), TypeError, "unexpected keyword argument 'threshold'"),
    (dict(tokenizer="HuggingFaceTB/SmolLM2-135M"), TypeError, "tokenizer must be a tokenizer object, not a path"),
    (dict(dataset=str(PRMBENCH_JSONL)), TypeError, "dataset must be a PRMBenchDataset .* got a path"),
    (dict(dataset=[]), TypeError, "dataset must be a PRMBenchDataset .* got list"),
    (dict(dataset={"a": []}), TypeError, r"dataset\['a'\] must be a PRMBenchDataset"),
    (dict(output_dir="FILE"), ValueError, "output_dir .* exists and is not a folder"),
    (dict(output_dir="FILE/sub"), ValueError, "output_dir .* exists and is not a folder"),
    (dict(every_n_steps=0), ValueError, "every_n_steps must be a positive int"),
    (dict(every_n_steps=2.0), ValueError, "every_n_steps must be a positive int"),
    (dict(batch_tokens="4096"), ValueError, "batch_tokens must be a positive int"),
    (dict(validity_threshold=float("nan")), ValueError, "validity_threshold must be a finite number"),
    (dict(task="bon"), ValueError, "task must be one of"),
    (dict(device="cuda"), TypeError, "device= is not an option here"),
    (dict(prefix=None), TypeError, "prefix must be a string"),
    (dict(trainer=None), TypeError, "trainer must be the transformers.Trainer"),
], ids=lambda v: v if isinstance(v, str) and len(v) < 20 else None)
def test_every_mistake_raises_at_construction_naming_it(tmp_path, subset, trainer_for_checks, change, error,
                                                        message):
    (tmp_path / "FILE").write_text("not a folder")
    options = {"dataset": subset, "trainer": trainer_for_checks, **change}
    for name in ("output_dir",):
        if name in options:
            options[name] = str(tmp_path / options[name])
    with pytest.raises(error, match=message):
        prmbench_fast.PRMBenchCallback(options.pop("dataset"), **options)


def test_metric_for_best_model_must_name_a_value_it_gives(tmp_path, subset, tokenizer):
    model = tiny_llama(len(tokenizer), head="token_classification")
    for metric, accepted in (("eval_prmbench/Overal", False), ("prmbench/Overall", True),
                             ("eval_prmbench/AUROC", True), ("eval_loss", True)):
        trainer = make_trainer(tmp_path, model, tokenizer, save_strategy="steps", load_best_model_at_end=True,
                               metric_for_best_model=metric)
        if accepted:
            prmbench_fast.PRMBenchCallback(subset, trainer=trainer)
        else:
            with pytest.raises(ValueError, match="metric_for_best_model='eval_prmbench/Overal'.*did you mean "
                                                 "'eval_prmbench/Overall'"):
                prmbench_fast.PRMBenchCallback(subset, trainer=trainer)
    # A column of a class the set lacks is never given.
    trainer = make_trainer(tmp_path, model, tokenizer, metric_for_best_model="eval_prmbench/NR")
    with pytest.raises(ValueError, match="metric_for_best_model='eval_prmbench/NR'"):
        prmbench_fast.PRMBenchCallback(subset.subset(classes=["deception"]), trainer=trainer)


def test_family_and_tokenizer_come_from_the_trainer(subset, tokenizer, trainer_for_checks):
    callback = prmbench_fast.PRMBenchCallback(subset, trainer=trainer_for_checks)
    assert callback.family == "generic"  # LlamaForTokenClassification, which no official family claims
    assert callback.scoring.tokenizer is tokenizer
    no_tokenizer = Trainer(model=trainer_for_checks.model, args=trainer_for_checks.args,
                           eval_dataset=trainer_for_checks.eval_dataset)
    with pytest.raises(ValueError, match="tokenizer is needed"):
        prmbench_fast.PRMBenchCallback(subset, trainer=no_tokenizer)


def test_import_is_light():
    code = "import sys, prmbench_fast\nassert 'transformers' not in sys.modules\nprmbench_fast.PRMBenchCallback\n"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
