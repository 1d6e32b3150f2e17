"""The boundary of the compiled ops: loading ``prmbench_fast._C``, fake kernels, and ``backend=`` dispatch (and the
compiled walk over result dicts that ``parse_results`` uses when it is there).

The extension is optional: if it is missing, fails to load, or was built without its CUDA kernel (a CPU-only build on
a GPU machine), this module still imports and ``backend="auto"`` counts with the torch reference instead (identical
counts), warning once with the cause and the fix. Only an explicit ``backend="cpu"``/``"cuda"`` insists on the compiled
op and raises, naming the rebuild command. Nothing here touches CUDA at import.
"""

from __future__ import annotations

import torch

from prmbench_fast.compat import has_kernel, warn_once
from prmbench_fast.reference import step_confusion_reference

#: The command that (re)builds the extension against the installed torch: from the repository root, or with the
#: source distribution's path instead of ``.``.
REBUILD_COMMAND = "pip install --no-build-isolation -e ."
#: The registered name of the counting op.
OP_NAME = "prmbench_fast::step_confusion"
#: Values accepted by the ``backend`` argument of :func:`step_confusion`.
BACKENDS = ("auto", "cpu", "cuda", "torch")
_TENSOR_ARGUMENTS = ("step_values", "thresholds", "cu_labels", "error_steps", "cu_errors", "sample_class")
#: The bits of the op's third output, ``bad_input`` (enum BadInput in csrc/step_confusion.h).
BAD_INPUT_FLAGS = {
    1: "cu_labels must start at 0, never decrease and end at len(step_values)",
    2: "cu_errors must start at 0, never decrease and end at len(error_steps)",
    4: "error_steps must be 0-based (>= 0)",
    8: "sample_class must be in [0, num_classes)",
}

try:
    # Loading the shared object runs its TORCH_LIBRARY registrations.
    import prmbench_fast._C as _C

    HAS_C_EXTENSION = True
    C_IMPORT_ERROR: ImportError | None = None
except ImportError as error:
    _C = None
    HAS_C_EXTENSION = False
    C_IMPORT_ERROR = error

#: The compiled walk over official result dicts (csrc/result_dicts.cpp; predictions.parse_results' fast path), or None
#: where the extension did not load or was built before the walk existed: parse_results then walks in Python.
flat_from_results = getattr(_C, "flat_from_results", None)


def compiled_kernel_missing(device_type: str) -> str | None:
    """Why the compiled op cannot count tensors on ``device_type`` ("cpu", "cuda"), or None when it can."""
    if not HAS_C_EXTENSION:
        error = f"{type(C_IMPORT_ERROR).__name__}: {C_IMPORT_ERROR}"
        return f"the compiled extension prmbench_fast._C did not load ({error})"
    if not has_kernel(OP_NAME, device_type.upper()):
        return (
            f"prmbench_fast._C was built without a {device_type.upper()} kernel (built against a torch without "
            f"{device_type.upper()}, or without a matching toolkit)"
        )
    return None


if HAS_C_EXTENSION:

    @torch.library.register_fake("prmbench_fast::step_confusion")
    def _step_confusion_fake(
        step_values, thresholds, cu_labels, error_steps, cu_errors, sample_class, num_classes
    ):
        # Output shapes depend only on input shapes (B from cu_labels) and num_classes: no data-dependent sizes.
        num_samples = cu_labels.shape[0] - 1
        class_counts = cu_labels.new_empty((num_classes, 4), dtype=torch.int64)
        sample_counts = cu_labels.new_empty((num_samples, 6), dtype=torch.int64)
        bad_input = cu_labels.new_empty((), dtype=torch.int32)
        return class_counts, sample_counts, bad_input


def _check_device_type(tensors: dict[str, torch.Tensor], backend: str) -> None:
    for name, tensor in tensors.items():
        if tensor.device.type != backend:
            raise ValueError(
                f'backend="{backend}" needs {backend.upper()} tensors, but {name} is on {tensor.device}; '
                'use backend="auto" to follow the tensors\' device'
            )


def step_confusion(
    step_values: torch.Tensor,
    thresholds: torch.Tensor,
    cu_labels: torch.Tensor,
    error_steps: torch.Tensor,
    cu_errors: torch.Tensor,
    sample_class: torch.Tensor,
    num_classes: int,
    *,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Compare per-step labels with the error steps and count the PRMBench confusion matrix.

    Same arguments, semantics and results as :func:`prmbench_fast.reference.step_confusion_reference` (the official
    ``eval_on_hallucination_step`` over a whole batch; a correct step is the positive class), computed by the compiled
    op ``prmbench_fast::step_confusion``.

    Args:
        step_values: (N,), bool, float32 or float64. Every sample's labels (or scores), concatenated; floating values
            become labels by ``value > thresholds[sample]`` in float64.
        thresholds: (B,), float64. Per-sample threshold; read only when ``step_values`` is floating.
        cu_labels: (B+1,), int64. Offsets of each sample's labels in ``step_values``, from 0 to N, non-decreasing.
        error_steps: (E,), int64. Every sample's ground-truth error steps, 0-based, concatenated (any order; values
            past the sample's labels are ignored).
        cu_errors: (B+1,), int64. Offsets of each sample's error steps in ``error_steps``, from 0 to E.
        sample_class: (B,), int64. Class id of each sample, in ``[0, num_classes)``.
        num_classes: number of classes (rows of the per-class counts), at least 1.
        backend: ``"auto"`` runs the compiled op for the tensors' device, or the torch reference when the extension
            has no kernel for it (missing, failed to load, built without CUDA), warning once; ``"cpu"`` and
            ``"cuda"`` run the compiled op and require every tensor on that device type; ``"torch"`` runs the
            plain-torch reference.

    Returns:
        class_counts: (num_classes, 4), int64. TP, FP, TN, FN summed over the samples of each class.
        sample_counts: (B, 6), int64. Per sample: TP, FP, TN, FN, the number of positive labels, and the first-error
            hit (1 if the label at the smallest error step is negative, 0 if positive, -1 if the sample has no error
            step or its first error step is past its last label).

    Raises:
        ValueError: unknown ``backend``, or tensors on another device type than ``backend`` names.
        RuntimeError: ``backend="cpu"``/``"cuda"`` and the compiled op has no kernel for it (the message names the
            cause and the rebuild command), or the op
            rejected its inputs (the message names the argument and the expected shape, dtype or range), the same
            error on both devices. The CPU op checks the data before counting. The CUDA op checks it in the kernel
            and reports it through a flag (a device-side assert would poison the process's CUDA context): reading
            that flag is this function's one host synchronisation, and on a bad flag the CPU op runs on a host
            copy of the inputs to raise its error. Either way the process and its CUDA context stay usable.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(map(repr, BACKENDS))}")
    args = (step_values, thresholds, cu_labels, error_steps, cu_errors, sample_class, num_classes)
    if backend == "torch":
        return step_confusion_reference(*args)
    if backend != "auto":
        _check_device_type(dict(zip(_TENSOR_ARGUMENTS, args)), backend)
    missing = compiled_kernel_missing(step_values.device.type) if step_values.device.type in ("cpu", "cuda") else None
    if missing is not None:
        if backend != "auto":
            # The import error (None when the op loaded without this device's kernel) is the cause to show.
            raise RuntimeError(f"{missing}; rebuild it against this torch with: {REBUILD_COMMAND}") from C_IMPORT_ERROR
        warn_once(
            f"step_confusion:{step_values.device.type}",
            f"{missing}: counting with the torch reference instead (identical counts, slower). To build it: "
            f"{REBUILD_COMMAND} (from the repository root, or the source distribution in place of '.')",
        )
        return step_confusion_reference(*args)
    class_counts, sample_counts, bad_input = torch.ops.prmbench_fast.step_confusion(*args)
    flags = int(bad_input)
    if flags:
        _raise_bad_input(args, flags)
    return class_counts, sample_counts


def _raise_bad_input(args: tuple, flags: int) -> None:
    """Raise the CPU op's error for inputs the CUDA op flagged (the CPU op names the first offending index)."""
    torch.ops.prmbench_fast.step_confusion(*(a.cpu() if isinstance(a, torch.Tensor) else a for a in args))
    problems = "; ".join(text for bit, text in BAD_INPUT_FLAGS.items() if flags & bit)
    raise AssertionError(f"the CUDA op flagged inputs the CPU op accepts ({problems}): csrc/ checks disagree")
