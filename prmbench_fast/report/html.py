"""The report page: one self-contained HTML file (inline CSS, figures as base64 PNG, nothing loaded from the network)."""

from __future__ import annotations

import base64
import datetime
import html
from typing import Any, Mapping, Sequence

from ..classes import CLASS_ABBREVIATIONS
from ..ratios import TABLE_COLUMNS
from .leaderboard import published, ranked

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1100px;
       color: #222; line-height: 1.45; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.6em 0; }
th, td { padding: 0.2em 0.55em; text-align: right; border-bottom: 1px solid #eee; }
th { background: #f4f4f4; } td.name, th.name { text-align: left; }
tr.run td { background: #fff3c4; font-weight: 600; } tr.baseline td { color: #777; font-style: italic; }
p.note, caption { color: #555; font-size: 0.85em; text-align: left; caption-side: bottom; }
img { max-width: 100%; }
"""


def _fmt(value: Any, digits: int = 1, scale: float = 1.0) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and value == -1:
        return "-1 (empty)"
    return f"{scale * value:.{digits}f}"


def _e(text: Any) -> str:
    return html.escape(str(text))


def _table(header: Sequence[str], rows: Sequence[tuple[str, Sequence[str]]], *, names: int = 1, caption: str = "") -> str:
    """rows: (css class, cells); the first ``names`` columns are left-aligned text."""
    head = "".join(f'<th class="name">{_e(h)}</th>' if i < names else f"<th>{_e(h)}</th>" for i, h in enumerate(header))
    body = []
    for css, cells in rows:
        tds = "".join(f'<td class="name">{c}</td>' if i < names else f"<td>{c}</td>" for i, c in enumerate(cells))
        body.append(f'<tr class="{css}">{tds}</tr>')
    cap = f"<caption>{caption}</caption>" if caption else ""
    return f"<table>{cap}<tr>{head}</tr>{''.join(body)}</table>"


def _figure(figures: Mapping[str, bytes], name: str, alt: str) -> str:
    if name not in figures:
        return ""
    data = base64.b64encode(figures[name]).decode("ascii")
    return f'<p><img alt="{_e(alt)}" src="data:image/png;base64,{data}"></p>'


def _runs_section(runs) -> str:
    rows = []
    for run in runs:
        settings = run.settings
        rows.append(("", [_e(run.name), _e(run.task), _e(settings.get("model", "-")), _e(settings.get("family", "-")),
                          _e(run.diagnostics.get("samples", run.diagnostics.get("responses", "-"))),  # bon: responses
                          _e(len(run.diagnostics.get("missing_ids", []))),
                          _e(len(run.diagnostics.get("invalid_predictions", []))), _e(run.path)]))
    header = ["run", "task", "model", "family", "samples", "missing", "invalid", "folder"]
    return "<h2>Runs</h2>" + _table(header, rows, names=4)


def _leaderboard_section(runs) -> str:
    prmbench_runs = {run.name: run.table for run in runs if run.is_prmbench}
    if not prmbench_runs:
        return ""
    baselines = next((run.analysis["baselines"] for run in runs if run.analysis.get("baselines")), None)
    rows = []
    for rank, row in enumerate(ranked(prmbench_runs, baselines), start=1):
        css = {"run": "run", "baseline": "baseline"}.get(row.kind, "")
        rows.append((css, [str(rank), _e(row.name), _e(row.kind), *(_fmt(row.table[c]) for c in TABLE_COLUMNS)]))
    caption = (
        "Published rows: " + _e(published()[1]) + " Runs (highlighted) and the trivial predictors (italic) are computed "
        "by this package's evaluator on the run's data; a run on a subset of PRMBench is not directly comparable "
        "with full-benchmark rows (see its intervals)."
    )
    return "<h2>Leaderboard</h2>" + _table(["#", "model", "class", *TABLE_COLUMNS], rows, names=3, caption=caption)


def _intervals_section(runs, figures) -> str:
    parts = []
    for run in runs:
        intervals = run.analysis.get("intervals")
        if not intervals or not intervals.get("columns"):
            continue
        columns = intervals["columns"]
        cells = [f"{_fmt(columns[c]['value'])}<br><small>[{_fmt(columns[c]['low'])}, {_fmt(columns[c]['high'])}]</small>"
                 if c in columns else "-" for c in TABLE_COLUMNS]
        caption = (f"{_e(run.name)}: 95% percentile intervals from {intervals['replicates']} bootstrap replicates "
                   f"resampling the {intervals['problems']} {_e(intervals['resampled'])} (seed {intervals['seed']}).")
        parts.append(_table(["run", *TABLE_COLUMNS], [("", [_e(run.name), *cells])], caption=caption))
    if not parts:
        return ""
    return "<h2>Uncertainty</h2>" + _figure(figures, "intervals", "bootstrap intervals") + "".join(parts)


def _bias_section(runs, figures) -> str:
    parts = []
    for run in runs:
        bias = run.analysis.get("positive_bias")
        if not bias:
            continue
        rows = []
        for name, entry in bias.items():
            c, e = entry["correct_steps"], entry["error_steps"]
            label = CLASS_ABBREVIATIONS.get(name, name)
            rows.append(("run" if name == "overall" else "", [
                _e(label), f"{c['steps']:,}", _fmt(c["mean_score"], 3), _fmt(c["positive_rate"], 1, 100),
                f"{e['steps']:,}", _fmt(e["mean_score"], 3), _fmt(e["positive_rate"], 1, 100),
                _fmt(entry["similarity"], 3)]))
        auroc = run.analysis.get("auroc", {})
        caption = (
            f"{_e(run.name)}. Positive rate: share of steps labelled correct. A PRM biased towards \"correct\" labels "
            "error steps positive too. Similarity (official): mean |positive rate of a perturbed solution − that of "
            f"its clean original|. AUROC of the validity scores (correct vs error steps): {_fmt(auroc.get('value'), 3)}."
        )
        header = ["class", "correct steps", "mean score", "positive %", "error steps", "mean score", "positive %",
                  "similarity"]
        parts.append(_table(header, rows, caption=caption))
    if not parts:
        return ""
    return ("<h2>Scores on correct and error steps</h2>" + _figure(figures, "scores", "score distributions")
            + "".join(parts))


def _sweep_section(runs, figures) -> str:
    rows = []
    for run in runs:
        sweep = run.analysis.get("threshold_sweep")
        if not sweep:
            continue
        if not sweep["applicable"]:
            rows.append(("", [_e(run.name), "-", "-", "-", "-", "not applicable: " + _e(sweep["reason"])]))
            continue
        at, best = sweep["at_run_threshold"]["Overall"], sweep["best"]["table"]["Overall"]
        rows.append(("", [_e(run.name), _fmt(sweep["run_threshold"], 4), _fmt(at), _fmt(sweep["best"]["threshold"], 4),
                          _fmt(best), f"+{best - at:.1f}"]))
    if not rows:
        return ""
    caption = ("Labels re-derived as score > threshold; the run's own point equals its table. The best threshold is "
               "searched over every distinct score (what a calibrated threshold would give on this data, an "
               "optimistic figure).")
    header = ["run", "run threshold", "Overall", "best threshold", "Overall at best", "gain"]
    return ("<h2>Threshold sweep</h2>" + _figure(figures, "sweep", "threshold sweep")
            + _table(header, rows, caption=caption))


def _recall_section(figures) -> str:
    if "recall" not in figures:
        return ""
    return ("<h2>Error steps caught, by position</h2>" + _figure(figures, "recall", "error-step recall by position")
            + '<p class="note">Over the error steps that received a label, the share labelled as errors, by the '
              "error step's position in the solution.</p>")


def _positions_section(figures) -> str:
    if "error_positions" not in figures:
        return ""
    return ("<h2>The data: where the errors are</h2>" + _figure(figures, "error_positions", "error positions")
            + '<p class="note">Error steps of the evaluated samples by position, per domain, per 100 samples of the '
              "domain (every error step as the data lists it).</p>")


def _bon_section(runs) -> str:
    parts = []
    for run in runs:
        if not run.is_bon:
            continue
        official, aggregations = run.official, run.report.get("aggregations", {})
        rows = []
        for name in official["pass_at_n"]:
            cells = [official["pass_at_n"][name], official["maj_of_n"][name], official["prm_bon"]["result"][name],
                     official["prm_bon"]["qualified_rate"][name], *(aggregations[a][name] for a in aggregations)]
            rows.append(("", [_e(name), *(_fmt(v, 1, 100) for v in cells)]))
        header = ["dataset", "pass@n", "maj@n", "PRM-BoN", "qualified", *aggregations]
        caption = f"{_e(run.name)}: official prmbench_bon numbers (×100); random tie-breaks seeded with {run.report.get('seed')}."
        parts.append(_table(header, rows, caption=caption))
    return "<h2>Best of n</h2>" + "".join(parts) if parts else ""


def _processbench_section(runs, figures) -> str:
    parts = []
    for run in runs:
        if not run.is_processbench:
            continue
        official = run.official
        splits = [k for k in official if k != "average_f1"]
        rows = [("", [_e(s), _fmt(official[s]["error_acc"]), _fmt(official[s]["correct_acc"]), _fmt(official[s]["f1"])])
                for s in splits]
        rows.append(("run", ["average", "", "", _fmt(official["average_f1"])]))
        parts.append(_table(["split", "error acc", "correct acc", "F1"], rows, caption=(
            f"{_e(run.name)}: the official run_eval.py numbers (accuracy on erroneous and on correct solutions, F1 their "
            "harmonic mean) and the average F1 of the splits.")))
        cal = (run.analysis or {}).get("calibration")
        if not cal:
            continue
        if not cal["applicable"]:
            parts.append(f'<p class="note">{_e(run.name)}: calibration not applicable: {_e(cal["reason"])}</p>')
            continue
        at_run = cal["thresholds"].index(cal["run_threshold"])
        chosen = cal["calibrated"]
        rows = [("", [_e(s), _fmt(cal["f1"][s][at_run]), _fmt(cal["best"][s]["threshold"], 4),
                      _fmt(cal["best"][s]["f1"]), _fmt(chosen["f1"][s])]) for s in cal["f1"]]
        rows.append(("run", ["average", _fmt(cal["average_f1"][at_run]), "", "", _fmt(chosen["average_f1"])]))
        caption = (f"{_e(run.name)}: F1 at the run's threshold ({_fmt(cal['run_threshold'], 4)}), at each split's own "
                   f"best threshold (optimistic), and at the threshold best on {_e(chosen['split'])} "
                   f"({_fmt(chosen['threshold'], 4)}) applied to every split, as published PRM evaluations do.")
        header = ["split", "F1 at run threshold", "own best threshold", "F1 at own best",
                  f"F1 at {chosen['split']}'s best"]
        parts.append(_table(header, rows, caption=caption))
    if not parts:
        return ""
    return "<h2>ProcessBench</h2>" + "".join(parts) + _figure(figures, "calibration", "ProcessBench calibration")


def render(runs: Sequence[Any], figures: Mapping[str, bytes], version: str) -> str:
    notes = [f"<p class=\"note\">{_e(run.name)}: {_e(run.note)}</p>" for run in runs if run.note]
    radar = ("<h2>Per class</h2>" + _figure(figures, "radar", "per-class radar")) if "radar" in figures else ""
    generated = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    body = "".join([
        f"<h1>PRMBench report</h1><p class=\"note\">prmbench_fast {_e(version)}, {generated}.</p>", *notes,
        _runs_section(runs), _leaderboard_section(runs), _intervals_section(runs, figures), radar,
        _recall_section(figures), _bias_section(runs, figures), _sweep_section(runs, figures),
        _positions_section(figures), _bon_section(runs), _processbench_section(runs, figures),
    ])
    return (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>PRMBench report</title>"
            f"<style>{CSS}</style></head><body>{body}</body></html>\n")
