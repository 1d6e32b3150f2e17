"""The benchmark as packed batches, for loops that run their own forward (RL, custom training loops).

``score()`` tokenizes each sample with its family's template, packs the samples into variable-length batches and runs
the model itself. A loop that runs its own forward (its own attention kernels, sharding, a policy and a PRM in one
model) takes the same batches from :func:`benchmark_batches`, reads its step scores at ``step_pos``, and feeds them to
:class:`prmbench_fast.PRMBenchMetric` with the batch's ``sample_pos`` and ``cu_steps``::

    bench = benchmark_batches(data, tokenizer, family="generic")
    metric = PRMBenchMetric(data, validity_threshold=bench.family.validity_threshold, device=device)
    for batch in bench:
        batch = batch.to(device)
        logits = model(input_ids=batch.input_ids[None], position_ids=batch.position_ids[None],
                       attention_mask=batch.block_causal_mask()).logits[0]
        metric.update(batch.sample_pos, logits[batch.step_pos].softmax(-1)[:, 1], batch.cu_steps)
    report = metric.compute()

The batches are the ones ``score()`` makes (same tokenization, truncation and packing; ``prefix sharing`` aside) and
come from the same caches: a later call with the same family, tokenizer, samples and sizes only wraps them again.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from .data import PRMBenchDataset
from .distributed import rank_and_world
from .families import FAMILY_NAMES, Family, FamilyError, family_class
from .packing import PackedBatch
from .token_cache import packed_batches

__all__ = ["BenchmarkBatch", "PackedBenchmark", "benchmark_batches"]


@dataclasses.dataclass(frozen=True)
class BenchmarkBatch(PackedBatch):
    """A :class:`~prmbench_fast.packing.PackedBatch` of benchmark samples (the packed layout: ``input_ids``,
    ``position_ids``, ``cu_seqlens``, ``max_seqlen``, ``step_pos``, ``cu_steps``, ``seqlens``...) with their dataset
    positions.

    Attributes:
        sample_pos: (B,) int64. The samples' positions in the dataset (``PRMBenchMetric.update``'s ``sample_pos``;
            the batch's ``sample_keys`` as a tensor).
    """

    sample_pos: torch.Tensor

    @classmethod
    def of(cls, packed: PackedBatch) -> "BenchmarkBatch":
        """The batch of a ``PackedBatch`` whose sample keys are dataset positions."""
        layout = {field.name: getattr(packed, field.name) for field in dataclasses.fields(PackedBatch)}
        return cls(**layout, sample_pos=torch.tensor(packed.sample_keys, dtype=torch.int64))

    def to(self, device: torch.device | str, non_blocking: bool = True) -> "BenchmarkBatch":
        """A copy with every tensor, ``sample_pos`` included, on ``device``."""
        moved = super().to(device, non_blocking=non_blocking)
        return dataclasses.replace(moved, sample_pos=self.sample_pos.to(device, non_blocking=non_blocking))

    def block_causal_mask(self) -> torch.Tensor:
        """(1, 1, T, T) bool: token i attends to token j when both lie in one sample and j <= i.

        What a plain ``transformers`` forward (eager or SDPA attention) needs to run the packed row with each sample
        attending only to itself: pass it as ``attention_mask`` with ``position_ids``. It takes T² bytes (T = 16,384:
        268 MB), so keep ``batch_tokens`` small with it; a varlen kernel (flash-attention's ``cu_seqlens``,
        ``attn_implementation="flash_attention_2"`` with ``position_ids``) needs no mask.
        """
        device = self.input_ids.device
        segment = torch.repeat_interleave(torch.arange(len(self.seqlens), device=device),
                                          torch.tensor(self.seqlens, device=device), output_size=self.num_tokens)
        causal = torch.ones(self.num_tokens, self.num_tokens, dtype=torch.bool, device=device).tril_()
        return ((segment[:, None] == segment[None, :]) & causal)[None, None]


class PackedBenchmark(Sequence[BenchmarkBatch]):
    """The packed batches of a benchmark set for one family and tokenizer (a sequence of :class:`BenchmarkBatch`).

    Attributes:
        dataset: the benchmark set; ``sample_pos`` index ``dataset.samples``.
        family: the built family (:class:`prmbench_fast.families.Family`): its ``validity_threshold`` is the label
            rule ``score > threshold`` of its official adapter; ``family.step_scores(model, hidden, step_pos)`` reads
            its official scores from final hidden states.
        batches: the batches, longest samples first.
    """

    def __init__(self, dataset: PRMBenchDataset, family: Family, batches: list[BenchmarkBatch]):
        self.dataset, self.family, self.batches = dataset, family, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index):  # type: ignore[override]
        return self.batches[index]

    def __iter__(self) -> Iterator[BenchmarkBatch]:
        return iter(self.batches)


def benchmark_batches(
    dataset: PRMBenchDataset,
    tokenizer: Any,
    *,
    family: str = "generic",
    max_length: int = 2048,
    batch_tokens: int = 16384,
    cache_dir: str | os.PathLike | None = None,
    shard: bool = True,
    **family_options: Any,
) -> PackedBenchmark:
    """The samples of ``dataset`` tokenized with ``family``'s template and packed, as ``score()`` packs them.

    Args:
        dataset: the benchmark set (``prmbench_fast.load_prmbench(...)``).
        tokenizer: the model's tokenizer (an object, not a path).
        family: a name from ``prmbench_fast.families.FAMILY_NAMES`` ("auto" needs a model: name the family).
        max_length: the official truncation (PRMBench uses 2048): a sample keeps its first ``max_length`` tokens and
            its rewards past the cut vanish (the metric then counts fewer labels for it, as officially).
        batch_tokens: the most tokens (T) in one batch (a longer sample gets a batch of its own).
        cache_dir: keep the tokenized samples on disk too (as ``score(cache_dir=)``); in memory they always are.
        shard: under ``torch.distributed``, each rank gets a disjoint share (``positions[rank::world]``, as
            ``score()`` shards), and ``PRMBenchMetric.compute()`` gathers them. False: every rank gets every sample.
        **family_options: the family's options (``step_separator=``, ``validity_threshold=``...).

    Raises:
        TypeError: a dataset that is not a ``PRMBenchDataset``, a tokenizer given as a path, an option the family
            does not take.
        ValueError: an unknown family or "auto", sizes that are not positive integers.
    """
    if not isinstance(dataset, PRMBenchDataset):
        raise TypeError(f"dataset must be a PRMBenchDataset (prmbench_fast.load_prmbench(...)), got "
                        f"{type(dataset).__name__}")
    if isinstance(tokenizer, (str, os.PathLike)) or not callable(tokenizer):
        raise TypeError("tokenizer must be a tokenizer object (transformers.AutoTokenizer.from_pretrained(path)), got "
                        f"{type(tokenizer).__name__}")
    if family == "auto":
        raise FamilyError(f"benchmark_batches() has no model to detect the family from: pass family= one of: "
                          f"{', '.join(FAMILY_NAMES)}")
    for name, value in (("max_length", max_length), ("batch_tokens", batch_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    cls = family_class(family)
    if cls.takes_max_length:
        family_options["max_length"] = max_length
    fam = cls.build(tokenizer, **family_options)
    rank, world = rank_and_world() if shard else (0, 1)
    positions = list(range(len(dataset)))[rank::world]
    packed = packed_batches(fam, dataset, positions, max_length=max_length, batch_tokens=batch_tokens,
                            cache_dir=cache_dir)
    return PackedBenchmark(dataset, fam, [BenchmarkBatch.of(b) for b in packed])
