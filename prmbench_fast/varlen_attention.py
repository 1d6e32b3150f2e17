"""Per-segment causal attention for packed rows, registered as a transformers attention function.

A packed row (layout: see :mod:`prmbench_fast.packing`) holds B samples back to back. Transformers' own ``sdpa`` and
``eager`` paths keep them apart with a (T, T) block-diagonal mask, so one row of T tokens costs T x T attention however
short its samples are. The function here attends inside each segment only, so a batch costs sum(len_b ** 2):

- ``"varlen"``: ``torch.nn.attention.varlen.varlen_attn`` on the packed ``(T, heads, dim)`` layout with
  ``cu_seqlens`` int32. It runs flash attention: CUDA tensors in fp16/bf16, on sm_80 or newer, head dim <= 256.
- ``"sdpa"``: one ``scaled_dot_product_attention`` call per segment, with segment bounds read from host-side
  integers (never from a device tensor, so no host sync). The CPU path, and the fallback for fp32 on CUDA.
- ``"auto"``: ``"varlen"`` when the inputs qualify (:func:`flash_varlen_supported`), else ``"sdpa"``.

Transformers hands every extra forward kwarg to the attention function, so
:func:`prmbench_fast.packing.backbone_hidden_states` passes the varlen metadata by its standard names
``cu_seq_lens_q``/``cu_seq_lens_k`` and ``max_length_q``/``max_length_k`` (what ``DataCollatorWithFlattening`` emits
for flash-attention-2), plus two of its own: ``prmbench_seq_bounds`` (the host copy of ``cu_seqlens``) and
``prmbench_backend``. Because the name is not registered
as a mask function, the model builds no attention mask at all for it.

The function only works with that metadata: it raises rather than guess segment bounds, so it must not stay set on a
model outside :func:`~prmbench_fast.packing.backbone_hidden_states` (which restores the previous implementation).
"""

from __future__ import annotations

from collections.abc import Sequence

import functools

import torch
import torch.nn.functional as F

ATTN_IMPLEMENTATION = "prmbench_varlen"
BACKENDS = ("auto", "varlen", "sdpa")

from .compat import varlen_attn, varlen_attn_takes_gqa

# ``varlen_attn`` is torch's flash varlen attention where it takes what this module passes (torch >= 2.11), else None:
# the per-segment SDPA path then serves every input (prmbench_fast/compat.py says what each torch release lacks).

# Flash attention (behind varlen_attn) has half-precision kernels only, built for sm_80 (Ampere) and newer: older
# GPUs raise "FlashAttention only supports Ampere GPUs or newer". Its forward takes head dims up to 256, padding them
# to a multiple of 8; only multiples of 8 are routed to it (every released model's head dim is one), so no padded
# path is ever taken.
_VARLEN_DTYPES = (torch.float16, torch.bfloat16)
_VARLEN_MIN_CAPABILITY = (8, 0)
_VARLEN_MAX_HEAD_DIM = 256
_VARLEN_HEAD_DIM_MULTIPLE = 8


def flash_varlen_supported(capability: tuple[int, int], dtype: torch.dtype, head_dim: int) -> bool:
    """Whether flash varlen attention runs on a GPU of this compute capability, for this dtype and head dim."""
    return (
        varlen_attn is not None
        and tuple(capability) >= _VARLEN_MIN_CAPABILITY
        and dtype in _VARLEN_DTYPES
        and head_dim <= _VARLEN_MAX_HEAD_DIM
        and head_dim % _VARLEN_HEAD_DIM_MULTIPLE == 0
    )


@functools.lru_cache(maxsize=None)
def _capability(device: torch.device) -> tuple[int, int]:
    # Asked once per device: the query is a driver call, and attention runs once per layer.
    return torch.cuda.get_device_capability(device)


def auto_backend(device: torch.device, dtype: torch.dtype, head_dim: int) -> str:
    """What ``"auto"`` runs for attention on ``device`` in ``dtype`` with this head dim: "varlen" or "sdpa"."""
    if device.type != "cuda":
        return "sdpa"
    return "varlen" if flash_varlen_supported(_capability(device), dtype, head_dim) else "sdpa"


def _resolve_backend(backend: str, query: torch.Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return auto_backend(query.device, query.dtype, query.shape[-1]) if backend == "auto" else backend


def _window_mask(length: int, sliding_window: int, device: torch.device) -> torch.Tensor:
    """(length, length) bool, True where query i may see key j: j <= i and i - j < sliding_window, as transformers."""
    i = torch.arange(length, device=device)[:, None]
    j = torch.arange(length, device=device)[None, :]
    return (j <= i) & (j > i - sliding_window)


def _segment_sdpa(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    seq_bounds: Sequence[int],
    *,
    scaling: float | None,
    is_causal: bool,
    sliding_window: int | None,
) -> torch.Tensor:
    """query (1, Hq, T, D), key/value (1, Hkv, T, D) -> (1, T, Hq, D), attending inside each segment only."""
    enable_gqa = query.shape[1] != key.shape[1]
    out = query.new_empty(query.shape[0], query.shape[2], query.shape[1], query.shape[3])
    for start, end in zip(seq_bounds[:-1], seq_bounds[1:]):
        length = end - start
        mask = None
        if is_causal and sliding_window is not None and length > sliding_window:
            mask = _window_mask(length, sliding_window, query.device)
        seg = F.scaled_dot_product_attention(
            query[:, :, start:end],
            key[:, :, start:end],
            value[:, :, start:end],
            attn_mask=mask,
            # A one-token causal segment sees only itself; is_causal=False there matches what sdpa does unpacked.
            is_causal=is_causal and mask is None and length > 1,
            scale=scaling,
            enable_gqa=enable_gqa,
        )
        out[:, start:end] = seg.transpose(1, 2)
    return out


def flash_layout(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """(1, heads, tokens, dim) query/key/value -> ``varlen_attn``'s packed (tokens, heads, dim) q, k, v, and the keyword
    arguments that ask it for grouped-query attention (empty when none is needed or this torch's varlen_attn cannot)."""
    # The copy makes each token's heads contiguous, as flash attention's packed layout expects (transformers' own
    # flash path makes the same copy).
    q, k, v = (t[0].transpose(0, 1).contiguous() for t in (query, key, value))
    if q.shape[1] == k.shape[1]:
        return q, k, v, {}
    if varlen_attn_takes_gqa(varlen_attn):
        return q, k, v, {"enable_gqa": True}
    # torch 2.11's varlen_attn has no GQA: give every query head its own copy of its group's key/value head (query
    # head h reads key/value head h // group, as enable_gqa does), the same dot products.
    group = q.shape[1] // k.shape[1]
    return q, k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1), {}


def varlen_kernel(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    scaling: float | None,
    is_causal: bool,
    sliding_window: int | None,
) -> torch.Tensor:
    """``varlen_attn`` on (1, heads, tokens, dim) inputs: query (1, Hq, Tq, D), key/value (1, Hkv, Tk, D) ->
    (1, Tq, Hq, D). Segment b holds queries ``cu_seqlens_q[b]:[b+1]`` and keys ``cu_seqlens_k[b]:[b+1]``; when a
    segment has more keys than queries, flash aligns its queries with its LAST keys (so a segment's queries may sit
    on top of keys they share with other segments: prefix sharing uses that)."""
    if varlen_attn is None:
        raise RuntimeError(
            "backend='varlen' needs torch.nn.attention.varlen.varlen_attn with scale= and window_size= (torch >= "
            f"2.11; this is torch {torch.__version__}); use backend='sdpa'"
        )
    for cu in (cu_seqlens_q, cu_seqlens_k):
        if cu.dtype != torch.int32 or cu.device != query.device:
            raise ValueError(f"cu_seqlens must be int32 on {query.device}, got {cu.dtype} on {cu.device}")
    q, k, v, gqa = flash_layout(query, key, value)
    if not is_causal:
        window = (-1, -1)
    elif sliding_window is None:
        # varlen_attn derives is_causal from exactly this tuple (a list would compare unequal).
        window = (-1, 0)
    else:
        # Flash windows count the keys left of the query; transformers' rule i - j < W leaves W - 1 of them.
        window = (sliding_window - 1, 0)
    out = varlen_attn(
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        scale=scaling,
        window_size=window,
        **gqa,
    )
    return out.unsqueeze(0)


def packed_attention_forward(
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
    cu_seq_lens_q: torch.Tensor | None = None,
    cu_seq_lens_k: torch.Tensor | None = None,
    max_length_q: int | None = None,
    max_length_k: int | None = None,
    prmbench_seq_bounds: Sequence[int] | None = None,
    prmbench_backend: str = "auto",
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Transformers attention function: causal attention inside each segment of one packed row.

    Args:
        module: the attention module (its ``is_causal`` is the default for ``is_causal``).
        query: (1, Hq, T, D). key, value: (1, Hkv, T, D), Hq a multiple of Hkv (GQA).
        attention_mask: must be None; segments come from the metadata below.
        cu_seq_lens_q, cu_seq_lens_k: (B+1,) int32 ``cu_seqlens`` on the model's device; they must be the same tensor
            (self-attention over the packed row).
        max_length_q, max_length_k: ``max_seqlen``, the longest segment.
        prmbench_seq_bounds: the same B+1 offsets as Python ints, for the per-segment loop.
        prmbench_backend: ``"auto"``, ``"varlen"`` or ``"sdpa"`` (module docstring).

    Returns:
        (attn_output (1, T, Hq, D), None): no attention weights are materialised.
    """
    if cu_seq_lens_q is None or prmbench_seq_bounds is None or max_length_q is None:
        raise ValueError(
            f"attn_implementation={ATTN_IMPLEMENTATION!r} needs packed-batch metadata; "
            "run the model through prmbench_fast.packing.backbone_hidden_states"
        )
    if cu_seq_lens_k is not None and cu_seq_lens_k is not cu_seq_lens_q:
        raise ValueError("packed attention is self-attention: cu_seq_lens_k must be cu_seq_lens_q")
    if max_length_k is not None and max_length_k != max_length_q:
        raise ValueError("packed attention is self-attention: max_length_k must equal max_length_q")
    if attention_mask is not None:
        raise ValueError("packed attention takes no attention_mask: segments come from cu_seq_lens_q")
    if softcap is not None:
        raise NotImplementedError("attention logit softcapping is not supported by packed attention")
    if dropout:
        raise ValueError("packed attention is inference-only: run the model in eval mode (dropout must be 0)")
    if query.shape[0] != 1 or prmbench_seq_bounds[-1] != query.shape[2]:
        raise ValueError(
            f"expected one packed row of {prmbench_seq_bounds[-1]} tokens, got query of shape {tuple(query.shape)}"
        )
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if _resolve_backend(prmbench_backend, query) == "varlen":
        out = varlen_kernel(
            query, key, value, cu_seq_lens_q, cu_seq_lens_q, max_length_q, max_length_q,
            scaling=scaling, is_causal=causal, sliding_window=sliding_window,
        )
    else:
        out = _segment_sdpa(
            query, key, value, prmbench_seq_bounds,
            scaling=scaling, is_causal=causal, sliding_window=sliding_window,
        )
    return out, None


def register() -> str:
    """Register :func:`packed_attention_forward` with transformers (idempotent) and return its name."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, packed_attention_forward)
    return ATTN_IMPLEMENTATION
