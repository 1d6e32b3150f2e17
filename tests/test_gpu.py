"""Every kernel and op on a CUDA GPU against its torch reference (marker ``gpu``: always collected, skipped without
CUDA; ``make gpu-check`` runs this file first).

Tolerances (STYLE.md practice 2). The step-reward kernels and their fp32 torch references are each compared with a
float64 computation on the same inputs, under a bound that holds for ANY summation order (tests/error_bounds.py:
gamma_n * sum |x_i w_i| per logit, gamma_{V-1} for the sum of a log-sum-exp, the GPU's approximate ex2/division,
an absolute floor of fp32's smallest normal number for flushed denormals): the kernel and cuBLAS sum in different
orders, so neither may be held to the other's error. A NaN, a wrong index or a dropped vocabulary tile fails it.
Attention in bf16 follows flash-attention's 2x rule: its error against an fp32 model must be at most twice the error
of plain PyTorch in bf16, plus a floor of 4 fp32 ulps. Counts, indices and labels are compared exactly.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from error_bounds import U_FP32, U_TENSOR_CORE, assert_within, step_rewards_bound, step_token_probs_bound
from prmbench_fast import ops, prefix_sharing, varlen_attention
from prmbench_fast.kernels import step_reward as sr
from prmbench_fast.kernels.step_reward import (
    gather_step_hidden,
    step_rewards,
    step_rewards_reference,
    step_token_probs,
    step_token_probs_reference,
)
from prmbench_fast.packing import backbone_hidden_states
from prmbench_fast.prefix_sharing import shared_step_hidden
from test_packing import _packed_batch, _per_sample, _tiny
from test_prefix_sharing import MAX_LENGTH, MODELS, group, unshared_rows
from test_step_confusion_op import official_counts, pack, sample, valid_args
from test_step_reward import _exact_head, _head, _hidden, _packed_step_pos

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ULPS = 4 * torch.finfo(torch.float32).eps


@pytest.fixture(autouse=True)
def plain_fp32_matmul():
    # The references' fp32 matmuls must be fp32 (the bounds take u = 2**-24): no TF32, whatever the environment set.
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = previous


def assert_twice_torch_error(out, plain, exact, *, floor) -> None:
    """max |out - exact| <= 2 max |plain - exact| + floor."""
    exact = exact.double().cpu()
    error = (out.double().cpu() - exact).abs().max().item()
    plain_error = (plain.double().cpu() - exact).abs().max().item()
    assert torch.isfinite(out).all()
    assert error <= 2 * plain_error + floor, f"error {error:.3g} > 2 x plain PyTorch's {plain_error:.3g} + {floor:.2g}"


def check_step_rewards(hidden, step_pos, weight, bias, activation) -> torch.Tensor:
    """The kernel and the torch reference, each within the any-order bound of the float64 result."""
    out = step_rewards(hidden, step_pos, weight, bias, activation=activation, backend="triton")
    exact, bound = step_rewards_bound(hidden, step_pos, weight, bias, activation)
    assert_within(out, exact, bound, "kernel")
    assert_within(step_rewards_reference(hidden, step_pos, weight, bias, activation=activation), exact, bound, "torch")
    return out


def check_step_token_probs(hidden, step_pos, lm_w, lm_b, token_ids) -> torch.Tensor:
    """The kernel and the torch reference, each within the any-order bound of the float64 result: the kernel's logits
    with the tensor cores' accumulation when its dot is native 16-bit, its log-sum-exp with one rescaling of the
    running sum per vocabulary tile of a program plus the merge of the splits."""
    out = step_token_probs(hidden, step_pos, lm_w, token_ids, lm_head_bias=lm_b, backend="triton")
    tiles = sr._probs_tiles(hidden, lm_w)
    _, v_per_split = sr._vocab_splits(step_pos.numel(), lm_w.shape[0], tiles)
    u = U_FP32 if tiles is sr._PROBS_TILES_FP32 else U_TENSOR_CORE
    exact, bound = step_token_probs_bound(hidden, step_pos, lm_w, lm_b, token_ids, u=u,
                                          rescales=v_per_split // tiles.block_v + 1)  # fmt: skip
    assert_within(out, exact, bound, "kernel")
    reference = step_token_probs_reference(hidden, step_pos, lm_w, token_ids, lm_head_bias=lm_b)
    exact, bound = step_token_probs_bound(hidden, step_pos, lm_w, lm_b, token_ids, u=U_FP32, rescales=0)
    assert_within(reference, exact, bound, "torch")
    return out


# ---------------------------------------------------------------------------------------------------------------------
# step_rewards


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ["softmax", "sigmoid", "none"])
@pytest.mark.parametrize("C", [1, 2, 3, 4])
@pytest.mark.parametrize("H", [896, 67])  # a model width (a multiple of 16, > the 64 tile) and an odd one
def test_step_rewards(dtype, activation, C, H):
    step_pos, T = _packed_step_pos([1, 9, 300, 5, 40])
    hidden = _hidden(T, H, dtype).to(CUDA)
    weight, bias = (t.to(CUDA) for t in _head(C, H, dtype, scale=4.0))
    out = check_step_rewards(hidden, step_pos.to(CUDA), weight, bias, activation)
    assert out.shape == (step_pos.numel(), C) and out.dtype == torch.float32 and out.device.type == "cuda"


@pytest.mark.parametrize("hidden_dtype,weight_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.float16)])
def test_step_rewards_mixed_dtypes_and_strides(hidden_dtype, weight_dtype):
    T, H = 64, 130
    hidden = _hidden(T, 2 * H + 3, hidden_dtype).to(CUDA)[:, 3 : 3 + H]  # odd row stride, unaligned start
    weight, bias = (t.to(CUDA) for t in _head(3, H, weight_dtype, scale=4.0))
    check_step_rewards(hidden, torch.tensor([0, 63, 7, 7, 30], device=CUDA), weight, bias, "softmax")


@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
def test_step_rewards_underflow(activation):
    # Denormal and underflowing probabilities (see test_step_reward.py): with approximate ex2/div a denormal may
    # flush to 0, which the bounds' absolute floor admits; a NaN or a wrong probability fails.
    logits = [[0.0, -95.0], [0.0, -200.0], [120.0, 0.0], [-120.0, -88.0]]
    hidden, step_pos, weight = (t.to(CUDA) for t in _exact_head(logits))
    out = check_step_rewards(hidden, step_pos, weight, None, activation)
    assert ((out >= 0) & (out <= 1)).all()


def test_gather_step_hidden_is_exact():
    hidden = _hidden(30, 2 * 67, torch.bfloat16).to(CUDA)[:, ::2]
    step_pos = torch.tensor([29, 0, 3, 3], device=CUDA)
    assert torch.equal(gather_step_hidden(hidden, step_pos), hidden[step_pos])


# ---------------------------------------------------------------------------------------------------------------------
# step_token_probs


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("V", [1000, 32000])  # few vocabulary splits, many; a size not divisible by 16, one that is
@pytest.mark.parametrize("S_lengths", [[1, 12, 40], [300] * 20], ids=["few_steps", "many_steps"])
def test_step_token_probs(dtype, V, S_lengths):
    step_pos, T = _packed_step_pos(S_lengths)
    H = 896
    hidden = _hidden(T, H, dtype).to(CUDA)
    lm_w, lm_b = (t.to(CUDA) for t in _head(V, H, dtype, scale=6.0))
    out = check_step_token_probs(hidden, step_pos.to(CUDA), lm_w, lm_b, [10, V - 1, 0, 10])
    assert out.shape == (step_pos.numel(), 4) and out.device.type == "cuda"


@pytest.mark.parametrize("hidden_dtype,weight_dtype", [(torch.bfloat16, torch.float32), (torch.float16, torch.float16)])
def test_step_token_probs_odd_width_and_transposed(hidden_dtype, weight_dtype):
    # H = 67: rows not 16-byte aligned (the specialisation that spilled before the tiles were chosen per dtype).
    T, H, V = 50, 67, 3000
    hidden = _hidden(H, T, hidden_dtype).to(CUDA).T  # strides (1, T)
    lm_w, lm_b = (t.to(CUDA) for t in _head(V, H, weight_dtype, scale=6.0))
    check_step_token_probs(hidden, torch.tensor([49, 0, 20], device=CUDA), lm_w, lm_b, [3, 2999])


def test_step_token_probs_underflow():
    V = 300
    hidden = torch.zeros(2, 16, device=CUDA)
    hidden[0, 0] = hidden[1, 1] = 1.0
    lm_w = torch.zeros(V, 16, device=CUDA)
    lm_w[7, 0], lm_w[7, 1] = -200.0, -95.0
    out = check_step_token_probs(hidden, torch.tensor([0, 1], device=CUDA), lm_w, None, [7, 8])
    assert ((out >= 0) & (out <= 1)).all()


# ---------------------------------------------------------------------------------------------------------------------
# Launch placement: the tensors' device and that device's current stream


def test_kernels_run_on_the_current_stream():
    hidden = _hidden(400, 256, torch.bfloat16).to(CUDA)
    weight, bias = (t.to(CUDA) for t in _head(2, 256, torch.bfloat16))
    step_pos = torch.arange(0, 400, 7, device=CUDA)
    expected = step_rewards(hidden, step_pos, weight, bias, backend="triton")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out = step_rewards(hidden, step_pos, weight, bias, backend="triton")
        probs = step_token_probs(hidden, step_pos, weight, [1], backend="triton")
    side.synchronize()
    assert torch.equal(out, expected)
    assert torch.equal(probs, step_token_probs(hidden, step_pos, weight, [1], backend="triton"))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_kernels_run_on_the_tensors_device():
    # The current device stays cuda:0 while the tensors live on cuda:1.
    second = torch.device("cuda:1")
    hidden = _hidden(100, 128, torch.float32).to(second)
    weight, bias = (t.to(second) for t in _head(3, 128, torch.float32))
    step_pos = torch.tensor([0, 50, 99], device=second)
    assert torch.cuda.current_device() == 0
    out = check_step_rewards(hidden, step_pos, weight, bias, "softmax")
    probs = check_step_token_probs(hidden, step_pos, weight, None, [2])
    assert out.device == second and probs.device == second


# ---------------------------------------------------------------------------------------------------------------------
# step_confusion (CUDA op): exact counts


def _random_samples(count: int, num_classes: int, seed: int) -> list[dict]:
    """Up to 13 labels and 3 distinct error steps in [0, 25) per sample (some past the labels); drawn in bulk."""
    rng = np.random.default_rng(seed)
    label_counts = rng.integers(0, 14, count)
    values = np.split(rng.random(int(label_counts.sum())), np.cumsum(label_counts)[:-1])
    error_counts = rng.integers(0, 4, count)
    errors = np.argsort(rng.random((count, 25)), axis=1)  # a random permutation of 0..24 per sample
    return [
        sample(values[b].tolist(), errors[b, : error_counts[b]].tolist(), cls=b % num_classes) for b in range(count)
    ]


@pytest.mark.parametrize("dtype", [torch.bool, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("num_classes", [10, 2000])  # per-block shared histogram; global atomics (> 1536 classes)
def test_step_confusion_matches_cpu_and_oracle(dtype, num_classes):
    samples = _random_samples(300_000 if num_classes == 10 else 5_000, num_classes, seed=0)  # > 1024 blocks of 256
    if dtype == torch.bool:
        samples = [{**s, "values": [v > 0.5 for v in s["values"]]} for s in samples]
    args = pack(samples, dtype)
    cpu = ops.step_confusion(*args, num_classes, backend="cpu")
    gpu = ops.step_confusion(*(t.to(CUDA) for t in args), num_classes, backend="cuda")
    assert torch.equal(gpu[0].cpu(), cpu[0]) and torch.equal(gpu[1].cpu(), cpu[1])
    if num_classes == 10:
        oracle = official_counts(samples[:2000], num_classes)
        head = ops.step_confusion(*(t.to(CUDA) for t in pack(samples[:2000], dtype)), num_classes)
        assert torch.equal(head[0].cpu(), oracle[0]) and torch.equal(head[1].cpu(), oracle[1])


def test_step_confusion_empty_and_strided():
    empty = ops.step_confusion(*(t.to(CUDA) for t in pack([], torch.float32)), 3)
    assert torch.equal(empty[0].cpu(), torch.zeros(3, 4, dtype=torch.int64)) and empty[1].shape == (0, 6)
    args = [t.to(CUDA) for t in pack(_random_samples(1000, 4, seed=1), torch.float32)]
    strided = [torch.stack([t, torch.zeros_like(t)], dim=1).reshape(-1)[::2] for t in args]
    assert torch.equal(ops.step_confusion(*strided, 4)[1], ops.step_confusion(*args, 4)[1])


@pytest.mark.parametrize(
    "position, value, message",
    [
        (2, [0, 3, 4], r"cu_labels\[B\] must equal the length of step_values \(5\), got 4"),
        (2, [0, 6, 5], r"cu_labels must be non-decreasing, got cu_labels\[1\] = 6 > cu_labels\[2\] = 5"),
        (2, [1, 3, 5], r"cu_labels\[0\] must be 0, got 1"),
        (3, [1, -1], r"error_steps must be 0-based \(>= 0\), got error_steps\[1\] = -1"),
        (4, [0, 1, 3], r"cu_errors\[B\] must equal the length of error_steps \(2\), got 3"),
        (5, [0, 2], r"sample_class\[1\] = 2 is out of range"),
        (5, [-1, 0], r"sample_class\[0\] = -1 is out of range"),
    ],
)
def test_step_confusion_bad_input_raises_and_the_context_survives(position, value, message):
    args = valid_args()
    args[position] = torch.tensor(value)
    on_gpu = [a.to(CUDA) if isinstance(a, torch.Tensor) else a for a in args]
    with pytest.raises(RuntimeError, match=message):
        ops.step_confusion(*on_gpu)
    torch.cuda.synchronize()  # a device-side trap would surface here, and poison every later CUDA call
    good = [a.to(CUDA) if isinstance(a, torch.Tensor) else a for a in valid_args()]
    assert ops.step_confusion(*good)[0].sum().item() == 5


def test_step_confusion_bad_offsets_of_an_empty_batch():
    # B = 0 but five values: the kernel's first thread checks the ends of the offsets even without samples.
    args = [t.to(CUDA) for t in pack([], torch.float32)]
    args[0] = torch.rand(5, device=CUDA)
    with pytest.raises(RuntimeError, match=r"cu_labels\[B\] must equal the length of step_values \(5\), got 0"):
        ops.step_confusion(*args, 2)


def test_step_confusion_opcheck():
    samples = [sample([0.9, 0.1, 0.7], [1, 8], cls=0), sample([0.3], [], cls=1)]
    args = tuple(t.to(CUDA) for t in pack(samples, torch.float32))
    torch.library.opcheck(torch.ops.prmbench_fast.step_confusion.default, (*args, 2))


# ---------------------------------------------------------------------------------------------------------------------
# Attention: packed varlen and prefix sharing in half precision


def test_auto_attention_is_flash_on_sm80_and_newer():
    capability = torch.cuda.get_device_capability()
    expected = "varlen" if capability >= (8, 0) else "sdpa"
    assert varlen_attention.auto_backend(CUDA, torch.bfloat16, 64) == expected
    assert varlen_attention.auto_backend(CUDA, torch.float32, 64) == "sdpa"


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_packed_bf16_within_twice_the_per_sample_error(family):
    fp32 = _tiny(family).eval().to(CUDA)
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    batch = _packed_batch().to(CUDA)
    exact = _per_sample(fp32, batch)
    plain = _per_sample(bf16, batch)  # transformers' own attention, one sample at a time
    packed = backbone_hidden_states(bf16, batch)  # flash varlen on sm_80+
    assert_twice_torch_error(packed, plain, exact, floor=ULPS)


@pytest.mark.parametrize("family", sorted(MODELS))
def test_prefix_sharing_bf16_within_twice_the_unshared_error(family):
    fp32 = MODELS[family]().to(CUDA)
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    samples = group()
    exact, unshared = unshared_rows(fp32, samples), unshared_rows(bf16, samples)
    result = shared_step_hidden(bf16, samples, max_length=MAX_LENGTH, batch_tokens=16)
    bounds = result.cu_steps.tolist()
    for b, key in enumerate(result.sample_keys):
        if exact[key][0].numel():
            shared = result.hidden[bounds[b] : bounds[b + 1]]
            assert_twice_torch_error(shared, unshared[key][0], exact[key][0], floor=ULPS)


def test_one_pinned_copy_moves_every_array():
    arrays = [torch.arange(5).numpy(), torch.tensor([7, -1]).numpy(), torch.empty(0, dtype=torch.int64).numpy()]
    moved = prefix_sharing._to_device(arrays, CUDA)
    assert [t.device.type for t in moved] == ["cuda"] * 3
    assert [t.cpu().tolist() for t in moved] == [[0, 1, 2, 3, 4], [7, -1], []]
