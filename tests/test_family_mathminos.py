"""The mathminos family against the official ``mr_eval/models/mathminos_mistral.py`` construction, written plainly."""

from __future__ import annotations

import pytest
import torch
from transformers import MistralConfig, MistralForTokenClassification, PreTrainedTokenizerFast

from family_testing import (
    ATOL, RTOL, assert_all_match_official, assert_validity_matches, hand_samples, llama_tokenizer, long_sample,
    make_sample, packed_outputs, tiny_model,
)
from prmbench_fast.families import FamilyError, family_class
from prmbench_fast.families.mathminos import MathMinosFamily

# family_testing's ATOL/RTOL hold for this family: the raw logit is one dot product of the hidden states with the head
# row, of size ~1.

CORPUS = [
    "Human: What is 0.15 of 20?\n\nAssistant:Step 1: The rate is 15 percent. и\nStep 2: We get 3. и\n",
    "Add 3 and 3 to get 6. A longer question: step 2: 6 + 6 = 12 и\n и и",
] * 5


def _tokenizer(added: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    # The tag's letters are in the alphabet, so the tag can be learnt as one token, as it is in the real vocabulary.
    return llama_tokenizer(CORPUS, vocab_size=400, extra_alphabet=("к", "и"), added_tokens=added)


@pytest.fixture(scope="module")
def tokenizer():
    tok = _tokenizer()
    # Precondition of the official rule, as with the real tokenizer: BOS, then the tag as one token.
    assert len(tok.encode("и")) == 2
    return tok


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_model(MistralForTokenClassification, len(tokenizer), initializer_range=0.2, num_labels=1)


SAMPLES = hand_samples(second_step="step 2: 6 + 6 = 12")

# getitem_function's string for each sample, written by hand: remove_step_prefix ("Step 1. " and "1. " go, "0.15"
# loses its "0.", "64." becomes empty, the colon form "step 2:" stays), renumbered "Step i: ", " и\n" after each,
# and no space between "Assistant:" and the first step.
OFFICIAL_TEXTS = [
    "Human: What is 0.15 of 20?\n\nAssistant:Step 1: The rate is 15 percent. и\nStep 2: 15 * 20 = 3 и\n"
    "Step 3:  и\nStep 4: We get\n\n3. и\n",
    "Human: Short?\n\nAssistant:Step 1: Yes. и\n",
    "Human: A longer question: what is 3 + 3 + 3 + 3?\n\nAssistant:Step 1: Add 3 and 3 to get 6. и\n"
    "Step 2: step 2: 6 + 6 = 12 и\nStep 3:  и\n",
]


# -- the official construction, written out ---------------------------------------------------------------------------
def official_ids(tokenizer, text: str, max_length: int = 2048) -> tuple[torch.Tensor, int]:
    """``encode(text, return_tensors='pt', max_length=2048, truncation=True)``; tag id ``encode("и")[-1]``."""
    ids = tokenizer.encode(text, return_tensors="pt", max_length=max_length, truncation=True)[0]
    return ids, tokenizer.encode("и")[-1]


def official_scores(model, tokenizer, text: str, max_length: int = 2048) -> tuple[list[float], list[bool]]:
    """``respond`` for one unpadded sample: the token-classification logits, squeezed, at the tag ids; label > 0."""
    ids, tag = official_ids(tokenizer, text, max_length)
    ids = ids[:max_length]  # the collator's cut (a no-op after the encode truncation)
    with torch.no_grad():
        logits = model(input_ids=ids[None], attention_mask=torch.ones_like(ids)[None]).logits.squeeze(-1)[0]
    scores = logits[ids == tag]
    return scores.tolist(), (scores > 0).tolist()


# -- tests -------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("i", range(len(SAMPLES)))
def test_text_is_the_official_string(i):
    assert MathMinosFamily.build_text(SAMPLES[i]) == OFFICIAL_TEXTS[i]


@pytest.mark.parametrize("i", range(len(SAMPLES)))
def test_ids_and_positions_are_official(tokenizer, i):
    ids, tag = official_ids(tokenizer, OFFICIAL_TEXTS[i])
    encoded = MathMinosFamily(tokenizer).encode(SAMPLES[i])
    assert encoded.input_ids == ids.tolist()
    assert ids[0].item() == tokenizer.bos_token_id
    assert encoded.reward_pos == torch.nonzero(ids == tag).flatten().tolist()
    assert len(encoded.reward_pos) == len(SAMPLES[i].steps)
    assert MathMinosFamily(tokenizer).tag_id == tokenizer.convert_tokens_to_ids("▁и")


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_scores_and_labels_match_official(tokenizer, model, backend):
    family = MathMinosFamily(tokenizer)
    ours = packed_outputs(family, model, SAMPLES, backend=backend)
    official = [official_scores(model, tokenizer, t) for t in OFFICIAL_TEXTS]
    assert_all_match_official(ours, SAMPLES, official)


def test_truncation_drops_late_rewards_like_the_adapter(tokenizer, model):
    long = long_sample(12)
    text = MathMinosFamily.build_text(long)
    full = len(MathMinosFamily(tokenizer, max_length=10_000).encode(long).input_ids)
    max_length = full // 2
    scores, labels = official_scores(model, tokenizer, text, max_length=max_length)
    assert 0 < len(scores) < len(long.steps)
    family = MathMinosFamily(tokenizer, max_length=max_length)
    assert len(family.encode(long).input_ids) == max_length  # cut while encoding, as the adapter does
    ours = packed_outputs(family, model, [long, SAMPLES[1]], max_length=max_length)
    assert_validity_matches(ours[long.id], scores, labels)
    # The default family (2048) cut by the pipeline's own max_length gives the same rewards.
    ours_default = packed_outputs(MathMinosFamily(tokenizer), model, [long], max_length=max_length)
    torch.testing.assert_close(ours_default[long.id].scores["validity"], torch.tensor(scores), atol=ATOL, rtol=RTOL)


def test_tag_merged_into_text_raises_unless_not_strict():
    merging = _tokenizer(added=("  и",))
    sample = SAMPLES[0]  # its empty step gives "Step 3:  и", one token here
    with pytest.raises(FamilyError, match=r"mathminos.*correct_t0"):
        MathMinosFamily(merging).encode(sample)
    encoded = MathMinosFamily(merging, strict=False).encode(sample)
    ids, tag = official_ids(merging, OFFICIAL_TEXTS[0])
    assert encoded.reward_pos == torch.nonzero(ids == tag).flatten().tolist()
    assert len(encoded.reward_pos) == len(sample.steps) - 1


def test_tag_inside_the_question_raises(tokenizer):
    sample = make_sample(5, "Why и?", ("Yes.",))
    with pytest.raises(FamilyError, match=r"mathminos.*correct_t5.*2 times for 1 steps"):
        MathMinosFamily(tokenizer).encode(sample)


def test_needs_a_one_label_head(tokenizer):
    from transformers import MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1)
    family = MathMinosFamily(tokenizer)
    hidden, step_pos = torch.zeros(3, 16), torch.tensor([0, 2])
    with pytest.raises(FamilyError, match="mathminos.*AutoModelForTokenClassification"):
        family.step_scores(MistralForCausalLM(config), hidden, step_pos)
    config.num_labels = 2
    with pytest.raises(FamilyError, match="mathminos"):
        family.step_scores(MistralForTokenClassification(config), hidden, step_pos)
    with pytest.raises(FamilyError, match="mathminos.*unknown options"):
        MathMinosFamily(tokenizer, pair_softmax=True)


def test_threshold_is_zero(tokenizer):
    family = MathMinosFamily(tokenizer)
    scores = {"validity": torch.tensor([-0.5, 0.0, 1e-6])}
    labels = family.step_labels(scores, torch.tensor([0, 3], dtype=torch.int32))
    assert labels["validity"].tolist() == [False, False, True]
    assert family_class("mathminos") is MathMinosFamily
    assert MathMinosFamily.auto_class == "AutoModelForTokenClassification"


@pytest.mark.parametrize("name", ["KbsdJames/MATH-Minos", "/ckpts/minos_mistral", "org/mathminos-mistral-7b-prm"])
def test_matches_official_names(name):
    assert MathMinosFamily.matches(None, name)


@pytest.mark.parametrize("name", ["mistralai/Mistral-7B-v0.1", "peiyi9979/math-shepherd-mistral-7b-prm",
                                  "RLHFlow/Llama3.1-8B-PRM-Mistral-Data",
                                  "ScalableMath/llemma-7b-prm-prm800k-level-1to3-hf"])
def test_does_not_match_others(name):
    assert not MathMinosFamily.matches(None, name)


def test_score_hands_its_max_length_to_the_encoding(tokenizer, model):
    from prmbench_fast.data import PRMBenchDataset
    from prmbench_fast import score

    long = long_sample(12)
    max_length = len(MathMinosFamily(tokenizer, max_length=10_000).encode(long).input_ids) // 2
    expected, labels = official_scores(model, tokenizer, MathMinosFamily.build_text(long), max_length=max_length)
    report = score(model, PRMBenchDataset([long, SAMPLES[1]]), tokenizer=tokenizer, family="mathminos",
                   max_length=max_length, progress=False)
    got = report.predictions[long.id]["scores"]
    torch.testing.assert_close(torch.tensor(got["step_level_validity_scores"]), torch.tensor(expected), atol=ATOL, rtol=RTOL)
    assert got["step_level_validity_labels"] == labels
