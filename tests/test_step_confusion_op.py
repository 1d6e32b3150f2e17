"""prmbench_fast::step_confusion: the compiled CPU op against the torch reference and the official per-sample loop.

Counts are compared exactly (torch.equal). The oracle below is a plain transcription of the official
``eval_on_hallucination_step`` (PRMBENCH_SPEC §2.2), independent of both the reference and the C++ code.
The CUDA op runs the same counting code (csrc/step_confusion.h); tests/test_gpu.py checks it on a GPU.
"""

from __future__ import annotations

import importlib.util
import re
import sys
import warnings

import pytest
import torch

from conftest import REPO_ROOT
import prmbench_fast.compat as compat
import prmbench_fast.ops as ops
from prmbench_fast.reference import step_confusion_reference

# No skip when prmbench_fast._C is missing: the compiled op is what this file tests, so a broken build must fail here
# (with the rebuild command in the message), not pass as skipped.

# ---------------------------------------------------------------------------------------------------------------------
# The oracle: the official per-sample loop, then a per-class sum.


def official_sample(error_steps: list[int], labels: list[bool]) -> list[int]:
    """``eval_on_hallucination_step`` with 0-based error steps: [TP, FP, TN, FN, sum(labels), first_error_hit]."""
    tp = fp = tn = fn = 0
    first_error_acc = []
    first_error = min(error_steps) if error_steps else None
    for idx in range(len(labels)):
        if idx == first_error:
            first_error_acc.append(1 if labels[idx] == 0 else 0)
        if idx in error_steps:
            if labels[idx] == 1:
                fp += 1
            else:
                tn += 1
        else:
            if labels[idx] == 1:
                tp += 1
            else:
                fn += 1
    return [tp, fp, tn, fn, sum(labels), first_error_acc[0] if first_error_acc else -1]


def official_counts(samples: list[dict], num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample rows and per-class sums of :func:`official_sample`, labels made as ``float(value) > threshold``."""
    rows, sums = [], [[0, 0, 0, 0] for _ in range(num_classes)]
    for sample in samples:
        labels = [v if isinstance(v, bool) else float(v) > sample["threshold"] for v in sample["values"]]
        row = official_sample(sample["errors"], labels)
        rows.append(row)
        sums[sample["cls"]] = [total + count for total, count in zip(sums[sample["cls"]], row[:4])]
    return torch.tensor(sums, dtype=torch.int64), torch.tensor(rows, dtype=torch.int64).reshape(-1, 6)


# ---------------------------------------------------------------------------------------------------------------------
# Packing samples into the op's ragged layout.


def pack(samples: list[dict], dtype: torch.dtype) -> tuple:
    """The op's arguments (without num_classes) for a list of {values, threshold, errors, cls} samples."""
    values = [v for sample in samples for v in sample["values"]]
    errors = [e for sample in samples for e in sample["errors"]]
    cu_labels = [0]
    cu_errors = [0]
    for sample in samples:
        cu_labels.append(cu_labels[-1] + len(sample["values"]))
        cu_errors.append(cu_errors[-1] + len(sample["errors"]))
    return (
        torch.tensor(values, dtype=dtype).reshape(-1),
        torch.tensor([s["threshold"] for s in samples], dtype=torch.float64).reshape(-1),
        torch.tensor(cu_labels, dtype=torch.int64),
        torch.tensor(errors, dtype=torch.int64).reshape(-1),
        torch.tensor(cu_errors, dtype=torch.int64),
        torch.tensor([s["cls"] for s in samples], dtype=torch.int64).reshape(-1),
    )


def as_stored(samples: list[dict], dtype: torch.dtype) -> list[dict]:
    """The samples with each value rounded to `dtype`, as the oracle must see what the op sees (float32 0.1 > 0.1)."""
    if dtype == torch.bool:
        return [{**s, "values": [bool(v) for v in s["values"]]} for s in samples]
    return [{**s, "values": torch.tensor(s["values"], dtype=dtype).tolist()} for s in samples]


def assert_all_agree(samples: list[dict], dtype: torch.dtype, num_classes: int) -> None:
    args = (*pack(samples, dtype), num_classes)
    expected = official_counts(as_stored(samples, dtype), num_classes)
    compiled = ops.step_confusion(*args, backend="cpu")
    reference = step_confusion_reference(*args)
    for name, got in (("compiled cpu", compiled), ("torch reference", reference)):
        assert torch.equal(got[0], expected[0]), f"{name} class_counts\n{got[0]}\n!= oracle\n{expected[0]}"
        assert torch.equal(got[1], expected[1]), f"{name} sample_counts\n{got[1]}\n!= oracle\n{expected[1]}"


# ---------------------------------------------------------------------------------------------------------------------
# Batches (tests/test_step_confusion_properties.py draws random ones).

def sample(values, errors, cls=0, threshold=0.5):
    return {"values": values, "threshold": threshold, "errors": errors, "cls": cls}


# ---------------------------------------------------------------------------------------------------------------------
# Named edge cases.


@pytest.mark.parametrize("dtype", [torch.bool, torch.float32, torch.float64])
def test_empty_batch(dtype):
    class_counts, sample_counts = ops.step_confusion(*pack([], dtype), 3, backend="cpu")
    assert torch.equal(class_counts, torch.zeros(3, 4, dtype=torch.int64))
    assert sample_counts.shape == (0, 6) and sample_counts.dtype == torch.int64


def test_samples_without_labels():
    samples = [sample([], [0, 2], cls=0), sample([], [], cls=1), sample([], [5], cls=1)]
    class_counts, sample_counts = ops.step_confusion(*pack(samples, torch.float32), 2, backend="cpu")
    assert torch.equal(class_counts, torch.zeros(2, 4, dtype=torch.int64))
    assert torch.equal(sample_counts, torch.tensor([[0, 0, 0, 0, 0, -1]] * 3))
    assert_all_agree(samples, torch.float32, 2)


def test_single_sample_by_hand():
    # Labels [1, 0, 1, 1, 0] with error steps {3, 1, 9}: steps 1 and 3 are errors, 9 is past the end.
    samples = [sample([0.9, 0.1, 0.7, 0.6, 0.2], [3, 1, 9], cls=1)]
    class_counts, sample_counts = ops.step_confusion(*pack(samples, torch.float64), 2, backend="cpu")
    # TP: steps 0, 2; FP: step 3; TN: step 1; FN: step 4. First error (1) is labelled negative: a hit.
    assert torch.equal(sample_counts, torch.tensor([[2, 1, 1, 1, 3, 1]]))
    assert torch.equal(class_counts, torch.tensor([[0, 0, 0, 0], [2, 1, 1, 1]]))


def test_first_error_past_last_label_is_unscored():
    samples = [sample([True, False], [4, 2]), sample([True, False, True], [2, 7])]
    _, sample_counts = ops.step_confusion(*pack(samples, torch.bool), 1, backend="cpu")
    assert sample_counts[:, 5].tolist() == [-1, 0]


def test_threshold_tie_is_negative():
    samples = [sample([0.5, 0.5000001], [], threshold=0.5)]
    _, sample_counts = ops.step_confusion(*pack(samples, torch.float64), 1, backend="cpu")
    assert sample_counts[0, 4].item() == 1


def test_duplicate_error_steps_count_once():
    # PRMBench has no duplicate error steps, but the official `idx in error_steps` test counts a repeated one once.
    samples = [sample([True, True, False], [1, 1, 2, 2, 2])]
    assert_all_agree(samples, torch.bool, 1)
    _, sample_counts = ops.step_confusion(*pack(samples, torch.bool), 1, backend="cpu")
    assert sample_counts[0, :4].tolist() == [1, 1, 1, 0]


def test_non_contiguous_inputs():
    samples = [sample([0.9, 0.1, 0.7], [1], cls=0), sample([0.2, 0.8], [0, 5], cls=1)]
    args = pack(samples, torch.float32)
    # Every tensor becomes a stride-2 view of a wider tensor holding the same values at even positions.
    strided = tuple(torch.stack([t, torch.full_like(t, 7)], dim=1).reshape(-1)[::2] for t in args)
    assert not any(t.is_contiguous() for t in strided if t.numel() > 1)
    got = ops.step_confusion(*strided, 2, backend="cpu")
    expected = ops.step_confusion(*args, 2, backend="cpu")
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_parallel_chunks_match_oracle():
    # More samples than two parallel_for chunks (kSamplesPerTask = 16,384 in step_confusion_cpu.cpp), so several
    # threads write rows and the class sum spans chunks.
    generator = torch.Generator().manual_seed(0)
    samples = []
    for b in range(40_000):
        num_labels = int(torch.randint(0, 8, (1,), generator=generator))
        values = torch.rand(num_labels, generator=generator).tolist()
        errors = torch.randperm(25, generator=generator)[: int(torch.randint(0, 4, (1,), generator=generator))]
        samples.append(sample(values, errors.tolist(), cls=b % 10))
    assert_all_agree(samples, torch.float32, 10)


@pytest.mark.parametrize("backend", ["auto", "cpu", "torch"])
def test_backends_agree(backend):
    samples = [sample([0.9, 0.1, 0.7], [1, 2], cls=0), sample([], [0], cls=2), sample([0.2, 0.8], [], cls=2)]
    expected = official_counts(as_stored(samples, torch.float32), 3)
    got = ops.step_confusion(*pack(samples, torch.float32), 3, backend=backend)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


# ---------------------------------------------------------------------------------------------------------------------
# torch.library.opcheck: schema, fake kernel, dispatch under AOT autograd with dynamic shapes.

OPCHECK_BATCHES = {
    "float32": ([sample([0.9, 0.1, 0.7], [1, 8], cls=0), sample([0.3], [], cls=1)], torch.float32),
    "float64": ([sample([0.5, 0.6], [1], cls=1), sample([], [2], cls=0), sample([0.1], [0], cls=1)], torch.float64),
    "bool": ([sample([True, False, False, True], [3, 0], cls=0)], torch.bool),
    "empty batch": ([], torch.bool),
}


@pytest.mark.parametrize("case", OPCHECK_BATCHES)
def test_opcheck(case):
    samples, dtype = OPCHECK_BATCHES[case]
    torch.library.opcheck(torch.ops.prmbench_fast.step_confusion.default, (*pack(samples, dtype), 2))


def test_fake_kernel_shapes():
    samples = [sample([0.9, 0.1], [1], cls=0)] * 3
    fake_args = tuple(t.to("meta") for t in pack(samples, torch.float32))
    class_counts, sample_counts, bad_input = torch.ops.prmbench_fast.step_confusion(*fake_args, 5)
    assert class_counts.shape == (5, 4) and sample_counts.shape == (3, 6) and bad_input.shape == ()
    assert class_counts.dtype == sample_counts.dtype == torch.int64 and bad_input.dtype == torch.int32
    assert class_counts.device.type == "meta"


def test_cpu_op_flags_nothing():
    # The CPU op raises on bad input (below), so its flag output is always 0.
    *_, bad_input = torch.ops.prmbench_fast.step_confusion(*valid_args())
    assert bad_input.dtype == torch.int32 and bad_input.shape == () and bad_input.item() == 0


# ---------------------------------------------------------------------------------------------------------------------
# Input validation.


def valid_args() -> list:
    samples = [sample([0.9, 0.1, 0.7], [1], cls=0), sample([0.2, 0.8], [0], cls=1)]
    return [*pack(samples, torch.float32), 2]


@pytest.mark.parametrize(
    "position, value, message",
    [
        (0, torch.tensor([1, 0, 1, 1, 0]), "step_values must be bool, float32 or float64, got Long"),
        (1, torch.tensor([0.5, 0.5], dtype=torch.float32), "thresholds must be Double, got Float"),
        (2, torch.tensor([0, 3, 5, 5]), r"cu_labels must have shape \(B\+1,\) = \(3,\), got \[4\] \(B = 2 is"),
        (2, torch.tensor([0, 3, 4]), r"cu_labels\[B\] must equal the length of step_values \(5\), got 4"),
        (2, torch.tensor([0, 6, 5]), r"cu_labels must be non-decreasing, got cu_labels\[1\] = 6 > cu_labels\[2\] = 5"),
        (2, torch.tensor([1, 3, 5]), r"cu_labels\[0\] must be 0, got 1"),
        (3, torch.tensor([1, -1]), r"error_steps must be 0-based \(>= 0\), got error_steps\[1\] = -1"),
        (4, torch.tensor([0, 1, 3]), r"cu_errors\[B\] must equal the length of error_steps \(2\), got 3"),
        (5, torch.tensor([0, 2]), r"sample_class\[1\] = 2 is out of range: .* \[0, 2\)"),
        (5, torch.tensor([0, -1]), r"sample_class\[1\] = -1 is out of range"),
        (6, 0, "num_classes must be >= 1, got 0"),
        (0, torch.zeros(5, 1), r"step_values must have shape \(N,\) \(one-dimensional\), got \[5, 1\]"),
    ],
)
def test_invalid_inputs_raise(position, value, message):
    args = valid_args()
    args[position] = value
    with pytest.raises(RuntimeError, match=message):
        ops.step_confusion(*args, backend="cpu")


def test_bad_input_flags_match_the_header():
    header = (REPO_ROOT / "csrc" / "step_confusion.h").read_text()
    enum = header[header.index("enum BadInput") : header.index("};", header.index("enum BadInput"))]
    assert sorted(int(value) for value in re.findall(r"= (\d+),", enum)) == sorted(ops.BAD_INPUT_FLAGS)


def test_flagged_input_raises_the_cpu_error():
    # What step_confusion does when the CUDA op sets bad_input: the CPU op, run on host copies, raises its error.
    args = valid_args()
    args[5] = torch.tensor([0, 2])
    with pytest.raises(RuntimeError, match=r"sample_class\[1\] = 2 is out of range"):
        ops._raise_bad_input(tuple(args), 8)
    # A flag on inputs the CPU op accepts means the two kernels check different things: never silent.
    with pytest.raises(AssertionError, match=r"sample_class must be in \[0, num_classes\).*csrc/ checks disagree"):
        ops._raise_bad_input(tuple(valid_args()), 8)


def test_cuda_backend_rejects_cpu_tensors():
    with pytest.raises(ValueError, match=r'backend="cuda" needs CUDA tensors, but step_values is on cpu'):
        ops.step_confusion(*valid_args(), backend="cuda")


def test_cpu_backend_rejects_other_devices():
    args = valid_args()
    args[3] = args[3].to("meta")
    with pytest.raises(ValueError, match=r'backend="cpu" needs CPU tensors, but error_steps is on meta'):
        ops.step_confusion(*args, backend="cpu")


def test_unknown_backend():
    with pytest.raises(ValueError, match=r"unknown backend 'gpu'; choose one of 'auto', 'cpu', 'cuda', 'torch'"):
        ops.step_confusion(*valid_args(), backend="gpu")


# ---------------------------------------------------------------------------------------------------------------------
# A missing extension: import still succeeds, "auto" falls back to the torch reference with one warning, an explicit
# compiled backend names the rebuild command.


def test_missing_extension_falls_back_once(monkeypatch):
    monkeypatch.setattr(ops, "HAS_C_EXTENSION", False)
    monkeypatch.setattr(ops, "C_IMPORT_ERROR", ImportError("undefined symbol: _ZN3c104cuda"))
    monkeypatch.setattr(compat, "_WARNED", set())
    expected = ops.step_confusion(*valid_args(), backend="torch")
    with pytest.warns(compat.FallbackWarning, match=r"did not load \(ImportError: undefined symbol: _ZN3c104cuda\)"):
        fallback = ops.step_confusion(*valid_args(), backend="auto")
    assert all(torch.equal(a, b) for a, b in zip(fallback, expected))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second call is silent
        ops.step_confusion(*valid_args(), backend="auto")
    with pytest.raises(RuntimeError, match=re.escape("pip install --no-build-isolation -e .")) as raised:
        ops.step_confusion(*valid_args(), backend="cpu")
    assert "undefined symbol: _ZN3c104cuda" in str(raised.value)


def test_build_without_the_device_kernel_falls_back(monkeypatch):
    # A CPU-only build on a GPU machine: the op exists but has no kernel for the tensors' device.
    monkeypatch.setattr(ops, "has_kernel", lambda op, key: key != "CPU")
    monkeypatch.setattr(compat, "_WARNED", set())
    with pytest.warns(compat.FallbackWarning, match="built without a CPU kernel"):
        class_counts, _ = ops.step_confusion(*valid_args(), backend="auto")
    assert torch.equal(class_counts, ops.step_confusion(*valid_args(), backend="torch")[0])
    with pytest.raises(RuntimeError, match=r"built without a CPU kernel.*pip install --no-build-isolation -e \."):
        ops.step_confusion(*valid_args(), backend="cpu")


def test_the_built_extension_has_its_kernels():
    # This checkout's build: the CPU kernel always; the CUDA kernel exactly when torch is a CUDA build and the build
    # found a toolkit (tests/test_gpu.py exercises it on a GPU).
    assert ops.HAS_C_EXTENSION and ops.compiled_kernel_missing("cpu") is None


def test_module_imports_without_extension(monkeypatch):
    # A None entry in sys.modules makes `import prmbench_fast._C` raise ImportError, as a missing .so would; load a
    # private copy of ops.py under that condition (the real module and its fake registration stay untouched).
    monkeypatch.setitem(sys.modules, "prmbench_fast._C", None)
    spec = importlib.util.spec_from_file_location("ops_without_extension", ops.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.HAS_C_EXTENSION is False and isinstance(module.C_IMPORT_ERROR, ImportError)
    with pytest.raises(RuntimeError, match=re.escape(module.REBUILD_COMMAND)):
        module.step_confusion(*valid_args(), backend="cpu")
