"""The report's figures, drawn with matplotlib's object API (``matplotlib.figure.Figure``, rendered by Agg): no pyplot,
so no global backend or figure state is touched in the caller's process. Each function returns PNG bytes, or None
when no run has the data it draws."""

from __future__ import annotations

import io
import math
from typing import Any, Sequence

from ..classes import CLASS_ABBREVIATIONS, ERROR_CLASSES
from ..extras import require
from ..ratios import TABLE_COLUMNS

#: Positions with fewer error steps than this are left out of the recall curve (a recall of 1-4 steps is noise).
MIN_STEPS_PER_POSITION = 5
DPI = 110


def _figure(width: float, height: float):
    figure = require("matplotlib.figure", "report", "the HTML report's figures")
    return figure.Figure(figsize=(width, height), layout="constrained")


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def _grid(fig, count: int, columns: int = 2):
    """``count`` axes in rows of at most ``columns``."""
    cols = min(columns, count)
    rows = math.ceil(count / cols)
    return [fig.add_subplot(rows, cols, i + 1) for i in range(count)]


def radar(runs: Sequence[Any], baselines: dict | None) -> bytes:
    """Per-class PRMScore of every run on one radar, the all-positive predictor dashed for reference."""
    labels = [CLASS_ABBREVIATIONS[c] for c in ERROR_CLASSES]
    angles = [2 * math.pi * i / len(labels) for i in range(len(labels))]
    fig = _figure(6.4, 6.4)
    ax = fig.add_subplot(projection="polar")
    series = [(run.name, run.table, "-") for run in runs]
    if baselines and "all_positive" in baselines:
        series.append(("all steps positive", baselines["all_positive"], "--"))
    for name, table, style in series:
        values = [math.nan if table[c] is None else table[c] for c in labels]  # a class absent from the data: a gap
        line = ax.plot(angles + angles[:1], values + values[:1], style, linewidth=1.8, label=name)[0]
        if style == "-" and not any(math.isnan(v) for v in values):
            ax.fill(angles + angles[:1], values + values[:1], color=line.get_color(), alpha=0.08)
        else:
            line.set_color("0.45")
    ax.set_xticks(angles, labels)
    ax.tick_params(axis="x", pad=8)
    ax.set_ylim(0, 100)
    ax.set_yticks([20, 40, 60, 80, 100], ["20", "40", "60", "80", "100"], fontsize=7, color="0.4")
    ax.set_title("PRMScore per class", pad=14)
    fig.legend(loc="outside lower center", ncol=min(3, len(series)), fontsize=8, frameon=False)
    return _png(fig)


def recall_by_position(runs: Sequence[Any]) -> bytes | None:
    """Share of the error steps labelled as errors, by the error step's position in the solution."""
    curves = []
    for run in runs:
        by_position = run.analysis.get("error_step_recall_by_position") or {}
        points = sorted((int(p), e["recall"]) for p, e in by_position.items() if e["steps"] >= MIN_STEPS_PER_POSITION)
        if points:
            curves.append((run.name, points))
    if not curves:
        return None
    fig = _figure(7.0, 3.8)
    ax = fig.add_subplot()
    for name, points in curves:
        ax.plot([p for p, _ in points], [100 * r for _, r in points], marker="o", markersize=3.5, label=name)
    ax.set_xlabel(f"position of the error step (1-based; positions with ≥ {MIN_STEPS_PER_POSITION} error steps)")
    ax.set_ylabel("error steps labelled as errors (%)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylim(-3, 103)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, frameon=False)
    return _png(fig)


def score_distributions(runs: Sequence[Any]) -> bytes | None:
    """Histograms of the validity scores on correct and on error steps (each normalised to its own total)."""
    shown = [run for run in runs if run.analysis.get("score_histograms")]
    if not shown:
        return None
    fig = _figure(7.0, 3.0 * math.ceil(len(shown) / 2))
    for ax, run in zip(_grid(fig, len(shown)), shown):
        hist = run.analysis["score_histograms"]
        for kind, color in (("correct_steps", "tab:green"), ("error_steps", "tab:red")):
            counts = hist[kind]
            total = sum(counts) or 1
            ax.stairs([c / total for c in counts], hist["edges"], color=color, fill=True, alpha=0.35,
                      label=f"{kind.replace('_', ' ')} ({sum(counts):,})")
        auroc = run.analysis.get("auroc", {}).get("value")
        ax.set_title(run.name + ("" if auroc is None else f" (AUROC {auroc:.3f})"), fontsize=9)
        ax.set_xlabel("validity score")
        ax.set_ylabel("share of steps")
        ax.legend(fontsize=7, frameon=False)
    return _png(fig)


def threshold_sweep(runs: Sequence[Any]) -> bytes | None:
    """PRMScore (Overall bold, classes thin) against the validity threshold; the run's threshold dashed, the best
    one dotted. Runs whose labels are no threshold of their scores are left out (the report's table says why)."""
    sweeps = [(run, sweep) for run in runs if (sweep := run.analysis.get("threshold_sweep")) and sweep["applicable"]]
    if not sweeps:
        return None
    fig = _figure(8.0, 3.3 * math.ceil(len(sweeps) / 2) + 0.6)
    handles: dict[str, Any] = {}
    for ax, (run, sweep) in zip(_grid(fig, len(sweeps)), sweeps):
        ax.set_title(run.name, fontsize=9)
        t = sweep["thresholds"]
        for column in TABLE_COLUMNS:
            values = sweep["table"][column]
            if column in CLASS_ABBREVIATIONS.values() and None not in values:
                handles[column] = ax.plot(t, values, linewidth=0.8, alpha=0.55)[0]
        handles["Overall"] = ax.plot(t, sweep["table"]["Overall"], color="black", linewidth=2.2)[0]
        handles["run threshold"] = ax.axvline(sweep["run_threshold"], color="0.3", linestyle="--", linewidth=1)
        handles["best threshold"] = ax.axvline(sweep["best"]["threshold"], color="0.3", linestyle=":", linewidth=1.2)
        ax.set_xlabel("validity threshold (label: score > threshold)", fontsize=8)
        ax.set_ylabel("PRMScore")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
    if handles:
        fig.legend(handles.values(), handles.keys(), loc="outside lower center", ncol=7, fontsize=7, frameon=False)
    return _png(fig)


def processbench_calibration(runs: Sequence[Any]) -> bytes | None:
    """ProcessBench F1 per split (thin) and their average (bold) against the validity threshold; the run's threshold
    dashed, the one chosen on the calibration split (gsm8k) dotted. Runs without an applicable calibration are left
    out (the report's table says why)."""
    shown = [(run, cal) for run in runs
             if (cal := (run.analysis or {}).get("calibration")) and cal["applicable"]]
    if not shown:
        return None
    fig = _figure(8.0, 3.3 * math.ceil(len(shown) / 2) + 0.6)
    handles: dict[str, Any] = {}
    for ax, (run, cal) in zip(_grid(fig, len(shown)), shown):
        ax.set_title(run.name, fontsize=9)
        t = cal["thresholds"]
        for split, values in cal["f1"].items():
            handles[split] = ax.plot(t, [math.nan if v is None else v for v in values], linewidth=1, alpha=0.75)[0]
        handles["average"] = ax.plot(t, [math.nan if v is None else v for v in cal["average_f1"]], color="black",
                                     linewidth=2.2)[0]
        handles["run threshold"] = ax.axvline(cal["run_threshold"], color="0.3", linestyle="--", linewidth=1)
        handles[f"best on {cal['calibrated']['split']}"] = ax.axvline(cal["calibrated"]["threshold"], color="0.3",
                                                                      linestyle=":", linewidth=1.2)
        ax.set_xlabel("validity threshold (wrong: score <= threshold)", fontsize=8)
        ax.set_ylabel("F1")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
    fig.legend(handles.values(), handles.keys(), loc="outside lower center", ncol=7, fontsize=7, frameon=False)
    return _png(fig)


def intervals(runs: Sequence[Any]) -> bytes | None:
    """Every table column with its bootstrap 95% interval, runs side by side."""
    shown = [run for run in runs if run.analysis.get("intervals", {}).get("columns")]
    if not shown:
        return None
    fig = _figure(8.0, 3.6)
    ax = fig.add_subplot()
    width = 0.8 / len(shown)
    for k, run in enumerate(shown):
        columns = run.analysis["intervals"]["columns"]
        xs = [i - 0.4 + width * (k + 0.5) for i, c in enumerate(TABLE_COLUMNS) if c in columns]
        entries = [columns[c] for c in TABLE_COLUMNS if c in columns]
        values = [e["value"] for e in entries]
        errors = [[max(v - e["low"], 0.0) for v, e in zip(values, entries)],
                  [max(e["high"] - v, 0.0) for v, e in zip(values, entries)]]
        ax.errorbar(xs, values, yerr=errors, fmt="o", markersize=4, capsize=3, label=run.name)
    ax.set_xticks(range(len(TABLE_COLUMNS)), TABLE_COLUMNS)
    ax.set_ylabel("PRMScore (bootstrap 95% interval)")
    ax.set_ylim(0, 105)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, frameon=False)
    return _png(fig)


def error_positions(distribution: dict[str, Any]) -> bytes | None:
    """The data's error steps by position, per domain, as a percentage of the domain's samples; positions past the
    one that covers 99% of the error steps (a long, thin tail) are left out."""
    if not distribution:
        return None
    percent = {d: {int(p): v for p, v in entry["percent"].items()} for d, entry in distribution.items()}
    mass: dict[int, float] = {}
    for d, by_position in percent.items():
        for p, v in by_position.items():
            mass[p] = mass.get(p, 0.0) + v * distribution[d]["samples"]
    total, running, last = sum(mass.values()), 0.0, 1
    for last in sorted(mass):
        running += mass[last]
        if running >= 0.99 * total:
            break
    fig = _figure(7.0, 3.4)
    ax = fig.add_subplot()
    width = 0.8 / len(percent)
    for k, (domain, by_position) in enumerate(percent.items()):
        xs = [p for p in sorted(by_position) if p <= last]
        ax.bar([x - 0.4 + width * (k + 0.5) for x in xs], [by_position[x] for x in xs], width=width,
               label=f"{domain} ({distribution[domain]['samples']:,} samples)")
    ax.set_xlabel(f"error step position (1-based; positions 1-{last}, 99% of the error steps)")
    ax.set_ylabel("error steps per 100 samples")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, frameon=False)
    return _png(fig)
