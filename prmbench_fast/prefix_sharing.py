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
call on its path and causally to itself, never to a sibling (:func:`prefix_attention_forward`, one SDPA call per
segment, the plan of which keys each segment sees built once per call: :class:`CallPlan`). A subtree larger than
``batch_tokens`` is entered through the cache instead: its top edge runs first in a call, the cache is cropped to
the end of that edge, the walk recurses, and the cache is cropped back to ``P``. Reward rows inside an edge are read
once and copied to every sample that has a reward there.

Memory: the cache held between forward calls is at most ``cache_budget_tokens`` (default ``max_length``) tokens per
layer. A subtree that would have to be entered past the budget is not: each distinct sample below it runs as one
segment from ``P`` to its end (sharing below that depth is given up; ``tokens_computed`` shows the cost). During a
call the cache also holds the call's new tokens (at most ``batch_tokens``, or one sample), as the unshared pipeline
holds its batch.

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

from .packing import TokenizedSample, _decoder, _truncate, attention_implementation

ATTN_IMPLEMENTATION = "prmbench_prefix"


# -- attention: segments of a subtree on top of a shared cached prefix -----------------------------------------------
@dataclasses.dataclass(frozen=True)
class CallPlan:
    """Host-side layout of one forward call, built once per call (not per layer).

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
        key_index: per segment, an int64 index tensor over the P + T keys, or None when its keys are one slice
            ``[0, hi)`` (no copy).
        masks: per segment, a float additive (len_b, starts[b] + len_b) causal mask (0 or -inf) whose query i
            sits at ``starts[b] + i``, or None when ``starts[b] == 0`` (plain ``is_causal``).
    """

    prefix_len: int
    bounds: tuple[int, ...]
    starts: tuple[int, ...]
    key_ranges: tuple[tuple[tuple[int, int], ...], ...]
    key_index: tuple[torch.Tensor | None, ...]
    masks: tuple[torch.Tensor | None, ...]

    @classmethod
    def build(cls, prefix_len, lengths, starts, parents, *, dtype, device) -> CallPlan:
        bounds = tuple(itertools.accumulate(lengths, initial=0))
        key_ranges, key_index, masks = [], [], []
        for b, (length, start) in enumerate(zip(lengths, starts)):
            ranges: list[tuple[int, int]] = [(0, prefix_len)] if prefix_len else []
            for a in (*parents[b], b):
                lo, hi = prefix_len + bounds[a], prefix_len + bounds[a + 1]
                if ranges and ranges[-1][1] == lo:
                    ranges[-1] = (ranges[-1][0], hi)
                else:
                    ranges.append((lo, hi))
            if sum(hi - lo for lo, hi in ranges) != start + length:
                raise AssertionError(f"segment {b}: its key ranges {ranges} do not cover positions 0..{start + length}")
            key_ranges.append(tuple(ranges))
            if len(ranges) == 1 and ranges[0][0] == 0:
                key_index.append(None)
            else:
                key_index.append(torch.cat([torch.arange(lo, hi) for lo, hi in ranges]).to(device))
            masks.append(None if start == 0 else _causal_mask(start, length, None, dtype, device))
        return cls(prefix_len, bounds, tuple(starts), tuple(key_ranges), tuple(key_index), tuple(masks))


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

    def __init__(self, decoder, samples, reward_rows, out, *, budget: int, batch_tokens: int):
        from transformers import DynamicCache

        self.decoder, self.samples, self.reward_rows, self.out = decoder, samples, reward_rows, out
        self.budget, self.batch_tokens = budget, batch_tokens
        self.device, self.dtype = out.device, out.dtype
        # No config: every layer a full DynamicLayer. Sliding-window layers would drop keys the walk crops back to;
        # sliding windows are applied by the attention mask instead.
        self.cache = DynamicCache()
        self.cached = 0
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
        plan = CallPlan.build(
            prefix, lengths, [s.start for s in segments], [s.parents for s in segments],
            dtype=self.dtype, device=self.device,
        )  # fmt: skip
        ids = torch.from_numpy(np.concatenate([s.ids for s in segments])).to(self.device)
        position_ids = torch.from_numpy(
            np.concatenate([np.arange(s.start, s.start + s.ids.size, dtype=np.int64) for s in segments])
        ).to(self.device)
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
        rows = [r for s in segments for r in s.rows]
        if rows:
            local = [b + o for s, b in zip(segments, plan.bounds) for o in s.offsets]
            index = torch.tensor(local, dtype=torch.int64).to(self.device)
            self.out[torch.tensor(rows, dtype=torch.int64).to(self.device)] = hidden.index_select(0, index)

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
) -> SharedRows:
    """Final-norm hidden states at every sample's reward positions, computing each shared prefix once.

    Equal to ``backbone_hidden_states(model, batch)[batch.step_pos]`` of the unshared pipeline within fp32 rounding
    (module docstring: the tree, the walk, when it applies).

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

    Returns:
        :class:`SharedRows`, samples in input order.
    """
    if max_length < 1 or batch_tokens < 1:
        raise ValueError(f"max_length and batch_tokens must be >= 1, got {max_length} and {batch_tokens}")
    budget = max_length if cache_budget_tokens is None else cache_budget_tokens
    if budget < 0:
        raise ValueError(f"cache_budget_tokens must be >= 0, got {budget}")
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

        walker = _Walker(decoder, truncated, reward_rows, out, budget=budget, batch_tokens=batch_tokens)
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
        cu_steps=torch.from_numpy(cu_steps.astype(np.int32)).to(param.device),
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
