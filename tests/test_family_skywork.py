"""The skywork family against the official ``skywork_prm.py`` + skywork-o1-prm-inference ``prepare_input``."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from conftest import FIXTURES
from family_testing import bpe_tokenizer, hand_samples, make_sample, packed_outputs, tiny_model
from prmbench_fast.families import FamilyError, family_class
from prmbench_fast.families.skywork import SkyworkFamily, SkyworkPRMModel


def _tokenizer(bos="<|endoftext|>", tag_words=True) -> PreTrainedTokenizerFast:
    corpus = ["What is 0.15 of 20? Step 1: The rate is 15 percent. Step 2: We get 3.", "Step 3: So 3 + 3 = 6\n"] * 4
    if tag_words:
        corpus += ["ки ки ки ки", "ки\n"] * 4
    return bpe_tokenizer(
        corpus, pre_tokenizer="byte_level", vocab_size=300, special_tokens=["<|endoftext|>", "<|im_end|>"],
        bos_token=bos, eos_token="<|im_end|>", pad_token="<|endoftext|>",
    )  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer():
    return _tokenizer()


SAMPLES = hand_samples()
OFFICIAL_RESPONSES = [
    "Step 1: The rate is 15 percent. ки\nStep 2: 15 * 20 = 3 ки\nStep 3:  ки\nStep 4: We get\n\n3. ки\n",
    "Step 1: Yes. ки\n",
    "Step 1: Add 3 and 3 to get 6. ки\nStep 2: Step 2: 6 + 6 = 12 ки\nStep 3:  ки\n",
]


def official_prepare_input(problem: str, response: str, tokenizer, step_token: str = "ки"):
    """skywork-o1-prm-inference ``prepare_input``, written out: ids and reward flags."""
    prompt_ids = tokenizer.encode(tokenizer.bos_token + problem + "\n")
    reward_flags = [0] * len(prompt_ids)
    step_token_id = tokenizer.encode(step_token)[-1]
    response_ids = []
    for step in response.split(step_token):
        step_ids = tokenizer.encode(step) if step != "" else []
        step_ids = step_ids + [step_token_id]
        flag = [0] * len(step_ids)
        flag[-1] = 1
        response_ids += step_ids
        reward_flags += flag
    return prompt_ids + response_ids, reward_flags


def test_response_is_the_official_string():
    for sample, response in zip(SAMPLES, OFFICIAL_RESPONSES):
        assert SkyworkFamily.build_response(sample) == response


def test_ids_and_flags(tokenizer):
    family = SkyworkFamily(tokenizer)
    assert tokenizer.encode("ки", add_special_tokens=False) == [family.tag_id]
    for sample, response in zip(SAMPLES, OFFICIAL_RESPONSES):
        ids, flags = official_prepare_input(sample.question, response, tokenizer)
        encoded = family.encode(sample)
        assert encoded.input_ids == ids
        assert encoded.reward_pos == [i for i, f in enumerate(flags) if f == 1]
        assert len(encoded.reward_pos) == len(sample.steps) + 1  # the trailing "\n" piece gets a tag too


# -- scores and labels ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer):
    """A Skywork-style checkpoint: the causal LM's keys (model.*, lm_head.weight) plus v_head.summary.*."""
    lm = tiny_model(Qwen2ForCausalLM, len(tokenizer), tie_word_embeddings=False, architectures=["Qwen2ForPrmModel"])
    v_head = torch.nn.Linear(lm.config.hidden_size, 1)
    with torch.no_grad():
        v_head.weight.mul_(30.0)  # spread the random rewards over (0, 1)
    path = tmp_path_factory.mktemp("skywork")
    lm.config.save_pretrained(path)
    tensors = {k: v.contiguous() for k, v in lm.state_dict().items()}
    tensors.update({"v_head.summary.weight": v_head.weight.data, "v_head.summary.bias": v_head.bias.data})
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path, lm, v_head


def official_rewards(lm, v_head, ids, flags) -> list[float]:
    """``PRM_MODEL.forward(return_probs=True)`` + ``derive_step_rewards`` for one unpadded sample."""
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        out = lm(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), output_hidden_states=True)
        value = torch.sigmoid(v_head(out.hidden_states[-1]).squeeze(-1))
    positions = torch.nonzero(torch.tensor(flags) == 1).view(-1)
    return [value[0][positions[j]].item() for j in range(len(positions))]


def official_labels(scores: list[float]) -> list[bool]:
    judge = [scores[0]] + [scores[i] - scores[i - 1] for i in range(1, len(scores))]
    return [item > -0.05 for item in judge]


def test_packed_scores_equal_the_official_reading(tokenizer, checkpoint):
    path, lm, v_head = checkpoint
    model = SkyworkFamily.load_model(str(path)).eval()
    assert isinstance(model, SkyworkPRMModel)
    family = SkyworkFamily(tokenizer)
    got = packed_outputs(family, model, SAMPLES, backend="torch")
    for sample, response in zip(SAMPLES, OFFICIAL_RESPONSES):
        expected = official_rewards(lm, v_head, *official_prepare_input(sample.question, response, tokenizer))
        # fp32 both ways; packed per-segment attention vs one full forward differ by ~1e-6 in the hidden states.
        torch.testing.assert_close(got[sample.id].scores["validity"], torch.tensor(expected), atol=1e-5, rtol=0)
        assert got[sample.id].labels["validity"].tolist() == official_labels(expected)


def test_truncation_drops_late_tags(tokenizer, checkpoint):
    path, lm, v_head = checkpoint
    model = SkyworkFamily.load_model(str(path)).eval()
    family = SkyworkFamily(tokenizer)
    sample = SAMPLES[0]
    encoded = family.encode(sample)
    max_length = encoded.reward_pos[2] + 1
    got = packed_outputs(family, model, [sample], max_length=max_length, backend="torch")
    ids, flags = official_prepare_input(sample.question, OFFICIAL_RESPONSES[0], tokenizer)
    expected = official_rewards(lm, v_head, ids[:max_length], flags[:max_length])  # getitem_function cuts both
    assert len(expected) == 3
    torch.testing.assert_close(got[sample.id].scores["validity"], torch.tensor(expected), atol=1e-5, rtol=0)


def test_difference_labels_by_hand(tokenizer):
    """Hand-made fp32 scores, three samples (one empty) in one batch, against the official Python-float rule."""
    family = SkyworkFamily(tokenizer)
    # 0.0564088821... -> 0.0064088827...: the float64 difference is -0.04999999935 (> -0.05, label True) while a
    # float32 subtraction and comparison gives False; 0.25 -> 0.2 is -0.049999997 in float64 (True);
    # 0.55 -> 0.5 is -0.05000001 (False).
    a, b = float.fromhex("0x1.ce1a000000000p-5"), float.fromhex("0x1.a403360000000p-8")
    per_sample = [[0.9, a, b, 0.25, 0.2], [], [0.55, 0.5, 0.51, 0.3]]
    values = torch.tensor([v for s in per_sample for v in s], dtype=torch.float32)
    cu_steps = torch.tensor([0, 5, 5, 9], dtype=torch.int32)
    labels = family.step_labels({"validity": values}, cu_steps)["validity"]
    expected = []
    for s in per_sample:
        if s:
            expected += official_labels([float(torch.tensor(v, dtype=torch.float32)) for v in s])
    assert labels.tolist() == expected
    assert expected[2] is True and expected[4] is True and expected[6] is False
    # A batch without any score (every sample empty or truncated away).
    empty = family.step_labels({"validity": torch.zeros(0)}, torch.zeros(3, dtype=torch.int32))["validity"]
    assert empty.shape == (0,) and empty.dtype == torch.bool
    naive = (values[2] - values[1]) > -0.05
    assert not bool(naive), "the float32 rule would flip this label"


def test_labels_reproduce_the_official_skywork_run():
    """The official Skywork-7B scores and labels of 1,000 samples (fixtures): the label rule gives the same labels."""
    family_cls = SkyworkFamily
    scores, labels, lengths = [], [], []
    with open(FIXTURES / "skywork7b_detailed_logs_first1000.jsonl") as handle:
        for line in handle:
            prediction = json.loads(line)["prediction"]["scores"]
            scores += prediction["step_level_validity_scores"]
            labels += prediction["step_level_validity_labels"]
            lengths.append(len(prediction["step_level_validity_scores"]))
    cu_steps = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    # The logged scores are float32 values printed as Python floats: converting back is exact.
    values = torch.tensor(scores, dtype=torch.float32)
    assert values.double().tolist() == scores
    got = family_cls.step_labels(family_cls.__new__(family_cls), {"validity": values}, cu_steps)["validity"]
    assert got.tolist() == labels


# -- selection and errors ---------------------------------------------------------------------------------------------
def test_registry_and_matches():
    assert family_class("skywork") is SkyworkFamily
    assert SkyworkFamily.matches(Qwen2Config(architectures=["Qwen2ForPrmModel"]), "/local/prm")
    assert SkyworkFamily.matches(None, "Skywork/Skywork-o1-Open-PRM-Qwen-2.5-1.5B")
    assert SkyworkFamily.matches(None, "Skywork/Skywork-o1-Open-PRM-Qwen-2.5-7B")
    assert not SkyworkFamily.matches(Qwen2Config(architectures=["Qwen2ForCausalLM"]), "Qwen/Qwen2.5-1.5B")
    assert not SkyworkFamily.matches(None, "Qwen/Qwen2.5-Math-PRM-7B")
    assert not SkyworkFamily.matches(None, "Skywork/Skywork-Reward-Llama-3.1-8B")


def test_errors_name_the_family_and_sample(tokenizer):
    with pytest.raises(FamilyError, match="skywork.*bos_token"):
        SkyworkFamily(_tokenizer(bos=None))
    with pytest.raises(FamilyError, match="skywork.*several tokens"):
        SkyworkFamily(_tokenizer(tag_words=False))
    with pytest.raises(FamilyError, match="skywork.*unknown options"):
        SkyworkFamily(tokenizer, official_rounding=True)
    with pytest.raises(FamilyError, match="skywork.*correct_t7"):
        SkyworkFamily(tokenizer).encode(make_sample(7, "q", ("a step with ки inside",)))
