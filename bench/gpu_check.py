"""One-command validation on a machine with one CUDA GPU (``make gpu-check``), in under 8 minutes.

1. The ``gpu`` test group (tests/test_gpu.py): every kernel and op on the GPU against its torch reference.
2. Kernel micro-benchmarks against the official way, at 7B scale (H = 3,584, V = 152,064, bf16, a packed batch of
   8,192 tokens with PRMBench's step density): step_rewards and step_token_probs against full (T, V) logits, and the
   counting op against its torch reference. Time (median, ``triton.testing.do_bench``), the rate it reaches (GB/s of
   the bytes it must read, or TFLOP/s), extra peak memory, and the ratio.
3. End to end: ``prmbench_fast.score()`` of a randomly initialised 7B-shaped Qwen2 (no download: built from
   ``Qwen2Config``) in bf16 on :func:`evaluation_set`, against bench_score.py's official-style loop (batches of 2,
   right padding, full logits): tokens/s, peak memory, ratio, and whether the labels are identical. In bf16 the two
   ways round differently, so a label may flip where the official-style probability is within
   :data:`LABEL_MARGIN` of the 0.5 threshold; any other difference fails the check.

Writes one JSON (``--output``) and prints a table. Exit status: 0 all passed, 1 something failed, 2 no CUDA GPU.
Usage: python bench/gpu_check.py [--data PATH] [--output PATH]
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import platform
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree

import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "prmbench" / "prmbench_preview.jsonl"

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
# Near 0.5 the official-style probability is a bf16 number (spacing 2**-9 below 0.5, 2**-8 above) computed from
# bf16 logits, and ours is fp32 from hidden states that differ from the padded run's by about one bf16 ulp; 4 ulps of
# 2**-8 bound the two roundings with room to spare, and stay far below any real error.
LABEL_MARGIN = 4 * 2**-8


# -- 1. the gpu test group ---------------------------------------------------------------------------------------------
def run_gpu_tests() -> dict:
    """pytest -m gpu on tests/test_gpu.py in a subprocess; counts from its JUnit XML."""
    with tempfile.TemporaryDirectory() as folder:
        junit = pathlib.Path(folder) / "gpu.xml"
        start = time.perf_counter()
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "tests/test_gpu.py", "-m", "gpu", "-q", f"--junitxml={junit}"],
            cwd=REPO, capture_output=True, text=True,
        )  # fmt: skip
        seconds = time.perf_counter() - start
        suite = ElementTree.parse(junit).getroot().find("testsuite") if junit.exists() else None
    counts = {key: int(suite.get(key, 0)) if suite is not None else 0 for key in ("tests", "failures", "errors", "skipped")}
    failed = [line for line in result.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
    return {"exit_code": result.returncode, "seconds": round(seconds, 1), **counts, "failed": failed,
            "passed": result.returncode == 0 and counts["tests"] > 0}  # fmt: skip


# -- 2. kernel micro-benchmarks ----------------------------------------------------------------------------------------
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


def _row(op, provider, ms, peak, work, unit, baseline_ms=None) -> dict:
    return {"op": op, "provider": provider, "ms": round(ms, 4), "peak_extra_mb": round(peak / 2**20, 1),
            "rate": round(work / (ms * 1e-3) / 1e9 / (1e3 if unit == "TFLOP/s" else 1), 1), "unit": unit,
            "speedup": None if baseline_ms is None else round(baseline_ms / ms, 1)}  # fmt: skip


def bench_step_kernels() -> list[dict]:
    """step_rewards / step_token_probs against full logits, on a 7B-shaped LM head in bf16."""
    from prmbench_fast.kernels.step_reward import step_rewards, step_token_probs

    T, S, H, V = BENCH_TOKENS, BENCH_STEPS, QWEN2_7B["hidden_size"], QWEN2_7B["vocab_size"]
    generator = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(T, H, device="cuda", dtype=torch.bfloat16, generator=generator)
    lm_head = torch.randn(V, H, device="cuda", dtype=torch.bfloat16, generator=generator) / H**0.5
    step_pos = torch.linspace(0, T - 1, S, device="cuda").long()
    plus, minus = 10, 12
    pair = lm_head[[plus, minus]].contiguous()  # taken once per model, not per batch

    def official_pair():
        return (hidden @ lm_head.T)[:, [plus, minus]].float().softmax(-1)[step_pos, 0]

    def official_full_vocab():
        return (hidden @ lm_head.T).float().softmax(-1)[step_pos, plus]

    full_logits_flop = 2 * T * V * H
    gathered_bytes = S * H * 2 + pair.numel() * 2  # the S rows and the 2 head rows: what step_rewards must read
    rows = []
    ms, peak = _measure(official_pair)
    rows.append(_row("pair rule (2 LM-head rows)", "official: full (T, V) logits", ms, peak, full_logits_flop, "TFLOP/s"))
    ours_ms, peak = _measure(lambda: step_rewards(hidden, step_pos, pair, activation="softmax"))
    rows.append(_row("pair rule (2 LM-head rows)", "step_rewards (S rows)", ours_ms, peak, gathered_bytes, "GB/s", ms))
    ms, peak = _measure(official_full_vocab)
    rows.append(_row("full-vocabulary rule", "official: full (T, V) logits", ms, peak, full_logits_flop, "TFLOP/s"))
    ours_ms, peak = _measure(lambda: step_token_probs(hidden, step_pos, lm_head, [plus]))
    rows.append(_row("full-vocabulary rule", "step_token_probs (S rows)", ours_ms, peak, 2 * S * V * H, "TFLOP/s", ms))
    return rows


def bench_counting_op() -> list[dict]:
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
    # Bytes the op must read (values, offsets, error steps, classes, thresholds) and write (its outputs).
    io_bytes = values.numel() + errors.numel() * 8 + num_samples * (8 + 8 + 8 + 8 + 6 * 8)
    rows = []
    ms, peak = _measure(lambda: step_confusion_reference(*args))
    rows.append(_row("step_confusion (696,900 samples)", "torch reference", ms, peak, io_bytes, "GB/s"))
    ours_ms, peak = _measure(lambda: step_confusion(*args, backend="cuda"))
    rows.append(_row("step_confusion (696,900 samples)", "CUDA op", ours_ms, peak, io_bytes, "GB/s", ms))
    return rows


# -- 3. end to end -----------------------------------------------------------------------------------------------------
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


def _labels(results: dict) -> dict[str, tuple[list[bool], list[float]]]:
    return {idx: (r["scores"]["step_level_validity_labels"], r["scores"]["step_level_validity_scores"])
            for idx, r in results.items()}  # fmt: skip


def compare_labels(ours: dict, official: dict) -> dict:
    """Per step, our label against the official-style one; every difference must sit within LABEL_MARGIN of 0.5."""
    differing, total, worst = 0, 0, 0.0
    for idx, (labels, probs) in official.items():
        our_labels = ours[idx][0]
        if len(our_labels) != len(labels):
            return {"identical": False, "steps": total, "differing": None, "within_margin": False,
                    "error": f"{idx}: {len(our_labels)} labels against {len(labels)}"}  # fmt: skip
        total += len(labels)
        for ours_label, label, prob in zip(our_labels, labels, probs):
            if ours_label != label:
                differing += 1
                worst = max(worst, abs(prob - 0.5))
    return {"identical": differing == 0, "steps": total, "differing": differing,
            "max_distance_to_threshold_of_a_difference": worst, "within_margin": worst <= LABEL_MARGIN}  # fmt: skip


def end_to_end(model, tokenizer, dataset, *, batch_tokens: int = 16384) -> dict:
    """score() against the official-style loop on ``dataset``, each timed once after a warm-up on 4 samples."""
    sys.path.insert(0, str(REPO / "bench"))
    from bench_score import official_style_results

    from prmbench_fast import score
    from prmbench_fast.families.lm_judge import LMJudge

    family = LMJudge(tokenizer)
    device = next(model.parameters()).device
    warm = dataset.subset(limit_per_class=1)
    score(model, warm, tokenizer=tokenizer, family="lm_judge", progress=False)  # Triton compiles, cuBLAS warms up
    official_style_results(model, tokenizer, list(dataset)[:4], family)

    def run(fn):
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        value = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
        return value, time.perf_counter() - start, peak

    report, t_score, peak_score = run(lambda: score(model, dataset, tokenizer=tokenizer, family="lm_judge",
                                                    progress=False, batch_tokens=batch_tokens))  # fmt: skip
    (official, tokens), t_official, peak_official = run(
        lambda: official_style_results(model, tokenizer, dataset, family)
    )
    labels = compare_labels(_labels(report.predictions), _labels({r["idx"]: r for r in official}))
    return {
        "samples": len(dataset), "tokens": tokens,
        "official_style": {"seconds": round(t_official, 2), "tokens_per_second": round(tokens / t_official),
                           "peak_memory_gib": peak_official},
        "score": {"seconds": round(t_score, 2), "tokens_per_second": round(tokens / t_score),
                  "peak_memory_gib": peak_score, "prefix_sharing": report.run.get("prefix_sharing"),
                  "tokens_computed": report.run.get("tokens_computed")},
        "speedup": round(t_official / t_score, 2), "labels": labels,
    }  # fmt: skip


# -- report ------------------------------------------------------------------------------------------------------------
def environment() -> dict:
    import triton

    return {"device": torch.cuda.get_device_name(), "capability": list(torch.cuda.get_device_capability()),
            "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__,
            "python": platform.python_version(),
            "timestamp": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}  # fmt: skip


def print_table(result: dict) -> None:
    env = result["environment"]
    print(f"\n{env['device']} (sm_{''.join(map(str, env['capability']))}) | torch {env['torch']} | CUDA {env['cuda']} "
          f"| triton {env['triton']} | {env['timestamp']}")  # fmt: skip
    tests = result["gpu_tests"]
    print(f"gpu tests: {tests['tests']} run, {tests['failures'] + tests['errors']} failed, {tests['skipped']} skipped "
          f"in {tests['seconds']} s: {'PASS' if tests['passed'] else 'FAIL'}")  # fmt: skip
    for line in tests["failed"]:
        print(f"  {line}")
    print(f"\n{'op':<34}{'provider':<32}{'ms':>10}{'rate':>16}{'peak +MB':>10}{'speed-up':>10}")
    for row in result["kernels"]:
        speedup = "" if row["speedup"] is None else f"{row['speedup']}x"
        print(f"{row['op']:<34}{row['provider']:<32}{row['ms']:>10.3f}{row['rate']:>10.1f} {row['unit']:<5}"
              f"{row['peak_extra_mb']:>10.1f}{speedup:>10}")  # fmt: skip
    e2e = result["end_to_end"]
    print(f"\nend to end: random 7B-shaped Qwen2, bf16, {e2e['samples']} samples, {e2e['tokens']} tokens")
    for name in ("official_style", "score"):
        run = e2e[name]
        print(f"  {name:<16}{run['seconds']:>9.2f} s{run['tokens_per_second']:>10} tokens/s"
              f"{run['peak_memory_gib']:>8.1f} GiB peak")  # fmt: skip
    labels = e2e["labels"]
    print(f"  speed-up {e2e['speedup']}x; labels identical: {labels['identical']} ({labels['differing']} of "
          f"{labels['steps']} steps differ, all within {LABEL_MARGIN} of 0.5: {labels['within_margin']})")  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=pathlib.Path, default=DEFAULT_DATA, help="the full PRMBench data")
    parser.add_argument("--output", type=pathlib.Path, default=REPO / "runs" / "gpu-check" / "gpu_check.json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU is visible (torch.cuda.is_available() is False); nothing was checked")
        return 2

    from prmbench_fast.testing.tiny_models import train_tokenizer

    result = {"environment": environment(), "gpu_tests": run_gpu_tests()}
    result["kernels"] = bench_step_kernels() + bench_counting_op()
    torch.cuda.empty_cache()  # the benchmarks' (T, V) logits leave ~13 GB cached: give it back before the 15 GB model
    dataset = evaluation_set(args.data)
    texts = [s.question for s in dataset] + [t for s in dataset for t in s.steps] + ["Verdict: + -"]
    # 8,000 merges give about a real tokenizer's token counts (295k tokens, 667 per sample with the lm_judge prompt);
    # the default 400 give 524k, and nearly double the run's time.
    tokenizer = train_tokenizer(texts, vocab_size=8000)
    model = random_qwen2_7b()
    result["end_to_end"] = end_to_end(model, tokenizer, dataset)

    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1))
    print_table(result)
    print(f"\nwritten: {args.output}")
    labels = result["end_to_end"]["labels"]
    return 0 if result["gpu_tests"]["passed"] and labels["within_margin"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
