"""The critic's failures, against the scripted server on 127.0.0.1: an endpoint that refuses the key ends the run
(exit 2, one line, nothing stored), --timeout and --max-retries, Ctrl-C (exit 130 within ~2 s, what finished is kept,
the resume asks only the rest), --retry-invalid, the endpoint in the run identity, and the API key never shown or
stored."""

import base64
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

# Every test here talks to an OpenAI-compatible endpoint through the `critic` extra's client; stacks without it (the
# GPU machine's) test the missing-extra message instead (tests/test_optional_extras.py).
pytest.importorskip("openai")

from critic_server import serve  # noqa: F401 (a fixture)
from prmbench_fast.cli import main
from prmbench_fast.critic import CriticEndpointError, public_url, score_critic
from prmbench_fast.data import PRMBenchDataset, Sample
from prmbench_fast.results_store import RunMismatchError

SECRET = "sk-test-0123456789-SECRET"
STEPS = ("Let x be 2.", "Then 2x = 4.", "So x = 2.")
ANSWER = json.dumps({"validity": [1, 1, -1], "redundancy": [-1, -1, -1]})
PRMBENCH_FAST = pathlib.Path(sys.executable).parent / "prmbench-fast"
FAST = dict(retry_interval=0.01, timeout=5.0, progress=False)


def question(i: int) -> str:
    return f"Question {i}: find x."


def write_data(tmp_path, n: int) -> pathlib.Path:
    """A PRMBench data file of n circular samples whose questions the server's scripts are keyed by."""
    path = tmp_path / "data.jsonl"
    rows = [{"idx": f"p{i}", "classification": "circular", "modified_question": question(i),
             "modified_process": list(STEPS), "error_steps": [3]} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def dataset(n: int) -> PRMBenchDataset:
    return PRMBenchDataset([Sample(f"circular_p{i}", question(i), STEPS, (3,), "circular", f"p{i}") for i in range(n)])


def cli(tmp_path, server, *args, env_key=SECRET):
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    env["OPENAI_API_KEY"] = env_key
    return [str(PRMBENCH_FAST), "score", "--critic", "--api-base", server.url, "--api-model", "m", "--data",
            str(tmp_path / "data.jsonl"), "--no-progress", *args], env


def assert_secret_nowhere(folder: pathlib.Path, *texts: str) -> None:
    for text in texts:
        assert SECRET not in text
    for path in folder.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


@pytest.mark.parametrize("status", [401, 403, 404])
def test_a_refusing_endpoint_ends_the_run_with_one_line(tmp_path, serve, status):
    write_data(tmp_path, 3)
    server = serve({question(i): [("echo", status)] for i in range(3)})
    command, env = cli(tmp_path, server, "--output-dir", str(tmp_path / "out"))
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    [line] = done.stderr.strip().splitlines()
    assert line.startswith(f"prmbench-fast: error: {server.url}/ answered HTTP {status} for model 'm': ")
    assert "Bearer ***" in line and "OPENAI_API_KEY" in line  # the echoed key is masked
    assert not (tmp_path / "out" / "results.jsonl").exists() or not (tmp_path / "out" / "results.jsonl").read_text()
    assert_secret_nowhere(tmp_path / "out", done.stdout, done.stderr)


@pytest.mark.parametrize("credentials", ["key", "url"])
def test_the_key_is_never_stored_or_shown(tmp_path, serve, credentials):
    # An endpoint that echoes the Authorization header in its errors; the key given as api_key, or as the password
    # in the base URL (HTTP basic auth then sends it base64-encoded).
    server = serve({question(0): [("echo", 500), ("answer", ANSWER)], question(1): [("echo", 503)]})
    if credentials == "key":
        base, key, sent = server.url, SECRET, "Bearer ***"
    else:
        base, key, sent = server.url.replace("http://", f"http://user:{SECRET}@"), None, "Basic ***"
    report = score_critic(dataset(2), api_base=base, api_model="m", api_key=key, max_retries=2, output_dir=tmp_path,
                          **FAST)
    errors = [e for line in (tmp_path / "responses.jsonl").read_text().splitlines() for e in json.loads(line)["errors"]]
    assert len(errors) == 3 and all(sent in e for e in errors)  # the echoed errors were stored, masked
    assert json.loads((tmp_path / "run.json").read_text())["endpoint"] == server.url + "/"
    assert_secret_nowhere(tmp_path, json.dumps(report.run, default=str))
    assert base64.b64encode(f"user:{SECRET}".encode()) not in (tmp_path / "responses.jsonl").read_bytes()
    with pytest.raises(CriticEndpointError) as raised:
        score_critic(dataset(1), api_base=serve({question(0): [("echo", 401)]}).url, api_model="m",
                     api_key=SECRET, **FAST)
    assert SECRET not in str(raised.value) and "Bearer ***" in str(raised.value)
    assert public_url(f"https://user:{SECRET}@host:8000/v1/?api-key={SECRET}") == "https://host:8000/v1/"


def test_timeout_and_max_retries_on_the_command_line(tmp_path, serve):
    write_data(tmp_path, 2)
    server = serve({question(0): [("answer", ANSWER)], question(1): [("hang", 3.0)]})
    command, env = cli(tmp_path, server, "--output-dir", str(tmp_path / "out"), "--timeout", "0.3",
                       "--max-retries", "2")
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    responses = {r["idx"]: r for r in map(json.loads, (tmp_path / "out" / "responses.jsonl").read_text().splitlines())}
    assert responses["circular_p1"]["attempts"] == 2 and server.calls[question(1)] == 2
    assert all("Timeout" in e for e in responses["circular_p1"]["errors"])
    assert "1 invalid predictions" in done.stdout
    assert time.perf_counter() - start < 3.0 + 10  # two 0.3 s timeouts, not two 3 s hangs (plus start-up)


@pytest.mark.parametrize("args, match", [
    (["--timeout", "nan"], "argument --timeout: expected a finite number"),
    (["--timeout", "0"], "argument --timeout: expected a positive number"),
    (["--max-retries", "0"], "argument --max-retries: expected a positive integer"),
    (["--concurrency", "-2"], "argument --concurrency: expected a positive integer"),
])
def test_bad_request_options_are_refused(tmp_path, capsys, args, match):
    with pytest.raises(SystemExit) as exited:
        main(["score", "--critic", "--api-model", "m", *args])
    assert exited.value.code == 2 and match in capsys.readouterr().err
    with pytest.raises(ValueError, match="timeout must be a positive number"):
        score_critic(dataset(1), api_model="m", timeout=float("inf"), progress=False)


def test_ctrl_c_stops_at_once_keeps_what_finished_and_resumes(tmp_path, serve):
    write_data(tmp_path, 4)
    script = {question(i): [("answer", ANSWER)] if i < 2 else [("slow", 60.0, ANSWER)] for i in range(4)}
    server = serve(script)
    out = tmp_path / "out"
    command, env = cli(tmp_path, server, "--output-dir", str(out), "--concurrency", "4")
    # As at a terminal: a test runner started in the background (e.g. `cmd &` in a script) ignores SIGINT, children
    # inherit that, and Python then keeps ignoring Ctrl-C. The child gets the default disposition back.
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    results = out / "results.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and not (results.exists() and len(results.read_text().splitlines()) == 2):
        time.sleep(0.02)
    while time.time() < deadline and server.in_flight < 2:  # both slow requests are in flight
        time.sleep(0.02)
    interrupted = time.perf_counter()
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=30)
    assert time.perf_counter() - interrupted < 2.0
    assert proc.returncode == 130
    assert "Traceback" not in stderr
    assert f"prmbench-fast: interrupted; finished results are kept in {out}" in stderr
    assert sorted(json.loads(line)["idx"] for line in results.read_text().splitlines()) == ["circular_p0",
                                                                                             "circular_p1"]
    assert not (out / "report.json").exists()

    # The resume asks only about the two unfinished samples, and its report equals an uninterrupted run's.
    for i in (2, 3):
        script[question(i)] = [("answer", ANSWER)]
    asked = dict(server.calls)
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert {q: n - asked.get(q, 0) for q, n in server.calls.items() if n != asked.get(q, 0)} == {
        question(2): 1, question(3): 1}
    clean = score_critic(dataset(4), api_base=server.url, api_model="m", **FAST)
    assert json.loads((out / "report.json").read_text())["official"] == json.loads(json.dumps(clean.official))


def test_invalid_results_are_asked_again_only_with_retry_invalid(tmp_path, serve, capsys):
    script = {question(0): [("answer", ANSWER)], question(1): [("answer", "no JSON here")],
              question(2): [("status", 503)]}
    server = serve(script)
    options = dict(api_base=server.url, api_model="m", max_retries=2, output_dir=tmp_path, **FAST)
    first = score_critic(dataset(3), **options)
    assert first.run["invalid_predictions"] == 2

    again = score_critic(dataset(3), **options)  # the official resume: invalid results are kept as they are
    assert again.run["requests"] == 0 and again.official == first.official

    script[question(1)] = script[question(2)] = [("answer", ANSWER)]
    write_data(tmp_path, 3)
    code = main(["score", "--critic", "--api-base", server.url, "--api-model", "m", "--data",
                 str(tmp_path / "data.jsonl"), "--output-dir", str(tmp_path), "--no-progress", "--retry-invalid"])
    assert code == 0 and "0 invalid predictions" in capsys.readouterr().out
    lines = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert sorted(r["idx"] for r in lines) == ["circular_p0", "circular_p1", "circular_p2"]  # one line per sample
    assert all(r["validity"] for r in lines)

    resumed = score_critic(dataset(3), **options)  # the new results are the ones read back
    assert resumed.run["requests"] == 0 and resumed.run["invalid_predictions"] == 0


def test_the_endpoint_is_part_of_the_run_identity(tmp_path, serve):
    one = serve({question(0): [("answer", ANSWER)]})
    other = serve({question(0): [("answer", ANSWER)]})
    score_critic(dataset(1), api_base=one.url, api_model="m", output_dir=tmp_path, **FAST)
    with pytest.raises(RunMismatchError, match=rf'endpoint: "{one.url}/" -> "{other.url}/".*--overwrite'):
        score_critic(dataset(1), api_base=other.url, api_model="m", output_dir=tmp_path, **FAST)
    report = score_critic(dataset(1), api_base=other.url, api_model="m", output_dir=tmp_path, overwrite=True, **FAST)
    assert report.run["samples_resumed"] == 0 and other.calls[question(0)] == 1
    assert len((tmp_path / "responses.jsonl").read_text().splitlines()) == 1  # the old endpoint's answers are gone
