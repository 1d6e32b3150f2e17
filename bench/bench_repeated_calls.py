"""Repeated score() calls on the same live model and dataset: what a call costs beyond the backbone's forward passes.

A training loop calls score() again and again on one model and one subset. After the first call (which tokenizes and
packs), a call should cost little more than its forward passes; the target is an overhead of at most 5 % of the call.
For each model and mode (prefix sharing on, the default; and off), after one warm-up call, each of ``--calls`` calls
is timed, and inside it the backbone's forward passes: hooks on ``model.base_model`` sum the wall time of every
forward the call runs (the same batches, by construction). Overhead = call - forwards. With sharing off the forwards
are also timed alone, outside score(), over the same packed batches (``bench_score.backbone_only``) as a check.

Models and data as ``bench/bench_score.py``: the tiny random Llama and SmolLM2-135M-Instruct, both as ``lm_judge``,
on the stratified subset (``--limit-per-class 2``: 20 samples). Medians over the calls (the cores here are shared).
``--profile`` adds a cProfile of one repeated call per model and mode, top functions by own time.
Usage: python bench/bench_repeated_calls.py [--data PATH] [--limit-per-class N] [--calls N] [--skip-smollm2] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pathlib
import pstats
import statistics
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from bench_score import backbone_only, tiny_model, timed  # noqa: E402
from common import environment_line  # noqa: E402

from prmbench_fast import load_prmbench, score  # noqa: E402
from prmbench_fast.families.lm_judge import LMJudge  # noqa: E402

TARGET = 0.05  # overhead as a share of the call


class ForwardTimer:
    """Sums the wall time of every forward of ``module`` between ``reset()`` and reading ``seconds``."""

    def __init__(self, module: torch.nn.Module, device: torch.device):
        self.seconds = 0.0
        self._start = 0.0
        # CUDA kernels run asynchronously: without a sync at both ends a forward would look as long as its launches.
        self._sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        module.register_forward_pre_hook(self._enter)
        module.register_forward_hook(self._exit)

    def reset(self) -> None:
        self.seconds = 0.0

    def _enter(self, module, args):
        self._sync()
        self._start = time.perf_counter()

    def _exit(self, module, args, output):
        self._sync()
        self.seconds += time.perf_counter() - self._start


def measure(label, model, tokenizer, dataset, *, share, calls, batch_tokens, profile):
    device = next(model.parameters()).device
    timer = ForwardTimer(model.base_model, device)
    options = dict(tokenizer=tokenizer, family="lm_judge", progress=False, batch_tokens=batch_tokens,
                   share_prefixes=share)

    def call():
        timer.reset()
        start = time.perf_counter()
        report = score(model, dataset, **options)
        return time.perf_counter() - start, timer.seconds, report

    first, _, report = call()  # tokenizes and packs: the cost a training loop pays once
    samples = [call() for _ in range(calls)]
    totals = [total for total, _, _ in samples]
    forwards = [forward for _, forward, _ in samples]
    overheads = [total - forward for total, forward, _ in samples]
    row = {
        "model": label,
        "mode": "prefix sharing" if share else "no sharing",
        "tokens": report.run["tokens_computed"],
        "first": first,
        "call": statistics.median(totals),
        "forwards": statistics.median(forwards),
        "overhead": statistics.median(overheads),
        "share": statistics.median(o / t for o, t in zip(overheads, totals)),
        "forwards_best": min(forwards),
        "alone": None,
    }
    if not share:
        _, row["alone"] = timed(lambda: backbone_only(model, LMJudge(tokenizer), dataset, batch_tokens), calls)
    profile_text = None
    if profile:
        profiler = cProfile.Profile()
        profiler.runcall(score, model, dataset, **options)
        buffer = io.StringIO()
        pstats.Stats(profiler, stream=buffer).sort_stats("tottime").print_stats(25)
        title = f"--- cProfile, {label}, {row['mode']}: one repeated call, top 25 by own time"
        profile_text = f"{title}\n{buffer.getvalue()}"
    return row, profile_text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(pathlib.Path(__file__).resolve().parents[2] / "shared" / "prmbench"
                                              / "prmbench_preview.jsonl"))
    parser.add_argument("--limit-per-class", type=int, default=2)
    parser.add_argument("--batch-tokens", type=int, default=8192)
    parser.add_argument("--calls", type=int, default=5, help="timed calls after the warm-up one (medians reported)")
    parser.add_argument("--skip-smollm2", action="store_true")
    parser.add_argument("--profile", action="store_true", help="cProfile one repeated call per model and mode")
    args = parser.parse_args()

    dataset = load_prmbench(args.data, limit_per_class=args.limit_per_class)
    models = [("tiny Llama", *tiny_model(dataset))]
    if not args.skip_smollm2:
        from prmbench_fast.models import load_default_model

        models.append(("SmolLM2-135M", *load_default_model()))
    rows, profiles = [], []
    for label, model, tokenizer in models:
        for share in (True, False):
            row, profile_text = measure(label, model, tokenizer, dataset, share=share, calls=args.calls,
                                        batch_tokens=args.batch_tokens, profile=args.profile)
            rows.append(row)
            profiles.append(profile_text)

    print(environment_line())
    print(f"{len(dataset)} PRMBench samples ({args.limit_per_class} per class + partners), lm_judge family, fp32; "
          f"medians of {args.calls} repeated calls after a warm-up call; target overhead <= {TARGET:.0%} of the call\n")
    print(f"{'model':<14}{'mode':<16}{'tokens':>8}{'1st call':>10}{'call':>9}{'forwards':>10}{'overhead':>10}"
          f"{'share':>8}{'fwd best':>10}{'alone best':>12}  target")
    for r in rows:
        alone = "" if r["alone"] is None else f"{r['alone']:.3f}"
        print(f"{r['model']:<14}{r['mode']:<16}{r['tokens']:>8}{r['first']:>10.3f}{r['call']:>9.3f}"
              f"{r['forwards']:>10.3f}{r['overhead']:>10.4f}{r['share']:>8.1%}{r['forwards_best']:>10.3f}{alone:>12}  "
              f"{'met' if r['share'] <= TARGET else 'MISSED'}")
    print("(seconds; call, forwards, overhead, share: medians over the calls, each call's overhead against its own "
          "forwards; 'fwd best': the fastest call's forwards; 'alone best': the same packed batches run outside "
          "score(), fastest run)")
    for text in profiles:
        if text is not None:
            print("\n" + text)


if __name__ == "__main__":
    main()
