"""Triton step-reward kernels against their torch references, run in the Triton interpreter on CPU tensors.

Without CUDA, conftest.py sets TRITON_INTERPRET=1 before prmbench_fast is imported, so backend="triton" runs here on
CPU. On a CUDA machine the interpreter stays off: the tests that need it skip, and tests/test_gpu.py runs the kernels
on the GPU.
"""

import pytest
import torch
import triton
from torch.overrides import TorchFunctionMode

from error_bounds import U_FP32, assert_within, step_token_probs_bound

from prmbench_fast.kernels import step_reward as sr
from prmbench_fast.kernels.step_reward import (
    gather_step_hidden,
    mean_logit_head,
    step_rewards,
    step_rewards_reference,
    step_token_probs,
    step_token_probs_reference,
)

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
needs_interpreter = pytest.mark.skipif(
    not triton.knobs.runtime.interpret, reason="backend='triton' on CPU tensors needs TRITON_INTERPRET=1"
)

# Tolerances on fp32 outputs (probabilities or logits of magnitude <= ~10 in these tests). The reference upcasts the
# SAME rounded inputs to fp32, and a product of two fp16 or bf16 values is exact in fp32 (11 + 11 and 8 + 8 significant
# bits fit in 24), so for every input dtype the only difference is the fp32 summation order over H terms:
# ~sqrt(H) * 2**-24 * |logit| ~ 1e-6 for H <= 128, which the softmax / sigmoid / exp(logit - lse) carry over as a
# relative error of the same size. fp32 gets rtol 1e-5. fp16/bf16 get 3x that: on GPUs their dot runs natively on
# tensor cores, whose fp32 accumulation truncates instead of rounding; in the interpreter they meet the fp32 bound.
# Any indexing, masking or activation bug gives errors of order 1e-2 and up, far outside these bounds.
TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.float16: dict(rtol=3e-5, atol=3e-6),
    torch.bfloat16: dict(rtol=3e-5, atol=3e-6),
}


def _hidden(T, H, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, H, generator=g).to(dtype)


def _head(C, H, dtype, seed=1, scale=1.0):
    """Weight scaled by 1/sqrt(H) so logits are O(scale) whatever H."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(C, H, generator=g) * (scale / H**0.5)).to(dtype)
    b = torch.randn(C, generator=g).to(dtype)
    return w, b


def _packed_step_pos(lengths, seed=2):
    """step_pos of a packed batch with these sample lengths: each sample's first and last token plus random ones."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.cumsum(torch.tensor([0] + lengths[:-1]), 0).tolist()
    pos = []
    for start, n in zip(starts, lengths):
        inner = torch.randint(start, start + n, (min(n, 3),), generator=g).tolist()
        pos += sorted({start, start + n - 1, *inner})
    return torch.tensor(pos, dtype=torch.int64), sum(lengths)


class _NoLaunch:
    """Stands in for a kernel that must not be launched."""

    def __getitem__(self, grid):
        raise AssertionError("the Triton kernel was launched")


# ---------------------------------------------------------------------------------------------------------------
# step_rewards
# ---------------------------------------------------------------------------------------------------------------


@needs_interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", sr.ACTIVATIONS)
@pytest.mark.parametrize("C", [1, 2, 3, 4])
@pytest.mark.parametrize("has_bias", [True, False], ids=["bias", "nobias"])
def test_step_rewards_matches_reference(dtype, activation, C, has_bias):
    # Ragged samples including a one-token sample; steps at the first and last token of every sample, hence of the
    # buffer. 20 steps with BLOCK_S = 16 leave a partly masked second row block. H = 67 is odd and needs a masked tail.
    step_pos, T = _packed_step_pos([1, 9, 30, 5])
    hidden = _hidden(T, 67, dtype)
    weight, bias = _head(C, 67, dtype, scale=4.0)
    bias = bias if has_bias else None
    out = step_rewards(hidden, step_pos, weight, bias, activation=activation, backend="triton")
    ref = step_rewards_reference(hidden, step_pos, weight, bias, activation=activation)
    assert out.shape == (step_pos.numel(), C) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, **TOL[dtype])
    if activation == "softmax":
        torch.testing.assert_close(out.sum(1), torch.ones(step_pos.numel()), rtol=0, atol=1e-6)


@needs_interpreter
@pytest.mark.parametrize(
    "hidden_dtype,weight_dtype",
    [(torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16), (torch.float64, torch.float32)],
)
def test_step_rewards_mixed_dtypes(hidden_dtype, weight_dtype):
    # Mixed inputs are multiplied in fp32; the 16-bit tolerance covers every pair here (fp64 is rounded to fp32 by
    # both the kernel and the reference).
    step_pos, T = _packed_step_pos([4, 17])
    hidden = _hidden(T, 48, hidden_dtype)
    weight, bias = _head(3, 48, weight_dtype, scale=4.0)
    out = step_rewards(hidden, step_pos, weight, bias.float(), backend="triton")
    ref = step_rewards_reference(hidden, step_pos, weight, bias.float())
    torch.testing.assert_close(out, ref, **TOL[torch.float16])


@needs_interpreter
@pytest.mark.parametrize("hidden_dtype,weight_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.float16)])
def test_step_token_probs_mixed_dtypes(hidden_dtype, weight_dtype):
    step_pos, T = _packed_step_pos([3, 20])
    hidden = _hidden(T, 40, hidden_dtype)
    lm_w, lm_b = _head(300, 40, weight_dtype, scale=6.0)
    out = step_token_probs(hidden, step_pos, lm_w, [299, 1], lm_head_bias=lm_b, backend="triton")
    ref = step_token_probs_reference(hidden, step_pos, lm_w, [299, 1], lm_head_bias=lm_b)
    torch.testing.assert_close(out, ref, **TOL[torch.float16])


@needs_interpreter
@pytest.mark.parametrize("layout", ["column_slice", "transposed"])
def test_step_rewards_non_contiguous(layout):
    T, H = 40, 67
    if layout == "column_slice":
        hidden = _hidden(T, 2 * H + 3, torch.float32)[:, 3 : 3 + H]  # row stride 2H + 3
    else:
        hidden = _hidden(H, T, torch.float32).T  # strides (1, T)
    assert not hidden.is_contiguous()
    weight, bias = _head(2, H, torch.float32, scale=4.0)
    weight_t = weight.T.contiguous().T  # a (C, H) view with strides (1, C)
    # Repeated and unsorted positions are allowed; step_pos itself is a strided view too.
    step_pos = torch.tensor([0, -1, 39, -1, 7, -1, 7, -1, 12], dtype=torch.int64)[::2]
    out = step_rewards(hidden, step_pos, weight_t, bias, activation="sigmoid", backend="triton")
    ref = step_rewards_reference(hidden.contiguous(), step_pos, weight, bias, activation="sigmoid")
    torch.testing.assert_close(out, ref, **TOL[torch.float32])


@needs_interpreter
def test_step_rewards_single_token_buffer():
    hidden = _hidden(1, 33, torch.bfloat16)
    weight, bias = _head(2, 33, torch.bfloat16)
    step_pos = torch.zeros(1, dtype=torch.int64)
    out = step_rewards(hidden, step_pos, weight, bias, backend="triton")
    torch.testing.assert_close(out, step_rewards_reference(hidden, step_pos, weight, bias), **TOL[torch.bfloat16])


@needs_interpreter
@pytest.mark.parametrize("backend", ["triton", "torch", "auto"])
def test_step_rewards_zero_steps(backend, monkeypatch):
    monkeypatch.setattr(sr, "_step_rewards_kernel", _NoLaunch())
    hidden = _hidden(5, 16, torch.float32)
    weight, bias = _head(3, 16, torch.float32)
    out = step_rewards(hidden, torch.empty(0, dtype=torch.int64), weight, bias, backend=backend)
    assert out.shape == (0, 3) and out.dtype == torch.float32


def _exact_head(logits_per_row):
    """hidden rows = one-hot, weight columns = the wanted logits: every dot product is exact in any order."""
    logits = torch.tensor(logits_per_row, dtype=torch.float32)  # (S, C)
    S, C = logits.shape
    hidden = torch.eye(S, 16)  # H = 16 > S
    weight = torch.zeros(C, 16)
    weight[:, :S] = logits.T
    return hidden, torch.arange(S, dtype=torch.int64), weight


# exp(-z) overflowing to inf is the intended path to an exact 0 in the sigmoid; numpy (the interpreter) warns about it.
@needs_interpreter
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
def test_step_rewards_underflow_is_kept(activation):
    # softmax: a gap of 95 gives exp(-95) ~ 5.5e-42, a denormal; gaps of 120 and 200 underflow fp32 to exactly 0.
    # sigmoid: -88 gives 1 / (1 + exp(88)) ~ 6e-39, a denormal; below ~ -88.7 exp overflows and the result is 0.
    # The official Qwen-PRM code drops probabilities equal to 0 (`probs != 0`), which would shorten the row: we keep
    # them, with the reference's value.
    hidden, step_pos, weight = _exact_head([[0.0, -95.0], [0.0, -200.0], [120.0, 0.0], [-120.0, -88.0]])
    out = step_rewards(hidden, step_pos, weight, activation=activation, backend="triton")
    ref = step_rewards_reference(hidden, step_pos, weight, activation=activation)
    assert out.shape == (4, 2)
    assert (ref == 0).any() and ((ref > 0) & (ref < torch.finfo(torch.float32).tiny)).any()  # the case is exercised
    assert torch.equal(out == 0, ref == 0)
    # Same exact logits, so only exp's last bit may differ: one ulp of a ~5e-42 denormal is 2.5e-4 of it.
    torch.testing.assert_close(out, ref, rtol=3e-4, atol=0)


@needs_interpreter
def test_llemma_mean_logit_rule():
    # sigmoid(mean over V of the logits) at each step == step_rewards with the mean LM-head row.
    T, H, V = 24, 40, 300
    hidden = _hidden(T, H, torch.float32)
    lm_w, lm_b = _head(V, H, torch.float32, scale=4.0)
    step_pos = torch.tensor([0, 5, 23], dtype=torch.int64)
    out = step_rewards(hidden, step_pos, *mean_logit_head(lm_w, lm_b), activation="sigmoid", backend="triton")
    official = torch.sigmoid((hidden @ lm_w.T + lm_b).mean(-1))[step_pos]
    torch.testing.assert_close(out[:, 0], official, **TOL[torch.float32])


def test_gather_step_hidden_is_exact():
    hidden = _hidden(30, 2 * 67, torch.bfloat16)[:, ::2]  # non-contiguous columns
    step_pos = torch.tensor([29, 0, 3, 3], dtype=torch.int64)
    rows = gather_step_hidden(hidden, step_pos)
    assert rows.dtype == torch.bfloat16 and rows.is_contiguous()
    assert torch.equal(rows, hidden[step_pos])


# ---------------------------------------------------------------------------------------------------------------
# step_token_probs
# ---------------------------------------------------------------------------------------------------------------


def _official_full_vocab(hidden, step_pos, lm_w, lm_b, token_ids):
    """The toolkit's way: (T, V) logits for every token, softmax over the vocabulary, then pick the step rows."""
    logits = hidden.float() @ lm_w.float().T
    if lm_b is not None:
        logits = logits + lm_b.float()
    return torch.softmax(logits, dim=-1)[step_pos][:, token_ids]


@needs_interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("splits", ["one_split", "many_splits"])
def test_step_token_probs_matches_reference(dtype, splits, monkeypatch):
    # V = 1000 is not a multiple of BLOCK_V = 128. One split runs the whole online log-sum-exp over 8 tiles in one
    # program; many splits (the default here: one tile each) exercises the merge of per-split log-sum-exps.
    if splits == "one_split":
        monkeypatch.setattr(sr, "_TARGET_PROGRAMS", 1)
    step_pos, T = _packed_step_pos([1, 12, 40])
    H, V = 67, 1000
    hidden = _hidden(T, H, dtype)
    lm_w, lm_b = _head(V, H, dtype, scale=6.0)
    token_ids = [10, 999, 0, 10]  # the last column, the first column, and a repeated id
    out = step_token_probs(hidden, step_pos, lm_w, token_ids, lm_head_bias=lm_b, backend="triton")
    ref = step_token_probs_reference(hidden, step_pos, lm_w, token_ids, lm_head_bias=lm_b)
    assert out.shape == (step_pos.numel(), 4) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, **TOL[dtype])
    torch.testing.assert_close(ref, _official_full_vocab(hidden, step_pos, lm_w, lm_b, token_ids), **TOL[torch.float32])


@needs_interpreter
@pytest.mark.parametrize("H", [8, 130])
def test_step_token_probs_hidden_tails(H):
    # H = 8 is below tl.dot's minimum K of 16 (BLOCK_H = 16, half masked); H = 130 = 2 full tiles of 64 plus 2.
    hidden = _hidden(20, H, torch.float16)
    lm_w, _ = _head(200, H, torch.float16, scale=6.0)
    step_pos = torch.tensor([19, 0, 4], dtype=torch.int64)
    out = step_token_probs(hidden, step_pos, lm_w, [3], backend="triton")
    torch.testing.assert_close(out, step_token_probs_reference(hidden, step_pos, lm_w, [3]), **TOL[torch.float16])
    strided_pos = torch.stack([step_pos, step_pos]).T.reshape(-1)[::2]  # same values, stride 2
    assert not strided_pos.is_contiguous()
    assert torch.equal(step_token_probs(hidden, strided_pos, lm_w, [3], backend="triton"), out)


@needs_interpreter
@pytest.mark.parametrize("splits", ["one_split", "many_splits"])
def test_step_token_probs_max_at_requested_token_and_elsewhere(splits, monkeypatch):
    if splits == "one_split":
        monkeypatch.setattr(sr, "_TARGET_PROGRAMS", 1)
    T, H, V = 6, 32, 700
    hidden = _hidden(T, H, torch.float32)
    lm_w, _ = _head(V, H, torch.float32, scale=2.0)
    # Row 1's largest logit is the requested id 650 (in the last, partial tile); row 4's is the unrequested id 3.
    lm_w[650] = hidden[1] * 0.5
    lm_w[3] = hidden[4] * 0.5
    step_pos = torch.tensor([1, 4], dtype=torch.int64)
    logits = hidden[step_pos] @ lm_w.T
    assert logits[0].argmax() == 650 and logits[1].argmax() == 3
    out = step_token_probs(hidden, step_pos, lm_w, [650], backend="triton")
    torch.testing.assert_close(out, _official_full_vocab(hidden, step_pos, lm_w, None, [650]), **TOL[torch.float32])
    assert out[0, 0] > 0.5 and out[1, 0] < 1e-3


@needs_interpreter
def test_step_token_probs_underflow_is_kept():
    # Row 0: "+" is 200 below the max, so exp(-200) underflows to exactly 0 in fp32; row 1: 95 below, a denormal.
    V = 300
    hidden = torch.zeros(2, 16)
    hidden[0, 0] = hidden[1, 1] = 1.0
    lm_w = torch.zeros(V, 16)
    lm_w[7, 0], lm_w[7, 1] = -200.0, -95.0  # the requested id
    out = step_token_probs(hidden, torch.tensor([0, 1]), lm_w, [7, 8], backend="triton")
    ref = step_token_probs_reference(hidden, torch.tensor([0, 1]), lm_w, [7, 8])
    assert out.shape == (2, 2)
    assert ref[0, 0] == 0 and 0 < ref[1, 0] < torch.finfo(torch.float32).tiny
    assert torch.equal(out == 0, ref == 0)
    # Only the last bits of lse = log(V - 1 + exp(-gap)) may differ, a relative 1e-7 on exp(logit - lse).
    torch.testing.assert_close(out, ref, rtol=3e-4, atol=0)


@needs_interpreter
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_step_token_probs_zero_steps(backend, monkeypatch):
    monkeypatch.setattr(sr, "_step_vocab_lse_kernel", _NoLaunch())
    no_steps = torch.empty(0, dtype=torch.int64)
    out = step_token_probs(_hidden(3, 16, torch.float32), no_steps, torch.ones(50, 16), [1, 2], backend=backend)
    assert out.shape == (0, 2) and out.dtype == torch.float32


@needs_interpreter
def test_step_token_probs_accepts_token_tensor():
    hidden = _hidden(8, 16, torch.float32)
    lm_w, lm_b = _head(64, 16, torch.float32)
    step_pos = torch.tensor([2, 7], dtype=torch.int64)
    by_tensor = step_token_probs(hidden, step_pos, lm_w, torch.tensor([5, 63]), lm_head_bias=lm_b, backend="triton")
    by_list = step_token_probs(hidden, step_pos, lm_w, [5, 63], lm_head_bias=lm_b, backend="triton")
    assert torch.equal(by_tensor, by_list)  # same kernel, same inputs: bitwise equal


class _Conversions(TorchFunctionMode):
    """Records the number of elements of every tensor converted with ``.float()``."""

    def __init__(self):
        super().__init__()
        self.sizes: list[int] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.float:
            self.sizes.append(args[0].numel())
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_step_token_probs_reference_converts_the_lm_head_a_slice_at_a_time(dtype, monkeypatch):
    # 1000 rows in slices of 64: 15 whole slices and a partial one. The whole head never goes to fp32 at once (at 7B
    # that copy is 2.2 GB per call), and the result still meets the any-order bound of the float64 softmax.
    monkeypatch.setattr(sr, "_REFERENCE_VOCAB_ROWS", 64)
    step_pos, T = _packed_step_pos([1, 12, 40])
    H, V = 67, 1000
    hidden = _hidden(T, H, dtype)
    lm_w, lm_b = _head(V, H, dtype, scale=6.0)
    with _Conversions() as conversions:
        out = step_token_probs_reference(hidden, step_pos, lm_w, [10, 999, 0], lm_head_bias=lm_b)
    assert max(conversions.sizes) <= max(64 * H, step_pos.numel() * H)
    exact, bound = step_token_probs_bound(hidden, step_pos, lm_w, lm_b, [10, 999, 0], u=U_FP32, rescales=0)
    assert_within(out, exact, bound)


# ---------------------------------------------------------------------------------------------------------------
# Backend selection and validation
# ---------------------------------------------------------------------------------------------------------------


def test_auto_backend_on_cpu_runs_torch(monkeypatch):
    monkeypatch.setattr(sr, "_step_rewards_kernel", _NoLaunch())
    monkeypatch.setattr(sr, "_step_vocab_lse_kernel", _NoLaunch())
    hidden = _hidden(10, 16, torch.float32)
    weight, bias = _head(2, 16, torch.float32)
    step_pos = torch.tensor([0, 9], dtype=torch.int64)
    ref = step_rewards_reference(hidden, step_pos, weight, bias)
    assert torch.equal(step_rewards(hidden, step_pos, weight, bias), ref)
    lm_w, _ = _head(40, 16, torch.float32)
    ref = step_token_probs_reference(hidden, step_pos, lm_w, [1])
    assert torch.equal(step_token_probs(hidden, step_pos, lm_w, [1]), ref)


def test_triton_backend_on_cpu_without_interpreter_explains(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    hidden = _hidden(4, 16, torch.float32)
    weight, _ = _head(2, 16, torch.float32)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        step_rewards(hidden, torch.tensor([0]), weight, backend="triton")


_H = _hidden(6, 16, torch.float32)
_W, _B = _head(2, 16, torch.float32)
_POS = torch.tensor([0, 5])


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(backend="cuda"), ValueError, "auto, triton, torch"),
        (dict(activation="relu"), ValueError, "softmax, sigmoid, none"),
        (dict(weight=torch.zeros(5, 16)), ValueError, "1 <= C <= 4"),
        (dict(weight=torch.zeros(2, 15)), ValueError, "H must match"),
        (dict(bias=torch.zeros(3)), ValueError, r"bias must be \(2,\)"),
        (dict(step_pos=_POS.int()), TypeError, "int64"),
        (dict(step_pos=_POS[None]), TypeError, r"\(S,\) int64"),
        (dict(hidden=_H[None]), ValueError, r"\(T, H\)"),
        (dict(hidden=_H.long()), TypeError, "floating"),
    ],
    ids=["backend", "activation", "C=5", "H", "bias", "int32_pos", "2d_pos", "3d_hidden", "int_hidden"],
)
def test_step_rewards_validation(kwargs, error, match):
    args = dict(hidden=_H, step_pos=_POS, weight=_W, bias=_B, activation="softmax", backend="auto") | kwargs
    with pytest.raises(error, match=match):
        step_rewards(**args)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(backend="fast"), ValueError, "auto, triton, torch"),
        (dict(token_ids=[40]), ValueError, r"outside the vocabulary \[0, 40\)"),
        (dict(token_ids=[-1]), ValueError, "outside the vocabulary"),
        (dict(token_ids=[]), ValueError, "empty"),
        (dict(token_ids=torch.tensor([1.0])), TypeError, "integer tensor"),
        (dict(lm_head_weight=torch.zeros(40, 15)), ValueError, r"\(V, 16\)"),
        (dict(lm_head_bias=torch.zeros(39)), ValueError, r"\(40,\)"),
    ],
    ids=["backend", "id_too_big", "id_negative", "no_ids", "float_ids", "H", "bias"],
)
def test_step_token_probs_validation(kwargs, error, match):
    args = dict(hidden=_H, step_pos=_POS, lm_head_weight=torch.zeros(40, 16), token_ids=[1], backend="auto") | kwargs
    with pytest.raises(error, match=match):
        step_token_probs(**args)
