"""Property tests of the counting op on random ragged batches (hypothesis): the compiled CPU op and the torch reference
equal the transcription of the official loop. In a module of their own so that the other op tests, which the GPU
tests reuse, need no hypothesis (the borrowed GPU machine has none)."""

from __future__ import annotations

import math

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from test_step_confusion_op import assert_all_agree, sample  # noqa: E402


# A coarse grid of values and thresholds, so exact ties (value == threshold, never positive) are frequent. 0.1 is not
# exact in float32 (it rounds up), so float32 0.1 > 0.1 is True in float64: the test checks the op compares in float64.
GRID = [0.0, 0.1, 0.25, 0.5, 0.75, 1.0]
VALUES = st.one_of(st.sampled_from(GRID), st.floats(-2.0, 2.0, width=32), st.just(math.nan))


# One sample's shape: label count, threshold, error steps (unsorted, duplicate-free as in PRMBench, sometimes past the
# last label, sometimes none) and class id (drawn in [0, 4), folded into [0, num_classes) below).
SAMPLE_SHAPES = st.tuples(
    st.integers(0, 12), st.sampled_from(GRID), st.lists(st.integers(0, 15), max_size=5, unique=True), st.integers(0, 3)
)


@st.composite
def batches(draw, max_samples: int = 10):
    # The values of the whole batch are drawn as one list: one draw per sample would make generation the slow part.
    num_classes = draw(st.integers(1, 4))
    shapes = draw(st.lists(SAMPLE_SHAPES, max_size=max_samples))
    total = sum(num_labels for num_labels, *_ in shapes)
    values = draw(st.lists(VALUES, min_size=total, max_size=total))
    samples, start = [], 0
    for num_labels, threshold, errors, cls in shapes:
        samples.append(sample(values[start : start + num_labels], errors, cls % num_classes, threshold))
        start += num_labels
    return samples, num_classes


@settings(max_examples=200, deadline=None)
@given(batch=batches(), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_floating_values_match_oracle(batch, dtype):
    samples, num_classes = batch
    assert_all_agree(samples, dtype, num_classes)


@settings(max_examples=200, deadline=None)
@given(batch=batches())
def test_bool_labels_match_oracle(batch):
    samples, num_classes = batch
    samples = [{**s, "values": [v > 0.5 for v in s["values"]]} for s in samples]
    assert_all_agree(samples, torch.bool, num_classes)
