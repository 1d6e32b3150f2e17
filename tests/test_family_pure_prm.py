"""The pure_prm family against the official ``mr_eval/models/pure_prm.py`` construction, written out plainly here."""

from __future__ import annotations

import pytest
import torch
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForTokenClassification

from family_testing import bpe_tokenizer, hand_samples, packed_outputs, tiny_model
from prmbench_fast.data import Sample
from prmbench_fast.families import FamilyError, family_class
from prmbench_fast.families.pure_prm import PurePRMFamily


def _tokenizer(separator_token=True) -> PreTrainedTokenizerFast:
    corpus = ["What is 0.15 of 20? Step 1. The rate is 15 percent. We get 3.", "So 3 + 3 = 6. Add 3 and 3."] * 4
    return bpe_tokenizer(
        corpus, pre_tokenizer="byte_level", vocab_size=300, special_tokens=["<|endoftext|>"],
        # Qwen2.5's vocabulary has "\n\n" as one token (271); here it is an added, non-special token.
        added_tokens=("\n\n",) if separator_token else (), eos_token="<|endoftext|>", pad_token="<|endoftext|>",
    )  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer():
    return _tokenizer()


SAMPLES = hand_samples()


def official_input(tokenizer, sample: Sample):
    """``getitem_function``: raw steps (no prefix removal, no strip), each followed by the "\\n\\n" ids."""
    separator = tokenizer("\n\n", add_special_tokens=False, return_tensors="pt")["input_ids"]
    input_ids = tokenizer(sample.question, add_special_tokens=False, return_tensors="pt")["input_ids"]
    score_ids = []
    for step in sample.steps:
        step_ids = tokenizer(step, add_special_tokens=False, return_tensors="pt")["input_ids"]
        input_ids = torch.cat([input_ids, step_ids.to(input_ids.dtype), separator], dim=-1)
        score_ids.append(input_ids.size(-1) - 1)
    input_ids = input_ids.squeeze(0)
    token_mask = torch.zeros_like(input_ids, dtype=torch.bool)
    token_mask[score_ids] = True
    assert torch.all(input_ids[token_mask] == separator.item())
    return input_ids, token_mask


def official_scores(model, input_ids, token_mask) -> list[float]:
    """``respond`` + ``make_step_rewards`` for one unpadded sample."""
    with torch.no_grad():
        logits = model(input_ids[None], torch.ones_like(input_ids)[None]).logits[0]
    probs = logits[token_mask].softmax(dim=-1)
    return (probs[:, 1] - probs[:, 0]).tolist()


def test_the_question_and_raw_steps_are_concatenated_without_separator(tokenizer):
    family = PurePRMFamily(tokenizer)
    encoded = family.encode(SAMPLES[2])
    text = tokenizer.decode(encoded.input_ids)
    assert text == (
        "A longer question: what is 3 + 3 + 3 + 3?  1. Add 3 and 3 to get 6. \n\nStep 2: 6 + 6 = 12\n\n64.\n\n"
    )
    assert tokenizer.decode(family.encode(SAMPLES[0]).input_ids) == (
        "What is 0.15 of 20?Step 1. The rate is 15 percent.\n\n0.15 * 20 = 3\n\n\n\nStep 3. We get\n\n3.\n\n"
    )


def test_ids_and_reward_positions(tokenizer):
    family = PurePRMFamily(tokenizer)
    for sample in SAMPLES:
        input_ids, token_mask = official_input(tokenizer, sample)
        encoded = family.encode(sample)
        assert encoded.input_ids == input_ids.tolist()
        assert encoded.reward_pos == torch.nonzero(token_mask).view(-1).tolist()
        assert all(encoded.input_ids[p] == family.separator_id for p in encoded.reward_pos)


@pytest.fixture(scope="module")
def model(tokenizer):
    prm = tiny_model(Qwen2ForTokenClassification, len(tokenizer), num_labels=2)
    # A random head gives nearly the same reward at every "\n\n": spread the rewards and centre them on the
    # threshold (median logit gap 0) so that both labels occur.
    with torch.no_grad():
        prm.score.weight.mul_(300.0)
        gaps = []
        for sample in SAMPLES:
            input_ids, token_mask = official_input(tokenizer, sample)
            logits = prm(input_ids[None]).logits[0][token_mask]
            gaps += (logits[:, 1] - logits[:, 0]).tolist()
        prm.score.bias[1] -= torch.quantile(torch.tensor(gaps), 0.5)
    return prm


def test_packed_scores_equal_the_official_reading(tokenizer, model):
    family = PurePRMFamily(tokenizer)
    got = packed_outputs(family, model, SAMPLES, backend="torch")
    all_labels = []
    for sample in SAMPLES:
        expected = official_scores(model, *official_input(tokenizer, sample))
        # fp32 both ways; packed per-segment attention vs one full forward differ by ~1e-6 in the hidden states,
        # and p1 - p0 moves by at most twice the probabilities' change.
        torch.testing.assert_close(got[sample.id].scores["validity"], torch.tensor(expected), atol=2e-5, rtol=0)
        assert got[sample.id].labels["validity"].tolist() == [s > 0.0 for s in expected]
        all_labels += got[sample.id].labels["validity"].tolist()
    assert any(all_labels) and not all(all_labels), "the test model should give both labels"


def test_truncation_drops_late_separators(tokenizer, model):
    family = PurePRMFamily(tokenizer)
    sample = SAMPLES[2]
    encoded = family.encode(sample)
    max_length = encoded.reward_pos[1] + 1
    got = packed_outputs(family, model, [sample], max_length=max_length, backend="torch")
    input_ids, token_mask = official_input(tokenizer, sample)
    # The official respond() rebuilds the mask from the truncated attention mask: positions >= max_length vanish.
    expected = official_scores(model, input_ids[:max_length], token_mask[:max_length])
    assert len(expected) == 2
    torch.testing.assert_close(got[sample.id].scores["validity"], torch.tensor(expected), atol=2e-5, rtol=0)


def test_official_rounding_gives_bf16_differences(tokenizer, model):
    family = PurePRMFamily(tokenizer, official_rounding=True)
    bf16 = Qwen2ForTokenClassification(model.config).eval()
    bf16.load_state_dict(model.state_dict())
    bf16.to(torch.bfloat16)
    torch.manual_seed(1)
    hidden = torch.randn(16, model.config.hidden_size).to(torch.bfloat16)
    step_pos = torch.tensor([1, 7, 15])
    got = family.step_scores(bf16, hidden, step_pos)["validity"]
    with torch.no_grad():
        probs = bf16.score(hidden)[step_pos].softmax(dim=-1)  # bf16, as the official make_step_rewards
        expected = (probs[:, 1] - probs[:, 0]).float()
    assert torch.equal(got, expected)


def test_official_mixed_precision_bf16_gives_fp32_differences(tokenizer, model):
    """accelerate ``mixed_precision: bf16``: bf16 logits converted to fp32, softmax and p1 - p0 in fp32."""
    bf16 = Qwen2ForTokenClassification(model.config).eval()
    bf16.load_state_dict(model.state_dict())
    torch.manual_seed(1)
    with torch.no_grad():
        # The fixture's head is spread for label tests and saturates on random rows: logit gaps of std ~0.6 here
        # keep the probabilities away from 0 and 1, where the two settings round differently.
        bf16.score.weight.normal_(0.0, 0.05)
        bf16.score.bias.zero_()
    bf16.to(torch.bfloat16)
    hidden = torch.randn(16, model.config.hidden_size).to(torch.bfloat16)
    step_pos = torch.tensor([1, 7, 15])
    got = PurePRMFamily(tokenizer, official_mixed_precision="bf16").step_scores(bf16, hidden, step_pos)["validity"]
    with torch.no_grad():
        probs = bf16.score(hidden).float()[step_pos].softmax(dim=-1)
    assert torch.equal(got, probs[:, 1] - probs[:, 0]) and got.abs().max() < 0.9
    rounded = PurePRMFamily(tokenizer, official_mixed_precision="no").step_scores(bf16, hidden, step_pos)["validity"]
    legacy = PurePRMFamily(tokenizer, official_rounding=True).step_scores(bf16, hidden, step_pos)["validity"]
    assert torch.equal(rounded, legacy) and not torch.equal(rounded, got)


def test_registry_and_matches():
    assert family_class("pure_prm") is PurePRMFamily
    token_cls = Qwen2Config(architectures=["Qwen2ForTokenClassification"])
    assert PurePRMFamily.matches(token_cls, "jinachris/Qwen2.5-Math-7B-PRM800K")
    assert PurePRMFamily.matches(None, "jinachris/Qwen2.5-Math-7B-PRM800K")
    assert not PurePRMFamily.matches(token_cls, "someone/qwen2-ner-tagger")
    qwen_prm = Qwen2Config(architectures=["Qwen2ForProcessRewardModel"])
    assert not PurePRMFamily.matches(qwen_prm, "Qwen/Qwen2.5-Math-PRM-7B")
    assert not PurePRMFamily.matches(None, "Qwen/Qwen2.5-Math-7B")


def test_errors_name_the_family(tokenizer):
    with pytest.raises(FamilyError, match="pure_prm.*2 tokens"):
        PurePRMFamily(_tokenizer(separator_token=False))
    with pytest.raises(FamilyError, match="pure_prm.*unknown options"):
        PurePRMFamily(tokenizer, size="7B")
