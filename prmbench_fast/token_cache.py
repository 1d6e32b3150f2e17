"""Caches of tokenized and packed samples, so that repeated ``score()`` calls (e.g. every N training steps) only run
forward passes.

Tokenized samples are keyed by the family's ``cache_key()`` (family, options, tokenizer vocabulary and template) and
the sample id; they live in memory for the process and, with a ``cache_dir``, in one safetensors file per key.
Packed batches are kept in memory for the last few (key, samples, max_length, batch_tokens) combinations.
"""

from __future__ import annotations

import collections
import itertools
import json
import os
import pathlib
import warnings
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save

from .data import PRMBenchDataset
from .families import Encoded, Family
from .io import FileError, FileWarning, FileWriteError, check_output_dir, write_bytes_atomic
from .packing import PackedBatch, TokenizedSample, pack_stream

_ENCODED: dict[str, dict[str, Encoded]] = {}
#: cache file -> the sample ids it holds, as this process last read or wrote it.
_ON_DISK: dict[str, set[str]] = {}
_PACKED: collections.OrderedDict = collections.OrderedDict()
#: Packed batch lists kept in memory: a training loop alternates between at most a couple of evaluation sets.
PACKED_CACHE_SIZE = 4


def _disk_path(cache_dir: str | os.PathLike, key: str) -> pathlib.Path:
    return pathlib.Path(cache_dir) / f"encoded-{key}.safetensors"


def _load_disk(path: pathlib.Path) -> dict[str, Encoded]:
    """The cache file's samples; a file that cannot be read as one (truncated, corrupt, another layout) is reported
    with a :class:`~prmbench_fast.io.FileWarning` and treated as empty, so it is rebuilt."""
    try:
        return _read_cache_file(path)
    except PermissionError:
        raise FileError(path, None, None, "permission denied (the cache file is not readable); fix its permissions "
                        "or pass another --cache-dir") from None
    except Exception as err:  # noqa: BLE001 whatever safetensors, json or the layout raise: a cache is rebuildable
        warnings.warn(f"{path}: not a readable tokenization cache ({type(err).__name__}: {err}); it is rebuilt",
                      FileWarning, stacklevel=3)
        return {}


def _read_cache_file(path: pathlib.Path) -> dict[str, Encoded]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        sample_ids = json.loads(f.metadata()["sample_ids"])
    tensors = load_file(str(path))
    ids, id_offsets = tensors["input_ids"].tolist(), tensors["id_offsets"].tolist()
    pos, pos_offsets = tensors["reward_pos"].tolist(), tensors["pos_offsets"].tolist()
    if len(id_offsets) != len(sample_ids) + 1 or len(pos_offsets) != len(sample_ids) + 1:
        raise ValueError(f"{len(sample_ids)} sample ids but {len(id_offsets) - 1} samples of tokens")
    return {
        sample_id: Encoded(ids[id_offsets[i]:id_offsets[i + 1]], pos[pos_offsets[i]:pos_offsets[i + 1]])
        for i, sample_id in enumerate(sample_ids)
    }


def _save_disk(path: pathlib.Path, encoded: dict[str, Encoded]) -> None:
    sample_ids = list(encoded)

    def flat(lists: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        # fromiter over a chain: 4x faster than a list comprehension into torch.tensor (the full benchmark's 3M ids:
        # 0.06 s instead of 0.25 s, in the producer thread that must not hold the GIL long while forwards launch).
        offsets = np.cumsum([0, *map(len, lists)])
        values = np.fromiter(itertools.chain.from_iterable(lists), dtype=np.int64, count=int(offsets[-1]))
        return torch.from_numpy(values), torch.from_numpy(offsets)

    tensors = dict(zip(("input_ids", "id_offsets"), flat([e.input_ids for e in encoded.values()])))
    tensors.update(zip(("reward_pos", "pos_offsets"), flat([e.reward_pos for e in encoded.values()])))
    # Atomic (a concurrent reader sees the old or the new file, never a part) and with the permissions of any file
    # the user writes (the umask's), so a shared cache folder stays readable to the team.
    try:
        write_bytes_atomic(path, save(tensors, metadata={"sample_ids": json.dumps(sample_ids)}))
    except FileWriteError as err:
        hint = "free some space or pass a --cache-dir (cache_dir=) elsewhere"
        raise FileWriteError(path, err.os_error, hint) from None


def encode_dataset(
    family: Family, dataset: PRMBenchDataset, positions: Sequence[int], *, cache_dir: str | os.PathLike | None = None
) -> list[Encoded]:
    """The family's encoding of ``dataset.samples[p]`` for each position, from the caches where possible.

    With a ``cache_dir``, the file is read once per process and rewritten whenever it lacks a requested sample,
    including samples that were encoded earlier in memory only.
    """
    return [e for chunk in encode_chunks(family, dataset, [positions], cache_dir=cache_dir) for e in chunk]


def encode_chunks(
    family: Family, dataset: PRMBenchDataset, chunks: Iterable[Sequence[int]], *,
    cache_dir: str | os.PathLike | None = None,
) -> Iterator[list[Encoded]]:
    """:func:`encode_dataset` of each chunk of positions in turn, yielded as soon as the chunk is encoded (what a
    producer thread hands the forward passes while it encodes the next chunk). The cache file is written once, after
    the last chunk, if it lacked a requested sample: a run stopped half-way leaves the file as it was.
    """
    key = family.cache_key()
    memory = _ENCODED.setdefault(key, {})
    on_disk = None
    if cache_dir is not None:
        check_output_dir(cache_dir)  # a file there, or a folder that cannot be written: named now
        path = _disk_path(cache_dir, key)
        if str(path) not in _ON_DISK:
            stored = _load_disk(path) if path.exists() else {}
            for sample_id, encoded in stored.items():
                memory.setdefault(sample_id, encoded)
            _ON_DISK[str(path)] = set(stored)
        on_disk = _ON_DISK[str(path)]
    stale = False
    for positions in chunks:
        wanted = [dataset.samples[p] for p in positions]
        missing = list({sample.id: sample for sample in wanted if sample.id not in memory}.values())
        memory.update(zip((sample.id for sample in missing), family.encode_many(missing)))
        stale = stale or (on_disk is not None and any(sample.id not in on_disk for sample in wanted))
        yield [memory[sample.id] for sample in wanted]
    if stale:
        _save_disk(path, memory)
        _ON_DISK[str(path)] = set(memory)


#: Samples tokenized per chunk when batches are streamed, at most: large enough for a fast tokenizer's batch call to
#: pay and for a problem's variants to share their texts' tokenization. The first forward waits for the first chunk,
#: so the chunks start at an eighth of this (32 of PRMBench's longest samples, ~60k tokens: about 4 batches of 16k
#: tokens) and double up to it.
STREAM_CHUNK_SAMPLES = 256


def packed_batches(
    family: Family,
    dataset: PRMBenchDataset,
    positions: Sequence[int],
    *,
    max_length: int,
    batch_tokens: int,
    cache_dir: str | os.PathLike | None = None,
) -> list[PackedBatch]:
    """Packed batches of the samples at ``positions`` (batch keys are dataset positions), cached in memory: the
    batches of :func:`streamed_batches`, all at once."""
    return list(streamed_batches(family, dataset, positions, max_length=max_length, batch_tokens=batch_tokens,
                                 cache_dir=cache_dir))


def streamed_batches(
    family: Family,
    dataset: PRMBenchDataset,
    positions: Sequence[int],
    *,
    max_length: int,
    batch_tokens: int,
    cache_dir: str | os.PathLike | None = None,
    chunk_samples: int = STREAM_CHUNK_SAMPLES,
) -> Iterator[PackedBatch]:
    """Packed batches of the samples at ``positions``, each yielded as soon as it is formed (batch keys are dataset
    positions), so that the first forward passes run while the rest is tokenized.

    The samples are tokenized a chunk at a time, longest first by their text length (known before tokenizing), and
    packed with :func:`~prmbench_fast.packing.pack_stream`: batches come longest first, as
    :func:`~prmbench_fast.packing.pack_batches` orders them, within the few samples whose token and character counts
    disagree. A problem's variants stay in one chunk, so the texts they share are tokenized once. Once every batch is
    formed the list is kept in memory (:data:`PACKED_CACHE_SIZE` lists), and a later call yields it at once, then
    writes the samples to ``cache_dir``'s file if it lacks them (a run folder's cache, new for this call).
    """
    key = (family.cache_key(), tuple(dataset.samples[p].id for p in positions), max_length, batch_tokens)
    if key in _PACKED:
        _PACKED.move_to_end(key)
        yield from _PACKED[key]
        if cache_dir is not None:
            for _ in encode_chunks(family, dataset, [positions], cache_dir=cache_dir):
                pass  # every sample is in memory: this writes the file only if it lacks some
        return
    chunks = _chunks_longest_first(dataset, positions, chunk_samples)
    # Driven by encode_chunks (it comes first in the zip): it writes the cache file after its last chunk.
    samples = ([TokenizedSample(e.input_ids, e.reward_pos, key=p) for p, e in zip(chunk, encoded)]
               for encoded, chunk in zip(encode_chunks(family, dataset, chunks, cache_dir=cache_dir), chunks))
    batches = []
    for batch in pack_stream(samples, max_length=max_length, batch_tokens=batch_tokens):
        batches.append(batch)
        yield batch
    _PACKED[key] = batches
    while len(_PACKED) > PACKED_CACHE_SIZE:
        _PACKED.popitem(last=False)


def _chunks_longest_first(dataset: PRMBenchDataset, positions: Sequence[int], chunk_samples: int) -> list[list[int]]:
    """``positions`` in chunks of whole problems (the samples of one source problem), the problems ordered by their
    longest sample's characters, longest first (ties in data order); the chunks grow from ``chunk_samples // 8``
    samples to ``chunk_samples`` (:data:`STREAM_CHUNK_SAMPLES`)."""
    problems: dict[str, list[int]] = {}
    for position in positions:
        problems.setdefault(dataset.samples[position].source_idx, []).append(position)

    def characters(position: int) -> int:
        sample = dataset.samples[position]
        return len(sample.question) + sum(map(len, sample.steps))

    ordered = sorted(problems.values(), key=lambda members: -max(map(characters, members)))
    chunks: list[list[int]] = []
    size = max(chunk_samples // 8, 1)
    for members in ordered:
        if not chunks or len(chunks[-1]) >= size:
            if chunks:
                size = min(2 * size, chunk_samples)
            chunks.append([])
        chunks[-1].extend(members)
    return chunks
