"""The report: the published leaderboard shipped with its source, the HTML page (self-contained, every figure
embedded and written beside it), several runs side by side, and the console summary the demo prints."""

import base64
import csv
import json
import random
import re
import subprocess
import sys

import pytest

from conftest import FIXTURES, REPO_ROOT
from prmbench_fast import evaluate, load_prmbench
from prmbench_fast.analysis import analyze, trivial_baselines
from prmbench_fast.cli import main
from prmbench_fast.extras import MissingExtraError
from prmbench_fast.ratios import TABLE_COLUMNS
from prmbench_fast.report import load_run, summary_text, write_report
from prmbench_fast.report.leaderboard import published, ranked
from test_analysis import hand_dataset, hand_predictions

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(folder, dataset, results, *, analysis=True):
    report = evaluate(dataset, results, keep_scores=True)
    content = {"official": report.official, "table": report.table, "diagnostics": report.diagnostics,
               "run": {"model": "m", "family": "f", "validity_threshold": 0.5}}
    if analysis:
        content["analysis"] = analyze(dataset, report, bootstrap=100, validity_threshold=0.5)
    folder.mkdir(parents=True)
    (folder / "report.json").write_text(json.dumps(content))
    (folder / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in results))
    return report


def test_shipped_leaderboard_is_the_published_one():
    rows, source = published()
    with open(FIXTURES / "leaderboard_v2.tsv") as f:
        fixture = list(csv.reader(f, delimiter="\t"))[1:]
    assert [(r.name, r.kind) for r in rows] == [(line[1], line[2]) for line in fixture]
    assert [[r.table[c] for c in TABLE_COLUMNS] for r in rows] == [[float(v) for v in line[3:]] for line in fixture]
    assert "ssmisya/PRMBench" in source and "form_latex_strs.ipynb" in source


def test_a_run_is_placed_by_its_overall_score():
    run = dict.fromkeys(TABLE_COLUMNS, 60.3)
    rows = ranked({"mine": run})
    names = [r.name for r in rows]
    assert names[names.index("mine") - 1] == "ReasonEval-34B"  # 60.5 above, 60.2 below
    assert names[names.index("mine") + 1] == "R1-Distill-Qwen-32B"


def random_results(dataset, seed):
    rng = random.Random(seed)
    results = []
    for s in dataset:
        scores = [rng.random() for _ in s.steps]
        results.append({"idx": s.id, "scores": {"step_level_validity_scores": scores,
                                                "step_level_validity_labels": [x > 0.5 for x in scores]}})
    return results


def test_html_is_self_contained_with_every_figure_embedded_and_written(tmp_path, prmbench_jsonl):
    pytest.importorskip("matplotlib")  # the figures (the `report` extra)
    dataset = load_prmbench(prmbench_jsonl, limit_per_class=8)
    write_run(tmp_path / "run_a", dataset, random_results(dataset, 0))
    write_run(tmp_path / "run_b", dataset, random_results(dataset, 1))
    out = write_report([tmp_path / "run_a", tmp_path / "run_b"], tmp_path / "out" / "page.html")
    page = out.read_text()
    # Nothing is fetched: no scripts, stylesheets or external sources; images are data URIs.
    assert not re.search(r"<script|<link|src=\"(?!data:)|url\(", page)
    embedded = [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([^"]+)"', page)]
    written = sorted((tmp_path / "out").glob("page.*.png"))
    assert {p.name for p in written} == {f"page.{n}.png" for n in
                                         ("radar", "recall", "scores", "sweep", "intervals", "error_positions")}
    assert sorted(embedded) == sorted(p.read_bytes() for p in written)
    assert all(png.startswith(PNG_MAGIC) for png in embedded)
    # Both runs are highlighted in the leaderboard, with the published rows and the trivial predictors.
    assert len(re.findall(r'<tr class="run"><td class="name">\d+</td><td class="name">run_[ab]</td>', page)) == 2
    assert "Qwen2.5-Math-PRM-72B" in page and "all steps positive" in page and "ssmisya/PRMBench" in page


def test_default_output_and_runs_with_the_same_folder_name(tmp_path):
    pytest.importorskip("matplotlib")  # the figures (the `report` extra)
    dataset = hand_dataset()
    write_run(tmp_path / "x" / "run", dataset, hand_predictions(0))
    write_run(tmp_path / "y" / "run", dataset, hand_predictions(1))
    out = write_report([tmp_path / "x" / "run", tmp_path / "y" / "run"])
    assert out == tmp_path / "x" / "run" / "report.html"
    page = out.read_text()
    assert "x/run" in page and "y/run" in page


def test_a_run_without_analyses_gets_them_from_its_results_and_the_data(tmp_path, prmbench_jsonl):
    dataset = load_prmbench(prmbench_jsonl, limit_per_class=2)
    results = [{"idx": s.id, "scores": {"step_level_validity_scores": [0.9] * len(s.steps),
                                        "step_level_validity_labels": [True] * len(s.steps)}} for s in dataset]
    report = write_run(tmp_path / "old", dataset, results, analysis=False)
    assert "pass the data" in load_run(tmp_path / "old").note
    view = load_run(tmp_path / "old", data=prmbench_jsonl)
    assert view.analysis["threshold_sweep"]["at_run_threshold"] == report.table
    assert view.analysis["baselines"] == trivial_baselines(dataset)


def test_bon_run_folder_gets_its_table(tmp_path):
    from test_tasks_bon import synthetic_predictions, synthetic_rows, write_jsonl
    from prmbench_fast.tasks.bon import evaluate_bon, load_bon

    rows = synthetic_rows(0, questions=12)
    report = evaluate_bon(load_bon(write_jsonl(tmp_path / "bon.jsonl", rows)), synthetic_predictions(rows, 0), seed=4)
    (tmp_path / "bon_run").mkdir()
    (tmp_path / "bon_run" / "report.json").write_text(json.dumps(report.to_json()))
    page = write_report([tmp_path / "bon_run"]).read_text()
    assert "<h2>Best of n</h2>" in page and "seeded with 4" in page
    name = next(iter(report.official["pass_at_n"]))
    assert f'<td class="name">{name}</td><td>{100 * report.official["pass_at_n"][name]:.1f}</td>' in page


def test_summary_places_the_row_among_the_leaderboard_and_the_baselines(prmbench_jsonl):
    full = load_prmbench(prmbench_jsonl)
    table = dict.fromkeys(TABLE_COLUMNS, 50.0)
    text = summary_text(table, trivial_baselines(full), name="demo", samples=len(full), report_path="runs/demo/report.html")
    lines = text.splitlines()
    order = [line[3:].split("  ")[0].strip() for line in lines[2:lines.index("")]]
    assert order[order.index("demo") - 1 : order.index("demo") + 2] == ["Llemma-oprm-7B", "demo", "MetaMath-7B"]  # 50.3, 49.7
    assert re.search(r"^>> demo\s+run\s+50\.0", text, re.M)
    assert re.search(r"all steps positive\s+baseline\s+45\.7", text)  # SPEC §2.5: the evaluator's own values
    assert re.search(r"all steps negative\s+baseline\s+13\.6", text)
    assert "demo and the baselines: the 6,969 samples evaluated" in text and "ssmisya/PRMBench" in text
    assert lines[-1] == "report: runs/demo/report.html"


def test_missing_matplotlib_names_the_report_extra(tmp_path, monkeypatch):
    write_run(tmp_path / "run", hand_dataset(), hand_predictions(0))
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import matplotlib.figure now fails
    with pytest.raises(MissingExtraError, match=re.escape("pip install 'prmbench-fast[report]'")):
        write_report([tmp_path / "run"])


def test_importing_the_report_does_not_import_matplotlib():
    code = "import sys, prmbench_fast.report, prmbench_fast.analysis; assert 'matplotlib' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# -- the command line -------------------------------------------------------------------------------------------------
EXAMPLE = REPO_ROOT / "examples" / "skywork7b_first1000_predictions.jsonl.gz"


def test_evaluate_output_dir_then_report(tmp_path, prmbench_jsonl, capsys):
    pytest.importorskip("matplotlib")  # the figures (the `report` extra)
    run = tmp_path / "skywork"
    assert main(["evaluate", "--data", str(prmbench_jsonl), "--predictions", str(EXAMPLE), "--only-predicted",
                 "--output-dir", str(run)]) == 0
    content = json.loads((run / "report.json").read_text())
    assert content["task"] == "prmbench" and content["run"]["predictions"] == str(EXAMPLE)
    # Skywork's labels follow its difference rule: no threshold of the scores gives them.
    assert not content["analysis"]["threshold_sweep"]["applicable"]
    assert (run / "table.txt").read_text().splitlines()[2].split()[0] == f"{content['table']['Overall']:.1f}"
    assert len((run / "results.jsonl").read_text().splitlines()) == 1000
    assert main(["report", str(run), "--output", str(tmp_path / "r.html")]) == 0
    assert "wrote " + str(tmp_path / "r.html") in capsys.readouterr().out
    page = (tmp_path / "r.html").read_text()
    assert "not applicable" in page and '<td class="name">skywork</td>' in page
    assert not (tmp_path / "r.sweep.png").exists() and (tmp_path / "r.radar.png").exists()


def test_evaluate_bon_task(tmp_path):
    from test_tasks_bon import synthetic_predictions, synthetic_rows, write_jsonl
    from prmbench_fast.tasks.bon import evaluate_bon, load_bon

    rows = synthetic_rows(2, questions=10)
    data = write_jsonl(tmp_path / "bon.jsonl", rows)
    predictions = write_jsonl(tmp_path / "p.jsonl", synthetic_predictions(rows, 2))
    out = tmp_path / "o.json"
    assert main(["evaluate", "--task", "bon", "--data", str(data), "--predictions", str(predictions), "--seed", "3",
                 "--output", str(out), "--output-dir", str(tmp_path / "run")]) == 0
    expected = evaluate_bon(load_bon(data), synthetic_predictions(rows, 2), seed=3)
    assert json.loads(out.read_text())["official"] == json.loads(json.dumps(expected.official))
    assert json.loads((tmp_path / "run" / "report.json").read_text())["seed"] == 3


def test_report_of_a_folder_without_report_json_is_a_one_line_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert re.fullmatch(r"prmbench-fast: error: .*is not a run folder: no report\.json.*\n", capsys.readouterr().err)
