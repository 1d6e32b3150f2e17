"""Family.build: the official adapters' validity_threshold / redundancy_threshold overrides, accepted by every family,
used by its label rule and recorded in its options (hence in cache_key and the run's settings)."""

import json

import pytest
import torch

from prmbench_fast.families import Family, FamilyError, family_class
from prmbench_fast.testing.tiny_models import train_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(["Step 1: x = 2 + 3 -\nVerdict: + -", "question?"])


def test_default_build_is_the_plain_constructor(tokenizer):
    built, plain = family_class("lm_judge").build(tokenizer), family_class("lm_judge")(tokenizer)
    assert built.validity_threshold == plain.validity_threshold == 0.5
    assert built.options == plain.options and built.cache_key() == plain.cache_key()


def test_validity_threshold_override_is_used_and_recorded(tokenizer):
    fam = family_class("lm_judge").build(tokenizer, validity_threshold="0.7")  # strings, as official model_args
    assert fam.validity_threshold == 0.7 and fam.options["validity_threshold"] == 0.7
    assert fam.cache_key() != family_class("lm_judge").build(tokenizer).cache_key()
    scores = {"validity": torch.tensor([0.6, 0.7, 0.71])}
    assert fam.step_labels(scores, torch.tensor([0, 3], dtype=torch.int32))["validity"].tolist() == [False, False, True]
    assert family_class("lm_judge").validity_threshold == 0.5  # the class default is untouched


def test_redundancy_threshold_applies_to_families_with_redundancy_scores_only(tokenizer):
    with pytest.raises(FamilyError, match="lm_judge: emits no redundancy scores"):
        family_class("lm_judge").build(tokenizer, redundancy_threshold=0.2)

    class WithRedundancy(Family):  # ReasonEval's shape: validity and redundancy scores
        name = "toy"
        redundancy_threshold = 0.15

        def __init__(self, tokenizer, **options):
            if options:
                raise FamilyError(f"toy: unknown options {sorted(options)}")
            super().__init__(tokenizer)

        def encode(self, sample):
            raise NotImplementedError

        def step_scores(self, model, hidden, step_pos, *, backend="auto"):
            raise NotImplementedError

    fam = WithRedundancy.build(tokenizer, validity_threshold=0.4, redundancy_threshold=0.3)
    assert fam.options == {"validity_threshold": 0.4, "redundancy_threshold": 0.3}
    labels = fam.step_labels({"validity": torch.tensor([0.45, 0.35]), "redundancy": torch.tensor([0.2, 0.31])},
                             torch.tensor([0, 2], dtype=torch.int32))
    assert labels["validity"].tolist() == [True, False] and labels["redundancy"].tolist() == [False, True]
    with pytest.raises(FamilyError, match="unknown options"):  # a family's own option check still applies
        WithRedundancy.build(tokenizer, validity_threshold=0.4, size="7b")


def test_score_command_records_the_thresholds_in_the_run(tmp_path, prmbench_jsonl, capsys):
    from prmbench_fast import load_prmbench
    from prmbench_fast.cli import main
    from prmbench_fast.testing.tiny_models import tiny_llama

    data = load_prmbench(prmbench_jsonl, limit_per_class=1)
    # " +" and " -" must be single tokens for lm_judge: the corpus repeats them so the BPE learns them.
    tok = train_tokenizer([s.question for s in data] + [t for s in data for t in s.steps] + ["Verdict: +", "Verdict: -"] * 30)
    tiny_llama(len(tok), head="causal").save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    args = ["score", "--model", str(tmp_path / "model"), "--family", "lm_judge", "--data", str(prmbench_jsonl),
            "--limit-per-class", "1", "--max-length", "256", "--no-progress", "--output-dir", str(tmp_path / "run")]
    assert main(args + ["--validity-threshold", "0.45"]) == 0
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["validity_threshold"] == 0.45 and run["family_options"]["validity_threshold"] == "0.45"
    assert main(args + ["--redundancy-threshold", "0.2"]) == 2
    assert "lm_judge: emits no redundancy scores" in capsys.readouterr().err
