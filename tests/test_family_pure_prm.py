"""The pure_prm family against the official ``mr_eval/models/pure_prm.py`` construction, written out plainly here."""

from __future__ import annotations

import pytest
import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForTokenClassification

from prmbench_fast.data import Sample
from prmbench_fast.families import FamilyError, family_class
from prmbench_fast.families.pure_prm import PurePRMFamily
from prmbench_fast.packing import TokenizedSample, backbone_hidden_states, pack_batches


def _tokenizer(separator_token=True) -> PreTrainedTokenizerFast:
    corpus = ["What is 0.15 of 20? Step 1. The rate is 15 percent. We get 3.", "So 3 + 3 = 6. Add 3 and 3."] * 4
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    if separator_token:
        # Qwen2.5's vocabulary has "\n\n" as one token (271); here it is an added, non-special token.
        tok.add_tokens([AddedToken("\n\n", normalized=False)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


@pytest.fixture(scope="module")
def tokenizer():
    return _tokenizer()


def _sample(i: int, question: str, steps: tuple[str, ...]) -> Sample:
    return Sample(id=f"correct_t{i}", question=question, steps=steps, error_steps=(), classification="correct",
                  source_idx=f"t{i}")


SAMPLES = [
    _sample(0, "What is 0.15 of 20?", ("Step 1. The rate is 15 percent.", "0.15 * 20 = 3", "", "Step 3. We get\n\n3.")),
    _sample(1, "Short?", ("Yes.",)),
    _sample(2, "A longer question: what is 3 + 3 + 3 + 3?",
            ("  1. Add 3 and 3 to get 6. ", "Step 2: 6 + 6 = 12", "64.")),
]


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
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, num_labels=2,
    )
    prm = Qwen2ForTokenClassification(config).eval()
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


def _packed(family, model, encoded, *, max_length=2048):
    samples = [TokenizedSample(e.input_ids, e.reward_pos, key=i) for i, e in enumerate(encoded)]
    out = {}
    for batch in pack_batches(samples, max_length=max_length, batch_tokens=10_000):
        hidden = backbone_hidden_states(model, batch)
        scores = family.step_scores(model, hidden, batch.step_pos, backend="torch")
        labels = family.step_labels(scores, batch.cu_steps)
        cu = batch.cu_steps.tolist()
        for b, key in enumerate(batch.sample_keys):
            out[key] = (scores["validity"][cu[b]:cu[b + 1]], labels["validity"][cu[b]:cu[b + 1]])
    return out


def test_packed_scores_equal_the_official_reading(tokenizer, model):
    family = PurePRMFamily(tokenizer)
    got = _packed(family, model, [family.encode(s) for s in SAMPLES])
    all_labels = []
    for i, sample in enumerate(SAMPLES):
        expected = official_scores(model, *official_input(tokenizer, sample))
        # fp32 both ways; packed per-segment attention vs one full forward differ by ~1e-6 in the hidden states,
        # and p1 - p0 moves by at most twice the probabilities' change.
        torch.testing.assert_close(got[i][0], torch.tensor(expected), atol=2e-5, rtol=0)
        assert got[i][1].tolist() == [s > 0.0 for s in expected]
        all_labels += got[i][1].tolist()
    assert any(all_labels) and not all(all_labels), "the test model should give both labels"


def test_truncation_drops_late_separators(tokenizer, model):
    family = PurePRMFamily(tokenizer)
    sample = SAMPLES[2]
    encoded = family.encode(sample)
    max_length = encoded.reward_pos[1] + 1
    got = _packed(family, model, [encoded], max_length=max_length)
    input_ids, token_mask = official_input(tokenizer, sample)
    # The official respond() rebuilds the mask from the truncated attention mask: positions >= max_length vanish.
    expected = official_scores(model, input_ids[:max_length], token_mask[:max_length])
    assert len(expected) == 2
    torch.testing.assert_close(got[0][0], torch.tensor(expected), atol=2e-5, rtol=0)


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
