"""The run folder's identity: the weights fingerprint, the results store (identity check, overwrite, lock, torn and
garbage lines, unknown ids, file permissions), and a run killed with SIGKILL then resumed with changed weights."""

import copy
import json
import os
import signal
import stat
import subprocess
import sys
import time
import warnings

import pytest
import torch

from conftest import PRMBENCH_JSONL, REPO_ROOT
from prmbench_fast import load_prmbench, score
from prmbench_fast.data import PRMBenchDataset, Sample
from prmbench_fast.fingerprint import SAMPLE_WORDS, weights_fingerprint
from prmbench_fast.io import FileWarning, write_text_atomic
from prmbench_fast.results_store import ResultsStore, RunLockedError, RunMismatchError
from prmbench_fast.testing.tiny_models import tiny_llama, train_tokenizer
from subprocess_testing import cpu_child_env

# ------------------------------------------------------------------------------------------------ fingerprint


@pytest.fixture(scope="module")
def model():
    return tiny_llama(300, head="token_classification", seed=0)


def test_same_weights_same_fingerprint(model, tmp_path):
    fingerprint = weights_fingerprint(model)
    assert len(fingerprint) == 16 and int(fingerprint, 16) >= 0
    assert weights_fingerprint(model) == fingerprint
    assert weights_fingerprint(copy.deepcopy(model)) == fingerprint
    assert weights_fingerprint(tiny_llama(300, head="token_classification", seed=0)) == fingerprint
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path)
    assert weights_fingerprint(reloaded) == fingerprint


def test_fingerprint_does_not_depend_on_the_thread_count(model):
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = weights_fingerprint(model)
        torch.set_num_threads(max(2, threads))
        assert weights_fingerprint(model) == one
    finally:
        torch.set_num_threads(threads)


def _changed(model, edit):
    changed = copy.deepcopy(model)
    with torch.no_grad():
        edit(changed)
    return weights_fingerprint(changed)


def test_one_changed_element_changes_the_fingerprint(model):
    fingerprint = weights_fingerprint(model)
    embedding = model.model.embed_tokens.weight  # 300 x 64 = 19,200 words: the sample reads every 18th
    stride = embedding.numel() // SAMPLE_WORDS
    assert stride > 1
    sampled, skipped = (0, 0), (0, 1)  # flat positions 0 (sampled) and 1 (between two sampled positions)

    def nudge(position):
        def edit(m):
            weight = m.model.embed_tokens.weight
            weight[position] = torch.nextafter(weight[position], torch.tensor(float("inf")))  # one ulp
        return edit

    def swap_two_sampled(m):
        # Keeps the full-tensor sum; the position-weighted sample tells the two apart.
        flat = m.model.embed_tokens.weight.view(-1)
        flat[[0, stride]] = flat[[stride, 0]]

    assert _changed(model, nudge(sampled)) != fingerprint
    assert _changed(model, nudge(skipped)) != fingerprint
    assert _changed(model, lambda m: m.score.weight.neg_()) != fingerprint
    assert _changed(model, swap_two_sampled) != fingerprint
    assert weights_fingerprint(copy.deepcopy(model).to(torch.bfloat16)) != fingerprint
    assert weights_fingerprint(model) == fingerprint


def test_buffers_count():
    norm = torch.nn.BatchNorm1d(4)
    fingerprint = weights_fingerprint(norm)
    norm.running_mean[2] = 0.5
    assert weights_fingerprint(norm) != fingerprint


def test_one_optimizer_step_changes_the_fingerprint(model):
    trained = copy.deepcopy(model).train()
    before = weights_fingerprint(trained)
    optimizer = torch.optim.SGD(trained.parameters(), lr=1e-3)
    out = trained(input_ids=torch.tensor([[1, 2, 3, 4]]), labels=torch.tensor([[0, 1, 0, 1]]))
    out.loss.backward()
    optimizer.step()
    assert weights_fingerprint(trained) != before


def test_every_dtype_and_non_contiguous_tensors():
    module = torch.nn.Module()
    for dtype in (torch.bool, torch.uint8, torch.int64, torch.float16, torch.bfloat16, torch.float64,
                  torch.complex64, torch.float8_e4m3fn):
        module.register_buffer(f"b_{str(dtype)[6:]}", torch.ones(5, 3).to(dtype))
    module.register_buffer("empty", torch.ones(0))
    fingerprint = weights_fingerprint(module)
    # The same values held transposed (a non-contiguous view) read in the same logical order.
    plain = torch.nn.Module()
    plain.register_buffer("x", torch.arange(12.0).reshape(3, 4))
    strided = torch.nn.Module()
    strided.register_buffer("x", torch.arange(12.0).reshape(3, 4).t().contiguous().t())
    assert not strided.x.is_contiguous()
    transposed = torch.nn.Module()
    transposed.register_buffer("x", torch.arange(12.0).reshape(4, 3).t())  # other values order: differs
    assert weights_fingerprint(strided) == weights_fingerprint(plain)
    assert weights_fingerprint(transposed) != weights_fingerprint(plain)
    assert weights_fingerprint(module) == fingerprint


def test_meta_tensors_are_refused():
    with torch.device("meta"):
        layer = torch.nn.Linear(3, 3)
    with pytest.raises(ValueError, match="'bias'.* meta device"):
        weights_fingerprint(layer)


def test_dtensor_parameters_are_read_as_their_local_shard(tmp_path):
    # One process, a one-rank mesh: the shard is the whole tensor, and the fingerprint records placement and
    # coordinate (so a sharded model is never mistaken for a whole one with the same values).
    from torch.distributed.tensor import Shard, distribute_tensor

    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (1,))
        whole = torch.nn.Linear(6, 4)
        sharded = copy.deepcopy(whole)
        sharded.weight = torch.nn.Parameter(distribute_tensor(sharded.weight.detach(), mesh, [Shard(0)]))
        fingerprint = weights_fingerprint(sharded)
        assert fingerprint == weights_fingerprint(sharded)
        assert fingerprint != weights_fingerprint(whole)
        with torch.no_grad():
            sharded.weight.to_local()[3, 5] += 1.0
        assert weights_fingerprint(sharded) != fingerprint
    finally:
        torch.distributed.destroy_process_group()


# ------------------------------------------------------------------------------------------------ the store

IDENTITY = {"model": "m", "weights": "0123456789abcdef", "family": "generic", "max_length": 2048,
            "dtype": torch.float32}
DATASET = PRMBenchDataset([Sample(f"circular_p{i}", "q", ("a", "b"), (2,), "circular", f"p{i}") for i in range(4)])


def result(sample_id):
    return {"idx": sample_id, "scores": {"step_level_validity_scores": [0.9, 0.1],
                                         "step_level_validity_labels": [True, False]}}


def test_identity_is_recorded_and_a_resume_with_the_same_one_works(tmp_path):
    with ResultsStore(tmp_path, IDENTITY) as store:
        store.append([result("circular_p0"), result("circular_p1")])
    assert json.loads((tmp_path / "run.json").read_text()) == {"kind": "score", **IDENTITY, "dtype": "torch.float32"}
    with ResultsStore(tmp_path, dict(IDENTITY)) as store:
        assert list(store.finished(DATASET)) == ["circular_p0", "circular_p1"]


def test_another_identity_is_refused_naming_what_differs(tmp_path):
    ResultsStore(tmp_path, IDENTITY).close()
    changed = {**IDENTITY, "weights": "fedcba9876543210", "max_length": 1024, "task": "x" * 100}
    del changed["family"]
    with pytest.raises(RunMismatchError) as raised:
        ResultsStore(tmp_path, changed)
    message = str(raised.value)
    assert "\n" not in message and str(tmp_path) in message
    assert '"0123456789abcdef" -> "fedcba9876543210"' in message
    assert "max_length: 2048 -> 1024" in message and 'family: "generic" -> (absent)' in message
    assert 'task: (absent) -> "xxxxxxx' in message and "x" * 60 not in message  # long values shortened
    assert "--overwrite" in message and "overwrite=True" in message
    assert "model:" not in message  # unchanged keys are not listed


def test_overwrite_starts_over_and_keeps_the_cache(tmp_path):
    with ResultsStore(tmp_path, IDENTITY) as store:
        store.append([result("circular_p0")])
    for name in ("report.json", "table.txt", "results.rank1.jsonl", "cache/encoded-x.safetensors"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("{}\n")
    changed = {**IDENTITY, "weights": "fedcba9876543210"}
    with ResultsStore(tmp_path, changed, overwrite=True) as store:
        assert store.finished(DATASET) == {}
    assert json.loads((tmp_path / "run.json").read_text())["weights"] == "fedcba9876543210"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "results.lock", "run.json"]
    assert (tmp_path / "cache" / "encoded-x.safetensors").exists()


@pytest.mark.parametrize("setup, match", [
    (lambda d: (d / "results.jsonl").write_text(json.dumps(result("circular_p0")) + "\n"), "no run.json"),
    (lambda d: (d / "run.json").write_text('{"model": "m",\n "weights": }\n'), r"run\.json, line 2: invalid JSON"),
    (lambda d: (d / "run.json").write_bytes(b'{"model": "\xe9"}\n'), r"run\.json, line 1: not UTF-8"),
    (lambda d: (d / "run.json").write_text("[1, 2]\n"), r"run\.json is not a JSON object"),
])
def test_a_folder_whose_identity_cannot_be_read_is_refused(tmp_path, setup, match):
    setup(tmp_path)
    with pytest.raises(RunMismatchError, match=match):
        ResultsStore(tmp_path, IDENTITY)
    ResultsStore(tmp_path, IDENTITY, overwrite=True).close()  # the way out the message names


def test_a_second_store_on_the_same_folder_and_rank_is_locked_out(tmp_path):
    with ResultsStore(tmp_path, IDENTITY):
        with pytest.raises(RunLockedError, match=rf"{tmp_path} is in use: process {os.getpid()} .*results\.lock"):
            ResultsStore(tmp_path, IDENTITY)
        ResultsStore(tmp_path, IDENTITY, rank=1).close()  # another rank writes another file
    ResultsStore(tmp_path, IDENTITY).close()  # released on close


def test_another_process_is_locked_out(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from prmbench_fast.results_store import ResultsStore; "
         f"s = ResultsStore({str(tmp_path)!r}, {{'model': 'm'}}); print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunLockedError, match=f"process {holder.pid} is writing results there"):
            ResultsStore(tmp_path, {"model": "m"})
    finally:
        holder.kill()
        holder.wait()
    ResultsStore(tmp_path, {"model": "m"}).close()  # a killed holder's lock is gone with it


GOOD = json.dumps(result("circular_p0")).encode() + b"\n"
LAST = json.dumps(result("circular_p3")).encode() + b"\n"


@pytest.mark.parametrize("bad, match", [
    (b"{not json\n", r"results\.jsonl, line 2: invalid JSON"),
    (b"[1, 2]\n", r"results\.jsonl, line 2: expected a JSON object, got list"),
    (b'{"scores": {}}\n', r"results\.jsonl, line 2, field 'idx': missing field"),
    (b'{"idx": 7, "scores": {}}\n', r"results\.jsonl, line 2, field 'idx': expected str, got int"),
    (b'{"idx": "circular_p1"}\n', r"results\.jsonl, line 2, field 'scores'"),
    (b'{"idx": "circular_p1", "scores": {"x": "\xff\xfe"}}\n', r"results\.jsonl, line 2: not UTF-8"),
    (b"\x00\x01\x02binary\n", r"results\.jsonl, line 2: invalid JSON"),
    (b"9" * 5000 + b"\n", r"results\.jsonl, line 2: invalid JSON \(a number with too many digits\)"),
])
def test_garbage_lines_are_named_and_skipped(tmp_path, bad, match):
    ResultsStore(tmp_path, IDENTITY).close()
    (tmp_path / "results.jsonl").write_bytes(GOOD + bad + bad + LAST)
    with ResultsStore(tmp_path, IDENTITY) as store:
        with pytest.warns(FileWarning, match=match + r".*; skipped \(and 1 more such line"):
            finished = store.finished(DATASET)
    assert list(finished) == ["circular_p0", "circular_p3"]


def test_torn_last_lines_are_cut_or_skipped_with_a_warning(tmp_path):
    ResultsStore(tmp_path, IDENTITY).close()
    (tmp_path / "results.jsonl").write_bytes(GOOD + LAST[:20])
    (tmp_path / "results.rank1.jsonl").write_bytes(LAST + GOOD[:9])  # another rank's, interrupted
    with pytest.warns(FileWarning, match=r"results\.jsonl, line 2: an unfinished last line .* was removed"):
        store = ResultsStore(tmp_path, IDENTITY)
    assert (tmp_path / "results.jsonl").read_bytes() == GOOD
    with pytest.warns(FileWarning, match=r"results\.rank1\.jsonl, line 2: an unfinished last line"):
        assert sorted(store.finished(DATASET)) == ["circular_p0", "circular_p3"]
    store.append([result("circular_p2")])
    store.close()
    assert (tmp_path / "results.jsonl").read_bytes() == GOOD + json.dumps(result("circular_p2")).encode() + b"\n"


def test_results_of_ids_not_in_the_data_are_reported_not_resumed(tmp_path):
    with ResultsStore(tmp_path, IDENTITY) as store:
        store.append([result("circular_p0"), result("deception_q9"), result("circular_p1"), result("deception_q8")])
        with pytest.warns(FileWarning, match=r"2 stored result\(s\) have ids not in the data \(e.g. 'deception_q9'\)"):
            finished = store.finished(DATASET)
        assert list(finished) == ["circular_p0", "circular_p1"]
        assert store.unknown_ids == ["deception_q9", "deception_q8"]
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no data given: everything, no warning
            assert len(store.finished()) == 4


def test_forget_removes_lines_so_the_new_result_is_the_one_resumed(tmp_path):
    with ResultsStore(tmp_path, IDENTITY) as store:
        store.append([result("circular_p0"), {"idx": "circular_p1", "validity": False}, result("circular_p2")])
        store.forget(["circular_p1"])
        store.append([result("circular_p1")])
        assert store.finished(DATASET)["circular_p1"] == result("circular_p1")
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 3


def test_written_files_have_the_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        with ResultsStore(tmp_path / "run", IDENTITY) as store:
            store.append([result("circular_p0")])
        write_text_atomic(tmp_path / "run" / "table.txt", "x\n")
        os.umask(0o077)
        write_text_atomic(tmp_path / "private.txt", "x\n")
    finally:
        os.umask(old)
    for name in ("run.json", "results.jsonl", "table.txt"):
        assert stat.S_IMODE((tmp_path / "run" / name).stat().st_mode) == 0o644, name
    assert stat.S_IMODE((tmp_path / "private.txt").stat().st_mode) == 0o600
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.endswith(".tmp")]


# ------------------------------------------------------------------------------------------------ a killed run

CHILD = r"""
import sys
sys.path.insert(0, {tests!r})
from prmbench_fast import load_prmbench, score
from prmbench_fast.testing.tiny_models import tiny_llama, train_tokenizer

data = load_prmbench({data!r}, limit_per_class=2)
tokenizer = train_tokenizer([s.question for s in data] + [t for s in data for t in s.steps])
model = tiny_llama(len(tokenizer), head="token_classification", hidden=128, layers=3, seed=int(sys.argv[1]))
overwrite = len(sys.argv) > 2
report = score(model, data, tokenizer=tokenizer, family="generic", max_length=512, batch_tokens=300,
               output_dir={output_dir!r}, overwrite=overwrite, progress=False)
print("SCORED", report.run["samples_scored"], "RESUMED", report.run["samples_resumed"])
"""


def test_killed_run_is_not_resumed_with_other_weights(tmp_path):
    out = tmp_path / "run"
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(tests=str(REPO_ROOT / "tests"), data=str(PRMBENCH_JSONL), output_dir=str(out)))
    env = cpu_child_env()

    proc = subprocess.Popen([sys.executable, str(script), "0"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    results = out / "results.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if results.exists() and len(results.read_bytes().splitlines()) >= 2:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed mid-way"

    # The same folder with other weights (seed 1): refused, naming the weights, nothing added to the results.
    written = results.read_bytes()
    other = subprocess.run([sys.executable, str(script), "1"], env=env, capture_output=True, text=True, timeout=600)
    assert other.returncode != 0
    assert "RunMismatchError" in other.stderr and "weights:" in other.stderr and "--overwrite" in other.stderr
    assert results.read_bytes() == written

    # With overwrite, the new weights' run starts over: its report equals a fresh in-process run of those weights.
    again = subprocess.run([sys.executable, str(script), "1", "overwrite"], env=env, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stderr
    data = load_prmbench(PRMBENCH_JSONL, limit_per_class=2)
    assert f"SCORED {len(data)} RESUMED 0" in again.stdout
    tokenizer = train_tokenizer([s.question for s in data] + [t for s in data for t in s.steps])
    fresh = score(tiny_llama(len(tokenizer), head="token_classification", hidden=128, layers=3, seed=1), data,
                  tokenizer=tokenizer, family="generic", max_length=512, batch_tokens=300, progress=False)
    assert json.loads((out / "report.json").read_text())["official"] == json.loads(json.dumps(fresh.official))


def test_a_live_model_trained_further_is_not_resumed(tmp_path):
    data = load_prmbench(PRMBENCH_JSONL, classes=["circular"], limit_per_class=1)
    tokenizer = train_tokenizer([s.question for s in data] + [t for s in data for t in s.steps])
    live = tiny_llama(len(tokenizer), head="token_classification")
    options = dict(tokenizer=tokenizer, family="generic", max_length=256, output_dir=tmp_path, progress=False)
    score(live, data, **options)
    assert score(live, data, **options).run["samples_resumed"] == len(data)  # unchanged weights: resumed
    with torch.no_grad():
        live.score.weight.add_(0.01)  # one "training step"
    with pytest.raises(RunMismatchError, match="weights: "):
        score(live, data, **options)
