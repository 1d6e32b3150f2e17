"""Reward step of LM-head PRMs: the official full-logits way against step_rewards / step_token_probs.

For each vocabulary size, one packed batch of T tokens with S step positions, and two reward rules:

- pair rule (math-shepherd, RLHFlow's own code): softmax over the logits of two tokens ("+", "-"), P("+").
  official: (T, V) logits for every token, keep the 2 columns, softmax, mask to the step positions.
  ours:     step_rewards on the 2 LM-head rows (gather S rows, (S, H) @ (H, 2), softmax).
- full-vocabulary rule (PRMBench's RLHFlow adapter): P("+") under the softmax over the whole vocabulary.
  official: (T, V) logits, softmax over V, pick "+" at the step positions.
  ours:     step_token_probs (logits at the S step rows only).

This machine has no GPU, so ``backend="auto"`` runs the torch path of our ops, and that is what is measured; the Triton
kernels' own allocations (GPU) are given analytically below the table.

Step count: the default S is the realistic PRMBench density, not a fixed fraction. The benchmark has 13.43 steps per
sample on average (6,216 rows of prmbench_preview.jsonl) and about 520 tokens per sample with a "question + Step i: ...
tag" template (TOOLCHAIN.md), i.e. 2.6 % of tokens, ~106 steps per 4,096 tokens. Pass --steps to change it (e.g.
--steps 532 for 13 %).

Memory: each (V, provider) runs in a fresh subprocess that builds the inputs, warms the ops up on tiny shapes, records
ru_maxrss (the process's RSS high-water mark), runs the reward step once and records ru_maxrss again: the difference is
the step's peak extra resident memory (inputs are built in place so they leave no higher transient). torch's CPU
allocator returns large blocks to the OS on free, so this sees the real peak of big buffers; below ~1 MB it is at the
allocator's and page granularity and is shown as such. The "allocated" column is the analytic sum of the tensors the
path creates at its peak.

Time: median (and min) of at least --repeats runs after the peak-memory run (more for fast steps); ratios use medians.
The header records the load average: on a shared, oversubscribed machine a 2-thread OpenMP region can wait a scheduler
slice for its second thread, which inflates sub-millisecond medians by tens of ms (the min shows the unperturbed cost).

Usage: .venv/bin/python bench/bench_step_reward.py [--vocab 32000 152064] [--hidden 1024] [--tokens 4096] [--steps N]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

#: Mean steps per PRMBench sample and tokens per sample (see the module docstring).
STEPS_PER_SAMPLE = 13.43
TOKENS_PER_SAMPLE = 520
PROVIDERS = ("official_pair", "step_rewards", "official_full_vocab", "step_token_probs")
RULE = {
    "official_pair": "pair",
    "step_rewards": "pair",
    "official_full_vocab": "full vocab",
    "step_token_probs": "full vocab",
}
OFFICIAL = {"step_rewards": "official_pair", "step_token_probs": "official_full_vocab"}
PLUS, MINUS = 10, 12  # any two ids: the cost does not depend on which


def _parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab", type=int, nargs="+", default=[32_000, 152_064])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--steps", type=int, default=None, help="step positions S (default: PRMBench density, see above)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: one measurement, JSON spec
    return p.parse_args(argv)


def _analytic_bytes(provider, T, S, H, V, elem):
    """Bytes of the tensors the measured (torch) path holds at its peak, besides inputs and the (S,) result."""
    if provider == "official_pair":
        return T * V * elem + 2 * (T * 2 * elem)  # logits, their 2 columns, softmax of those
    if provider == "official_full_vocab":
        return 2 * T * V * elem  # logits and their softmax
    gathered = S * H * elem + (S * H * 4 if elem != 4 else 0)  # hidden[step_pos], then its fp32 copy
    if provider == "step_rewards":
        return gathered + 2 * S * 2 * 4  # (S, 2) logits and softmax
    return gathered + 2 * S * V * 4  # (S, V) logits and their log_softmax


def _triton_bytes(provider, S, V, dtype):
    """Bytes the Triton kernels allocate on a GPU: outputs and split buffers only, nothing (S, H) or (S, V)."""
    if provider == "step_rewards":
        return S * 2 * 4
    from prmbench_fast.kernels import step_reward as sr

    tiles = sr._PROBS_TILES_FP32 if dtype == "float32" else sr._PROBS_TILES_NATIVE  # as on a GPU
    splits, _ = sr._vocab_splits(S, V, tiles)
    return splits * S * 2 * 4 + 2 * S * 4  # per-split lse and target logit, merged lse and result (K = 1)


def _child(spec):
    """Measure one provider in this (fresh) process and print a JSON result."""
    import torch

    from prmbench_fast.kernels.step_reward import step_rewards, step_token_probs

    torch.set_num_threads(spec["threads"])
    dtype = getattr(torch, spec["dtype"])
    T, S, H, V = spec["T"], spec["S"], spec["H"], spec["V"]
    g = torch.Generator().manual_seed(0)
    # In place, so building the inputs leaves no transient above the baseline high-water mark.
    hidden = torch.randn(T, H, generator=g, dtype=dtype)
    lm_w = torch.randn(V, H, generator=g, dtype=dtype).div_(H**0.5)
    # Evenly spread step positions, the last one at the last token.
    step_pos = torch.linspace(T - 1, 0, S).round().long().flip(0)
    is_step = torch.zeros(T, dtype=torch.bool)
    is_step[step_pos] = True
    pair_head = lm_w[[PLUS, MINUS]].clone()  # taken once when the model is loaded, not per batch

    def run(hidden, lm_w, pair_head, step_pos, is_step):
        provider = spec["provider"]
        if provider == "official_pair":
            logits = hidden @ lm_w.T
            return logits[:, [PLUS, MINUS]].softmax(-1)[:, 0][is_step]
        if provider == "official_full_vocab":
            logits = hidden @ lm_w.T
            return logits.softmax(-1)[:, PLUS][is_step]
        if provider == "step_rewards":
            return step_rewards(hidden, step_pos, pair_head, activation="softmax")[:, 0]
        return step_token_probs(hidden, step_pos, lm_w, [PLUS])[:, 0]

    # Warm-up on tiny shapes: library initialisation and first-call allocations are not the reward step's.
    small = (hidden[:8], lm_w[:64], pair_head, torch.tensor([0, 7]), is_step[:8] | True)
    run(*small)

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    result = run(hidden, lm_w, pair_head, step_pos, is_step)
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert result.shape == (S,)

    # At least --repeats runs; sub-millisecond steps get more (up to ~1 s or 1,000 runs) so that the median is not
    # one scheduler hiccup on a shared machine.
    times = []
    while len(times) < spec["repeats"] or (sum(times) < 1.0 and len(times) < 1000):
        t0 = time.perf_counter()
        run(hidden, lm_w, pair_head, step_pos, is_step)
        times.append(time.perf_counter() - t0)
    print(
        json.dumps(
            {
                "seconds": statistics.median(times),
                "min_seconds": min(times),
                "rss_peak_bytes": (rss_after - rss_before) * 1024,
            }
        )
    )


def _mb(n):
    return f"{n / 2**20:,.1f}"


def main(argv=None):
    args = _parse_args(argv)
    if args.child is not None:
        _child(json.loads(args.child))
        return

    import torch
    from common import environment_line

    T, H = args.tokens, args.hidden
    S = args.steps if args.steps is not None else round(T * STEPS_PER_SAMPLE / TOKENS_PER_SAMPLE)
    elem = torch.empty(0, dtype=getattr(torch, args.dtype)).element_size()
    print(f"# step-reward bench (CPU, {args.threads} threads; backend='auto' = torch path) | {environment_line()}")
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"# T={T} tokens, S={S} steps ({100 * S / T:.1f} %), H={H}, dtype={args.dtype}, "
        f">= {args.repeats} repeats, load average {load} on {os.cpu_count()} cores"
    )
    print(
        "| V | rule | provider | median ms | min ms | RSS peak +MB | allocated MB | time x less | RSS x less "
        "| allocated x less |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    footer = []
    for V in args.vocab:
        results = {}
        for provider in PROVIDERS:
            spec = dict(
                provider=provider, T=T, S=S, H=H, V=V, dtype=args.dtype, repeats=args.repeats, threads=args.threads
            )
            out = subprocess.run(
                [sys.executable, __file__, "--child", json.dumps(spec)], check=True, capture_output=True, text=True
            )
            res = json.loads(out.stdout.strip().splitlines()[-1])
            res["allocated"] = _analytic_bytes(provider, T, S, H, V, elem)
            results[provider] = res
            ratios = ["", "", ""]
            if provider in OFFICIAL:
                base = results[OFFICIAL[provider]]
                rss = res["rss_peak_bytes"]
                ratios = [
                    f"{base['seconds'] / res['seconds']:,.0f}",
                    f"{base['rss_peak_bytes'] / rss:,.0f}" if rss >= 2**20 else "n/a (< 1 MB: below RSS resolution)",
                    f"{base['allocated'] / res['allocated']:,.0f}",
                ]
                triton_bytes = _triton_bytes(provider, S, V, args.dtype)
                target = f" (target: at least V/C = {V // 2:,}x)" if provider == "step_rewards" else ""
                footer.append(
                    f"# V={V:,} {provider}: on a GPU the Triton kernel allocates {triton_bytes:,} bytes, "
                    f"{base['allocated'] / triton_bytes:,.0f}x less than the official way{target}"
                )
            print(
                f"| {V:,} | {RULE[provider]} | {provider} | {1e3 * res['seconds']:,.2f} "
                f"| {1e3 * res['min_seconds']:,.2f} | {_mb(res['rss_peak_bytes'])} | {_mb(res['allocated'])} | "
                + " | ".join(ratios)
                + " |",
                flush=True,
            )
    print("\n".join(footer))


if __name__ == "__main__":
    main()
