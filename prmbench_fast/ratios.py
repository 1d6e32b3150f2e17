"""From confusion counts to the official PRMBench metrics and the leaderboard table.

The arithmetic reproduces the official ``evaluate_function`` (SPEC §2.4–2.5) to the last bit: ratios are computed from
Python ints with the same expressions, the -1 sentinel of an empty denominator is used as a number inside F1, and the
PRMScore table follows the leaderboard notebooks (MS scored by F1 only, scores clamped at 0, domain = mean of its
clamped class scores).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from .classes import CLASS_ABBREVIATIONS, DOMAINS

STEP_METRICS = ("correct_step_acc", "wrong_step_acc", "total_step_acc", "first_error_acc", "similarity")
F1_METRICS = ("precision", "recall", "f1", "negative_precision", "negative_recall", "negative_f1")
#: Leaderboard column order.
TABLE_COLUMNS = ("Overall", "NR", "NCL", "S1", "ES", "SC", "DC", "CI", "S2", "PS", "DR", "MS", "S3")


def ratio(numerator, denominator):
    """``numerator / denominator``, or the official -1 sentinel when the denominator is 0."""
    return numerator / denominator if denominator != 0 else -1


def mean(values: np.ndarray):
    """Mean as the official code takes it: ``sum(list) / len(list)``, -1 when empty.

    The official sum adds the floats one after the other, left to right (Python's ``sum`` up to 3.11; 3.12 compensates
    the rounding). ``np.cumsum`` adds in that order too, so its last value is that sum to the bit, whatever this
    Python's ``sum`` does; ``np.sum`` would add pairwise.
    """
    return float(np.cumsum(values)[-1]) / len(values) if len(values) > 0 else -1


def f1_metrics(tp: int, fp: int, tn: int, fn: int) -> dict[str, float]:
    """Precision/recall/F1 for correct steps (positive) and error steps (negative), -1 sentinels included."""
    precision = ratio(tp, tp + fp)
    recall = ratio(tp, tp + fn)
    f1 = 2 * precision * recall / (precision + recall) if (precision + recall) != 0 else -1
    negative_precision = ratio(tn, tn + fn)
    negative_recall = ratio(tn, tn + fp)
    negative_f1 = (
        2 * negative_precision * negative_recall / (negative_precision + negative_recall)
        if (negative_precision + negative_recall) != 0
        else -1
    )
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "negative_precision": negative_precision,
        "negative_recall": negative_recall,
        "negative_f1": negative_f1,
    }


def step_metrics(tp: int, fp: int, tn: int, fn: int, first_error_hits: int, first_error_scored: int, similarities):
    """The official pooled step accuracies: each is a mean over a list of 0/1 entries, so a ratio of counts."""
    return {
        "correct_step_acc": ratio(tp, tp + fn),
        "wrong_step_acc": ratio(tn, tn + fp),
        "total_step_acc": ratio(tp + tn, tp + fp + tn + fn),
        "first_error_acc": ratio(first_error_hits, first_error_scored),
        "similarity": mean(similarities),
    }


def prm_score(f1: float, negative_f1: float) -> float:
    """PRMScore = 0.5·F1 + 0.5·negative F1, with the -1 sentinels used as numbers (as the notebooks do)."""
    return 0.5 * f1 + 0.5 * negative_f1


def leaderboard_table(official: Mapping) -> dict[str, float | None]:
    """The leaderboard row (×100, full precision) from an official result dict.

    Overall is the PRMScore of the pooled totals (not a mean over classes); each class is its PRMScore except
    multi_solutions, scored by F1 alone; every score ≤ 0 shows as 0; a domain is the mean of its clamped class
    scores. Classes absent from the evaluated data give None (and are left out of their domain's mean).
    """
    totals = official["total_hallucination_results"]
    per_class = official["hallucination_type_results"]
    table: dict[str, float | None] = {"Overall": _clamped(prm_score(totals["f1"], totals["negative_f1"]))}
    for domain, members in DOMAINS.items():
        scores = []
        for cls in members:
            if cls in per_class["f1"]:
                f1 = per_class["f1"][cls]
                score = f1 if cls == "multi_solutions" else prm_score(f1, per_class["negative_f1"][cls])
                table[CLASS_ABBREVIATIONS[cls]] = _clamped(score)
                scores.append(table[CLASS_ABBREVIATIONS[cls]])
            else:
                table[CLASS_ABBREVIATIONS[cls]] = None
        table[domain] = sum(scores) / len(scores) if scores else None
    return {column: table[column] for column in TABLE_COLUMNS}


def _clamped(score: float) -> float:
    return 100.0 * score if score > 0 else 0.0


def format_table(table: Mapping[str, float | None]) -> str:
    """The leaderboard-style text table: one header line, one row, ×100 with one decimal ("-" for absent)."""
    widths = [max(len(c), 5) for c in TABLE_COLUMNS]
    header = " | ".join(c.rjust(w) for c, w in zip(TABLE_COLUMNS, widths))
    row = " | ".join(("-" if table[c] is None else f"{table[c]:.1f}").rjust(w) for c, w in zip(TABLE_COLUMNS, widths))
    return f"{header}\n{'-' * len(header)}\n{row}"
