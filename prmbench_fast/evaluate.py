"""``evaluate()``: the official PRMBench evaluator, with the step comparison done by the compiled counting op.

Semantics (SPEC §2): the first prediction per sample id wins and ids outside the data are ignored; predictions with a
false ``validity`` flag contribute nothing but lower the validity rate; the correct samples are processed first and
feed only their own class and the similarity metric; the labels a prediction emits drive the scoring (never the
step count); on ``redundency``/``circular`` a prediction with redundancy labels is scored by NOT(redundancy label).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping

import numpy as np
import torch

from . import metrics
from .classes import ALL_CLASSES, CLASS_ID, CORRECT, REDUNDANCY_CLASSES
from .data import PRMBenchDataset, Sample
from .ops import step_confusion

VALIDITY_LABELS = "step_level_validity_labels"
VALIDITY_SCORES = "step_level_validity_scores"
REDUNDANCY_LABELS = "step_level_redundancy_labels"
REDUNDANCY_SCORES = "step_level_redundancy_scores"
# Labels travel to the op as 0.0/1.0 with this threshold, so labels and raw scores share one float64 buffer.
LABEL_THRESHOLD = 0.5


class PredictionError(ValueError):
    """A prediction the evaluator cannot score; the message names the sample id and the field."""


@dataclasses.dataclass
class Report:
    """The result of :func:`evaluate`.

    Attributes:
        official: the official ``evaluate_function`` result without ``detailed_logs``:
            ``total_hallucination_results``, ``hallucination_type_results``, ``validitiy_rate`` (sic).
        table: the leaderboard row (×100, full precision): Overall, NR, NCL, S1, ES, SC, DC, CI, S2, PS, DR, MS, S3.
        diagnostics: what was not scored and why (missing ids, invalid predictions, label/step count mismatches…).
        sample_ids: the scored samples, in official processing order (rows of ``sample_counts``).
        sample_counts: (B, 6) int64 per scored sample: TP, FP, TN, FN, positive labels, first-error hit (-1 none).
        class_counts: (10, 4) int64 TP, FP, TN, FN per class, rows in ``prmbench_fast.classes.ALL_CLASSES`` order.
        label_counts: (B,) int64 number of labels of each scored sample.
        run: for reports made by ``score()``: throughput and truncation figures of the run (empty otherwise).
        predictions: for reports made by ``score()``: every sample's result in the official format (empty otherwise).
    """

    official: dict[str, Any]
    table: dict[str, float | None]
    diagnostics: dict[str, Any]
    sample_ids: list[str]
    sample_counts: torch.Tensor
    class_counts: torch.Tensor
    label_counts: torch.Tensor
    run: dict[str, Any] = dataclasses.field(default_factory=dict)
    predictions: dict[str, Any] = dataclasses.field(default_factory=dict)

    def sample_results(self) -> dict[str, dict[str, Any]]:
        """Per-sample figures as the official ``detailed_logs[i]["results"]`` gives them (lists left out)."""
        out = {}
        counts = self.sample_counts.tolist()
        for sample_id, n_labels, (tp, fp, tn, fn, positive, first_error) in zip(
            self.sample_ids, self.label_counts.tolist(), counts
        ):
            out[sample_id] = {
                "correct_step_acc": metrics.ratio(tp, tp + fn),
                "wrong_step_acc": metrics.ratio(tn, tn + fp),
                "total_step_acc": metrics.ratio(tp + tn, n_labels),
                "first_error_acc": None if first_error < 0 else first_error,
                "model_response_acc": metrics.ratio(positive, n_labels),
                "f1_matrix": {"TP": tp, "FP": fp, "TN": tn, "FN": fn},
            }
        return out

    def format_table(self) -> str:
        return metrics.format_table(self.table)


@dataclasses.dataclass
class _Scored:
    """Valid predictions flattened into the op's inputs (one bucket: the correct samples, or the others).

    Almost every prediction's values are its validity labels (threshold ``LABEL_THRESHOLD``); the others are listed
    in ``other_sources`` (sample index in the bucket -> (threshold, field)), which keeps the hot loop to a few appends.
    """

    positions: list[int] = dataclasses.field(default_factory=list)  # dataset positions of the samples
    step_values: list = dataclasses.field(default_factory=list)  # flat labels (0/1) and scores
    label_offsets: list[int] = dataclasses.field(default_factory=lambda: [0])
    other_sources: dict[int, tuple[float, str]] = dataclasses.field(default_factory=dict)

    def then(self, other: "_Scored") -> "_Scored":
        """This bucket followed by ``other``, offsets and indices shifted."""
        shift, count = len(self.step_values), len(self.positions)
        return _Scored(
            self.positions + other.positions,
            self.step_values + other.step_values,
            self.label_offsets + [o + shift for o in other.label_offsets[1:]],
            {**self.other_sources, **{i + count: v for i, v in other.other_sources.items()}},
        )

    def source(self, index: int) -> tuple[float, str]:
        """(threshold, field) of the ``index``-th sample's values."""
        return self.other_sources.get(index, (LABEL_THRESHOLD, VALIDITY_LABELS))


@dataclasses.dataclass
class _Collected:
    scored: _Scored  # valid predictions, correct samples first (official processing order)
    num_correct_valid: int
    num_correct_predictions: int  # valid or not: the validity-rate denominator subtracts these
    num_other_valid: int
    predicted: np.ndarray  # bool per dataset position: a prediction was kept for it
    invalid_ids: list[str]
    unknown_ids: list[str]
    duplicates: int


def _is_mapping(value: Any) -> bool:
    # `type(...) is dict` first: isinstance against the Mapping ABC costs microseconds per call on this hot path.
    return type(value) is dict or isinstance(value, Mapping)


def _collect(dataset: PRMBenchDataset, predictions, validity_threshold: float, redundancy_threshold: float) -> _Collected:
    """One pass over the predictions: pair with samples (first result per id wins, unknown ids dropped), split valid
    from invalid, and flatten each valid prediction's scored values into the bucket of its sample kind.

    ``predictions`` is a mapping ``sample id -> result`` or an iterable of result dicts carrying ``idx``. A result is
    the official ``{"scores": {...}, "validity": bool}`` (``validity`` optional); a bare scores dict is accepted too.
    """
    if _is_mapping(predictions):
        items: Iterable[tuple[Any, Any]] = predictions.items()
    else:
        results = list(predictions)
        try:
            ids = [r["idx"] for r in results]
        except (TypeError, KeyError, IndexError):
            ids = [_result_id(r, i) for i, r in enumerate(results)]  # raises, naming the bad entry
        items = zip(ids, results)
    position, samples = dataset.position, dataset.samples
    is_correct, redundancy_rule = dataset.arrays.is_correct, dataset.arrays.redundancy_rule
    correct, others = _Scored(), _Scored()
    taken = bytearray(len(samples))  # 1 where a prediction was kept: the first result per id wins
    unknown: list[str] = []
    invalid: list[str] = []
    duplicates = num_correct_predictions = 0
    for sample_id, result in items:
        where = position.get(sample_id)
        if where is None:
            unknown.append(sample_id)
            continue
        if taken[where]:
            duplicates += 1
            continue
        if type(result) is not dict and not isinstance(result, Mapping):
            raise PredictionError(f"prediction for sample {sample_id!r}: expected a dict, got {type(result).__name__}")
        taken[where] = 1
        num_correct_predictions += is_correct[where]
        if "validity" in result and not result["validity"]:
            invalid.append(sample_id)
            continue
        scores = result.get("scores", result) if type(result) is dict else _scores_of(samples[where], result)
        step_values = scores.get(VALIDITY_LABELS) if type(scores) is dict else None
        bucket = correct if is_correct[where] else others
        # Fast path (almost every prediction): validity labels as a list, on a class without the redundancy rule.
        if type(step_values) is not list or (redundancy_rule[where] and REDUNDANCY_LABELS in scores):
            sample = samples[where]
            step_values, threshold, field = _step_values(
                sample, _scores_of(sample, result), validity_threshold, redundancy_threshold
            )
            bucket.other_sources[len(bucket.positions)] = (threshold, field)
        values = bucket.step_values
        values.extend(step_values)
        bucket.label_offsets.append(len(values))
        bucket.positions.append(where)
    predicted = np.frombuffer(bytes(taken), dtype=np.uint8).astype(bool)
    return _Collected(
        scored=correct.then(others),
        num_correct_valid=len(correct.positions),
        num_correct_predictions=num_correct_predictions,
        num_other_valid=len(others.positions),
        predicted=predicted,
        invalid_ids=invalid,
        unknown_ids=unknown,
        duplicates=duplicates,
    )


def _result_id(result: Any, position: int) -> str:
    if not _is_mapping(result) or "idx" not in result:
        raise PredictionError(f"prediction #{position}: a result in a list must be a dict with an 'idx' field")
    return result["idx"]


def _scores_of(sample: Sample, result: Mapping) -> Mapping:
    scores = result["scores"] if "scores" in result else result
    if not _is_mapping(scores):
        raise PredictionError(f"prediction for sample {sample.id!r}, field 'scores': expected a dict")
    return scores


def _step_values(sample: Sample, scores: Mapping, validity_threshold: float, redundancy_threshold: float):
    """The values the official evaluator scores for this sample: (values, threshold, field name)."""
    if sample.classification in REDUNDANCY_CLASSES:
        if REDUNDANCY_LABELS in scores:
            return [not label for label in _list(sample, scores, REDUNDANCY_LABELS)], LABEL_THRESHOLD, REDUNDANCY_LABELS
        if VALIDITY_LABELS not in scores and REDUNDANCY_SCORES in scores:
            # Scores only: label them as the adapters do (redundant = score > threshold), then invert.
            values = _list(sample, scores, REDUNDANCY_SCORES)
            _check_numbers(sample, REDUNDANCY_SCORES, values)
            return [not (v > redundancy_threshold) for v in values], LABEL_THRESHOLD, REDUNDANCY_SCORES
    if VALIDITY_LABELS in scores:
        return _list(sample, scores, VALIDITY_LABELS), LABEL_THRESHOLD, VALIDITY_LABELS
    if VALIDITY_SCORES in scores:
        return _list(sample, scores, VALIDITY_SCORES), validity_threshold, VALIDITY_SCORES
    raise PredictionError(
        f"prediction for sample {sample.id!r}, field 'scores': has neither {VALIDITY_LABELS!r} nor {VALIDITY_SCORES!r}"
    )


def _list(sample: Sample, scores: Mapping, field: str) -> list:
    values = scores[field]
    if not isinstance(values, (list, tuple)):
        raise PredictionError(f"prediction for sample {sample.id!r}, field {field!r}: expected a list")
    return values


def _check_numbers(sample: Sample, field: str, values) -> None:
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
            raise PredictionError(f"prediction for sample {sample.id!r}, field {field!r}[{i}]: not a number: {v!r}")


def _values_tensor(dataset: PRMBenchDataset, scored: _Scored) -> torch.Tensor:
    """The flat float64 values, checked: labels must be 0/1 (booleans), scores real numbers."""
    try:
        # Labels are Python bools: bytes() packs them 4x faster than np.array(..., float64). It accepts only ints in
        # [0, 255], so any float, None or large value falls back to the general conversion (same values either way).
        array = np.frombuffer(bytes(scored.step_values), dtype=np.uint8).astype(np.float64)
    except (TypeError, ValueError):
        try:
            array = np.array(scored.step_values, dtype=np.float64)
        except (TypeError, ValueError):
            array = None
    is_label = np.ones(len(scored.positions), dtype=bool)
    for index, (_, field) in scored.other_sources.items():
        is_label[index] = field.endswith("labels")
    is_label = np.repeat(is_label, np.diff(scored.label_offsets))
    if array is None or not np.all(np.where(is_label, (array == 0) | (array == 1), array == array)):
        _raise_for_bad_value(dataset, scored)
    return torch.from_numpy(array)


def _thresholds(scored: _Scored) -> torch.Tensor:
    thresholds = torch.full((len(scored.positions),), LABEL_THRESHOLD, dtype=torch.float64)
    for index, (threshold, _) in scored.other_sources.items():
        thresholds[index] = threshold
    return thresholds


def _raise_for_bad_value(dataset: PRMBenchDataset, scored: _Scored) -> None:
    offsets = scored.label_offsets
    for index, where in enumerate(scored.positions):
        sample, field = dataset.samples[where], scored.source(index)[1]
        for i, v in enumerate(scored.step_values[offsets[index]:offsets[index + 1]]):
            if field.endswith("labels"):
                if not (isinstance(v, (bool, int, float)) and v in (0, 1)):
                    raise PredictionError(
                        f"prediction for sample {sample.id!r}, field {field!r}[{i}]: a label must be true/false (or 0/1), got {v!r}"
                    )
            elif isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
                raise PredictionError(f"prediction for sample {sample.id!r}, field {field!r}[{i}]: not a number: {v!r}")
    raise AssertionError("unreachable: a bad value was detected but not located")


def evaluate(
    dataset: PRMBenchDataset,
    predictions,
    *,
    validity_threshold: float = 0.5,
    redundancy_threshold: float = 0.15,
    backend: str = "auto",
) -> Report:
    """Score predictions exactly as the official PRMBench evaluator does.

    Args:
        dataset: the evaluation set from :func:`prmbench_fast.load_prmbench` (or a subset of it).
        predictions: ``sample id -> result`` or an iterable of result dicts with ``idx`` (official result lines).
            A result holds ``scores`` with ``step_level_validity_labels`` and/or ``step_level_validity_scores``
            (labelled ``score > validity_threshold`` when no labels are given), optionally
            ``step_level_redundancy_labels``/``_scores`` (redundant = ``score > redundancy_threshold``), and an
            optional ``validity`` flag (false: an invalid prediction, e.g. an unparseable critic answer).
        validity_threshold, redundancy_threshold: used only for predictions that carry scores but no labels.
        backend: the counting op's backend: "auto" (compiled op on the tensors' device), "cpu", "cuda" or "torch".

    Returns:
        A :class:`Report`; ``report.official`` equals the official ``evaluate_function`` output (counts exactly,
        ratios to the last bit) minus its ``detailed_logs``.
    """
    collected = _collect(dataset, predictions, validity_threshold, redundancy_threshold)
    scored = collected.scored
    arrays = dataset.arrays
    scored_positions = np.array(scored.positions, dtype=np.int64)
    error_steps, error_offsets = arrays.gather_errors(scored_positions)
    cu_labels = torch.tensor(scored.label_offsets, dtype=torch.int64)
    class_counts, sample_counts = step_confusion(
        _values_tensor(dataset, scored),
        _thresholds(scored),
        cu_labels,
        torch.from_numpy(error_steps),
        torch.from_numpy(error_offsets),
        torch.from_numpy(arrays.class_ids[scored_positions]),
        len(ALL_CLASSES),
        backend=backend,
    )
    label_counts = cu_labels[1:] - cu_labels[:-1]
    official = _official_result(
        dataset, scored, class_counts, sample_counts, label_counts, num_correct_valid=collected.num_correct_valid,
        total_num=len(dataset) - collected.num_correct_predictions, valid_num=collected.num_other_valid,
    )
    return Report(
        official=official,
        table=metrics.leaderboard_table(official),
        diagnostics=_diagnostics(dataset, collected, scored_positions, label_counts),
        sample_ids=[dataset.samples[p].id for p in scored.positions],
        sample_counts=sample_counts,
        class_counts=class_counts,
        label_counts=label_counts,
    )


def _official_result(dataset, scored, class_counts, sample_counts, label_counts, *, num_correct_valid, total_num, valid_num):
    classes_present = dataset.classes
    counts = sample_counts.cpu().numpy()
    class_of = dataset.arrays.class_ids[np.array(scored.positions, dtype=np.int64)]
    first_error = counts[:, 5]

    # model_response_acc = sum(labels) / len(labels), -1 without labels. float64 division of exact integers is
    # correctly rounded, as Python's int / int is, so the values are the official ones bit for bit.
    n_labels = label_counts.cpu().numpy()
    response_acc = np.where(n_labels > 0, counts[:, 4] / np.maximum(n_labels, 1), -1.0)
    # One spare nan slot at the end: a partner position of -1 (partner not in the dataset) reads it.
    partner_acc = np.full(len(dataset) + 1, np.nan)
    scored_positions = np.array(scored.positions, dtype=np.int64)
    partner_acc[scored_positions[:num_correct_valid]] = response_acc[:num_correct_valid]
    others = slice(num_correct_valid, None)
    partner = partner_acc[dataset.arrays.partner_position[scored_positions[others]]]
    # Official truthiness test: a missing partner (nan here) or one of exactly 0.0 drops the pair; -1 is kept.
    paired = ~np.isnan(partner) & (partner != 0) & (response_acc[others] != -1)
    similarity_values = np.abs(response_acc[others] - partner)
    other_class = class_of[others]
    # Python's sequential sum over lists in processing order, as the official mean is taken.
    similarity = {c: similarity_values[paired & (other_class == CLASS_ID[c])].tolist() for c in classes_present}
    total_similarity = similarity_values[paired].tolist()

    table = class_counts.cpu().tolist()
    per_class: dict[str, dict[str, float]] = {m: {} for m in metrics.STEP_METRICS + metrics.F1_METRICS}
    for cls in classes_present:
        cid = CLASS_ID[cls]
        of_class = first_error[class_of == cid]
        values = {
            **metrics.step_metrics(*table[cid], int((of_class == 1).sum()), int((of_class >= 0).sum()), similarity[cls]),
            **metrics.f1_metrics(*table[cid]),
        }
        for name, value in values.items():
            per_class[name][cls] = value

    # Totals pool every class but `correct` (multi_solutions included).
    of_errors = first_error[class_of != CLASS_ID[CORRECT]]
    tp, fp, tn, fn = (sum(row[k] for cid, row in enumerate(table) if ALL_CLASSES[cid] != CORRECT) for k in range(4))
    totals = {
        **metrics.step_metrics(tp, fp, tn, fn, int((of_errors == 1).sum()), int((of_errors >= 0).sum()), total_similarity),
        **metrics.f1_metrics(tp, fp, tn, fn),
    }
    return {
        "total_hallucination_results": totals,
        "hallucination_type_results": per_class,
        "validitiy_rate": metrics.ratio(valid_num, total_num),
    }


def _diagnostics(dataset, collected: _Collected, scored_positions, label_counts) -> dict[str, Any]:
    arrays = dataset.arrays
    step_counts = arrays.step_counts[scored_positions]
    first_errors = arrays.first_error[scored_positions]
    n_labels = label_counts.cpu().numpy()
    short = n_labels < step_counts
    long = n_labels > step_counts
    return {
        "samples": len(dataset),
        "predictions_used": int(collected.predicted.sum()),
        "missing_ids": [dataset.samples[i].id for i in np.flatnonzero(~collected.predicted).tolist()],
        "unknown_prediction_ids": collected.unknown_ids,
        "duplicate_predictions": collected.duplicates,
        "invalid_predictions": collected.invalid_ids,
        "samples_with_fewer_labels_than_steps": int(short.sum()),
        "steps_left_unscored": int((step_counts - n_labels)[short].sum()),
        "samples_with_more_labels_than_steps": int(long.sum()),
        "extra_labels": int((n_labels - step_counts)[long].sum()),
        # An in-range first error step that got no label (the prediction stopped before it).
        "first_errors_left_unscored": int(((first_errors >= n_labels) & (first_errors < step_counts)).sum()),
        "data": dataset.diagnostics.summary(),
    }
