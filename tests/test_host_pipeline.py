"""The host work around the forward passes: batched tokenization and the results writer thread."""

from __future__ import annotations

import json

import pytest

from prmbench_fast.data import load_prmbench
from prmbench_fast.families import family_class
from prmbench_fast.results_store import ResultsStore, ResultsWriter
from prmbench_fast.testing.tiny_models import train_tokenizer


@pytest.fixture(scope="module")
def samples(prmbench_jsonl):
    return load_prmbench(prmbench_jsonl, limit_per_class=2).samples


@pytest.fixture(scope="module")
def tokenizer(samples):
    return train_tokenizer([s.question for s in samples] + [step for s in samples for step in s.steps])


class _CountingTokenizer:
    """The tokenizer, counting calls by batch size (1: a single text)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.calls = tokenizer, []

    def __call__(self, text, **kwargs):
        self.calls.append(len(text) if isinstance(text, list) else 1)
        return self.tokenizer(text, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


@pytest.mark.parametrize("family", ["generic", "lm_judge"])
def test_encode_many_gives_encode_ids_from_one_batch_call(family, samples, tokenizer):
    expected = [family_class(family).build(tokenizer).encode(s) for s in samples]
    counting = _CountingTokenizer(tokenizer)
    fam = family_class(family).build(counting)
    counting.calls.clear()  # the family's own set-up calls
    assert fam.encode_many(samples) == expected
    texts = {text for s in samples for text, _ in fam.texts(s)}
    # One call for all texts, each text once: variants share questions and steps, so fewer texts than pieces.
    assert counting.calls == [len(texts)]
    assert len(texts) < sum(1 + len(s.steps) for s in samples)


def _store(tmp_path):
    return ResultsStore(tmp_path / "run", {"model": "m"})


def test_writer_appends_batches_in_order_after_their_events(tmp_path):
    waited = []

    class Event:
        def __init__(self, n):
            self.n = n

        def synchronize(self):
            waited.append(self.n)

    with _store(tmp_path) as store:
        writer = ResultsWriter(store, depth=1)
        for n in range(5):
            writer.submit(Event(n), lambda n=n: [{"idx": f"s{n}", "scores": {}}])
        writer.close()
        lines = [json.loads(line) for line in store.path.read_text().splitlines()]
    assert waited == list(range(5))
    assert [line["idx"] for line in lines] == [f"s{n}" for n in range(5)]


def test_writer_error_is_raised_to_the_caller_and_later_batches_are_not_written(tmp_path):
    def fail():
        raise OSError(28, "No space left on device")

    with _store(tmp_path) as store:
        writer = ResultsWriter(store)
        writer.submit(None, lambda: [{"idx": "a", "scores": {}}])
        writer.submit(None, fail)
        writer.submit(None, lambda: [{"idx": "b", "scores": {}}])
        with pytest.raises(OSError, match="No space left"):
            writer.close()
        assert [json.loads(line)["idx"] for line in store.path.read_text().splitlines()] == ["a"]
