"""Bad input to the loaders (PRMBench data and prediction files): every case raises one error type naming the file,
and the line and field where there is one; gzip is recognised by content; a missing local path never goes to the hub.
"""

import gzip
import json
import re

import pytest

from prmbench_fast import PRMBenchDataError, load_prmbench
from prmbench_fast.io import FileError, MissingFileError, PredictionFileError, read_predictions

ROW = {"idx": "prm_test_p1_0", "classification": "circular", "modified_question": "What is x?",
       "modified_process": ["x = 2.", "So x is 2."], "error_steps": [2]}
RESULT = {"idx": "circular_prm_test_p1_0", "scores": {"step_level_validity_labels": [True, False]}}


def lines(*records) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


def write(tmp_path, name, data: bytes):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _re(path) -> str:
    return re.escape(str(path))


# (case id, file name, file bytes, exception type, message pattern; {file} stands for the file's path)
DATA_CASES = [
    ("binary", "data.jsonl", bytes(range(256)) * 4,
     PRMBenchDataError, r"{file}, line 1: binary data \(a NUL byte at column 1\), not a text file"),
    ("not UTF-8", "data.jsonl", lines(ROW) + bytes(range(128, 256)) + b"\n",
     PRMBenchDataError, r"{file}, line 2: not UTF-8 text \(byte 0x80 at column 1\)"),
    ("latin-1", "data.jsonl", lines(ROW, ROW) + json.dumps({**ROW, "modified_question": "Où?"},
                                                           ensure_ascii=False).encode("latin-1") + b"\n",
     PRMBenchDataError, r"{file}, line 3: not UTF-8 text \(byte 0xf9 at column \d+\).*latin-1"),
    ("empty", "data.jsonl", b"", PRMBenchDataError, r"{file}: no PRMBench rows \(empty\)"),
    ("blank lines only", "data.jsonl", b"\n  \n\n", PRMBenchDataError, r"{file}: no PRMBench rows"),
    ("huge error step", "data.jsonl", lines(ROW, {**ROW, "idx": "p2", "error_steps": [1, 10**30]}),
     PRMBenchDataError, r"{file}, line 2, field 'error_steps\[1\]': 1\.000e\+30 is too large"),
    ("error step past int64", "data.jsonl", lines({**ROW, "error_steps": [2**63]}),
     PRMBenchDataError, r"{file}, line 1, field 'error_steps\[0\]': .* is too large"),
    ("error step as float", "data.jsonl", lines({**ROW, "error_steps": [1e300]}),
     PRMBenchDataError, r"{file}, line 1, field 'error_steps\[0\]': expected a positive"),
    ("number of 5000 digits", "data.jsonl", lines(ROW) + b'{"error_steps": [' + b"9" * 5000 + b"]}\n",
     PRMBenchDataError, r"{file}, line 2: invalid JSON \(a number with too many digits\)"),
    ("nested too deeply", "data.jsonl", b"[" * 100_000 + b"]" * 100_000 + b"\n",
     PRMBenchDataError, r"{file}, line 1: (invalid JSON \(nested too deeply\)|expected a JSON object)"),
    ("corrupt gzip", "data.jsonl", gzip.compress(lines(ROW) * 50)[:60],
     PRMBenchDataError, r"{file}, line 1: corrupt gzip data"),
    ("gzip, then not UTF-8", "data.jsonl.gz", gzip.compress(lines(ROW) + b"\xff\n"),
     PRMBenchDataError, r"{file}, line 2: not UTF-8"),
]


@pytest.mark.parametrize("name, data, error, pattern", [c[1:] for c in DATA_CASES], ids=[c[0] for c in DATA_CASES])
def test_bad_data_files(tmp_path, name, data, error, pattern):
    path = write(tmp_path, name, data)
    with pytest.raises(error, match=pattern.format(file=_re(path))) as raised:
        load_prmbench(path)
    assert isinstance(raised.value, FileError) and "\n" not in str(raised.value)


PREDICTION_CASES = [
    ("binary", b"PK\x03\x04" + bytes(range(256)), r"{file}, line 1: binary data \(a NUL byte at column 5\)"),
    ("latin-1", lines(RESULT) + '{"idx": "é"}\n'.encode("latin-1"), r"{file}, line 2: not UTF-8 text \(byte 0xe9"),
    ("not an object", lines(RESULT) + b"[1, 2]\n", r"{file}, line 2: expected a JSON object, got list"),
    ("idx not a string", lines(RESULT, {**RESULT, "idx": 3}), r"{file}, line 2, field 'idx': expected str, got int"),
    ("corrupt gzip", gzip.compress(lines(RESULT) * 100)[:-8], r"{file}, line \d+: corrupt gzip data"),
]


@pytest.mark.parametrize("data, pattern", [c[1:] for c in PREDICTION_CASES], ids=[c[0] for c in PREDICTION_CASES])
def test_bad_prediction_files(tmp_path, data, pattern):
    path = write(tmp_path, "predictions.jsonl", data)
    with pytest.raises(PredictionFileError, match=pattern.format(file=_re(path))):
        read_predictions(path)


def test_folder_where_a_file_is_expected(tmp_path):
    (tmp_path / "predictions.jsonl").mkdir()
    with pytest.raises(PredictionFileError, match=r"predictions\.jsonl: is a folder, expected a file"):
        read_predictions(tmp_path / "predictions.jsonl")
    (tmp_path / "data").mkdir()
    with pytest.raises(PRMBenchDataError, match=r"data: no \.jsonl files in this folder"):
        load_prmbench(tmp_path / "data")


def test_gzip_is_recognised_by_content_not_by_name(tmp_path):
    plain = write(tmp_path, "plain.jsonl", lines(ROW, {**ROW, "idx": "p2"}))
    expected = [s.id for s in load_prmbench(plain)]
    for name in ("data.jsonl", "data.gz", "data.txt"):
        assert [s.id for s in load_prmbench(write(tmp_path, name, gzip.compress(plain.read_bytes())))] == expected
    assert [s.id for s in load_prmbench(write(tmp_path, "plain.jsonl.gz", plain.read_bytes()))] == expected
    compressed = write(tmp_path, "predictions.jsonl", gzip.compress(lines(RESULT)))
    assert read_predictions(compressed) == [RESULT]


def test_a_byte_order_mark_is_accepted(tmp_path):
    path = write(tmp_path, "data.jsonl", b"\xef\xbb\xbf" + lines(ROW))
    assert [s.id for s in load_prmbench(path)] == ["circular_prm_test_p1_0"]


@pytest.mark.parametrize("source", [
    "absent.jsonl", "./absent", "data/prmbench.jsonl", "~/prmbench", "/no/such/folder/prmbench_preview.jsonl",
    "prmbench", "a/b/c", "owner/name.jsonl", "owner /name",
])
def test_missing_local_paths_never_go_to_the_hub(tmp_path, monkeypatch, source):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail(f"{source!r} was sent to the hub"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(MissingFileError, match=": not found$") as raised:
        load_prmbench(source)
    assert isinstance(raised.value, FileNotFoundError)


def test_owner_name_ids_go_to_the_hub_and_its_failure_is_named(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def offline(name, *args, **kwargs):
        calls.append(name)
        raise ConnectionError("Couldn't reach the hub\n(offline mode is enabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(PRMBenchDataError, match=r"^hub:nobody/PRMBench_x: cannot be loaded from the hub "
                                                r"\(Couldn't reach the hub\)$"):
        load_prmbench("nobody/PRMBench_x")
    assert calls == ["nobody/PRMBench_x"]


@pytest.mark.parametrize("options, match", [
    ({"limit_per_class": 0}, "limit_per_class must be a positive integer, got 0"),
    ({"limit_per_class": -3}, "limit_per_class must be a positive integer"),
    ({"limit_per_class": 2.5}, "limit_per_class must be a positive integer"),
    ({"classes": []}, "classes is empty"),
    ({"classes": ["multi_solutions"], "limit_per_class": 1}, r"field 'classification': no samples of the classes"),
])
def test_meaningless_subsets_are_errors(tmp_path, options, match):
    path = write(tmp_path, "data.jsonl", lines(ROW))
    with pytest.raises(ValueError, match=match):
        load_prmbench(path, **options)
