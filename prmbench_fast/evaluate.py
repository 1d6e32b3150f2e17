"""``evaluate()``: the official PRMBench evaluator, with the step comparison done by the compiled counting op.

Semantics (SPEC §2): the first prediction per sample wins and ids outside the data are ignored; predictions with a
false ``validity`` flag contribute nothing but lower the validity rate; the correct samples are processed first and
feed only their own class and the similarity metric; the labels a prediction emits drive the scoring (never the
step count); on ``redundency``/``circular`` a prediction with redundancy labels is scored by NOT(redundancy label).

The evaluator's native input is the flat predictions layout (``prmbench_fast.predictions``): :func:`evaluate_steps`
scores it on its device with one call of the counting op; :func:`evaluate` also takes official result dicts, which it
parses into that layout first.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
import weakref
from typing import Any

import numpy as np
import torch

from . import ratios as metrics
from . import task_lookup
from .classes import ALL_CLASSES, CLASS_ID, CORRECT
from .data import PRMBenchDataset
from .host_threads import single_threaded
from .ops import step_confusion
from .predictions import PredictionError, StepPredictions, ThresholdWarning, check_predictions_argument, parse_results

#: The validity-rate denominators (SPEC §2.5): the main task subtracts the correct samples' predictions from the number
#: of samples; the subset400 task's copy of the evaluator does not.
VALIDITY_DENOMINATORS = ("non_correct", "all_samples")

#: The counting op gets one extra class row: predictions that are not scored (a repeated sample, an invalid
#: prediction) are counted there and the row is dropped, so the op runs once over the predictions as given.
_UNSCORED_CLASS = len(ALL_CLASSES)

__all__ = ["PredictionError", "Report", "evaluate", "evaluate_steps"]


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
        step_predictions: the flat predictions the report was computed from (on their device).
        analysis: the analyses of ``prmbench_fast.analysis`` when computed (None otherwise).
        predictions: every sample's result in the official format (built from ``step_predictions`` on first use).
        task: the task whose evaluator rule made the report ("prmbench" or "subset400").
    """

    official: dict[str, Any]
    table: dict[str, float | None]
    diagnostics: dict[str, Any]
    sample_ids: list[str]
    sample_counts: torch.Tensor
    class_counts: torch.Tensor
    label_counts: torch.Tensor
    run: dict[str, Any] = dataclasses.field(default_factory=dict)
    step_predictions: StepPredictions | None = dataclasses.field(default=None, repr=False)
    analysis: dict[str, Any] | None = None
    task: str = "prmbench"
    dataset: PRMBenchDataset | None = dataclasses.field(default=None, repr=False, compare=False)
    _results: dict[str, Any] | None = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def predictions(self) -> dict[str, Any]:
        """``sample id -> official result dict`` of every prediction (first per sample), in prediction order."""
        if self._results is None:
            if self.step_predictions is None or self.dataset is None:
                return {}
            ids = [s.id for s in self.dataset.samples]
            results = self.step_predictions.to_results(ids)
            self._results = {}
            for result in results:
                self._results.setdefault(result["idx"], result)
        return self._results

    @predictions.setter
    def predictions(self, results: dict[str, Any]) -> None:
        self._results = results

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

    def to_json(self) -> dict[str, Any]:
        """What a run folder's report.json holds."""
        return {"task": self.task, "official": self.official, "table": self.table, "diagnostics": self.diagnostics,
                "run": self.run, "analysis": self.analysis}


def evaluate(
    dataset: PRMBenchDataset,
    predictions,
    *,
    validity_threshold: float = 0.5,
    redundancy_threshold: float = 0.15,
    backend: str = "auto",
    task: str = "prmbench",
    validity_denominator: str = "non_correct",
    keep_scores: bool = False,
    **task_options: Any,
):
    """Score predictions exactly as the official PRMBench evaluator does.

    Args:
        dataset: the evaluation set from :func:`prmbench_fast.load_prmbench` (or a subset of it).
        predictions: a :class:`~prmbench_fast.predictions.StepPredictions` (the flat layout, on any device), or
            official results: ``sample id -> result`` or an iterable of result dicts with ``idx`` (result lines).
            A result holds ``scores`` with ``step_level_validity_labels`` and/or ``step_level_validity_scores``
            (labelled ``score > validity_threshold`` when no labels are given), optionally
            ``step_level_redundancy_labels``/``_scores`` (redundant = ``score > redundancy_threshold``), and an
            optional ``validity`` flag (false: an invalid prediction, e.g. an unparseable critic answer).
        validity_threshold, redundancy_threshold: used only for results that carry scores but no labels.
        backend: the counting op's backend: "auto" (compiled op on the tensors' device), "cpu", "cuda" or "torch".
        task: "prmbench" (the main task), or another task of ``prmbench_fast.tasks`` ("subset400", "bon",
            "processbench"), whose own evaluator then scores the predictions (``dataset`` must come from
            ``load_prmbench(task=...)``) with the options above that it takes (its ``evaluate_options``: the
            thresholds for "processbench"; none for "bon") and ``task_options`` (e.g. ``seed=`` for "bon").
        validity_denominator: "non_correct" (the main task: samples minus the correct samples' predictions) or
            "all_samples" (the subset400 task's evaluator).
        keep_scores: keep the step scores of result dicts that also carry labels in ``report.step_predictions``
            (what :func:`prmbench_fast.analysis.analyze` reads). The evaluator itself never reads them.

    Returns:
        A :class:`Report`; ``report.official`` equals the official ``evaluate_function`` output (counts exactly,
        ratios to the last bit) minus its ``detailed_logs``. The "bon" task returns its own report.

    Raises:
        PredictionError: a malformed prediction (the message names the sample, field and index), no predictions, or
            none that matches a sample of the dataset.
    """
    check_predictions_argument(predictions)
    if task != "prmbench":  # another task's evaluator, from the task registry (above this module)
        other = task_lookup.get_task(task)
        given = {"validity_threshold": validity_threshold, "redundancy_threshold": redundancy_threshold,
                 "backend": backend, "validity_denominator": validity_denominator, "keep_scores": keep_scores}
        options = {name: value for name, value in given.items() if name in other.evaluate_options}
        return other.evaluate(dataset, predictions, **options, **task_options)
    if task_options:
        raise TypeError(f"evaluate() got unexpected options {sorted(task_options)}")
    task_lookup.check_task_dataset(task, dataset)
    thresholds = {"validity_threshold": validity_threshold, "redundancy_threshold": redundancy_threshold}
    for name, value in thresholds.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    if isinstance(predictions, StepPredictions):
        return evaluate_steps(dataset, predictions, backend=backend, validity_denominator=validity_denominator)
    # One single-threaded block for the parse and the counting, which would each set torch's thread count and put it
    # back (~0.3 ms a call on a busy host): result dicts are parsed in Python, at far fewer steps than threads pay
    # for (prmbench_fast.host_threads).
    with single_threaded("cpu"):
        parsed = parse_results(dataset, predictions, validity_threshold=validity_threshold,
                               redundancy_threshold=redundancy_threshold, keep_scores=keep_scores)
        _warn_if_one_sided(parsed.labelled_ranges, thresholds)
        if parsed.predictions.num_samples == 0:
            unknown = parsed.unknown_ids
            if not unknown:
                raise PredictionError("no predictions: nothing to evaluate")
            raise PredictionError(
                f"none of the {len(unknown)} predictions matches a sample of the data ({len(unknown)} unknown ids, "
                f"e.g. {unknown[0]!r}): are the predictions for this data set?"
            )
        return evaluate_steps(dataset, parsed.predictions, backend=backend, unknown_ids=parsed.unknown_ids,
                              duplicates=parsed.duplicates, validity_denominator=validity_denominator)


def _warn_if_one_sided(labelled_ranges: dict[str, tuple[float, float]], thresholds: dict[str, float]) -> None:
    """A :class:`ThresholdWarning` for each threshold that gave every score it labelled the same label: a threshold
    on another scale than the scores (5.0 for probabilities) silently makes a one-sided predictor."""
    for name, (low, high) in labelled_ranges.items():
        threshold = thresholds[name]
        if low <= threshold < high:
            continue
        side = "at or above the highest" if threshold >= high else "below the lowest"
        label = "False" if threshold >= high else "True"
        warnings.warn(f"{name} {threshold:g} is {side} score it labels (scores from {low:g} to {high:g}): every such "
                      f"step gets the label {label}; is the threshold on the scores' scale?", ThresholdWarning,
                      stacklevel=3)


class _DeviceArrays:
    """A dataset's per-sample figures as tensors on one device, made once per (dataset, device)."""

    _cache: "weakref.WeakKeyDictionary[PRMBenchDataset, dict[torch.device, _DeviceArrays]]" = weakref.WeakKeyDictionary()

    def __init__(self, dataset: PRMBenchDataset, device: torch.device):
        arrays = dataset.arrays
        self.class_ids = torch.from_numpy(arrays.class_ids).to(device)
        self.error_steps = torch.from_numpy(arrays.error_steps).to(device)
        self.error_offsets = torch.from_numpy(arrays.error_offsets).to(device)

    @classmethod
    def of(cls, dataset: PRMBenchDataset, device: torch.device) -> "_DeviceArrays":
        per_device = cls._cache.setdefault(dataset, {})
        if device not in per_device:
            per_device[device] = cls(dataset, device)
        return per_device[device]

    def gather_errors(self, sample_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The 0-based error steps of the samples at ``sample_pos``, concatenated, and their (B+1,) offsets."""
        starts = self.error_offsets[sample_pos]
        counts = self.error_offsets[sample_pos + 1] - starts
        cu_errors = torch.zeros(counts.numel() + 1, dtype=torch.int64, device=counts.device)
        torch.cumsum(counts, 0, out=cu_errors[1:])
        total = int(cu_errors[-1])  # the output size: one host sync
        # Entry j of sample b sits at starts[b] + (j - cu_errors[b]) in the dataset's error list.
        shift = torch.repeat_interleave(starts - cu_errors[:-1], counts, output_size=total)
        return self.error_steps[shift + torch.arange(total, device=counts.device)], cu_errors


def evaluate_steps(
    dataset: PRMBenchDataset,
    predictions: StepPredictions,
    *,
    backend: str = "auto",
    unknown_ids: list[str] | None = None,
    duplicates: int = 0,
    validity_denominator: str = "non_correct",
) -> Report:
    """The official evaluator on the flat predictions layout, on the predictions' device.

    The labels are compared with the error steps and counted by one call of the counting op on the device; only the
    per-sample and per-class counts (B x 6 and 11 x 4 integers) come to the host, where the official ratios are taken.

    Args:
        dataset: the evaluation set.
        predictions: the flat predictions; a sample given twice counts once (the first), as officially.
        backend: the counting op's backend (see :func:`evaluate`).
        unknown_ids, duplicates: what a parser left out before (reported in the diagnostics).
        validity_denominator: see :func:`evaluate`.
    """
    if validity_denominator not in VALIDITY_DENOMINATORS:
        raise ValueError(f"validity_denominator must be one of {VALIDITY_DENOMINATORS}, got {validity_denominator!r}")
    # The ops below are small (one pass over the steps each) and run on the CPU for CPU predictions: on one
    # thread, so that other processes on the cores do not stall them (prmbench_fast.host_threads).
    with single_threaded(predictions.device, predictions.num_steps):
        predictions.check(len(dataset))
        device = predictions.device
        arrays = _DeviceArrays.of(dataset, device)
        pos = predictions.sample_pos
        num = predictions.num_samples
        order = torch.arange(num, device=device)
        # First occurrence wins: the smallest prediction index per dataset position.
        first = torch.full((len(dataset),), num, dtype=torch.int64, device=device)
        first.scatter_reduce_(0, pos, order, reduce="amin")
        kept = first[pos] == order
        valid = kept if predictions.valid is None else kept & predictions.valid
        class_of = arrays.class_ids[pos]
        error_steps, cu_errors = arrays.gather_errors(pos)
        class_counts, sample_counts = step_confusion(
            predictions.scored_labels(arrays.class_ids),
            torch.zeros(num, dtype=torch.float64, device=device),  # unused: the labels are booleans
            predictions.cu_steps.long(),
            error_steps,
            cu_errors,
            torch.where(valid, class_of, _UNSCORED_CLASS),
            len(ALL_CLASSES) + 1,
            backend=backend,
        )
        host = _Host(pos, kept, valid, class_of, sample_counts, predictions.step_counts(),
                     class_counts[: len(ALL_CLASSES)])
    is_correct = host.class_of == CLASS_ID[CORRECT]
    # Official processing order: the correct samples' predictions first, then the others, each in given order.
    scored = np.concatenate([np.flatnonzero(host.valid & is_correct), np.flatnonzero(host.valid & ~is_correct)])
    num_correct_valid = int((host.valid & is_correct).sum())
    scored_positions = host.pos[scored]
    sample_counts_scored = host.sample_counts[scored]
    label_counts = host.step_counts[scored]
    official = _official_result(
        dataset, scored_positions, host.class_counts, sample_counts_scored, label_counts,
        num_correct_valid=num_correct_valid,
        # The main task's validity-rate denominator subtracts the correct samples' predictions, valid or not; the
        # subset400 task's does not (SPEC §2.5).
        total_num=len(dataset) - (int((host.kept & is_correct).sum()) if validity_denominator == "non_correct" else 0),
        valid_num=len(scored) - num_correct_valid,
    )
    return Report(
        official=official,
        table=metrics.leaderboard_table(official),
        diagnostics=_diagnostics(dataset, host, scored_positions, label_counts, unknown_ids or [], duplicates),
        sample_ids=dataset.id_array[scored_positions].tolist(),
        sample_counts=torch.from_numpy(sample_counts_scored),
        class_counts=torch.from_numpy(host.class_counts),
        label_counts=torch.from_numpy(label_counts),
        step_predictions=predictions,
        task="prmbench" if validity_denominator == "non_correct" else "subset400",
        dataset=dataset,
    )


class _Host:
    """The per-prediction figures the official aggregation needs, as numpy arrays: views of CPU tensors, or one
    device-to-host transfer for device tensors."""

    def __init__(self, pos, kept, valid, class_of, sample_counts, step_counts, class_counts):
        tensors = (pos, kept, valid, class_of, sample_counts, step_counts, class_counts)
        if pos.device.type == "cpu":
            arrays = [t.numpy() for t in tensors]
        else:
            flat = torch.cat([t.reshape(-1).long() for t in tensors]).cpu().numpy()
            ends = np.cumsum([t.numel() for t in tensors])
            arrays = [piece.reshape(t.shape) for piece, t in zip(np.split(flat, ends[:-1]), tensors)]
        self.pos, kept, valid, self.class_of, self.sample_counts, self.step_counts, self.class_counts = arrays
        self.kept, self.valid = kept.astype(bool), valid.astype(bool)


def _official_result(dataset, scored_positions, class_counts, counts, n_labels, *, num_correct_valid, total_num, valid_num):
    """The official result dict from the scored predictions' counts, in official processing order (numpy arrays:
    dataset positions, (B, 6) sample counts, (B,) label counts) and the (10, 4) class counts."""
    classes_present = dataset.classes
    class_of = dataset.arrays.class_ids[scored_positions]
    first_error = counts[:, 5]

    # model_response_acc = sum(labels) / len(labels), -1 without labels. float64 division of exact integers is
    # correctly rounded, as Python's int / int is, so the values are the official ones bit for bit.
    response_acc = np.where(n_labels > 0, counts[:, 4] / np.maximum(n_labels, 1), -1.0)
    # One spare nan slot at the end: a partner position of -1 (partner not in the dataset) reads it.
    partner_acc = np.full(len(dataset) + 1, np.nan)
    partner_acc[scored_positions[:num_correct_valid]] = response_acc[:num_correct_valid]
    others = slice(num_correct_valid, None)
    partner = partner_acc[dataset.arrays.partner_position[scored_positions[others]]]
    # Official truthiness test: a missing partner (nan here) or one of exactly 0.0 drops the pair; -1 is kept.
    paired = ~np.isnan(partner) & (partner != 0) & (response_acc[others] != -1)
    similarity_values = np.abs(response_acc[others] - partner)
    other_class = class_of[others]
    # Summed in processing order, as the official mean is taken (metrics.mean).
    similarity = {c: similarity_values[paired & (other_class == CLASS_ID[c])] for c in classes_present}
    total_similarity = similarity_values[paired]

    table = class_counts.tolist()
    num_classes = len(ALL_CLASSES)
    first_error_hits = np.bincount(class_of[first_error == 1], minlength=num_classes).tolist()
    first_error_scored = np.bincount(class_of[first_error >= 0], minlength=num_classes).tolist()
    per_class: dict[str, dict[str, float]] = {m: {} for m in metrics.STEP_METRICS + metrics.F1_METRICS}
    for cls in classes_present:
        cid = CLASS_ID[cls]
        values = {
            **metrics.step_metrics(*table[cid], first_error_hits[cid], first_error_scored[cid], similarity[cls]),
            **metrics.f1_metrics(*table[cid]),
        }
        for name, value in values.items():
            per_class[name][cls] = value

    # Totals pool every class but `correct` (multi_solutions included).
    correct = CLASS_ID[CORRECT]
    tp, fp, tn, fn = (sum(row[k] for cid, row in enumerate(table) if cid != correct) for k in range(4))
    hits = sum(first_error_hits) - first_error_hits[correct]
    scored = sum(first_error_scored) - first_error_scored[correct]
    totals = {
        **metrics.step_metrics(tp, fp, tn, fn, hits, scored, total_similarity),
        **metrics.f1_metrics(tp, fp, tn, fn),
    }
    return {
        "total_hallucination_results": totals,
        "hallucination_type_results": per_class,
        "validitiy_rate": metrics.ratio(valid_num, total_num),
    }


def _diagnostics(dataset, host: _Host, scored_positions, n_labels, unknown_ids, duplicates) -> dict[str, Any]:
    arrays = dataset.arrays
    step_counts = arrays.step_counts[scored_positions]
    first_errors = arrays.first_error[scored_positions]
    predicted = np.zeros(len(dataset), dtype=bool)
    predicted[host.pos[host.kept]] = True
    short = n_labels < step_counts
    long = n_labels > step_counts
    return {
        "samples": len(dataset),
        "predictions_used": int(predicted.sum()),
        "missing_ids": dataset.id_array[~predicted].tolist(),
        "unknown_prediction_ids": unknown_ids,
        "duplicate_predictions": duplicates + int((~host.kept).sum()),
        "invalid_predictions": dataset.id_array[host.pos[host.kept & ~host.valid]].tolist(),
        "samples_with_fewer_labels_than_steps": int(short.sum()),
        "steps_left_unscored": int((step_counts - n_labels)[short].sum()),
        "samples_with_more_labels_than_steps": int(long.sum()),
        "extra_labels": int((n_labels - step_counts)[long].sum()),
        # An in-range first error step that got no label (the prediction stopped before it).
        "first_errors_left_unscored": int(((first_errors >= n_labels) & (first_errors < step_counts)).sum()),
        "data": dataset.diagnostics.summary(),
    }
