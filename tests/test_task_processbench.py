"""The ProcessBench task: its loader (official format, named errors) and its evaluator, which equals a plain
transcription of the official ``code/run_eval.py`` (QwenLM/ProcessBench) on random prediction sets.

ProcessBench lives only on the hub: the data here is built in the official format from the PRMBench rows in ../shared
(``prmbench_fast.testing.processbench_data``, what ``make processbench-data`` writes), into tmp folders.
"""

import gzip
import json
import math
import random
import warnings

import numpy as np
import pytest
import torch

import prmbench_fast as pf
from prmbench_fast import PRMBenchDataError, PredictionError
from prmbench_fast.cli import main
from prmbench_fast.predictions import StepPredictions
from prmbench_fast.tasks.processbench import (ProcessBenchDataset, ProcessBenchReport, evaluate_processbench,
                                              first_error_steps, load_processbench)
from prmbench_fast.testing.processbench_data import processbench_rows, write_processbench

SPLITS = ["gsm8k", "math", "olympiadbench", "omnimath"]


# -- code/run_eval.py's metric, transcribed plainly (its per-split block after the generations) -----------------------
def official_split_numbers(input_data, predictions):
    res_data = []
    for d, pred in zip(input_data, predictions):
        d = dict(d)
        d["prediction"] = pred
        d["match"] = pred == d["label"]
        res_data.append(d)
    error_data = [e for e in res_data if e["label"] != -1]
    correct_data = [e for e in res_data if e["label"] == -1]
    with warnings.catch_warnings():  # np.mean([]) warns and gives NaN, and so does 0/0: the oracle keeps the NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        acc1 = np.mean([e["match"] for e in error_data]) * 100
        acc2 = np.mean([e["match"] for e in correct_data]) * 100
        f1 = 2 * acc1 * acc2 / (acc1 + acc2)
    return acc1, acc2, f1


# -- the official RLHFlow PRM script's prediction: the first step not judged correct, else -1 -------------------------
def official_prm_prediction(judgments):
    for sdx, judged_correct in enumerate(judgments):
        if not judged_correct:
            return sdx
    return -1


@pytest.fixture(scope="module")
def pb_rows(prmbench_jsonl):
    return processbench_rows(prmbench_jsonl)


@pytest.fixture(scope="module")
def pb_folder(prmbench_jsonl, tmp_path_factory):
    folder = tmp_path_factory.mktemp("processbench")
    write_processbench(prmbench_jsonl, folder)
    return folder


@pytest.fixture(scope="module")
def pb_data(pb_folder):
    return pf.load_prmbench(pb_folder, task="processbench")


def random_predictions(rows, rng):
    """A mix of right answers, -1, None (an unparseable critic answer) and random step indices."""
    out = []
    for r in rows:
        kind = rng.random()
        if kind < 0.3:
            out.append(r["label"])
        elif kind < 0.45:
            out.append(-1)
        elif kind < 0.55:
            out.append(None)
        else:
            out.append(rng.randrange(-1, len(r["steps"])))
    return out


def assert_official(report, rows_by_split, preds_by_split):
    f1s = []
    assert report.splits == list(rows_by_split)
    for split, rows in rows_by_split.items():
        acc1, acc2, f1 = official_split_numbers(rows, preds_by_split[split])
        ours = report.official[split]
        for name, want in (("error_acc", acc1), ("correct_acc", acc2), ("f1", f1)):
            got = ours[name]
            assert (math.isnan(got) and math.isnan(want)) or got == pytest.approx(float(want), rel=0, abs=1e-12), (split, name)
        errors = [r for r in rows if r["label"] != -1]
        counts = report.counts[split]
        assert counts["error_samples"] == len(errors)
        assert counts["correct_samples"] == len(rows) - len(errors)
        assert counts["error_matches"] == sum(p == r["label"] for r, p in zip(rows, preds_by_split[split]) if r["label"] != -1)
        f1s.append(float(f1))
    assert report.official["average_f1"] == pytest.approx(float(np.mean(f1s)), rel=0, abs=1e-12)


# -- data ----------------------------------------------------------------------------------------------------------------


def test_built_files_follow_the_official_format(pb_rows, pb_data):
    assert list(pb_rows) == SPLITS
    for split, rows in pb_rows.items():
        for k, row in enumerate(rows):
            assert set(row) == {"id", "generator", "problem", "steps", "final_answer_correct", "label"}
            assert row["id"] == f"{split}-{k}"
            assert -1 <= row["label"] < len(row["steps"])
            assert row["final_answer_correct"] == (row["label"] == -1)
    assert isinstance(pb_data, ProcessBenchDataset)
    assert pb_data.splits == tuple(SPLITS)
    assert len(pb_data) == sum(map(len, pb_rows.values()))
    assert [s.label for s in pb_data] == [r["label"] for rows in pb_rows.values() for r in rows]


def test_labels_are_prmbench_first_error_steps_0_based(prmbench_jsonl, pb_rows):
    data = pf.load_prmbench(prmbench_jsonl)
    by_question_steps = {(s.question, tuple(s.steps)): s for s in data}
    for row in pb_rows["math"][:300]:
        sample = by_question_steps[(row["problem"], tuple(row["steps"]))]
        if sample.classification == "correct":
            assert row["label"] == -1
        else:
            assert row["label"] == min(e for e in sample.error_steps if e <= len(sample.steps)) - 1


def test_loader_reads_jsonl_json_array_gzip_and_folder_alike(pb_rows, tmp_path):
    rows = pb_rows["gsm8k"][:20]
    (tmp_path / "lines").mkdir()
    (tmp_path / "lines" / "gsm8k.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "array.json").write_text(json.dumps(rows, indent=1))
    with gzip.open(tmp_path / "packed.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    loaded = [load_processbench(tmp_path / "lines"), load_processbench(tmp_path / "array.json"),
              load_processbench(tmp_path / "packed.jsonl.gz"), load_processbench(tmp_path / "lines" / "gsm8k.jsonl")]
    for data in loaded:
        assert [(s.id, s.question, s.steps, s.label, s.split) for s in data] == \
            [(r["id"], r["problem"], tuple(r["steps"]), r["label"], "gsm8k") for r in rows]


def test_split_from_the_file_name_else_the_id(pb_rows, tmp_path):
    row = dict(pb_rows["math"][0])
    (tmp_path / "omnimath-00000-of-00001.jsonl").write_text(json.dumps(row) + "\n")  # the name wins
    assert load_processbench(tmp_path / "omnimath-00000-of-00001.jsonl").splits == ("omnimath",)
    (tmp_path / "all.jsonl").write_text(json.dumps(row) + "\n")
    assert load_processbench(tmp_path / "all.jsonl").splits == ("math",)


def test_parquet_as_the_hub_exports_it(pb_rows, tmp_path):
    pa = pytest.importorskip("pyarrow")
    parquet = pytest.importorskip("pyarrow.parquet")
    folder = tmp_path / "pq"
    folder.mkdir()
    for split in SPLITS:
        parquet.write_table(pa.Table.from_pylist(pb_rows[split][:10]), folder / f"{split}-00000-of-00001.parquet")
    data = load_processbench(folder)
    assert data.splits == tuple(SPLITS)
    assert [s.id for s in data] == [r["id"] for split in SPLITS for r in pb_rows[split][:10]]
    (folder / "gsm8k-00000-of-00001.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(PRMBenchDataError, match=r"gsm8k-00000-of-00001\.parquet: not a readable parquet file"):
        load_processbench(folder)


@pytest.mark.parametrize("change, where", [
    ({"label": 5}, r"line 2, field 'label': 5 is not -1 or a step index of the 3 steps"),
    ({"label": -2}, r"line 2, field 'label'"),
    ({"label": True}, r"line 2, field 'label': expected int, got bool"),
    ({"label": None}, r"line 2, field 'label': expected int, got NoneType"),
    ({"steps": "one step"}, r"line 2, field 'steps': expected list, got str"),
    ({"steps": ["a", 3, "c"]}, r"line 2, field 'steps\[1\]': expected str, got int"),
    ({"steps": []}, r"line 2, field 'steps': no steps"),
    ({"final_answer_correct": 1}, r"line 2, field 'final_answer_correct': expected bool, got int"),
    ({"id": "gsm8k-0"}, r"line 2, field 'id': duplicate id 'gsm8k-0' \(first at .*line 1\)"),
    ({"problem": None}, r"line 2, field 'problem'"),
])
def test_bad_rows_name_file_line_and_field(tmp_path, change, where):
    good = {"id": "gsm8k-0", "generator": "g", "problem": "p", "steps": ["a", "b", "c"], "final_answer_correct": True,
            "label": -1}
    path = tmp_path / "gsm8k.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "id": "gsm8k-1", **change}) + "\n")
    with pytest.raises(PRMBenchDataError, match="gsm8k.jsonl, " + where):
        load_processbench(path)


def test_bad_rows_of_an_array_file_are_named_by_row(tmp_path):
    path = tmp_path / "math.json"
    row = {"id": "math-0", "generator": "g", "problem": "p", "steps": ["a"], "final_answer_correct": True, "label": -1}
    path.write_text(json.dumps([row, {k: v for k, v in row.items() if k != "generator"}], indent=2))
    with pytest.raises(PRMBenchDataError, match=r"math.json, row 2, field 'generator': missing field"):
        load_processbench(path)


def test_missing_and_empty_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_processbench(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(PRMBenchDataError, match="no ProcessBench rows"):
        load_processbench(tmp_path / "empty.jsonl")
    (tmp_path / "folder").mkdir()
    with pytest.raises(PRMBenchDataError, match="no ProcessBench files"):
        load_processbench(tmp_path / "folder")


# -- the evaluator -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_evaluate_equals_the_official_metric_on_random_predictions(pb_rows, pb_data, seed):
    rng = random.Random(seed)
    preds = {split: random_predictions(rows, rng) for split, rows in pb_rows.items()}
    results = [{"id": r["id"], "prediction": p} for split in SPLITS for r, p in zip(pb_rows[split], preds[split])]
    rng.shuffle(results)  # the order of the predictions does not matter
    report = pf.evaluate(pb_data, results, task="processbench")
    assert isinstance(report, ProcessBenchReport)
    assert_official(report, pb_rows, preds)


def test_cli_evaluate_equals_the_official_metric(pb_rows, pb_folder, tmp_path, capsys):
    rng = random.Random(7)
    preds = {split: random_predictions(rows, rng) for split, rows in pb_rows.items()}
    # The official outputs: each split's rows with its prediction, as <split>_error.jsonl / _correct.jsonl, joined.
    lines = [{**r, "prediction": p, "match": p == r["label"]}
             for split in SPLITS for r, p in zip(pb_rows[split], preds[split])]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "out.json"
    assert main(["evaluate", "--task", "processbench", "--data", str(pb_folder), "--predictions",
                 str(tmp_path / "p.jsonl"), "--output", str(out)]) == 0
    written = json.loads(out.read_text())
    assert "average" in capsys.readouterr().out
    for split, rows in pb_rows.items():
        acc1, acc2, f1 = official_split_numbers(rows, preds[split])
        assert written["official"][split] == {"error_acc": acc1, "correct_acc": acc2, "f1": f1}


def test_cli_bad_prediction_exits_2_naming_file_and_line(pb_folder, tmp_path, capsys):
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": "gsm8k-0", "prediction": 1}\n{"id": "gsm8k-1", "prediction": "2"}\n')
    assert main(["evaluate", "--task", "processbench", "--data", str(pb_folder), "--predictions", str(path)]) == 2
    err = capsys.readouterr().err
    assert "p.jsonl, line 2" in err and "field 'prediction'" in err and "Traceback" not in err
    path.write_text('{"prediction": 1}\n')
    assert main(["evaluate", "--task", "processbench", "--data", str(pb_folder), "--predictions", str(path)]) == 2
    assert "p.jsonl, line 1, field 'idx': missing field" in capsys.readouterr().err


def random_step_predictions(data, rng, *, fraction=1.0):
    """Flat step labels for a random share of the samples, in random order, a few invalid and a few repeated."""
    positions = [p for p in range(len(data)) if rng.random() < fraction]
    rng.shuffle(positions)
    positions += positions[:5]  # repeats: the first prediction wins
    labels, cu, valid = [], [0], []
    for p in positions:
        n = rng.randrange(0, len(data[p].steps) + 2)  # fewer labels than steps, none, or extra labels
        right = data[p].label if data[p].label >= 0 and rng.random() < 0.5 else None
        labels += [rng.random() < 0.8 and k != right for k in range(n)]
        cu.append(len(labels))
        valid.append(rng.random() > 0.05)
    preds = StepPredictions(torch.tensor(positions, dtype=torch.int64), torch.tensor(cu, dtype=torch.int32),
                            torch.tensor(labels, dtype=torch.bool), valid=torch.tensor(valid))
    return preds, positions, labels, cu, valid


@pytest.mark.parametrize("seed", [0, 1])
def test_flat_step_labels_give_the_official_prm_prediction(pb_rows, pb_data, seed):
    rng = random.Random(seed)
    preds, positions, labels, cu, valid = random_step_predictions(pb_data, rng)
    first = first_error_steps(preds).tolist()
    for b in range(len(positions)):
        want = official_prm_prediction(labels[cu[b]:cu[b + 1]]) if valid[b] else None
        assert first[b] == (want if want is not None else -2)
    report = pf.evaluate(pb_data, preds, task="processbench")
    kept = {}
    for b, p in enumerate(positions):
        kept.setdefault(p, official_prm_prediction(labels[cu[b]:cu[b + 1]]) if valid[b] else None)
    flat_rows = [r for split in SPLITS for r in pb_rows[split]]
    preds_by_split = {split: [] for split in SPLITS}
    for p, row in enumerate(flat_rows):
        preds_by_split[pb_data[p].split].append(kept[p])
    assert_official(report, pb_rows, preds_by_split)
    assert report.diagnostics["predicted"] == len(pb_data)


def test_result_lines_with_scores_use_the_threshold(pb_data):
    sample = next(s for s in pb_data if s.label == 1 and len(s.steps) >= 3)
    scores = [0.9, 0.4] + [0.9] * (len(sample.steps) - 2)
    line = {"idx": sample.id, "scores": {"step_level_validity_scores": scores}}
    data = pb_data.restrict_to([sample.id])
    assert evaluate_processbench(data, [line]).predictions == {sample.id: 1}
    assert evaluate_processbench(data, [line], validity_threshold=0.3).predictions == {sample.id: -1}
    assert evaluate_processbench(data, [line], validity_threshold=0.95).predictions == {sample.id: 0}


def test_missing_predictions_never_match_and_unpredicted_splits_are_left_out(pb_data):
    gsm = [s for s in pb_data if s.split == "gsm8k"]
    results = [{"id": s.id, "prediction": s.label} for s in gsm[: len(gsm) // 2]]
    report = evaluate_processbench(pb_data, results)
    assert report.splits == ["gsm8k"]
    counts = report.counts["gsm8k"]
    assert counts["missing"] == len(gsm) - len(results)
    assert counts["error_matches"] + counts["correct_matches"] == len(results)
    assert report.official["average_f1"] == report.official["gsm8k"]["f1"]


def test_empty_groups_and_zero_accuracies_give_nan_as_numpy_does(pb_data):
    errors = [s for s in pb_data if s.split == "math" and s.label != -1][:5]
    data = pb_data.restrict_to([s.id for s in errors])
    report = evaluate_processbench(data, [{"id": s.id, "prediction": s.label} for s in errors])
    assert report.official["math"]["error_acc"] == 100.0
    assert math.isnan(report.official["math"]["correct_acc"]) and math.isnan(report.official["math"]["f1"])
    assert report.to_json()["official"]["math"]["f1"] is None
    wrong = evaluate_processbench(data, [{"id": s.id, "prediction": None} for s in errors])
    assert wrong.official["math"]["error_acc"] == 0.0


def test_first_prediction_of_a_sample_wins(pb_data):
    s = pb_data[0]
    report = evaluate_processbench(pb_data, [{"id": s.id, "prediction": s.label}, {"id": s.id, "prediction": 99}])
    assert report.predictions[s.id] == s.label and report.diagnostics["duplicate_predictions"] == 1


def test_other_tasks_data_is_refused(prmbench_jsonl, pb_data):
    prm = pf.load_prmbench(prmbench_jsonl, limit_per_class=1)
    with pytest.raises(TypeError, match="processbench task's data"):
        pf.evaluate(prm, [{"id": "x", "prediction": 1}], task="processbench")
    with pytest.raises(TypeError, match="prmbench task's data"):
        pf.evaluate(pb_data, [{"idx": "x", "scores": {}}])
    with pytest.raises(PredictionError, match="none of the predictions"):
        evaluate_processbench(pb_data, [{"id": "nope", "prediction": 1}])
