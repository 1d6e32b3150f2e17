"""Plumbing shared by the ``tests/test_family_*.py`` checks against the official adapters.

Only the generic parts live here: tiny tokenizers and models, the hand-made samples, and our packed scoring path.
Each test file keeps its own transcription of the official construction (the oracle), written out plainly, so that
the two sides of every comparison stay independent.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from typing import NamedTuple

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from prmbench_fast.data import Sample
from prmbench_fast.packing import TokenizedSample, backbone_hidden_states, pack_batches

# fp32 end to end: the packed backbone differs from a one-sample forward by ~1e-6 (tests/test_packing.py). Each test
# file that uses these says why its head does not amplify that difference.
ATOL, RTOL = 1e-5, 1e-4

# Llama 3's pre-tokenizer split: "\n\n" before "+" stays one chunk, so "\n\n" and "+" are one token each.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+"
)


# -- tokenizers -------------------------------------------------------------------------------------------------------
def bpe_tokenizer(
    corpus: Sequence[str],
    *,
    pre_tokenizer: str,
    vocab_size: int,
    special_tokens: Sequence[str] = ("<unk>", "<s>", "</s>"),
    extra_alphabet: Sequence[str] = (),
    add_bos: bool = False,
    added_tokens: Sequence[str] = (),
    chat_template: str | None = None,
    **wrapper_tokens: str | None,
) -> PreTrainedTokenizerFast:
    """A small BPE trained on ``corpus`` (deterministic for the same arguments), shaped like a real model's tokenizer.

    Args:
        pre_tokenizer: ``"sentencepiece"``, Llama/Mistral-like: "▁" for spaces and as a prefix, every "\\n" a token
            of its own (Llama's byte-fallback <0x0A>), printable characters plus ``extra_alphabet`` as the alphabet,
            ``<unk>`` for anything else. ``"byte_level"``: GPT-2/Qwen-like byte-level BPE. ``"llama3"``: byte-level
            behind :data:`LLAMA3_SPLIT`.
        special_tokens: trained first, so they take ids 0, 1, ... in this order.
        add_bos: prepend ``wrapper_tokens["bos_token"]`` to every sequence, as Llama's post-processor does.
        added_tokens: matched before anything else, as the real tokenizers' added tokens are; used to build
            tokenizers that merge a family's separator into neighbouring text.
        chat_template: set on the wrapper (``None``: no template).
        wrapper_tokens: ``bos_token=``, ``eos_token=``, ... for ``PreTrainedTokenizerFast``.
    """
    if pre_tokenizer == "sentencepiece":
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True),
            pre_tokenizers.Split("\n", behavior="isolated"),
        ])
        alphabet = list(string.printable) + ["▁", *extra_alphabet]
    elif pre_tokenizer in ("byte_level", "llama3"):
        tok = Tokenizer(models.BPE())
        if pre_tokenizer == "llama3":
            tok.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ])
        else:
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        raise ValueError(f"unknown pre_tokenizer {pre_tokenizer!r}")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(special_tokens), initial_alphabet=alphabet, show_progress=False,
    )  # fmt: skip
    tok.train_from_iterator(corpus, trainer)
    if add_bos:
        bos = wrapper_tokens["bos_token"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    tok.add_tokens([AddedToken(t, normalized=False) for t in added_tokens])
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, **wrapper_tokens)
    wrapped.chat_template = chat_template
    return wrapped


def llama_tokenizer(
    corpus: Sequence[str], *, vocab_size: int, extra_alphabet: Sequence[str] = (), added_tokens: Sequence[str] = ()
) -> PreTrainedTokenizerFast:
    """A Llama/Mistral-like tokenizer: :func:`bpe_tokenizer`'s ``"sentencepiece"`` kind, <unk> 0, <s> 1 (prepended
    to every sequence), </s> 2."""
    return bpe_tokenizer(
        corpus, pre_tokenizer="sentencepiece", vocab_size=vocab_size, extra_alphabet=extra_alphabet, add_bos=True,
        added_tokens=added_tokens, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
    )  # fmt: skip


# -- models -----------------------------------------------------------------------------------------------------------
def tiny_model(model_cls, vocab_size: int, **config):
    """A random fp32 ``model_cls`` in eval mode, seeded with 0, two layers of width 64; ``config`` adds to its config
    class's arguments (head sizes, ``initializer_range``, ...)."""
    torch.manual_seed(0)
    return model_cls(model_cls.config_class(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, **config,
    )).eval()  # fmt: skip


# -- samples ----------------------------------------------------------------------------------------------------------
def make_sample(i: int, question: str, steps: tuple[str, ...]) -> Sample:
    """A correct sample ``correct_t<i>`` (no error steps)."""
    return Sample(id=f"correct_t{i}", question=question, steps=steps, error_steps=(), classification="correct",
                  source_idx=f"t{i}")


def hand_samples(second_step: str = "Step 2: 6 + 6 = 12", more_steps: tuple[str, ...] = ()) -> list[Sample]:
    """The three samples each family's official strings are written against by hand.

    Sample 0 has an empty step and a "\\n\\n" inside a step, sample 1 a single step, sample 2 a step with leading
    spaces and a "1." prefix, then ``second_step`` (some files' official strings are written against "step 2: ...",
    the others' against "Step 2: ..."), "64." and ``more_steps``.
    """
    return [
        make_sample(0, "What is 0.15 of 20?",
                    ("Step 1. The rate is 15 percent.", "0.15 * 20 = 3", "", "Step 3. We get\n\n3.")),
        make_sample(1, "Short?", ("Yes.",)),
        make_sample(2, "A longer question: what is 3 + 3 + 3 + 3?",
                    ("  1. Add 3 and 3 to get 6. ", second_step, "64.", *more_steps)),
    ]


def long_sample(n_steps: int) -> Sample:
    """``correct_t9``, ``n_steps`` short steps: long enough for truncation tests to cut it mid-text."""
    return make_sample(9, "What is 0.15 of 20?", tuple(f"We get {k}." for k in range(n_steps)))


# -- our path ---------------------------------------------------------------------------------------------------------
class StepOutputs(NamedTuple):
    """One sample's slice of the packed batch's ``family.step_scores`` and ``family.step_labels``, by head name."""

    scores: dict[str, torch.Tensor]
    labels: dict[str, torch.Tensor]


def packed_outputs(family, model, samples, *, max_length: int = 2048, backend: str = "auto") -> dict[str, StepOutputs]:
    """Our path, as ``score()`` runs it: encode each sample, pack, backbone hidden states, family scores and labels,
    split per sample by ``cu_steps``; by sample id.

    The test samples are short, so ``batch_tokens`` is large enough to put all of them in one packed row: the
    comparison with one-sample official forwards then also checks that packed samples do not see each other.
    """
    encoded = [family.encode(s) for s in samples]
    tokenized = [TokenizedSample(e.input_ids, e.reward_pos, key=s.id) for e, s in zip(encoded, samples)]
    out = {}
    for batch in pack_batches(tokenized, max_length=max_length, batch_tokens=100_000):
        hidden = backbone_hidden_states(model, batch)
        scores = family.step_scores(model, hidden, batch.step_pos, backend=backend)
        labels = family.step_labels(scores, batch.cu_steps)
        cu = batch.cu_steps.tolist()
        for b, key in enumerate(batch.sample_keys):
            sl = slice(cu[b], cu[b + 1])
            out[key] = StepOutputs({k: v[sl] for k, v in scores.items()}, {k: v[sl] for k, v in labels.items()})
    return out


def assert_validity_matches(outputs: StepOutputs, scores: list[float], labels: list[bool]) -> None:
    """One sample's packed validity scores equal the official ones within ATOL/RTOL, and its labels exactly."""
    torch.testing.assert_close(outputs.scores["validity"], torch.tensor(scores), atol=ATOL, rtol=RTOL)
    assert outputs.labels["validity"].tolist() == labels


def assert_all_match_official(ours: dict[str, StepOutputs], samples, official) -> None:
    """``ours`` (:func:`packed_outputs`) against the official ``(scores, labels)`` of each of ``samples``, in order;
    also that the first sample's scores are fp32 and that the samples get both labels (else the label comparison
    would prove little)."""
    all_labels = []
    for sample, (scores, labels) in zip(samples, official, strict=True):
        assert_validity_matches(ours[sample.id], scores, labels)
        all_labels += labels
    assert ours[samples[0].id].scores["validity"].dtype == torch.float32
    assert any(all_labels) and not all(all_labels), "the fixture should exercise both labels"
