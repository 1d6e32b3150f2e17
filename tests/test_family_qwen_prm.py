"""The qwen_prm family against the official ``mr_eval/models/qwen_prm.py`` construction, written out plainly here."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerFast, Qwen2Config

from conftest import PRMBENCH_JSONL
from family_testing import bpe_tokenizer, hand_samples, make_sample, packed_outputs, tiny_model
from prmbench_fast import load_prmbench, score
from prmbench_fast.data import Sample
from prmbench_fast.families import FamilyError, family_class, precision
from prmbench_fast.families.qwen_prm import Qwen2ForProcessRewardModel, QwenPRMFamily

QWEN_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<extra_0>"]


def _tokenizer(specials=SPECIALS, template=QWEN_TEMPLATE) -> PreTrainedTokenizerFast:
    corpus = [
        "Please reason step by step, and put your final answer within \x08oxed{}.",
        "What is 0.15 of 20? The rate is 15 percent. We get 3. So the answer is 3.",
        "system user assistant\n",
    ] * 4
    return bpe_tokenizer(
        corpus, pre_tokenizer="byte_level", vocab_size=320, special_tokens=specials, chat_template=template,
        eos_token="<|im_end|>", pad_token="<|endoftext|>",
    )  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer():
    return _tokenizer()


SAMPLES = hand_samples()


# -- the official construction, written out ---------------------------------------------------------------------------
def official_text(sample: Sample) -> str:
    """``getitem_function``: remove_step_prefix, join with "<extra_0>", the three-turn chat, rendered, not tokenized."""
    # remove_step_prefix of these hand-made steps, spelled out.
    cleaned = {
        "Step 1. The rate is 15 percent.": "The rate is 15 percent.",
        "0.15 * 20 = 3": "15 * 20 = 3",
        "": "",
        "Step 3. We get\n\n3.": "We get\n\n3.",
        "Yes.": "Yes.",
        "  1. Add 3 and 3 to get 6. ": "Add 3 and 3 to get 6.",
        "Step 2: 6 + 6 = 12": "Step 2: 6 + 6 = 12",
        "64.": "",
    }
    steps = "".join(cleaned[s] + "<extra_0>" for s in sample.steps)
    return (
        "<|im_start|>system\nPlease reason step by step, and put your final answer within \x08oxed{}.<|im_end|>\n"
        f"<|im_start|>user\n{sample.question}<|im_end|>\n<|im_start|>assistant\n{steps}<|im_end|>\n"
    )


def official_ids(tokenizer, sample: Sample) -> tuple[list[int], int]:
    separator_id = tokenizer.encode("<extra_0>")[0]
    return tokenizer.encode(official_text(sample)), separator_id


def official_scores(model, input_ids: list[int], separator_id: int) -> list[float]:
    """``respond`` + ``make_step_rewards`` for one unpadded sample: full forward, probs * mask, drop zeros."""
    ids = torch.tensor([input_ids])
    with torch.no_grad():
        logits = model(ids, torch.ones_like(ids))
    probs = F.softmax(logits, dim=-1) * (ids == separator_id).unsqueeze(-1)
    sample = probs[0]
    return sample[sample != 0].view(-1, 2)[:, 1].tolist()


# -- input ------------------------------------------------------------------------------------------------------------
def test_text_is_the_official_string(tokenizer):
    family = QwenPRMFamily(tokenizer)
    for sample in SAMPLES:
        assert family.build_text(sample) == official_text(sample)
    # The backspace character, not a backslash: the official literal was not a raw string.
    assert "\x08oxed{}" in family.build_text(SAMPLES[0]) and "\\boxed" not in family.build_text(SAMPLES[0])


def test_ids_and_reward_positions(tokenizer):
    family = QwenPRMFamily(tokenizer)
    for sample in SAMPLES:
        ids, separator_id = official_ids(tokenizer, sample)
        encoded = family.encode(sample)
        assert encoded.input_ids == ids
        assert encoded.reward_pos == [i for i, t in enumerate(ids) if t == separator_id]
        assert len(encoded.reward_pos) == len(sample.steps)
    assert tokenizer.convert_ids_to_tokens(family.separator_id) == "<extra_0>"


# -- scores and labels ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model(tokenizer):
    prm = tiny_model(Qwen2ForProcessRewardModel, len(tokenizer))
    # A random head gives nearly the same score at every separator: spread the scores and centre them on the
    # threshold (median logit gap 0) so that both labels occur.
    with torch.no_grad():
        prm.score[2].weight.mul_(300.0)
        probs = torch.tensor([p for s in SAMPLES for p in official_scores(prm, *official_ids(tokenizer, s))])
        prm.score[2].bias[1] -= torch.quantile(torch.logit(probs.double()), 0.5).float()
    return prm


def _packed(family, model, samples, *, max_length=2048):
    """Our path (``family_testing.packed_outputs``), checking the dtypes of every sample's scores and labels."""
    got = packed_outputs(family, model, samples, max_length=max_length, backend="torch")
    for outputs in got.values():
        assert outputs.scores["validity"].dtype == torch.float32 and outputs.labels["validity"].dtype == torch.bool
    return got


def test_packed_scores_equal_the_official_reading(tokenizer, model):
    family = QwenPRMFamily(tokenizer)
    got = _packed(family, model, SAMPLES)  # all three samples in one packed row
    for sample in SAMPLES:
        ids, separator_id = official_ids(tokenizer, sample)
        expected = torch.tensor(official_scores(model, ids, separator_id))
        scores, labels = got[sample.id].scores["validity"], got[sample.id].labels["validity"]
        # fp32 both ways; packed per-segment attention vs one full forward differ by ~1e-6 in the hidden states
        # (TOOLCHAIN.md), and a softmax probability moves by at most that times the head's gain.
        torch.testing.assert_close(scores, expected, atol=1e-5, rtol=0)
        assert torch.equal(labels, torch.tensor([s > 0.5 for s in expected.tolist()]))
    all_labels = torch.cat([got[s.id].labels["validity"] for s in SAMPLES])
    assert all_labels.any() and not all_labels.all(), "the test model should give both labels"


def test_truncation_drops_late_separators_like_the_collator(tokenizer, model):
    family = QwenPRMFamily(tokenizer)
    sample = SAMPLES[0]
    encoded = family.encode(sample)
    max_length = encoded.reward_pos[1] + 1  # keeps the first two separators only (step 3 is empty: the third is next)
    got = _packed(family, model, [sample], max_length=max_length)
    ids, separator_id = official_ids(tokenizer, sample)
    expected = official_scores(model, ids[:max_length], separator_id)  # the collator cuts the ids, then the mask
    assert len(expected) == 2
    torch.testing.assert_close(got[sample.id].scores["validity"], torch.tensor(expected), atol=1e-5, rtol=0)


def test_official_rounding_gives_bf16_probabilities(tokenizer, model):
    """With a bf16 head: the official ``F.softmax`` of bf16 logits, exactly."""
    family = QwenPRMFamily(tokenizer, official_rounding=True)
    head_model = Qwen2ForProcessRewardModel(model.config).eval()
    head_model.load_state_dict(model.state_dict())
    head_model.to(torch.bfloat16)
    torch.manual_seed(1)
    hidden = torch.randn(20, model.config.hidden_size).to(torch.bfloat16)
    step_pos = torch.tensor([0, 5, 19])
    got = family.step_scores(head_model, hidden, step_pos)["validity"]
    with torch.no_grad():
        expected = F.softmax(head_model.score(hidden), dim=-1)[step_pos, 1].float()
    assert torch.equal(got, expected)
    exact = QwenPRMFamily(tokenizer).step_scores(head_model, hidden, step_pos)["validity"]
    torch.testing.assert_close(exact, expected, atol=2**-8, rtol=0)  # within a bf16 ulp or two of the official


def _bf16_head_model(model) -> Qwen2ForProcessRewardModel:
    head_model = Qwen2ForProcessRewardModel(model.config).eval()
    head_model.load_state_dict(model.state_dict())
    return head_model.to(torch.bfloat16)


def test_official_mixed_precision_bf16_gives_fp32_softmax_of_bf16_logits(tokenizer, model):
    """accelerate ``mixed_precision: bf16`` (the example configs): bf16 head, outputs converted to fp32, F.softmax."""
    head_model = _bf16_head_model(model)
    torch.manual_seed(1)
    hidden = torch.randn(20, model.config.hidden_size).to(torch.bfloat16)
    step_pos = torch.tensor([0, 5, 19])
    got = QwenPRMFamily(tokenizer, official_mixed_precision="bf16").step_scores(head_model, hidden, step_pos)
    with torch.no_grad():
        expected = F.softmax(head_model.score(hidden).float(), dim=-1)[step_pos, 1]
    assert torch.equal(got["validity"], expected)
    # mixed_precision "no" is the same softmax rounded to bf16, and official_rounding=True is its other spelling.
    rounded = QwenPRMFamily(tokenizer, official_mixed_precision="no").step_scores(head_model, hidden, step_pos)
    legacy = QwenPRMFamily(tokenizer, official_rounding=True).step_scores(head_model, hidden, step_pos)
    assert torch.equal(rounded["validity"], expected.to(torch.bfloat16).float())
    assert torch.equal(legacy["validity"], rounded["validity"])
    assert not torch.equal(got["validity"], rounded["validity"])  # the two official settings do differ


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(official_mixed_precision="fp16"), "must be 'bf16' or 'no'"),
        (dict(official_mixed_precision="bf16", official_rounding=True), "contradicts"),
    ],
)
def test_official_precision_options_are_checked(tokenizer, options, match):
    with pytest.raises(FamilyError, match=match):
        QwenPRMFamily(tokenizer, **options)


def test_official_mixed_precision_leaves_an_fp32_model_exact(tokenizer, model):
    hidden = torch.randn(6, model.config.hidden_size)
    step_pos = torch.tensor([1, 4])
    exact = QwenPRMFamily(tokenizer).step_scores(model, hidden, step_pos)["validity"]
    for setting in ("bf16", "no"):
        family = QwenPRMFamily(tokenizer, official_mixed_precision=setting)
        assert torch.equal(family.step_scores(model, hidden, step_pos)["validity"], exact)


def test_checkpoint_keys_round_trip(tmp_path, model):
    keys = set(model.state_dict())
    assert {"score.0.weight", "score.0.bias", "score.2.weight", "score.2.bias"} <= keys
    assert all(k.startswith(("model.", "score.")) for k in keys)
    model.save_pretrained(tmp_path)
    loaded = QwenPRMFamily.load_model(str(tmp_path))
    assert isinstance(loaded, Qwen2ForProcessRewardModel)
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name


# -- selection and errors ---------------------------------------------------------------------------------------------
def test_registry_and_matches():
    assert family_class("qwen_prm") is QwenPRMFamily
    prm_config = Qwen2Config(architectures=["Qwen2ForProcessRewardModel"])
    assert QwenPRMFamily.matches(prm_config, "/local/checkpoint")
    assert QwenPRMFamily.matches(None, "Qwen/Qwen2.5-Math-PRM-7B")
    assert QwenPRMFamily.matches(None, "Qwen/Qwen2.5-Math-PRM-72B")
    lm_config = Qwen2Config(architectures=["Qwen2ForCausalLM"])
    assert not QwenPRMFamily.matches(lm_config, "Qwen/Qwen2.5-Math-7B-Instruct")
    assert not QwenPRMFamily.matches(Qwen2Config(architectures=["Qwen2ForTokenClassification"]),
                                     "jinachris/Qwen2.5-Math-7B-PRM800K")
    assert not QwenPRMFamily.matches(Qwen2Config(architectures=["Qwen2ForPrmModel"]),
                                     "Skywork/Skywork-o1-Open-PRM-Qwen-2.5-7B")


def test_errors_name_the_family_and_sample(tokenizer):
    with pytest.raises(FamilyError, match="qwen_prm.*<extra_0>"):
        QwenPRMFamily(_tokenizer(specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"]))
    with pytest.raises(FamilyError, match="qwen_prm.*chat template"):
        QwenPRMFamily(_tokenizer(template=None))
    with pytest.raises(FamilyError, match="qwen_prm.*unknown options"):
        QwenPRMFamily(tokenizer, size="7B")
    family = QwenPRMFamily(tokenizer)
    bad = make_sample(9, "q", ("a step that spells <extra_0> itself",))
    with pytest.raises(FamilyError, match="qwen_prm.*correct_t9.*2 '<extra_0>' tokens for 1 steps"):
        family.encode(bad)


# -- official precision through score(): the official numbers, so no prefix sharing by default ------------------------
OFFICIAL_MAX_LENGTH = 800  # byte-level ids of this tiny tokenizer: the template, the question and several steps


@pytest.mark.parametrize(
    "options, mode",
    [(dict(official_mixed_precision="bf16"), "bf16"), (dict(official_mixed_precision="no"), "no"),
     (dict(official_rounding=True), "no")],
    ids=["bf16", "no", "official_rounding"],
)  # fmt: skip
def test_official_precision_through_score_gives_the_official_numbers(tokenizer, model, options, mode):
    # Complete problem groups: every variant of a problem shares its template, question and first steps, so prefix
    # sharing would apply. It computes a prefix's keys in a forward call of another shape, which moves bf16 hidden
    # states by up to a bf16 ulp, so with an official precision asked for, score() does not share by default.
    data = load_prmbench(PRMBENCH_JSONL, limit_per_class=1)
    bf16 = _bf16_head_model(model)
    with pytest.warns(UserWarning, match="official_mixed_precision=.*prefix sharing"):
        report = score(bf16, data, tokenizer=tokenizer, family="qwen_prm", max_length=OFFICIAL_MAX_LENGTH,
                       progress=False, **options)  # fmt: skip
    assert report.run["prefix_sharing"] is False and "share_prefixes=True" in report.run["prefix_sharing_note"]
    family = QwenPRMFamily(tokenizer)
    official, steps = {}, 0
    for sample in data:
        ids = torch.tensor([family.encode(sample).input_ids[:OFFICIAL_MAX_LENGTH]])
        with torch.no_grad():
            logits = bf16(ids, torch.ones_like(ids))  # the official respond(): bf16 head logits
        probs = F.softmax(logits.float() if mode == "bf16" else logits, dim=-1)[0, ids[0] == family.separator_id, 1]
        official[sample.id] = probs.float().tolist()
        steps += len(official[sample.id])
        # Bit for bit: the same bf16 forward, one sample per segment, and the official softmax and rounding.
        assert report.predictions[sample.id]["scores"]["step_level_validity_scores"] == official[sample.id], sample.id
    assert steps > 50
    # Asked for explicitly, sharing runs (and, in bf16, is what moves the numbers off the official ones).
    shared = score(bf16, data, tokenizer=tokenizer, family="qwen_prm", max_length=OFFICIAL_MAX_LENGTH, progress=False,
                   share_prefixes=True, **options)  # fmt: skip
    assert shared.run["prefix_sharing"] and shared.run["prefix_sharing_note"] is None
    assert shared.run["tokens_computed"] < shared.run["tokens"]
    moved = sum(shared.predictions[i]["scores"]["step_level_validity_scores"] != official[i] for i in official)
    assert moved > 0


@pytest.mark.parametrize("family_name, options", [
    ("qwen_prm", {}), ("pure_prm", {}), ("reasoneval", {"size": "7B"}),
])  # fmt: skip
def test_only_an_official_precision_turns_sharing_off(tokenizer, family_name, options):
    cls = family_class(family_name)
    assert precision.prefix_sharing_note(object()) is None
    for asked in (dict(official_mixed_precision="bf16"), dict(official_mixed_precision="no"),
                  dict(official_rounding=True)):  # fmt: skip
        family = cls.__new__(cls)
        family.name, family.mixed_precision = family_name, precision.official_mixed_precision(family_name, asked)
        assert family_name in precision.prefix_sharing_note(family)
    family.mixed_precision = None
    assert precision.prefix_sharing_note(family) is None
