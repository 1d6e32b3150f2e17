"""The math_shepherd family against the official ``mr_eval/models/math_shepherd.py`` construction, written plainly."""

from __future__ import annotations

import pytest
import torch
from tokenizers import processors
from transformers import MistralForCausalLM, PreTrainedTokenizerFast

from family_testing import (
    assert_all_match_official, assert_validity_matches, hand_samples, llama_tokenizer, long_sample, make_sample,
    packed_outputs, tiny_model,
)
from prmbench_fast.families import FamilyError, family_class
from prmbench_fast.families.math_shepherd import MathShepherdFamily

# family_testing's ATOL/RTOL hold for this family: a two-way softmax of logits of size ~1 does not amplify the ~1e-6
# packing difference.

CORPUS = [
    "What is 0.15 of 20? Step 1: The rate is 15 percent. ки\nStep 2: We get 3. ки\n",
    "Add 3 and 3 to get 6. A longer question: step 2: 6 + 6 = 12 ки\n + - ки + -",
] * 5


def _tokenizer(added: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    # The tag's letters are in the alphabet, so the tag can be learnt as one token, as it is in the real vocabulary.
    return llama_tokenizer(CORPUS, vocab_size=400, extra_alphabet=("к", "и"), added_tokens=added)


@pytest.fixture(scope="module")
def tokenizer():
    tok = _tokenizer()
    # Preconditions of the official rule, as with the real tokenizer: the tag and "+"/"-" are single tokens.
    assert len(tok.encode("ки")) == 2 and len(tok.encode("+ -")) == 3
    return tok


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_model(MistralForCausalLM, len(tokenizer), initializer_range=0.2)


SAMPLES = hand_samples(second_step="step 2: 6 + 6 = 12")

# getitem_function's string for each sample, written by hand: "Step"/"step" steps verbatim, the others numbered,
# no remove_step_prefix (so "0.15" and "1." and "64." stay), every step stripped, " ки\n" after each.
OFFICIAL_TEXTS = [
    "What is 0.15 of 20? Step 1. The rate is 15 percent. ки\nStep 2: 0.15 * 20 = 3 ки\nStep 3:  ки\n"
    "Step 3. We get\n\n3. ки\n",
    "Short? Step 1: Yes. ки\n",
    "A longer question: what is 3 + 3 + 3 + 3? Step 1: 1. Add 3 and 3 to get 6. ки\nstep 2: 6 + 6 = 12 ки\n"
    "Step 3: 64. ки\n",
]


# -- the official construction, written out ---------------------------------------------------------------------------
def official_ids(tokenizer, text: str) -> tuple[torch.Tensor, int, list[int]]:
    """``encode(text, return_tensors='pt')``; tag id ``encode("ки")[-1]``; candidates ``encode("+ -")[1:]``."""
    ids = tokenizer.encode(text, return_tensors="pt")[0]
    return ids, tokenizer.encode("ки")[-1], tokenizer.encode("+ -")[1:]


def official_scores(model, tokenizer, text: str, max_length: int = 2048) -> tuple[list[float], list[bool]]:
    """``respond`` for one unpadded sample: collator cut, full logits, softmax over the 2 candidates, tag mask."""
    ids, tag, candidates = official_ids(tokenizer, text)
    ids = ids[:max_length]
    with torch.no_grad():
        logits = model(input_ids=ids[None], attention_mask=torch.ones_like(ids)[None]).logits[0]
    scores = logits[:, candidates].softmax(dim=-1)[:, 0][ids == tag].tolist()
    return scores, [s > 0.5 for s in scores]


# -- tests -------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("i", range(len(SAMPLES)))
def test_text_is_the_official_string(i):
    assert MathShepherdFamily.build_text(SAMPLES[i]) == OFFICIAL_TEXTS[i]


@pytest.mark.parametrize("i", range(len(SAMPLES)))
def test_ids_and_positions_are_official(tokenizer, i):
    ids, tag, _ = official_ids(tokenizer, OFFICIAL_TEXTS[i])
    encoded = MathShepherdFamily(tokenizer).encode(SAMPLES[i])
    assert encoded.input_ids == ids.tolist()
    assert ids[0].item() == tokenizer.bos_token_id
    assert encoded.reward_pos == torch.nonzero(ids == tag).flatten().tolist()
    assert len(encoded.reward_pos) == len(SAMPLES[i].steps)


def test_reward_ids_are_derived_as_official(tokenizer):
    family = MathShepherdFamily(tokenizer)
    assert family.tag_id == tokenizer.convert_tokens_to_ids("▁ки")
    assert family.good_bad_ids == tuple(tokenizer.convert_tokens_to_ids(["▁+", "▁-"]))


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_scores_and_labels_match_official(tokenizer, model, backend):
    family = MathShepherdFamily(tokenizer)
    ours = packed_outputs(family, model, SAMPLES, backend=backend)
    official = [official_scores(model, tokenizer, t) for t in OFFICIAL_TEXTS]
    assert_all_match_official(ours, SAMPLES, official)


def test_truncation_drops_late_rewards_like_the_collator(tokenizer, model):
    family = MathShepherdFamily(tokenizer)
    long = long_sample(12)
    text = MathShepherdFamily.build_text(long)
    full = len(family.encode(long).input_ids)
    max_length = full // 2
    scores, labels = official_scores(model, tokenizer, text, max_length=max_length)
    assert 0 < len(scores) < len(long.steps)
    ours = packed_outputs(family, model, [long, SAMPLES[1]], max_length=max_length)
    assert_validity_matches(ours[long.id], scores, labels)


def test_tag_merged_into_text_raises_unless_not_strict(tokenizer):
    merging = _tokenizer(added=("  ки",))
    sample = SAMPLES[0]  # its empty step gives "Step 3:  ки", whose "▁▁ки" is one token here
    with pytest.raises(FamilyError, match=r"math_shepherd.*correct_t0"):
        MathShepherdFamily(merging).encode(sample)
    # strict=False keeps what the official rule finds: one tag fewer than steps.
    encoded = MathShepherdFamily(merging, strict=False).encode(sample)
    ids, tag, _ = official_ids(merging, OFFICIAL_TEXTS[0])
    assert encoded.reward_pos == torch.nonzero(ids == tag).flatten().tolist()
    assert len(encoded.reward_pos) == len(sample.steps) - 1


def test_tag_inside_the_question_raises(tokenizer):
    sample = make_sample(5, "Why ки?", ("Yes.",))
    with pytest.raises(FamilyError, match=r"math_shepherd.*correct_t5.*2 times for 1 steps"):
        MathShepherdFamily(tokenizer).encode(sample)


def test_options_and_tokenizer_errors(tokenizer):
    with pytest.raises(FamilyError, match="math_shepherd.*unknown options"):
        MathShepherdFamily(tokenizer, pair_softmax=True)
    no_bos = _tokenizer()
    no_bos._tokenizer.post_processor = processors.TemplateProcessing(single="$A")
    with pytest.raises(FamilyError, match="math_shepherd"):
        MathShepherdFamily(no_bos)


@pytest.mark.parametrize("name", ["peiyi9979/math-shepherd-mistral-7b-prm", "/models/Math-Shepherd-Mistral-7B-PRM/"])
def test_matches_official_names(name):
    assert MathShepherdFamily.matches(None, name)
    assert family_class("math_shepherd") is MathShepherdFamily


@pytest.mark.parametrize("name", ["mistralai/Mistral-7B-v0.1", "RLHFlow/Llama3.1-8B-PRM-Mistral-Data",
                                  "MATH-Minos/math-shepherd-converted", "Qwen/Qwen2.5-Math-PRM-7B"])
def test_does_not_match_others(name):
    assert not MathShepherdFamily.matches(None, name)
