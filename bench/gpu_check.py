"""One-command validation on a machine with one CUDA GPU (``make gpu-check``), in under 8 minutes on one H100.

Runs with the machine's own ``python3`` and packages (torch >= 2.10, triton, transformers; no ``datasets``, ``openai``
or ``matplotlib`` is imported: the package, ``bench/bench_score.py`` and ``prmbench_fast.testing`` import none of
them). Reads the PRMBench rows from ``--data`` (the official subset400 file, or the full data). Each phase is guarded:
a phase that raises is recorded (exception type, message, a short traceback) and the next one runs; the JSON
(``--output``) is rewritten atomically after every phase, and the table is printed at the end whatever happened.
Exit status: 0 every phase passed, 1 a phase failed or raised, 2 no CUDA GPU (nothing checked, nothing written).

Phases, with their expected times on one H100 SXM (bf16 dense ~990 TFLOP/s peak, ~600 reached by large GEMMs;
HBM3 3.35 TB/s); the model is a randomly initialised Qwen2 of the 7B shape (H = 3,584, 28 layers, V = 152,064;
non-embedding parameters 6.5 G, so a forward costs ~13.3 GFLOP per token and the LM head 1.09 GFLOP per token):

1. ``gpu_tests`` (~1.5-2.5 min): ``pytest -m gpu tests/test_gpu.py`` in a subprocess: every kernel and op against
   a float64 result or its torch reference (~120 tests; Triton compiles ~40 specialisations at ~1 s each).
2. ``model`` (~20 s): the 7B-shaped model built on the GPU (15.2 GB of bf16 weights, initialised there) and a
   tokenizer trained on the evaluation set's texts.
3. ``kernels`` (~15 s): reading step rewards from a packed batch of T = 8,192 tokens with PRMBench's step density
   (S = 212 step rows), median of ``triton.testing.do_bench`` per provider: the official way (full (T, V) logits:
   2 T V H = 8.9 TFLOP, ~15 ms, a 2.5 GB bf16 buffer, 5 GB more in fp32 for the full-vocabulary softmax), the
   obvious gather-then-matmul ``hidden[step_pos] @ W.T`` (the same S rows, reading the whole 1.09 GB LM head for
   the full-vocabulary rule: ~0.35 ms at HBM speed), and the kernels; plus the backbone forward over the same
   8,192 tokens (109 TFLOP, ~0.2 s), the floor that any reward reading adds to.
4. ``counting_op`` (~5 s): the CUDA counting op against its torch reference at 100x the benchmark's size.
5. ``end_to_end`` (~1 min): subset400 (442 samples, ~295k tokens with the trained tokenizer), each way timed once
   after a warm-up: the official-style loop (batches of 2 with right padding, full logits; ~4.5 PFLOP with the
   padding, ~15 s), ``score()`` with and without prefix sharing (~3.9 PFLOP, ~7 s each) and the backbone-only
   forward over score()'s packed batches (the floor, ~7 s). Timers are read after ``torch.cuda.synchronize()``.

About 4-5 minutes in all, with Python and CUDA start-up.

Usage: python bench/gpu_check.py --data data/subset400_official.jsonl [--output runs/gpu-check/gpu_check.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ElementTree

import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO / "data" / "subset400_official.jsonl"
DEFAULT_OUTPUT = REPO / "runs" / "gpu-check" / "gpu_check.json"

# Qwen2.5-7B's shape (Qwen2.5-Math-PRM-7B's backbone): 28 layers of width 3,584, GQA 28/4 heads, a 152,064-token
# vocabulary; 7.6B parameters, 15 GB in bf16.
QWEN2_7B = dict(
    hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
    vocab_size=152064, max_position_embeddings=32768, rope_theta=1_000_000.0,
)  # fmt: skip
# A packed batch of the micro-benchmarks: 8,192 tokens, and PRMBench's step density (13.43 steps per ~520-token
# sample, bench_step_reward.py) gives 212 step positions.
BENCH_TOKENS = 8192
BENCH_STEPS = round(BENCH_TOKENS * 13.43 / 520)
# How far apart the official-style probability p_o and score()'s p_s of one step may be from rounding alone:
# - the backbones: both run the same bf16 weights on the same tokens, but with other kernels and batch shapes (padded
#   SDPA vs packed flash varlen), so the final hidden states drift apart through the 28 layers; on CPU the drift
#   moved p by at most 0.013 (p99 0.011) on this model: 0.026 allows twice that for the GPU kernels;
# - the official way rounds the two logits to bf16 (relative 2**-9 each; |l| <= 4 for this model's random heads,
#   whose logits have std ~1.2) and its probability to bf16 (at most 2**-9 away near 0.5), while score() reads the
#   logits in fp32: |dp| <= (1/4) |dz| for a two-way softmax, so 2**-9 * (4 + 4) / 4 + 2**-9 = 0.0059.
# 0.026 + 0.0059 < 0.032 = ROUNDING_BOUND. A step whose two probabilities are both farther than that from the
# threshold cannot change its label by rounding: its labels must agree. Steps nearer the threshold are counted, not
# compared; any step whose probabilities differ by more than the bound fails the check (not rounding).
ROUNDING_BOUND = 0.032
THRESHOLD = 0.5


# -- running the phases ----------------------------------------------------------------------------------------------
class Results:
    """The check's JSON: written atomically (a temporary file in the same folder, then ``os.replace``) after every
    phase, so that a crash or a kill leaves the last complete state."""

    def __init__(self, output: pathlib.Path):
        self.output = output
        self.data: dict = {"phases": {}}

    def write(self) -> None:
        self.output.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=self.output.parent, suffix=".tmp", delete=False) as f:
            json.dump(self.data, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(f.name, self.output)

    def run(self, name: str, phase, *args):
        """Run ``phase(*args)`` (a dict with a ``passed`` bool, or raising) and record it; returns its dict or None."""
        start = time.perf_counter()
        try:
            value = phase(*args)
            record = {"status": "passed" if value.get("passed", True) else "failed", **value}
        except Exception as err:  # a failed phase is recorded and the others still run
            value = None
            record = {"status": "error", "error": {
                "type": type(err).__name__, "message": str(err)[:2000],
                "traceback": "".join(traceback.format_exception(err)[-6:])[-4000:],
            }}  # fmt: skip
        record["seconds"] = round(time.perf_counter() - start, 1)
        self.data["phases"][name] = record
        self.write()
        return value

    @property
    def passed(self) -> bool:
        return all(phase["status"] == "passed" for phase in self.data["phases"].values())


def _synchronized_seconds(fn):
    """(fn's value, wall seconds): the device is synchronised before starting and before reading the clock, so
    queued GPU work is counted."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    value = fn()
    torch.cuda.synchronize()
    return value, time.perf_counter() - start


# -- 1. the gpu test group -------------------------------------------------------------------------------------------
def run_gpu_tests() -> dict:
    """pytest -m gpu on tests/test_gpu.py in a subprocess (this Python); counts from its JUnit XML."""
    with tempfile.TemporaryDirectory() as folder:
        junit = pathlib.Path(folder) / "gpu.xml"
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "tests/test_gpu.py", "-m", "gpu", "-q", "-p", "no:cacheprovider",
             f"--junitxml={junit}"],
            cwd=REPO, capture_output=True, text=True,
        )  # fmt: skip
        suite = ElementTree.parse(junit).getroot().find("testsuite") if junit.exists() else None
    counts = {k: int(suite.get(k, 0)) if suite is not None else 0 for k in ("tests", "failures", "errors", "skipped")}
    failed = [line for line in result.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
    return {"exit_code": result.returncode, **counts, "failed": failed,
            "output_tail": "" if result.returncode == 0 else (result.stdout + result.stderr)[-3000:],
            "passed": result.returncode == 0 and counts["tests"] > 0}  # fmt: skip


# -- 2. the model ----------------------------------------------------------------------------------------------------
def evaluation_set(data: pathlib.Path):
    """The samples of the end-to-end check: the official subset400 quick-evaluation task (442 samples)."""
    from prmbench_fast import load_prmbench

    return load_prmbench(data, task="subset400")


def random_qwen2_7b(device: str = "cuda", **shape) -> torch.nn.Module:
    """A randomly initialised Qwen2 causal LM of the 7B shape (``shape`` overrides it), bf16, built on ``device``.
    The small offline tokenizer uses only the first ids of its 152,064-row LM head: the full-logits loop still pays
    for all of them, as with the real model."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        return Qwen2ForCausalLM._from_config(Qwen2Config(**{**QWEN2_7B, **shape}), dtype=torch.bfloat16).eval()


def build(state: dict, data: pathlib.Path) -> dict:
    from prmbench_fast.testing.tiny_models import train_tokenizer

    dataset = evaluation_set(data)
    texts = [s.question for s in dataset] + [t for s in dataset for t in s.steps] + ["Verdict: + -"]
    # 8,000 merges give about a real tokenizer's token counts (295k tokens, 667 per sample with the lm_judge prompt);
    # the default 400 give 524k, and nearly double the run's time.
    state["tokenizer"] = train_tokenizer(texts, vocab_size=8000)
    state["dataset"] = dataset
    state["model"], seconds = _synchronized_seconds(random_qwen2_7b)
    return {"samples": len(dataset), "model_seconds": round(seconds, 1),
            "parameters": sum(p.numel() for p in state["model"].parameters())}  # fmt: skip


# -- 3. reading step rewards -----------------------------------------------------------------------------------------
def _measure(fn) -> tuple[float, int]:
    """(median milliseconds, extra peak bytes over what was allocated before the call) of ``fn`` on the GPU."""
    import triton.testing

    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"), peak


def _row(op, provider, ms, peak, work, unit, *, full_ms=None, gathered_ms=None, floor_ms=None) -> dict:
    scale = 1e12 if unit == "TFLOP/s" else 1e9
    return {"op": op, "provider": provider, "ms": round(ms, 4), "peak_extra_mb": round(peak / 2**20, 1),
            "rate": round(work / (ms * 1e-3) / scale, 1), "unit": unit,
            "vs_full_logits": None if full_ms is None else round(full_ms / ms, 1),
            "vs_gathered_torch": None if gathered_ms is None else round(gathered_ms / ms, 2),
            "share_of_backbone": None if floor_ms is None else round(ms / floor_ms, 4)}  # fmt: skip


def _synthetic_batch(tokens: int, vocab: int, sample_tokens: int = 512, device: str = "cuda"):
    """A packed batch of ``tokens`` random ids in samples of ``sample_tokens``, on ``device``."""
    from prmbench_fast.packing import TokenizedSample, pack_batches

    generator = torch.Generator().manual_seed(0)
    samples = [TokenizedSample(torch.randint(0, vocab, (sample_tokens,), generator=generator).tolist(), [], key=i)
               for i in range(tokens // sample_tokens)]  # fmt: skip
    (batch,) = pack_batches(samples, max_length=sample_tokens, batch_tokens=tokens)
    return batch.to(device)


def bench_reward_reading(state: dict) -> dict:
    """Step rewards of a packed 8,192-token batch three ways, on the 7B model's LM head, and the backbone floor."""
    from prmbench_fast.kernels.step_reward import step_rewards, step_token_probs
    from prmbench_fast.packing import backbone_hidden_states

    model = state["model"]
    T, S, H, V = BENCH_TOKENS, BENCH_STEPS, QWEN2_7B["hidden_size"], QWEN2_7B["vocab_size"]
    batch = _synthetic_batch(T, len(state["tokenizer"]))
    floor_ms, _ = _measure(lambda: backbone_hidden_states(model, batch))
    with torch.inference_mode():
        hidden = backbone_hidden_states(model, batch)
    lm_head = model.lm_head.weight
    step_pos = torch.linspace(0, T - 1, S, device="cuda").long()
    plus, minus = 10, 12
    pair = lm_head[[plus, minus]].contiguous()  # taken once per model, not per batch

    def full_pair():
        return (hidden @ lm_head.T)[:, [plus, minus]].float().softmax(-1)[step_pos, 0]

    def gathered_pair():
        return (hidden[step_pos] @ pair.T).float().softmax(-1)[:, 0]

    def full_vocab():
        return (hidden @ lm_head.T).float().softmax(-1)[step_pos, plus]

    def gathered_vocab():
        return (hidden[step_pos] @ lm_head.T).float().softmax(-1)[:, plus]

    full_flop = 2 * T * V * H
    pair_bytes = (S * H + pair.numel()) * 2  # the S rows and the 2 head rows: what a gathered read must move
    vocab_bytes = (S * H + V * H) * 2  # the S rows and the whole LM head
    rows = [_row("backbone forward, 8,192 tokens", "floor", floor_ms, 0, 13.3e9 * T, "TFLOP/s")]
    with torch.inference_mode():
        for op, providers in (
            ("pair rule (2 LM-head rows)", (("official: full (T, V) logits", full_pair, full_flop, "TFLOP/s"),
                                            ("torch: hidden[step_pos] @ W2.T", gathered_pair, pair_bytes, "GB/s"),
                                            ("step_rewards kernel", lambda: step_rewards(hidden, step_pos, pair),
                                             pair_bytes, "GB/s"))),
            ("full-vocabulary rule", (("official: full (T, V) logits", full_vocab, full_flop, "TFLOP/s"),
                                      ("torch: hidden[step_pos] @ W.T", gathered_vocab, vocab_bytes, "GB/s"),
                                      ("step_token_probs kernel", lambda: step_token_probs(hidden, step_pos, lm_head,
                                                                                           [plus]),
                                       vocab_bytes, "GB/s"))),
        ):  # fmt: skip
            times = []
            for provider, fn, work, unit in providers:
                ms, peak = _measure(fn)
                times.append(ms)
                full_ms = times[0] if len(times) > 1 else None
                gathered_ms = times[1] if len(times) > 2 else None
                rows.append(_row(op, provider, ms, peak, work, unit, full_ms=full_ms, gathered_ms=gathered_ms,
                                 floor_ms=floor_ms))  # fmt: skip
            torch.cuda.empty_cache()  # the (T, V) buffers: up to ~13 GB cached
    return {"rows": rows}


def bench_counting_op() -> dict:
    """The compiled counting op on the GPU against its torch reference on the GPU, at 100x PRMBench's size."""
    from prmbench_fast.ops import step_confusion
    from prmbench_fast.reference import step_confusion_reference

    num_samples, num_classes = 696_900, 10  # 100 x the 6,969 samples of the full benchmark
    generator = torch.Generator(device="cuda").manual_seed(0)
    label_counts = torch.randint(1, 27, (num_samples,), device="cuda", generator=generator)  # ~13.4 labels each
    error_counts = torch.randint(0, 5, (num_samples,), device="cuda", generator=generator)
    cu_labels = torch.nn.functional.pad(label_counts.cumsum(0), (1, 0))
    cu_errors = torch.nn.functional.pad(error_counts.cumsum(0), (1, 0))
    values = torch.rand(int(cu_labels[-1]), device="cuda", generator=generator) > 0.3
    errors = torch.randint(0, 20, (int(cu_errors[-1]),), device="cuda", generator=generator)
    args = (values, torch.full((num_samples,), 0.5, dtype=torch.float64, device="cuda"), cu_labels, errors,
            cu_errors, torch.arange(num_samples, device="cuda") % num_classes, num_classes)  # fmt: skip
    ours, reference = step_confusion(*args, backend="cuda"), step_confusion_reference(*args)
    # Bytes the op must read (values, offsets, error steps, classes, thresholds) and write (its outputs).
    io_bytes = values.numel() + errors.numel() * 8 + num_samples * (8 + 8 + 8 + 8 + 6 * 8)
    ref_ms, ref_peak = _measure(lambda: step_confusion_reference(*args))
    ms, peak = _measure(lambda: step_confusion(*args, backend="cuda"))
    op = "step_confusion (696,900 samples)"
    return {"rows": [_row(op, "torch reference", ref_ms, ref_peak, io_bytes, "GB/s"),
                     _row(op, "CUDA op", ms, peak, io_bytes, "GB/s", gathered_ms=ref_ms)],
            "counts_equal": all(torch.equal(a, b) for a, b in zip(ours, reference)),
            "passed": all(torch.equal(a, b) for a, b in zip(ours, reference))}  # fmt: skip


# -- 5. end to end ---------------------------------------------------------------------------------------------------
def _steps(results: dict) -> dict[str, tuple[list[bool], list[float]]]:
    return {idx: (r["scores"]["step_level_validity_labels"], r["scores"]["step_level_validity_scores"])
            for idx, r in results.items()}  # fmt: skip


def compare_labels(ours: dict, official: dict, bound: float = ROUNDING_BOUND) -> dict:
    """Per step, score()'s label and probability against the official-style ones (both ``{id: (labels, probs)}``).

    Labels are compared where both probabilities are farther than ``bound`` from the threshold (rounding cannot flip
    them: :data:`ROUNDING_BOUND`); the other steps are counted. Passes when every sample has as many labels both ways,
    every compared label agrees, and no step's probabilities differ by more than ``bound``."""
    steps = compared = disagreeing = near = 0
    gaps = []
    for idx, (labels, probs) in official.items():
        our_labels, our_probs = ours[idx]
        if len(our_labels) != len(labels):
            return {"passed": False, "error": f"{idx}: {len(our_labels)} labels against {len(labels)}"}
        for our_label, label, our_prob, prob in zip(our_labels, labels, our_probs, probs):
            steps += 1
            gaps.append(abs(our_prob - prob))
            if min(abs(our_prob - THRESHOLD), abs(prob - THRESHOLD)) <= bound:
                near += 1
            else:
                compared += 1
                disagreeing += our_label != label
    gaps.sort()
    largest = gaps[-1] if gaps else 0.0
    return {"steps": steps, "compared": compared, "disagreeing": disagreeing, "near_threshold": near,
            "bound": bound, "max_probability_gap": largest,
            "p99_probability_gap": gaps[int(0.99 * (len(gaps) - 1))] if gaps else 0.0,
            "passed": disagreeing == 0 and largest <= bound}  # fmt: skip


def end_to_end(state: dict, *, batch_tokens: int = 16384) -> dict:
    """score() with and without prefix sharing, the official-style loop, and the backbone-only floor over score()'s
    packed batches, on the evaluation set; each timed once after a warm-up."""
    sys.path.insert(0, str(REPO / "bench"))
    from bench_score import MAX_LENGTH, official_style_results

    from prmbench_fast import score
    from prmbench_fast.families.lm_judge import LMJudge
    from prmbench_fast.packing import backbone_hidden_states
    from prmbench_fast.token_cache import packed_batches

    model, tokenizer, dataset = state["model"], state["tokenizer"], state["dataset"]
    family = LMJudge(tokenizer)
    options = dict(tokenizer=tokenizer, family="lm_judge", progress=False, batch_tokens=batch_tokens)
    score(model, dataset.subset(limit_per_class=1), **options)  # Triton compiles, cuBLAS warms up, tokens cached
    official_style_results(model, tokenizer, list(dataset)[:4], family)
    batches = [b.to("cuda") for b in packed_batches(family, dataset, range(len(dataset)), max_length=MAX_LENGTH,
                                                    batch_tokens=batch_tokens)]  # fmt: skip

    def run(fn):
        torch.cuda.reset_peak_memory_stats()
        value, seconds = _synchronized_seconds(fn)
        return value, seconds, torch.cuda.max_memory_allocated() / 2**30

    shared, t_shared, peak_shared = run(lambda: score(model, dataset, **options))
    unshared, t_unshared, peak_unshared = run(lambda: score(model, dataset, share_prefixes=False, **options))
    (official, tokens), t_official, peak_official = run(lambda: official_style_results(model, tokenizer, dataset,
                                                                                          family))  # fmt: skip

    def floor():
        with torch.inference_mode():
            for batch in batches:
                backbone_hidden_states(model, batch)

    _, t_floor, peak_floor = run(floor)
    tokens_packed = sum(b.num_tokens for b in batches)

    def way(seconds, peak, **extra):
        return {"seconds": round(seconds, 2), "tokens_per_second": round(tokens_packed / seconds),
                "peak_memory_gib": round(peak, 2), "speedup_vs_official": round(t_official / seconds, 2), **extra}

    official_steps = _steps({r["idx"]: r for r in official})
    labels = {"shared": compare_labels(_steps(shared.predictions), official_steps),
              "unshared": compare_labels(_steps(unshared.predictions), official_steps)}
    return {
        "samples": len(dataset), "tokens": tokens_packed, "official_tokens": tokens,
        "official_style": way(t_official, peak_official),
        "score": way(t_shared, peak_shared, tokens_computed=shared.run["tokens_computed"],
                     prefix_sharing=shared.run["prefix_sharing"]),
        "score_unshared": way(t_unshared, peak_unshared),
        "backbone_floor": way(t_floor, peak_floor),
        "labels": labels, "passed": all(v["passed"] for v in labels.values()),
    }  # fmt: skip


# -- report ----------------------------------------------------------------------------------------------------------
def environment() -> dict:
    import triton

    return {"device": torch.cuda.get_device_name(), "capability": list(torch.cuda.get_device_capability()),
            "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__,
            "python": platform.python_version(),
            "timestamp": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}  # fmt: skip


def print_table(data: dict) -> None:
    phases = data["phases"]
    env = phases.get("environment", {})
    if "device" in env:
        print(f"\n{env['device']} (sm_{''.join(map(str, env['capability']))}) | torch {env['torch']} | CUDA "
              f"{env['cuda']} | triton {env['triton']} | python {env['python']} | {env['timestamp']}")  # fmt: skip
    for name, phase in phases.items():
        line = f"{name:<14}{phase['status']:<8}{phase['seconds']:>7.1f} s"
        if "error" in phase:
            line += f"  {phase['error']['type']}: {phase['error']['message'].splitlines()[0][:200]}"
        print(line)
    tests = phases.get("gpu_tests", {})
    if "tests" in tests:
        print(f"gpu tests: {tests['tests']} run, {tests['failures'] + tests['errors']} failed, {tests['skipped']} "
              "skipped")  # fmt: skip
        for line in tests["failed"]:
            print(f"  {line}")
    rows = phases.get("kernels", {}).get("rows", []) + phases.get("counting_op", {}).get("rows", [])
    if rows:
        print(f"\n{'op':<34}{'provider':<34}{'ms':>10}{'rate':>17}{'peak +MB':>10}{'vs full':>9}{'vs torch':>9}"
              f"{'of fwd':>8}")  # fmt: skip
        for row in rows:
            ratios = [f"{row[k]}x" if row[k] is not None else "" for k in ("vs_full_logits", "vs_gathered_torch")]
            share = "" if row["share_of_backbone"] is None else f"{100 * row['share_of_backbone']:.1f}%"
            print(f"{row['op']:<34}{row['provider']:<34}{row['ms']:>10.3f}{row['rate']:>11.1f} {row['unit']:<6}"
                  f"{row['peak_extra_mb']:>10.1f}{ratios[0]:>9}{ratios[1]:>9}{share:>8}")  # fmt: skip
    e2e = phases.get("end_to_end", {})
    if "official_style" in e2e:
        print(f"\nend to end: random 7B-shaped Qwen2, bf16, {e2e['samples']} samples, {e2e['tokens']} tokens")
        for name in ("official_style", "score", "score_unshared", "backbone_floor"):
            run = e2e[name]
            print(f"  {name:<16}{run['seconds']:>9.2f} s{run['tokens_per_second']:>10} tokens/s"
                  f"{run['peak_memory_gib']:>8.1f} GiB peak{run['speedup_vs_official']:>7}x")  # fmt: skip
        for name, labels in e2e["labels"].items():
            if "steps" in labels:
                print(f"  labels ({name}): {labels['compared']} of {labels['steps']} steps compared (both "
                      f"probabilities > {labels['bound']} from {THRESHOLD}), {labels['disagreeing']} disagree; "
                      f"{labels['near_threshold']} near it; max |dp| {labels['max_probability_gap']:.4f}, p99 "
                      f"{labels['p99_probability_gap']:.4f}")  # fmt: skip
            else:
                print(f"  labels ({name}): {labels['error']}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=pathlib.Path, default=DEFAULT_DATA,
                        help="the official subset400 rows (or the full PRMBench data)")  # fmt: skip
    parser.add_argument("--output", type=pathlib.Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU is visible (torch.cuda.is_available() is False); nothing was checked")
        return 2

    results = Results(args.output)
    results.run("environment", environment)
    results.run("gpu_tests", run_gpu_tests)
    state: dict = {}
    results.run("model", build, state, args.data)
    if "model" in state:
        results.run("kernels", bench_reward_reading, state)
        torch.cuda.empty_cache()
        results.run("end_to_end", end_to_end, state)
    results.run("counting_op", bench_counting_op)
    print_table(results.data)
    print(f"\nwritten: {args.output}")
    return 0 if results.passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
