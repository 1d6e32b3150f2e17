"""The reasoneval family against the official ``mr_eval/models/reasoneval.py`` construction, written out here."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, MistralConfig, PreTrainedTokenizerFast

from family_testing import bpe_tokenizer, hand_samples, packed_outputs, tiny_model
from prmbench_fast.data import Sample
from prmbench_fast.families import FamilyError, family_class
from prmbench_fast.families.reasoneval import ReasonEval7B, ReasonEval34B, ReasonEvalFamily, size_for


def _tokenizer(pad: str, name: str = "", bos_first: bool = True) -> PreTrainedTokenizerFast:
    """A Llama-style tokenizer: <unk> 0, <s> 1 (auto-added BOS), </s> 2."""
    corpus = [
        "Question:\nWhat is 0.15 of 20?\nAnswer:\nLet's think step by step.\n", "The rate is 15 percent. We get 3."
    ] * 4
    fast = bpe_tokenizer(
        corpus, pre_tokenizer="byte_level", vocab_size=300,
        special_tokens=["<unk>", "<s>", "</s>"] if bos_first else ["<s>", "<unk>", "</s>"], add_bos=True,
        bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token=pad,
    )  # fmt: skip
    fast.name_or_path = name
    return fast


@pytest.fixture(scope="module")
def tok7():
    return _tokenizer(pad="<s>")


@pytest.fixture(scope="module")
def tok34():
    return _tokenizer(pad="<unk>")


SAMPLES = hand_samples()
CLEANED = [
    ["The rate is 15 percent.", "15 * 20 = 3", "", "We get\n\n3."],
    ["Yes."],
    ["Add 3 and 3 to get 6.", "Step 2: 6 + 6 = 12", ""],
]


def official_text(sample: Sample, cleaned: list[str], pad: str) -> str:
    prompt = f"Question:\n{sample.question}\nAnswer:\nLet's think step by step.\n"
    return prompt + pad + "".join(c + pad for c in cleaned)


def official_input(tokenizer, text: str, size: str):
    """``getitem_function``'s separator removal and index arithmetic, written out."""
    tokenized = tokenizer(text)["input_ids"]
    separator_id = tokenizer(tokenizer.pad_token)["input_ids"][-1]
    indices, adjusted, count = [], [], 0
    for idx, token_id in enumerate(tokenized):
        if token_id == separator_id:
            indices.append(idx - 1 - count)
            count += 1
        else:
            adjusted.append(token_id)
    if size == "7B":
        return [1] + adjusted, indices[2:]
    return adjusted, indices[1:]


def test_text_is_the_official_string(tok7, tok34):
    for tokenizer, pad in ((tok7, "<s>"), (tok34, "<unk>")):
        family = ReasonEvalFamily(tokenizer, size="7B" if pad == "<s>" else "34B")
        for sample, cleaned in zip(SAMPLES, CLEANED):
            assert family.build_text(sample) == official_text(sample, cleaned, pad)
    assert ReasonEvalFamily(tok34, size="34B").build_text(SAMPLES[1]) == (
        "Question:\nShort?\nAnswer:\nLet's think step by step.\n<unk>Yes.<unk>"
    )


@pytest.mark.parametrize("size", ["7B", "34B"])
def test_ids_and_indices(tok7, tok34, size):
    tokenizer = tok7 if size == "7B" else tok34
    family = ReasonEvalFamily(tokenizer, size=size)
    for sample, cleaned in zip(SAMPLES, CLEANED):
        ids, indices = official_input(tokenizer, official_text(sample, cleaned, tokenizer.pad_token), size)
        encoded = family.encode(sample)
        assert encoded.input_ids == ids
        assert encoded.reward_pos == indices
        assert len(indices) == len(sample.steps)
        assert tokenizer.pad_token_id not in ids[1:]
        # SPEC §3: the 34B index is the last token of the step, the 7B one the token before it.
        shift = 1 if size == "7B" else 0
        for index, step in zip(indices, cleaned):
            if step:
                assert tokenizer.decode(ids[: index + 1 + shift], skip_special_tokens=True).endswith(step)


def test_auto_size(tok7, tok34):
    assert ReasonEvalFamily(tok7).size == "7B"  # pad == BOS: only the 7B arithmetic yields N indices
    assert ReasonEvalFamily(tok34).size == "34B"
    assert ReasonEvalFamily(_tokenizer(pad="<s>", name="GAIR/ReasonEval-7B")).size == "7B"
    assert size_for(MistralConfig(), "") == "7B"
    assert size_for(LlamaConfig(), "") == "34B"
    assert size_for(None, "GAIR/ReasonEval-34B") == "34B"
    assert size_for(LlamaConfig(architectures=["ReasonEval_7B"]), "") == "7B"


# -- scores and labels ------------------------------------------------------------------------------------------------
def _model(size: str, vocab: int):
    if size == "7B":
        model = tiny_model(ReasonEval7B, vocab, score_dimension=3, use_bias=True)
    else:
        model = tiny_model(ReasonEval34B, vocab, score_dim=3, bias=True)
    with torch.no_grad():
        model.score_head.weight.mul_(100.0)  # spread the random probabilities
    return model


def official_scores(model, ids: list[int], indices: list[int]):
    """``respond`` for one unpadded sample: the index gather, softmax, Python-float sums and comparisons."""
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        scores = model(input_ids, torch.ones_like(input_ids))
    probs = torch.softmax(scores[0, indices, :], dim=-1).tolist()
    validity = [p[1] + p[2] for p in probs]
    redundancy = [p[1] for p in probs]
    return validity, redundancy, [v > 0.5 for v in validity], [r > 0.15 for r in redundancy]


@pytest.mark.parametrize("size", ["7B", "34B"])
def test_packed_scores_equal_the_official_reading(tok7, tok34, size):
    tokenizer = tok7 if size == "7B" else tok34
    model = _model(size, len(tokenizer))
    family = ReasonEvalFamily(tokenizer, size=size)
    got = packed_outputs(family, model, SAMPLES, backend="torch")
    for sample, cleaned in zip(SAMPLES, CLEANED):
        ids, indices = official_input(tokenizer, official_text(sample, cleaned, tokenizer.pad_token), size)
        validity, redundancy, v_labels, r_labels = official_scores(model, ids, indices)
        # fp32 both ways; packed per-segment attention vs one full forward differ by ~1e-6 in the hidden states.
        scores, labels = got[sample.id]
        torch.testing.assert_close(scores["validity"], torch.tensor(validity), atol=2e-5, rtol=0)
        torch.testing.assert_close(scores["redundancy"], torch.tensor(redundancy), atol=2e-5, rtol=0)
        assert labels["validity"].tolist() == v_labels
        assert labels["redundancy"].tolist() == r_labels


def test_truncation_drops_late_indices(tok34):
    model = _model("34B", len(tok34))
    family = ReasonEvalFamily(tok34, size="34B")
    sample, cleaned = SAMPLES[2], CLEANED[2]
    encoded = family.encode(sample)
    max_length = encoded.reward_pos[0] + 1
    got = packed_outputs(family, model, [sample], max_length=max_length, backend="torch")
    ids, indices = official_input(tok34, official_text(sample, cleaned, "<unk>"), "34B")
    kept = [i for i in indices if i < max_length]  # the official filter, then the collator's cut
    validity, redundancy, _, _ = official_scores(model, ids[:max_length], kept)
    assert len(kept) == 1
    torch.testing.assert_close(got[sample.id].scores["validity"], torch.tensor(validity), atol=2e-5, rtol=0)


class _HeadOnly(torch.nn.Module):
    """A model whose score_head turns one-hot hidden rows into chosen logits."""

    def __init__(self, logits: torch.Tensor, dtype=torch.float32):
        super().__init__()
        self.score_head = torch.nn.Linear(logits.shape[0], 3, bias=False).to(dtype)
        with torch.no_grad():
            self.score_head.weight.copy_(logits.T)


def test_validity_and_redundancy_labels_compare_like_python_floats(tok34):
    family = ReasonEvalFamily(tok34, size="34B")
    # Row 0: p = [0.5, 1.03e-9, 0.5]; the official Python sum is 0.500000001 > 0.5, but in float32 it is 0.5.
    logits = torch.tensor([[0.0, -20.0, 0.0], [2.0, 1.0, -3.0]])
    scores = family.step_scores(_HeadOnly(logits), torch.eye(2), torch.tensor([0, 1]))
    probs = torch.softmax(logits, dim=-1)
    assert float(probs[0, 1] + probs[0, 2]) == 0.5  # float32 addition loses the label...
    assert float(probs[0, 1]) + float(probs[0, 2]) > 0.5  # ...that the official float64 sum keeps
    labels = family.step_labels(scores, torch.tensor([0, 2], dtype=torch.int32))
    assert labels["validity"].tolist() == [float(p[1]) + float(p[2]) > 0.5 for p in probs]
    # Redundancy exactly float32(0.15) = 0.15000000596: above 0.15 for the official Python comparison.
    redundancy = torch.tensor([0.15, 0.1499], dtype=torch.float32)
    cu_steps = torch.tensor([0, 2], dtype=torch.int32)
    labels = family.step_labels({"validity": torch.zeros(2), "redundancy": redundancy}, cu_steps)
    assert labels["redundancy"].tolist() == [float(r) > 0.15 for r in redundancy] == [True, False]


def test_official_rounding_gives_bf16_probabilities(tok7):
    model = _model("7B", len(tok7)).to(torch.bfloat16)
    family = ReasonEvalFamily(tok7, size="7B", official_rounding=True)
    torch.manual_seed(1)
    hidden = torch.randn(12, 64).to(torch.bfloat16)
    step_pos = torch.tensor([0, 4, 11])
    got = family.step_scores(model, hidden, step_pos)
    with torch.no_grad():
        probs = torch.softmax(model.score_head(hidden)[step_pos], dim=-1).tolist()  # bf16 as the official
    assert got["redundancy"].tolist() == [p[1] for p in probs]
    assert got["validity"].tolist() == [float(torch.tensor(p[1] + p[2], dtype=torch.float32)) for p in probs]


def test_official_mixed_precision_bf16_gives_fp32_probabilities(tok7):
    """accelerate ``mixed_precision: bf16``: bf16 logits converted to fp32, softmax in fp32, Python-float sums."""
    model = _model("7B", len(tok7)).to(torch.bfloat16)
    torch.manual_seed(1)
    hidden = torch.randn(12, 64).to(torch.bfloat16)
    step_pos = torch.tensor([0, 4, 11])
    got = ReasonEvalFamily(tok7, size="7B", official_mixed_precision="bf16").step_scores(model, hidden, step_pos)
    with torch.no_grad():
        probs = torch.softmax(model.score_head(hidden)[step_pos].float(), dim=-1).tolist()
    assert got["redundancy"].tolist() == [p[1] for p in probs]
    assert got["validity"].tolist() == [float(torch.tensor(p[1] + p[2], dtype=torch.float32)) for p in probs]
    legacy = ReasonEvalFamily(tok7, size="7B", official_rounding=True).step_scores(model, hidden, step_pos)
    rounded = ReasonEvalFamily(tok7, size="7B", official_mixed_precision="no").step_scores(model, hidden, step_pos)
    assert torch.equal(legacy["redundancy"], rounded["redundancy"])
    assert not torch.equal(got["redundancy"], rounded["redundancy"])


def test_checkpoint_keys_round_trip(tmp_path, tok34):
    model = _model("34B", len(tok34))
    assert {"score_head.weight", "score_head.bias"} <= set(model.state_dict())
    assert all(k.startswith(("model.", "score_head.")) for k in model.state_dict())
    model.save_pretrained(tmp_path)
    loaded = ReasonEvalFamily.load_model(str(tmp_path))  # a Llama config -> the 34B class
    assert isinstance(loaded, ReasonEval34B)
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name


# -- selection and errors ---------------------------------------------------------------------------------------------
def test_registry_and_matches():
    assert family_class("reasoneval") is ReasonEvalFamily
    assert ReasonEvalFamily.matches(None, "GAIR/ReasonEval-7B")
    assert ReasonEvalFamily.matches(None, "GAIR/ReasonEval-34B")
    assert ReasonEvalFamily.matches(MistralConfig(architectures=["ReasonEval_7B"]), "/local/ckpt")
    mistral = MistralConfig(architectures=["MistralForCausalLM"])
    assert not ReasonEvalFamily.matches(mistral, "mistralai/Mistral-7B-v0.1")
    assert not ReasonEvalFamily.matches(LlamaConfig(architectures=["LlamaForCausalLM"]), "EleutherAI/llemma_34b")


def test_errors_name_the_family_and_sample(tok7, tok34):
    with pytest.raises(FamilyError, match="reasoneval.*7B.*BOS"):
        ReasonEvalFamily(tok34, size="7B")
    with pytest.raises(FamilyError, match="reasoneval.*7B.*BOS"):
        ReasonEvalFamily(_tokenizer(pad="<s>", bos_first=False), size="7B")  # BOS is not id 1
    with pytest.raises(FamilyError, match="reasoneval.*size"):
        ReasonEvalFamily(tok34, size="13B")
    with pytest.raises(FamilyError, match="reasoneval.*unknown options"):
        ReasonEvalFamily(tok34, rounding=True)
    # 34B arithmetic with a pad equal to BOS: N + 1 indices remain, the official assert fails.
    wrong = ReasonEvalFamily(tok7, size="34B")
    with pytest.raises(FamilyError, match="reasoneval.*correct_t1.*2 step indices for 1 steps"):
        wrong.encode(SAMPLES[1])
    with pytest.raises(FamilyError, match="reasoneval.*set up for 34B"):
        wrong.step_scores(_model("7B", len(tok7)), torch.zeros(3, 64), torch.tensor([0]))
    no_pad = _tokenizer(pad="<s>")
    no_pad.pad_token = None
    with pytest.raises(FamilyError, match="reasoneval.*pad_token"):
        ReasonEvalFamily(no_pad)
