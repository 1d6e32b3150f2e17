"""The rlhflow family against the official ``mr_eval/models/llama3_1_8b_prm.py`` construction, written out plainly."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from family_testing import (
    assert_all_match_official, assert_validity_matches, bpe_tokenizer, hand_samples, long_sample, packed_outputs,
    tiny_model,
)
from prmbench_fast.families import FamilyError, family_class
from prmbench_fast.families.rlhflow import RLHFlowFamily

# family_testing's ATOL/RTOL hold for this family: the full-vocabulary softmax of the step rows is computed in fp32 from
# the same logits.

# The Llama-3 chat layout (without 3.1's default system block): BOS in the template, turns trimmed.
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def _tokenizer(specials=SPECIALS, template=LLAMA3_TEMPLATE, eos="<|eot_id|>") -> PreTrainedTokenizerFast:
    turn = "<|start_header_id|>{}<|end_header_id|>\n\n{}<|eot_id|>"
    corpus = [
        turn.format("user", "What is 0.15 of 20? The rate is 15 percent.") + turn.format("assistant", "+"),
        turn.format("user", "A longer question: add 3 and 3 to get 6. step 2: 6 + 6 = 12 - 64.")
        + turn.format("assistant", "-"),
    ] * 5
    return bpe_tokenizer(
        corpus, pre_tokenizer="llama3", vocab_size=400, special_tokens=specials, chat_template=template,
        bos_token="<|begin_of_text|>", eos_token=eos, pad_token="<|end_of_text|>",
    )  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer():
    return _tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    model = tiny_model(LlamaForCausalLM, len(tokenizer), initializer_range=0.2)
    # A "+" row much larger than the others, so that P("+") over the whole vocabulary takes both sides of 0.5.
    with torch.no_grad():
        model.lm_head.weight[tokenizer.convert_tokens_to_ids("+")] = 3 * torch.randn(64)
    return model


SAMPLES = hand_samples(second_step="step 2: 6 + 6 = 12")


def _turns(*users: str) -> list[dict[str, str]]:
    pairs = (({"content": text, "role": "user"}, {"content": "+", "role": "assistant"}) for text in users)
    return [turn for pair in pairs for turn in pair]


# getitem_function's conversation for each sample, written by hand: remove_step_prefix on every step ("0.15" loses
# "0.", "64." becomes empty, "step 2:" stays), the question and a space in front of the first step.
OFFICIAL_CONVERSATIONS = [
    _turns("What is 0.15 of 20? The rate is 15 percent.", "15 * 20 = 3", "", "We get\n\n3."),
    _turns("Short? Yes."),
    _turns("A longer question: what is 3 + 3 + 3 + 3? Add 3 and 3 to get 6.", "step 2: 6 + 6 = 12", ""),
]


# -- the official construction, written out ---------------------------------------------------------------------------
def official_ids(tokenizer, conversation) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``apply_chat_template(conversation, return_tensors="pt")`` (transformers 4.x returned the ids; 5.x needs
    ``return_dict=False``), and the pattern / positive token: Llama-3 ids [128006, 78191, 128007, 271, 10, 128009]
    and 10, spelled here as this tokenizer's ids of the same tokens."""
    ids = tokenizer.apply_chat_template(conversation, return_tensors="pt", return_dict=False)
    while ids.ndim > 1:
        ids = ids[0]
    tokens = ["<|start_header_id|>", "assistant", "<|end_header_id|>", "ĊĊ", "+", "<|eot_id|>"]
    pattern = torch.tensor(tokenizer.convert_tokens_to_ids(tokens))
    return ids, pattern, tokenizer.convert_tokens_to_ids("+")


def find_subsequence(tensor: torch.Tensor, subsequence: torch.Tensor) -> list[int]:
    """``mr_eval/utils/model_utils.py::find_subsequence``: every start where the window equals the subsequence."""
    n = subsequence.size(0)
    return [i for i in range(tensor.size(0) - n + 1) if torch.equal(tensor[i:i + n], subsequence)]


def official_scores(model, tokenizer, conversation, max_length=2048, pair=False) -> tuple[list[float], list[bool]]:
    """``respond`` for one unpadded sample: the collator's cut, full logits, the pattern searched in the cut ids,
    read at match + 3, softmax over the whole vocabulary taking "+" (``pair``: RLHFlow's {+, -} softmax instead)."""
    ids, pattern, plus = official_ids(tokenizer, conversation)
    ids = ids[:max_length]
    with torch.no_grad():
        logits = model(ids[None]).logits[0]
    locations = [i + 3 for i in find_subsequence(ids, pattern)]
    reward_logits = logits[locations]
    if pair:
        minus = tokenizer.convert_tokens_to_ids("-")
        scores = reward_logits[:, [plus, minus]].softmax(dim=-1)[:, 0].tolist()
    else:
        scores = reward_logits.softmax(dim=-1)[:, plus].tolist()
    return scores, [s > 0.5 for s in scores]


# -- tests -------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("i", range(len(SAMPLES)))
def test_conversation_is_the_official_one(tokenizer, i):
    assert RLHFlowFamily.build_conversation(SAMPLES[i]) == OFFICIAL_CONVERSATIONS[i]


def test_rendered_text(tokenizer):
    text = tokenizer.apply_chat_template(RLHFlowFamily.build_conversation(SAMPLES[1]), tokenize=False)
    assert text == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nShort? Yes.<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n+<|eot_id|>"
    )


@pytest.mark.parametrize("i", range(len(SAMPLES)))
def test_ids_and_positions_are_official(tokenizer, i):
    ids, pattern, _ = official_ids(tokenizer, OFFICIAL_CONVERSATIONS[i])
    encoded = RLHFlowFamily(tokenizer).encode(SAMPLES[i])
    assert encoded.input_ids == ids.tolist()
    assert encoded.reward_pos == [p + 3 for p in find_subsequence(ids, pattern)]
    assert len(encoded.reward_pos) == len(SAMPLES[i].steps)
    assert all(ids[p].item() == tokenizer.convert_tokens_to_ids("ĊĊ") for p in encoded.reward_pos)


@pytest.mark.parametrize("backend", ["auto", "triton"])
@pytest.mark.parametrize("pair", [False, True])
def test_scores_and_labels_match_official(tokenizer, model, backend, pair):
    family = RLHFlowFamily(tokenizer, pair_softmax=pair)
    ours = packed_outputs(family, model, SAMPLES, backend=backend)
    official = [official_scores(model, tokenizer, c, pair=pair) for c in OFFICIAL_CONVERSATIONS]
    assert_all_match_official(ours, SAMPLES, official)


def test_truncation_needs_the_whole_pattern_like_the_adapter(tokenizer, model):
    """The adapter searches the pattern in the cut ids: a score whose pattern straddles the cut is lost even though
    its read position (match + 3) is inside."""
    long = long_sample(6)
    conversation = RLHFlowFamily.build_conversation(long)
    ids, pattern, _ = official_ids(tokenizer, conversation)
    match = find_subsequence(ids, pattern)[3]
    counts = []
    for max_length in (match + 4, match + 5, match + 6):  # read position kept in all three; pattern whole in the last
        scores, labels = official_scores(model, tokenizer, conversation, max_length=max_length)
        family = RLHFlowFamily(tokenizer, max_length=max_length)
        ours = packed_outputs(family, model, [long, SAMPLES[1]], max_length=max_length)
        assert_validity_matches(ours[long.id], scores, labels)
        counts.append(len(scores))
    assert counts == [3, 3, 4]


def test_template_that_renders_turns_differently_raises():
    spaced = LLAMA3_TEMPLATE.replace("'<|end_header_id|>\n\n' + message", "'<|end_header_id|>\n\n ' + message")
    with pytest.raises(FamilyError, match=r"rlhflow: sample 'correct_t1'.*occurs 0 times for 1 steps"):
        RLHFlowFamily(_tokenizer(template=spaced)).encode(SAMPLES[1])


def test_tokenizer_errors():
    with pytest.raises(FamilyError, match=r"rlhflow: .*<\|eot_id\|>"):
        RLHFlowFamily(_tokenizer(specials=[s for s in SPECIALS if s != "<|eot_id|>"], eos="<|end_of_text|>"))
    with pytest.raises(FamilyError, match="rlhflow: .*chat template"):
        RLHFlowFamily(_tokenizer(template=None))
    with pytest.raises(FamilyError, match="rlhflow.*unknown options"):
        RLHFlowFamily(_tokenizer(), strict=False)


@pytest.mark.parametrize("name", ["RLHFlow/Llama3.1-8B-PRM-Mistral-Data", "RLHFlow/Llama3.1-8B-PRM-Deepseek-Data",
                                  "/models/Llama3.1-8B-PRM-Deepseek-Data"])
def test_matches_official_names(name):
    assert RLHFlowFamily.matches(None, name)
    assert family_class("rlhflow") is RLHFlowFamily


@pytest.mark.parametrize("name", ["meta-llama/Llama-3.1-8B-Instruct", "peiyi9979/math-shepherd-mistral-7b-prm",
                                  "ScalableMath/llemma-7b-prm-prm800k-level-1to3-hf", "Qwen/Qwen2.5-Math-PRM-7B"])
def test_does_not_match_others(name):
    assert not RLHFlowFamily.matches(None, name)
