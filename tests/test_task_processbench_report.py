"""A ProcessBench run folder from `evaluate --task processbench --output-dir` (identity, redo, refusal) and its HTML
report: the official table, the calibration table and figure."""

import base64
import json
import random
import re

import pytest

import prmbench_fast as pf
from prmbench_fast.cli import main
from prmbench_fast.tasks.processbench import evaluate_processbench
from prmbench_fast.testing.processbench_data import write_processbench


@pytest.fixture(scope="module")
def pb(prmbench_jsonl, tmp_path_factory):
    folder = tmp_path_factory.mktemp("processbench_report")
    write_processbench(prmbench_jsonl, folder / "data", limit_per_class=2)
    return folder / "data", pf.load_prmbench(folder / "data", task="processbench")


def write_lines(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def scored_results(data, seed):
    rng = random.Random(seed)
    out = []
    for s in data:
        scores = [rng.random() for _ in s.steps]
        out.append({"idx": s.id, "scores": {"step_level_validity_scores": scores,
                                            "step_level_validity_labels": [x > 0.5 for x in scores]}})
    return out


def test_evaluate_output_dir_writes_a_run_folder(pb, tmp_path, capsys):
    folder, data = pb
    predictions = write_lines(tmp_path / "p.jsonl", scored_results(data, 0))
    run = tmp_path / "run"
    command = ["evaluate", "--task", "processbench", "--data", str(folder), "--predictions", str(predictions),
               "--output-dir", str(run)]
    assert main(command) == 0
    content = json.loads((run / "report.json").read_text())
    expected = evaluate_processbench(data, scored_results(data, 0))
    assert content["task"] == "processbench" and content["official"]["average_f1"] == expected.official["average_f1"]
    calibration = content["analysis"]["calibration"]
    assert calibration["applicable"] and calibration["run_threshold"] == 0.5
    assert json.loads((run / "run.json").read_text())["kind"] == "evaluate"
    assert (run / "results.jsonl").read_text() == predictions.read_text()
    assert "average" in (run / "table.txt").read_text()

    assert main(command) == 0  # the same evaluation: redone
    capsys.readouterr()
    write_lines(predictions, scored_results(data, 1))  # other predictions: another run
    assert main(command) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main([*command, "--overwrite"]) == 0


def test_report_of_a_processbench_run(pb, tmp_path, capsys):
    pytest.importorskip("matplotlib")  # the figures (the `report` extra)
    folder, data = pb
    runs = []
    for seed in (0, 1):
        predictions = write_lines(tmp_path / f"p{seed}.jsonl", scored_results(data, seed))
        runs.append(tmp_path / f"run{seed}")
        assert main(["evaluate", "--task", "processbench", "--data", str(folder), "--predictions", str(predictions),
                     "--output-dir", str(runs[-1])]) == 0
    out = tmp_path / "page.html"
    assert main(["report", *map(str, runs), "--output", str(out)]) == 0
    page = out.read_text()
    assert "<h2>ProcessBench</h2>" in page and "<h2>Leaderboard</h2>" not in page
    report = json.loads((runs[0] / "report.json").read_text())
    split = next(iter(report["table"]))
    row = report["official"][split]
    assert (f'<td class="name">{split}</td><td>{row["error_acc"]:.1f}</td><td>{row["correct_acc"]:.1f}</td>'
            f'<td>{row["f1"]:.1f}</td>') in page
    calibrated = report["analysis"]["calibration"]["calibrated"]
    assert f"F1 at {calibrated['split']}&#x27;s best" in page and f"{calibrated['average_f1']:.1f}" in page
    assert {p.name for p in tmp_path.glob("page.*.png")} == {"page.calibration.png"}
    embedded = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert [base64.b64decode(e) for e in embedded] == [(tmp_path / "page.calibration.png").read_bytes()]


def test_report_of_processbench_outputs_without_scores(pb, tmp_path):
    pytest.importorskip("matplotlib")
    folder, data = pb
    outputs = write_lines(tmp_path / "o.jsonl", [{"id": s.id, "prediction": -1} for s in data])
    run = tmp_path / "run"
    assert main(["evaluate", "--task", "processbench", "--data", str(folder), "--predictions", str(outputs),
                 "--output-dir", str(run)]) == 0
    assert json.loads((run / "report.json").read_text())["analysis"] is None
    assert main(["report", str(run)]) == 0
    page = (run / "report.html").read_text()
    assert "<h2>ProcessBench</h2>" in page and "<img" not in page and not (run / "report.calibration.png").exists()
