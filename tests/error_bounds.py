"""Rounding-error bounds of the step-reward ops that hold for ANY summation order (STYLE.md practice 2).

A kernel and torch may sum the H products of a logit (and the V terms of a log-sum-exp) in different orders, so
"error <= 2 x torch's error" can fail for a correct kernel when torch's order happens to be lucky. These bounds
compare each result with a float64 computation on the same (exactly converted) inputs instead.

Dot products: for n products and n - 1 additions in floating point with unit roundoff u, in any order and with or
without fused multiply-adds, |fl(a . b) - a . b| <= gamma_n * sum |a_i b_i|, gamma_n = n u / (1 - n u) (Higham,
"Accuracy and Stability of Numerical Algorithms", 2nd ed., eq. (3.5)); a bias is one more term. u = 2**-24 for fp32
rounding to nearest. The tensor cores' fp32 accumulation of fp16/bf16 products truncates instead of rounding, and
aligns a block of products to the largest exponent before adding (Fasi, Higham, Mikaitis, Pranesh, "Numerical
behavior of NVIDIA tensor cores", PeerJ CS 2021): 2**-23 (chopping) doubled for the alignment, 2**-22, bounds that.
Sums of positive terms (the exponentials of a log-sum-exp) obey the same bound with gamma_{n-1}.

Elementary functions: the GPU kernels use ``ex2.approx`` and ``div.full`` (at most 2 ulps each, PTX ISA), torch
correctly rounded or 1-ulp ones; :data:`EXP_ERROR` and :data:`DIV_ERROR` take 4 ulps (2**-21) and 2 ulps (2**-22)
of relative error, plus the rounding of the exponent's argument (|x| u per rounding of x). Results below fp32's
smallest normal number may be flushed to zero on the GPU (``.ftz``) or be denormal (fewer significant bits), so every
bound has an absolute floor of :data:`TINY`.

Error propagation, exact: a logit error of at most d moves sigmoid(z) by a factor within exp(+-d), and a softmax
probability by a factor within exp(+-(d_i + max_j d_j)).
"""

from __future__ import annotations

import math

import torch

U_FP32 = 2.0**-24
U_TENSOR_CORE = 2.0**-22
EXP_ERROR = 2.0**-21
DIV_ERROR = 2.0**-22
TINY = torch.finfo(torch.float32).tiny


def gamma(n: int, u: float) -> float:
    """gamma_n = n u / (1 - n u)."""
    if n * u >= 1:
        raise ValueError(f"gamma_{n} is unbounded for u = {u}")
    return n * u / (1 - n * u)


def _compound(*relative: torch.Tensor | float) -> torch.Tensor | float:
    """(1 + a)(1 + b)... - 1: relative errors of successive operations, second-order terms included."""
    total = 1.0
    for r in relative:
        total = total * (1 + r)
    return total - 1


def logits_and_bound(hidden, step_pos, weight, bias, u: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact logits (S, C) in float64 of ``hidden[step_pos] @ weight.T + bias``, and the any-order bound on an
    accumulation with unit roundoff ``u`` of the same inputs (converted exactly to fp32 or wider). Computed on the
    inputs' device (a GPU's float64 matmul is fast), returned on the CPU."""
    rows = hidden.double()[step_pos]
    w = weight.double()
    logits = (rows @ w.T).cpu()
    magnitude = (rows.abs() @ w.abs().T).cpu()
    if bias is not None:
        logits = logits + bias.double().cpu()
        magnitude = magnitude + bias.double().cpu().abs()
    return logits, gamma(rows.shape[1] + (bias is not None), u) * magnitude


def step_rewards_bound(hidden, step_pos, weight, bias, activation: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(exact (S, C) float64, bound (S, C)) for ``step_rewards`` / ``step_rewards_reference``: an fp32 dot (both
    multiply in fp32, rounding to nearest), then the activation in fp32."""
    z, dz = logits_and_bound(hidden, step_pos, weight, bias, U_FP32)
    if activation == "none":
        return z, dz + TINY
    if activation == "sigmoid":
        exact = torch.sigmoid(z)
        # exp(-z) with z's rounding in its argument (scaled by log2(e) on the GPU: 2 roundings), 1 + e, one division.
        evaluation = _compound(2 * (z.abs() + dz) * U_FP32 + EXP_ERROR, U_FP32, DIV_ERROR)
        return exact, exact * _compound(torch.expm1(dz), evaluation) + TINY
    exact = torch.softmax(z, dim=-1)
    # exp(z_i - m): the subtraction and the log2(e) scaling round the argument; C - 1 additions; one division.
    spread = (z - z.max(-1, keepdim=True).values).abs() + 2 * dz.max(-1, keepdim=True).values
    term = 2 * spread * U_FP32 + EXP_ERROR
    evaluation = _compound(term, term.max(-1, keepdim=True).values, gamma(max(z.shape[1] - 1, 1), U_FP32), DIV_ERROR)
    propagated = torch.expm1(dz + dz.max(-1, keepdim=True).values)
    return exact, exact * _compound(propagated, evaluation) + TINY


def step_token_probs_bound(
    hidden, step_pos, lm_head_weight, lm_head_bias, token_ids, *, u: float, rescales: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(exact (S, K) float64, bound (S, K)) for ``exp(z_k - logsumexp(z))`` with logits accumulated with unit
    roundoff ``u`` and a log-sum-exp computed with at most ``rescales`` rescalings of a running sum by
    exp(m_old - m_new) (the online algorithm's tiles in one program, plus the merge of the splits; 0 for torch).

    The sum of the V exponentials carries gamma_{V-1} (any order) and each term's own exp error; log and the
    additions around it round lse (|lse| + log V) u a few times; exp(z_k - lse) rounds its argument once."""
    z, dz = logits_and_bound(hidden, step_pos, lm_head_weight, lm_head_bias, u)
    V = z.shape[1]
    m = z.max(-1, keepdim=True).values
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    max_dz = dz.max(-1, keepdim=True).values
    spread = (z - m).abs().max(-1, keepdim=True).values + 2 * max_dz
    term = 2 * spread * U_FP32 + EXP_ERROR
    sum_error = _compound(gamma(max(V - 1, 1), U_FP32), term, *([term] * rescales))
    lse_error = -torch.log1p(-sum_error) + 4 * (lse.abs() + math.log(V)) * U_FP32
    cols = torch.tensor(list(token_ids))
    zk, dzk = z[:, cols], dz[:, cols]
    exact = torch.exp(zk - lse)
    argument = dzk + max_dz + lse_error + 2 * (zk - lse).abs() * U_FP32
    return exact, exact * _compound(torch.expm1(argument), EXP_ERROR) + TINY


def assert_within(out: torch.Tensor, exact: torch.Tensor, bound: torch.Tensor, what: str = "") -> None:
    """Elementwise |out - exact| <= bound, every value finite; the message names the worst element."""
    out = out.double().cpu()
    assert torch.isfinite(out).all(), f"{what}: non-finite values"
    excess = (out - exact).abs() / bound
    worst = int(excess.argmax())
    assert excess.max() <= 1, (
        f"{what}: |error| {(out - exact).abs().flatten()[worst]:.3g} > bound {bound.flatten()[worst]:.3g} at flat index "
        f"{worst} (value {out.flatten()[worst]:.9g}, exact {exact.flatten()[worst]:.9g})"
    )
