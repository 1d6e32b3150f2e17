"""``PRMBenchMetric``: the official PRMBench evaluator as a streaming metric on the device (torchmetrics style).

A thin stateful class over the functional evaluator (:func:`prmbench_fast.evaluate.evaluate_steps`): ``update()``
keeps each batch's step predictions as detached tensors on their device, in the flat predictions layout
(``prmbench_fast.predictions``), without host syncs; ``compute()`` concatenates them (all ranks' under
``torch.distributed``) and evaluates them with one call of the counting op. The state is the predictions themselves,
not running counts: the official similarity metric compares each sample with its clean ``correct_*`` partner, which may
arrive in another batch or on another rank, and the first prediction of a sample must win over later ones.

The state is one list per field: ``compute()`` joins each with one ``torch.cat`` (not one concatenation of
``StepPredictions`` per update), and keeps the joined tensors, so a later ``compute()`` joins only the new updates.
Checks that would read a device tensor (non-finite scores, positions, offsets) are accumulated in ``update()`` as
device flags and read in ``compute()`` with one transfer, which ``compute()`` makes anyway.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from .data import PRMBenchDataset
from .distributed import gather_predictions
from .evaluate import Report, evaluate_steps
from .host_threads import single_threaded
from .ops import BACKENDS
from .predictions import FLOAT_DTYPES, PredictionError, StepPredictions, expect_tensor
from .tasks.processbench import ProcessBenchDataset, ProcessBenchReport, evaluate_processbench

_INTEGERS = (torch.int32, torch.int64)
#: The per-step fields a batch may carry, as ``update()`` names them and as ``StepPredictions`` names them.
_STEP_FIELDS = {"step_labels": "validity_labels", "step_scores": "validity_scores",
                "redundancy_labels": "redundancy_labels", "redundancy_scores": "redundancy_scores"}


class PRMBenchMetric:
    """Accumulate step predictions batch by batch; ``compute()`` gives the same :class:`Report` as ``evaluate()``.

    Example::

        metric = PRMBenchMetric(dataset)
        for batch in batches:
            metric.update(batch.sample_pos, step_scores, batch.cu_steps)   # or per-sample lists, without cu_steps
        report = metric.compute()   # report.table["Overall"], report.official ...
        metric.reset()

    A sample updated twice counts once: the first update wins, as the official evaluator keeps the first result per
    sample. Under ``torch.distributed`` ranks update disjoint samples (if not, the lowest rank's prediction wins) and
    ``compute()``, called on every rank, returns the same report everywhere.

    Args:
        dataset: the evaluation set (``prmbench_fast.load_prmbench(...)``); positions index ``dataset.samples``.
        validity_threshold, redundancy_threshold: finite numbers; a step is labelled ``score > threshold`` unless
            ``update()`` gets labels.
        backend: the counting op's backend ("auto", "cpu", "cuda", "torch").
        device: the device of the predictions (default: the first update's). A rank that updates nothing joins
            ``compute()``'s gathers with an empty state there; without ``device=`` that is the device its process
            group communicates on (NCCL: the group's bound device, else the current CUDA device; CPU otherwise), so
            pass the model's device. Per-sample lists of numbers are moved there.

    Raises:
        TypeError: a dataset that is not a ``PRMBenchDataset``, a threshold or device of the wrong type.
        ValueError: a non-finite threshold, an unknown backend.
    """

    _dataset_type: type = PRMBenchDataset
    _loader = "prmbench_fast.load_prmbench(...)"

    def __init__(
        self,
        dataset: PRMBenchDataset,
        *,
        validity_threshold: float = 0.5,
        redundancy_threshold: float = 0.15,
        backend: str = "auto",
        device: torch.device | str | None = None,
    ):
        if not isinstance(dataset, self._dataset_type):
            raise TypeError(f"dataset must be a {self._dataset_type.__name__} ({self._loader}), got "
                            f"{type(dataset).__name__}")
        self.dataset = dataset
        self.validity_threshold = _finite_number("validity_threshold", validity_threshold)
        self.redundancy_threshold = _finite_number("redundancy_threshold", redundancy_threshold)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
        self.backend = backend
        if device is not None and not isinstance(device, (str, torch.device)):
            raise TypeError(f"device must be a torch.device, a string or None, got {type(device).__name__}")
        self._device = None if device is None else torch.device(device)
        self.reset()

    def reset(self) -> None:
        """Forget every prediction (the device the state lives on is kept)."""
        # One entry per update (after a compute(), one for everything joined so far): sample_pos, step_counts, valid,
        # has_redundancy and the per-step fields, each a tensor or None.
        self._parts: list[dict[str, torch.Tensor | None]] = []
        # Argument name -> a device bool that is True once an update's value for it was bad.
        self._bad: dict[str, torch.Tensor] = {}

    @property
    def device(self) -> torch.device | None:
        """Where the state lives: ``device=``, else the first update's device (None before it)."""
        return self._device

    def update(
        self,
        sample_pos: torch.Tensor | Sequence[int],
        step_scores: torch.Tensor | Sequence | None,
        cu_steps: torch.Tensor | None = None,
        *,
        step_labels: torch.Tensor | Sequence | None = None,
        redundancy_scores: torch.Tensor | Sequence | None = None,
        redundancy_labels: torch.Tensor | Sequence | None = None,
        valid: torch.Tensor | None = None,
    ) -> None:
        """Add the step predictions of B samples (the flat predictions layout's names).

        The per-step arguments come either flat, as (S,) tensors with ``cu_steps``, or ragged, as B per-sample 1-D
        tensors (or lists of numbers) without ``cu_steps``: ``update(positions, [scores_0, scores_1, ...])``.

        Args:
            sample_pos: (B,) int64 or int32 (or a list of B ints). The samples' positions in the metric's dataset.
            step_scores: (S,) float. Each step's validity score (None when only labels are given); labelled
                ``score > validity_threshold`` unless ``step_labels`` are given. Detached: the metric never holds an
                autograd graph. Must be finite.
            cu_steps: (B+1,) int32 or int64. Sample b's steps are ``[cu_steps[b], cu_steps[b+1])``. Not given with
                ragged arguments (their lengths are the step counts).
            step_labels: (S,) bool. The validity labels, when the model's rule is not a threshold of the scores.
            redundancy_scores, redundancy_labels: (S,) float / bool. Redundancy predictions (redundant = True,
                ``score > redundancy_threshold``); on ``redundency``/``circular`` samples the official evaluator
                scores NOT(redundancy label). Scores must be finite.
            valid: (B,) bool. False marks an invalid prediction (e.g. an unparseable critic answer): it has no
                steps and only lowers the validity rate.

        Raises:
            ValueError: naming the argument whose shape, dtype, device or values are wrong. CPU tensors are checked
                here; the values of device tensors (non-finite scores, positions outside the dataset, offsets) in
                ``compute()``, to keep ``update()`` free of host syncs.
        """
        given = {"step_scores": step_scores, "step_labels": step_labels, "redundancy_scores": redundancy_scores,
                 "redundancy_labels": redundancy_labels}
        if step_scores is None and step_labels is None:
            raise ValueError("update() needs step_scores or step_labels")
        ragged = [name for name, value in given.items() if value is not None and not isinstance(value, torch.Tensor)]
        num_samples = _num_samples(sample_pos)
        step_counts = None
        if ragged:
            if cu_steps is not None:
                raise ValueError("cu_steps must not be given with per-sample lists: their lengths are the step counts")
            flat = [name for name, value in given.items() if isinstance(value, torch.Tensor)]
            if flat:
                raise ValueError(f"{flat[0]}: a flat tensor, but {ragged[0]} is per-sample; pass both alike")
            lengths = None
            for name in ragged:
                given[name], these = _flatten(name, given[name], num_samples, self._device)
                if lengths is not None and these != lengths:
                    raise PredictionError(f"{name}: per-sample lengths {these} differ from {ragged[0]}'s {lengths}")
                lengths = these
            # On the host: moved to the state's device in compute(), so update() makes no transfer.
            step_counts = torch.tensor(lengths, dtype=torch.int64)
        # The scores (else the labels) set the step count S and the device every other tensor must match.
        reference_name = "step_scores" if step_scores is not None else "step_labels"
        reference = given[reference_name]
        expect_tensor(reference_name, reference, (None,), FLOAT_DTYPES if step_scores is not None else (torch.bool,))
        device, num_steps = reference.device, reference.shape[0]
        if self._device is not None and device != self._device:
            raise PredictionError(f"{reference_name}: on {device}, but the metric's state is on {self._device} "
                                  "(every update on one device)")
        for name, shape, dtypes in (("step_labels", (num_steps,), (torch.bool,)),
                                    ("redundancy_scores", (num_steps,), FLOAT_DTYPES),
                                    ("redundancy_labels", (num_steps,), (torch.bool,))):
            if given[name] is not None:
                expect_tensor(name, given[name], shape, dtypes, device)
        if valid is not None:
            expect_tensor("valid", valid, (num_samples,), (torch.bool,), device)
        # Value checks: at once on the host (numpy, no device to wait for: the batch is refused before it enters
        # the state), as device flags read in compute() otherwise.
        flags: dict[str, torch.Tensor | bool] = {}
        if isinstance(sample_pos, torch.Tensor):
            expect_tensor("sample_pos", sample_pos, (num_samples,), _INTEGERS, device)
            sample_pos = sample_pos.long()
        else:
            sample_pos = torch.tensor(sample_pos, dtype=torch.int64)  # host: checked at once, moved in compute()
        flags["sample_pos"] = _outside(sample_pos, len(self.dataset))
        if step_counts is None:
            if cu_steps is None:
                raise ValueError("cu_steps is needed with flat (S,) step tensors (or pass per-sample lists)")
            expect_tensor("cu_steps", cu_steps, (num_samples + 1,), _INTEGERS, device)
            flags["cu_steps"] = _bad_offsets(cu_steps, num_steps)
            step_counts = torch.diff(cu_steps).long()
        for name in ("step_scores", "redundancy_scores"):
            if given[name] is not None:
                given[name] = given[name].detach()
                flags[name] = _non_finite(given[name])
        for name, flag in flags.items():
            if isinstance(flag, torch.Tensor):
                self._bad[name] = flag if name not in self._bad else self._bad[name] | flag
            elif flag:
                _raise_flagged({name: True})
        if given["step_labels"] is None:
            given["step_labels"] = given["step_scores"] > self.validity_threshold
        if given["redundancy_labels"] is None and given["redundancy_scores"] is not None:
            given["redundancy_labels"] = given["redundancy_scores"] > self.redundancy_threshold
        self._device = device
        self._parts.append({"sample_pos": sample_pos, "step_counts": step_counts, "valid": valid,
                            "has_redundancy": None, "num_steps": num_steps, "num_samples": num_samples,
                            **{_STEP_FIELDS[name]: given[name] for name in _STEP_FIELDS}})

    def compute(self) -> Report:
        """The report of every prediction so far (all ranks' under ``torch.distributed``): ``evaluate()``'s numbers
        for the same predictions.

        Raises:
            PredictionError (a ValueError): nothing was updated (on any rank), as ``evaluate()`` refuses no
                predictions; a value ``update()`` could not check without a host sync was bad (naming the argument).
        """
        if self._bad:
            names = list(self._bad)
            _raise_flagged(dict(zip(names, torch.stack([self._bad[n] for n in names]).tolist())))
        # The joins and the evaluator's ops are small host work for CPU predictions (prmbench_fast.host_threads).
        with single_threaded(self._device or "cpu", sum(p["num_steps"] for p in self._parts)):
            predictions = gather_predictions(self._joined())
            if predictions.num_samples == 0:
                raise PredictionError("no predictions: nothing to evaluate (compute() before any update())")
            return self._evaluate(predictions)

    def _evaluate(self, predictions: StepPredictions) -> Report:
        return evaluate_steps(self.dataset, predictions, backend=self.backend)

    def _joined(self) -> StepPredictions:
        """The state as one ``StepPredictions``; the joined tensors replace the per-update entries."""
        if not self._parts:
            return StepPredictions.empty(self._device or _collective_device())
        device = self._device
        parts = self._parts
        if len(parts) > 1:
            joined = {"num_steps": sum(p["num_steps"] for p in parts),
                      "num_samples": sum(p["num_samples"] for p in parts)}
            for name in ("sample_pos", "step_counts"):  # host tensors (from lists) move here, not in update()
                joined[name] = torch.cat([p[name] if p[name].device == device else p[name].to(device) for p in parts])
            with_redundancy = [p["redundancy_labels"] is not None for p in parts]
            if any(with_redundancy) and (not all(with_redundancy) or any(p["has_redundancy"] is not None
                                                                         for p in parts)):
                # Some updates had no redundancy labels: their samples are scored by validity labels alone
                # (StepPredictions.with_fields).
                joined["has_redundancy"] = torch.cat([
                    p["has_redundancy"] if p["has_redundancy"] is not None
                    else torch.full((p["num_samples"],), has, dtype=torch.bool, device=device)
                    for p, has in zip(parts, with_redundancy)])
            else:
                joined["has_redundancy"] = None
            joined["valid"] = _joined_or_filled(parts, "valid", "num_samples", True, device)
            for name in _STEP_FIELDS.values():
                fill = math.nan if name.endswith("scores") else False
                joined[name] = _joined_or_filled(parts, name, "num_steps", fill, device)
            self._parts = parts = [joined]
        part = parts[0]
        counts = part["step_counts"].to(device)
        cu_steps = torch.zeros(counts.numel() + 1, dtype=torch.int64, device=device)
        torch.cumsum(counts, 0, out=cu_steps[1:])
        return StepPredictions(
            sample_pos=part["sample_pos"].to(device), cu_steps=cu_steps, validity_labels=part["validity_labels"],
            validity_scores=part["validity_scores"], redundancy_labels=part["redundancy_labels"],
            redundancy_scores=part["redundancy_scores"], has_redundancy=part["has_redundancy"], valid=part["valid"],
        )


class ProcessBenchMetric(PRMBenchMetric):
    """:class:`PRMBenchMetric` for ProcessBench: the same ``update()`` (a sample's prediction is its first step
    labelled wrong, ``score > validity_threshold`` unless labels are given; -1 if none; ``valid=False``: an invalid
    prediction, which never matches), and ``compute()`` gives the
    :class:`~prmbench_fast.tasks.processbench.ProcessBenchReport` ``evaluate(..., task="processbench")`` gives for
    the same predictions. Redundancy arguments are accepted and ignored (ProcessBench has no redundancy rule).

    Example::

        data = prmbench_fast.load_prmbench("processbench/", task="processbench")
        metric = ProcessBenchMetric(data, validity_threshold=0.5, device=device)
        metric.update(batch.sample_pos, step_scores, batch.cu_steps)
        metric.compute().table   # {"gsm8k": F1, ..., "F1": average}
    """

    _dataset_type = ProcessBenchDataset
    _loader = 'prmbench_fast.load_prmbench(path, task="processbench")'

    def _evaluate(self, predictions: StepPredictions) -> ProcessBenchReport:
        return evaluate_processbench(self.dataset, predictions)


def _joined_or_filled(parts: list[dict], name: str, length: str, fill, device) -> torch.Tensor | None:
    """Field ``name`` of every part concatenated (``torch.cat`` promotes dtypes), a part without it filled with
    ``fill`` (the value ``StepPredictions.OPTIONAL_FIELDS`` gives a prediction without it); None when no part has it."""
    present = [p[name] for p in parts if p[name] is not None]
    if not present:
        return None
    if len(present) == len(parts):
        return torch.cat(present)
    dtype = present[0].dtype
    return torch.cat([p[name] if p[name] is not None else torch.full((p[length],), fill, dtype=dtype, device=device)
                      for p in parts])


def _outside(positions: torch.Tensor, size: int) -> torch.Tensor | bool:
    """Whether a position lies outside ``[0, size)``: a bool for host tensors, a device flag otherwise."""
    if positions.device.type == "cpu":
        values = positions.numpy()
        return bool(values.size) and bool(values.min() < 0 or values.max() >= size)
    return ((positions < 0) | (positions >= size)).any()


def _bad_offsets(cu_steps: torch.Tensor, num_steps: int) -> torch.Tensor | bool:
    """Whether ``cu_steps`` breaks the layout (first 0, non-decreasing, last S)."""
    if cu_steps.device.type == "cpu":
        values = cu_steps.numpy()
        return bool(values[0] != 0 or values[-1] != num_steps or (values[1:] < values[:-1]).any())
    return (cu_steps[0] != 0) | (cu_steps[-1] != num_steps) | (cu_steps[1:] < cu_steps[:-1]).any()


def _non_finite(scores: torch.Tensor) -> torch.Tensor | bool:
    """Whether a score is NaN or infinite (bfloat16, which numpy lacks, goes through torch on the host too)."""
    if scores.device.type == "cpu":
        if scores.dtype == torch.bfloat16:
            return not bool(torch.isfinite(scores).all())
        return not bool(np.isfinite(scores.numpy()).all())
    return ~torch.isfinite(scores).all()


def _raise_flagged(flags: dict[str, torch.Tensor | bool]) -> None:
    messages = {
        "cu_steps": "cu_steps: must start at 0, be non-decreasing and end at S (the number of steps)",
        "sample_pos": "sample_pos: positions must lie in [0, len(dataset)) (the metric dataset's samples)",
    }
    for name, flag in flags.items():
        if bool(flag):
            raise PredictionError(messages.get(name, f"{name}: non-finite values (NaN or inf); a score must be a "
                                                     "finite number (pass step_labels for steps without a score)"))


def _finite_number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a finite number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _num_samples(sample_pos) -> int:
    """B, from a tensor's shape or a list's length; anything else is refused naming ``sample_pos``."""
    if isinstance(sample_pos, torch.Tensor):
        if sample_pos.dim() != 1:
            raise PredictionError(f"sample_pos: expected shape (n,), got {tuple(sample_pos.shape)}")
        return sample_pos.shape[0]
    if isinstance(sample_pos, (str, bytes)) or not isinstance(sample_pos, Sequence) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in sample_pos):
        raise PredictionError(f"sample_pos: expected a tensor or a list of ints, got {type(sample_pos).__name__}")
    return len(sample_pos)


def _flatten(name: str, pieces, num_samples: int, device: torch.device | None) -> tuple[torch.Tensor, list[int]]:
    """Per-sample 1-D tensors (or lists of numbers, then moved to ``device`` at once) as one (S,) tensor, and the
    per-sample lengths (host metadata)."""
    labels = name.endswith("labels")
    if isinstance(pieces, (str, bytes)) or not isinstance(pieces, Sequence) or len(pieces) != num_samples:
        got = f"{len(pieces)} items" if isinstance(pieces, Sequence) else type(pieces).__name__
        raise PredictionError(f"{name}: expected one sequence per sample ({num_samples}), got {got}")
    tensors = []
    for b, piece in enumerate(pieces):
        if not isinstance(piece, torch.Tensor):
            try:
                piece = torch.tensor(piece, dtype=torch.bool if labels else torch.float32)
            except (TypeError, ValueError, RuntimeError) as error:
                raise PredictionError(f"{name}[{b}]: expected a 1-D tensor or a list of numbers ({error})") from None
        if piece.dim() != 1:
            raise PredictionError(f"{name}[{b}]: expected a 1-D sequence, got shape {tuple(piece.shape)}")
        tensors.append(piece)
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise PredictionError(f"{name}: the per-sample tensors lie on several devices ({sorted(map(str, devices))})")
    lengths = [t.numel() for t in tensors]
    if not tensors:
        flat = torch.zeros(0, dtype=torch.bool if labels else torch.float32)
    else:
        flat = torch.cat(tensors)
    if device is not None and not any(isinstance(piece, torch.Tensor) for piece in pieces):
        flat = flat.to(device)
    return flat, lengths


def _collective_device() -> torch.device:
    """Where a rank without predictions or a ``device=`` keeps its empty state: the device its process group
    communicates on (the group's bound device when ``init_process_group(device_id=...)`` set one)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if torch.distributed.get_backend() == "nccl":
            bound = getattr(torch.distributed.distributed_c10d._get_default_group(), "bound_device_id", None)
            return bound if bound is not None else torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
