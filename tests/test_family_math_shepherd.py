"""The math_shepherd family against the official ``mr_eval/models/math_shepherd.py`` construction, written plainly."""

from __future__ import annotations

import string

import pytest
import torch
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import MistralConfig, MistralForCausalLM, PreTrainedTokenizerFast

from prmbench_fast.data import Sample
from prmbench_fast.families import FamilyError, family_class
from prmbench_fast.families.math_shepherd import MathShepherdFamily
from prmbench_fast.packing import TokenizedSample, backbone_hidden_states, pack_batches

# fp32 end to end: the packed backbone differs from a one-sample forward by ~1e-6 (tests/test_packing.py), and a
# two-way softmax of logits of size ~1 does not amplify it.
ATOL, RTOL = 1e-5, 1e-4


def _tokenizer(merge_double_space: bool = False) -> PreTrainedTokenizerFast:
    """A Llama/Mistral-like sentencepiece BPE: "▁" for spaces and as a prefix, BOS added, "\\n" a token of its own.

    ``merge_double_space`` adds "  ки" as one token, so an empty step's tag is not found: a tokenizer that merges the
    tag into neighbouring text.
    """
    corpus = [
        "What is 0.15 of 20? Step 1: The rate is 15 percent. ки\nStep 2: We get 3. ки\n",
        "Add 3 and 3 to get 6. A longer question: step 2: 6 + 6 = 12 ки\n + - ки + -",
    ] * 5
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True),
        pre_tokenizers.Split("\n", behavior="isolated"),
    ])
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
        initial_alphabet=list(string.printable) + ["к", "и", "▁"],
    )
    tok.train_from_iterator(corpus, trainer)
    bos = ("<s>", tok.token_to_id("<s>"))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[bos])
    if merge_double_space:
        tok.add_tokens([AddedToken("  ки", normalized=False)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def tokenizer():
    tok = _tokenizer()
    # Preconditions of the official rule, as with the real tokenizer: the tag and "+"/"-" are single tokens.
    assert len(tok.encode("ки")) == 2 and len(tok.encode("+ -")) == 3
    return tok


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    config = MistralConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.2,
    )
    return MistralForCausalLM(config).eval()


def _sample(i: int, question: str, steps: tuple[str, ...]) -> Sample:
    return Sample(id=f"correct_t{i}", question=question, steps=steps, error_steps=(), classification="correct",
                  source_idx=f"t{i}")


SAMPLES = [
    _sample(0, "What is 0.15 of 20?", ("Step 1. The rate is 15 percent.", "0.15 * 20 = 3", "", "Step 3. We get\n\n3.")),
    _sample(1, "Short?", ("Yes.",)),
    _sample(2, "A longer question: what is 3 + 3 + 3 + 3?",
            ("  1. Add 3 and 3 to get 6. ", "step 2: 6 + 6 = 12", "64.")),
]

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


def packed_scores(family, model, samples, *, max_length=2048, batch_tokens=100_000, backend="auto"):
    """Our path: encode, pack, backbone hidden states, family scores and labels; per sample id."""
    encoded = [family.encode(s) for s in samples]
    tokenized = [TokenizedSample(e.input_ids, e.reward_pos, key=s.id) for e, s in zip(encoded, samples)]
    out = {}
    for batch in pack_batches(tokenized, max_length=max_length, batch_tokens=batch_tokens):
        hidden = backbone_hidden_states(model, batch)
        scores = family.step_scores(model, hidden, batch.step_pos, backend=backend)
        labels = family.step_labels(scores, batch.cu_steps)
        cu = batch.cu_steps.tolist()
        for b, key in enumerate(batch.sample_keys):
            out[key] = (scores["validity"][cu[b]:cu[b + 1]], labels["validity"][cu[b]:cu[b + 1]].tolist())
    return out


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
    ours = packed_scores(family, model, SAMPLES, backend=backend)
    all_labels = []
    for sample, text in zip(SAMPLES, OFFICIAL_TEXTS):
        scores, labels = official_scores(model, tokenizer, text)
        torch.testing.assert_close(ours[sample.id][0], torch.tensor(scores), atol=ATOL, rtol=RTOL)
        assert ours[sample.id][1] == labels
        all_labels += labels
    assert ours[SAMPLES[0].id][0].dtype == torch.float32
    assert any(all_labels) and not all(all_labels), "the fixture should exercise both labels"


def test_truncation_drops_late_rewards_like_the_collator(tokenizer, model):
    family = MathShepherdFamily(tokenizer)
    long = _sample(9, "What is 0.15 of 20?", tuple(f"We get {k}." for k in range(12)))
    text = MathShepherdFamily.build_text(long)
    full = len(family.encode(long).input_ids)
    max_length = full // 2
    scores, labels = official_scores(model, tokenizer, text, max_length=max_length)
    assert 0 < len(scores) < len(long.steps)
    ours = packed_scores(family, model, [long, SAMPLES[1]], max_length=max_length)
    torch.testing.assert_close(ours[long.id][0], torch.tensor(scores), atol=ATOL, rtol=RTOL)
    assert ours[long.id][1] == labels


def test_tag_merged_into_text_raises_unless_not_strict(tokenizer):
    merging = _tokenizer(merge_double_space=True)
    sample = SAMPLES[0]  # its empty step gives "Step 3:  ки", whose "▁▁ки" is one token here
    with pytest.raises(FamilyError, match=r"math_shepherd.*correct_t0"):
        MathShepherdFamily(merging).encode(sample)
    # strict=False keeps what the official rule finds: one tag fewer than steps.
    encoded = MathShepherdFamily(merging, strict=False).encode(sample)
    ids, tag, _ = official_ids(merging, OFFICIAL_TEXTS[0])
    assert encoded.reward_pos == torch.nonzero(ids == tag).flatten().tolist()
    assert len(encoded.reward_pos) == len(sample.steps) - 1


def test_tag_inside_the_question_raises(tokenizer):
    sample = _sample(5, "Why ки?", ("Yes.",))
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
