"""CPU stand-in for ``torch.nn.attention.varlen.varlen_attn`` (CUDA only), with flash-attention's documented semantics.

Tests swap it in for ``prmbench_fast.varlen_attention.varlen_attn`` to check the layout, window, GQA and offset
plumbing of the code that calls the CUDA kernel.
"""

from __future__ import annotations

import torch


def flash_varlen_reference(q, k, v, cu_q, cu_k, max_q, max_k, *, scale, window_size, enable_gqa=False):
    """q (Tq, Hq, D), k/v (Tk, Hkv, D); segment b holds queries ``cu_q[b]:cu_q[b+1]`` and keys ``cu_k[b]:cu_k[b+1]``.

    Flash aligns a segment's queries with the END of its keys (bottom-right): query i of a segment with Lq queries and
    Lk keys sits at key position ``i + Lk - Lq``, and key j is visible iff ``pos - left <= j <= pos + right`` (a
    negative bound: unlimited). GQA maps query head h to kv head ``h // (Hq // Hkv)``.
    """
    assert q.dim() == 3 and q.is_contiguous() and k.is_contiguous() and v.is_contiguous()
    assert cu_q.dtype == cu_k.dtype == torch.int32 and cu_q.device == cu_k.device == q.device
    assert isinstance(window_size, tuple) and enable_gqa == (q.shape[1] != k.shape[1])
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    left, right = window_size
    out = torch.empty_like(q)
    q_bounds, k_bounds = cu_q.tolist(), cu_k.tolist()
    assert max_q == max(e - s for s, e in zip(q_bounds[:-1], q_bounds[1:]))
    assert max_k == max(e - s for s, e in zip(k_bounds[:-1], k_bounds[1:]))
    for (qs, qe), (ks, ke) in zip(zip(q_bounds[:-1], q_bounds[1:]), zip(k_bounds[:-1], k_bounds[1:])):
        pos = torch.arange(qe - qs)[:, None] + (ke - ks) - (qe - qs)
        j = torch.arange(ke - ks)[None, :]
        visible = ((left < 0) | (j >= pos - left)) & ((right < 0) | (j <= pos + right))
        scores = torch.einsum("ihd,jhd->hij", q[qs:qe], k[ks:ke]) * scale
        probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
        out[qs:qe] = torch.einsum("hij,jhd->ihd", probs, v[ks:ke])
    return out


def flash_varlen_reference_without_gqa(q, k, v, cu_q, cu_k, max_q, max_k, *, scale, window_size):
    """The same, with torch 2.11's signature: no ``enable_gqa``, so query and key/value heads must be equal."""
    assert q.shape[1] == k.shape[1] == v.shape[1], "torch 2.11's varlen_attn has no GQA"
    return flash_varlen_reference(q, k, v, cu_q, cu_k, max_q, max_k, scale=scale, window_size=window_size)
