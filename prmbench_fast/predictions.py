"""The flat predictions layout: a model's step predictions for B samples, the evaluator's native input.

The flat predictions layout
---------------------------
The words are those of the packed layout (``prmbench_fast.packing``); the B samples are dataset samples, S is the
total number of steps they were given predictions for. Every name below means exactly this throughout prmbench_fast:

- ``sample_pos``: (B,) int64. Dataset positions (``dataset.samples[p]``) of the predicted samples, in prediction
  order. A position given twice: the first occurrence wins, later ones are ignored (the official rule).
- ``cu_steps``: (B+1,) int32. ``cu_steps[0] == 0``; sample b's steps are ``[cu_steps[b], cu_steps[b+1])``;
  ``cu_steps[B] == S``. A sample's step count is the number of labels it emitted, which the official evaluator scores
  whatever the number of steps in the data.
- ``validity_labels``: (S,) bool. ``step_level_validity_labels``: True = the step is judged correct.
- ``validity_scores``: (S,) float32 or float64, or None. ``step_level_validity_scores``; NaN where a prediction gave
  labels without scores.
- ``redundancy_labels``, ``redundancy_scores``: (S,) bool / float, or None. ``step_level_redundancy_labels`` /
  ``_scores`` (ReasonEval, LLM critics): True = the step is redundant.
- ``has_redundancy``: (B,) bool, or None. Which predictions carry redundancy labels (None: all of them when
  ``redundancy_labels`` is given, none otherwise). On ``redundency`` and ``circular`` samples the official evaluator
  scores NOT(redundancy label) for those predictions (:meth:`StepPredictions.scored_labels`).
- ``valid``: (B,) bool, or None (all valid). False: an invalid prediction (an unparseable critic answer); it has no
  steps and counts only in the validity rate.

All tensors live on one device. Building the layout from score()'s step outputs costs nothing (they already are these
tensors); :func:`parse_results` builds it from official result dicts, and :meth:`StepPredictions.to_results` turns it
back into official result lines, for files only.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
from typing import Any, Iterable, Mapping

import numpy as np
import torch

from .classes import CLASS_ID, REDUNDANCY_CLASSES
from . import ops
from .host_threads import single_threaded

VALIDITY_LABELS = "step_level_validity_labels"
VALIDITY_SCORES = "step_level_validity_scores"
REDUNDANCY_LABELS = "step_level_redundancy_labels"
REDUNDANCY_SCORES = "step_level_redundancy_scores"

#: The dtypes step scores may have.
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

#: Class ids whose predictions with redundancy labels are scored by NOT(redundancy label) (SPEC §2.3).
REDUNDANCY_CLASS_IDS = tuple(CLASS_ID[c] for c in REDUNDANCY_CLASSES)


class PredictionError(ValueError):
    """A prediction the evaluator cannot score; the message names the sample id (or argument) and the field.

    ``sample_id`` is the sample whose prediction is bad (None for an argument error), so that a caller that read the
    predictions from a file can name the file and line too."""

    def __init__(self, message: str, sample_id: str | None = None):
        super().__init__(message)
        self.sample_id = sample_id


class ThresholdWarning(UserWarning):
    """A label threshold that makes every label the same (it lies outside the scores it labels, e.g. 5.0 for
    probabilities)."""


@dataclasses.dataclass(frozen=True)
class StepPredictions:
    """Step predictions for B dataset samples in the flat predictions layout (module docstring)."""

    sample_pos: torch.Tensor
    cu_steps: torch.Tensor
    validity_labels: torch.Tensor
    validity_scores: torch.Tensor | None = None
    redundancy_labels: torch.Tensor | None = None
    redundancy_scores: torch.Tensor | None = None
    has_redundancy: torch.Tensor | None = None
    valid: torch.Tensor | None = None

    def __post_init__(self):
        # Types at construction (host only, no sync): a list here would otherwise fail far from the call, inside
        # the evaluator. Shapes, dtypes and devices are checked by check().
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            required = field.default is dataclasses.MISSING
            if not isinstance(value, torch.Tensor) and (required or value is not None):
                wanted = "a torch.Tensor" if required else "a torch.Tensor or None"
                raise TypeError(f"StepPredictions: {field.name} must be {wanted}, got {type(value).__name__} "
                                "(e.g. torch.tensor(values))")

    @property
    def num_samples(self) -> int:
        return self.sample_pos.numel()

    @property
    def num_steps(self) -> int:
        return self.validity_labels.numel()

    @property
    def device(self) -> torch.device:
        return self.validity_labels.device

    def check(self, num_dataset_samples: int | None = None) -> None:
        """Raise :class:`PredictionError` naming the field on a shape, dtype or device that breaks the layout.

        Shapes and dtypes are host metadata (no device sync). With ``num_dataset_samples`` the positions are range
        checked too, which reads them (one sync on a GPU).
        """
        B, S = self.num_samples, self.num_steps
        device = self.device
        expect_tensor("sample_pos", self.sample_pos, (B,), (torch.int64,), device)
        expect_tensor("cu_steps", self.cu_steps, (B + 1,), (torch.int32, torch.int64), device)
        expect_tensor("validity_labels", self.validity_labels, (S,), (torch.bool,), device)
        for name, tensor, shape, dtypes in (
            ("validity_scores", self.validity_scores, (S,), FLOAT_DTYPES),
            ("redundancy_labels", self.redundancy_labels, (S,), (torch.bool,)),
            ("redundancy_scores", self.redundancy_scores, (S,), FLOAT_DTYPES),
            ("has_redundancy", self.has_redundancy, (B,), (torch.bool,)),
            ("valid", self.valid, (B,), (torch.bool,)),
        ):
            if tensor is not None:
                expect_tensor(name, tensor, shape, dtypes, device)
        if self.has_redundancy is not None and self.redundancy_labels is None:
            raise PredictionError("has_redundancy is given without redundancy_labels")
        if num_dataset_samples is not None:
            _check_offsets_and_positions(self, num_dataset_samples)

    def scored_labels(self, class_ids: torch.Tensor) -> torch.Tensor:
        """(S,) bool: the labels the official evaluator scores, on the device, without host syncs.

        ``class_ids`` are the dataset's per-sample class ids (``dataset.arrays.class_ids`` as a tensor on this
        device). Validity labels, except NOT(redundancy label) for predictions with redundancy labels on the
        ``redundency`` and ``circular`` samples.
        """
        if self.redundancy_labels is None:
            return self.validity_labels
        rule = _isin(class_ids[self.sample_pos], REDUNDANCY_CLASS_IDS)
        if self.has_redundancy is not None:
            rule = rule & self.has_redundancy
        step_rule = torch.repeat_interleave(rule, self.step_counts(), output_size=self.num_steps)
        return torch.where(step_rule, ~self.redundancy_labels, self.validity_labels)

    def step_counts(self) -> torch.Tensor:
        """(B,) int64: each sample's number of steps (``diff(cu_steps)``)."""
        return (self.cu_steps[1:] - self.cu_steps[:-1]).long()

    def to(self, device: torch.device | str) -> "StepPredictions":
        return StepPredictions(**{f.name: None if (v := getattr(self, f.name)) is None else v.to(device)
                                  for f in dataclasses.fields(self)})

    #: Optional fields and the value a prediction without them has: NaN scores, False labels, no redundancy labels,
    #: valid. ``has_redundancy`` is filled from whether ``redundancy_labels`` were given.
    OPTIONAL_FIELDS = {"validity_scores": math.nan, "redundancy_labels": False, "redundancy_scores": math.nan,
                       "has_redundancy": None, "valid": True}

    def with_fields(self, names) -> "StepPredictions":
        """These predictions with the optional fields ``names`` present (filled as :attr:`OPTIONAL_FIELDS` says)."""
        filled = {}
        for name in names:
            if getattr(self, name) is not None:
                continue
            if name == "has_redundancy":
                filled[name] = torch.full(self.sample_pos.shape, self.redundancy_labels is not None, device=self.device)
                continue
            fill = self.OPTIONAL_FIELDS[name]
            like = self.sample_pos if name == "valid" else self.validity_labels
            dtype = torch.bool if isinstance(fill, bool) else torch.float32
            filled[name] = torch.full(like.shape, fill, dtype=dtype, device=self.device)
        return dataclasses.replace(self, **filled) if filled else self

    def present_fields(self) -> tuple[str, ...]:
        names = tuple(n for n in self.OPTIONAL_FIELDS if getattr(self, n) is not None)
        # Redundancy labels present in some parts only need the per-sample flag to tell which.
        return names + ("has_redundancy",) if "redundancy_labels" in names else names

    @staticmethod
    def concat(parts: Iterable["StepPredictions"]) -> "StepPredictions":
        """The parts one after the other (offsets shifted); an optional field present in some parts only is filled
        in the others (:meth:`with_fields`)."""
        parts = list(parts)
        if not parts:
            raise ValueError("StepPredictions.concat needs at least one part")
        if len(parts) == 1:
            return parts[0]
        names = sorted({n for p in parts for n in p.present_fields()}, key=list(StepPredictions.OPTIONAL_FIELDS).index)
        parts = [p.with_fields(names) for p in parts]
        counts = torch.cat([p.step_counts() for p in parts])
        cu_steps = torch.zeros(counts.numel() + 1, dtype=torch.int32, device=counts.device)
        cu_steps[1:] = counts.cumsum(0)

        def joined(name: str):
            values = [getattr(p, name) for p in parts]
            if values[0] is None:
                return None
            dtype = values[0].dtype
            for v in values[1:]:
                dtype = torch.promote_types(dtype, v.dtype)
            return torch.cat([v.to(dtype) for v in values])

        return StepPredictions(
            sample_pos=torch.cat([p.sample_pos for p in parts]),
            cu_steps=cu_steps,
            validity_labels=torch.cat([p.validity_labels for p in parts]),
            **{name: joined(name) for name in StepPredictions.OPTIONAL_FIELDS},
        )

    @staticmethod
    def empty(device: torch.device | str = "cpu") -> "StepPredictions":
        """No predictions (B = S = 0)."""
        return StepPredictions(
            sample_pos=torch.zeros(0, dtype=torch.int64, device=device),
            cu_steps=torch.zeros(1, dtype=torch.int32, device=device),
            validity_labels=torch.zeros(0, dtype=torch.bool, device=device),
        )

    def to_results(self, sample_ids: list[str]) -> list[dict[str, Any]]:
        """Official result lines (``{"idx", "scores": {...}}``, or ``{"idx", "validity": False}`` for an invalid
        prediction), one per sample in order; ``sample_ids`` are the dataset's ids. One host copy per field."""
        fields = {
            VALIDITY_SCORES: self.validity_scores, VALIDITY_LABELS: self.validity_labels,
            REDUNDANCY_SCORES: self.redundancy_scores, REDUNDANCY_LABELS: self.redundancy_labels,
        }
        lists = {k: (v.double() if v.is_floating_point() else v).cpu().tolist() for k, v in fields.items()
                 if v is not None}
        has_redundancy = None if self.has_redundancy is None else self.has_redundancy.tolist()
        valid = None if self.valid is None else self.valid.tolist()
        offsets = self.cu_steps.tolist()
        results = []
        for b, position in enumerate(self.sample_pos.tolist()):
            sample_id = sample_ids[position]
            if valid is not None and not valid[b]:
                results.append({"idx": sample_id, "validity": False})
                continue
            start, end = offsets[b], offsets[b + 1]
            scores = {}
            for key, values in lists.items():
                if key.startswith("step_level_redundancy") and has_redundancy is not None and not has_redundancy[b]:
                    continue
                piece = values[start:end]
                if key.endswith("scores") and any(v != v for v in piece):
                    continue  # labels given without scores: no score list, as the prediction came
                scores[key] = piece
            results.append({"idx": sample_id, "scores": scores})
        return results


def expect_tensor(name: str, tensor, shape: tuple[int | None, ...], dtypes: tuple[torch.dtype, ...],
                  device: torch.device | None = None) -> None:
    """Raise :class:`PredictionError` (a ValueError) naming ``name`` unless ``tensor`` is a tensor of this shape (None:
    any size along that dimension), one of ``dtypes``, on ``device`` (None: any). Host metadata only, no sync."""
    if not isinstance(tensor, torch.Tensor):
        raise PredictionError(f"{name}: expected a tensor, got {type(tensor).__name__}")
    if len(tensor.shape) != len(shape) or any(n is not None and n != m for n, m in zip(shape, tensor.shape)):
        wanted = "(" + ", ".join("n" if n is None else str(n) for n in shape) + ("," if len(shape) == 1 else "") + ")"
        raise PredictionError(f"{name}: expected shape {wanted}, got {tuple(tensor.shape)}")
    if tensor.dtype not in dtypes:
        raise PredictionError(f"{name}: expected dtype {' or '.join(map(str, dtypes))}, got {tensor.dtype}")
    if device is not None and tensor.device != device:
        raise PredictionError(f"{name}: on {tensor.device}, but the other tensors are on {device}")


def _check_offsets_and_positions(preds: StepPredictions, num_dataset_samples: int) -> None:
    cu = preds.cu_steps
    bad_offsets = (cu[0] != 0) | (cu[-1] != preds.num_steps) | (cu[1:] < cu[:-1]).any()
    pos = preds.sample_pos
    bad_positions = ((pos < 0) | (pos >= num_dataset_samples)).any() if pos.numel() else torch.tensor(False)
    bad_offsets, bad_positions = torch.stack([bad_offsets.to(pos.device), bad_positions.to(pos.device)]).tolist()
    if bad_offsets:
        raise PredictionError(f"cu_steps: must start at 0, be non-decreasing and end at {preds.num_steps} (S)")
    if bad_positions:
        raise PredictionError(f"sample_pos: positions must lie in [0, {num_dataset_samples}) (the dataset's samples)")


def _isin(values: torch.Tensor, choices: tuple[int, ...]) -> torch.Tensor:
    out = torch.zeros_like(values, dtype=torch.bool)
    for c in choices:
        out |= values == c
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Official result dicts -> the flat layout


@dataclasses.dataclass
class ParsedResults:
    """What :func:`parse_results` found: the flat predictions (first result per known id, in given order), the
    results it left out, and for each threshold that labelled scores ("validity_threshold", "redundancy_threshold")
    the (lowest, highest) score it labelled."""

    predictions: StepPredictions
    unknown_ids: list[str]
    duplicates: int
    labelled_ranges: dict[str, tuple[float, float]] = dataclasses.field(default_factory=dict)


def check_predictions_argument(predictions: Any, argument: str = "predictions") -> None:
    """Raise TypeError naming ``argument`` when it cannot be predictions: a path or text (a file is read with
    :func:`prmbench_fast.io.read_predictions` first), or something that is no mapping, iterable or StepPredictions."""
    if isinstance(predictions, (str, bytes, os.PathLike)):
        raise TypeError(f"{argument} must be predictions, not a path or text ({predictions!r}): read a predictions "
                        "file with prmbench_fast.io.read_predictions(path) and pass what it returns")
    if not isinstance(predictions, (StepPredictions, Mapping)) and not hasattr(predictions, "__iter__"):
        raise TypeError(f"{argument} must be StepPredictions, a mapping id -> result or an iterable of result dicts, "
                        f"got {type(predictions).__name__}")


def _is_mapping(value: Any) -> bool:
    # `type(...) is dict` first: isinstance against the Mapping ABC costs microseconds per call on this hot path.
    return type(value) is dict or isinstance(value, Mapping)


def parse_results(
    dataset, results, *, validity_threshold: float = 0.5, redundancy_threshold: float = 0.15, keep_scores: bool = True
) -> ParsedResults:
    """Official result dicts -> the flat predictions layout (CPU tensors), checked.

    ``results`` is a mapping ``sample id -> result`` or an iterable of result dicts carrying ``idx``. A result is the
    official ``{"scores": {...}, "validity": bool}`` (``validity`` optional); a bare scores dict is accepted too.
    Ids outside the dataset are left out (listed in ``unknown_ids``); the first result per id wins. A prediction with
    scores but no labels is labelled ``score > validity_threshold`` (redundancy: ``score > redundancy_threshold``),
    as the official adapters label them. ``keep_scores=False`` leaves the scores of labelled predictions out (the
    evaluator never reads them; analyses do), which saves converting every score.

    Results made of plain dicts, lists, bools and floats are walked by the compiled extension (a few times faster;
    the same arrays); anything else, and every error, by the Python loop that defines this function.

    Raises:
        PredictionError: naming the sample id, the field and the index of a value that is not a label (true/false,
            0/1) or not a real number (strings, booleans as scores, None, NaN, integers too large for a float).
    """
    compiled = _parse_compiled(dataset, results, validity_threshold, redundancy_threshold, keep_scores)
    if compiled is not None:
        return compiled
    return _parse_python(dataset, results, validity_threshold=validity_threshold,
                         redundancy_threshold=redundancy_threshold, keep_scores=keep_scores)


def _redundancy_rule(dataset) -> bytes:
    """Per sample, 1 where the NR/NCL redundancy rule applies (only PRMBench samples have it; a BoN set has no
    classes)."""
    arrays = getattr(dataset, "arrays", None)
    return arrays.redundancy_rule if arrays is not None else bytes(len(dataset))


def _parse_compiled(dataset, results, validity_threshold, redundancy_threshold, keep_scores) -> ParsedResults | None:
    """:func:`parse_results` by the compiled walk (csrc/result_dicts.cpp), or None where it does not apply: the
    extension is missing or older, ``results`` is no plain list or dict, a threshold is no float, or the walk met a
    value the Python loop would convert or refuse (that loop then decides, naming what is wrong).

    The walk returns bytearrays of: kept positions, step offsets (int64), validity labels (uint8), validity scores
    (float64, or None without ``keep_scores``), the indices into kept of invalid predictions, of predictions with
    redundancy values and their lengths (int64), the redundancy labels (uint8) and scores (float64 or None),
    concatenated; then the unknown ids, the number of duplicates and the labelled ranges."""
    walk = ops.flat_from_results
    if walk is None or type(validity_threshold) is not float or type(redundancy_threshold) is not float:
        return None
    if type(results) is dict:
        ids, values = list(results), list(results.values())
    elif type(results) is list:
        ids, values = None, results
    else:
        return None
    arrays = walk(ids, values, dataset.position, _redundancy_rule(dataset), validity_threshold,
                  redundancy_threshold, keep_scores)
    if arrays is None:
        return None
    (kept, offsets, labels, scores, invalid, redundancy_rows, redundancy_lengths, redundancy_labels, redundancy_scores,
     unknown, duplicates, ranges) = arrays

    def array(buffer, dtype):
        return None if buffer is None else np.frombuffer(buffer, dtype=dtype)

    with single_threaded("cpu", len(labels)):
        flat = _assemble(array(kept, np.int64), array(offsets, np.int64), array(labels, np.uint8).view(bool),
                         array(scores, np.float64), array(invalid, np.int64),
                         array(redundancy_rows, np.int64), array(redundancy_lengths, np.int64),
                         array(redundancy_labels, np.uint8).view(bool), array(redundancy_scores, np.float64))
    return ParsedResults(flat, unknown, duplicates, ranges)


def _parse_python(dataset, results, *, validity_threshold, redundancy_threshold, keep_scores) -> ParsedResults:
    """:func:`parse_results`' definition: the walk over the results in Python, raising for the first bad value."""
    position = dataset.position
    redundancy_rule = _redundancy_rule(dataset)
    taken = bytearray(len(dataset))  # 1 where a result was kept: the first result per id wins
    unknown: list[str] = []
    duplicates = 0
    kept: list[int] = []
    invalid: list[int] = []  # indices into kept
    labels: list = []  # flat validity labels: each prediction's own list, extended (the hot path)
    scores: list = []  # flat validity scores, aligned with labels; NaN for a prediction without (usable) scores
    offsets = [0]
    redundancy: dict[int, tuple[list, list | None]] = {}  # kept-index -> (redundancy labels, scores or None)
    ranges: dict[str, tuple[float, float]] = {}  # threshold name -> (lowest, highest) score it labelled
    nan = math.nan
    # Bound methods: this loop runs once per prediction (7k for the benchmark) and is most of evaluate()'s time.
    find, keep, extend_labels, extend_scores, end_sample = (
        position.get, kept.append, labels.extend, scores.extend, offsets.append
    )
    for sample_id, result in _items(results):
        where = find(sample_id)
        if where is None:
            unknown.append(sample_id)
            continue
        if taken[where]:
            duplicates += 1
            continue
        if type(result) is not dict and not isinstance(result, Mapping):
            raise PredictionError(f"prediction for sample {sample_id!r}: expected a dict, got {type(result).__name__}",
                                  sample_id)
        taken[where] = 1
        keep(where)
        if not result.get("validity", True):  # the official test: "validity" in result and not result["validity"]
            invalid.append(len(kept) - 1)
            end_sample(len(labels))
            continue
        fields = result.get("scores", result)
        if type(fields) is not dict and not isinstance(fields, Mapping):
            raise PredictionError(f"prediction for sample {sample_id!r}, field 'scores': expected a dict", sample_id)
        step_labels = fields.get(VALIDITY_LABELS)
        step_scores = fields.get(VALIDITY_SCORES)
        if redundancy_rule[where] and (
            REDUNDANCY_LABELS in fields or (step_labels is None and REDUNDANCY_SCORES in fields)
        ):
            step_labels, step_scores = _redundancy_sample(sample_id, fields, redundancy_threshold, redundancy,
                                                          len(kept) - 1, ranges)
        elif step_labels is None:
            if step_scores is None:
                raise PredictionError(
                    f"prediction for sample {sample_id!r}, field 'scores': has neither {VALIDITY_LABELS!r} nor "
                    f"{VALIDITY_SCORES!r}",
                    sample_id,
                )
            step_labels = _threshold_labels(sample_id, VALIDITY_SCORES, step_scores, validity_threshold,
                                            ranges, "validity_threshold")
        elif type(step_labels) is not list:
            _check_list(sample_id, VALIDITY_LABELS, step_labels)
        extend_labels(step_labels)
        if not keep_scores:
            pass
        elif type(step_scores) is list and len(step_scores) == len(step_labels):
            extend_scores(step_scores)
        else:
            if step_scores is not None:
                _check_list(sample_id, VALIDITY_SCORES, step_scores)
            extend_scores([nan] * len(step_labels))  # no scores, or not one per label: unusable for analyses
        end_sample(len(labels))
    with single_threaded("cpu", len(labels)):  # small host work (prmbench_fast.host_threads)
        flat = _flat(dataset, kept, offsets, labels, scores if keep_scores else None, invalid, redundancy)
    return ParsedResults(flat, unknown, duplicates, ranges)


def _items(results):
    if _is_mapping(results):
        return results.items()
    results = list(results)
    try:
        ids = [r["idx"] for r in results]
    except (TypeError, KeyError, IndexError):
        ids = [_result_id(r, i) for i, r in enumerate(results)]  # raises, naming the bad entry
    return zip(ids, results)


def _result_id(result: Any, position: int) -> str:
    if not _is_mapping(result) or "idx" not in result:
        raise PredictionError(f"prediction #{position}: a result in a list must be a dict with an 'idx' field")
    return result["idx"]


def _check_list(sample_id: str, field: str, values: Any) -> None:
    if not isinstance(values, (list, tuple)):
        raise PredictionError(f"prediction for sample {sample_id!r}, field {field!r}: expected a list", sample_id)


def _threshold_labels(sample_id: str, field: str, scores: Any, threshold: float, ranges: dict, name: str) -> list:
    """``score > threshold`` for each score (the official adapters' rule; +-inf compare as numbers, NaN is refused),
    widening ``ranges[name]`` to the scores labelled."""
    _check_list(sample_id, field, scores)
    values = [_number(sample_id, field, i, v) for i, v in enumerate(scores)]
    if values:
        low, high = ranges.get(name, (math.inf, -math.inf))
        ranges[name] = (min(low, *values), max(high, *values))
    return [v > threshold for v in values]


def _number(sample_id: str, field: str, index: int, value: Any) -> float:
    """A score as a float; booleans, strings, None, NaN and integers beyond the float range are refused."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise PredictionError(f"prediction for sample {sample_id!r}, field {field!r}[{index}]: not a number: {value!r}",
                              sample_id)
    try:
        return float(value)
    except OverflowError:
        raise PredictionError(
            f"prediction for sample {sample_id!r}, field {field!r}[{index}]: {str(value)[:20]}... is too large for a float",
            sample_id,
        ) from None


def _redundancy_sample(sample_id: str, fields: Mapping, threshold: float, redundancy: dict, index: int,
                       ranges: dict):
    """A ``redundency``/``circular`` prediction with redundancy values: the evaluator scores NOT(redundancy label).

    Returns the validity labels and scores stored beside them, cut or padded to the redundancy list's length (the
    scored one): a critic may emit validity and redundancy lists of different lengths, and only the redundancy list's
    length counts for these samples.
    """
    red_labels = fields.get(REDUNDANCY_LABELS)
    red_scores = fields.get(REDUNDANCY_SCORES)
    validity = fields.get(VALIDITY_LABELS)
    validity_scores = fields.get(VALIDITY_SCORES)
    if red_labels is None:
        red_labels = _threshold_labels(sample_id, REDUNDANCY_SCORES, red_scores, threshold, ranges,
                                       "redundancy_threshold")
    elif type(red_labels) is not list:
        _check_list(sample_id, REDUNDANCY_LABELS, red_labels)
    if red_scores is not None and (type(red_scores) is not list or len(red_scores) != len(red_labels)):
        _check_list(sample_id, REDUNDANCY_SCORES, red_scores)
        red_scores = None
    redundancy[index] = (red_labels, red_scores)
    n = len(red_labels)
    if type(validity) is list and len(validity) == n:  # the usual case: one validity label per redundancy label
        return validity, validity_scores if type(validity_scores) is list and len(validity_scores) == n else None
    validity = list(validity[:n]) if isinstance(validity, (list, tuple)) else []
    validity += [False] * (n - len(validity))
    if isinstance(validity_scores, (list, tuple)) and len(validity_scores) >= n:
        validity_scores = list(validity_scores[:n])
    else:
        validity_scores = None
    return validity, validity_scores


def _flat(dataset, kept, offsets, labels, scores, invalid, redundancy) -> StepPredictions:
    """The Python walk's lists, checked as they become arrays (a bad label or score raises, naming its sample, field
    and index), assembled into the flat layout. ``redundancy``: kept-index -> (redundancy labels, scores or None)."""
    samples = dataset.samples

    def spans():  # only walked to name a bad value
        return ((samples[where].id, offsets[k], offsets[k + 1]) for k, where in enumerate(kept))

    rows = list(redundancy)
    lengths = np.asarray([len(redundancy[r][0]) for r in rows], dtype=np.int64)
    cu = np.concatenate(([0], np.cumsum(lengths)))

    def redundancy_spans():
        return ((samples[kept[r]].id, int(cu[i]), int(cu[i + 1])) for i, r in enumerate(rows))

    redundancy_labels = _labels_array(list(itertools.chain.from_iterable(redundancy[r][0] for r in rows)),
                                      REDUNDANCY_LABELS, redundancy_spans)
    redundancy_scores = None
    if scores is not None:
        nan_scores = [math.nan]
        redundancy_scores = _scores_array(list(itertools.chain.from_iterable(
            redundancy[r][1] if redundancy[r][1] is not None else nan_scores * len(redundancy[r][0]) for r in rows
        )), REDUNDANCY_SCORES, redundancy_spans, allow_nan=True)
    return _assemble(
        # np.array is ~3x faster than torch.tensor at turning a list of Python ints into an array.
        np.array(kept, dtype=np.int64),
        np.array(offsets, dtype=np.int64),
        _labels_array(labels, VALIDITY_LABELS, spans),
        None if scores is None else _scores_array(scores, VALIDITY_SCORES, spans, allow_nan=True),
        np.array(invalid, dtype=np.int64),
        np.array(rows, dtype=np.int64),
        lengths,
        redundancy_labels,
        redundancy_scores,
    )


def _assemble(kept, offsets, labels, scores, invalid, redundancy_rows, redundancy_lengths, redundancy_labels,
              redundancy_scores) -> StepPredictions:
    """Checked, writable numpy arrays -> the flat layout (CPU tensors sharing their memory).

    ``kept``: dataset positions; ``offsets``: (B+1,) int64 step offsets; ``labels``/``scores``: the validity values
    (``scores`` None: not kept); ``invalid``: indices into kept of invalid predictions; ``redundancy_rows``: indices
    into kept of the predictions with redundancy values, ``redundancy_lengths`` their counts, ``redundancy_labels`` /
    ``redundancy_scores`` (None: not kept) their values concatenated, placed at those predictions' first steps
    (False / NaN at every other step)."""
    num_samples, num_steps = len(kept), len(labels)
    full_labels = full_scores = has_redundancy = None
    if len(redundancy_rows):
        cu = np.concatenate(([0], np.cumsum(redundancy_lengths)))
        steps = torch.from_numpy(np.repeat(offsets[redundancy_rows] - cu[:-1], redundancy_lengths)
                                 + np.arange(cu[-1], dtype=np.int64))
        full_labels = torch.zeros(num_steps, dtype=torch.bool)
        full_labels[steps] = torch.from_numpy(redundancy_labels)
        if redundancy_scores is not None:
            full_scores = torch.full((num_steps,), math.nan, dtype=torch.float64)
            full_scores[steps] = torch.from_numpy(redundancy_scores)
        has_redundancy = torch.zeros(num_samples, dtype=torch.bool)
        has_redundancy[torch.from_numpy(redundancy_rows)] = True
    valid = None
    if len(invalid):
        valid = torch.ones(num_samples, dtype=torch.bool)
        valid[torch.from_numpy(invalid)] = False
    return StepPredictions(
        sample_pos=torch.from_numpy(kept),
        cu_steps=torch.from_numpy(offsets.astype(np.int32)),
        validity_labels=torch.from_numpy(labels),
        validity_scores=None if scores is None else torch.from_numpy(scores),
        redundancy_labels=full_labels,
        redundancy_scores=full_scores,
        has_redundancy=has_redundancy,
        valid=valid,
    )


def _labels_array(labels: list, field: str, spans) -> np.ndarray:
    """Labels as a bool array; anything but true/false/0/1 raises, naming the sample, field and index.

    ``spans()``: (sample id, start, end) of each sample's labels in the flat list, for the error message.
    """
    try:
        # Labels are Python bools: bytes() packs them 4x faster than np.array(..., bool). It accepts only ints in
        # [0, 255] (bools are ints), so floats, None or strings fall to the checked conversion below.
        array = np.frombuffer(bytes(labels), dtype=np.uint8)
        if array.size == 0 or array.max() <= 1:
            return array.astype(bool)
    except (TypeError, ValueError):
        pass
    for sample_id, start, end in spans():
        for i, v in enumerate(labels[start:end]):
            if not (isinstance(v, (bool, int, float)) and v in (0, 1)):
                raise PredictionError(
                    f"prediction for sample {sample_id!r}, field {field!r}[{i}]: a label must be true/false (or 0/1), "
                    f"got {v!r}",
                    sample_id,
                )
    return np.array([bool(v) for v in labels], dtype=bool)


def _scores_array(values: list, field: str, spans, allow_nan: bool = False) -> np.ndarray:
    """Scores as float64; booleans, strings, None, NaN and integers beyond the float range raise, naming the sample,
    the field and the index. ``allow_nan``: the NaN placeholders of predictions without scores pass."""
    # set(map(type, ...)) runs in C: booleans (an int subclass) would otherwise pass as 0.0/1.0.
    if set(map(type, values)) <= {float, int}:
        try:
            array = np.array(values, dtype=np.float64)
        except OverflowError:
            array = None
        if array is not None and (allow_nan or not np.isnan(array).any()):
            return array
    for sample_id, start, end in spans():
        piece = values[start:end]
        if allow_nan and all(v != v for v in piece):
            continue
        for i, v in enumerate(piece):
            _number(sample_id, field, i, v)
    raise AssertionError("unreachable: a bad score was detected but not located")
