"""The numbers every stack must reproduce from the pinned development environment (.ci/test-stack runs this):

- ``evaluate()`` of the official Skywork-PRM-7B predictions in examples/ (the first 1,000 samples) on the full
  benchmark: the leaderboard row, which comes from integer counts, must be equal to the last bit;
- ``score()`` of a tiny token-classification PRM (random fp32 weights and a tokenizer trained on the data, saved once
  by the pinned environment as safetensors) on one sample per class: its step scores may differ only by the rounding
  of another torch's CPU kernels (bound below), and every label that rounding cannot flip must be equal.

Usage:
    python .ci/stack_numbers.py model FOLDER DATA          write the tiny PRM (pinned environment, once)
    python .ci/stack_numbers.py compute FOLDER DATA OUT    the numbers of this environment's prmbench_fast
    python .ci/stack_numbers.py compare PINNED STACK       exit 1 unless STACK reproduces PINNED
"""

from __future__ import annotations

import json
import math
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "skywork7b_first1000_predictions.jsonl.gz"
# The tiny PRM is 2 layers of width 64 in fp32 on inputs of at most 256 tokens: each score is a softmax of sums over
# at most a few hundred products, whose reordering between torch releases moves it by a few fp32 ulps (~6e-8 near
# 0.5) per operation; 1e-5 leaves two orders of magnitude for the ~20 such operations along the path and still fails
# on any real change (a different token, mask or head moves a score by 1e-2 or more).
SCORE_TOLERANCE = 1e-5
THRESHOLD = 0.5  # the generic family's official validity threshold


def make_model(folder: str, data: str) -> None:
    from prmbench_fast import load_prmbench
    from prmbench_fast.testing.tiny_models import tiny_llama, train_tokenizer

    subset = load_prmbench(data, limit_per_class=1)
    tokenizer = train_tokenizer([s.question for s in subset] + [step for s in subset for step in s.steps])
    tiny_llama(len(tokenizer), head="token_classification").save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def compute(folder: str, data: str, out: str) -> None:
    import gzip

    import prmbench_fast
    from prmbench_fast import evaluate, load_prmbench, score

    full = load_prmbench(data)
    with gzip.open(EXAMPLE, "rt") as lines:
        predictions = [json.loads(line) for line in lines if line.strip()]
    row = evaluate(full.restrict_to(p["idx"] for p in predictions), predictions).table
    report = score(folder, load_prmbench(data, limit_per_class=1), family="generic", max_length=256, progress=False)
    scores = {sid: r["scores"]["step_level_validity_scores"] for sid, r in report.predictions.items()}
    pathlib.Path(out).write_text(json.dumps({"package": prmbench_fast.__file__, "table": row, "scores": scores}))


def compare(pinned_path: str, stack_path: str) -> None:
    pinned, stack = (json.loads(pathlib.Path(p).read_text()) for p in (pinned_path, stack_path))
    problems = []
    if ROOT in pathlib.Path(stack["package"]).resolve().parents:
        problems.append(f"the stack imported prmbench_fast from the source tree ({stack['package']})")
    if stack["table"] != pinned["table"]:
        differing = {k: (pinned["table"][k], stack["table"].get(k)) for k in pinned["table"]
                     if stack["table"].get(k) != pinned["table"][k]}
        problems.append(f"evaluate() leaderboard row differs (pinned, stack): {differing}")
    if set(stack["scores"]) != set(pinned["scores"]):
        problems.append("score() scored other samples")
    worst, steps, near = 0.0, 0, 0
    for sid, expected in pinned["scores"].items():
        got = stack["scores"].get(sid, [])
        if len(got) != len(expected):
            problems.append(f"score() gave {len(got)} step scores for {sid}, the pinned environment {len(expected)}")
            continue
        for a, b in zip(expected, got):
            steps += 1
            worst = max(worst, abs(a - b)) if math.isfinite(a) and math.isfinite(b) else math.inf
            if min(abs(a - THRESHOLD), abs(b - THRESHOLD)) <= SCORE_TOLERANCE:
                near += 1  # rounding may put it on either side of the threshold
            elif (a > THRESHOLD) != (b > THRESHOLD):
                problems.append(f"score() label of {sid} differs: {a} vs {b}")
    if worst > SCORE_TOLERANCE:
        problems.append(f"score() step scores differ by up to {worst:.3g} (bound {SCORE_TOLERANCE})")
    if problems:
        sys.exit("stack_numbers: " + "; ".join(problems))
    print(f"== the pinned environment's numbers: evaluate() row equal, score() {steps} step scores within {worst:.2g} "
          f"(bound {SCORE_TOLERANCE}), labels equal ({near} within the bound of the threshold)")


if __name__ == "__main__":
    from transformers.utils import logging

    logging.disable_progress_bar()  # shard writing and weight loading bars: noise in CI logs
    command, *args = sys.argv[1:]
    {"model": make_model, "compute": compute, "compare": compare}[command](*args)
