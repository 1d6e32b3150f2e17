"""PRMBenchCallback per scoring call: what it costs beyond the forward passes it runs (target: at most 5 %).

A Trainer scores the live model at every evaluation through the callback: score() on the set (its forwards, its own
overhead), the analyses (AUROC and best threshold: the step scores read on the host), the trivial-predictor check, and
trainer.log(). Each call here is one evaluation hook (``on_evaluate`` with a fresh global step, so that nothing is
reused), timed as a whole, with hooks on the decoder (``model.base_model``) summing the wall time of the forwards it
runs (``ForwardTimer`` of bench_repeated_calls; prefix sharing off, so that every forward goes through it).
Overhead = call - forwards; share = overhead / forwards (the overhead against the forward passes it runs).

Models: a token-classification Llama (the PRM layout the generic family reads) with random weights (timing does not
depend on them) and a small tokenizer trained on the data: "tiny" (hidden 64, 2 layers: the test suite's toy, whose
forwards are so cheap that the fixed costs of a call show), "small" (hidden 256, 6 layers), and with
``--smollm2-shaped`` "SmolLM2-135M-shaped" (hidden 576, 30 layers, 9 heads, 3 KV heads, intermediate 1536; about a
minute per call on a loaded 2-core CPU). Data: the stratified subset (``--limit-per-class 2``: 20 samples). Modes:
analyses on (the default) and off. Medians over ``--calls`` calls after a warm-up call (which tokenizes and packs).
Usage: python bench/bench_callback.py [--data PATH] [--calls N] [--smollm2-shaped]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from bench_repeated_calls import ForwardTimer  # noqa: E402
from common import environment_line  # noqa: E402
from transformers import (LlamaConfig, LlamaForTokenClassification, PrinterCallback, Trainer,  # noqa: E402
                          TrainerControl, TrainingArguments)

import prmbench_fast  # noqa: E402
from prmbench_fast import load_prmbench  # noqa: E402
from prmbench_fast.testing.tiny_models import train_tokenizer  # noqa: E402

TARGET = 0.05
SIZES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2),
    "small": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=6, num_attention_heads=4,
                  num_key_value_heads=2),
    "SmolLM2-135M-shaped": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                                num_key_value_heads=3),
}


def measure(label, model, tokenizer, dataset, *, analyses: bool, calls: int, folder: str):
    args = TrainingArguments(output_dir=folder, report_to="none", use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, processing_class=tokenizer)
    trainer.remove_callback(PrinterCallback)  # it would print every logged row
    # Without prefix sharing every forward runs through model.base_model, where the timer's hooks see it (shared
    # prefixes are computed layer by layer outside it, and would count as overhead).
    callback = prmbench_fast.PRMBenchCallback(dataset, trainer=trainer, analyses=analyses, share_prefixes=False)
    timer = ForwardTimer(model.base_model, next(model.parameters()).device)
    control = TrainerControl()

    def call(step: int) -> tuple[float, float]:
        trainer.state.global_step = step  # a new step: scored again, as after training steps
        timer.reset()
        start = time.perf_counter()
        callback.on_evaluate(args, trainer.state, control, metrics={})
        return time.perf_counter() - start, timer.seconds

    call(0)  # tokenizes and packs: paid once per run
    samples = [call(step) for step in range(1, calls + 1)]
    overheads = [total - forward for total, forward in samples]
    return {
        "model": label,
        "mode": "analyses on" if analyses else "analyses off",
        "call": statistics.median(t for t, _ in samples),
        "forwards": statistics.median(f for _, f in samples),
        "overhead": statistics.median(overheads),
        "share": statistics.median(o / f for o, (_, f) in zip(overheads, samples)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.environ.get("PRMBENCH_DATA", str(
        pathlib.Path(__file__).resolve().parents[2] / "shared" / "prmbench" / "prmbench_preview.jsonl")))
    parser.add_argument("--limit-per-class", type=int, default=2)
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--smollm2-shaped", action="store_true")
    args = parser.parse_args()

    dataset = load_prmbench(args.data, limit_per_class=args.limit_per_class)
    tokenizer = train_tokenizer([s.question for s in dataset] + [step for s in dataset for step in s.steps])
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for label, size in SIZES.items():
            if label == "SmolLM2-135M-shaped" and not args.smollm2_shaped:
                continue
            torch.manual_seed(0)
            config = LlamaConfig(vocab_size=len(tokenizer), num_labels=2, max_position_embeddings=4096,
                                 pad_token_id=tokenizer.pad_token_id, **size)
            model = LlamaForTokenClassification(config)
            for analyses in (True, False):
                rows.append(measure(label, model, tokenizer, dataset, analyses=analyses, calls=args.calls,
                                    folder=folder))

    print(environment_line())
    print(f"load: {os.getloadavg()[0]:.2f} (1-min average) | {len(dataset)} PRMBench samples "
          f"({args.limit_per_class} per class + partners), generic family, fp32, no prefix sharing | medians of {args.calls} calls "
          f"after a warm-up call | target: overhead <= {TARGET:.0%} of the forwards")
    print(f"{'model':<22}{'mode':<15}{'call s':>9}{'forwards s':>12}{'overhead s':>12}{'share':>8}  target")
    for r in rows:
        print(f"{r['model']:<22}{r['mode']:<15}{r['call']:>9.3f}{r['forwards']:>12.3f}{r['overhead']:>12.4f}"
              f"{r['share']:>8.1%}  {'met' if r['share'] <= TARGET else 'MISSED'}")


if __name__ == "__main__":
    main()
