"""Qwen2.5-Math-PRM-7B / -72B (PRMBench adapter ``mr_eval/models/qwen_prm.py``, SPEC §3 and §7.2).

Input: a three-turn chat rendered by the tokenizer's chat template (``tokenize=False``, no generation prompt) and then
encoded with the tokenizer's defaults:

- system: the model card's prompt as the official adapter spells it. Its Python literal was not raw, so ``\\b`` of
  ``\\boxed`` is a BACKSPACE character (``"\\x08oxed{}"``); the official numbers were produced with that character.
- user: the question, verbatim.
- assistant: every step through ``clean_step`` (the official ``remove_step_prefix``) followed by ``<extra_0>``, joined
  with nothing in between.

Rewards: at every token whose id equals the id of ``<extra_0>`` (the official rule is ``input_ids == sep_id``), the
head ``score`` = Linear(h, h) -> ReLU -> Linear(h, 2) is applied to the gathered rows only, then softmax; the step score
is P(class 1). Label: score > 0.5.

Precision (:mod:`prmbench_fast.families.precision`, SPEC §2.6 item 9). The official run loads the model in bf16. By
default this family evaluates the head and the softmax in fp32 on the backbone's hidden states (the "exact" reading;
scores differ from a bf16 run by up to a few bf16 ulps). With a half-precision model, ``official_mixed_precision=
"bf16"`` runs the head in the model's dtype and the softmax in fp32, as the official run under the example accelerate
configs (``mixed_precision: bf16``); ``"no"`` (or ``official_rounding=True``) also rounds the probabilities to bf16,
as under ``mixed_precision: no``, which reproduces that setting's ties at 0.5.

Not reproduced: the official reader drops *every* exact zero of ``probs * mask`` before ``.view(-1, 2)``, so a
probability that underflows to 0 (a logit gap above ~90 in bf16) would shift all later scores of that sample. Real
checkpoints do not produce such gaps; this family reads position by position instead.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn
from transformers import Qwen2Model
from transformers.models.qwen2.modeling_qwen2 import Qwen2PreTrainedModel

from ..data import Sample
from ..kernels.step_reward import gather_step_hidden
from . import precision
from .base import Encoded, Family, FamilyError, StepPooling
from .text import clean_step

#: The official system prompt, byte for byte: "\b" in a non-raw Python string is the backspace character U+0008.
SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \x08oxed{}."
STEP_SEPARATOR = "<extra_0>"
_ARCHITECTURE = "Qwen2ForProcessRewardModel"
_NAME_MARKERS = ("qwen2.5-math-prm",)


class Qwen2ForProcessRewardModel(Qwen2PreTrainedModel):
    """Structure and state-dict keys of the remote-code ``Qwen2ForProcessRewardModel`` (``model.*``, ``score.0.*``,
    ``score.2.*``), so the real checkpoints load without ``trust_remote_code``.

    ``forward`` returns the per-token logits (B, T, 2) like the remote code's ``.logits``; prmbench_fast itself only
    uses ``model`` (the backbone) and ``score`` (the head).
    """

    def __init__(self, config):
        super().__init__(config)
        self.num_labels = 2
        self.model = Qwen2Model(config)
        self.score = nn.Sequential(
            nn.Linear(config.hidden_size, config.hidden_size),
            nn.ReLU(),
            nn.Linear(config.hidden_size, self.num_labels),
        )
        self.post_init()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        return self.score(hidden)


def _head_fp32(head: nn.Sequential, rows: torch.Tensor) -> torch.Tensor:
    """The head's logits computed in fp32 whatever the weights' dtype (no copy of the weights for an fp32 model)."""
    x = rows.float()
    for layer in head:
        if isinstance(layer, nn.Linear):
            bias = None if layer.bias is None else layer.bias.float()
            x = nn.functional.linear(x, layer.weight.float(), bias)
        else:
            x = layer(x)
    return x


class QwenPRMFamily(Family):
    """Qwen2.5-Math-PRM. Options: ``official_mixed_precision`` ("bf16" or "no") or ``official_rounding`` (bool),
    see the module docstring."""

    name = "qwen_prm"
    #: What the official adapter loads with; no transformers auto class builds this head without remote code, so
    #: load checkpoints with :meth:`load_model`.
    auto_class = "AutoModel"
    validity_threshold = 0.5

    def __init__(self, tokenizer: Any, **options: Any):
        unknown = set(options) - set(precision.OPTIONS)
        if unknown:
            raise FamilyError(f"qwen_prm: unknown options {sorted(unknown)}; known: {', '.join(precision.OPTIONS)}")
        super().__init__(tokenizer, **options)
        self.mixed_precision = precision.official_mixed_precision(self.name, options)
        # The official adapter takes encode("<extra_0>")[0] (with the tokenizer's default special tokens).
        ids = tokenizer.encode(STEP_SEPARATOR)
        if not ids or tokenizer.convert_ids_to_tokens(ids[0]) != STEP_SEPARATOR:
            raise FamilyError(
                f"qwen_prm: the tokenizer does not encode {STEP_SEPARATOR!r} as one token at the front "
                f"(got ids {ids}); a Qwen2.5-Math-PRM tokenizer is needed"
            )
        self.separator_id = ids[0]
        if getattr(tokenizer, "chat_template", None) is None:
            raise FamilyError("qwen_prm: the tokenizer has no chat template; a Qwen2.5-Math-PRM tokenizer is needed")

    @classmethod
    def load_model(cls, name_or_path: str, **from_pretrained_kwargs: Any) -> Qwen2ForProcessRewardModel:
        """The checkpoint loaded with :class:`Qwen2ForProcessRewardModel` (no remote code)."""
        return Qwen2ForProcessRewardModel.from_pretrained(name_or_path, **from_pretrained_kwargs)

    @classmethod
    def matches(cls, config: Any, name_or_path: str) -> bool:
        architectures = getattr(config, "architectures", None) or []
        lowered = str(name_or_path).lower()
        return _ARCHITECTURE in architectures or any(marker in lowered for marker in _NAME_MARKERS)

    def build_text(self, sample: Sample) -> str:
        """The conversation string the official adapter encodes."""
        steps = "".join(clean_step(step) + STEP_SEPARATOR for step in sample.steps)
        messages = [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": sample.question},
            {"role": "assistant", "content": steps},
        ]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)

    def encode(self, sample: Sample) -> Encoded:
        return self._encoded(sample, self.tokenizer.encode(self.build_text(sample)))

    def encode_many(self, samples: Sequence[Sample]) -> list[Encoded]:
        """``[self.encode(s) for s in samples]`` with one tokenizer call: ``encode(text)`` is
        ``tokenizer(text)["input_ids"]``, which a batch gives every text alike (each conversation is its own text)."""
        if not samples:
            return []
        texts = [self.build_text(sample) for sample in samples]
        ids = self.tokenizer(texts, return_attention_mask=False)["input_ids"]
        return [self._encoded(sample, sample_ids) for sample, sample_ids in zip(samples, ids)]

    def _encoded(self, sample: Sample, ids) -> Encoded:
        ids = list(ids)
        reward_pos = [i for i, token in enumerate(ids) if token == self.separator_id]
        # The official rule reads at every separator id; PRMBench texts never contain "<extra_0>" themselves, so
        # anything but one separator per step means the tokenizer split or merged it.
        if len(reward_pos) != len(sample.steps):
            raise FamilyError(
                f"qwen_prm: sample {sample.id!r}: found {len(reward_pos)} {STEP_SEPARATOR!r} tokens for "
                f"{len(sample.steps)} steps"
            )
        return Encoded(input_ids=ids, reward_pos=reward_pos)

    def step_pooling(self) -> StepPooling:
        """vLLM's ``Qwen2ForProcessRewardModel`` at every ``<extra_0>``: the checkpoint's own head, P(class 1)."""
        if self.mixed_precision is not None:
            raise FamilyError(f"qwen_prm: official_mixed_precision={self.mixed_precision!r} is a reading of the torch "
                              "engine; a serving engine runs the head in the weights' dtype (use engine='torch')")
        return StepPooling(self.separator_id, None, score_class=1)

    def step_scores(
        self, model: torch.nn.Module, hidden: torch.Tensor, step_pos: torch.Tensor, *, backend: str = "auto"
    ) -> dict[str, torch.Tensor]:
        head = model.score
        rows = gather_step_hidden(hidden, step_pos)
        dtype = head[0].weight.dtype
        if precision.applies(self.mixed_precision, dtype):
            probs = precision.official_probabilities(head, rows, dtype, self.mixed_precision)
        else:
            probs = torch.softmax(_head_fp32(head, rows), dim=-1)
        return {"validity": probs[:, 1].float().contiguous()}
