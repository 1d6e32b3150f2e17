"""Caches of tokenized and packed samples, so that repeated ``score()`` calls (e.g. every N training steps) only run
forward passes.

Tokenized samples are keyed by the family's ``cache_key()`` (family, options, tokenizer vocabulary and template) and
the sample id; they live in memory for the process and, with a ``cache_dir``, in one safetensors file per key.
Packed batches are kept in memory for the last few (key, samples, max_length, batch_tokens) combinations.
"""

from __future__ import annotations

import collections
import json
import os
import pathlib
from typing import Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .data import PRMBenchDataset
from .families import Encoded, Family
from .packing import PackedBatch, TokenizedSample, pack_batches

_ENCODED: dict[str, dict[str, Encoded]] = {}
#: cache file -> the sample ids it holds, as this process last read or wrote it.
_ON_DISK: dict[str, set[str]] = {}
_PACKED: collections.OrderedDict = collections.OrderedDict()
#: Packed batch lists kept in memory: a training loop alternates between at most a couple of evaluation sets.
PACKED_CACHE_SIZE = 4


def _disk_path(cache_dir: str | os.PathLike, key: str) -> pathlib.Path:
    return pathlib.Path(cache_dir) / f"encoded-{key}.safetensors"


def _load_disk(path: pathlib.Path) -> dict[str, Encoded]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        sample_ids = json.loads(f.metadata()["sample_ids"])
    tensors = load_file(str(path))
    ids, id_offsets = tensors["input_ids"].tolist(), tensors["id_offsets"].tolist()
    pos, pos_offsets = tensors["reward_pos"].tolist(), tensors["pos_offsets"].tolist()
    return {
        sample_id: Encoded(ids[id_offsets[i]:id_offsets[i + 1]], pos[pos_offsets[i]:pos_offsets[i + 1]])
        for i, sample_id in enumerate(sample_ids)
    }


def _save_disk(path: pathlib.Path, encoded: dict[str, Encoded]) -> None:
    sample_ids = list(encoded)
    tensors = {
        "input_ids": torch.tensor([t for e in encoded.values() for t in e.input_ids], dtype=torch.int64),
        "id_offsets": torch.from_numpy(np.cumsum([0] + [len(e.input_ids) for e in encoded.values()])),
        "reward_pos": torch.tensor([p for e in encoded.values() for p in e.reward_pos], dtype=torch.int64),
        "pos_offsets": torch.from_numpy(np.cumsum([0] + [len(e.reward_pos) for e in encoded.values()])),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    save_file(tensors, str(tmp), metadata={"sample_ids": json.dumps(sample_ids)})
    os.replace(tmp, path)  # atomic: a concurrent reader sees the old or the new file, never a part


def encode_dataset(
    family: Family, dataset: PRMBenchDataset, positions: Sequence[int], *, cache_dir: str | os.PathLike | None = None
) -> list[Encoded]:
    """The family's encoding of ``dataset.samples[p]`` for each position, from the caches where possible.

    With a ``cache_dir``, the file is read once per process and rewritten whenever it lacks a requested sample,
    including samples that were encoded earlier in memory only.
    """
    key = family.cache_key()
    memory = _ENCODED.setdefault(key, {})
    on_disk = None
    if cache_dir is not None:
        path = _disk_path(cache_dir, key)
        if str(path) not in _ON_DISK:
            stored = _load_disk(path) if path.exists() else {}
            for sample_id, encoded in stored.items():
                memory.setdefault(sample_id, encoded)
            _ON_DISK[str(path)] = set(stored)
        on_disk = _ON_DISK[str(path)]
    wanted = [dataset.samples[p] for p in positions]
    for sample in wanted:
        if sample.id not in memory:
            memory[sample.id] = family.encode(sample)
    if on_disk is not None and any(sample.id not in on_disk for sample in wanted):
        _save_disk(path, memory)
        _ON_DISK[str(path)] = set(memory)
    return [memory[sample.id] for sample in wanted]


def packed_batches(
    family: Family,
    dataset: PRMBenchDataset,
    positions: Sequence[int],
    *,
    max_length: int,
    batch_tokens: int,
    cache_dir: str | os.PathLike | None = None,
) -> list[PackedBatch]:
    """Packed batches of the samples at ``positions`` (batch keys are dataset positions), cached in memory."""
    key = (family.cache_key(), tuple(dataset.samples[p].id for p in positions), max_length, batch_tokens)
    if key in _PACKED:
        _PACKED.move_to_end(key)
        return _PACKED[key]
    encoded = encode_dataset(family, dataset, positions, cache_dir=cache_dir)
    batches = pack_batches(
        [TokenizedSample(e.input_ids, e.reward_pos, key=p) for p, e in zip(positions, encoded)],
        max_length=max_length,
        batch_tokens=batch_tokens,
    )
    _PACKED[key] = batches
    while len(_PACKED) > PACKED_CACHE_SIZE:
        _PACKED.popitem(last=False)
    return batches
