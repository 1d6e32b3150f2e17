"""Plain-torch references of the compiled ops.

Each function has the signature and semantics of its fast counterpart and is the oracle the tests compare against;
it is also what ``backend="torch"`` runs.
"""

from __future__ import annotations

import torch


def step_confusion_reference(
    step_values: torch.Tensor,
    thresholds: torch.Tensor,
    cu_labels: torch.Tensor,
    error_steps: torch.Tensor,
    cu_errors: torch.Tensor,
    sample_class: torch.Tensor,
    num_classes: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Compare per-step labels with the error steps and count the PRMBench confusion matrix.

    This is the official ``eval_on_hallucination_step`` for a whole batch of samples: the labels a sample emits drive
    everything (its step count is never used), a correct step is the positive class, and an error step index that
    falls past the sample's last label is never scored.

    Args:
        step_values: (N,), bool, float32 or float64. Every sample's labels (or scores), concatenated.
            Bool values are the labels; floating values become labels by ``value > thresholds[sample]``, compared in
            float64 (the official adapters compare Python floats).
        thresholds: (B,), float64. Per-sample threshold; read only when ``step_values`` is floating.
        cu_labels: (B+1,), int64. Offsets of each sample's labels in ``step_values``; ``cu_labels[0] == 0``,
            non-decreasing, ``cu_labels[B] == N``.
        error_steps: (E,), int64. Every sample's ground-truth error steps, 0-based, concatenated (any order; values
            past the sample's labels are allowed and ignored).
        cu_errors: (B+1,), int64. Offsets of each sample's error steps in ``error_steps``.
        sample_class: (B,), int64. Class id of each sample, in ``[0, num_classes)``.
        num_classes: number of classes (rows of the per-class counts).

    Returns:
        class_counts: (num_classes, 4), int64. TP, FP, TN, FN summed over the samples of each class.
        sample_counts: (B, 6), int64. Per sample: TP, FP, TN, FN, the number of positive labels, and the first-error
            hit: 1 if the label at the first (smallest) error step is negative, 0 if it is positive, -1 if the sample
            has no error step or its first error step is past its last label.
    """
    device = step_values.device
    num_samples = cu_labels.numel() - 1
    if step_values.dtype == torch.bool:
        labels = step_values
    else:
        label_counts = cu_labels[1:] - cu_labels[:-1]
        per_label_threshold = torch.repeat_interleave(thresholds.to(torch.float64), label_counts)
        labels = step_values.to(torch.float64) > per_label_threshold

    label_counts = cu_labels[1:] - cu_labels[:-1]
    error_counts = cu_errors[1:] - cu_errors[:-1]
    sample_of_error = torch.repeat_interleave(torch.arange(num_samples, device=device), error_counts)

    # Mark the labels that sit on an in-range error step.
    in_range = error_steps < label_counts[sample_of_error]
    is_error = torch.zeros_like(labels)
    is_error[cu_labels[sample_of_error[in_range]] + error_steps[in_range]] = True

    sample_of_label = torch.repeat_interleave(torch.arange(num_samples, device=device), label_counts)
    per_label = torch.stack(
        [labels & ~is_error, labels & is_error, ~labels & is_error, ~labels & ~is_error, labels], dim=1
    ).to(torch.int64)
    sample_counts = torch.zeros(num_samples, 6, dtype=torch.int64, device=device)
    sample_counts[:, :5].index_add_(0, sample_of_label, per_label)

    # First error step: the smallest error index of each sample, scored only when a label exists there.
    big = torch.iinfo(torch.int64).max
    first_error = torch.full((num_samples,), big, dtype=torch.int64, device=device)
    first_error.scatter_reduce_(0, sample_of_error, error_steps, reduce="amin")
    scored = first_error < label_counts
    first_error_hit = torch.full((num_samples,), -1, dtype=torch.int64, device=device)
    first_error_hit[scored] = (~labels[cu_labels[:-1][scored] + first_error[scored]]).to(torch.int64)
    sample_counts[:, 5] = first_error_hit

    class_counts = torch.zeros(num_classes, 4, dtype=torch.int64, device=device)
    class_counts.index_add_(0, sample_class, sample_counts[:, :4])
    return class_counts, sample_counts
