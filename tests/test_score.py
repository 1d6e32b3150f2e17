"""score(): the end-to-end pipeline on tiny offline models — equal to a plain unpacked computation, safe on live
models, cached, resumable after a crash, and identical under torch.distributed."""

import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import PRMBENCH_JSONL, REPO_ROOT
from prmbench_fast import evaluate, load_prmbench
from prmbench_fast.families import FamilyError
from prmbench_fast import score
from prmbench_fast.testing.tiny_models import tiny_llama, train_tokenizer
from subprocess_testing import cpu_child_env, run_two_ranks

MAX_LENGTH = 384  # small enough that some PRMBench samples get truncated with the tiny tokenizer


@pytest.fixture(scope="module")
def subset():
    return load_prmbench(PRMBENCH_JSONL, limit_per_class=2)


@pytest.fixture(scope="module")
def tokenizer(subset):
    texts = [s.question for s in subset] + [step for s in subset for step in s.steps]
    return train_tokenizer(texts)


@pytest.fixture(scope="module")
def classifier(tokenizer):
    return tiny_llama(len(tokenizer), head="token_classification")


def plain_generic_scores(model, tokenizer, sample, max_length):
    """The official way: one sample, unpacked, the full forward with its head on every token, then gather."""
    ids = [tokenizer.bos_token_id] + tokenizer(sample.question, add_special_tokens=False)["input_ids"]
    positions = []
    for step in sample.steps:
        ids += tokenizer(step, add_special_tokens=False)["input_ids"] + tokenizer("\n", add_special_tokens=False)["input_ids"]
        positions.append(len(ids) - 1)
    ids = ids[:max_length]
    positions = [p for p in positions if p < max_length]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    return logits.softmax(-1)[positions, 1].tolist()


def test_generic_scores_equal_the_plain_unpacked_computation(subset, tokenizer, classifier):
    report = score(classifier, subset, tokenizer=tokenizer, family="generic", max_length=MAX_LENGTH,
                   batch_tokens=2048, progress=False)
    assert len(report.predictions) == len(subset)
    truncated = 0
    for sample in subset:
        expected = plain_generic_scores(classifier, tokenizer, sample, MAX_LENGTH)
        got = report.predictions[sample.id]["scores"]
        truncated += len(expected) < len(sample.steps)
        # fp32 forward of the same weights; packing and per-segment attention only change summation order (~1e-6).
        torch.testing.assert_close(torch.tensor(got["step_level_validity_scores"]), torch.tensor(expected), atol=1e-5, rtol=0)
        assert got["step_level_validity_labels"] == [v > 0.5 for v in got["step_level_validity_scores"]]
    assert truncated > 0, "the subset should exercise the truncation rule"
    assert report.run["truncated_samples"] == truncated
    # The report is the evaluator's on those predictions.
    assert report.official == evaluate(subset, report.predictions).official
    assert report.run["tokens"] > 0 and report.run["tokens_per_second"] > 0


def test_prefix_sharing_gives_the_unshared_scores_with_fewer_tokens(subset, tokenizer, classifier):
    shared = score(classifier, subset, tokenizer=tokenizer, family="generic", max_length=MAX_LENGTH, progress=False)
    plain = score(classifier, subset, tokenizer=tokenizer, family="generic", max_length=MAX_LENGTH, progress=False,
                  share_prefixes=False)
    assert shared.run["prefix_sharing"] and not plain.run["prefix_sharing"]  # on by default for a causal decoder
    # The subset holds complete problem groups (every class's variant of the same problems), so prefixes repeat.
    assert shared.run["tokens_computed"] < shared.run["tokens"] == plain.run["tokens"] == plain.run["tokens_computed"]
    for sample_id, result in plain.predictions.items():
        ours = shared.predictions[sample_id]["scores"]
        torch.testing.assert_close(torch.tensor(ours["step_level_validity_scores"]),
                                   torch.tensor(result["scores"]["step_level_validity_scores"]), atol=1e-5, rtol=0)
    assert shared.run["truncated_samples"] == plain.run["truncated_samples"] > 0
    # No score of this random model sits within 1e-5 of the threshold, so the labels and the report agree exactly.
    assert shared.official == plain.official


class Wrapper(torch.nn.Module):
    """Stands for DDP/FSDP: the real model is `.module`."""

    def __init__(self, module):
        super().__init__()
        self.module = module


def test_live_model_in_training_mode_is_used_in_place_and_restored(subset, tokenizer, classifier):
    classifier.train()
    pointers = {name: p.data_ptr() for name, p in classifier.named_parameters()}
    grads_before = [p.requires_grad for p in classifier.parameters()]
    report = score(Wrapper(classifier), subset, tokenizer=tokenizer, family="generic", max_length=MAX_LENGTH,
                   progress=False)
    assert classifier.training and all(m.training for m in classifier.modules())
    assert {name: p.data_ptr() for name, p in classifier.named_parameters()} == pointers
    assert [p.requires_grad for p in classifier.parameters()] == grads_before
    classifier.eval()
    again = score(classifier, subset, tokenizer=tokenizer, family="generic", max_length=MAX_LENGTH, progress=False)
    assert again.official == report.official


def test_second_call_reuses_tokenized_and_packed_batches(subset, tokenizer, classifier, monkeypatch):
    from prmbench_fast.families.generic import GenericPRM

    score(classifier, subset, tokenizer=tokenizer, family="generic", max_length=MAX_LENGTH, progress=False)
    calls = []
    original = GenericPRM.encode
    monkeypatch.setattr(GenericPRM, "encode", lambda self, sample: calls.append(sample.id) or original(self, sample))
    score(classifier, subset, tokenizer=tokenizer, family="generic", max_length=MAX_LENGTH, progress=False)
    assert calls == []


def test_disk_cache_of_tokenized_samples(subset, tokenizer, classifier, tmp_path, monkeypatch):
    from prmbench_fast import token_cache

    first = score(classifier, subset, tokenizer=tokenizer, family="generic", step_separator="\n\n",
                  max_length=MAX_LENGTH, cache_dir=tmp_path, progress=False)
    assert len(list(tmp_path.glob("encoded-*.safetensors"))) == 1
    monkeypatch.setattr(token_cache, "_ENCODED", {})  # a new process: memory caches empty
    monkeypatch.setattr(token_cache, "_ON_DISK", {})
    monkeypatch.setattr(token_cache, "_PACKED", type(token_cache._PACKED)())
    from prmbench_fast.families.generic import GenericPRM

    monkeypatch.setattr(GenericPRM, "encode", lambda self, sample: pytest.fail("encoded again despite the disk cache"))
    second = score(classifier, subset, tokenizer=tokenizer, family="generic", step_separator="\n\n",
                   max_length=MAX_LENGTH, cache_dir=tmp_path, progress=False)
    assert second.predictions == first.predictions


def test_a_warm_call_writes_a_new_run_folders_tokenization_cache(subset, tokenizer, classifier, tmp_path):
    from prmbench_fast import token_cache
    from prmbench_fast.families.generic import GenericPRM

    options = dict(tokenizer=tokenizer, family="generic", max_length=MAX_LENGTH, batch_tokens=1024,
                   share_prefixes=False, progress=False)
    score(classifier, subset, **options)  # the packed batches are now in memory: the next call tokenizes nothing
    score(classifier, subset, output_dir=tmp_path / "run", **options)
    (cache_file,) = (tmp_path / "run" / "cache").glob("encoded-*.safetensors")
    stored = token_cache._read_cache_file(cache_file)
    family = GenericPRM(tokenizer)
    assert {sample.id: family.encode(sample) for sample in subset}.items() <= stored.items()


def test_a_folder_that_is_a_file_is_refused_before_any_forward(subset, tokenizer, classifier, tmp_path):
    from prmbench_fast.io import FileError

    a_file = tmp_path / "notes.txt"
    a_file.write_text("")
    options = dict(tokenizer=tokenizer, family="generic", max_length=MAX_LENGTH, batch_tokens=1024,
                   share_prefixes=False, progress=False)
    score(classifier, subset, **options)  # warm: a call with these options finds its batches packed in memory
    model = tiny_llama(len(tokenizer), head="token_classification")
    model.base_model.forward = lambda *args, **kwargs: pytest.fail("a forward ran before the folder was checked")
    for folder in ("output_dir", "cache_dir"):
        with pytest.raises(FileError, match=f"{a_file}.*is a file"):
            score(model, subset, **options, **{folder: a_file})


def test_output_dir_resume_skips_finished_samples(subset, tokenizer, classifier, tmp_path):
    out = tmp_path / "run"
    full = score(classifier, subset, tokenizer=tokenizer, family="generic", max_length=MAX_LENGTH,
                 batch_tokens=1024, output_dir=out, progress=False)
    lines = (out / "results.jsonl").read_text().splitlines(keepends=True)
    assert len(lines) == len(subset)
    assert len(list((out / "cache").glob("encoded-*.safetensors"))) == 1
    assert json.loads((out / "report.json").read_text())["official"] == json.loads(json.dumps(full.official))
    # Simulate a crash: half the lines and a torn final line survive.
    (out / "results.jsonl").write_text("".join(lines[: len(lines) // 2]) + lines[len(lines) // 2][:17])
    (out / "report.json").unlink()
    resumed = score(classifier, subset, tokenizer=tokenizer, family="generic", max_length=MAX_LENGTH,
                    batch_tokens=1024, output_dir=out, progress=False)
    assert resumed.run["samples_resumed"] == len(lines) // 2
    assert resumed.run["samples_scored"] == len(subset) - len(lines) // 2
    assert resumed.official == full.official and resumed.table == full.table
    assert len((out / "results.jsonl").read_text().splitlines()) == len(subset)
    # The results file is the official format: the evaluate command reads it as it is.
    from prmbench_fast.io import read_predictions

    assert evaluate(subset, read_predictions(out / "results.jsonl")).official == full.official


def test_output_dir_of_another_run_is_refused(subset, tokenizer, classifier, tmp_path):
    score(classifier, subset, tokenizer=tokenizer, family="generic", max_length=MAX_LENGTH, output_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="other settings.*max_length.*--overwrite"):
        score(classifier, subset, tokenizer=tokenizer, family="generic", max_length=MAX_LENGTH + 1,
              output_dir=tmp_path, progress=False)


def test_a_live_model_whose_weights_changed_never_resumes_the_old_results(subset, tokenizer, tmp_path):
    model = tiny_llama(len(tokenizer), head="token_classification")
    options = dict(tokenizer=tokenizer, family="generic", max_length=MAX_LENGTH, output_dir=tmp_path, progress=False)
    before = score(model, subset, **options)
    with torch.no_grad():  # one "training step": the same module, other weights
        model.score.weight.add_(0.5)
    with pytest.raises(ValueError, match="weights: .* -> .*--overwrite"):
        score(model, subset, **options)
    after = score(model, subset, overwrite=True, **options)
    fresh = score(model, subset, tokenizer=tokenizer, family="generic", max_length=MAX_LENGTH, progress=False)
    assert after.official == fresh.official and after.run["samples_resumed"] == 0
    assert after.predictions == fresh.predictions and after.predictions != before.predictions  # new scores, not old


def test_bon_task_is_scored_by_any_family_and_resumes(tokenizer, classifier, tmp_path):
    from prmbench_fast.tasks.bon import evaluate_bon

    rows = [{"id": f"gsm8k_{q}", "question": f"What is {q} plus 1?",
             "responses": [f"We add one.\n\nSo it is {q + k}.\n\nThe answer is \\boxed{{{q + k}}}" for k in range(4)],
             "ans_str": "", "answer": str(q + 1), "labels": ["correct" if k == 1 else "wrong" for k in range(4)]}
            for q in range(3)]
    path = tmp_path / "bon.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = load_prmbench(path, task="bon")
    options = dict(tokenizer=tokenizer, family="generic", task="bon", output_dir=tmp_path / "run", progress=False)
    first = score(classifier, data, **options)
    assert first.run["samples_scored"] == 12 and first.diagnostics["predictions_used"] == 12
    # The BoN evaluator on the written result lines gives the same numbers; a second call resumes all of them.
    written = [json.loads(line) for line in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    assert evaluate_bon(data, written).official == first.official
    again = score(classifier, data, **options)
    assert again.run["samples_resumed"] == 12 and again.official == first.official


def test_unknown_model_gets_a_clear_error_listing_the_families(subset, tokenizer, classifier):
    with pytest.raises(FamilyError, match="pass family= one of: .*math_shepherd.*generic.*lm_judge"):
        score(classifier, subset, tokenizer=tokenizer, progress=False)
    with pytest.raises(FamilyError, match="unknown PRM family 'nope'"):
        score(classifier, subset, tokenizer=tokenizer, family="nope", progress=False)


def test_checkpoint_path_is_loaded_offline(subset, tokenizer, classifier, tmp_path):
    classifier.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    from_path = score(tmp_path / "model", subset, family="generic", max_length=MAX_LENGTH, progress=False)
    live = score(classifier, subset, tokenizer=tokenizer, family="generic", max_length=MAX_LENGTH, progress=False)
    assert from_path.official == live.official


# ---------------------------------------------------------------------------------------------------------------------
# Runs in child processes: a crash mid-run, and two ranks under torch.distributed.

CHILD = r"""
import os, sys
sys.path.insert(0, {tests!r})
import torch
from prmbench_fast import load_prmbench
from prmbench_fast import score
from prmbench_fast.testing.tiny_models import tiny_llama, train_tokenizer

data = load_prmbench({data!r}, limit_per_class={limit})
tokenizer = train_tokenizer([s.question for s in data] + [t for s in data for t in s.steps])
model = tiny_llama(len(tokenizer), head="token_classification", hidden={hidden}, layers={layers})
if {distributed}:
    torch.distributed.init_process_group("gloo")
report = score(model, data, tokenizer=tokenizer, family="generic", max_length=512, batch_tokens={batch_tokens},
               output_dir={output_dir!r}, progress=False)
if not {distributed} or torch.distributed.get_rank() == 0:
    import json
    print("REPORT " + json.dumps(report.official, sort_keys=True))
if {distributed}:
    torch.distributed.destroy_process_group()  # a rank leaving with the group open can abort the other (gloo)
"""


def child_script(tmp_path, output_dir, *, limit=3, hidden=64, layers=2, batch_tokens=600, distributed=False):
    script = tmp_path / f"child_{abs(hash((str(output_dir), distributed)))}.py"
    script.write_text(CHILD.format(tests=str(REPO_ROOT / "tests"), data=str(PRMBENCH_JSONL), limit=limit,
                                   hidden=hidden, layers=layers, distributed=distributed,
                                   batch_tokens=batch_tokens, output_dir=str(output_dir)))
    return script


def report_of(output):
    return json.loads(next(line for line in output.splitlines() if line.startswith("REPORT "))[len("REPORT "):])


def test_sigkill_mid_run_then_resume_equals_an_uninterrupted_run(tmp_path):
    # A slower model so that the run is still going when it is killed.
    killed_dir, clean_dir = tmp_path / "killed", tmp_path / "clean"
    killed = child_script(tmp_path, killed_dir, hidden=256, layers=4, batch_tokens=400)
    proc = subprocess.Popen([sys.executable, str(killed)], env=cpu_child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    results = killed_dir / "results.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if results.exists() and len(results.read_bytes().splitlines()) >= 5:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed mid-way"
    assert not (killed_dir / "report.json").exists()
    written = len(results.read_bytes().splitlines())

    resumed = subprocess.run([sys.executable, str(killed)], env=cpu_child_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    clean = subprocess.run([sys.executable, str(child_script(tmp_path, clean_dir, hidden=256, layers=4, batch_tokens=400))],
                           env=cpu_child_env(), capture_output=True, text=True, timeout=600)
    assert clean.returncode == 0, clean.stderr
    assert report_of(resumed.stdout) == report_of(clean.stdout)
    assert json.loads((killed_dir / "report.json").read_text())["run"]["samples_resumed"] >= written - 1


def test_two_ranks_on_gloo_equal_one_process(tmp_path):
    single = subprocess.run([sys.executable, str(child_script(tmp_path, tmp_path / "single"))],
                            env=cpu_child_env(), capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr
    multi = run_two_ranks(child_script(tmp_path, tmp_path / "multi", distributed=True))
    assert report_of(multi.stdout) == report_of(single.stdout)
    shards = sorted(p.name for p in (tmp_path / "multi").glob("results*.jsonl"))
    assert shards == ["results.jsonl", "results.rank1.jsonl"]


@pytest.mark.slow
def test_smollm2_lm_judge_on_a_few_samples_per_class(tmp_path):
    """The embedded default model, for real: SmolLM2-135M-Instruct as an LLM judge, through the CLI."""
    pytest.importorskip("gguf")
    from prmbench_fast.cli import main

    out = tmp_path / "demo"
    assert main(["score", "--data", str(PRMBENCH_JSONL), "--limit-per-class", "1", "--output-dir", str(out),
                 "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    data = load_prmbench(PRMBENCH_JSONL, limit_per_class=1)
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted(r["idx"] for r in results) == sorted(s.id for s in data)
    for r in results:
        scores = r["scores"]["step_level_validity_scores"]
        assert all(0.0 <= v <= 1.0 for v in scores)
        assert len(scores) == len(data.by_id[r["idx"]].steps)  # no truncation at 2048 for these samples
    assert report["run"]["family"] == "lm_judge"
    assert 0.0 <= report["table"]["Overall"] <= 100.0


def test_public_api_is_the_function_and_import_is_light():
    code = (
        "import sys, prmbench_fast\n"
        "assert 'triton' not in sys.modules and 'transformers' not in sys.modules, 'heavy import at package import'\n"
        "import prmbench_fast.scoring\n"
        "assert callable(prmbench_fast.score) and prmbench_fast.score is prmbench_fast.scoring.score\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cpu_child_env())
    assert result.returncode == 0, result.stderr


def test_progress_bar_counts_the_tokens_scored(subset, tokenizer, classifier, capsys):
    from tqdm import tqdm

    from prmbench_fast.progress import progress_bar

    report = score(classifier, subset, tokenizer=tokenizer, family="generic", max_length=MAX_LENGTH, progress=True)
    bar = capsys.readouterr().err
    scaled = tqdm.format_sizeof(report.run["tokens"])  # e.g. 5.63k
    assert bar.startswith("\rprmbench: ") and bar.endswith("\n") and f"prmbench: {scaled}tok [" in bar
    score(classifier, subset, tokenizer=tokenizer, family="generic", max_length=MAX_LENGTH, progress=False)
    assert capsys.readouterr().err == ""
    # Nothing to do (a resumed run's total of 0) shows no bar either.
    progress_bar(True, unit="tok", total=0).update(5)
    assert capsys.readouterr().err == ""
