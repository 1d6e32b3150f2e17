"""Prefix-shared scoring: every distinct token prefix of a run's samples goes through the backbone once.

PRMBench scores up to ten variants of each problem: the clean ``correct_*`` solution and its perturbed versions. They
share the chat template, the question and every step before the first modification. Under causal attention the final
hidden state at token t depends on tokens ``0..t`` only, so all samples that agree on their first t+1 tokens have the
same hidden state at t. (Full benchmark, SmolLM2's tokenizer, ``lm_judge`` template: 3.63M tokens, 2.42M distinct.)

The prefix tree
---------------
Samples are truncated exactly as :func:`prmbench_fast.packing.pack_batches` truncates them (its ``_truncate``: first
``max_length`` tokens, reward positions ``>= max_length`` dropped). The tree is a radix tree over their token ids,
built from the lexicographically sorted sequences and the longest common prefixes (LCP) of neighbours: a node is
an *edge* of tokens ``[start, end)`` of every sample below it. Its ``tokens_computed`` is the number of distinct
prefixes, ``sum(len) - sum(LCP of sorted neighbours)``. Nothing here knows about PRMBench groups: samples of the
same problem share long prefixes, and all samples share the chat template.

The walk
--------
Depth first, with one :class:`transformers.DynamicCache` that holds the keys/values of the path from the root to the
current node (``P`` tokens). Each forward call runs *segments* (edges) packed in one row on top of that cache,
``position_ids`` continuing from each segment's depth: a whole subtree of at most ``batch_tokens`` tokens goes into
one call, its segments in depth-first order, and each segment attends to the cached prefix, to the segments of the
call on its path and causally to itself, never to a sibling (:func:`prefix_attention_forward`; the plan of which keys
each segment sees is built once per call, with one host-to-device copy: :class:`CallPlan`). A subtree larger than
``batch_tokens`` is entered through the cache instead: its top edge runs first in a call, the cache is cropped to
the end of that edge, the walk recurses, and the cache is cropped back to ``P``. Reward rows inside an edge are read
once and copied to every sample that has a reward there.

Memory: the cache held between forward calls is at most ``cache_budget_tokens`` (default ``max_length``) tokens per
layer. A subtree that would have to be entered past the budget is not: each distinct sample below it runs as one
segment from ``P`` to its end (sharing below that depth is given up; ``tokens_computed`` shows the cost). During a
call the cache also holds the call's new tokens (at most ``batch_tokens``, or one sample), as the unshared pipeline
holds its batch.

Attention and precision
-----------------------
The same kernel as the unshared path (:func:`prmbench_fast.varlen_attention.auto_backend` decides for both): on a GPU
where that path runs flash varlen (fp16/bf16, sm_80+), each layer makes one ``varlen_attn`` call for the whole call's
queries against the cached prefix (its keys passed once, not once per segment) and one for every segment's keys in
the call (its ancestors and itself, gathered), each segment's queries aligned with the end of its keys, and merges
the two by their log-sum-exps in fp32 (:class:`VarlenKeys`, which also says when the prefix is gathered per segment
instead); elsewhere one SDPA call per segment, its keys gathered one segment at a time. Even so, shared rows are not
bitwise the unshared ones: a prefix's keys come from an earlier forward call of another shape, and the merge rounds
each part's output once more. In fp32 that moves rows by a few ulp (5e-7 measured). In bf16 both paths carry
bf16's own error: against fp32 rows the shared rows' error is the unshared rows' (max 0.023-0.025 on the test
models, hidden states of magnitude ~4), and the two differ by at most one bf16 ulp of a row (0.016; measured on
CPU by tests/test_prefix_sharing.py, with SDPA and with a CPU stand-in of the flash path and its merge;
tests/test_gpu.py holds the CUDA path to the same rule, "shared error <= 2x unshared error"). A score computed from such rows can move by that much, so a label within a bf16 ulp of its threshold may
differ between ``share_prefixes=True`` and ``False``, as it may between any two bf16 runs of different batch shapes.

When it applies
---------------
Only for causal decoders whose attention goes through transformers' ``AttentionInterface`` and takes a
``DynamicCache`` (Llama, Qwen2, Mistral, ...), and for families that read each reward from the final hidden state
at its reward position (every family in :mod:`prmbench_fast.families` does). :func:`prefix_sharing_unsupported`
names the reason when a model does not qualify; the caller then scores with ``share_prefixes=False`` (packed
batches, :func:`prmbench_fast.packing.backbone_hidden_states`). A family whose reward at position r depended on
tokens after r (a bidirectional encoder, a head that pools the whole sequence) must not use this module.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import itertools
from collections.abc import Hashable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import varlen_attention
from .packing import TokenizedSample, _decoder, _truncate, attention_implementation

ATTN_IMPLEMENTATION = "prmbench_prefix"


# -- attention: segments of a subtree on top of a shared cached prefix -----------------------------------------------
@dataclasses.dataclass(frozen=True)
class VarlenKeys:
    """The flash path's layout of one call, for one ``varlen_attn`` call per layer over every segment (each segment's
    queries aligned with the end of its keys).

    The keys a segment sees are the cached prefix (P tokens), shared by every segment of the call, then its ancestors
    in the call and itself. When ``split`` the prefix is not gathered per segment (B copies of P rows per layer:
    gigabytes for many short siblings under a long prefix) but attended once for the whole call: one more
    ``varlen_attn`` call runs all T queries against the P cached keys (no mask: every new token sits after them), and
    the two partial attentions are merged by their log-sum-exps. Otherwise (no cached prefix; or a model with sliding
    windows, which apply on absolute positions the shared call cannot express; or T equal to the number of query
    heads, where the log-sum-exp's layout cannot be read from its shape) every segment's keys are gathered whole.

    Attributes:
        index: (K,) int64, positions into the layer's P + T keys, segment after segment: the in-call keys
            ``[P, P + T)`` each segment sees when ``split``, all of them (``CallPlan.key_ranges``) otherwise.
        cu_q: (B+1,) int32, the segments' query offsets (``CallPlan.bounds``).
        cu_k: (B+1,) int32, their key offsets in the gather.
        max_q, max_k: the most queries, and gathered keys, of one segment.
        split: whether the cached prefix is attended once for the call (above).
        prefix_cu_q, prefix_cu_k: (2,) int32, ``[0, T]`` and ``[0, P]``: the shared call's one segment (None unless
            ``split``).
    """

    index: torch.Tensor
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    max_q: int
    max_k: int
    split: bool = False
    prefix_cu_q: torch.Tensor | None = None
    prefix_cu_k: torch.Tensor | None = None


@dataclasses.dataclass(frozen=True)
class CallPlan:
    """Layout of one forward call, built once per call (not per layer) with one host-to-device copy.

    The call's T new tokens are B segments back to back (segment b is new tokens ``bounds[b]:bounds[b+1]``), on top
    of ``prefix_len`` (P) cached tokens. In the layer's keys (the cache after ``DynamicCache.update``: P cached keys,
    then the T new ones) segment b sees ``key_ranges[b]``: the prefix, the segments of this call on its path (its
    ancestors in the tree) and itself, in path order, so key k of that gather sits at absolute position k. Its
    queries sit at absolute positions ``starts[b] + i``; the last ``len_b`` gathered keys are its own.

    Attributes:
        prefix_len: P.
        bounds: (B+1) Python ints.
        starts: (B) Python ints, each segment's first absolute position (its depth in the tree).
        key_ranges: per segment, ``(lo, hi)`` ranges into the P + T keys, merged where adjacent.
        key_index: SDPA path: per segment, an int64 index tensor over the P + T keys, or None when its keys are one
            slice ``[0, hi)`` (no copy). All None on the flash path.
        masks: SDPA path: per segment, a float additive (len_b, starts[b] + len_b) causal mask (0 or -inf) whose query
            i sits at ``starts[b] + i``, or None when ``starts[b] == 0`` (plain ``is_causal``). All None on the flash
            path.
        varlen: the flash path's :class:`VarlenKeys`, or None on the SDPA path.
    """

    prefix_len: int
    bounds: tuple[int, ...]
    starts: tuple[int, ...]
    key_ranges: tuple[tuple[tuple[int, int], ...], ...]
    key_index: tuple[torch.Tensor | None, ...]
    masks: tuple[torch.Tensor | None, ...]
    varlen: VarlenKeys | None

    @classmethod
    def build(
        cls, prefix_len, lengths, starts, parents, *, varlen: bool, dtype, device, host: Sequence[np.ndarray] = (),
        split_prefix: bool = False,
    ) -> tuple[CallPlan, list[torch.Tensor]]:
        """The plan, and the call's other integer host arrays ``host`` moved to ``device`` in the same copy.
        ``split_prefix``: on the flash path, attend the cached prefix once for the call (:class:`VarlenKeys`)."""
        bounds = tuple(itertools.accumulate(lengths, initial=0))
        key_ranges = tuple(_key_ranges(prefix_len, bounds, b, parents[b], start) for b, start in enumerate(starts))
        split = varlen and split_prefix and prefix_len > 0
        # Split: each segment gathers only its keys past the prefix ([P, P + T), its ancestors in the call and itself).
        low = prefix_len if split else 0
        gathers = [np.concatenate([np.arange(max(lo, low), hi) for lo, hi in ranges if hi > low])
                   for ranges in key_ranges]  # fmt: skip
        if varlen:
            key_counts = [g.size for g in gathers]
            key_arrays = [np.concatenate(gathers), np.asarray(bounds), np.cumsum([0, *key_counts])]
            if split:
                key_arrays += [np.asarray([0, bounds[-1]]), np.asarray([0, prefix_len])]
        else:
            sliced = [len(ranges) == 1 and ranges[0][0] == 0 for ranges in key_ranges]
            key_arrays = [g for g, is_slice in zip(gathers, sliced) if not is_slice]
        moved = _to_device([*host, *key_arrays], device)
        extra, keys = moved[: len(host)], moved[len(host) :]
        none = (None,) * len(lengths)
        if varlen:
            index, cu_q, cu_k, *prefix_cu = keys
            prefix_cu_q, prefix_cu_k = (t.int() for t in prefix_cu) if split else (None, None)
            keys_plan = VarlenKeys(index, cu_q.int(), cu_k.int(), max(lengths), max(key_counts), split, prefix_cu_q,
                                   prefix_cu_k)  # fmt: skip
            plan = cls(prefix_len, bounds, tuple(starts), key_ranges, none, none, keys_plan)
        else:
            indices = iter(keys)
            key_index = tuple(None if is_slice else next(indices) for is_slice in sliced)
            masks = tuple(
                None if start == 0 else _causal_mask(start, length, None, dtype, device)
                for length, start in zip(lengths, starts)
            )
            plan = cls(prefix_len, bounds, tuple(starts), key_ranges, key_index, masks, None)
        return plan, extra


def _key_ranges(prefix_len, bounds, b, parents, start) -> tuple[tuple[int, int], ...]:
    """Segment b's keys: the prefix, then its ancestors in the call and itself, adjacent ranges merged."""
    ranges: list[tuple[int, int]] = [(0, prefix_len)] if prefix_len else []
    for a in (*parents, b):
        lo, hi = prefix_len + bounds[a], prefix_len + bounds[a + 1]
        if ranges and ranges[-1][1] == lo:
            ranges[-1] = (ranges[-1][0], hi)
        else:
            ranges.append((lo, hi))
    length = bounds[b + 1] - bounds[b]
    if sum(hi - lo for lo, hi in ranges) != start + length:
        raise AssertionError(f"segment {b}: its key ranges {ranges} do not cover positions 0..{start + length}")
    return tuple(ranges)


def _to_device(arrays: Sequence[np.ndarray], device: torch.device) -> list[torch.Tensor]:
    """Integer host arrays as int64 tensors on ``device`` in ONE copy: concatenated, pinned when the target is CUDA
    (a pinned buffer is copied by DMA, asynchronously; a pageable one is staged, one blocking copy per array), and
    split into views. torch's pinned-memory allocator keeps the buffer until the copy has run."""
    flat = torch.from_numpy(np.concatenate([np.asarray(a, dtype=np.int64).reshape(-1) for a in arrays]))
    if device.type == "cuda":
        flat = flat.pin_memory()
    return list(flat.to(device, non_blocking=True).split([np.size(a) for a in arrays]))


def _causal_mask(start: int, length: int, sliding_window: int | None, dtype, device) -> torch.Tensor:
    """(length, start + length) additive mask: query i (position start + i) sees key j when j <= start + i and,
    with a sliding window W, j > start + i - W (transformers' rule). A float mask: SDPA on CPU runs a bool mask with
    GQA up to 20x slower (measured, 20 queries on 300 keys)."""
    q_pos = torch.arange(start, start + length, device=device)[:, None]
    k_pos = torch.arange(start + length, device=device)[None, :]
    visible = k_pos <= q_pos
    if sliding_window is not None:
        visible &= k_pos > q_pos - sliding_window
    return torch.zeros(visible.shape, dtype=dtype, device=device).masked_fill_(~visible, float("-inf"))


def _varlen_with_lse(query, key, value, cu_q, cu_k, max_q: int, max_k: int, *, scaling, is_causal: bool):
    """``varlen_attn`` with its log-sum-exp, on (1, heads, tokens, dim) inputs: query (1, Hq, Tq, D), key/value
    (1, Hkv, Tk, D) -> out (Tq, Hq, D) in the query's dtype, lse (Tq, Hq) float32 (natural log of each query's sum of
    exp(scaled scores)). No sliding window. The call of ``varlen_attention.varlen_kernel``, returning the lse too."""
    from torch.nn.attention.varlen import AuxRequest

    q, k, v, gqa = varlen_attention.flash_layout(query, key, value)
    heads, tokens = q.shape[1], q.shape[0]
    out, lse = varlen_attention.varlen_attn(
        q, k, v, cu_q, cu_k, max_q, max_k, scale=scaling, window_size=(-1, 0) if is_causal else (-1, -1),
        return_aux=AuxRequest(lse=True), **gqa,
    )  # fmt: skip
    # Flash returns the lse as (heads, tokens), cuDNN as (tokens, heads); a plan never splits a call whose token count
    # equals the number of query heads, so the shape says which.
    lse = lse.reshape(lse.shape[0], -1) if lse.dim() == 3 else lse
    if tokens != heads and lse.shape == (heads, tokens):
        lse = lse.T
    elif tokens == heads or lse.shape != (tokens, heads):
        raise RuntimeError(f"varlen_attn returned a log-sum-exp of shape {tuple(lse.shape)} for {tokens} queries of "
                           f"{heads} heads")  # fmt: skip
    return out, lse.float()


def prefix_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    is_causal: bool | None = None,
    prmbench_plan: CallPlan | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Transformers attention function: the segments of a :class:`CallPlan`, each attending to its path only.

    Args:
        module: the attention module.
        query: (1, Hq, T, D), the T new tokens.
        key, value: (1, Hkv, P + T, D), the P cached tokens followed by the T new ones (what ``DynamicCache.update``
            returns); Hq a multiple of Hkv (GQA).
        attention_mask: must be None (the model builds none for this implementation).
        sliding_window: the layer's window W or None (applied on absolute positions, as transformers does).
        prmbench_plan: the call's :class:`CallPlan`.

    Returns:
        ``(attn_output (1, T, Hq, D), None)``; no attention weights are materialised.
    """
    plan = prmbench_plan
    if plan is None:
        raise ValueError(
            f"attn_implementation={ATTN_IMPLEMENTATION!r} needs a CallPlan; "
            "run the model through prmbench_fast.prefix_sharing.shared_step_hidden"
        )
    if attention_mask is not None:
        raise ValueError("prefix attention takes no attention_mask: segments come from the CallPlan")
    if softcap is not None:
        raise NotImplementedError("attention logit softcapping is not supported by prefix attention")
    if dropout:
        raise ValueError("prefix attention is inference-only: run the model in eval mode (dropout must be 0)")
    if query.shape[0] != 1 or plan.bounds[-1] != query.shape[2] or key.shape[2] != plan.prefix_len + query.shape[2]:
        raise ValueError(
            f"expected one row of {plan.bounds[-1]} new tokens on {plan.prefix_len} cached ones, got query "
            f"{tuple(query.shape)} and key {tuple(key.shape)}"
        )
    if not (is_causal if is_causal is not None else getattr(module, "is_causal", True)):
        raise ValueError("prefix sharing needs causal attention")
    if plan.varlen is not None:
        keys = plan.varlen
        if not keys.split:
            out = varlen_attention.varlen_kernel(
                query, key.index_select(2, keys.index), value.index_select(2, keys.index),
                keys.cu_q, keys.cu_k, keys.max_q, keys.max_k,
                scaling=scaling, is_causal=True, sliding_window=sliding_window,
            )  # fmt: skip
            return out, None
        if sliding_window is not None:
            raise RuntimeError("a layer with a sliding window got a plan that attends the cached prefix once; the "
                               "model's config names no sliding_window (prefix_sharing._Walker decides from it)")
        P, T = plan.prefix_len, query.shape[2]
        # The cached prefix: every new token sits after it, so all T queries see all of it (no mask).
        prefix_out, prefix_lse = _varlen_with_lse(
            query, key[:, :, :P], value[:, :, :P], keys.prefix_cu_q, keys.prefix_cu_k, T, P, scaling=scaling,
            is_causal=False,
        )  # fmt: skip
        call_out, call_lse = _varlen_with_lse(
            query, key.index_select(2, keys.index), value.index_select(2, keys.index), keys.cu_q, keys.cu_k,
            keys.max_q, keys.max_k, scaling=scaling, is_causal=True,
        )  # fmt: skip
        # softmax over both key sets = each part's softmax weighted by its share of the total exp-sum, in fp32.
        lse = torch.logaddexp(prefix_lse, call_lse)
        out = prefix_out.float() * torch.exp(prefix_lse - lse)[..., None] + call_out.float() * torch.exp(
            call_lse - lse
        )[..., None]
        return out.to(query.dtype).unsqueeze(0), None
    enable_gqa = query.shape[1] != key.shape[1]
    out = query.new_empty(query.shape[0], query.shape[2], query.shape[1], query.shape[3])
    for b, (lo, hi) in enumerate(zip(plan.bounds[:-1], plan.bounds[1:])):
        length, start, index = hi - lo, plan.starts[b], plan.key_index[b]
        if index is None:
            k, v = key[:, :, : plan.key_ranges[b][0][1]], value[:, :, : plan.key_ranges[b][0][1]]
        else:
            k, v = key.index_select(2, index), value.index_select(2, index)
        mask = plan.masks[b]
        if sliding_window is not None and start + length > sliding_window:
            mask = _causal_mask(start, length, sliding_window, query.dtype, query.device)
        elif mask is not None and mask.dtype != query.dtype:
            mask = mask.to(query.dtype)
        seg = F.scaled_dot_product_attention(
            query[:, :, lo:hi], k, v,
            attn_mask=mask,
            # A segment at depth 0 is exactly the unshared per-segment call (varlen_attention._segment_sdpa).
            is_causal=mask is None and length > 1,
            scale=scaling,
            enable_gqa=enable_gqa,
        )  # fmt: skip
        out[:, lo:hi] = seg.transpose(1, 2)
    return out, None


def register() -> str:
    """Register :func:`prefix_attention_forward` with transformers (idempotent) and return its name."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, prefix_attention_forward)
    return ATTN_IMPLEMENTATION


# -- the prefix tree -------------------------------------------------------------------------------------------------
class _Node:
    """An edge of the radix tree: tokens ``[start, end)`` shared by every sample below it."""

    __slots__ = ("start", "end", "rep", "parent", "children", "ending", "rows", "pos", "size")

    def __init__(self, start: int, end: int, rep: int, parent: _Node | None):
        self.start, self.end, self.rep, self.parent = start, end, rep, parent
        self.children: list[_Node] = []
        self.ending: list[int] = []  # samples whose last token is this node's last token
        self.rows: list[int] = []  # output rows read inside this edge ...
        self.pos: list[int] = []  # ... and their token positions (absolute, start <= pos < end)
        self.size = 0  # tokens of the edges in this subtree

    def terminals(self):
        """Nodes in this subtree where some sample ends."""
        stack = [self]
        while stack:
            node = stack.pop()
            if node.ending:
                yield node
            stack.extend(node.children)


def _lcp(a: np.ndarray, b: np.ndarray) -> int:
    m = min(a.size, b.size)
    diff = np.flatnonzero(a[:m] != b[:m])
    return int(diff[0]) if diff.size else m


def _build_tree(ids: Sequence[np.ndarray]) -> tuple[_Node, list[_Node]]:
    """Radix tree of the sequences; returns the root (an empty edge) and each sequence's terminal node."""
    root = _Node(0, 0, -1, None)
    order = sorted(range(len(ids)), key=lambda i: ids[i].tolist())
    path = [root]  # the previous sequence's path, root first
    previous = None
    for i in order:
        length = ids[i].size
        shared = _lcp(previous, ids[i]) if previous is not None else 0
        while len(path) > 1 and path[-1].start >= shared:
            path.pop()
        top = path[-1]  # top.start < shared <= top.end
        if top.end > shared:
            # Split: the part of top below the branch point becomes its only child.
            lower = _Node(shared, top.end, top.rep, top)
            lower.children, lower.ending = top.children, top.ending
            for child in lower.children:
                child.parent = lower
            top.children, top.ending, top.end = [lower], [], shared
        if length == shared:  # identical to the previous sequence (sorting puts prefixes first)
            top.ending.append(i)
        else:
            leaf = _Node(shared, length, i, top)
            leaf.ending.append(i)
            top.children.append(leaf)
            path.append(leaf)
        previous = ids[i]
    terminal: list[_Node] = [root] * len(ids)
    nodes = list(_all_nodes(root))  # pre-order: every node before its children
    for node in reversed(nodes):
        node.size = node.end - node.start + sum(child.size for child in node.children)
        for i in node.ending:
            terminal[i] = node
    return root, terminal


# -- results ---------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class PrefixSharingStats:
    """What the walk computed.

    Attributes:
        tokens_total: tokens of the samples after truncation (what the unshared pipeline runs).
        tokens_computed: tokens that went through the backbone (the tree's distinct prefixes, plus any recomputed
            below ``cache_budget_tokens``).
        tree_tokens: distinct prefixes of the truncated samples (``tokens_computed`` with an unlimited budget).
        forward_calls: backbone calls.
        max_cached_tokens: the longest prefix held in the cache between calls (``<= cache_budget_tokens``).
        max_call_tokens: the most new tokens in one call.
    """

    tokens_total: int
    tokens_computed: int
    tree_tokens: int
    forward_calls: int
    max_cached_tokens: int
    max_call_tokens: int

    @property
    def ratio(self) -> float:
        """tokens_total / tokens_computed."""
        return self.tokens_total / self.tokens_computed if self.tokens_computed else 1.0


@dataclasses.dataclass(frozen=True)
class SharedRows:
    """Final-norm hidden states at every kept reward position, samples in input order.

    The field names and meanings follow :class:`prmbench_fast.packing.PackedBatch`, with the (S, H) reward rows in
    place of the (T, H) token rows, so the usual family calls apply unchanged:
    ``scores = family.step_scores(model, rows.hidden, rows.step_pos)``,
    ``labels = family.step_labels(scores, rows.cu_steps)``.

    Attributes:
        hidden: (S, H), the model's dtype, on its device. Sample b's rewards are rows ``cu_steps[b]:cu_steps[b+1]``,
            in its step order.
        step_pos: (S,) int64, ``arange(S)``: the reward rows' indices into ``hidden``.
        cu_steps: (B+1,) int32.
        sample_keys: the B samples' ``key``, in input order.
        seqlens: per sample, its length after truncation.
        num_rewards: per sample, reward positions kept after truncation.
        dropped_rewards: per sample, reward positions lost to truncation.
        truncated_tokens: tokens removed by truncation, summed.
        stats: :class:`PrefixSharingStats`.
    """

    hidden: torch.Tensor
    step_pos: torch.Tensor
    cu_steps: torch.Tensor
    sample_keys: tuple[Hashable, ...]
    seqlens: tuple[int, ...]
    num_rewards: tuple[int, ...]
    dropped_rewards: tuple[int, ...]
    truncated_tokens: int
    stats: PrefixSharingStats

    @property
    def num_tokens(self) -> int:
        """Tokens the samples hold after truncation (as ``PackedBatch.num_tokens``; computed: ``stats``)."""
        return sum(self.seqlens)


def prefix_tree_tokens(samples: Sequence[TokenizedSample], *, max_length: int) -> tuple[int, int]:
    """(tokens after truncation, distinct prefix-tree tokens) of ``samples``, without running a model."""
    ids = [_truncate(s, max_length).ids for s in samples]
    order = sorted(range(len(ids)), key=lambda i: ids[i].tolist())
    total = sum(int(a.size) for a in ids)
    shared = sum(_lcp(ids[a], ids[b]) for a, b in zip(order, order[1:]))
    return total, total - shared


def prefix_sharing_unsupported(model: torch.nn.Module) -> str | None:
    """Why ``model`` cannot share prefixes (None when it can): the caller then uses ``share_prefixes=False``.

    Checked: an encoder-decoder or non-causal attention module (hidden states at a position would depend on later
    tokens), and a decoder without ``set_attn_implementation`` (attention not behind ``AttentionInterface``).
    Whether the attention switch really takes effect is checked again when :func:`shared_step_hidden` runs.
    """
    decoder = _decoder(model)
    config = getattr(decoder, "config", None)
    if config is None or not hasattr(decoder, "set_attn_implementation"):
        return f"{type(decoder).__name__} is not a transformers model with a switchable attention implementation"
    if getattr(config, "is_encoder_decoder", False):
        return f"{type(decoder).__name__} is an encoder-decoder"
    for module in decoder.modules():
        if getattr(module, "is_causal", True) is False:
            return f"{type(module).__name__} attention is not causal"
    return None


# -- the walk --------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Segment:
    ids: np.ndarray  # the new tokens
    start: int  # absolute position of the first one
    parents: tuple[int, ...]  # indices, within its item, of the segments on its path above it (path order)
    rows: list[int]  # output rows read in this segment ...
    offsets: list[int]  # ... at these offsets into it


class _Walker:
    """Runs the tree below a node whose path is in the cache. Unit of work: an *item*, the segments of a whole
    subtree (or one flattened sample) that fit in one call; subtrees larger than ``batch_tokens`` are entered
    through the cache instead."""

    def __init__(self, decoder, samples, reward_rows, out, *, budget: int, batch_tokens: int, varlen: bool):
        from transformers import DynamicCache

        self.decoder, self.samples, self.reward_rows, self.out = decoder, samples, reward_rows, out
        self.budget, self.batch_tokens, self.varlen = budget, batch_tokens, varlen
        self.device, self.dtype = out.device, out.dtype
        # No config: every layer a full DynamicLayer. Sliding-window layers would drop keys the walk crops back to;
        # sliding windows are applied by the attention mask instead.
        self.cache = DynamicCache()
        self.cached = 0
        # The flash path attends the cached prefix once per call (VarlenKeys.split) unless a layer may slide (its
        # window applies on absolute positions) or the call's token count equals the query heads (VarlenKeys).
        text = decoder.config.get_text_config(decoder=True)
        self.sliding = getattr(text, "sliding_window", None) is not None
        self.query_heads = text.num_attention_heads
        self.tokens_computed = self.forward_calls = self.max_cached = self.max_call = 0

    def visit(self, node: _Node) -> None:
        """The cache holds ``node``'s path (``node.end`` tokens); run every edge below it."""
        prefix = node.end
        enter, items = [], collections.deque()
        for child in node.children:
            if child.size <= self.batch_tokens:
                items.append(self._subtree(child))
            elif child.children and child.end <= self.budget:
                enter.append(child)
            else:
                items.extend([segment] for segment in self._flat(child, prefix))
        # A child to enter goes first in its call, so cropping to its end keeps exactly its path; whole small
        # subtrees fill the rest of the call.
        for child in enter:
            self._run(self._fill([self._edge(child, prefix, ())], items), prefix)
            self._crop(child.end)
            self.visit(child)
            self._crop(prefix)
        while items:
            self._run(self._fill(list(items.popleft()), items), prefix)
            self._crop(prefix)

    def _fill(self, call: list[_Segment], items: collections.deque) -> list[_Segment]:
        tokens = sum(s.ids.size for s in call)
        while items and tokens + sum(s.ids.size for s in items[0]) <= self.batch_tokens:
            item = items.popleft()
            offset = len(call)
            for segment in item:
                tokens += segment.ids.size
                call.append(dataclasses.replace(segment, parents=tuple(offset + p for p in segment.parents)))
        return call

    def _edge(self, node: _Node, start: int, parents: tuple[int, ...]) -> _Segment:
        ids = self.samples[node.rep].ids[start : node.end]
        return _Segment(ids, start, parents, node.rows, [p - start for p in node.pos])

    def _subtree(self, node: _Node) -> list[_Segment]:
        """The edges of ``node``'s subtree in depth-first pre-order, each with the indices of its ancestors."""
        segments: list[_Segment] = []
        stack = [(node, ())]
        while stack:
            current, parents = stack.pop()
            segments.append(self._edge(current, current.start, parents))
            here = (*parents, len(segments) - 1)
            stack.extend((child, here) for child in reversed(current.children))
        return segments

    def _flat(self, node: _Node, prefix: int) -> list[_Segment]:
        """One segment per distinct sample below ``node``, from ``prefix`` to its end (no sharing below ``prefix``)."""
        if not node.children:
            return [self._edge(node, prefix, ())]
        segments = []
        for terminal in node.terminals():
            rows, offsets = [], []
            for i in terminal.ending:
                for row, pos in zip(self.reward_rows[i], self.samples[i].reward_pos.tolist()):
                    if pos >= prefix:
                        rows.append(row)
                        offsets.append(pos - prefix)
            ids = self.samples[terminal.rep].ids[prefix : terminal.end]
            segments.append(_Segment(ids, prefix, (), rows, offsets))
        return segments

    def _run(self, segments: list[_Segment], prefix: int) -> None:
        lengths = [s.ids.size for s in segments]
        bounds = list(itertools.accumulate(lengths, initial=0))
        host = [
            np.concatenate([s.ids for s in segments]),
            np.concatenate([np.arange(s.start, s.start + s.ids.size) for s in segments]),
            np.asarray([b + o for s, b in zip(segments, bounds) for o in s.offsets]),  # reward rows in this call ...
            np.asarray([r for s in segments for r in s.rows]),  # ... and where they go in the output
        ]
        plan, (ids, position_ids, local, rows) = CallPlan.build(
            prefix, lengths, [s.start for s in segments], [s.parents for s in segments],
            varlen=self.varlen, dtype=self.dtype, device=self.device, host=host,
            split_prefix=not self.sliding and bounds[-1] != self.query_heads,
        )  # fmt: skip
        self.max_cached = max(self.max_cached, self.cached)
        self.max_call = max(self.max_call, plan.bounds[-1])
        hidden = self.decoder(
            input_ids=ids[None],
            position_ids=position_ids[None],
            past_key_values=self.cache,
            use_cache=True,
            prmbench_plan=plan,
        ).last_hidden_state[0]
        self.cached = prefix + plan.bounds[-1]
        self.tokens_computed += plan.bounds[-1]
        self.forward_calls += 1
        if rows.numel():
            self.out[rows] = hidden.index_select(0, local)

    def _crop(self, length: int) -> None:
        if self.cached > length:
            self.cache.crop(length - self.cached)  # a negative count: tokens to remove
        self.cached = length


def shared_step_hidden(
    model: torch.nn.Module,
    samples: Sequence[TokenizedSample],
    *,
    max_length: int,
    batch_tokens: int,
    cache_budget_tokens: int | None = None,
    backend: str = "auto",
) -> SharedRows:
    """Final-norm hidden states at every sample's reward positions, computing each shared prefix once.

    Equal to ``backbone_hidden_states(model, batch)[batch.step_pos]`` of the unshared pipeline within rounding
    (module docstring: the tree, the walk, attention and precision, when it applies).

    Args:
        model: a causal Hugging Face decoder (``model.base_model`` is used; no LM head runs), whose attention goes
            through ``AttentionInterface``. Its attention implementation and train/eval modes are restored
            afterwards; runs under ``torch.no_grad()``.
        samples: the samples, any order (e.g. ``TokenizedSample(e.input_ids, e.reward_pos, key=position)``).
        max_length: official truncation (2048 in PRMBench), the rule of :func:`prmbench_fast.packing.pack_batches`.
        batch_tokens: the most new tokens in one forward call (divergent suffixes are packed up to this; a longer
            one runs alone).
        cache_budget_tokens: the longest prefix kept in the KV cache between calls (default ``max_length``: every
            prefix); sharing below it is given up.
        backend: attention, as for :func:`prmbench_fast.packing.backbone_hidden_states`: ``"auto"`` (flash varlen
            where the unshared path runs it, one SDPA call per segment elsewhere), ``"varlen"`` or ``"sdpa"``.

    Returns:
        :class:`SharedRows`, samples in input order.
    """
    if max_length < 1 or batch_tokens < 1:
        raise ValueError(f"max_length and batch_tokens must be >= 1, got {max_length} and {batch_tokens}")
    budget = max_length if cache_budget_tokens is None else cache_budget_tokens
    if budget < 0:
        raise ValueError(f"cache_budget_tokens must be >= 0, got {budget}")
    if backend not in varlen_attention.BACKENDS:
        raise ValueError(f"backend must be one of {varlen_attention.BACKENDS}, got {backend!r}")
    reason = prefix_sharing_unsupported(model)
    if reason is not None:
        raise ValueError(f"prefix sharing does not apply: {reason}; score with share_prefixes=False")

    truncated = [_truncate(s, max_length) for s in samples]
    num_rewards = [t.reward_pos.size for t in truncated]
    cu_steps = np.concatenate(([0], np.cumsum(num_rewards, dtype=np.int64)))
    reward_rows = [list(range(cu_steps[b], cu_steps[b + 1])) for b in range(len(truncated))]
    total_rows = int(cu_steps[-1])

    decoder = _decoder(model)
    param = next(decoder.parameters())
    hidden_size = decoder.config.get_text_config(decoder=True).hidden_size
    out = torch.zeros(total_rows, hidden_size, dtype=param.dtype, device=param.device)

    stats = PrefixSharingStats(sum(t.ids.size for t in truncated), 0, 0, 0, 0, 0)
    if truncated:
        root, terminal = _build_tree([t.ids for t in truncated])
        # Each reward row is read in the edge of its sample's path that contains its position.
        for i, t in enumerate(truncated):
            path = []
            node = terminal[i]
            while node is not root:
                path.append(node)
                node = node.parent
            path.reverse()
            starts = [n.start for n in path]
            for row, pos in zip(reward_rows[i], t.reward_pos.tolist()):
                edge = path[bisect.bisect_right(starts, pos) - 1]
                edge.rows.append(row)
                edge.pos.append(pos)

        text = decoder.config.get_text_config(decoder=True)
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        if backend == "auto":
            backend = varlen_attention.auto_backend(param.device, param.dtype, head_dim)
        walker = _Walker(
            decoder, truncated, reward_rows, out, budget=budget, batch_tokens=batch_tokens, varlen=backend == "varlen"
        )
        with attention_implementation(decoder, register()), torch.no_grad():
            walker.visit(root)
        stats = dataclasses.replace(
            stats,
            tokens_computed=walker.tokens_computed,
            tree_tokens=root.size,
            forward_calls=walker.forward_calls,
            max_cached_tokens=walker.max_cached,
            max_call_tokens=walker.max_call,
        )

    return SharedRows(
        hidden=out,
        step_pos=torch.arange(total_rows, dtype=torch.int64, device=param.device),
        cu_steps=_to_device([cu_steps], param.device)[0].int(),
        sample_keys=tuple(t.key for t in truncated),
        seqlens=tuple(int(t.ids.size) for t in truncated),
        num_rewards=tuple(num_rewards),
        dropped_rewards=tuple(t.dropped_rewards for t in truncated),
        truncated_tokens=sum(t.truncated_tokens for t in truncated),
        stats=stats,
    )


def _all_nodes(root: _Node):
    stack = [root]
    while stack:
        node = stack.pop()
        yield node
        stack.extend(node.children)
