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
    """The family's encoding of ``dataset.samples[p]`` for each position, from the caches where possible."""
    key = family.cache_key()
    memory = _ENCODED.setdefault(key, {})
    if cache_dir is not None and not memory and _disk_path(cache_dir, key).exists():
        memory.update(_load_disk(_disk_path(cache_dir, key)))
    missing = [p for p in positions if dataset.samples[p].id not in memory]
    for p in missing:
        sample = dataset.samples[p]
        memory[sample.id] = family.encode(sample)
    if missing and cache_dir is not None:
        _save_disk(_disk_path(cache_dir, key), memory)
    return [memory[dataset.samples[p].id] for p in positions]


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
