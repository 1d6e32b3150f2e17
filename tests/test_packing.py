"""Tests for the packed layout, the collator and packed backbone hidden states (prmbench_fast.packing)."""

from __future__ import annotations

import dataclasses
import random
import types

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from flash_reference import flash_varlen_reference, flash_varlen_reference_without_gqa
from prmbench_fast import varlen_attention
from prmbench_fast.packing import PackedBatch, TokenizedSample, backbone_hidden_states, pack_batches, pack_stream

VOCAB = 97


def _random_samples(n: int, seed: int, max_len: int = 40) -> list[TokenizedSample]:
    rng = random.Random(seed)
    samples = []
    for i in range(n):
        length = rng.randint(1, max_len)
        ids = [rng.randrange(VOCAB) for _ in range(length)]
        pos = sorted(rng.sample(range(length), rng.randint(0, min(length, 5))))
        samples.append(TokenizedSample(input_ids=ids, reward_pos=pos, key=i))
    return samples


def _check_offsets(cu: torch.Tensor, batch_size: int, total: int) -> None:
    assert cu.dtype == torch.int32
    assert cu.shape == (batch_size + 1,)
    assert cu[0] == 0 and cu[-1] == total
    assert bool((cu[1:] >= cu[:-1]).all())


# ---------------------------------------------------------------- collator


@pytest.mark.parametrize("batch_tokens", [1, 37, 120, 10_000])
def test_collator_invariants(batch_tokens):
    samples = _random_samples(30, seed=batch_tokens)
    by_key = {s.key: s for s in samples}
    batches = pack_batches(samples, max_length=1_000, batch_tokens=batch_tokens)

    seen = []
    previous_min = float("inf")
    for batch in batches:
        n, total, steps = len(batch.sample_keys), batch.input_ids.numel(), batch.step_pos.numel()
        assert batch.input_ids.dtype == batch.position_ids.dtype == batch.step_pos.dtype == torch.int64
        _check_offsets(batch.cu_seqlens, n, total)
        _check_offsets(batch.cu_steps, n, steps)
        assert batch.seqlens == tuple(torch.diff(batch.cu_seqlens).tolist())
        assert batch.num_rewards == tuple(torch.diff(batch.cu_steps).tolist())
        assert batch.num_tokens == total and batch.max_seqlen == max(batch.seqlens)
        assert total <= batch_tokens or n == 1
        # Longest first across the whole batch list, so greedy filling never revisits a length.
        assert list(batch.seqlens) == sorted(batch.seqlens, reverse=True) and batch.seqlens[0] <= previous_min
        previous_min = batch.seqlens[-1]
        for b, key in enumerate(batch.sample_keys):
            start, end = int(batch.cu_seqlens[b]), int(batch.cu_seqlens[b + 1])
            sample = by_key[key]
            assert torch.equal(batch.input_ids[start:end], torch.tensor(sample.input_ids))
            assert torch.equal(batch.position_ids[start:end], torch.arange(end - start))
            pos = batch.step_pos[int(batch.cu_steps[b]) : int(batch.cu_steps[b + 1])]
            assert bool(((pos >= start) & (pos < end)).all())
            assert torch.equal(pos - start, torch.tensor(sample.reward_pos, dtype=torch.int64))
        seen.extend(batch.sample_keys)
    assert sorted(seen) == sorted(by_key)
    if batch_tokens == 1:
        assert len(batches) == len(samples)  # every sample is oversized: one batch each


def test_collator_greedy_fill_and_stable_order():
    lengths = [3, 5, 3, 2, 5, 1]
    samples = [TokenizedSample(input_ids=[7] * n, reward_pos=[n - 1], key=f"s{i}") for i, n in enumerate(lengths)]
    batches = pack_batches(samples, max_length=100, batch_tokens=8)
    assert [b.sample_keys for b in batches] == [("s1",), ("s4", "s0"), ("s2", "s3", "s5")]
    again = pack_batches(samples, max_length=100, batch_tokens=8)
    for a, b in zip(batches, again, strict=True):
        for field in dataclasses.fields(PackedBatch):
            x, y = getattr(a, field.name), getattr(b, field.name)
            assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y


def test_streamed_packing_sorts_each_chunk_and_fills_across_chunks():
    lengths = [[3, 5, 3], [2, 5, 1]]
    chunks = [[TokenizedSample(input_ids=[7] * n, reward_pos=[n - 1], key=f"c{c}s{i}") for i, n in enumerate(chunk)]
              for c, chunk in enumerate(lengths)]
    batches = list(pack_stream(chunks, max_length=100, batch_tokens=8))
    # Chunk 0 sorted (5, 3, 3): 5 + 3 fill the first batch; the batch left open at the chunk's end (3) is filled by
    # chunk 1's longest (5) rather than closed by the chunk boundary; chunk 1's 2 and 1 follow.
    assert [b.sample_keys for b in batches] == [("c0s1", "c0s0"), ("c0s2", "c1s1"), ("c1s0", "c1s2")]
    # One chunk is pack_batches.
    samples = _random_samples(50, seed=3)
    streamed = list(pack_stream([samples], max_length=30, batch_tokens=100))
    assert [b.sample_keys for b in streamed] == [b.sample_keys for b in pack_batches(samples, max_length=30,
                                                                                      batch_tokens=100)]


def test_streamed_packing_yields_a_batch_before_the_next_chunk_is_read():
    read = []

    def chunks():
        for c in range(3):
            read.append(c)
            yield [TokenizedSample(input_ids=[1] * 4, reward_pos=[0], key=(c, i)) for i in range(2)]

    batches = pack_stream(chunks(), max_length=10, batch_tokens=4)
    assert next(batches).sample_keys == ((0, 0),) and read == [0]
    assert [b.sample_keys for b in batches] == [((0, 1),), ((1, 0),), ((1, 1),), ((2, 0),), ((2, 1),)]


def test_collator_accepts_tensors_and_empty_input():
    sample = TokenizedSample(input_ids=torch.arange(6), reward_pos=torch.tensor([2, 5]), key=0)
    (batch,) = pack_batches([sample], max_length=10, batch_tokens=10)
    assert torch.equal(batch.input_ids, torch.arange(6))
    assert torch.equal(batch.step_pos, torch.tensor([2, 5]))
    assert pack_batches([], max_length=10, batch_tokens=10) == []


@pytest.mark.parametrize(
    "sample",
    [
        TokenizedSample(input_ids=[], reward_pos=[], key="empty"),
        TokenizedSample(input_ids=[1, 2], reward_pos=[2], key="past the end"),
        TokenizedSample(input_ids=[1, 2], reward_pos=[-1], key="negative"),
    ],
)
def test_collator_rejects_bad_samples(sample):
    with pytest.raises(ValueError, match=repr(sample.key)):
        pack_batches([sample], max_length=10, batch_tokens=10)


def test_truncation_keeps_first_max_length_tokens():
    max_length = 8
    long = TokenizedSample(input_ids=list(range(100, 113)), reward_pos=[0, 3, 7, 8, 12], key="long")
    zero = TokenizedSample(input_ids=[5, 6, 7], reward_pos=[], key="zero")
    one = TokenizedSample(input_ids=[9], reward_pos=[0], key="one")
    exact = TokenizedSample(input_ids=list(range(8)), reward_pos=[7], key="exact")
    batches = pack_batches([long, zero, one, exact], max_length=max_length, batch_tokens=1_000)
    (batch,) = batches
    assert batch.sample_keys == ("long", "exact", "zero", "one")
    assert batch.seqlens == (8, 8, 3, 1)
    assert torch.equal(batch.input_ids[:8], torch.arange(100, 108))
    # 8 and 12 are >= max_length: dropped and counted; 7 == max_length - 1 survives.
    assert batch.num_rewards == (3, 1, 0, 1)
    assert batch.dropped_rewards == (2, 0, 0, 0)
    assert batch.truncated_tokens == 5
    assert torch.equal(batch.step_pos, torch.tensor([0, 3, 7, 8 + 7, 8 + 8 + 3 + 0]))
    assert torch.equal(batch.cu_steps, torch.tensor([0, 3, 4, 4, 5], dtype=torch.int32))
    # The oversize rule applies to the truncated length: 8 tokens fit a budget of 8.
    assert [b.sample_keys for b in pack_batches([long], max_length=max_length, batch_tokens=8)] == [("long",)]


def test_to_moves_every_tensor():
    (batch,) = pack_batches(_random_samples(3, seed=1), max_length=100, batch_tokens=1_000)
    moved = batch.to("meta")
    for field in dataclasses.fields(PackedBatch):
        value = getattr(moved, field.name)
        if isinstance(value, torch.Tensor):
            assert value.device.type == "meta" and value.dtype == getattr(batch, field.name).dtype
        else:
            assert value == getattr(batch, field.name)


# ---------------------------------------------------------------- hidden states

# fp32 throughout. Packed and per-sample runs do the same per-token arithmetic, but the projections run as (T, H) vs
# (len, H) matmuls, which BLAS may block differently: differences are a few float32 ulps per layer (~1e-6 at activations
# of order 1). atol 1e-5 / rtol 1e-4 leaves 10x headroom, and is five orders of magnitude below the error of samples
# attending to each other (checked in test_tolerance_detects_mixing).
ATOL, RTOL = 1e-5, 1e-4
LENGTHS = [9, 1, 14, 3, 7, 2]  # ragged, a 1-token sample, several longer than the Mistral window below


def _tiny(family: str) -> torch.nn.Module:
    common = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    if family == "llama":
        return LlamaForCausalLM(LlamaConfig(**common))
    if family == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**common))
    # A window shorter than most samples, so the per-segment sliding-window rule is exercised.
    return MistralForCausalLM(MistralConfig(**common, sliding_window=5))


@pytest.fixture(scope="module", params=["llama", "qwen2", "mistral"])
def model(request):
    return _tiny(request.param).eval()


def _packed_batch(lengths=LENGTHS) -> PackedBatch:
    gen = torch.Generator().manual_seed(1)
    samples = [
        TokenizedSample(input_ids=torch.randint(0, VOCAB, (n,), generator=gen), reward_pos=[n - 1], key=i)
        for i, n in enumerate(lengths)
    ]
    (batch,) = pack_batches(samples, max_length=1_000, batch_tokens=1_000)
    return batch


def _per_sample(model, batch: PackedBatch) -> torch.Tensor:
    """Oracle: each sample run alone through the base model's default attention, no packing, no padding."""
    with torch.no_grad():
        return torch.cat(
            [
                model.base_model(input_ids=batch.input_ids[s:e][None], use_cache=False).last_hidden_state[0]
                for s, e in zip(batch.cu_seqlens[:-1].tolist(), batch.cu_seqlens[1:].tolist())
            ]
        )


def test_packed_equals_per_sample(model):
    batch = _packed_batch()
    expected = _per_sample(model, batch)
    hidden = backbone_hidden_states(model, batch)
    assert hidden.shape == (batch.num_tokens, model.config.hidden_size)
    torch.testing.assert_close(hidden, expected, atol=ATOL, rtol=RTOL)
    # A bare base model gives the same result as its CausalLM wrapper.
    torch.testing.assert_close(backbone_hidden_states(model.base_model, batch), hidden, atol=0, rtol=0)


def test_tolerance_detects_mixing(model):
    """Sensitivity check: one causal row over all samples (no segment boundaries) is far outside the tolerance."""
    batch = _packed_batch()
    expected = _per_sample(model, batch)
    with torch.no_grad():
        mixed = model.base_model(
            input_ids=batch.input_ids[None], position_ids=batch.position_ids[None], use_cache=False,
            attention_mask=torch.ones(1, batch.num_tokens, dtype=torch.long),
        ).last_hidden_state[0]
    first = batch.seqlens[0]  # the first sample sees nothing before it, the others are contaminated
    torch.testing.assert_close(mixed[:first], expected[:first], atol=ATOL, rtol=RTOL)
    assert (mixed[first:] - expected[first:]).abs().max() > 100 * ATOL


def test_restores_mode_and_attention():
    model = _tiny("llama")
    model.set_attn_implementation("eager")
    model.train()
    model.model.layers[1].eval()  # a mixed state must come back as it was, not as all-train
    before = [m.training for m in model.modules()]
    weights = {n: p.data_ptr() for n, p in model.named_parameters()}

    hidden = backbone_hidden_states(model, _packed_batch([5, 1, 4]))

    assert [m.training for m in model.modules()] == before
    assert model.config._attn_implementation == "eager"
    assert model.model.layers[0].self_attn.config._attn_implementation == "eager"
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == weights
    assert not hidden.requires_grad


def test_restores_on_error():
    model = _tiny("llama").train()
    batch = dataclasses.replace(_packed_batch([3, 2]), seqlens=(3, 3))  # bounds disagree with T: attention raises
    with pytest.raises(ValueError, match="packed row"):
        backbone_hidden_states(model, batch)
    assert model.training and model.config._attn_implementation == "sdpa"


def test_attention_needs_packed_metadata():
    model = _tiny("qwen2").eval()
    model.set_attn_implementation(varlen_attention.register())
    with pytest.raises(ValueError, match="backbone_hidden_states"):
        model.base_model(input_ids=torch.zeros(1, 4, dtype=torch.long), use_cache=False)


@pytest.mark.parametrize(
    "stand_in", [flash_varlen_reference, flash_varlen_reference_without_gqa], ids=["torch>=2.12", "torch2.11"]
)
def test_varlen_backend_plumbing(model, monkeypatch, stand_in):
    """The CUDA varlen path cannot run here: check its layout, window and GQA plumbing against a CPU stand-in, with
    and without ``enable_gqa`` in its signature (the tiny models have 4 query and 2 key/value heads)."""
    monkeypatch.setattr(varlen_attention, "varlen_attn", stand_in)
    batch = _packed_batch()
    hidden = backbone_hidden_states(model, batch, backend="varlen")
    torch.testing.assert_close(hidden, _per_sample(model, batch), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize(
    "capability, dtype, head_dim, supported",
    [
        ((8, 0), torch.bfloat16, 128, True),  # A100
        ((9, 0), torch.float16, 256, True),  # H100, the largest head dim
        ((12, 0), torch.bfloat16, 64, True),  # a newer GPU
        ((7, 5), torch.float16, 128, False),  # T4: no flash attention before sm_80
        ((7, 0), torch.bfloat16, 64, False),  # V100
        ((8, 6), torch.float32, 128, False),  # fp32: no flash kernel
        ((9, 0), torch.bfloat16, 288, False),  # head dim above 256
        ((8, 0), torch.bfloat16, 100, False),  # not a multiple of 8
    ],
)
def test_flash_varlen_supported(capability, dtype, head_dim, supported, monkeypatch):
    monkeypatch.setattr(varlen_attention, "varlen_attn", flash_varlen_reference)  # whatever this torch has
    assert varlen_attention.flash_varlen_supported(capability, dtype, head_dim) is supported
    # torch 2.10: no usable varlen_attn, so nothing is routed to it.
    monkeypatch.setattr(varlen_attention, "varlen_attn", None)
    assert varlen_attention.flash_varlen_supported(capability, dtype, head_dim) is False


def test_auto_backend_asks_the_query_device(monkeypatch):
    # Two GPUs: "auto" must look at the capability of the device the query is on, not at the current device.
    capabilities = {torch.device("cuda:0"): (7, 5), torch.device("cuda:1"): (8, 0)}
    monkeypatch.setattr(varlen_attention, "_capability", capabilities.__getitem__)
    monkeypatch.setattr(varlen_attention, "varlen_attn", flash_varlen_reference)

    def query(device: str, dtype=torch.bfloat16, head_dim=128):
        # _resolve_backend reads only these attributes; no CUDA tensor can exist here.
        return types.SimpleNamespace(device=torch.device(device), dtype=dtype, shape=(1, 4, 9, head_dim))

    assert varlen_attention._resolve_backend("auto", query("cuda:1")) == "varlen"
    assert varlen_attention._resolve_backend("auto", query("cuda:0")) == "sdpa"
    assert varlen_attention._resolve_backend("auto", query("cuda:1", head_dim=100)) == "sdpa"
    assert varlen_attention._resolve_backend("auto", torch.zeros(1, 4, 9, 128, dtype=torch.bfloat16)) == "sdpa"
    assert varlen_attention._resolve_backend("varlen", query("cuda:0")) == "varlen"  # explicit choice is kept
