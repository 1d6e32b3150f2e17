"""A per-split limit for ProcessBench (ProcessBenchDataset.subset, score --limit-per-split) and the demo's ProcessBench
row (make demo PROCESSBENCH_DATA=...)."""

import json
import os
import shutil
import subprocess

import pytest

import prmbench_fast as pf
from conftest import REPO_ROOT
from prmbench_fast.cli import main
from prmbench_fast.tasks.processbench import ProcessBenchDataset, ProcessBenchSample
from prmbench_fast.testing.processbench_data import write_processbench
from prmbench_fast.testing.tiny_models import tiny_llama, train_tokenizer


def sample(split, n, label):
    return ProcessBenchSample(f"{split}-{n}", f"q{n}", ("a", "b", "c"), label, split, "g", label == -1)


# gsm8k: erroneous solutions first, then correct ones; math: one correct solution only; omnimath: correct ones only.
DATA = ProcessBenchDataset(
    [sample("gsm8k", n, n % 3) for n in range(6)] + [sample("gsm8k", n, -1) for n in range(6, 10)]
    + [sample("math", 0, 1), sample("math", 1, -1), sample("math", 2, 0), sample("math", 3, 2)]
    + [sample("omnimath", n, -1) for n in range(3)]
)


def test_subset_takes_half_correct_half_erroneous_per_split_in_data_order():
    ids = [s.id for s in DATA.subset(limit_per_split=3)]
    assert ids == ["gsm8k-0", "gsm8k-6", "gsm8k-7",  # ⌈3/2⌉ correct, ⌊3/2⌋ erroneous, in data order
                   "math-0", "math-1", "math-2",  # one correct solution: erroneous ones fill in
                   "omnimath-0", "omnimath-1", "omnimath-2"]  # no erroneous solution: correct ones fill in
    assert [s.id for s in DATA.subset(limit_per_split=1)] == ["gsm8k-6", "math-1", "omnimath-0"]
    assert list(DATA.subset(limit_per_split=100)) == list(DATA)
    assert DATA.subset(limit_per_split=2).splits == DATA.splits


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, None])
def test_subset_refuses_a_limit_that_is_not_a_positive_int(bad):
    with pytest.raises(ValueError, match="limit_per_split must be a positive integer"):
        DATA.subset(limit_per_split=bad)


@pytest.fixture(scope="module")
def pb_folder(prmbench_jsonl, tmp_path_factory):
    folder = tmp_path_factory.mktemp("processbench")
    write_processbench(prmbench_jsonl, folder, limit_per_class=2)
    return folder


def test_score_command_scores_the_per_split_limit(pb_folder, tmp_path, capsys):
    data = pf.load_processbench(pb_folder)
    tokenizer = train_tokenizer([s.question for s in data] + [t for s in data for t in s.steps]
                                + ["Verdict: +", "Verdict: -"] * 30)
    tiny_llama(len(tokenizer), head="causal").save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    assert main(["score", "--model", str(tmp_path / "model"), "--family", "lm_judge", "--task", "processbench",
                 "--data", str(pb_folder), "--limit-per-split", "2", "--max-length", "256", "--no-progress",
                 "--output-dir", str(tmp_path / "run")]) == 0
    expected = data.subset(limit_per_split=2)
    assert len(expected) == 2 * len(data.splits) < len(data)
    assert all(sorted(s.label == -1 for s in expected if s.split == split) == [False, True] for split in data.splits)
    lines = [json.loads(line) for line in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    assert sorted(r["idx"] for r in lines) == sorted(s.id for s in expected)
    out = capsys.readouterr().out
    assert f"on {len(expected)} samples" in out and "average" in out


def test_limit_per_split_is_refused_for_the_other_tasks(prmbench_jsonl, capsys):
    assert main(["score", "--data", str(prmbench_jsonl), "--limit-per-split", "2", "--no-progress"]) == 2
    assert "--limit-per-split applies to --task processbench only" in capsys.readouterr().err


def dry_run_demo(*variables):
    """The score commands ``make -n demo`` would run (continued lines joined), without $PROCESSBENCH_DATA set."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    env = {k: v for k, v in os.environ.items() if k != "PROCESSBENCH_DATA"}
    run = subprocess.run(["make", "-n", "-s", "demo", "BIN=bin", *variables], cwd=REPO_ROOT, capture_output=True,
                         text=True, timeout=60, env=env)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.replace("\\\n", " ").splitlines()
    return [" ".join(line.split()) for line in lines if "bin/prmbench-fast" in line]


def test_demo_adds_a_processbench_run_only_when_given_its_data():
    prmbench = ("bin/prmbench-fast score --data ../shared/prmbench/prmbench_preview.jsonl --limit-per-class 4 "
                "--output-dir runs/demo")
    assert dry_run_demo() == [prmbench]
    assert dry_run_demo("PROCESSBENCH_DATA=data/processbench") == [
        prmbench, "bin/prmbench-fast score --task processbench --data data/processbench --limit-per-split 6 "
                  "--output-dir runs/demo-processbench"]
    assert dry_run_demo("PROCESSBENCH_DATA=pb", "PROCESSBENCH_LIMIT=3")[1].endswith(
        "--limit-per-split 3 --output-dir runs/demo-processbench")
