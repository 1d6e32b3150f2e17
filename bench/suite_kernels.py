"""pytest-benchmark suite: the reward kernels and the counting op against their plain torch ways.

Not part of the test run (pyproject's testpaths is tests/, and this file's name is not test_*.py); run it with
``make bench-kernels``, which saves the JSON so two commits compare (``--benchmark-compare``). Runs on CUDA when a GPU
is visible (Triton kernels, the CUDA op), on CPU otherwise (their torch / C++ paths). Groups name the op and shape,
params the dtype, so one group's rows are the providers of one case side by side.
"""

from __future__ import annotations

import pytest
import torch

from prmbench_fast import step_rewards, step_token_probs
from prmbench_fast.ops import step_confusion

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
#: CPU cases are scaled down (the full-logits provider at V = 152k would take seconds per round on 2 cores).
T, H, V = (4096, 3584, 152064) if DEVICE == "cuda" else (1024, 896, 32768)
S = T // 32  # PRMBench: ~1 reward position per 32 tokens (94k steps in 3.04M tokens)
DTYPES = [torch.bfloat16, torch.float32] if DEVICE == "cuda" else [torch.float32]


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _run(benchmark, fn):
    def call():
        out = fn()
        _sync()
        return out

    return benchmark.pedantic(call, rounds=10, warmup_rounds=1)


def _inputs(dtype, rows=2):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(T, H, generator=g).to(DEVICE, dtype)
    step_pos = torch.randperm(T, generator=g)[:S].sort().values.to(DEVICE)
    weight = (torch.randn(rows, H, generator=g) / H**0.5).to(DEVICE, dtype)
    return hidden, step_pos, weight


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("provider", ["step_rewards", "gathered_matmul"])
def test_head_rewards(benchmark, provider, dtype):
    """A (C=2)-row head at the S reward positions, softmax."""
    benchmark.group = f"head rewards T={T} H={H} S={S} C=2 {DEVICE}"
    hidden, step_pos, weight = _inputs(dtype)
    if provider == "step_rewards":
        _run(benchmark, lambda: step_rewards(hidden, step_pos, weight, activation="softmax"))
    else:
        _run(benchmark, lambda: (hidden[step_pos] @ weight.T).float().softmax(-1))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("provider", ["step_token_probs", "gathered_matmul", "full_logits"])
def test_vocabulary_rewards(benchmark, provider, dtype):
    """Two tokens' probabilities under the softmax over the whole vocabulary, at the S reward positions."""
    benchmark.group = f"vocabulary rewards T={T} H={H} V={V} S={S} {DEVICE}"
    hidden, step_pos, lm_head = _inputs(dtype, rows=V)
    tokens = torch.tensor([10, 20], device=DEVICE)
    if provider == "step_token_probs":
        _run(benchmark, lambda: step_token_probs(hidden, step_pos, lm_head, tokens))
    elif provider == "gathered_matmul":
        _run(benchmark, lambda: (hidden[step_pos] @ lm_head.T).float().softmax(-1)[:, tokens])
    else:  # the official way: (T, V) logits, then the rows at the reward positions
        _run(benchmark, lambda: (hidden @ lm_head.T).float().softmax(-1)[step_pos][:, tokens])


@pytest.mark.parametrize("provider", ["auto", "torch"])
def test_step_confusion(benchmark, provider):
    """Full-benchmark scale: 6,969 samples, 94k steps, 11 classes."""
    samples, steps, classes = 6969, 94208, 11
    g = torch.Generator().manual_seed(0)
    cu = torch.cat([torch.zeros(1, dtype=torch.int64),
                    torch.sort(torch.randint(0, steps + 1, (samples - 1,), generator=g)).values,
                    torch.tensor([steps])])
    args = (
        (torch.rand(steps, generator=g) < 0.8).to(DEVICE),
        torch.zeros(samples, dtype=torch.float64, device=DEVICE),
        cu.to(DEVICE),
        torch.zeros(samples, dtype=torch.int64, device=DEVICE),  # one error step per sample, the first
        torch.arange(samples + 1, dtype=torch.int64, device=DEVICE),
        torch.randint(0, classes, (samples,), generator=g).to(DEVICE),
        classes,
    )
    benchmark.group = f"step_confusion B={samples} S={steps} {DEVICE}"
    _run(benchmark, lambda: step_confusion(*args, backend=provider))
