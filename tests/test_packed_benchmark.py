"""benchmark_batches(): the benchmark as score()'s packed batches for a loop that runs its own forward. The README's
custom-loop example runs as written and gives score()'s predictions; the batches come from score()'s cache; mistakes
are named."""

import pathlib
import re

import pytest
import torch

import prmbench_fast
from conftest import PRMBENCH_JSONL, REPO_ROOT
from prmbench_fast import load_prmbench, score
from prmbench_fast.packed_benchmark import BenchmarkBatch
from prmbench_fast.testing.tiny_models import tiny_llama
from test_callback import make_tokenizer


@pytest.fixture(scope="module")
def subset():
    return load_prmbench(PRMBENCH_JSONL, limit_per_class=2)


@pytest.fixture(scope="module")
def tokenizer(subset):
    return make_tokenizer(subset)


def readme_example(name: str) -> str:
    """The python block that follows ``<!-- example: name -->`` in the README."""
    text = pathlib.Path(REPO_ROOT / "README.md").read_text()
    match = re.search(rf"<!-- example: {re.escape(name)} -->\s*```python\n(.*?)```", text, re.S)
    assert match, f"no README example {name!r}"
    return match.group(1)


def test_the_readme_custom_loop_gives_scores_predictions(subset, tokenizer):
    model = tiny_llama(len(tokenizer), head="token_classification").train()
    namespace = {"data": subset, "tokenizer": tokenizer, "model": model, "device": torch.device("cpu")}
    exec(compile(readme_example("custom loop"), "README.md", "exec"), namespace)
    report = namespace["report"]
    assert model.training  # the example puts the model back
    # score() on the same batches (no prefix sharing): the same samples in the same order, the same scores within
    # fp32 rounding (a full-model forward with a block mask vs score()'s per-segment attention), the same row.
    expected = score(model, subset, tokenizer=tokenizer, family="generic", share_prefixes=False, progress=False,
                     batch_tokens=4096)
    got, want = report.step_predictions, expected.step_predictions
    assert torch.equal(got.sample_pos, want.sample_pos) and torch.equal(got.cu_steps.long(), want.cu_steps.long())
    torch.testing.assert_close(got.validity_scores, want.validity_scores, rtol=1e-5, atol=1e-6)
    assert report.official == expected.official and report.table == expected.table


def test_batches_are_the_packed_layout_and_come_from_the_cache(subset, tokenizer):
    bench = prmbench_fast.benchmark_batches(subset, tokenizer, family="generic", max_length=64, batch_tokens=512)
    assert bench.family.name == "generic" and bench.dataset is subset
    assert sorted(p for b in bench for p in b.sample_pos.tolist()) == list(range(len(subset)))
    for batch in bench:
        assert isinstance(batch, BenchmarkBatch)
        assert batch.cu_seqlens.dtype == torch.int32 and batch.cu_steps.dtype == torch.int32
        assert batch.sample_pos.dtype == torch.int64 and batch.sample_pos.shape == (len(batch.seqlens),)
        assert batch.num_tokens == batch.input_ids.numel() <= 512 and max(batch.seqlens) == batch.max_seqlen <= 64
        assert int(batch.cu_steps[-1]) == batch.step_pos.numel()
        mask = batch.block_causal_mask()[0, 0]
        starts = batch.cu_seqlens.tolist()
        assert mask.sum() == sum(n * (n + 1) // 2 for n in batch.seqlens)  # causal triangles, nothing across
        assert not mask[starts[1]:, : starts[1]].any()
    again = prmbench_fast.benchmark_batches(subset, tokenizer, family="generic", max_length=64, batch_tokens=512)
    assert again[0].input_ids is bench[0].input_ids  # packed once, as score() caches it


@pytest.mark.parametrize("change,error,message", [
    (dict(dataset=[]), TypeError, "dataset must be a PRMBenchDataset"),
    (dict(dataset=str(PRMBENCH_JSONL)), TypeError, "dataset must be a PRMBenchDataset"),
    (dict(tokenizer="HuggingFaceTB/SmolLM2-135M"), TypeError, "tokenizer must be a tokenizer object"),
    (dict(family="auto"), ValueError, "no model to detect the family from"),
    (dict(family="generik"), ValueError, "unknown PRM family"),
    (dict(batch_tokens=0), ValueError, "batch_tokens must be a positive integer"),
    (dict(step_seperator="\n"), TypeError, "step_seperator"),
], ids=["list", "path", "tokenizer path", "auto", "unknown family", "batch_tokens", "family option"])
def test_mistakes_are_named(subset, tokenizer, change, error, message):
    arguments = {"dataset": subset, "tokenizer": tokenizer, "family": "generic", **change}
    with pytest.raises(error, match=message):
        prmbench_fast.benchmark_batches(arguments.pop("dataset"), arguments.pop("tokenizer"), **arguments)
