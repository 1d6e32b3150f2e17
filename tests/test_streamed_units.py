"""The producers of score()'s two paths, formed while later chunks tokenize: prefix sharing's lists of whole problem
groups, equal to the lists tokenizing everything first gives, and the packed batches of the unshared path, longest
first; the tokenization cache file written once, after the last chunk."""

from __future__ import annotations

import random
import threading

import pytest

from prmbench_fast import scoring, token_cache
from prmbench_fast.data import load_prmbench
from prmbench_fast.families import family_class
from prmbench_fast.packing import TokenizedSample, pack_batches
from prmbench_fast.testing.tiny_models import train_tokenizer


@pytest.fixture(scope="module")
def dataset(prmbench_jsonl):
    return load_prmbench(prmbench_jsonl, limit_per_class=4)


@pytest.fixture(scope="module")
def family(dataset):
    samples = dataset.samples
    tokenizer = train_tokenizer([s.question for s in samples] + [step for s in samples for step in s.steps])
    return family_class("generic").build(tokenizer)


def _reference_units(family, dataset, todo, *, max_length, batch_tokens):
    """Every sample tokenized first, then the groups (same source problem, in order of first appearance) packed
    greedily into lists of about batch_tokens tokens: the lists score() formed before the producer thread."""
    groups = {}
    for position in todo:
        sample = dataset.samples[position]
        groups.setdefault(sample.source_idx, []).append((position, family.encode(sample)))
    units, size = [], 0
    for group in groups.values():
        group_tokens = sum(min(len(e.input_ids), max_length) for _, e in group)
        if not units or size + group_tokens > batch_tokens:
            units.append([])
            size = 0
        units[-1].extend((position, e.input_ids, e.reward_pos) for position, e in group)
        size += group_tokens
    return units


@pytest.mark.parametrize("chunk_samples", [1, 7, 10_000])
@pytest.mark.parametrize("batch_tokens", [1, 700, 4096])
def test_streamed_lists_equal_the_tokenize_first_lists(dataset, family, chunk_samples, batch_tokens):
    # A shuffled todo: a problem's variants are not adjacent, as after a resume or a rank's shard.
    todo = list(range(len(dataset)))
    random.Random(0).shuffle(todo)
    todo = todo[: len(todo) * 3 // 4]
    max_length = 300  # shorter than some samples: the token count of a group is taken after truncation
    token_cache._ENCODED.clear()
    streamed = [[(s.key, s.input_ids, s.reward_pos) for s in unit] for unit in scoring._shared_units(
        family, dataset, todo, max_length=max_length, batch_tokens=batch_tokens, cache_dir=None,
        chunk_samples=chunk_samples)]
    assert streamed == _reference_units(family, dataset, todo, max_length=max_length, batch_tokens=batch_tokens)


def test_cache_file_written_once_after_the_last_chunk(dataset, family, tmp_path, monkeypatch):
    saves = []
    original = token_cache._save_disk
    monkeypatch.setattr(token_cache, "_save_disk", lambda path, encoded: saves.append(len(encoded)) or
                        original(path, encoded))
    token_cache._ENCODED.clear()
    token_cache._ON_DISK.clear()
    units = scoring._shared_units(family, dataset, range(len(dataset)), max_length=2048, batch_tokens=1000,
                                  cache_dir=tmp_path, chunk_samples=5)
    next(units)
    assert saves == []  # the first list is handed out before the other chunks are tokenized or anything is written
    rest = list(units)
    assert rest and saves == [len(dataset)]
    stored = token_cache._read_cache_file(token_cache._disk_path(tmp_path, family.cache_key()))
    assert stored == {s.id: family.encode(s) for s in dataset.samples}


def test_stopped_run_writes_no_cache_file(dataset, family, tmp_path):
    token_cache._ENCODED.clear()
    token_cache._ON_DISK.clear()
    # Four lists, one per problem. One list ahead, the producer waits to hand over the third while the last chunk is
    # still being read, whenever the close comes; two ahead, it could form the last list (and write the file) before
    # the close on a loaded machine.
    units = scoring._in_background(scoring._shared_units(
        family, dataset, range(len(dataset)), max_length=2048, batch_tokens=1000, cache_dir=tmp_path,
        chunk_samples=5), depth=1)
    assert len({sample.source_idx for sample in dataset.samples}) == 4
    next(units)
    units.close()  # as score() does when a forward fails
    assert not token_cache._disk_path(tmp_path, family.cache_key()).exists()


def test_background_items_in_order_and_producer_error_raised_in_the_caller():
    def items():
        yield from range(5)
        raise KeyError("bad sample")

    produced = scoring._in_background(items(), depth=2)
    assert [next(produced) for _ in range(5)] == list(range(5))
    with pytest.raises(KeyError, match="bad sample"):
        next(produced)


def test_closing_stops_the_producer_thread():
    produced_count = []

    def items():
        for i in range(1_000_000):
            produced_count.append(i)
            yield i

    before = threading.active_count()
    produced = scoring._in_background(items(), depth=2)
    assert next(produced) == 0
    produced.close()
    assert threading.active_count() == before  # joined, not left running
    # At most depth items queued, one in the consumer's hands and one being put when the stop came.
    assert len(produced_count) <= 4


def test_a_list_filled_exactly_to_batch_tokens_keeps_the_group(dataset, family):
    # batch_tokens equal to the first two groups' tokens: both go into the first list (a group starts a new list only
    # when it would exceed batch_tokens).
    todo = list(range(len(dataset)))
    max_length = 300
    first_two = _reference_units(family, dataset, todo, max_length=max_length, batch_tokens=1)[:2]
    exact = sum(min(len(ids), max_length) for unit in first_two for _, ids, _ in unit)
    token_cache._ENCODED.clear()
    streamed = [[s.key for s in unit] for unit in scoring._shared_units(
        family, dataset, todo, max_length=max_length, batch_tokens=exact, cache_dir=None, chunk_samples=3)]
    assert streamed[0] == [position for unit in first_two for position, _, _ in unit]


def _batch_keys(batches):
    return [batch.sample_keys for batch in batches]


def test_streamed_batches_hold_every_sample_once_longest_first(dataset, family):
    todo = list(range(len(dataset)))
    random.Random(1).shuffle(todo)
    max_length, batch_tokens = 300, 700
    token_cache._ENCODED.clear()
    token_cache._PACKED.clear()
    batches = list(token_cache.streamed_batches(family, dataset, todo, max_length=max_length,
                                                batch_tokens=batch_tokens, chunk_samples=8))
    assert sorted(k for keys in _batch_keys(batches) for k in keys) == sorted(todo)
    for batch in batches:
        assert batch.num_tokens <= batch_tokens or len(batch.sample_keys) == 1
        for key, start, end in zip(batch.sample_keys, batch.cu_seqlens[:-1].tolist(), batch.cu_seqlens[1:].tolist()):
            assert batch.input_ids[start:end].tolist() == family.encode(dataset.samples[key]).input_ids[:max_length]
    # The chunks come longest first by characters: the first batch holds the longest sample (after truncation).
    longest = max(min(len(family.encode(dataset.samples[p]).input_ids), max_length) for p in todo)
    assert batches[0].max_seqlen == longest
    # With every sample in one chunk, the batches are pack_batches' of the samples in that chunk's order.
    token_cache._PACKED.clear()
    (chunk,) = token_cache._chunks_longest_first(dataset, todo, 8 * len(todo))
    one_chunk = token_cache.streamed_batches(family, dataset, todo, max_length=max_length, batch_tokens=batch_tokens,
                                             chunk_samples=8 * len(todo))
    reference = pack_batches([TokenizedSample(family.encode(dataset.samples[p]).input_ids,
                                              family.encode(dataset.samples[p]).reward_pos, key=p) for p in chunk],
                             max_length=max_length, batch_tokens=batch_tokens)
    assert _batch_keys(one_chunk) == _batch_keys(reference)


def test_streamed_batches_first_batch_before_the_rest_is_tokenized_then_cached(dataset, family, monkeypatch):
    encoded = []
    original = type(family).encode_many
    monkeypatch.setattr(type(family), "encode_many", lambda self, samples: encoded.append(len(samples)) or
                        original(self, samples))
    token_cache._ENCODED.clear()
    token_cache._PACKED.clear()
    options = dict(max_length=2048, batch_tokens=200, chunk_samples=8)
    batches = token_cache.streamed_batches(family, dataset, range(len(dataset)), **options)
    first = next(batches)
    assert len(encoded) == 1 and encoded[0] < len(dataset)  # one chunk tokenized for the first batch
    rest = list(batches)
    assert sum(encoded) == len(dataset)
    # A later call (e.g. the next evaluation in a training loop) gets the same batches without tokenizing.
    encoded.clear()
    again = list(token_cache.streamed_batches(family, dataset, range(len(dataset)), **options))
    assert encoded == [] and _batch_keys(again) == _batch_keys([first, *rest])


def test_chunks_keep_a_problem_together_and_grow_to_chunk_samples(dataset):
    chunks = token_cache._chunks_longest_first(dataset, range(len(dataset)), 16)
    problem_chunk = {}
    for c, chunk in enumerate(chunks):
        for p in chunk:
            assert problem_chunk.setdefault(dataset.samples[p].source_idx, c) == c
    # The sizes start at 16 // 8 = 2 and double up to 16; a chunk closes once it holds at least its size.
    sizes = [2, 4, 8] + [16] * len(chunks)
    assert all(len(chunk) >= size for chunk, size in zip(chunks[:-1], sizes))
    characters = [max(len(dataset.samples[p].question) + sum(map(len, dataset.samples[p].steps)) for p in chunk)
                  for chunk in chunks]
    assert characters == sorted(characters, reverse=True)
