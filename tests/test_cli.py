"""The prmbench-fast command: evaluate an official predictions file, print the table, write the JSON atomically."""

import gzip
import json
import pathlib
import re
import subprocess
import sys

import pytest

from conftest import REPO_ROOT
from prmbench_fast.cli import main

EXAMPLE = REPO_ROOT / "examples" / "skywork7b_first1000_predictions.jsonl.gz"


def test_evaluate_example_predictions(tmp_path, prmbench_jsonl, capsys):
    out = tmp_path / "report.json"
    code = main(["evaluate", "--data", str(prmbench_jsonl), "--predictions", str(EXAMPLE), "--only-predicted", "--output", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert printed.splitlines()[0].split() == "Overall | NR | NCL | S1 | ES | SC | DC | CI | S2 | PS | DR | MS | S3".split()
    written = json.loads(out.read_text())
    assert set(written) == {"official", "table", "diagnostics"}
    assert set(written["official"]) == {"total_hallucination_results", "hallucination_type_results", "validitiy_rate"}
    assert f"{written['table']['Overall']:.1f}" in printed.splitlines()[2]
    assert written["diagnostics"]["missing_ids"] == []
    assert not list(tmp_path.glob(".report.json.*"))  # no temporary file left behind


def test_checkpoint_lines_are_read_like_result_lines(tmp_path, prmbench_jsonl):
    with gzip.open(EXAMPLE, "rt") as f:
        results = [json.loads(line) for line in f]
    ckpt = tmp_path / "ckpt.jsonl"
    ckpt.write_text("".join(json.dumps({"task_name": "prmtest_classified", "model_name": "m", "results": r}) + "\n" for r in results))
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    assert main(["evaluate", "--data", str(prmbench_jsonl), "--predictions", str(ckpt), "--only-predicted", "--output", str(a)]) == 0
    assert main(["evaluate", "--data", str(prmbench_jsonl), "--predictions", str(EXAMPLE), "--only-predicted", "--output", str(b)]) == 0
    assert json.loads(a.read_text()) == json.loads(b.read_text())


@pytest.mark.parametrize(
    "line, match",
    [
        ("{broken", r"bad\.jsonl, line 2: invalid JSON"),
        ('{"scores": {}}', r"bad\.jsonl, line 2, field 'idx': missing field"),
        ('{"idx": "correct_prm_test_p1_0", "scores": 3}', r"bad\.jsonl, line 2, field 'scores'"),
        ('{"task_name": "t", "model_name": "m", "results": [1]}', r"bad\.jsonl, line 2, field 'results'"),
    ],
)
def test_malformed_predictions_file_is_reported_with_file_and_line(tmp_path, prmbench_jsonl, capsys, line, match):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"idx": "correct_prm_test_p1_0", "scores": {"step_level_validity_labels": [true]}}\n' + line + "\n")
    assert main(["evaluate", "--data", str(prmbench_jsonl), "--predictions", str(bad)]) == 2
    assert re.search(match, capsys.readouterr().err)


def test_console_script_is_installed():
    bin_dir = pathlib.Path(sys.executable).parent
    result = subprocess.run([str(bin_dir / "prmbench-fast"), "evaluate", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--predictions" in result.stdout
