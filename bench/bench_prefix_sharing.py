"""Prefix sharing: how many tokens it saves on the whole benchmark, and what it buys end to end with SmolLM2.

(a) Whole benchmark, SmolLM2's tokenizer, the ``lm_judge`` encoding, official truncation (2048): tokens in total vs
    the distinct prefix-tree tokens that sharing computes (no model runs).
(b) Reading rewards on complete problem groups (``limit_per_class=N``; the script checks that every chosen problem
    comes with all its variants) with SmolLM2-135M-Instruct: the unshared pipeline (``pack_batches`` +
    ``backbone_hidden_states`` + ``LMJudge.step_scores``) vs ``shared_step_hidden`` + ``LMJudge.step_scores``.
    Tokens computed, tokens/s (of the samples' tokens), wall time (best of
    ``--repeats`` alternating runs), the speed-up and the largest reward difference.

Usage: python bench/bench_prefix_sharing.py [--data PATH] [--limit-per-class N] [--batch-tokens T] [--skip-full]
"""

from __future__ import annotations

import argparse
import collections
import pathlib
import sys
import time

import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from common import environment_line  # noqa: E402

from prmbench_fast import load_prmbench  # noqa: E402
from prmbench_fast.families.lm_judge import LMJudge  # noqa: E402
from prmbench_fast.models import cache_root, load_default_model  # noqa: E402
from prmbench_fast.packing import TokenizedSample, backbone_hidden_states, pack_batches  # noqa: E402
from prmbench_fast.prefix_sharing import prefix_tree_tokens, shared_step_hidden  # noqa: E402
from prmbench_fast.token_cache import encode_dataset  # noqa: E402

MAX_LENGTH = 2048
DEFAULT_DATA = REPO.parent / "shared" / "prmbench" / "prmbench_preview.jsonl"


def tokenized(family, dataset, cache_dir) -> list[TokenizedSample]:
    encoded = encode_dataset(family, dataset, range(len(dataset)), cache_dir=cache_dir)
    return [TokenizedSample(e.input_ids, e.reward_pos, key=p) for p, e in enumerate(encoded)]


def unshared(model, family, samples, batch_tokens):
    """The score() pipeline without sharing: per-sample rewards keyed by sample key."""
    rewards = {}
    for batch in pack_batches(samples, max_length=MAX_LENGTH, batch_tokens=batch_tokens):
        hidden = backbone_hidden_states(model, batch)
        scores = family.step_scores(model, hidden, batch.step_pos)["validity"]
        bounds = batch.cu_steps.tolist()
        for b, key in enumerate(batch.sample_keys):
            rewards[key] = scores[bounds[b]:bounds[b + 1]]
    return rewards, sum(len(s.input_ids[:MAX_LENGTH]) for s in samples)


def shared(model, family, samples, batch_tokens):
    rows = shared_step_hidden(model, samples, max_length=MAX_LENGTH, batch_tokens=batch_tokens)
    scores = family.step_scores(model, rows.hidden, rows.step_pos)["validity"]
    bounds = rows.cu_steps.tolist()
    rewards = {key: scores[bounds[b]:bounds[b + 1]] for b, key in enumerate(rows.sample_keys)}
    return rewards, rows.stats.tokens_computed


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def complete_groups(full, subset) -> tuple[int, int]:
    """(problems in the subset, problems whose every variant in the full data is in the subset)."""
    everywhere = collections.Counter(s.source_idx for s in full)
    chosen = collections.Counter(s.source_idx for s in subset)
    return len(chosen), sum(1 for idx, n in chosen.items() if n == everywhere[idx])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--limit-per-class", type=int, default=2)
    parser.add_argument("--batch-tokens", type=int, default=16384)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per provider (best kept)")
    parser.add_argument("--skip-full", action="store_true", help="skip (a), the whole-benchmark token count")
    args = parser.parse_args()
    torch.manual_seed(0)

    model, tokenizer = load_default_model()
    family = LMJudge(tokenizer)
    cache_dir = cache_root() / "bench-token-cache"
    full = load_prmbench(args.data)
    rows = []

    if not args.skip_full:
        all_samples = tokenized(family, full, cache_dir)
        (total, tree), seconds = timed(lambda: prefix_tree_tokens(all_samples, max_length=MAX_LENGTH))
        rows.append(f"| (a) whole benchmark, {len(full)} samples: tokens (after truncation) | {total:,} |")
        rows.append(f"| (a) distinct prefix-tree tokens (computed with sharing) | {tree:,} |")
        rows.append(f"| (a) ratio total / computed | {total / tree:.3f}x |")
        rows.append(f"| (a) prefix-tree count time (encoding cached) | {seconds:.1f} s |")

    subset = full.subset(limit_per_class=args.limit_per_class)
    problems, complete = complete_groups(full, subset)
    samples = tokenized(family, subset, cache_dir)
    with torch.inference_mode():
        # Warm-up of both paths (allocator, kernels for new shapes), then alternate the providers and keep each
        # one's best wall time: the machine is shared, and other jobs come and go during a run.
        unshared(model, family, samples[:2], args.batch_tokens)
        shared(model, family, samples[:2], args.batch_tokens)
        t_plain = t_shared = float("inf")
        for _ in range(args.repeats):
            (ref, tok_plain), seconds = timed(lambda: unshared(model, family, samples, args.batch_tokens))
            t_plain = min(t_plain, seconds)
            (got, tok_shared), seconds = timed(lambda: shared(model, family, samples, args.batch_tokens))
            t_shared = min(t_shared, seconds)
    diff = max(((got[k] - ref[k]).abs().max().item() for k in ref if ref[k].numel()), default=0.0)
    total = tok_plain
    rows.append(
        f"| (b) limit_per_class={args.limit_per_class}: {len(subset)} samples, {problems} problems "
        f"({complete} complete groups), {sum(r.numel() for r in ref.values())} rewards | |"
    )
    rows.append(f"| (b) unshared: tokens computed / wall / tokens/s | {tok_plain:,} / {t_plain:.2f} s / "
                f"{total / t_plain:,.0f} |")
    rows.append(f"| (b) shared: tokens computed / wall / tokens/s (samples' tokens) | {tok_shared:,} / "
                f"{t_shared:.2f} s / {total / t_shared:,.0f} |")
    rows.append(f"| (b) token ratio / wall-time speed-up | {tok_plain / tok_shared:.3f}x / {t_plain / t_shared:.3f}x |")
    rows.append(f"| (b) max abs reward difference | {diff:.2e} |")

    print(environment_line())
    print(f"model: SmolLM2-135M-Instruct fp32, family lm_judge, max_length {MAX_LENGTH}, "
          f"batch_tokens {args.batch_tokens}")
    print("| measure | value |")
    print("|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
