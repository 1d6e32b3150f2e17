"""``PRMBenchMetric``: the official PRMBench evaluator as a streaming metric on the device (torchmetrics style).

A thin stateful class over the functional evaluator (:func:`prmbench_fast.evaluate.evaluate_steps`): ``update()``
keeps each batch's step predictions as tensors on their device, in the flat predictions layout
(``prmbench_fast.predictions``), without host syncs; ``compute()`` concatenates them (all ranks' under
``torch.distributed``) and evaluates them with one call of the counting op. The state is the predictions themselves,
not running counts: the official similarity metric compares each sample with its clean ``correct_*`` partner, which may
arrive in another batch or on another rank, and the first prediction of a sample must win over later ones.
"""

from __future__ import annotations

import torch

from .data import PRMBenchDataset
from .distributed import gather_predictions
from .evaluate import Report, evaluate_steps
from .predictions import FLOAT_DTYPES, StepPredictions, expect_tensor

_INTEGERS = (torch.int32, torch.int64)


class PRMBenchMetric:
    """Accumulate step predictions batch by batch; ``compute()`` gives the same :class:`Report` as ``evaluate()``.

    Example::

        metric = PRMBenchMetric(dataset)
        for batch in batches:
            metric.update(batch.sample_pos, step_scores, batch.cu_steps)
        report = metric.compute()   # report.table["Overall"], report.official ...
        metric.reset()

    A sample updated twice counts once: the first update wins, as the official evaluator keeps the first result per
    sample. Under ``torch.distributed`` ranks update disjoint samples (if not, the lowest rank's prediction wins) and
    ``compute()``, called on every rank, returns the same report everywhere.
    """

    def __init__(
        self,
        dataset: PRMBenchDataset,
        *,
        validity_threshold: float = 0.5,
        redundancy_threshold: float = 0.15,
        backend: str = "auto",
    ):
        self.dataset = dataset
        self.validity_threshold = float(validity_threshold)
        self.redundancy_threshold = float(redundancy_threshold)
        self.backend = backend
        self._parts: list[StepPredictions] = []

    def update(
        self,
        sample_pos: torch.Tensor,
        step_scores: torch.Tensor | None,
        cu_steps: torch.Tensor,
        *,
        step_labels: torch.Tensor | None = None,
        redundancy_scores: torch.Tensor | None = None,
        redundancy_labels: torch.Tensor | None = None,
        valid: torch.Tensor | None = None,
    ) -> None:
        """Add the step predictions of B samples (the flat predictions layout's names).

        Args:
            sample_pos: (B,) int64 or int32. The samples' positions in the metric's dataset.
            step_scores: (S,) float. Each step's validity score (None when only labels are given); labelled
                ``score > validity_threshold`` unless ``step_labels`` are given.
            cu_steps: (B+1,) int32 or int64. Sample b's steps are ``[cu_steps[b], cu_steps[b+1])``.
            step_labels: (S,) bool. The validity labels, when the model's rule is not a threshold of the scores.
            redundancy_scores, redundancy_labels: (S,) float / bool. Redundancy predictions (redundant = True,
                ``score > redundancy_threshold``); on ``redundency``/``circular`` samples the official evaluator
                scores NOT(redundancy label).
            valid: (B,) bool. False marks an invalid prediction (e.g. an unparseable critic answer): it has no
                steps and only lowers the validity rate.

        Raises:
            ValueError: naming the argument whose shape, dtype or device is wrong. Positions and offsets are checked
                against the data at once for CPU tensors, and in ``compute()`` for device tensors (checking them here
                would synchronise the host).
        """
        if step_scores is None and step_labels is None:
            raise ValueError("update() needs step_scores or step_labels")
        # The scores (else the labels) set the step count S and the device every other tensor must match.
        reference_name = "step_scores" if step_scores is not None else "step_labels"
        reference = step_scores if step_scores is not None else step_labels
        expect_tensor(reference_name, reference, (None,), FLOAT_DTYPES if step_scores is not None else (torch.bool,))
        device, num_steps = reference.device, reference.shape[0]
        expect_tensor("sample_pos", sample_pos, (None,), _INTEGERS, device)
        num_samples = sample_pos.shape[0]
        expect_tensor("cu_steps", cu_steps, (num_samples + 1,), _INTEGERS, device)
        for name, tensor, shape, dtypes in (
            ("step_labels", step_labels, (num_steps,), (torch.bool,)),
            ("redundancy_scores", redundancy_scores, (num_steps,), FLOAT_DTYPES),
            ("redundancy_labels", redundancy_labels, (num_steps,), (torch.bool,)),
            ("valid", valid, (num_samples,), (torch.bool,)),
        ):
            if tensor is not None:
                expect_tensor(name, tensor, shape, dtypes, device)
        if step_labels is None:
            step_labels = step_scores > self.validity_threshold
        if redundancy_labels is None and redundancy_scores is not None:
            redundancy_labels = redundancy_scores > self.redundancy_threshold
        part = StepPredictions(
            sample_pos=sample_pos.long(),
            cu_steps=cu_steps,
            validity_labels=step_labels,
            validity_scores=step_scores,
            redundancy_labels=redundancy_labels,
            redundancy_scores=redundancy_scores,
            valid=valid,
        )
        if part.device.type == "cpu":
            part.check(len(self.dataset))
        self._parts.append(part)

    def compute(self) -> Report:
        """The report of every prediction so far (all ranks' under ``torch.distributed``): ``evaluate()``'s numbers
        for the same predictions."""
        local = StepPredictions.concat(self._parts) if self._parts else StepPredictions.empty(_collective_device())
        predictions = gather_predictions(local)
        return evaluate_steps(self.dataset, predictions, backend=self.backend)

    def reset(self) -> None:
        self._parts.clear()


def _collective_device() -> torch.device:
    """Where a rank without predictions keeps its empty state: the device its process group communicates on."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if torch.distributed.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
