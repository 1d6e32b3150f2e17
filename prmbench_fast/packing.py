"""Packed variable-length batches: the layout, the token-budget collator, and backbone hidden states.

The packed layout
-----------------
A batch of B samples is one row of T tokens, the samples concatenated in batch order (no padding). Rewards are read at
S token positions in total. Every name below means exactly this throughout prmbench_fast:

- ``input_ids``: (T,) int64. The token ids of the B samples, back to back.
- ``position_ids``: (T,) int64. Restart at 0 at every sample start, so RoPE sees per-sample positions.
- ``cu_seqlens``: (B+1,) int32. ``cu_seqlens[0] == 0`` and ``cu_seqlens[b+1] = cu_seqlens[b] + len_b``; sample b
  occupies tokens ``cu_seqlens[b]:cu_seqlens[b+1]``; ``cu_seqlens[B] == T`` (the flash-attention varlen convention).
- ``max_seqlen``: Python int. The longest ``len_b`` in the batch.
- ``step_pos``: (S,) int64. Global token indices (into the T tokens) where rewards are read, sample by sample, each
  sample's positions in its step order.
- ``cu_steps``: (B+1,) int32. ``cu_steps[0] == 0``; sample b's rewards are ``step_pos[cu_steps[b]:cu_steps[b+1]]``;
  ``cu_steps[B] == S``.

All sizes are computed on the host by :func:`pack_batches`; nothing downstream needs to read a device tensor back.

Truncation follows the official PRMBench collator (spec §2.6, §7.5): a sample keeps its first ``max_length`` tokens,
and every reward position ``>= max_length`` is dropped (counted in ``PackedBatch.dropped_rewards``), so a model emits
fewer scores than steps for that sample.

Attention
---------
:func:`backbone_hidden_states` runs the decoder with :mod:`prmbench_fast.varlen_attention`, which attends inside each
segment only (flash varlen kernel on CUDA, one SDPA call per segment elsewhere). A batch therefore costs
``sum(len_b ** 2)`` attention whatever T is, so the collator packs every batch into a single row and has no per-row
token cap: ``batch_tokens`` only bounds activation memory (T x hidden per layer).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from prmbench_fast import varlen_attention


@dataclass(frozen=True)
class TokenizedSample:
    """One tokenized sample, before truncation.

    Attributes:
        input_ids: the token ids (a list of ints or a 1-D CPU tensor), at least one token.
        reward_pos: local token positions (0-based, < len(input_ids)) where rewards are read, in step order.
        key: opaque identifier returned in ``PackedBatch.sample_keys`` (e.g. the sample's index in the caller's list).
    """

    input_ids: Sequence[int] | torch.Tensor
    reward_pos: Sequence[int] | torch.Tensor
    key: Hashable


@dataclass(frozen=True)
class PackedBatch:
    """B samples in the packed layout (module docstring) plus host-side bookkeeping.

    Attributes:
        input_ids: (T,) int64.
        position_ids: (T,) int64, restarting at 0 per sample.
        cu_seqlens: (B+1,) int32.
        max_seqlen: longest sample in tokens.
        step_pos: (S,) int64 global token indices.
        cu_steps: (B+1,) int32 offsets into ``step_pos``.
        sample_keys: the B samples' ``key``, in batch order.
        seqlens: the B sample lengths after truncation, as Python ints (the host copy of ``diff(cu_seqlens)``).
        num_rewards: per sample, reward positions kept after truncation (``diff(cu_steps)``).
        dropped_rewards: per sample, reward positions lost to truncation.
        truncated_tokens: tokens removed by truncation, summed over the batch.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    step_pos: torch.Tensor
    cu_steps: torch.Tensor
    sample_keys: tuple[Hashable, ...]
    seqlens: tuple[int, ...]
    num_rewards: tuple[int, ...]
    dropped_rewards: tuple[int, ...]
    truncated_tokens: int

    @property
    def num_tokens(self) -> int:
        """T."""
        return sum(self.seqlens)

    def pin_memory(self) -> PackedBatch:
        """A copy with every tensor in page-locked host memory, from which a non-blocking copy to a GPU does not
        block the host (from pageable memory it does)."""
        return replace(
            self,
            input_ids=self.input_ids.pin_memory(),
            position_ids=self.position_ids.pin_memory(),
            cu_seqlens=self.cu_seqlens.pin_memory(),
            step_pos=self.step_pos.pin_memory(),
            cu_steps=self.cu_steps.pin_memory(),
        )

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The batch's tensors (for ``record_stream`` after a copy on another stream)."""
        return self.input_ids, self.position_ids, self.cu_seqlens, self.step_pos, self.cu_steps

    def to(self, device: torch.device | str, non_blocking: bool = True) -> PackedBatch:
        """A copy with every tensor on ``device``. The copies only overlap with compute from pinned host memory."""
        return replace(
            self,
            input_ids=self.input_ids.to(device, non_blocking=non_blocking),
            position_ids=self.position_ids.to(device, non_blocking=non_blocking),
            cu_seqlens=self.cu_seqlens.to(device, non_blocking=non_blocking),
            step_pos=self.step_pos.to(device, non_blocking=non_blocking),
            cu_steps=self.cu_steps.to(device, non_blocking=non_blocking),
        )


@dataclass(frozen=True)
class _Truncated:
    ids: np.ndarray
    reward_pos: np.ndarray
    dropped_rewards: int
    truncated_tokens: int
    key: Hashable


def _truncate(sample: TokenizedSample, max_length: int) -> _Truncated:
    ids = np.asarray(sample.input_ids, dtype=np.int64).reshape(-1)
    pos = np.asarray(sample.reward_pos, dtype=np.int64).reshape(-1)
    if ids.size == 0:
        raise ValueError(f"sample {sample.key!r} has no tokens")
    if pos.size and (pos.min() < 0 or pos.max() >= ids.size):
        raise ValueError(f"sample {sample.key!r}: reward positions must lie in [0, {ids.size}), got {pos.tolist()}")
    # Filter rather than cut at the first out-of-range position: the official adapters keep every index < max_length.
    kept = pos[pos < max_length]
    return _Truncated(
        ids=ids[:max_length],
        reward_pos=kept,
        dropped_rewards=int(pos.size - kept.size),
        truncated_tokens=max(int(ids.size) - max_length, 0),
        key=sample.key,
    )


def _build(group: list[_Truncated]) -> PackedBatch:
    seqlens = np.array([s.ids.size for s in group], dtype=np.int64)
    num_rewards = np.array([s.reward_pos.size for s in group], dtype=np.int64)
    cu_seqlens = np.concatenate(([0], np.cumsum(seqlens)))
    cu_steps = np.concatenate(([0], np.cumsum(num_rewards)))
    starts = cu_seqlens[:-1]
    total = int(cu_seqlens[-1])
    position_ids = np.arange(total, dtype=np.int64) - np.repeat(starts, seqlens)
    step_pos = np.concatenate([s.reward_pos for s in group]) + np.repeat(starts, num_rewards)
    return PackedBatch(
        input_ids=torch.from_numpy(np.concatenate([s.ids for s in group])),
        position_ids=torch.from_numpy(position_ids),
        cu_seqlens=torch.from_numpy(cu_seqlens.astype(np.int32)),
        max_seqlen=int(seqlens.max()),
        step_pos=torch.from_numpy(step_pos.astype(np.int64)),
        cu_steps=torch.from_numpy(cu_steps.astype(np.int32)),
        sample_keys=tuple(s.key for s in group),
        seqlens=tuple(seqlens.tolist()),
        num_rewards=tuple(num_rewards.tolist()),
        dropped_rewards=tuple(s.dropped_rewards for s in group),
        truncated_tokens=sum(s.truncated_tokens for s in group),
    )


def pack_batches(samples: Sequence[TokenizedSample], *, max_length: int, batch_tokens: int) -> list[PackedBatch]:
    """Truncate, sort and pack samples into batches of at most ``batch_tokens`` tokens.

    Args:
        samples: the samples, any order; each appears in exactly one batch.
        max_length: keep the first ``max_length`` tokens of each sample; reward positions ``>= max_length`` are dropped
            (PRMBench uses 2048).
        batch_tokens: the most tokens (T) in one batch. A sample longer than this (after truncation) gets a batch of
            its own.

    Returns:
        Batches in the packed layout. Samples are sorted by truncated length, longest first (so a batch that does not
        fit in memory fails at once), ties kept in input order; batches are filled greedily in that order. The result
        depends only on the inputs.
    """
    return list(pack_stream([samples], max_length=max_length, batch_tokens=batch_tokens))


def pack_stream(
    chunks: Iterable[Sequence[TokenizedSample]], *, max_length: int, batch_tokens: int
) -> Iterator[PackedBatch]:
    """:func:`pack_batches` for samples that arrive in chunks (e.g. tokenized by a producer thread while the first
    batches run): each chunk is sorted as :func:`pack_batches` sorts, and the greedy fill runs on across chunks: a
    batch is yielded as soon as the next sample does not fit, and a chunk boundary never closes one. One chunk gives
    exactly :func:`pack_batches`'s batches; chunks in decreasing order of their samples' lengths give nearly its order.
    """
    if max_length < 1 or batch_tokens < 1:
        raise ValueError(f"max_length and batch_tokens must be >= 1, got {max_length} and {batch_tokens}")
    group: list[_Truncated] = []
    group_tokens = 0
    for chunk in chunks:
        truncated = [_truncate(s, max_length) for s in chunk]
        # sorted() is stable, so equal lengths keep input order.
        for sample in sorted(truncated, key=lambda s: -s.ids.size):
            if group and group_tokens + sample.ids.size > batch_tokens:
                yield _build(group)
                group, group_tokens = [], 0
            group.append(sample)
            group_tokens += sample.ids.size
    if group:
        yield _build(group)


def _decoder(model: torch.nn.Module) -> torch.nn.Module:
    """The base model of a ``*ForCausalLM`` / ``*ForTokenClassification`` / PRM wrapper, or the model itself."""
    return getattr(model, "base_model", model)


@contextlib.contextmanager
def attention_implementation(decoder: torch.nn.Module, name: str):
    """Run ``decoder`` in eval mode with the registered attention function ``name``; afterwards its previous attention
    implementation and every module's train/eval flag are restored, even on error."""
    previous = decoder.config._attn_implementation
    modes = [(module, module.training) for module in decoder.modules()]
    try:
        decoder.set_attn_implementation(name)
        if decoder.config._attn_implementation != name:
            # transformers only warns when a model cannot switch; running on would silently mix samples.
            raise ValueError(f"{type(decoder).__name__} cannot switch its attention implementation to {name!r}")
        decoder.eval()
        yield
    finally:
        if decoder.config._attn_implementation != previous:
            decoder.set_attn_implementation(previous)
        for module, training in modes:
            module.training = training


def backbone_hidden_states(model: torch.nn.Module, batch: PackedBatch, *, backend: str = "auto") -> torch.Tensor:
    """Final-norm hidden states of a packed batch, without the LM head.

    Runs the decoder's base model on one packed row with ``position_ids`` restarting per sample, ``use_cache=False`` and
    no attention mask, with attention swapped for :func:`prmbench_fast.varlen_attention.packed_attention_forward`
    so each sample attends only to itself. The model's attention implementation and train/eval mode are restored
    afterwards; weights are not copied. Runs under ``torch.no_grad()``.

    Args:
        model: a Hugging Face decoder, with or without a head (``model.base_model`` is used), whose attention goes
            through ``AttentionInterface`` (Llama, Qwen2, Mistral, ...).
        batch: a :class:`PackedBatch` already on the model's device.
        backend: ``"auto"``, ``"varlen"`` or ``"sdpa"``, see :mod:`prmbench_fast.varlen_attention`.

    Returns:
        hidden: (T, H), the model's dtype; row ``t`` belongs to the sample whose segment contains ``t``.
    """
    if backend not in varlen_attention.BACKENDS:
        raise ValueError(f"backend must be one of {varlen_attention.BACKENDS}, got {backend!r}")
    decoder = _decoder(model)
    bounds = tuple(itertools.accumulate(batch.seqlens, initial=0))
    with attention_implementation(decoder, varlen_attention.register()), torch.no_grad():
        out = decoder(
            input_ids=batch.input_ids[None],
            position_ids=batch.position_ids[None],
            use_cache=False,
            cu_seq_lens_q=batch.cu_seqlens,
            cu_seq_lens_k=batch.cu_seqlens,
            max_length_q=batch.max_seqlen,
            max_length_k=batch.max_seqlen,
            prmbench_seq_bounds=bounds,
            prmbench_backend=backend,
        )
    return out.last_hidden_state[0]
