"""End-to-end benchmark of score() against an official-style evaluation loop, on the same samples, in one run.

Official style (what the PRMBench toolkit does): samples in data order, batches of 2 with right padding, the full
causal-LM forward with logits over the whole vocabulary for every token, the reward read from those logits at the
reward positions, labels and the evaluator in Python loops. score(): packed variable-length batches, the backbone
only, rewards from the hidden states at the reward positions, the compiled counting op. Also timed: a backbone-only
forward over the same packed batches, the floor for score() without prefix sharing on this machine (sharing
computes fewer tokens, so it can beat it).

Models: the embedded default SmolLM2-135M-Instruct as ``lm_judge``, and a tiny random Llama with the same family.
Prints one table with tokens/s, the ratios and whether the PRMScores are identical.
Usage: python bench/bench_score.py [--data PATH] [--limit-per-class N] [--skip-smollm2]
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from common import environment_line  # noqa: E402
from prmbench_fast.testing.official_oracle import evaluate_official  # noqa: E402
from prmbench_fast.testing.tiny_models import tiny_llama, train_tokenizer  # noqa: E402

from prmbench_fast import load_prmbench  # noqa: E402
from prmbench_fast.families.lm_judge import LMJudge  # noqa: E402
from prmbench_fast.ratios import leaderboard_table  # noqa: E402
from prmbench_fast.packing import backbone_hidden_states  # noqa: E402
from prmbench_fast import score  # noqa: E402
from prmbench_fast.token_cache import packed_batches  # noqa: E402

MAX_LENGTH = 2048


def official_style(model, tokenizer, dataset, family: LMJudge, batch_size: int = 2):
    """Right-padded batches of 2 in data order, full logits, rewards and labels in Python, the official evaluator."""
    results, tokens = official_style_results(model, tokenizer, dataset, family, batch_size)
    oracle_samples = [{"idx": s.id, "steps": list(s.steps), "error_steps": list(s.error_steps),
                       "classification": s.classification} for s in dataset]
    official, _ = evaluate_official(results, oracle_samples)
    return official, tokens


def official_style_results(model, tokenizer, dataset, family: LMJudge, batch_size: int = 2):
    """The official loop's per-sample result dicts (rewards from full logits, labels ``> 0.5``) and its token count.
    The batches go to the model's device, as the official adapters move theirs."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    plus, minus = family.verdict_ids
    device = next(model.parameters()).device
    results, tokens = [], 0
    samples = list(dataset)
    with torch.no_grad():
        for start in range(0, len(samples), batch_size):
            chunk = samples[start:start + batch_size]
            encoded = [family.encode(s) for s in chunk]
            ids = [e.input_ids[:MAX_LENGTH] for e in encoded]
            width = max(len(i) for i in ids)
            input_ids = torch.tensor([i + [pad] * (width - len(i)) for i in ids], device=device)
            mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i in ids], device=device)
            logits = model(input_ids=input_ids, attention_mask=mask).logits  # (2, width, V): every token, every word
            probs = logits[..., [plus, minus]].softmax(-1)[..., 0]
            for sample, e, row in zip(chunk, encoded, probs):
                rewards = [row[p].item() for p in e.reward_pos if p < MAX_LENGTH]
                results.append({"idx": sample.id, "scores": {
                    "step_level_validity_scores": rewards,
                    "step_level_validity_labels": [r > 0.5 for r in rewards],
                }})
            tokens += sum(len(i) for i in ids)
    return results, tokens


def backbone_only(model, family, dataset, batch_tokens):
    batches = packed_batches(family, dataset, range(len(dataset)), max_length=MAX_LENGTH, batch_tokens=batch_tokens)
    with torch.inference_mode():
        for batch in batches:
            backbone_hidden_states(model, batch)


def timed(fn, repeats):
    """(value, best wall time over ``repeats`` runs): the shared cores here make single runs swing by 2x or more."""
    best, value = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - start)
    return value, best


def tiny_model(dataset):
    """The tiny random Llama (hidden 256, 4 layers) with a tokenizer trained on ``dataset``'s texts and the lm_judge
    verdict tokens. Returns (model, tokenizer)."""
    texts = [s.question for s in dataset] + [t for s in dataset for t in s.steps]
    tok = train_tokenizer(texts + ["Verdict: + -"])
    return tiny_llama(len(tok), hidden=256, layers=4), tok


def compare(label, model, tokenizer, dataset, batch_tokens, repeats):
    family = LMJudge(tokenizer)
    # The first score() call also tokenizes and packs; later calls (a training loop's) reuse the cached batches.
    report, t_score = timed(lambda: score(model, dataset, tokenizer=tokenizer, family="lm_judge", progress=False,
                                         batch_tokens=batch_tokens), repeats)
    unshared, t_unshared = timed(lambda: score(model, dataset, tokenizer=tokenizer, family="lm_judge", progress=False,
                                               batch_tokens=batch_tokens, share_prefixes=False), repeats)
    (official, tokens), t_official = timed(lambda: official_style(model, tokenizer, dataset, family), repeats)
    _, t_backbone = timed(lambda: backbone_only(model, family, dataset, batch_tokens), repeats)
    ours, theirs = report.table["Overall"], leaderboard_table(official)["Overall"]
    return [
        (label, "official style (pad 2, full logits)", tokens, t_official, t_official, theirs),
        (label, "score() (prefix sharing, default)", report.run["tokens"], t_score, t_official, ours),
        (label, "score(share_prefixes=False)", unshared.run["tokens"], t_unshared, t_official,
         unshared.table["Overall"]),
        (label, "backbone-only forward (floor)", report.run["tokens"], t_backbone, t_official, None),
    ], ours == theirs == unshared.table["Overall"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "prmbench" / "prmbench_preview.jsonl"))
    parser.add_argument("--limit-per-class", type=int, default=2)
    parser.add_argument("--batch-tokens", type=int, default=8192)
    parser.add_argument("--skip-smollm2", action="store_true")
    parser.add_argument("--repeats", type=int, default=2, help="runs per provider; the best time is reported")
    args = parser.parse_args()

    dataset = load_prmbench(args.data, limit_per_class=args.limit_per_class)
    rows, identical = [], {}
    tiny, tok = tiny_model(dataset)
    tiny_rows, identical["tiny Llama"] = compare("tiny Llama", tiny, tok, dataset, args.batch_tokens, args.repeats)
    rows += tiny_rows
    if not args.skip_smollm2:
        from prmbench_fast.models import load_default_model

        model, tokenizer = load_default_model()
        smol_rows, identical["SmolLM2-135M"] = compare("SmolLM2-135M", model, tokenizer, dataset, args.batch_tokens, args.repeats)
        rows += smol_rows

    print(environment_line())
    print(f"{len(dataset)} PRMBench samples ({args.limit_per_class} per class + partners), lm_judge family, fp32, "
          f"best of {args.repeats} runs\n")
    print(f"{'model':<14}{'provider':<38}{'tokens':>8}{'time (s)':>10}{'tokens/s':>10}{'speed-up':>10}{'PRMScore':>10}")
    for model_name, provider, tokens, seconds, baseline, prm in rows:
        prm_text = "" if prm is None else f"{prm:.4f}"
        print(f"{model_name:<14}{provider:<38}{tokens:>8}{seconds:>10.2f}{tokens / seconds:>10.0f}"
              f"{baseline / seconds:>9.2f}x{prm_text:>10}")
    for model_name, same in identical.items():
        print(f"{model_name}: PRMScore of score() and the official-style loop {'identical' if same else 'DIFFERENT'}")


if __name__ == "__main__":
    main()
