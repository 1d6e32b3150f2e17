"""Step rewards read straight from a PRM's final hidden states, without (tokens x vocabulary) logits.

Packed layout (defined in ``prmbench_fast/packing.py``): the final hidden states of a packed batch are
``hidden (T, H)``; ``step_pos (S,) int64`` holds the global token indices where step rewards are read;
``cu_steps (B+1,) int32`` gives each sample's slice of ``step_pos``. The ops below only need ``hidden`` and
``step_pos``: their S output rows follow ``step_pos``, so ``cu_steps`` splits the result per sample.

Which op serves which PRM family (PRMBENCH_SPEC §3, §7.3):

- ``step_rewards`` -- one linear head with C <= 4 outputs on the gathered rows, then softmax / sigmoid / nothing:
  math-shepherd and the RLHFlow {+, -} pair (the 2 LM-head rows, softmax), Skywork's value head (C=1, sigmoid),
  ReasonEval (C=3, softmax), MATH-Minos (C=1, none), PURE (C=2, softmax), and Llemma (C=1, sigmoid of the
  mean-over-vocabulary logit, see :func:`mean_logit_head`).
- ``step_token_probs`` -- the probability of given token ids under the softmax over the whole vocabulary: PRMBench's
  RLHFlow Llama3.1-8B-PRM adapter (P("+") over the full vocabulary).
- ``gather_step_hidden`` -- the (S, H) rows themselves, for heads that are not one linear layer (Qwen2.5-Math-PRM).

Backends: ``"triton"`` runs the Triton kernels (CUDA tensors; CPU tensors only under ``TRITON_INTERPRET=1``),
``"torch"`` runs the plain-torch reference below each kernel, ``"auto"`` picks Triton for CUDA tensors and torch
otherwise. The choice is made per call from the tensors' device; importing this module touches no GPU. A kernel runs
on the tensors' GPU and on that GPU's current stream, whatever the current device is.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence

import torch

from prmbench_fast.compat import HAS_TRITON, tl, triton, warn_once

BACKENDS = ("auto", "triton", "torch")
ACTIVATIONS = ("softmax", "sigmoid", "none")
#: Largest head width of :func:`step_rewards`: every PRM head in PRMBench has 1-3 outputs, and the kernel keeps a
#: (BLOCK_S, BLOCK_C, BLOCK_H) product tile in registers, so C is kept tiny on purpose.
MAX_CLASSES = 4

# step_rewards: the op is a gather of S rows of H values (memory bound, ~S*H*2 bytes). 16 rows per program with a
# 64-wide H tile and up to 4 classes gives a 16*4*64 = 4096-element fp32 product tile: 32 registers per thread at 4
# warps, which leaves room for the loads in flight. A 128-wide tile (64 registers for the product) compiled without
# spills with Triton 3.6 and 3.7, but Triton 3.9's code made ptxas spill 8 bytes on sm_90 in 24 of the 182 sweep
# specialisations (16-bit inputs, 4 classes); at 64 none spills on any of them (measured: 32-80 registers).
_REWARD_BLOCK_S = 16
_REWARD_MAX_BLOCK_H = 64
_REWARD_NUM_WARPS = 4



@dataclasses.dataclass(frozen=True)
class _ProbsTiles:
    """Tiles of ``_step_vocab_lse_kernel``: BLOCK_S step rows x BLOCK_V vocabulary ids per program, the dot's K
    dimension in BLOCK_H slices of at most ``max_block_h`` (tl.dot needs M, N and K >= 16); warps and pipeline stages."""

    block_s: int
    block_v: int
    max_block_h: int
    num_warps: int
    num_stages: int


# Tiles are chosen per dot precision so that no specialisation spills registers (255 per thread at most) on sm_80 or
# sm_90: tests/test_aot_compile.py compiles every specialisation the wrapper makes for both and reads the real numbers
# with cuobjdump (quoted below as "measured", median / most over those specialisations).
# Every program holds its (BLOCK_S, BLOCK_V) fp32 logits tile in registers, and the online log-sum-exp keeps about
# three tiles of that shape alive (the logits, their exponentials, the requested-id select). When rows are not
# 16-byte aligned (a width that is not a multiple of 16 elements, or a column slice), the pipeline cannot copy
# tiles straight into shared memory (cp.async) and stages them through registers too: that is where budgets break.
# Triton keeps num_stages - 1 tiles of each operand in flight in shared memory.
#
# Native 16-bit dot (fp16 or bf16 on both sides): tensor cores take both operands from shared memory. 32 x 128
# logits over 8 warps (256 threads) are 16 registers per tile, ~50 for three; the 32 x 32 and 32 x 128 operand tiles
# are (1,024 + 4,096) x 2 B = 10 KiB per stage, 20 KiB for two in flight (measured: 117 / 195 registers, 20,480 B
# of shared memory on sm_80). The first choice, 4 warps and 64-wide H slices, spilled ~1 KB per thread on
# unaligned rows.
_PROBS_TILES_NATIVE = _ProbsTiles(block_s=32, block_v=128, max_block_h=32, num_warps=8, num_stages=3)
# fp32 dot (fp32 inputs, or two different dtypes): "ieee" precision runs on the FMA units, which take BOTH operand
# tiles from registers as well, and mixed dtypes convert one of them there; with the native tiles at 4 warps this
# reached 255 registers and 8-40 bytes of spills. 16 x 32 logits over 256 threads are 2 registers per tile; the
# 16 x 32 and 32 x 32 operands 6 more as fp32, (512 + 1,024) x 4 B = 6 KiB. No software pipelining (num_stages=1):
# the FMA dot reads its operands from registers, so stages in flight only stage copies. Wider tiles made ptxas spill
# 8-16 bytes of a pointer at 64 registers: 16 x 64 with two stages on sm_80 (fp16/bf16 x fp32, 2 ids, V a multiple
# of 16 as every real vocabulary is) under Triton 3.7, with one stage on sm_90 (mixed 16-bit/fp32 pairs, 1 id) under
# Triton 3.9. Measured at 16 x 32 over every fp32-dot specialisation at V = 1,000 and V % 16 == 0, with Triton 3.6,
# 3.7.1 and 3.9: 40-80 registers, at most 7,168 B of shared memory, no spills. 16 rows per program read the LM head
# ceil(S / 16) times, but the row blocks of one vocabulary split run side by side and share it through L2.
_PROBS_TILES_FP32 = _ProbsTiles(block_s=16, block_v=32, max_block_h=32, num_warps=8, num_stages=1)
_PROBS_MIN_BLOCK = 16
# step_token_probs_reference converts the LM head to fp32 this many rows at a time: 8,192 rows of a 7B model's width
# (3,584) are 117 MB of fp32, 5 % of the whole head's 2.2 GB, and a few dozen matmuls per call cost nothing next to
# the (S, V) logits they fill.
_REFERENCE_VOCAB_ROWS = 8192
# With few steps there are few row blocks, so the vocabulary is split across programs (flash-decoding style) and the
# per-split log-sum-exps are merged afterwards. ~8 resident programs per SM on a 132-SM GPU is ~1024 programs.
_TARGET_PROGRAMS = 1024


# ------------------------------------------------------------------------------------------------------------------
# Shared checks
# ------------------------------------------------------------------------------------------------------------------


def _check_hidden_and_positions(hidden: torch.Tensor, step_pos: torch.Tensor) -> None:
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be (T, H), got shape {tuple(hidden.shape)}")
    if not hidden.dtype.is_floating_point:
        raise TypeError(f"hidden must be a floating tensor, got {hidden.dtype}")
    if step_pos.dim() != 1 or step_pos.dtype != torch.int64:
        raise TypeError(f"step_pos must be (S,) int64, got shape {tuple(step_pos.shape)} {step_pos.dtype}")
    if step_pos.device != hidden.device:
        raise ValueError(f"step_pos is on {step_pos.device} but hidden is on {hidden.device}")


def _check_backend(backend: str, *tensors: torch.Tensor) -> bool:
    """Validate ``backend`` and return True when the Triton kernel should run."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    on_gpu = all(t.is_cuda for t in tensors)
    if not HAS_TRITON:
        if backend == "triton":
            raise RuntimeError('backend="triton" needs Triton, which is not installed; use backend="torch"')
        if on_gpu:
            warn_once(
                "step_reward:no-triton",
                "Triton is not installed: step rewards on CUDA tensors run the torch implementation (same numbers, "
                "more memory traffic); install the triton release your torch pairs for the fused kernels",
            )
        return False
    if backend == "triton" and not on_gpu and not triton.knobs.runtime.interpret:
        devices = sorted({str(t.device) for t in tensors})
        raise RuntimeError(
            f'backend="triton" needs CUDA tensors (got {", ".join(devices)}); on CPU set TRITON_INTERPRET=1 before '
            'importing prmbench_fast, or use backend="torch"'
        )
    return backend == "triton" or (backend == "auto" and on_gpu)


def _interpreted(tensor: torch.Tensor) -> bool:
    """Whether a launch on ``tensor`` runs in the Triton interpreter (CPU tensors) instead of compiled on a GPU.

    ``prmbench_fast.aot`` replaces this to record, from CPU tensors, the specialisations a GPU launch compiles."""
    return not tensor.is_cuda


def _launch_device(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """Where to launch: Triton launches on the *current* CUDA device and its current stream, not on the tensors'
    device, so a model on ``cuda:1`` would otherwise run the kernel on GPU 0 with GPU-1 pointers. Under this guard
    the launch uses ``tensor``'s device and that device's current stream; CPU tensors (interpreter) need nothing."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def gather_step_hidden(hidden: torch.Tensor, step_pos: torch.Tensor) -> torch.Tensor:
    """The final hidden states at the step positions, for heads that are not one linear layer.

    Qwen2.5-Math-PRM's head is Linear -> ReLU -> Linear(2): run it on these S rows instead of on all T tokens, then
    softmax. Pure data movement, so the rows equal ``hidden[step_pos]`` exactly, in ``hidden``'s dtype.

    Args:
        hidden: (T, H), any float dtype, any strides. Final hidden states of the packed batch.
        step_pos: (S,), int64. Global token indices of the step positions, each in [0, T).

    Returns:
        (S, H), hidden.dtype, contiguous.
    """
    _check_hidden_and_positions(hidden, step_pos)
    return hidden.index_select(0, step_pos)


def mean_logit_head(
    lm_head_weight: torch.Tensor, lm_head_bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The (1, H) head whose logit is the mean LM-head logit, for the Llemma rule.

    Llemma PRMs score ``sigmoid(mean over the vocabulary of the logits)``. As mean(W h + b) = mean(W) h + mean(b),
    ``step_rewards(hidden, step_pos, *mean_logit_head(W, b), activation="sigmoid")`` gives that score from one
    precomputed row instead of V logits per step. The mean is accumulated in fp32 (the official code averages logits
    computed in the model dtype, so scores can differ from it by that rounding).

    Args:
        lm_head_weight: (V, H), any float dtype. LM-head weight.
        lm_head_bias: (V,) or None. LM-head bias.

    Returns:
        weight: (1, H), float32. bias: (1,), float32, or None when ``lm_head_bias`` is None.
    """
    weight = (lm_head_weight.sum(0, dtype=torch.float32) / lm_head_weight.shape[0]).unsqueeze(0)
    bias = None if lm_head_bias is None else lm_head_bias.float().mean().reshape(1)
    return weight, bias


# ------------------------------------------------------------------------------------------------------------------
# step_rewards: gather -> (S, H) @ (H, C) + b -> softmax / sigmoid / none, one kernel
# ------------------------------------------------------------------------------------------------------------------


@triton.jit
def _step_rewards_kernel(
    HIDDEN,
    STEP_POS,
    WEIGHT,
    BIAS,
    OUT,
    S,
    H,
    C,
    stride_hidden_t,
    stride_hidden_h,
    stride_weight_c,
    stride_weight_h,
    stride_out_s,
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """One program: BLOCK_S step rows, all C classes, looping over H in BLOCK_H tiles."""
    pid = tl.program_id(0)
    offs_s = pid * BLOCK_S + tl.arange(0, BLOCK_S)
    mask_s = offs_s < S
    # step_pos is int64, so row offsets are int64 and T * H may exceed 2**31.
    pos = tl.load(STEP_POS + offs_s, mask=mask_s, other=0)
    offs_c = tl.arange(0, BLOCK_C)
    mask_c = offs_c < C

    row_ptrs = HIDDEN + pos[:, None] * stride_hidden_t  # (BLOCK_S, 1)
    w_ptrs = WEIGHT + offs_c[:, None] * stride_weight_c  # (BLOCK_C, 1)
    # C <= 4 is far below tl.dot's minimum tile of 16, so the head is a broadcast multiply + reduce over a
    # (BLOCK_S, BLOCK_C, BLOCK_H) tile; accumulation is fp32 whatever the input dtypes.
    acc = tl.zeros((BLOCK_S, BLOCK_C), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        # int64: with a transposed hidden, stride_hidden_h = T and offs_h * T may pass 2**31.
        offs_h = (h0 + tl.arange(0, BLOCK_H)).to(tl.int64)
        mask_h = offs_h < H
        # Convert right after loading: bf16 arithmetic is wrong in the Triton interpreter, and fp32 is what we want.
        x = tl.load(
            row_ptrs + offs_h[None, :] * stride_hidden_h, mask=mask_s[:, None] & mask_h[None, :], other=0.0
        ).to(tl.float32)
        w = tl.load(
            w_ptrs + offs_h[None, :] * stride_weight_h, mask=mask_c[:, None] & mask_h[None, :], other=0.0
        ).to(tl.float32)
        acc += tl.sum(x[:, None, :] * w[None, :, :], axis=2)
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_c, mask=mask_c, other=0.0).to(tl.float32)[None, :]

    if ACTIVATION == "softmax":
        # Padding classes get -inf so they take no probability mass.
        z = tl.where(mask_c[None, :], acc, float("-inf"))
        e = tl.exp(z - tl.max(z, axis=1)[:, None])
        out = e / tl.sum(e, axis=1)[:, None]
    elif ACTIVATION == "sigmoid":
        # The form torch.sigmoid uses on CPU and CUDA, so tiny values match it: exp(-z) overflows to inf below
        # z ~ -88.7 and the result is exactly 0 (its limit), never NaN.
        out = 1.0 / (1.0 + tl.exp(-acc))
    else:
        out = acc
    tl.store(OUT + offs_s[:, None] * stride_out_s + offs_c[None, :], out, mask=mask_s[:, None] & mask_c[None, :])


def step_rewards_reference(
    hidden: torch.Tensor,
    step_pos: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    activation: str = "softmax",
) -> torch.Tensor:
    """The torch implementation of :func:`step_rewards` (same arguments, less ``backend``; same result): the step
    rows gathered, projected in fp32 and activated; logits of the other T - S tokens are never computed."""
    _check_step_rewards_args(hidden, step_pos, weight, bias, activation)
    logits = hidden.index_select(0, step_pos).float() @ weight.float().T
    if bias is not None:
        logits = logits + bias.float()
    if activation == "softmax":
        return torch.softmax(logits, dim=-1)
    if activation == "sigmoid":
        return torch.sigmoid(logits)
    return logits


def _check_step_rewards_args(hidden, step_pos, weight, bias, activation) -> None:
    _check_hidden_and_positions(hidden, step_pos)
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose one of {', '.join(ACTIVATIONS)}")
    if weight.dim() != 2 or not 1 <= weight.shape[0] <= MAX_CLASSES:
        raise ValueError(f"weight must be (C, H) with 1 <= C <= {MAX_CLASSES}, got shape {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight is (C, {weight.shape[1]}) but hidden is (T, {hidden.shape[1]}): H must match")
    if not weight.dtype.is_floating_point:
        raise TypeError(f"weight must be a floating tensor, got {weight.dtype}")
    if bias is not None:
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must be ({weight.shape[0]},) to match weight, got shape {tuple(bias.shape)}")
        if not bias.dtype.is_floating_point:
            raise TypeError(f"bias must be a floating tensor, got {bias.dtype}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but hidden is on {hidden.device}")


def step_rewards(
    hidden: torch.Tensor,
    step_pos: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    activation: str = "softmax",
    backend: str = "auto",
) -> torch.Tensor:
    """Step rewards from a small linear head applied to the hidden states at the step positions.

    ``out = activation(hidden[step_pos] @ weight.T + bias)``, computed in fp32 whatever the input dtypes; logits of
    the other T - S tokens are never computed. The Triton backend does gather, projection, bias and activation in
    one kernel.

    The Llemma rule (sigmoid of the mean logit over the vocabulary) is this op with the (1, H) mean of the LM-head
    rows and the mean of the LM-head bias, ``activation="sigmoid"``: mean(W h + b) = mean(W) h + mean(b)
    (see :func:`mean_logit_head`). Math-shepherd's rule is this op with the LM-head rows of ("+", "-") and softmax.

    Args:
        hidden: (T, H), any float dtype, any strides. Final hidden states of the packed batch.
        step_pos: (S,), int64. Global token indices of the step positions, each in [0, T) (not checked: an index out
            of range raises here but reads unrelated memory in the Triton kernel).
        weight: (C, H), any float dtype (may differ from hidden's), 1 <= C <= 4. Head weight.
        bias: (C,), any float dtype, or None. Head bias.
        activation: "softmax" (over the C classes), "sigmoid" (elementwise) or "none" (raw logits).
        backend: "auto" (Triton for CUDA tensors, torch otherwise), "triton" or "torch".

    Returns:
        (S, C), float32. Row i is the reward of the step read at token ``step_pos[i]``.
    """
    _check_step_rewards_args(hidden, step_pos, weight, bias, activation)
    if not _check_backend(backend, hidden, step_pos, weight):
        return step_rewards_reference(hidden, step_pos, weight, bias, activation=activation)

    step_pos = step_pos.contiguous()  # the kernel reads it with unit stride
    S, H = step_pos.shape[0], hidden.shape[1]
    C = weight.shape[0]
    out = torch.empty((S, C), dtype=torch.float32, device=hidden.device)
    if S == 0:
        return out
    grid = (triton.cdiv(S, _REWARD_BLOCK_S),)
    with _launch_device(hidden):
        _step_rewards_kernel[grid](
            hidden,
            step_pos,
            weight,
            bias if bias is not None else weight,  # never read when HAS_BIAS is False
            out,
            S,
            H,
            C,
            hidden.stride(0),
            hidden.stride(1),
            weight.stride(0),
            weight.stride(1),
            out.stride(0),
            HAS_BIAS=bias is not None,
            ACTIVATION=activation,
            BLOCK_S=_REWARD_BLOCK_S,
            BLOCK_C=triton.next_power_of_2(C),
            BLOCK_H=min(_REWARD_MAX_BLOCK_H, triton.next_power_of_2(max(H, 1))),
            num_warps=_REWARD_NUM_WARPS,
        )
    return out


# ------------------------------------------------------------------------------------------------------------------
# step_token_probs: streaming log-sum-exp over the LM head's vocabulary tiles at the step rows only
# ------------------------------------------------------------------------------------------------------------------


@triton.jit
def _step_vocab_lse_kernel(
    HIDDEN,
    STEP_POS,
    WEIGHT,
    BIAS,
    TOKEN_IDS,
    LSE_PART,
    TARGET_PART,
    S,
    H,
    V,
    V_PER_SPLIT,
    stride_hidden_t,
    stride_hidden_h,
    stride_weight_v,
    stride_weight_h,
    stride_lse_split,
    stride_target_split,
    stride_target_s,
    K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One program: BLOCK_S step rows x one vocabulary split of V_PER_SPLIT ids (a multiple of BLOCK_V).

    Streams the split's LM-head rows in BLOCK_V tiles keeping, per step row, a running max m and a running sum
    l = sum(exp(logit - m)); writes the split's log-sum-exp m + log(l) and the logits of the requested token ids that
    fall in the split (0 for the others, so summing the splits' values gives each requested logit exactly).
    """
    pid_s = tl.program_id(0)
    pid_v = tl.program_id(1)
    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    mask_s = offs_s < S
    pos = tl.load(STEP_POS + offs_s, mask=mask_s, other=0)
    row_ptrs = HIDDEN + pos[:, None] * stride_hidden_t  # (BLOCK_S, 1), int64 offsets
    offs_k = tl.arange(0, BLOCK_K)

    m = tl.full((BLOCK_S,), float("-inf"), dtype=tl.float32)
    l = tl.zeros((BLOCK_S,), dtype=tl.float32)
    target = tl.zeros((BLOCK_S, BLOCK_K), dtype=tl.float32)
    v_start = pid_v * V_PER_SPLIT
    v_stop = tl.minimum(v_start + V_PER_SPLIT, V)
    # Splits hold at least one valid column, so the first tile makes m finite and exp(m_old - m_new) never sees
    # (-inf) - (-inf).
    for v0 in range(v_start, v_stop, BLOCK_V):
        # int64: V * H exceeds 2**31 for large vocabularies times wide models (152,064 * 16,384).
        offs_v = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
        mask_v = offs_v < v_stop
        w_ptrs = WEIGHT + offs_v[None, :] * stride_weight_v  # (1, BLOCK_V)
        acc = tl.zeros((BLOCK_S, BLOCK_V), dtype=tl.float32)
        for h0 in range(0, H, BLOCK_H):
            offs_h = (h0 + tl.arange(0, BLOCK_H)).to(tl.int64)  # int64 for transposed (strided) views, as above
            mask_h = offs_h < H
            x = tl.load(row_ptrs + offs_h[None, :] * stride_hidden_h, mask=mask_s[:, None] & mask_h[None, :], other=0.0)
            w = tl.load(w_ptrs + offs_h[:, None] * stride_weight_h, mask=mask_h[:, None] & mask_v[None, :], other=0.0)
            if DOT_FP32:
                # Mixed dtypes, fp32 inputs, or bf16 under the interpreter (whose bf16 dot is wrong): multiply in
                # fp32, with "ieee" so fp32 inputs are not truncated to tf32 on tensor cores.
                x = x.to(tl.float32)
                w = w.to(tl.float32)
            # Same 16-bit dtype on both sides: products of fp16/bf16 values are exact in fp32 and tensor cores
            # accumulate in fp32, so the native dot loses nothing against upcasting ("ieee" only affects fp32).
            acc = tl.dot(x, w, acc, input_precision="ieee")
        if HAS_BIAS:
            acc += tl.load(BIAS + offs_v, mask=mask_v, other=0.0).to(tl.float32)[None, :]
        logits = tl.where(mask_v[None, :], acc, float("-inf"))

        m_new = tl.maximum(m, tl.max(logits, axis=1))
        l = l * tl.exp(m - m_new) + tl.sum(tl.exp(logits - m_new[:, None]), axis=1)
        m = m_new
        # Each requested id lies in one tile of one split; elsewhere its slot gets + 0.
        for k in tl.static_range(K):
            hit = tl.sum(tl.where(offs_v[None, :] == tl.load(TOKEN_IDS + k), logits, 0.0), axis=1)
            target += tl.where(offs_k[None, :] == k, hit[:, None], 0.0)

    tl.store(LSE_PART + pid_v * stride_lse_split + offs_s, m + tl.log(l), mask=mask_s)
    tl.store(
        TARGET_PART + pid_v * stride_target_split + offs_s[:, None] * stride_target_s + offs_k[None, :],
        target,
        mask=mask_s[:, None] & (offs_k < K)[None, :],
    )


def step_token_probs_reference(
    hidden: torch.Tensor,
    step_pos: torch.Tensor,
    lm_head_weight: torch.Tensor,
    token_ids: Sequence[int] | torch.Tensor,
    *,
    lm_head_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The torch implementation of :func:`step_token_probs` (same arguments, less ``backend``; same result): the
    (S, V) fp32 logits of the step rows (never the (T, V) logits), the LM head converted to fp32 a slice of rows at a
    time (never the whole head)."""
    ids = _check_step_token_probs_args(hidden, step_pos, lm_head_weight, token_ids, lm_head_bias)
    rows = hidden.index_select(0, step_pos).float()
    V = lm_head_weight.shape[0]
    logits = torch.empty((rows.shape[0], V), dtype=torch.float32, device=hidden.device)
    # The LM head goes to fp32 one slice of rows at a time: `lm_head_weight.float()` would copy all of it at every
    # call (2.2 GB for a 7B model's 152,064 x 3,584 bf16 head); each logit is the same fp32 dot product either way.
    for v0 in range(0, V, _REFERENCE_VOCAB_ROWS):
        logits[:, v0 : v0 + _REFERENCE_VOCAB_ROWS] = rows @ lm_head_weight[v0 : v0 + _REFERENCE_VOCAB_ROWS].float().T
    if lm_head_bias is not None:
        logits += lm_head_bias.float()
    cols = torch.tensor(ids, dtype=torch.int64, device=hidden.device)
    return torch.log_softmax(logits, dim=-1).index_select(1, cols).exp()


def _check_step_token_probs_args(hidden, step_pos, lm_head_weight, token_ids, lm_head_bias) -> list[int]:
    """Validate the arguments and return the token ids as a list of ints."""
    _check_hidden_and_positions(hidden, step_pos)
    if lm_head_weight.dim() != 2 or lm_head_weight.shape[1] != hidden.shape[1]:
        raise ValueError(
            f"lm_head_weight must be (V, {hidden.shape[1]}) to match hidden (T, H), got {tuple(lm_head_weight.shape)}"
        )
    if not lm_head_weight.dtype.is_floating_point:
        raise TypeError(f"lm_head_weight must be a floating tensor, got {lm_head_weight.dtype}")
    V = lm_head_weight.shape[0]
    if lm_head_bias is not None and lm_head_bias.shape != (V,):
        raise ValueError(f"lm_head_bias must be ({V},), got shape {tuple(lm_head_bias.shape)}")
    if isinstance(token_ids, torch.Tensor):
        if token_ids.dim() != 1 or token_ids.dtype.is_floating_point or token_ids.dtype == torch.bool:
            raise TypeError(f"token_ids must be a 1-D integer tensor, got {tuple(token_ids.shape)} {token_ids.dtype}")
        token_ids = token_ids.tolist()
    ids = [int(t) for t in token_ids]
    if not ids:
        raise ValueError("token_ids is empty: ask for at least one token")
    bad = [t for t in ids if not 0 <= t < V]
    if bad:
        raise ValueError(f"token_ids {bad} are outside the vocabulary [0, {V})")
    for name, t in (("lm_head_weight", lm_head_weight), ("lm_head_bias", lm_head_bias)):
        if t is not None and t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but hidden is on {hidden.device}")
    return ids


def _probs_tiles(hidden: torch.Tensor, lm_head_weight: torch.Tensor) -> _ProbsTiles:
    """The tiles of a launch: the native 16-bit dot when both operands are fp16, or both bf16 on a GPU (the
    interpreter's bf16 dot is wrong, so there bf16 is multiplied in fp32); the fp32 dot otherwise."""
    dtype = hidden.dtype
    native = lm_head_weight.dtype == dtype and (
        dtype == torch.float16 or (dtype == torch.bfloat16 and not _interpreted(hidden))
    )
    return _PROBS_TILES_NATIVE if native else _PROBS_TILES_FP32


def _vocab_splits(S: int, V: int, tiles: _ProbsTiles) -> tuple[int, int]:
    """(splits, ids per split) of the vocabulary: enough programs to fill the GPU, whole tiles per split."""
    row_blocks = triton.cdiv(S, tiles.block_s)
    v_tiles = triton.cdiv(V, tiles.block_v)
    splits = max(1, min(v_tiles, triton.cdiv(_TARGET_PROGRAMS, row_blocks)))
    # Whole tiles per split, so no tile straddles two splits; recount so that no split is empty.
    v_per_split = triton.cdiv(v_tiles, splits) * tiles.block_v
    return triton.cdiv(V, v_per_split), v_per_split


def step_token_probs(
    hidden: torch.Tensor,
    step_pos: torch.Tensor,
    lm_head_weight: torch.Tensor,
    token_ids: Sequence[int] | torch.Tensor,
    *,
    lm_head_bias: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Probabilities of given token ids under the softmax over the whole vocabulary, at the step positions only.

    ``out[i, k] = softmax(hidden[step_pos[i]] @ lm_head_weight.T + lm_head_bias)[token_ids[k]]``, in fp32. This is
    PRMBench's RLHFlow rule (P("+") over the full vocabulary). The Triton backend streams the LM head in vocabulary
    tiles with an online log-sum-exp, holding no (S, V) buffer, and returns exp(logit_k - lse); the torch reference
    builds the (S, V) fp32 logits of the step rows (never the (T, V) logits), converting the LM head to fp32 a slice
    of rows at a time (never the whole head).

    Args:
        hidden: (T, H), any float dtype, any strides. Final hidden states of the packed batch.
        step_pos: (S,), int64. Global token indices of the step positions, each in [0, T) (not checked).
        lm_head_weight: (V, H), any float dtype (may differ from hidden's). The LM head.
        token_ids: K >= 1 token ids in [0, V): a sequence of ints (preferred: no device sync) or a 1-D integer tensor.
        lm_head_bias: (V,), any float dtype, or None. LM-head bias.
        backend: "auto" (Triton for CUDA tensors, torch otherwise), "triton" or "torch".

    Returns:
        (S, K), float32. Probabilities, not renormalised over the K ids; an id may repeat.
    """
    ids = _check_step_token_probs_args(hidden, step_pos, lm_head_weight, token_ids, lm_head_bias)
    if not _check_backend(backend, hidden, step_pos, lm_head_weight):
        return step_token_probs_reference(hidden, step_pos, lm_head_weight, ids, lm_head_bias=lm_head_bias)

    step_pos = step_pos.contiguous()  # the kernel reads it with unit stride
    S, H = step_pos.shape[0], hidden.shape[1]
    V, K = lm_head_weight.shape[0], len(ids)
    if S == 0:
        return torch.empty((0, K), dtype=torch.float32, device=hidden.device)
    tiles = _probs_tiles(hidden, lm_head_weight)
    splits, v_per_split = _vocab_splits(S, V, tiles)
    tokens = torch.tensor(ids, dtype=torch.int64, device=hidden.device)
    lse_part = torch.empty((splits, S), dtype=torch.float32, device=hidden.device)
    target_part = torch.empty((splits, S, K), dtype=torch.float32, device=hidden.device)
    grid = (triton.cdiv(S, tiles.block_s), splits)
    with _launch_device(hidden):
        _step_vocab_lse_kernel[grid](
            hidden,
            step_pos,
            lm_head_weight,
            lm_head_bias if lm_head_bias is not None else lm_head_weight,  # never read when HAS_BIAS is False
            tokens,
            lse_part,
            target_part,
            S,
            H,
            V,
            v_per_split,
            hidden.stride(0),
            hidden.stride(1),
            lm_head_weight.stride(0),
            lm_head_weight.stride(1),
            lse_part.stride(0),
            target_part.stride(0),
            target_part.stride(1),
            K=K,
            HAS_BIAS=lm_head_bias is not None,
            DOT_FP32=tiles is _PROBS_TILES_FP32,
            BLOCK_S=tiles.block_s,
            BLOCK_V=tiles.block_v,
            BLOCK_H=max(_PROBS_MIN_BLOCK, min(tiles.max_block_h, triton.next_power_of_2(H))),
            BLOCK_K=triton.next_power_of_2(K),
            num_warps=tiles.num_warps,
            num_stages=tiles.num_stages,
        )
    # Merging splits costs O(splits * S * K), negligible next to the O(S * V * H) kernel; each requested logit is
    # nonzero in exactly one split, so the sum is exact.
    lse = torch.logsumexp(lse_part, dim=0)
    return torch.exp(target_part.sum(0) - lse[:, None])
