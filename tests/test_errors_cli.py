"""Bad input to the ``prmbench-fast`` command, run as a subprocess as a user would: every case exits with status 2,
prints no traceback, and says in one line what is wrong, naming the file (and the line and field where there is one).
Cases needing an unreadable file or an unwritable folder run as the user 'nobody' when the tests run as root (root
reads and writes everything)."""

import functools
import gzip
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

import pytest
import torch

from critic_server import serve  # noqa: F401 (a fixture)
from prmbench_fast.critic import score_critic
from prmbench_fast.data import PRMBenchDataset, Sample
from prmbench_fast.results_store import ResultsStore

PRMBENCH_FAST = pathlib.Path(sys.executable).parent / "prmbench-fast"
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
ROWS = [{"idx": f"p{i}", "classification": "circular", "modified_question": f"Question {i}: find x.",
         "modified_process": ["Let x be 2.", "Then 2x = 4.", "So x = 2."], "error_steps": [3]} for i in range(2)]
RESULTS = [{"idx": f"circular_p{i}", "scores": {"step_level_validity_labels": [True, True, False]}} for i in range(2)]


def jsonl(records) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


@pytest.fixture(scope="module")
def files():
    """A folder every user may read (pytest's tmp_path is root's alone), holding good and bad inputs."""
    folder = pathlib.Path(tempfile.mkdtemp(prefix="prmbench-cli-"))
    folder.chmod(0o755)
    made = {
        "data.jsonl": jsonl(ROWS),
        "binary.jsonl": b"PK\x03\x04\x00\x00" + bytes(range(256)),
        "latin1.jsonl": jsonl(ROWS[:1]) + json.dumps({**ROWS[1], "modified_question": "Où?"},
                                                     ensure_ascii=False).encode("latin-1") + b"\n",
        "empty.jsonl": b"",
        "huge_step.jsonl": jsonl([ROWS[0], {**ROWS[1], "error_steps": [10**30]}]),
        "broken.jsonl": jsonl(ROWS[:1]) + b'{"idx": "p1", \n',
        "unreadable.jsonl": jsonl(ROWS),
        "predictions.jsonl": jsonl(RESULTS),
        "predictions_gzip.jsonl": gzip.compress(jsonl([RESULTS[0], {**RESULTS[1], "idx": "circular_q9"}])),
        "predictions_latin1.jsonl": jsonl(RESULTS[:1]) + '{"idx": "é"}\n'.encode("latin-1"),
        "predictions_empty.jsonl": b"",
        "predictions_unknown.jsonl": jsonl([{**r, "idx": f"deception_q{i}"} for i, r in enumerate(RESULTS)]),
        "model_no_config/tokenizer.json": b"{}",
        "model_no_tokenizer/config.json": b'{"model_type": "llama"}',
        "model_bad_config/config.json": b'{"model_type":\n "llama",,}\n',
        "model_bad_config/tokenizer.json": b"{}",
        "a_file": b"not a folder",
    }
    for name, data in made.items():
        (folder / name).parent.mkdir(exist_ok=True)
        (folder / name).write_bytes(data)
    (folder / "no_jsonl").mkdir()
    (folder / "a_folder").mkdir()
    (folder / "unreadable.jsonl").chmod(0o000)
    home = folder / "home"  # a HOME 'nobody' can write caches in
    home.mkdir()
    home.chmod(0o777)
    yield folder
    shutil.rmtree(folder)


def run(args, *, as_nobody=False, home=None):
    command = [str(PRMBENCH_FAST), *args]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    if as_nobody and os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: cannot make a file unreadable")
        command = NOBODY + command
        env["HOME"] = str(home)
        why_not = nobody_cannot_run_the_command(str(home))
        if why_not:
            pytest.skip(why_not)
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


@functools.cache
def nobody_cannot_run_the_command(home: str) -> str | None:
    """Why the user 'nobody' cannot run the command from this checkout (None if it can): a folder on the way to the
    interpreter, the virtual environment or the repository that 'nobody' may not traverse (a clone under a
    `mktemp -d` folder or a 0700 home directory)."""
    env = dict(os.environ, HOME=home, HF_HUB_OFFLINE="1")
    done = subprocess.run([*NOBODY, str(PRMBENCH_FAST), "--help"], env=env, capture_output=True, text=True,
                          timeout=120)
    if done.returncode == 0:
        return None
    last = (done.stderr.strip().splitlines() or ["no message"])[-1]
    return f"the user 'nobody' cannot run {PRMBENCH_FAST} from this checkout's location ({last})"


# (case id, arguments with {d} for the folder, expected one-line message as a regex with {d} for the folder)
EVALUATE = ["evaluate", "--data", "{d}/data.jsonl", "--predictions", "{d}/predictions.jsonl"]
SCORE = ["score", "--data", "{d}/data.jsonl"]
CASES = [
    ("data not found", ["evaluate", "--data", "{d}/absent.jsonl", "--predictions", "{d}/predictions.jsonl"],
     r"{d}/absent\.jsonl: not found"),
    ("data: a missing name is not a hub id", ["evaluate", "--data", "prmbench_missing", "--predictions", "x"],
     r"prmbench_missing: not found"),
    ("data: a folder without data", ["evaluate", "--data", "{d}/no_jsonl", "--predictions", "{d}/predictions.jsonl"],
     r"{d}/no_jsonl: no \.jsonl files in this folder"),
    ("data: binary", ["evaluate", "--data", "{d}/binary.jsonl", "--predictions", "{d}/predictions.jsonl"],
     r"{d}/binary\.jsonl, line 1: binary data \(a NUL byte at column 5\), not a text file"),
    ("data: latin-1", ["evaluate", "--data", "{d}/latin1.jsonl", "--predictions", "{d}/predictions.jsonl"],
     r"{d}/latin1\.jsonl, line 2: not UTF-8 text \(byte 0xf9 at column \d+\)"),
    ("data: empty", ["evaluate", "--data", "{d}/empty.jsonl", "--predictions", "{d}/predictions.jsonl"],
     r"{d}/empty\.jsonl: no PRMBench rows \(empty\)"),
    ("data: error step 10**30", ["evaluate", "--data", "{d}/huge_step.jsonl", "--predictions", "{d}/predictions.jsonl"],
     r"{d}/huge_step\.jsonl, line 2, field 'error_steps\[0\]': 1\.000e\+30 is too large"),
    ("data: invalid JSON", ["evaluate", "--data", "{d}/broken.jsonl", "--predictions", "{d}/predictions.jsonl"],
     r"{d}/broken\.jsonl, line 2: invalid JSON"),
    ("predictions not found", ["evaluate", "--data", "{d}/data.jsonl", "--predictions", "{d}/absent.jsonl"],
     r"{d}/absent\.jsonl: not found"),
    ("predictions: a folder", ["evaluate", "--data", "{d}/data.jsonl", "--predictions", "{d}/a_folder"],
     r"{d}/a_folder: is a folder, expected a file"),
    ("predictions: latin-1", ["evaluate", "--data", "{d}/data.jsonl", "--predictions", "{d}/predictions_latin1.jsonl"],
     r"{d}/predictions_latin1\.jsonl, line 2: not UTF-8 text \(byte 0xe9"),
    ("predictions: empty", ["evaluate", "--data", "{d}/data.jsonl", "--predictions", "{d}/predictions_empty.jsonl"],
     r"{d}/predictions_empty\.jsonl: no predictions \(the file is empty\)"),
    ("predictions: no id matches",
     ["evaluate", "--data", "{d}/data.jsonl", "--predictions", "{d}/predictions_unknown.jsonl"],
     r"{d}/predictions_unknown\.jsonl, field 'idx': none of its 2 prediction ids is in the data \(e\.g\. "
     r"'deception_q0'\)"),
    ("output: a folder", [*EVALUATE, "--output", "{d}/a_folder"], r"{d}/a_folder: is a folder, expected a file name"),
    ("output: under a file", [*EVALUATE, "--output", "{d}/a_file/report.json"],
     r"{d}/a_file/report\.json: cannot be created: {d}/a_file is a file, not a folder"),
    ("score: model not found", [*SCORE, "--model", "{d}/absent_model"], r"{d}/absent_model: model folder not found"),
    ("score: model is a file", [*SCORE, "--model", "{d}/a_file"],
     r"{d}/a_file: is a file, expected a checkpoint folder"),
    ("score: model without config.json", [*SCORE, "--model", "{d}/model_no_config"],
     r"{d}/model_no_config: no config\.json"),
    ("score: model without tokenizer", [*SCORE, "--model", "{d}/model_no_tokenizer"],
     r"{d}/model_no_tokenizer: no tokenizer files \(one of tokenizer\.json, "),
    ("score: broken config.json", [*SCORE, "--model", "{d}/model_bad_config"],
     r"{d}/model_bad_config/config\.json, line 2: invalid JSON"),
    ("score: output dir is a file", [*SCORE, "--output-dir", "{d}/a_file"],
     r"{d}/a_file: is a file, expected an output folder"),
    ("score: critic without model", [*SCORE, "--critic"], r"--critic needs --api-model"),
]


@pytest.mark.parametrize("args, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_user_errors_are_one_line_and_exit_2(files, args, message):
    done = run([a.format(d=files) for a in args])
    assert_one_line_error(done, message.format(d=re.escape(str(files))))


def assert_one_line_error(done, message):
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert re.fullmatch(f"prmbench-fast: error: {message}.*", lines[0]), lines[0]


@pytest.mark.parametrize("args, message", [
    ([*EVALUATE[:1], "--data", "{d}/unreadable.jsonl", "--predictions", "{d}/predictions.jsonl"],
     r"{d}/unreadable\.jsonl: permission denied \(the file is not readable\)"),
    ([*EVALUATE, "--output", "{d}/report.json"], r"{d}/report\.json: permission denied \(cannot write in {d}\)"),
    ([*SCORE, "--output-dir", "{d}/run"], r"{d}/run: permission denied \(cannot write in {d}\)"),
])
def test_permission_denied(files, args, message):
    done = run([a.format(d=files) for a in args], as_nobody=True, home=files / "home")
    assert_one_line_error(done, message.format(d=re.escape(str(files))))


@pytest.mark.parametrize("args, message", [
    (["--validity-threshold", "nan"], "argument --validity-threshold: expected a finite number, got 'nan'"),
    (["--redundancy-threshold", "inf"], "argument --redundancy-threshold: expected a finite number, got 'inf'"),
    (["--validity-threshold=-Infinity"], "argument --validity-threshold: expected a finite number, got '-Infinity'"),
    (["--validity-threshold", "high"], "argument --validity-threshold: expected a number, got 'high'"),
])
def test_non_finite_thresholds(files, args, message):
    done = run([a.format(d=files) for a in EVALUATE] + args)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"prmbench-fast evaluate: error: {message}" in done.stderr


@pytest.mark.parametrize("args, message", [
    (["--limit-per-class", "0"], "argument --limit-per-class: expected a positive integer, got '0'"),
    (["--max-length", "-5"], "argument --max-length: expected a positive integer"),
    (["--batch-tokens", "1e9"], "argument --batch-tokens: expected a positive integer, got '1e9'"),
])
def test_meaningless_numbers(files, args, message):
    done = run([a.format(d=files) for a in SCORE] + args)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"prmbench-fast score: error: {message}" in done.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_cuda(files):
    done = run([a.format(d=files) for a in SCORE] + ["--device", "cuda"])
    # A CPU build of torch says so; a CUDA build on a machine without a GPU (the other stacks here) says that.
    assert_one_line_error(done, r"device 'cuda': CUDA is not available, (torch \S+ is a CPU-only build|no GPU is visible)")


def test_gzip_predictions_by_content_and_the_unknown_id_count(files):
    done = run(["evaluate", "--data", f"{files}/data.jsonl", "--predictions", f"{files}/predictions_gzip.jsonl"])
    assert done.returncode == 0, done.stderr
    assert "1 prediction id(s) are not in the data and were ignored (e.g. 'circular_q9')" in done.stdout


def dataset():
    rows = [Sample(f"circular_p{i}", r["modified_question"], tuple(r["modified_process"]), (3,), "circular", f"p{i}")
            for i, r in enumerate(ROWS)]
    return PRMBenchDataset(rows)


def critic_args(files, server, out):
    return ["score", "--critic", "--api-base", server.url, "--api-model", "m", "--data", f"{files}/data.jsonl",
            "--output-dir", str(out), "--no-progress"]


@pytest.fixture
def server(serve):
    answer = json.dumps({"validity": [1, 1, -1], "redundancy": [-1, -1, -1]})
    return serve({r["modified_question"]: [("answer", answer)] for r in ROWS})


def test_a_folder_of_another_run_or_in_use(tmp_path, files, server):
    pytest.importorskip("openai")  # the critic runs below (the `critic` extra)
    out = tmp_path / "run"
    ResultsStore(out, {"family": "critic", "model": "another"}, kind="critic").close()
    done = run(critic_args(files, server, out))
    assert_one_line_error(done, rf"{re.escape(str(out))} holds a run with other settings: .*model: \"another\" -> "
                                r"\"m\".*; pass --overwrite")
    assert server.calls == {}
    with ResultsStore(out, {"family": "critic", "model": "another"}, kind="critic"):
        done = run(critic_args(files, server, out) + ["--overwrite"])
    assert_one_line_error(done, rf"{re.escape(str(out))} is in use: process {os.getpid()} is writing results there")
    assert server.calls == {}


def test_skipped_results_lines_are_warned_about_in_one_line(tmp_path, files, server):
    pytest.importorskip("openai")  # a real client against a real socket (the `critic` extra)
    out = tmp_path / "run"
    score_critic(dataset(), api_base=server.url, api_model="m", output_dir=out, progress=False)
    lines = (out / "results.jsonl").read_text().splitlines(keepends=True)
    (out / "results.jsonl").write_text(lines[0] + "{torn\n" + json.dumps({"idx": "deception_q7", "scores": {}}) + "\n")
    done = run(critic_args(files, server, out))
    assert done.returncode == 0 and "Traceback" not in done.stderr
    warnings = [line for line in done.stderr.splitlines() if line.startswith("prmbench-fast: warning: ")]
    assert len(warnings) == 2, done.stderr
    assert re.search(rf"{re.escape(str(out))}/results\.jsonl, line 2: invalid JSON .*; skipped$", warnings[0])
    assert "1 stored result(s) have ids not in the data (e.g. 'deception_q7'); they are not resumed" in warnings[1]
