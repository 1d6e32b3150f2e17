"""Prefix-shared hidden states equal the unshared pipeline's, with exactly the tree's token count.

The oracle is the unshared pipeline itself: ``pack_batches`` + ``backbone_hidden_states`` rows at ``step_pos``.
Tolerance: both sides are fp32 with hidden states of order 1 (after the final RMSNorm); the shared side only changes
the reduction order inside attention (the prefix keys come from the cache, a split/masked SDPA instead of one causal
call), which moves results by a few ulp per layer. Measured max difference: 5e-7 on these models; atol = rtol = 1e-5
is 20x that and still far below any real error (a wrong position id or a leaked key changes rows by > 1e-2).
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from flash_reference import flash_varlen_reference
from prmbench_fast import prefix_sharing, varlen_attention
from prmbench_fast.packing import TokenizedSample, backbone_hidden_states, pack_batches
from prmbench_fast.prefix_sharing import (
    prefix_attention_forward,
    prefix_sharing_unsupported,
    prefix_tree_tokens,
    shared_step_hidden,
)
from prmbench_fast.testing.tiny_models import tiny_llama

MAX_LENGTH = 35
VOCAB = 100
TOL = dict(atol=1e-5, rtol=1e-5)


def tiny_qwen2(*, sliding_window: int | None = None):
    torch.manual_seed(1)
    config = Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096,
        use_sliding_window=sliding_window is not None, sliding_window=sliding_window or 4096, max_window_layers=1,
    )  # fmt: skip
    return Qwen2ForCausalLM(config).eval()


MODELS = {
    "llama": lambda: tiny_llama(VOCAB),
    "qwen2": tiny_qwen2,
    # Layer 1 slides over 7 tokens: windows must be applied on absolute positions across the cached prefix.
    "qwen2-sliding": lambda: tiny_qwen2(sliding_window=7),
}


def group() -> list[TokenizedSample]:
    """Six variants of one 40-token "problem" (base tokens >= 10, modifications < 10, so they really differ).

    Truncated to 35 tokens the tree is: "first" alone (30); base[:10] (10) -> "early" tail (15) and base[10:12] (2,
    where "prefix" ends) -> base[12:20] (8) -> "a"/"twin" tail (15) and "mid" tail (15). 95 tokens of 172.
    """
    g = torch.Generator().manual_seed(0)
    base = torch.randint(10, VOCAB, (40,), generator=g).tolist()
    return [
        TokenizedSample(base, [5, 10, 20, 39], "a"),  # 39 lies past the cut
        TokenizedSample(list(base), [5, 10, 20, 39], "twin"),  # identical to its partner
        TokenizedSample([1] + base[1:30], [0, 5, 29], "first"),  # diverges at the first token
        TokenizedSample(base[:20] + [2, 3, 4] + base[23:], [5, 10, 19, 20, 22, 34], "mid"),  # diverges mid-way
        TokenizedSample(base[:10] + [5] * 15, [9, 10, 24], "early"),
        TokenizedSample(base[:12], [], "prefix"),  # no rewards; a strict prefix of "a"
    ]


def unshared_rows(model, samples) -> dict:
    rows = {}
    device = next(model.parameters()).device
    for batch in pack_batches(samples, max_length=MAX_LENGTH, batch_tokens=1000):
        batch = batch.to(device)
        hidden = backbone_hidden_states(model, batch)[batch.step_pos]
        bounds = batch.cu_steps.tolist()
        for b, key in enumerate(batch.sample_keys):
            rows[key] = (hidden[bounds[b]:bounds[b + 1]], batch.num_rewards[b], batch.dropped_rewards[b])
    return rows


def check_equal(model, samples, result) -> None:
    expected = unshared_rows(model, samples)
    assert result.sample_keys == tuple(s.key for s in samples)  # input order
    assert torch.equal(result.step_pos, torch.arange(result.hidden.shape[0]))
    bounds = result.cu_steps.tolist()
    for b, key in enumerate(result.sample_keys):
        rows, num, dropped = expected[key]
        assert (result.num_rewards[b], result.dropped_rewards[b]) == (num, dropped), key
        torch.testing.assert_close(result.hidden[bounds[b]:bounds[b + 1]], rows, **TOL, msg=key)


@pytest.fixture(scope="module", params=sorted(MODELS))
def model(request):
    return MODELS[request.param]()


@pytest.mark.parametrize(
    "batch_tokens, budget, computed, max_cached",
    [
        (1000, None, 95, 0),  # every subtree fits one call: the whole tree in one forward
        (16, None, 95, 20),  # subtrees > 16 tokens are entered through the cache: base[:10], [10:12], [12:20]
        (16, 11, 107, 10),  # base[10:12] ends past the budget: "prefix" (2), "a"/"twin" and "mid" (25 each) from 10
        (16, 0, 137, 0),  # nothing cached: each distinct sample once (the twins still share)
    ],
)
def test_rows_equal_unshared_and_tokens_exact(model, batch_tokens, budget, computed, max_cached):
    samples = group()
    result = shared_step_hidden(
        model, samples, max_length=MAX_LENGTH, batch_tokens=batch_tokens, cache_budget_tokens=budget
    )
    check_equal(model, samples, result)
    stats = result.stats
    assert (stats.tokens_total, stats.tree_tokens, stats.tokens_computed) == (172, 95, computed)
    assert stats.max_cached_tokens == max_cached
    assert stats.max_cached_tokens <= (MAX_LENGTH if budget is None else budget)
    assert result.truncated_tokens == 3 * 5 and result.dropped_rewards == (1, 1, 0, 0, 0, 0)
    assert prefix_tree_tokens(samples, max_length=MAX_LENGTH) == (172, 95)


def test_several_groups_shuffled(model):
    """Two problems, samples interleaved: rows stay in input order. The second problem shifts every base token
    (10..99 -> 11..99, 10), so the problems share only the leading modified token 1 of their "first" variants."""
    first = group()
    second = [TokenizedSample([(t - 9) % 90 + 10 if t >= 10 else t for t in s.input_ids], s.reward_pos, ("g2", s.key))
              for s in group()]  # fmt: skip
    samples = [s for pair in zip(second, first) for s in pair]
    result = shared_step_hidden(model, samples, max_length=MAX_LENGTH, batch_tokens=40)
    check_equal(model, samples, result)
    assert result.stats.tokens_computed == result.stats.tree_tokens == 2 * 95 - 1


def test_model_state_restored(model):
    model.train()
    previous = model.config._attn_implementation
    try:
        shared_step_hidden(model, group(), max_length=MAX_LENGTH, batch_tokens=16)
        assert all(m.training for m in model.modules())
        assert model.config._attn_implementation == previous
    finally:
        model.eval()


def test_empty_and_unsupported():
    model = tiny_llama(VOCAB)
    result = shared_step_hidden(model, [], max_length=MAX_LENGTH, batch_tokens=16)
    assert result.hidden.shape == (0, 64) and result.cu_steps.tolist() == [0] and result.stats.tokens_computed == 0
    assert prefix_sharing_unsupported(model) is None
    model.model.layers[0].self_attn.is_causal = False
    assert "not causal" in prefix_sharing_unsupported(model)
    with pytest.raises(ValueError, match="share_prefixes=False"):
        shared_step_hidden(model, group(), max_length=MAX_LENGTH, batch_tokens=16)
    assert "not a transformers model" in prefix_sharing_unsupported(torch.nn.Linear(2, 2))


def test_attention_needs_its_plan():
    q = torch.zeros(1, 4, 3, 8)
    with pytest.raises(ValueError, match="CallPlan"):
        prefix_attention_forward(torch.nn.Module(), q, q, q, None)


class FlashStandIn:
    """CPU stand-in of ``varlen_attn`` with ``return_aux`` (flash_reference.py's semantics): the log-sum-exp in flash's
    layout (heads, tokens) or, ``by_token``, cuDNN's (tokens, heads). Records the key rows of every call."""

    def __init__(self, by_token: bool = False):
        self.by_token = by_token
        self.key_rows: list[int] = []

    def __call__(self, q, k, v, cu_q, cu_k, max_q, max_k, *, scale, window_size, enable_gqa=False, return_aux=None):
        self.key_rows.append(k.shape[0])
        out = flash_varlen_reference(q, k, v, cu_q, cu_k, max_q, max_k, scale=scale, window_size=window_size,
                                     enable_gqa=enable_gqa)  # fmt: skip
        if return_aux is None or not return_aux.lse:
            return out
        group = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(group, dim=1)
        left, right = window_size
        lse = torch.empty(q.shape[1], q.shape[0])
        q_bounds, k_bounds = cu_q.tolist(), cu_k.tolist()
        for (qs, qe), (ks, ke) in zip(zip(q_bounds[:-1], q_bounds[1:]), zip(k_bounds[:-1], k_bounds[1:])):
            pos = torch.arange(qe - qs)[:, None] + (ke - ks) - (qe - qs)
            j = torch.arange(ke - ks)[None, :]
            visible = ((left < 0) | (j >= pos - left)) & ((right < 0) | (j <= pos + right))
            scores = torch.einsum("ihd,jhd->hij", q[qs:qe], k[ks:ke]) * scale
            lse[:, qs:qe] = scores.masked_fill(~visible, float("-inf")).logsumexp(-1)
        return out, (lse.T.contiguous() if self.by_token else lse)


@pytest.mark.parametrize("by_token", [False, True], ids=["flash_lse_layout", "cudnn_lse_layout"])
def test_flash_path_plumbing(model, monkeypatch, by_token):
    """The CUDA flash path cannot run here: its key gathers, offsets and the merge of the shared prefix's attention
    with the call's run against a CPU stand-in of varlen_attn."""
    monkeypatch.setattr(varlen_attention, "varlen_attn", FlashStandIn(by_token))
    samples = group()
    for batch_tokens in (1000, 16):  # one call with every segment; calls on top of cached prefixes
        result = shared_step_hidden(model, samples, max_length=MAX_LENGTH, batch_tokens=batch_tokens, backend="varlen")
        check_equal(model, samples, result)


def test_flash_path_attends_a_cached_prefix_once_per_call(monkeypatch):
    """Eight 3-token continuations of one 30-token prefix: the prefix goes into the cache (its subtree exceeds
    batch_tokens) and the siblings run in one call on top of it. Per layer the flash path passes the 30 cached keys
    once and each sibling's own 3 (30 + 8 x 3 = 54 rows), not the prefix again for every sibling (8 x 33 = 264)."""
    model = tiny_llama(VOCAB)
    g = torch.Generator().manual_seed(0)
    prefix = torch.randint(10, VOCAB, (30,), generator=g).tolist()
    samples = [TokenizedSample(prefix + [k, k, k], [29, 32], k) for k in range(8)]
    stand_in = FlashStandIn()
    monkeypatch.setattr(varlen_attention, "varlen_attn", stand_in)
    result = shared_step_hidden(model, samples, max_length=MAX_LENGTH + 10, batch_tokens=24, backend="varlen")
    check_equal(model, samples, result)
    layers = model.config.num_hidden_layers
    assert result.stats.forward_calls == 2  # the prefix; the eight siblings on top of it
    first, second = stand_in.key_rows[:layers], stand_in.key_rows[layers:]
    assert first == [30] * layers  # no cached prefix: one gather of the prefix's own keys
    assert second == [30, 8 * 3] * layers  # the shared prefix once, then the siblings' own keys
    # A call of as many new tokens as query heads (4) gathers whole (the log-sum-exp's layout would be ambiguous).
    stand_in.key_rows.clear()
    four = [TokenizedSample(prefix + [k], [29, 30], k) for k in range(4)]
    result = shared_step_hidden(model, four, max_length=MAX_LENGTH, batch_tokens=24, backend="varlen")
    check_equal(model, four, result)
    assert stand_in.key_rows[layers:] == [4 * 31] * layers


@pytest.mark.parametrize("backend", ["sdpa", "varlen"])
def test_bf16_rows_within_twice_the_unshared_error(model, backend, monkeypatch):
    """In bf16 the shared and unshared rows round differently (a prefix's keys come from another forward call; on the
    flash path, here its CPU stand-in, the merge of the prefix's attention with the call's rounds once more): the
    shared rows' error against the fp32 unshared rows must be at most 2x the unshared bf16 rows' own error, and the two
    within that too (prefix_sharing's docstring quotes the measured values)."""
    monkeypatch.setattr(varlen_attention, "varlen_attn", FlashStandIn())
    samples = group()
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    reference, unshared = unshared_rows(model, samples), unshared_rows(bf16, samples)
    result = shared_step_hidden(bf16, samples, max_length=MAX_LENGTH, batch_tokens=16, backend=backend)
    assert result.hidden.dtype == torch.bfloat16
    bounds = result.cu_steps.tolist()
    shared = {key: result.hidden[bounds[b] : bounds[b + 1]] for b, key in enumerate(result.sample_keys)}
    keys = [key for key in reference if reference[key][0].numel()]

    def error(rows, key):
        return (rows[key].float() - reference[key][0]).abs().max().item()

    unshared_error = max(error({k: v[0] for k, v in unshared.items()}, key) for key in keys)
    assert 0 < unshared_error < 0.1  # bf16's own error on hidden states of magnitude ~4: a real, small bound
    assert max(error(shared, key) for key in keys) <= 2 * unshared_error
    difference = max((shared[key].float() - unshared[key][0].float()).abs().max().item() for key in keys)
    assert difference <= 2 * unshared_error


def test_one_host_to_device_copy_per_call(model, monkeypatch):
    copies = []
    to_device = prefix_sharing._to_device

    def counted(arrays, device):
        copies.append(len(arrays))
        return to_device(arrays, device)

    monkeypatch.setattr(prefix_sharing, "_to_device", counted)
    result = shared_step_hidden(model, group(), max_length=MAX_LENGTH, batch_tokens=16)
    # One per forward call (ids, positions, reward rows and targets, key indices), one for cu_steps.
    assert len(copies) == result.stats.forward_calls + 1
    assert all(n >= 4 for n in copies[:-1])
