"""The compiled walk over official result dicts (csrc/result_dicts.cpp) against parse_results' Python loop, its
definition: on every input either the same flat predictions, unknown ids, duplicates and labelled ranges, or no answer
(None) and the Python loop decides. Random results (hypothesis) mix well-formed values with every kind of odd one."""

from __future__ import annotations

import math
import pathlib
import random
import sys

import pytest
import torch

from prmbench_fast import load_prmbench, ops
from prmbench_fast import predictions as P
from prmbench_fast.classes import REDUNDANCY_CLASSES

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

pytestmark = pytest.mark.skipif(ops.flat_from_results is None, reason="prmbench_fast._C has no compiled walk")

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "bench"))
from bench_evaluate import prediction_set  # noqa: E402  (the benchmark's four realistic prediction sets)

FIELDS = ("sample_pos", "cu_steps", "validity_labels", "validity_scores", "redundancy_labels", "redundancy_scores",
          "has_redundancy", "valid")


@pytest.fixture(scope="module")
def full(prmbench_jsonl):
    return load_prmbench(prmbench_jsonl)


@pytest.fixture(scope="module")
def small(full):
    dataset = full.subset(limit_per_class=2)
    assert any(s.classification in REDUNDANCY_CLASSES for s in dataset)  # the redundancy rule is exercised
    return dataset


def python_parse(dataset, results, thresholds=(0.5, 0.15), keep_scores=True):
    return P._parse_python(dataset, results, validity_threshold=thresholds[0], redundancy_threshold=thresholds[1],
                           keep_scores=keep_scores)


def assert_same(compiled: P.ParsedResults, python: P.ParsedResults) -> None:
    for name in FIELDS:
        a, b = getattr(compiled.predictions, name), getattr(python.predictions, name)
        assert (a is None) == (b is None), name
        if a is not None:
            assert a.dtype == b.dtype and a.shape == b.shape, name
            if a.is_floating_point():  # NaN marks a step without a score: equal where both are NaN
                assert torch.equal(a.isnan(), b.isnan()) and torch.equal(torch.nan_to_num(a), torch.nan_to_num(b)), name
            else:
                assert torch.equal(a, b), name
    assert compiled.unknown_ids == python.unknown_ids
    assert compiled.duplicates == python.duplicates
    assert list(compiled.labelled_ranges.items()) == list(python.labelled_ranges.items())


@pytest.mark.parametrize("kind", ["labels", "scores+labels", "reasonEval", "critic"])
@pytest.mark.parametrize("keep_scores", [False, True])
def test_realistic_sets_walked_in_c_equal_the_python_loop(full, kind, keep_scores):
    results = prediction_set(full, kind)
    for given_as in (results, {r["idx"]: r for r in results}):
        compiled = P._parse_compiled(full, given_as, 0.5, 0.15, keep_scores)
        assert compiled is not None, "a well-formed set must not fall back to the Python loop"
        assert_same(compiled, python_parse(full, given_as, keep_scores=keep_scores))


def test_thresholded_scores_and_ranges(small):
    """Scores without labels are labelled score > threshold (a score equal to it is not); ranges in first-seen order."""
    rng = random.Random(1)
    redundancy_sample = next(s for s in small if s.classification in REDUNDANCY_CLASSES)
    results = [{"idx": redundancy_sample.id,
                "scores": {"step_level_redundancy_scores": [0.15, 0.9, -math.inf]}}]
    results += [{"idx": s.id, "scores": {"step_level_validity_scores": [rng.choice([0.5, 0.25, 0.75, math.inf])
                                                                        for _ in s.steps]}}
                for s in small if s is not redundancy_sample]
    compiled = P._parse_compiled(small, results, 0.5, 0.15, True)
    python = python_parse(small, results)
    assert compiled is not None
    assert_same(compiled, python)
    assert list(compiled.labelled_ranges) == ["redundancy_threshold", "validity_threshold"]
    assert compiled.predictions.redundancy_labels[:3].tolist() == [False, True, False]


def test_without_the_compiled_walk_parse_results_walks_in_python(small, monkeypatch):
    results = prediction_set(small, "critic")
    expected = python_parse(small, results)
    monkeypatch.setattr(ops, "flat_from_results", None)
    assert P._parse_compiled(small, results, 0.5, 0.15, True) is None
    assert_same(P.parse_results(small, results), expected)


def test_what_the_walk_does_not_take_goes_to_the_python_loop(small):
    """An int threshold, a tuple of results or an odd value anywhere: no answer from the walk, and parse_results
    gives the Python loop's (its result, or its error naming sample, field and index)."""
    results = prediction_set(small, "scores+labels")
    assert P._parse_compiled(small, results, 0, 0.15, True) is None
    assert P._parse_compiled(small, tuple(results), 0.5, 0.15, True) is None
    odd = [dict(r) for r in results]
    odd[3] = {"idx": odd[3]["idx"], "scores": {"step_level_validity_labels": [1, 0, True]}}  # ints as labels: taken
    assert P._parse_compiled(small, odd, 0.5, 0.15, True) is None
    assert_same(P.parse_results(small, odd), python_parse(small, odd))
    odd[3]["scores"]["step_level_validity_labels"] = [True, "yes"]
    with pytest.raises(P.PredictionError, match=r"field 'step_level_validity_labels'\[1\]: .*got 'yes'"):
        P.parse_results(small, odd)


# ---------------------------------------------------------------------------------------------------------------------
# Random results: well-formed values, with odd ones at a rate drawn per set (0 for some sets), so that every branch of
# both walks meets them and many sets hold none. Values come from a seeded random.Random that hypothesis draws: its
# own integer draws favour their bounds, which would make "rare" choices common.

FIELD_NAMES = (P.VALIDITY_LABELS, P.VALIDITY_SCORES, P.REDUNDANCY_LABELS, P.REDUNDANCY_SCORES)
ODD_LABELS = (0, 1, 1.0, None, "x", 2)
ODD_SCORES = (math.nan, 1, 0, True, None, "0.3", 10**400)
# Exact threshold values among the scores, so ties (never above the threshold) occur.
GRID_SCORES = (0.5, 0.15, 0.0, -1.0, 1.0, math.inf, -math.inf)
ODD_CONTAINERS = (None, "0.9", {"a": 1})


def random_values(rng: random.Random, odd: float, labels: bool):
    """A list of labels or scores; with probability ``odd`` a tuple or a non-list in its place, each value odd with
    probability ``odd``."""
    values = []
    for _ in range(rng.randint(0, 7)):
        if rng.random() < odd:
            values.append(rng.choice(ODD_LABELS if labels else ODD_SCORES))
        elif labels:
            values.append(rng.random() < 0.5)
        else:
            values.append(rng.choice(GRID_SCORES) if rng.random() < 0.3 else rng.uniform(-2, 2))
    if rng.random() < odd:
        return tuple(values) if rng.random() < 0.5 else rng.choice(ODD_CONTAINERS)
    return values


def random_results(rng: random.Random, ids: list[str], odd: float):
    """A results list or id -> result dict over ``ids`` (repeats, unknown ids, missing fields and odd entries
    included at rate ``odd``)."""
    entries = []
    for _ in range(rng.randint(0, 12)):
        sample_id = rng.choice(["nope", 7, ("t",)]) if rng.random() < odd else rng.choice(ids)
        fields = {}
        for name in FIELD_NAMES:  # validity labels nearly always, the others half the time
            if rng.random() < (0.9 if name == P.VALIDITY_LABELS else 0.5):
                fields[name] = random_values(rng, odd, labels=name.endswith("labels"))
        result = {"scores": fields} if rng.random() < 0.5 else dict(fields)
        if rng.random() < 0.2:
            result["validity"] = rng.choice([None, 1]) if rng.random() < odd else rng.random() < 0.5
        if rng.random() < odd:
            result = rng.choice([None, [1], "result", {"scores": [1]}])
        entries.append((sample_id, result))
    if rng.random() < 0.5:
        return {sample_id: result for sample_id, result in entries}
    return [{"idx": sample_id, **result} if isinstance(result, dict) and rng.random() >= odd else result
            for sample_id, result in entries]


@settings(max_examples=400, deadline=None)
@given(rng=st.randoms(use_true_random=False), odd=st.sampled_from([0.0, 0.01, 0.05, 0.2]), keep_scores=st.booleans(),
       thresholds=st.sampled_from([(0.5, 0.15), (0.0, 0.5), (-1.0, 1.0)]))
def test_random_results_same_answer_or_none(small, rng, odd, keep_scores, thresholds):
    results = random_results(rng, [s.id for s in small], odd)
    try:
        python = python_parse(small, results, thresholds, keep_scores)
    except (P.PredictionError, TypeError):
        python = None  # the Python loop refuses: the walk must not answer
    compiled = P._parse_compiled(small, results, *thresholds, keep_scores)
    if compiled is not None:
        assert python is not None, "the walk answered where the Python loop refuses"
        assert_same(compiled, python)


WELL_FORMED_LABELS = st.lists(st.booleans(), max_size=7)
WELL_FORMED_SCORES = st.lists(st.floats(-2, 2), max_size=7)


@st.composite
def well_formed(draw, ids):
    results = []
    for sample_id in draw(st.lists(st.sampled_from(ids), max_size=12)):
        fields = {}
        for name, values in zip(FIELD_NAMES, (WELL_FORMED_LABELS, WELL_FORMED_SCORES) * 2):
            if draw(st.booleans()):
                fields[name] = draw(values)
        if not fields.get(P.VALIDITY_LABELS) and P.VALIDITY_SCORES not in fields:
            fields[P.VALIDITY_LABELS] = draw(WELL_FORMED_LABELS)
        result = {"idx": sample_id, "scores": fields}
        if draw(st.integers(0, 9)) == 0:
            result["validity"] = False
        results.append(result)
    return results


@settings(max_examples=300, deadline=None)
@given(data=st.data(), keep_scores=st.booleans())
def test_well_formed_results_always_walked_in_c(small, data, keep_scores):
    """Exact dicts, lists of bools and floats, any lengths: the walk answers, with the Python loop's result."""
    results = data.draw(well_formed([s.id for s in small]))
    compiled = P._parse_compiled(small, results, 0.5, 0.15, keep_scores)
    assert compiled is not None
    assert_same(compiled, python_parse(small, results, keep_scores=keep_scores))
