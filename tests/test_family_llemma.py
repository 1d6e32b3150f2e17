"""The llemma family against the official ``mr_eval/models/llemma7b_prm.py`` construction, written out plainly."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from family_testing import (
    assert_all_match_official, assert_validity_matches, hand_samples, llama_tokenizer, long_sample, packed_outputs,
    tiny_model,
)
from prmbench_fast.families import FamilyError, family_class
from prmbench_fast.families.llemma import LlemmaFamily

# family_testing's ATOL/RTOL hold for this family: the mean row gives mean(W h) up to fp32 summation-order rounding
# (~1e-7 here), and the sigmoid only shrinks differences.

CORPUS = [
    "# Question\n\nWhat is 0.15 of 20?\n\n# Solution\n\nStep 1. The rate is 15 percent.\n\nWe get 3.\n\n",
    "Add 3 and 3 to get 6. A longer question: step 2: 6 + 6 = 12\n\n# Answer\n\n",
] * 5


def _tokenizer(added: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    """A Llama-like sentencepiece BPE with BOS, whose every "\\n" is its own token, so ``encode("\\n\\n")[1:]`` is the
    newline pair. ``added`` tokens are matched before anything else, to build tokenizers that merge the separator
    into neighbouring text."""
    return llama_tokenizer(CORPUS, vocab_size=300, added_tokens=added)


@pytest.fixture(scope="module")
def tokenizer():
    tok = _tokenizer()
    # As with the Llemma tokenizer: encode("\n\n") = ["▁", "\n", "\n"].
    assert tok.convert_ids_to_tokens(tok.encode("\n\n", add_special_tokens=False)) == ["▁", "\n", "\n"]
    return tok


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_model(LlamaForCausalLM, len(tokenizer), initializer_range=0.2)


SAMPLES = hand_samples(second_step="step 2: 6 + 6 = 12", more_steps=("Check:\n\n\n6 + 6 = 12\n",))

# getitem_function's string for each sample, written by hand: no step numbers and no prefix removal, every "\n\n"
# deleted ("We get\n\n3." -> "We get3.", "\n\n\n" -> "\n"), stripped, "\n\n" after each step; an empty step adds a
# bare "\n\n".
OFFICIAL_TEXTS = [
    "# Question\n\nWhat is 0.15 of 20?\n\n# Solution\n\nStep 1. The rate is 15 percent.\n\n0.15 * 20 = 3\n\n\n\n"
    "Step 3. We get3.\n\n",
    "# Question\n\nShort?\n\n# Solution\n\nYes.\n\n",
    "# Question\n\nA longer question: what is 3 + 3 + 3 + 3?\n\n# Solution\n\n1. Add 3 and 3 to get 6.\n\n"
    "step 2: 6 + 6 = 12\n\n64.\n\nCheck:\n6 + 6 = 12\n\n",
]
# N+1 positions, and one more for the empty step of sample 0 ("\n\n\n\n" holds three overlapping pairs).
EXPECTED_COUNTS = [4 + 1 + 1, 1 + 1, 4 + 1]


# -- the official construction, written out ---------------------------------------------------------------------------
def official_positions(tokenizer, text: str, max_length: int = 2048) -> tuple[list[int], list[int]]:
    """``getitem_function``: the begin flag, every scoring-pair start after it, EOS, ``del [0]``, ``< max_length``."""
    begin_solution_tokens = tokenizer.encode("\n\n# Solution", add_special_tokens=False)[1:]
    scoring_tokens = tokenizer.encode("\n\n", add_special_tokens=False)[1:]
    eos_token = tokenizer.eos_token_id
    input_ids = tokenizer.encode(text)
    begin_solution_flag = False
    candidate_positions = []
    for start_idx in range(len(input_ids)):
        if tuple(input_ids[start_idx:start_idx + len(begin_solution_tokens)]) == tuple(begin_solution_tokens):
            begin_solution_flag = True
        window = tuple(input_ids[start_idx:start_idx + len(scoring_tokens)])
        if begin_solution_flag and window == tuple(scoring_tokens):
            candidate_positions.append(start_idx)
        if input_ids[start_idx] == eos_token:
            candidate_positions.append(start_idx)
            break
    del candidate_positions[0]
    return input_ids, [p for p in candidate_positions if p < max_length]


def official_scores(model, tokenizer, text: str, max_length: int = 2048) -> tuple[list[float], list[bool]]:
    """``respond`` for one unpadded sample: the collator's cut, mean of the full logits, sigmoid at the positions."""
    ids, positions = official_positions(tokenizer, text, max_length)
    ids = torch.tensor(ids)[:max_length]
    with torch.no_grad():
        logits = model(input_ids=ids[None], attention_mask=torch.ones_like(ids)[None]).logits
    scores = torch.sigmoid(logits.mean(dim=-1)[0][torch.tensor(positions)]).tolist()
    return scores, [s > 0.5 for s in scores]


# -- tests -------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("i", range(len(SAMPLES)))
def test_text_is_the_official_string(i):
    assert LlemmaFamily.build_text(SAMPLES[i]) == OFFICIAL_TEXTS[i]
    assert LlemmaFamily.expected_positions(SAMPLES[i]) == EXPECTED_COUNTS[i]


@pytest.mark.parametrize("i", range(len(SAMPLES)))
def test_ids_and_positions_are_official(tokenizer, i):
    ids, positions = official_positions(tokenizer, OFFICIAL_TEXTS[i])
    encoded = LlemmaFamily(tokenizer).encode(SAMPLES[i])
    assert encoded.input_ids == ids and ids[0] == tokenizer.bos_token_id
    assert encoded.reward_pos == positions
    assert len(positions) == EXPECTED_COUNTS[i]
    newline = tokenizer.convert_tokens_to_ids("\n")
    # Every position starts a "\n" pair; the first is the pair right after "# Solution" (the N+1 shift).
    assert all(ids[p] == ids[p + 1] == newline for p in positions)
    solution = tokenizer.convert_tokens_to_ids("▁Solution")
    assert ids[positions[0] - 1] == solution


def test_empty_step_gives_overlapping_positions(tokenizer):
    positions = LlemmaFamily(tokenizer).encode(SAMPLES[0]).reward_pos
    # "3\n\n\n\nStep": three pair starts in a row, one token apart.
    assert positions[2:5] == [positions[2], positions[2] + 1, positions[2] + 2]


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_scores_and_labels_match_official(tokenizer, model, backend):
    family = LlemmaFamily(tokenizer)
    ours = packed_outputs(family, model, SAMPLES, backend=backend)
    official = [official_scores(model, tokenizer, t) for t in OFFICIAL_TEXTS]
    assert_all_match_official(ours, SAMPLES, official)


def test_mean_head_is_cached_and_follows_weight_updates(tokenizer, model):
    family = LlemmaFamily(tokenizer)
    first = family._mean_logit_head(model, torch.device("cpu"))
    assert family._mean_logit_head(model, torch.device("cpu"))[0] is first[0]
    weight = model.get_output_embeddings().weight
    with torch.no_grad():
        weight.add_(1.0)
    try:
        updated = family._mean_logit_head(model, torch.device("cpu"))
        torch.testing.assert_close(updated[0], first[0] + 1.0)
    finally:
        with torch.no_grad():
            weight.sub_(1.0)


def test_truncation_drops_late_rewards_like_the_adapter(tokenizer, model):
    family = LlemmaFamily(tokenizer)
    long = long_sample(12)
    text = LlemmaFamily.build_text(long)
    full = len(family.encode(long).input_ids)
    # A cut mid-text drops the late rewards; a cut between the two "\n" of the last pair keeps all N+1: the
    # official filter looks at the pair's start only (< max_length), on the positions found in the uncut ids.
    for max_length, kept in ((full // 2, range(1, len(long.steps) + 1)), (full - 1, [len(long.steps) + 1])):
        scores, labels = official_scores(model, tokenizer, text, max_length=max_length)
        assert len(scores) in kept
        ours = packed_outputs(family, model, [long, SAMPLES[1]], max_length=max_length)
        assert_validity_matches(ours[long.id], scores, labels)


def test_separator_merged_into_text_raises_unless_not_strict():
    merging = _tokenizer(added=("percent.\n\n",))
    sample = SAMPLES[0]
    with pytest.raises(FamilyError, match=r"llemma: sample 'correct_t0'.*finds 5 reward positions.*gives 6"):
        LlemmaFamily(merging).encode(sample)
    encoded = LlemmaFamily(merging, strict=False).encode(sample)
    assert encoded.reward_pos == official_positions(merging, OFFICIAL_TEXTS[0])[1]


def test_no_solution_separator_raises():
    merging = _tokenizer(added=("?\n\n# Solution\n\n",))
    with pytest.raises(FamilyError, match=r"llemma: sample 'correct_t1'.*no '\\n\\n' found"):
        LlemmaFamily(merging).encode(SAMPLES[1])


def test_tokenizer_without_newline_pair_raises():
    with pytest.raises(FamilyError, match=r"llemma: .*non-empty"):
        LlemmaFamily(_tokenizer(added=("\n\n",)))
    with pytest.raises(FamilyError, match="llemma.*unknown options"):
        LlemmaFamily(_tokenizer(), pair_softmax=True)


@pytest.mark.parametrize("name", ["ScalableMath/llemma-7b-prm-prm800k-level-1to3-hf",
                                  "ScalableMath/llemma-7b-oprm-metamath-level-1to3-hf"])
def test_matches_official_names(name):
    assert LlemmaFamily.matches(None, name)
    assert family_class("llemma") is LlemmaFamily


@pytest.mark.parametrize("name", ["EleutherAI/llemma_7b", "peiyi9979/math-shepherd-mistral-7b-prm",
                                  "RLHFlow/Llama3.1-8B-PRM-Mistral-Data", "Qwen/Qwen2.5-Math-PRM-7B"])
def test_does_not_match_others(name):
    assert not LlemmaFamily.matches(None, name)
