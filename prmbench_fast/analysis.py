"""Analyses of a PRMBench run, computed from the report's flat predictions (``report.step_predictions``) and counts.

What the PRMBench paper looks at beyond the leaderboard row: where in a solution errors are caught, how well the step
scores separate correct from error steps, what a calibrated threshold would give, how biased a PRM is towards
"correct", and how uncertain a (subset) run's numbers are. Every analysis is vectorised over the steps (numpy), so
:func:`analyze` is cheap enough for every run folder (well under a second on the full benchmark).

Which steps count: the official label-count rule, step i of a sample counts when ``i < min(len(steps), len(labels))``
(extra labels past the last step, which the official evaluator scores, are left out here), over the valid
predictions (an invalid one has no labels). The threshold sweep and the intervals, which must reproduce the official
numbers, count exactly what the evaluator counts instead. "Correct steps" are the non-error steps of the non-correct
samples; "error steps" their error steps. The label is the one the evaluator scores (NOT(redundancy label) on
``redundency``/``circular`` predictions that carry redundancy labels); the score is the validity score.
"""

from __future__ import annotations

import dataclasses
import threading
import weakref
from typing import Any

import numpy as np
import torch

from . import ratios as metrics
from .classes import ALL_CLASSES, CLASS_ABBREVIATIONS, CLASS_ID, CORRECT, DOMAIN_NAMES, DOMAINS, ERROR_CLASSES, REDUNDANCY_CLASSES
from .data import PRMBenchDataset
from .host_threads import single_threaded
from .predictions import StepPredictions

#: Points of the threshold sweep curve (quantiles of the scores), besides the run's threshold.
SWEEP_POINTS = 101
#: Bins of the score histograms (correct vs error steps).
HISTOGRAM_BINS = 40
#: The bootstrap intervals' seed and replicates unless analyze() is told otherwise.
BOOTSTRAP_SEED = 0
BOOTSTRAP_REPLICATES = 1000
_MS = CLASS_ID["multi_solutions"]


@dataclasses.dataclass(frozen=True)
class _Steps:
    """Every label of the valid predictions as numpy arrays, one entry per label (flat step index order)."""

    class_id: np.ndarray  # (S,) int64, the sample's class
    position: np.ndarray  # (S,) int64, 0-based step index within the sample
    in_range: np.ndarray  # (S,) bool, position < len(steps): counts for the analyses
    is_error: np.ndarray  # (S,) bool, the position is one of the sample's error steps (official membership)
    label: np.ndarray  # (S,) bool, the label the evaluator scores
    by_validity: np.ndarray  # (S,) bool, that label is the validity label (not NOT(redundancy))
    score: np.ndarray  # (S,) float64, validity score, NaN where none

    @property
    def counted(self) -> np.ndarray:
        """The steps the analyses count: in range, on non-correct samples."""
        return self.in_range & (self.class_id != CLASS_ID[CORRECT])


def _steps(dataset: PRMBenchDataset, preds: StepPredictions) -> _Steps:
    with single_threaded("cpu", preds.num_steps):  # a few torch ops on ~100k steps (prmbench_fast.host_threads)
        return _steps_of(dataset, preds.to("cpu"))


def _steps_of(dataset: PRMBenchDataset, preds: StepPredictions) -> _Steps:
    arrays = dataset.arrays
    sample_pos = preds.sample_pos.numpy()
    counts = preds.step_counts().numpy()
    keep = np.ones(len(sample_pos), dtype=bool)
    if preds.valid is not None:
        keep &= preds.valid.numpy()
    _, first = np.unique(sample_pos, return_index=True)  # a repeated sample: the first prediction wins
    first_mask = np.zeros(len(sample_pos), dtype=bool)
    first_mask[first] = True
    keep &= first_mask
    sample_of_step = np.repeat(np.arange(len(sample_pos)), counts)
    starts = preds.cu_steps.numpy().astype(np.int64)[:-1]
    position = np.arange(len(sample_of_step), dtype=np.int64) - starts[sample_of_step]
    step_keep = keep[sample_of_step]
    sample_of_step, position = sample_of_step[step_keep], position[step_keep]
    pos = sample_pos[sample_of_step]
    class_id = arrays.class_ids[pos]

    # Error membership by key lookup: (dataset position, 0-based step) pairs as one int64 key.
    width = int(max(position.max(initial=0), arrays.error_steps.max(initial=0))) + 1
    error_sample = np.repeat(np.arange(len(dataset), dtype=np.int64), np.diff(arrays.error_offsets))
    is_error = _member(pos * width + position, error_sample * width + arrays.error_steps)

    label = preds.scored_labels(torch.from_numpy(arrays.class_ids)).numpy()[step_keep]
    by_validity = np.ones(len(label), dtype=bool)
    if preds.redundancy_labels is not None:
        has = np.ones(len(sample_pos), dtype=bool) if preds.has_redundancy is None else preds.has_redundancy.numpy()
        redundancy_rule = np.isin(class_id, [CLASS_ID[c] for c in REDUNDANCY_CLASSES]) & has[sample_of_step]
        by_validity = ~redundancy_rule
    if preds.validity_scores is None:
        score = np.full(len(label), np.nan)
    else:
        score = preds.validity_scores.double().numpy()[step_keep]
    return _Steps(class_id, position, position < arrays.step_counts[pos], is_error, label, by_validity, score)


# ---------------------------------------------------------------------------------------------------------------------
# Error steps by position, AUROC, positive bias, score distributions


def error_step_recall_by_position(steps: _Steps) -> dict[int, dict[str, float]]:
    """{p: {"steps": n, "recall": r}}: over the counted error steps at 1-based position p, the fraction labelled as
    errors."""
    error = steps.counted & steps.is_error
    where = steps.position[error] + 1
    n = np.bincount(where)
    caught = np.bincount(where, weights=~steps.label[error])
    return {int(p): {"steps": int(n[p]), "recall": float(caught[p] / n[p])} for p in np.flatnonzero(n)}


def auroc(steps: _Steps) -> dict[str, Any]:
    """P(score of a correct step > score of an error step) + ½·P(equal), over the counted steps with a score.

    The Mann–Whitney statistic from average ranks: ties between a correct and an error step count one half.
    """
    use = steps.counted & ~np.isnan(steps.score)
    score, positive = steps.score[use], ~steps.is_error[use]
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return {"value": None, "correct_steps": n_pos, "error_steps": n_neg}
    _, inverse, tie_counts = np.unique(score, return_inverse=True, return_counts=True)
    ends = np.cumsum(tie_counts)
    average_rank = ends - (tie_counts - 1) / 2.0  # 1-based rank of each distinct value, ties averaged
    rank_sum = average_rank[inverse][positive].sum()
    value = (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)
    return {"value": float(value), "correct_steps": n_pos, "error_steps": n_neg}


def _mean_or_none(total: float, n: int) -> float | None:
    return float(total / n) if n else None


def positive_bias(steps: _Steps, official: dict[str, Any]) -> dict[str, Any]:
    """Per class and overall: on correct steps and on error steps, how many, the mean score (steps with a finite
    score) and the positive-label rate; plus the official similarity (mean |response rate − clean partner's response
    rate|)."""
    similarity = official["hallucination_type_results"]["similarity"]
    classes = [c for c in ERROR_CLASSES if c in similarity]
    out: dict[str, Any] = {name: {} for name in (*classes, "overall")}
    for kind, mask in (("correct_steps", steps.counted & ~steps.is_error), ("error_steps", steps.counted & steps.is_error)):
        # Each class's steps as one slice, in flat order (a stable sort by class): the same sums, in the same order,
        # as masking the whole array once per class; "overall" sums them all in flat order.
        class_id, flat_score, flat_label = steps.class_id[mask], steps.score[mask], steps.label[mask]
        order = np.argsort(class_id, kind="stable")
        bounds = np.searchsorted(class_id[order], np.arange(len(ALL_CLASSES) + 1))
        by_class = flat_score[order], flat_label[order]
        for name in out:
            if name == "overall":
                (lo, hi), (score, label) = (0, len(order)), (flat_score, flat_label)
            else:
                (lo, hi), (score, label) = bounds[CLASS_ID[name]:CLASS_ID[name] + 2], by_class
            scored = score[lo:hi][np.isfinite(score[lo:hi])]  # a mean with an infinite score says nothing
            out[name][kind] = {
                "steps": int(hi - lo),
                "mean_score": _mean_or_none(scored.sum(), len(scored)),
                "positive_rate": _mean_or_none(label[lo:hi].sum(), int(hi - lo)),
            }
    for name, entry in out.items():
        entry["similarity"] = official["total_hallucination_results"]["similarity"] if name == "overall" else similarity[name]
    return out


def score_histograms(steps: _Steps) -> dict[str, Any] | None:
    """Counts of the validity scores of the counted correct and error steps in equal-width bins over the finite
    scores (None: no scores). A score of -inf or +inf (labelled by ``score > threshold`` like any other) is counted
    in the first or last bin; ``infinite_scores`` says how many there are."""
    use = steps.counted & ~np.isnan(steps.score)
    finite = use & np.isfinite(steps.score)
    if not use.any():
        return None
    edges = np.histogram_bin_edges(steps.score[finite] if finite.any() else [0.0], bins=HISTOGRAM_BINS)
    clipped = np.clip(steps.score, edges[0], edges[-1])
    return {
        "edges": edges.tolist(),
        "correct_steps": np.histogram(clipped[use & ~steps.is_error], bins=edges)[0].tolist(),
        "error_steps": np.histogram(clipped[use & steps.is_error], bins=edges)[0].tolist(),
        "infinite_scores": int((use & ~finite).sum()),
    }


def error_position_distribution(dataset: PRMBenchDataset) -> dict[str, dict[str, Any]]:
    """The data's error steps by 1-based position, per domain, as a percentage of the domain's samples (the paper's
    figure): {domain: {"samples": n, "percent": {p: pct}}}. Every error step as the data lists it."""
    arrays = dataset.arrays
    class_of_error = np.repeat(arrays.class_ids, np.diff(arrays.error_offsets))
    out = {}
    for key, members in DOMAINS.items():
        ids = [CLASS_ID[c] for c in members]
        samples = int(np.isin(arrays.class_ids, ids).sum())
        if not samples:
            continue
        counts = np.bincount(arrays.error_steps[np.isin(class_of_error, ids)] + 1, minlength=1)
        out[DOMAIN_NAMES[key]] = {
            "samples": samples,
            "percent": {int(p): float(100.0 * counts[p] / samples) for p in np.flatnonzero(counts)},
        }
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Threshold sweep


def _member(values: np.ndarray, of: np.ndarray) -> np.ndarray:
    """``np.isin(values, of)`` for integer arrays, by binary search in the sorted ``of`` (np.isin's sort path imports
    numpy.ma on its first call in a process, ~20 ms)."""
    ordered = np.sort(of)
    at = np.minimum(np.searchsorted(ordered, values), max(len(ordered) - 1, 0))
    return ordered[at] == values if len(ordered) else np.zeros(len(values), dtype=bool)


def _distinct(values: np.ndarray) -> np.ndarray:
    """The distinct values of a NaN-free array, sorted: ``np.unique(values)``, without the numpy.ma import (~20 ms)
    its first plain call in a process pays."""
    ordered = np.sort(values)
    return ordered[np.concatenate(([True], ordered[1:] != ordered[:-1]))] if len(ordered) else ordered


def _counts_above(sorted_scores: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """How many of the (sorted) scores are > each threshold."""
    return len(sorted_scores) - np.searchsorted(sorted_scores, thresholds, side="right")


class _Sweep:
    """Per-class confusion counts as a function of the validity threshold, counted as the evaluator counts: every
    label of the valid predictions; labels from redundancy stay fixed."""

    def __init__(self, steps: _Steps):
        fixed = ~steps.by_validity
        self.fixed = np.zeros((len(ALL_CLASSES), 4), dtype=np.int64)
        for k, (is_error, label) in enumerate(((False, True), (True, True), (True, False), (False, False))):
            sel = fixed & (steps.is_error == is_error) & (steps.label == label)  # TP, FP, TN, FN
            self.fixed[:, k] = np.bincount(steps.class_id[sel], minlength=len(ALL_CLASSES))
        swept = steps.by_validity
        self.correct = [np.sort(steps.score[swept & ~steps.is_error & (steps.class_id == c)]) for c in range(len(ALL_CLASSES))]
        self.error = [np.sort(steps.score[swept & steps.is_error & (steps.class_id == c)]) for c in range(len(ALL_CLASSES))]
        scores = steps.score[swept & (steps.class_id != CLASS_ID[CORRECT])]
        # Candidate thresholds are finite: a threshold between two finite scores labels +-inf as any other.
        self.scores = scores[np.isfinite(scores)]
        error_ids = [CLASS_ID[c] for c in ERROR_CLASSES]
        self.fixed_total = self.fixed[error_ids].sum(axis=0)
        self.correct_total = np.sort(np.concatenate([self.correct[c] for c in error_ids]))
        self.error_total = np.sort(np.concatenate([self.error[c] for c in error_ids]))

    def counts(self, thresholds: np.ndarray) -> np.ndarray:
        """(T, classes, 4) int64 TP, FP, TN, FN with labels = score > threshold."""
        out = np.broadcast_to(self.fixed, (len(thresholds), *self.fixed.shape)).copy()
        for c in range(len(ALL_CLASSES)):
            tp, fp = _counts_above(self.correct[c], thresholds), _counts_above(self.error[c], thresholds)
            out[:, c] += np.stack([tp, fp, len(self.error[c]) - fp, len(self.correct[c]) - tp], axis=1)
        return out


def _table_from_counts(counts: np.ndarray, classes_present) -> dict[str, float | None]:
    """The leaderboard row from (classes, 4) counts, through the evaluator's own formulas."""
    per_class: dict[str, dict[str, float]] = {"f1": {}, "negative_f1": {}}
    for cls in classes_present:
        f1 = metrics.f1_metrics(*(int(v) for v in counts[CLASS_ID[cls]]))
        per_class["f1"][cls], per_class["negative_f1"][cls] = f1["f1"], f1["negative_f1"]
    total = counts[[CLASS_ID[c] for c in ERROR_CLASSES]].sum(axis=0)
    totals = metrics.f1_metrics(*(int(v) for v in total))
    return metrics.leaderboard_table({"total_hallucination_results": totals, "hallucination_type_results": per_class})


def _f1_arrays(tp, fp, tn, fn) -> tuple[np.ndarray, np.ndarray]:
    """F1 and negative F1 of count arrays, -1 sentinels used as numbers as :func:`metrics.f1_metrics` does."""
    def ratio(a, b):
        return np.where(b != 0, a / np.where(b != 0, b, 1), -1.0)

    def f1(p, r):
        s = p + r
        return np.where(s != 0, 2 * p * r / np.where(s != 0, s, 1), -1.0)

    return f1(ratio(tp, tp + fp), ratio(tp, tp + fn)), f1(ratio(tn, tn + fn), ratio(tn, tn + fp))


def _run_threshold(steps: _Steps, validity_threshold: float | None) -> tuple[float | None, str | None]:
    """A threshold t with labels == (score > t) on every validity-labelled step, or (None, why not)."""
    use = steps.by_validity
    if not use.any():
        return None, "no step is scored by its validity label"
    return _labels_threshold(steps.score[use], steps.label[use], validity_threshold)


def _labels_threshold(score: np.ndarray, label: np.ndarray,
                      validity_threshold: float | None) -> tuple[float | None, str | None]:
    """A threshold t with ``label == (score > t)``, ``validity_threshold`` when it is one, or (None, why not)."""
    if np.isnan(score).any():
        return None, "some predictions have labels without validity scores (evaluate(..., keep_scores=True) keeps them)"
    low = score[~label].max(initial=-np.inf)  # labels are score > t exactly when low <= t < high
    high = score[label].min(initial=np.inf)
    if not low < high:
        return None, "the labels are not `score > threshold` of the validity scores (e.g. Skywork's difference rule)"
    if validity_threshold is not None and low <= validity_threshold < high:
        return float(validity_threshold), None
    return float(low if np.isfinite(low) else np.nextafter(high, -np.inf)), None


def _best_threshold(sweep: _Sweep) -> float:
    """The validity threshold of the best Overall PRMScore, the lowest of equal ones (``sweep.scores`` not empty).
    Every distinct finite score is a candidate (labels change only there), plus one below them all (every step with a
    finite score positive).

    The Overall's counts at every candidate come from one merge of the sorted correct and error scores: a candidate's
    TN and FN are the error and correct steps at or before its last occurrence in the merged order (one binary search
    per candidate into each array took 3x as long over the full benchmark's ~83k candidates)."""
    correct, error = sweep.correct_total, sweep.error_total
    merged = np.concatenate((correct, error))
    order = np.argsort(merged, kind="stable")  # two sorted runs: a merge
    ordered = merged[order]
    errors_up_to = np.concatenate(([0], np.cumsum(order >= len(correct))))  # errors among the first k merged
    last = np.flatnonzero(np.append(ordered[1:] != ordered[:-1], True) & np.isfinite(ordered))
    first = np.searchsorted(ordered, ordered[last[0]], side="left")  # steps below the lowest finite score: -inf
    at_or_below = np.concatenate(([first], last + 1))
    tn = errors_up_to[at_or_below]
    fn = at_or_below - tn
    tp, fp = len(correct) - fn, len(error) - tn
    # One contiguous array per count (a (T, 4) table's strided columns took most of the time).
    f1, nf1 = _f1_arrays(*((swept + fixed).astype(np.float64) for swept, fixed in zip((tp, fp, tn, fn), sweep.fixed_total)))
    best = int(np.argmax(0.5 * f1 + 0.5 * nf1))  # argmax: the first of equal values
    return float(np.nextafter(ordered[last[0]], -np.inf) if best == 0 else ordered[last[best - 1]])


def threshold_free(dataset: PRMBenchDataset, report) -> dict[str, float]:
    """The threshold-free figures a training loop logs per evaluation: the AUROC of the validity scores, and the
    Overall at the best threshold with that threshold (when the labels are a threshold of the scores), as
    :func:`threshold_sweep`'s "best" gives them, without the ~100-row curve it also builds."""
    steps = _steps(dataset, report.step_predictions)
    out = {}
    value = auroc(steps)["value"]
    if value is not None:
        out["AUROC"] = value
    _, reason = _run_threshold(steps, report.run.get("validity_threshold"))
    sweep = _Sweep(steps)
    if reason is None and len(sweep.scores):
        best = _best_threshold(sweep)
        classes_present = [c for c in ERROR_CLASSES if c in report.official["hallucination_type_results"]["f1"]]
        table = _table_from_counts(sweep.counts(np.array([best]))[0], classes_present)
        out["Overall_at_best_threshold"], out["best_threshold"] = table["Overall"], best
    return out


def threshold_sweep(steps: _Steps, classes_present, validity_threshold: float | None = None) -> dict[str, Any]:
    """The leaderboard row as a function of the validity threshold (labels = score > t), the run's threshold, and the
    best threshold for the Overall PRMScore over every distinct score (what a calibrated threshold would give).

    Only meaningful where the run's labels are ``score > threshold`` of its validity scores; otherwise
    ``{"applicable": False, "reason": ...}``.
    """
    run_threshold, reason = _run_threshold(steps, validity_threshold)
    if reason is not None:
        return {"applicable": False, "reason": reason}
    sweep = _Sweep(steps)
    if len(sweep.scores) == 0:
        return {"applicable": False, "reason": "no validity-scored step on a non-correct sample"}
    best = _best_threshold(sweep)
    curve = _distinct(np.concatenate((np.quantile(sweep.scores, np.linspace(0, 1, SWEEP_POINTS), method="lower"),
                                      [run_threshold, best])))
    rows = [_table_from_counts(c, classes_present) for c in sweep.counts(curve)]
    at = {float(t): row for t, row in zip(curve, rows)}
    return {
        "applicable": True,
        "run_threshold": run_threshold,
        "thresholds": curve.tolist(),
        "table": {column: [row[column] for row in rows] for column in metrics.TABLE_COLUMNS},
        "at_run_threshold": at[run_threshold],
        "best": {"threshold": best, "table": at[best]},
    }


# ---------------------------------------------------------------------------------------------------------------------
# Bootstrap intervals


def _tables_from_counts(counts: np.ndarray, classes_present) -> dict[str, np.ndarray]:
    """Leaderboard columns of R count tables (R, classes, 4) at once: the arithmetic of
    :func:`metrics.leaderboard_table` (PRMScore, MS by F1, clamp at 0, ×100, domain = mean of its classes)."""
    counts = counts.astype(np.float64)
    f1, nf1 = _f1_arrays(*np.moveaxis(counts, -1, 0))  # (R, classes)
    score = np.where(np.arange(counts.shape[1]) == _MS, f1, 0.5 * f1 + 0.5 * nf1)
    clamped = np.where(score > 0, 100.0 * score, 0.0)
    total = counts[:, [CLASS_ID[c] for c in ERROR_CLASSES]].sum(axis=1)
    tf1, tnf1 = _f1_arrays(*total.T)
    overall = 0.5 * tf1 + 0.5 * tnf1
    out = {"Overall": np.where(overall > 0, 100.0 * overall, 0.0)}
    for domain, members in DOMAINS.items():
        present = [c for c in members if c in classes_present]
        for cls in members:
            out[CLASS_ABBREVIATIONS[cls]] = clamped[:, CLASS_ID[cls]] if cls in classes_present else None
        out[domain] = np.mean([clamped[:, CLASS_ID[c]] for c in present], axis=0) if present else None
    return {column: out[column] for column in metrics.TABLE_COLUMNS}


#: The draws of the last (problems, seed, replicates) asked for: a training loop analyses the same set at every
#: evaluation, and score() draws them during the forwards (:func:`prepare_in_background`).
_WEIGHTS: dict[tuple[int, int, int], np.ndarray] = {}
_weights_lock = threading.Lock()


def _draw_weights(problems: int, seed: int, replicates: int) -> np.ndarray:
    """(replicates, problems) float64, read-only: how often each replicate drew each problem, drawing ``problems``
    problems uniformly with replacement (a multinomial, counted with one bincount: ~4x faster than numpy's multinomial
    at 6k problems)."""
    key = (problems, seed, replicates)
    with _weights_lock:  # a caller beside prepare_in_background's thread waits for its draws instead of repeating them
        if key not in _WEIGHTS:
            draws = np.random.default_rng(seed).integers(0, problems, size=(replicates, problems))
            draws += np.arange(replicates)[:, None] * problems
            weights = np.bincount(draws.ravel(), minlength=replicates * problems).reshape(replicates, problems)
            weights = weights.astype(np.float64)
            weights.flags.writeable = False
            _WEIGHTS.clear()
            _WEIGHTS[key] = weights
        return _WEIGHTS[key]


def _problems_with_errors(dataset: PRMBenchDataset) -> int:
    """The source problems the bootstrap resamples when every sample of ``dataset`` is scored: those of its
    non-correct samples."""
    arrays = dataset.arrays
    return len(_distinct(arrays.problem_ids[arrays.class_ids != CLASS_ID[CORRECT]]))


def bootstrap_intervals(dataset: PRMBenchDataset, report, *, seed: int, replicates: int) -> dict[str, Any]:
    """95% percentile intervals of every leaderboard column, resampling source problems (all variants of a problem
    together) with replacement, seeded."""
    positions = np.array([dataset.position[i] for i in report.sample_ids], dtype=np.int64)
    class_id = dataset.arrays.class_ids[positions]
    # The table depends on the non-correct samples only: a problem without one would be drawn for nothing.
    scored = class_id != CLASS_ID[CORRECT]
    positions, class_id = positions[scored], class_id[scored]
    counts = report.sample_counts.cpu().numpy()[scored, :4]
    # Problems numbered in source_idx order among the scored ones (the seeded draws depend on the numbering).
    _, problem = np.unique(dataset.arrays.problem_ids[positions], return_inverse=True)
    per_problem = np.zeros((problem.max(initial=-1) + 1, len(ALL_CLASSES), 4), dtype=np.int64)
    np.add.at(per_problem, (problem, class_id), counts)
    classes_present = [c for c in ERROR_CLASSES if c in report.official["hallucination_type_results"]["f1"]]
    columns = {}
    if len(per_problem) and replicates > 0:
        weights = _draw_weights(len(per_problem), seed, replicates)
        # Integer counts below 2**53: the float64 product is exact.
        resampled = weights @ per_problem.reshape(len(per_problem), -1).astype(np.float64)
        tables = _tables_from_counts(resampled.reshape(replicates, len(ALL_CLASSES), 4), classes_present)
        for column, values in tables.items():
            if values is not None:
                low, high = np.percentile(values, [2.5, 97.5])
                columns[column] = {"value": report.table[column], "low": float(low), "high": float(high)}
    return {"replicates": replicates, "seed": seed, "resampled": "source problems", "problems": len(per_problem),
            "columns": columns}


# ---------------------------------------------------------------------------------------------------------------------


#: Baselines per dataset object: a training loop analyses the same (subset) dataset at every evaluation.
_BASELINES: "weakref.WeakKeyDictionary[PRMBenchDataset, dict]" = weakref.WeakKeyDictionary()
_baselines_lock = threading.Lock()


def trivial_baselines(dataset: PRMBenchDataset) -> dict[str, dict[str, float | None]]:
    """The leaderboard rows of the all-positive and all-negative predictors on this data, by the evaluator."""
    with _baselines_lock:  # as _draw_weights: a second caller waits for the first one's rows
        if dataset not in _BASELINES:
            from .evaluate import evaluate  # here: evaluate.py may import this module

            step_counts = torch.from_numpy(dataset.arrays.step_counts)
            cu_steps = torch.zeros(len(dataset) + 1, dtype=torch.int32)
            cu_steps[1:] = step_counts.cumsum(0)
            rows = {}
            for name, label in (("all_positive", True), ("all_negative", False)):
                preds = StepPredictions(torch.arange(len(dataset)), cu_steps, torch.full((int(cu_steps[-1]),), label))
                rows[name] = evaluate(dataset, preds).table
            _BASELINES[dataset] = rows
        baselines = _BASELINES[dataset]
    return {name: dict(row) for name, row in baselines.items()}


def prepare_in_background(dataset: PRMBenchDataset, device: torch.device) -> None:
    """Do, on a daemon thread, what :func:`analyze` would do first after the last forward and needs the data only:
    the first-use imports of numpy.random (the bootstrap) and numpy.ma (numpy's quantile), ~25 ms; the bootstrap's
    draws for the whole set, ~15 ms; and, when the model is not on the CPU, the trivial baselines, ~25 ms (they run
    the evaluator in torch with one intra-op thread, :mod:`prmbench_fast.host_threads`, which on a CPU run would take
    threads from the forwards). score() calls this once the first forward of a run folder's run is queued."""
    threading.Thread(target=_prepare, args=(dataset, device.type != "cpu"), name="prmbench-analysis-prepare",
                     daemon=True).start()


def _prepare(dataset: PRMBenchDataset, baselines: bool) -> None:
    import numpy.ma  # noqa: F401
    import numpy.random  # noqa: F401

    try:
        dataset.position  # noqa: B018 the id -> position table the bootstrap reads, ~3 ms to build
        _draw_weights(_problems_with_errors(dataset), BOOTSTRAP_SEED, BOOTSTRAP_REPLICATES)
        if baselines:
            trivial_baselines(dataset)
    except Exception:  # noqa: BLE001 only a head start: analyze() computes what is missing and raises there
        pass


def analyze(
    dataset: PRMBenchDataset,
    report,
    *,
    seed: int = BOOTSTRAP_SEED,
    bootstrap: int = BOOTSTRAP_REPLICATES,
    validity_threshold: float | None = None,
) -> dict[str, Any]:
    """Every analysis of a run (module docstring), as a JSON-ready dict.

    Args:
        dataset: the evaluation set the report was computed on.
        report: a :class:`~prmbench_fast.evaluate.Report` with ``step_predictions``.
        seed, bootstrap: seed and number of bootstrap replicates of the intervals.
        validity_threshold: the run's threshold (default ``report.run["validity_threshold"]`` when recorded); used for
            the sweep's run point when it reproduces the labels, else the threshold the labels imply.
    """
    if getattr(report, "step_predictions", None) is None:  # a BoN report has none: these analyses are PRMBench's
        raise ValueError("analyze() needs a PRMBench report with its flat predictions (report.step_predictions)")
    if validity_threshold is None:
        validity_threshold = report.run.get("validity_threshold")
    steps = _steps(dataset, report.step_predictions)
    classes_present = [c for c in ERROR_CLASSES if c in report.official["hallucination_type_results"]["f1"]]
    return {
        "error_step_recall_by_position": error_step_recall_by_position(steps),
        "auroc": auroc(steps),
        "threshold_sweep": threshold_sweep(steps, classes_present, validity_threshold),
        "positive_bias": positive_bias(steps, report.official),
        "score_histograms": score_histograms(steps),
        "intervals": bootstrap_intervals(dataset, report, seed=seed, replicates=bootstrap),
        "error_position_distribution": error_position_distribution(dataset),
        "baselines": trivial_baselines(dataset),
    }


# ---------------------------------------------------------------------------------------------------------------------
# ProcessBench calibration

#: The split published PRM evaluations pick the threshold on (ProcessBench issue #3; Skywork), then apply to all.
CALIBRATION_SPLIT = "gsm8k"


def _match_intervals(dataset, preds: StepPredictions) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per dataset sample, the thresholds t at which its prediction (the first step with score <= t, -1 if none)
    equals its label, as a half-open interval [low, high); low == high: never (no prediction, an invalid one, or a
    label no threshold reaches). Returns (low, high, has_prediction), float64 / bool arrays of the dataset's length.

    With pm_k = min(s_0..s_k) (non-increasing), the first step with s_k <= t is the first k with pm_k <= t, so the
    prediction is #{k : pm_k > t} (-1 when that is every step). It equals a label L >= 0 exactly when
    pm_L <= t < pm_{L-1} (pm_{-1} = +inf), and -1 exactly when t < pm_last.
    """
    preds = preds.to("cpu")
    n = len(dataset)
    low, high = np.zeros(n), np.zeros(n)
    predicted = np.zeros(n, dtype=bool)
    sample_pos = preds.sample_pos.numpy()
    _, first = np.unique(sample_pos, return_index=True)  # a repeated sample: the first prediction wins
    valid = preds.valid.numpy() if preds.valid is not None else np.ones(len(sample_pos), dtype=bool)
    scores = preds.validity_scores.double().numpy()
    cu = preds.cu_steps.numpy().astype(np.int64)
    labels = np.array([s.label for s in dataset.samples], dtype=np.int64)
    for b in first:
        pos = sample_pos[b]
        predicted[pos] = True
        if not valid[b]:
            continue
        pm = np.minimum.accumulate(scores[cu[b]:cu[b + 1]])
        label = labels[pos]
        if label == -1:
            low[pos], high[pos] = -np.inf, (pm[-1] if len(pm) else np.inf)
        elif label < len(pm):
            low[pos], high[pos] = pm[label], (pm[label - 1] if label > 0 else np.inf)
    return low, high, predicted


def _split_f1(low, high, is_error, thresholds):
    """(error_acc, correct_acc, f1) arrays over ``thresholds`` for one split, by the evaluator's formulas."""
    from .tasks.processbench import _accuracy, _f1

    def matches(sel):
        # Intervals with low <= high: #(low <= t) - #(high <= t) of them contain t (an empty one counts in both).
        lo, hi = np.sort(low[sel]), np.sort(high[sel])
        return np.searchsorted(lo, thresholds, side="right") - np.searchsorted(hi, thresholds, side="right")

    n_err, n_cor = int(is_error.sum()), int((~is_error).sum())
    error_acc = [_accuracy(int(m), n_err) for m in matches(is_error)]
    correct_acc = [_accuracy(int(m), n_cor) for m in matches(~is_error)]
    return error_acc, correct_acc, [_f1(a, c) for a, c in zip(error_acc, correct_acc)]


def _best(f1: list[float]) -> int:
    """The index of the best F1 (NaN counts as the worst; the lowest of equal thresholds)."""
    values = np.array([v if v == v else -np.inf for v in f1])
    return int(np.argmax(values))


def processbench_calibration(dataset, preds: StepPredictions, *, validity_threshold: float | None = None,
                             calibrate_on: str = CALIBRATION_SPLIT) -> dict[str, Any]:
    """ProcessBench F1 per split as a function of the validity threshold (prediction = the first step whose score is
    not above it), each split's own best threshold, and the threshold that is best on ``calibrate_on`` (gsm8k, as
    published PRM evaluations choose it; the first split evaluated when absent) applied to every split.

    Counted exactly as :func:`prmbench_fast.tasks.processbench.evaluate_processbench` counts: the splits that have a
    prediction, their samples without one (or with an invalid one) never matching. Only meaningful where the labels
    are ``score > threshold`` of the validity scores; otherwise ``{"applicable": False, "reason": ...}``.

    Returns (JSON-ready; NaN F1s as None): ``run_threshold``, ``thresholds`` (the curve's points: score quantiles, the
    run's and the calibrated threshold), ``f1`` (split -> F1 per point), ``average_f1`` per point, ``best`` (split ->
    its own best threshold and F1), ``calibrated`` (``split``, ``threshold``, ``f1`` per split, ``average_f1``).
    """
    if preds.validity_scores is None:
        return {"applicable": False, "reason": "the predictions carry no validity scores"}
    cu = preds.cu_steps.cpu().numpy().astype(np.int64)
    keep = np.ones(preds.num_samples, dtype=bool) if preds.valid is None else preds.valid.cpu().numpy()
    step_keep = np.repeat(keep, np.diff(cu))
    scores = preds.validity_scores.double().cpu().numpy()[step_keep]
    run_threshold, reason = _labels_threshold(scores, preds.validity_labels.cpu().numpy()[step_keep],
                                              validity_threshold)
    if reason is not None:
        return {"applicable": False, "reason": reason}
    low, high, predicted = _match_intervals(dataset, preds)
    split_of = np.array([s.split for s in dataset.samples])
    is_error = np.array([s.label != -1 for s in dataset.samples])
    splits = [s for s in dataset.splits if predicted[split_of == s].any()]
    finite = _distinct(scores[np.isfinite(scores)])
    if len(finite) == 0:
        return {"applicable": False, "reason": "no finite validity score"}
    # F1 changes only at scores (every interval's ends are scores or infinite, closed below): one candidate per
    # distinct score and one below them all (no step wrong) cover every value it takes.
    candidates = np.concatenate(([np.nextafter(finite[0], -np.inf)], finite))

    def curves(thresholds):
        return {s: _split_f1(low[split_of == s], high[split_of == s], is_error[split_of == s], thresholds)[2]
                for s in splits}

    on_candidates = curves(candidates)
    best = {s: {"threshold": float(candidates[k]), "f1": on_candidates[s][k]}
            for s in splits for k in [_best(on_candidates[s])]}
    chosen = calibrate_on if calibrate_on in splits else splits[0]
    calibrated = best[chosen]["threshold"]
    points = _distinct(np.concatenate((np.quantile(finite, np.linspace(0, 1, SWEEP_POINTS), method="lower"),
                                       [run_threshold, calibrated])))
    f1 = curves(points)
    average = [sum(f1[s][k] for s in splits) / len(splits) for k in range(len(points))]
    at = int(np.searchsorted(points, calibrated))

    def finite_or_none(value):
        return value if value == value else None

    return {
        "applicable": True,
        "run_threshold": run_threshold,
        "thresholds": points.tolist(),
        "f1": {s: [finite_or_none(v) for v in f1[s]] for s in splits},
        "average_f1": [finite_or_none(v) for v in average],
        "best": {s: {"threshold": b["threshold"], "f1": finite_or_none(b["f1"])} for s, b in best.items()},
        "calibrated": {"split": chosen, "threshold": calibrated,
                       "f1": {s: finite_or_none(f1[s][at]) for s in splits},
                       "average_f1": finite_or_none(average[at])},
    }
