"""The host work around the forward passes: batched tokenization (straight from the Rust backend where that is the
same call) and the results writer thread."""

from __future__ import annotations

import importlib
import json

import pytest

from prmbench_fast.data import load_prmbench
from prmbench_fast.families import FAMILY_NAMES, family_class
from prmbench_fast.families.base import batch_token_ids
from prmbench_fast.results_store import ResultsStore, ResultsWriter
from prmbench_fast.testing.tiny_models import train_tokenizer


@pytest.fixture(scope="module")
def samples(prmbench_jsonl):
    return load_prmbench(prmbench_jsonl, limit_per_class=2).samples


@pytest.fixture(scope="module")
def tokenizer(samples):
    return train_tokenizer([s.question for s in samples] + [step for s in samples for step in s.steps])


class _CountingTokenizer:
    """The tokenizer, recording the number of texts (conversations for ``apply_chat_template``) of each call that
    tokenizes: 1 for a single text."""

    def __init__(self, tokenizer):
        self.tokenizer, self.calls = tokenizer, []

    def __call__(self, text, **kwargs):
        self.calls.append(len(text) if isinstance(text, list) else 1)
        return self.tokenizer(text, **kwargs)

    def encode(self, text, **kwargs):
        self.calls.append(1)
        return self.tokenizer.encode(text, **kwargs)

    def apply_chat_template(self, conversation, **kwargs):
        if kwargs.get("tokenize", True):
            batched = bool(conversation) and isinstance(conversation[0], list)
            self.calls.append(len(conversation) if batched else 1)
        return self.tokenizer.apply_chat_template(conversation, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def _family_tokenizer(name: str, trained):
    """A tokenizer each family accepts: its own test module's (chat template, separator and tag tokens), or the
    tokenizer trained on the samples for the families that need nothing special."""
    if name in ("generic", "lm_judge"):
        return trained
    module = importlib.import_module(f"test_family_{name}")
    return module._tokenizer(pad="<s>") if name == "reasoneval" else module._tokenizer()


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_encode_many_gives_encode_ids_from_batch_calls(family, samples, tokenizer):
    base = _family_tokenizer(family, tokenizer)
    expected = [family_class(family).build(base).encode(s) for s in samples]
    counting = _CountingTokenizer(base)
    fam = family_class(family).build(counting)
    counting.calls.clear()  # the family's own set-up calls
    assert fam.encode_many(samples) == expected
    # Every text is tokenized in a batch: one call per add_special_tokens value at most, never text by text.
    assert 1 <= len(counting.calls) <= 2, counting.calls
    assert min(counting.calls) > 1, counting.calls


@pytest.mark.parametrize("family", ["generic", "lm_judge"])
def test_encode_many_tokenizes_each_shared_text_once(family, samples, tokenizer):
    counting = _CountingTokenizer(tokenizer)
    fam = family_class(family).build(counting)
    counting.calls.clear()
    fam.encode_many(samples)
    texts = {text for s in samples for text, _ in fam.texts(s)}
    # One call for all texts, each text once: variants share questions and steps, so fewer texts than pieces.
    assert counting.calls == [len(texts)]
    assert len(texts) < sum(1 + len(s.steps) for s in samples)


def _texts(samples):
    return [s.question for s in samples] + [step for s in samples for step in s.steps]


@pytest.mark.parametrize("special", [False, True])
def test_backend_token_ids_equal_the_tokenizer_call(samples, tokenizer, monkeypatch, special):
    texts = _texts(samples) + ["<s> a special token inside", ""]
    expected = tokenizer(texts, add_special_tokens=special, return_attention_mask=False)["input_ids"]
    # Straight from the backend: transformers' encoding path is not run.
    monkeypatch.setattr(type(tokenizer), "_encode_plus", lambda *args, **kwargs: pytest.fail("went through __call__"))
    assert batch_token_ids(tokenizer, texts, special) == expected


def _copy(tokenizer, cls=None):
    """A tokenizer of ``cls`` (default: the same class) on a copy of ``tokenizer``'s backend, which it may change."""
    from tokenizers import Tokenizer

    return (cls or type(tokenizer))(tokenizer_object=Tokenizer.from_str(tokenizer.backend_tokenizer.to_str()))


def test_backend_path_only_where_it_is_the_same_call(samples, tokenizer):
    texts = _texts(samples)[:20]
    expected = tokenizer(texts, add_special_tokens=False)["input_ids"]

    class OwnEncoding(type(tokenizer)):
        calls = 0

        def _encode_plus(self, *args, **kwargs):
            OwnEncoding.calls += 1
            return super()._encode_plus(*args, **kwargs)

    # A subclass with its own encoding goes through it.
    assert batch_token_ids(_copy(tokenizer, OwnEncoding), texts, False) == expected and OwnEncoding.calls == 1
    # A backend left truncating: __call__ clears the truncation first, so the backend alone would cut every text.
    truncating = _copy(tokenizer)
    truncating.backend_tokenizer.enable_truncation(3)
    assert batch_token_ids(truncating, texts, False) == expected
    # Not a transformers tokenizer (here a wrapper): its __call__, once.
    counting = _CountingTokenizer(tokenizer)
    assert batch_token_ids(counting, texts, False) == expected and counting.calls == [len(texts)]


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
