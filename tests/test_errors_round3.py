"""Bad input and faults found by trying the package as a new user would (issue #21, round 3): each defect class gets
a clear error naming what is wrong (or, where the input is meaningful, the right numbers), never a traceback, a
silently wrong number or a half-written file. The command runs in this process (``cli.main``), which is what the
``prmbench-fast`` script calls."""

import errno
import json
import os
import pathlib
import re
import socket
import warnings

import pytest
import torch

import prmbench_fast as pf
from prmbench_fast import cli
from prmbench_fast.critic import CriticEndpointError, score_critic
from prmbench_fast.data import PRMBenchDataset, Sample
from prmbench_fast.families import FamilyError, family_class
from prmbench_fast.io import FileError, FileWarning, FileWriteError, read_predictions
from prmbench_fast.predictions import StepPredictions, ThresholdWarning
from prmbench_fast.report import write_report
from prmbench_fast.results_store import ResultsStore, RunLockedError, RunMismatchError
from prmbench_fast.testing.tiny_models import tiny_llama, train_tokenizer
from prmbench_fast.token_cache import _disk_path, _read_cache_file, encode_dataset

STEPS = ["Let x be 2.", "Then 2x = 4.", "So x = 2."]
ROWS = [{"idx": f"p{i}", "classification": "circular", "modified_question": f"Question {i}: find x.",
         "modified_process": STEPS, "error_steps": [3]} for i in range(2)]
IDS = ["circular_p0", "circular_p1"]


def labels_line(sample_id, labels):
    return {"idx": sample_id, "scores": {"step_level_validity_labels": labels}}


def write_jsonl(path, records) -> pathlib.Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def data(tmp_path):
    return write_jsonl(tmp_path / "data.jsonl", ROWS)


@pytest.fixture
def predictions(tmp_path):
    return write_jsonl(tmp_path / "predictions.jsonl", [labels_line(i, [True, True, False]) for i in IDS])


def dataset():
    return PRMBenchDataset([Sample(i, r["modified_question"], tuple(STEPS), (3,), "circular", r["idx"])
                            for i, r in zip(IDS, ROWS)])


def main(capsys, *args):
    """(exit status, stdout, stderr lines) of the command."""
    status = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return status, out, err.strip().splitlines()


def assert_error(capsys, args, pattern):
    status, _, err = main(capsys, *args)
    assert status == 2 and len(err) == 1, err
    assert re.fullmatch(f"prmbench-fast: error: {pattern}", err[0]), err[0]


# ------------------------------------------------------------------ 1. one run folder, one kind of run


def test_evaluate_never_writes_into_a_score_run_folder(capsys, tmp_path, data, predictions):
    out = tmp_path / "run"
    with ResultsStore(out, {"model": "m"}) as store:  # a score run in progress
        store.append([labels_line(IDS[0], [True, False, True])])
        before = (out / "results.jsonl").read_bytes()
        evaluate = ["evaluate", "--data", data, "--predictions", predictions, "--output-dir", out]
        assert_error(capsys, evaluate, f"{re.escape(str(out))} is in use: .*")
    assert_error(capsys, evaluate, rf"{re.escape(str(out))} holds a `score` run \(see its run.json\); a `evaluate` run "
                                   "cannot write there; pass --overwrite.*")
    assert (out / "results.jsonl").read_bytes() == before


def test_an_evaluate_run_folder_is_its_own(capsys, tmp_path, data, predictions):
    out = tmp_path / "run"
    evaluate = ["evaluate", "--data", data, "--predictions", predictions, "--output-dir", out]
    for _ in range(2):  # the same evaluation again: redone, never appended
        assert main(capsys, *evaluate)[0] == 0
        assert (out / "results.jsonl").read_text() == predictions.read_text()
    with pytest.raises(RunMismatchError, match="holds a `evaluate` run"):
        ResultsStore(out, {"model": "m"})
    other = write_jsonl(tmp_path / "other.jsonl", [labels_line(i, [False, False, False]) for i in IDS])
    evaluate_other = ["evaluate", "--data", data, "--predictions", other, "--output-dir", out]
    assert_error(capsys, evaluate_other, rf"{re.escape(str(out))} holds a run with other settings: predictions: .*")
    assert main(capsys, *evaluate_other, "--overwrite")[0] == 0
    assert (out / "results.jsonl").read_text() == other.read_text()


# ------------------------------------------------------------------ 2. an unreachable critic endpoint


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends: nothing listens there


def test_an_unreachable_endpoint_stops_the_run_and_stores_nothing(tmp_path, capsys):
    pytest.importorskip("openai")  # a real client against a real socket (the `critic` extra)
    url = f"http://127.0.0.1:{closed_port()}/v1"
    refused = rf"{re.escape(url)}/ cannot be reached \(.*Connection refused\) after"
    with pytest.raises(CriticEndpointError, match=f"{refused} 2 attempt"):
        score_critic(dataset(), api_base=url, api_model="m", max_retries=2, retry_interval=0.0, output_dir=tmp_path,
                     progress=False)
    results = tmp_path / "results.jsonl"
    assert not results.exists() or results.read_text() == ""
    assert not (tmp_path / "report.json").exists()
    critic = ["score", "--critic", "--api-model", "m", "--max-retries", "1", "--no-progress", "--data"]
    rows = write_jsonl(tmp_path / "data.jsonl", ROWS)
    assert_error(capsys, [*critic, rows, "--api-base", url], f"{refused} 1 attempt.*")
    assert_error(capsys, [*critic, rows, "--api-base", "not a url"],
                 r"--api-base / api_base must be an http:// or https:// URL with a host.*")


def test_no_endpoint_and_no_key_is_refused_before_asking(monkeypatch):
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(ValueError, match="no critic endpoint: pass --api-base"):
        score_critic(dataset(), api_model="m", progress=False)


# ------------------------------------------------------------------ 3. infinite and NaN scores


def test_infinite_scores_are_compared_with_the_threshold_in_every_path(capsys, tmp_path, data):
    scores = [float("inf"), float("-inf"), 0.7]
    path = write_jsonl(tmp_path / "scores.jsonl",
                       [{"idx": i, "scores": {"step_level_validity_scores": scores}} for i in IDS])
    out = tmp_path / "run"
    assert main(capsys, "evaluate", "--data", data, "--predictions", path, "--output-dir", out)[0] == 0
    # The official adapters' rule, score > 0.5, written out: inf is True, -inf False.
    expected = pf.evaluate(dataset(), [labels_line(i, [True, False, True]) for i in IDS])
    saved = json.loads((out / "report.json").read_text())
    assert saved["table"] == expected.table
    histograms = saved["analysis"]["score_histograms"]
    assert histograms["infinite_scores"] == 4
    assert sum(histograms["correct_steps"]) + sum(histograms["error_steps"]) == 6
    # The folder's results (what a resume reads) give the same numbers.
    assert pf.evaluate(dataset(), read_predictions(out / "results.jsonl")).table == expected.table


def test_a_nan_score_to_label_names_file_line_and_sample(capsys, tmp_path, data):
    nan_scores = {"idx": IDS[1], "scores": {"step_level_validity_scores": [0.1, float("nan"), 0.2]}}
    path = write_jsonl(tmp_path / "scores.jsonl", [labels_line(IDS[0], [True, True, False]), nan_scores])
    assert_error(capsys, ["evaluate", "--data", data, "--predictions", path],
                 rf"{re.escape(str(path))}, line 2: prediction for sample 'circular_p1', field "
                 r"'step_level_validity_scores'\[1\]: not a number: nan")


# ------------------------------------------------------------------ 4 and 9. named errors, nothing half-written


def model_folder(tmp_path, files):
    folder = tmp_path / "model"
    folder.mkdir()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


def test_a_truncated_weights_file_is_named(capsys, tmp_path, data):
    from safetensors.torch import save

    weights = save({"w": torch.zeros(64)})
    folder = model_folder(tmp_path, {"config.json": b'{"model_type": "llama"}', "tokenizer.json": b"{}",
                                     "model.safetensors": weights[:-10]})
    assert_error(capsys, ["score", "--data", data, "--model", folder],
                 rf"{re.escape(str(folder))}/model\.safetensors: {len(weights) - 10:,} bytes, but its header describes "
                 rf"{len(weights):,}: a truncated or corrupt weights file; download or save the checkpoint again")


def test_a_tokenizer_json_that_is_not_json_is_named(capsys, tmp_path, data):
    folder = model_folder(tmp_path, {"config.json": b'{"model_type": "llama"}', "tokenizer.json": b"<html>"})
    assert_error(capsys, ["score", "--data", data, "--model", folder],
                 rf"{re.escape(str(folder))}/tokenizer\.json, line 1: invalid JSON .*")


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer([r["modified_question"] + " ".join(STEPS) for r in ROWS] * 4, vocab_size=120)


def test_a_tokenizer_larger_than_the_embedding_is_refused(tokenizer):
    model = tiny_llama(len(tokenizer) - 10)
    with pytest.raises(ValueError, match=rf"the tokenizer has {len(tokenizer)} tokens but the model's embedding has "
                                         rf"{len(tokenizer) - 10} rows"):
        pf.score(model, dataset(), tokenizer=tokenizer, family="generic", progress=False)


def test_a_corrupt_cache_file_is_rebuilt_with_a_warning(tmp_path, tokenizer):
    fam = family_class("generic").build(tokenizer)
    path = _disk_path(tmp_path, fam.cache_key())
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header")
    rebuilt = rf"{re.escape(str(path))}: not a readable tokenization cache .*; it is rebuilt"
    with pytest.warns(FileWarning, match=rebuilt):
        encoded = encode_dataset(fam, dataset(), [0, 1], cache_dir=tmp_path)
    assert _read_cache_file(path) == dict(zip(IDS, encoded))


def fail_fsync(monkeypatch, code=errno.ENOSPC):
    def fsync(fd):
        raise OSError(code, os.strerror(code))
    monkeypatch.setattr(os, "fsync", fsync)


def test_a_full_disk_while_writing_the_cache_names_the_file_and_leaves_nothing(tmp_path, monkeypatch, tokenizer):
    fam = family_class("generic").build(tokenizer, step_separator=" ")  # a key no other test wrote in this process
    fail_fsync(monkeypatch)
    with pytest.raises(FileWriteError, match=rf"{re.escape(str(_disk_path(tmp_path, fam.cache_key())))}: cannot be "
                                             "written: No space left on device; free some space or pass a --cache-dir"):
        encode_dataset(fam, dataset(), [0, 1], cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_cache_dir_that_is_a_file(capsys, tmp_path, data, tokenizer):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert_error(capsys, ["score", "--data", data, "--cache-dir", a_file],
                 rf"{re.escape(str(a_file))}: is a file, expected an output folder")
    with pytest.raises(FileError, match="is a file, expected an output folder"):
        encode_dataset(family_class("generic").build(tokenizer), dataset(), [0], cache_dir=a_file)


@pytest.fixture
def run_folder(capsys, tmp_path, data, predictions):
    out = tmp_path / "run"
    assert main(capsys, "evaluate", "--data", data, "--predictions", predictions, "--output-dir", out)[0] == 0
    return out


def test_a_report_json_of_another_layout_or_truncated_is_named(capsys, run_folder):
    report_file = run_folder / "report.json"
    report_file.write_text(json.dumps({"official": {}, "table": {"Overall": 1.0}}))
    assert_error(capsys, ["report", run_folder], rf"{re.escape(str(report_file))}: 'table' lacks the column\(s\) NR, "
                                                 "NCL, .*: not a report.json of score/evaluate --output-dir.*")
    report_file.write_text('{"official": {"total')
    assert_error(capsys, ["report", run_folder], rf"{re.escape(str(report_file))}, line 1: invalid JSON .*")


def test_a_failed_figure_write_names_the_file_and_leaves_no_png(monkeypatch, run_folder):
    pytest.importorskip("matplotlib")
    fail_fsync(monkeypatch, errno.EFBIG)
    with pytest.raises(FileWriteError, match=rf"{re.escape(str(run_folder))}/report\.\w+\.png: cannot be written: "
                                             "File too large"):
        write_report([run_folder])
    assert not [p for p in run_folder.iterdir() if p.suffix in (".png", ".tmp")]


# ------------------------------------------------------------------ 7. an output that is an input


def test_the_output_is_never_an_input(capsys, tmp_path, data, predictions):
    before = predictions.read_bytes(), data.read_bytes()
    evaluate = ["evaluate", "--data", data, "--predictions", predictions]
    assert_error(capsys, [*evaluate, "--output", predictions], rf"{re.escape(str(predictions))}: is the --predictions "
                                                              "file; writing it would overwrite the input.*")
    os.link(data, tmp_path / "data_link.jsonl")
    assert_error(capsys, [*evaluate, "--output", tmp_path / "data_link.jsonl"], r".*: is the --data file; .*")
    assert (predictions.read_bytes(), data.read_bytes()) == before


# ------------------------------------------------------------------ 8. results lines with bad scores


def test_results_lines_with_bad_scores_are_skipped_naming_file_and_line(tmp_path):
    store = ResultsStore(tmp_path, {"model": "m"})
    store.append([labels_line(IDS[0], ["yes", True, False]), {"idx": IDS[1], "scores": {"foo": 1}}])
    results = tmp_path / "results.jsonl"
    with pytest.warns(FileWarning) as caught:
        assert store.finished(dataset()) == {}
    messages = sorted(str(w.message) for w in caught)
    assert re.fullmatch(rf"{re.escape(str(results))}, line 1: prediction for sample 'circular_p0', field "
                        r"'step_level_validity_labels'\[0\]: a label must be true/false.*; skipped", messages[0])
    assert re.fullmatch(rf"{re.escape(str(results))}, line 2: prediction for sample 'circular_p1', field 'scores': has "
                        r"neither .*; skipped", messages[1])
    # The sample scored again after the skip: its new line is the one resumed.
    store.append([labels_line(IDS[0], [True, True, False])])
    with pytest.warns(FileWarning):
        assert store.finished(dataset()) == {IDS[0]: labels_line(IDS[0], [True, True, False])}
    store.close()


# ------------------------------------------------------------------ 10. Python API misuse


def test_api_misuse_is_a_type_error_naming_the_argument(tmp_path):
    ds = dataset()
    with pytest.raises(TypeError, match=r"dataset must be the bon task's data"):
        pf.evaluate(ds, [], task="bon")
    with pytest.raises(TypeError, match=r"dataset must be the bon task's data"):
        pf.score(torch.nn.Linear(1, 1), ds, task="bon")
    with pytest.raises(TypeError, match=r"predictions must be predictions, not a path or text \('file.jsonl'\)"):
        pf.evaluate(ds, "file.jsonl")
    with pytest.raises(TypeError, match=r"StepPredictions: sample_pos must be a torch.Tensor, got list"):
        StepPredictions(sample_pos=[0], cu_steps=torch.tensor([0, 1]), validity_labels=torch.tensor([True]))
    with pytest.raises(TypeError, match=r"max_length must be a positive int \(a number of tokens\), got 100.5"):
        pf.score(torch.nn.Linear(1, 1), ds, max_length=100.5)


# ------------------------------------------------------------------ 11. thresholds and duplicate ids


def test_a_threshold_outside_the_score_range(tokenizer):
    with pytest.raises(FamilyError, match=r"generic: validity_threshold 5 is outside the range of the values it is "
                                          r"compared with, \[0, 1\]"):
        family_class("generic").build(tokenizer, validity_threshold=5.0)
    assert family_class("generic").build(tokenizer, activation="none", threshold=5.0).validity_threshold == 5.0
    scores = {i: {"scores": {"step_level_validity_scores": [0.2, 0.9, 0.4]}} for i in IDS}
    with pytest.warns(ThresholdWarning, match=r"validity_threshold 5 is at or above the highest score it labels "
                                              r"\(scores from 0.2 to 0.9\): every such step gets the label False"):
        pf.evaluate(dataset(), scores, validity_threshold=5.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pf.evaluate(dataset(), scores, validity_threshold=0.5)


def test_duplicate_ids_are_counted_in_the_summary(capsys, tmp_path, data):
    lines = [labels_line(IDS[0], [True, True, False]), labels_line(IDS[1], [True, True, True]),
             labels_line(IDS[0], [False, False, False]), labels_line(IDS[1], [True, True, True])]
    path = write_jsonl(tmp_path / "dups.jsonl", lines)
    status, out, _ = main(capsys, "evaluate", "--data", data, "--predictions", path)
    assert status == 0
    assert ("2 prediction id(s) appear more than once, 1 of them with different predictions; the first line of each "
            "id is used, as the official evaluator does") in out
    first = pf.evaluate(dataset(), lines[:2])
    assert f"{first.table['Overall']:.1f}" in out.split("\n")[2]


# ------------------------------------------------------------------ 12. files and flags


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_the_cache_file_honours_the_umask(tmp_path, tokenizer, umask):
    fam = family_class("generic").build(tokenizer, step_separator=f"\n{umask}")
    previous = os.umask(umask)
    try:
        encode_dataset(fam, dataset(), [0], cache_dir=tmp_path)
    finally:
        os.umask(previous)
    assert _disk_path(tmp_path, fam.cache_key()).stat().st_mode & 0o777 == 0o666 & ~umask


def test_flags_of_the_other_kind_of_run_are_refused(capsys, data):
    critic = ["score", "--data", data, "--critic", "--api-model", "m", "--api-base", "http://localhost:1/v1"]
    assert_error(capsys, [*critic, "--model", "some/model"], r"--model: for PRM checkpoints, not for --critic .*")
    assert_error(capsys, [*critic, "--validity-threshold", "0.3"], r"--validity-threshold: for PRM checkpoints.*")
    assert_error(capsys, ["score", "--data", data, "--api-base", "http://localhost:1/v1"],
                 r"--api-base: for --critic runs only \(add --critic to ask an endpoint\)")
