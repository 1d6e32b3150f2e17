"""``generic``: any PRM being trained, described by a step separator and a head, with no adapter to write.

Input (the TRL ``PRMTrainer`` convention): BOS (if the tokenizer has one) + question tokens, then for every step its
tokens followed by the separator's tokens; the reward is read at the last token of each (step + separator).
Head, in order of precedence:
- ``reward_tokens=("+", "-")``: P(first) under the softmax over those two LM-head rows (an LM-head PRM);
- ``head=module``: any module on the (S, H) gathered rows; an (S, 1) output goes through ``activation``
  ("sigmoid" by default, or "none"), an (S, 2) output is softmaxed and column 1 (the "correct" label) is the score;
- neither: the model's own token-classification head ``model.score`` (``AutoModelForTokenClassification``,
  2 labels), treated like ``head``.
Labels: ``score > threshold`` (0.5 by default).
"""

from __future__ import annotations

from typing import Any

import torch

from ..data import Sample
from ..kernels.step_reward import gather_step_hidden
from .base import Encoded, Family, FamilyError
from .heads import lm_head_pair_probability, single_token_id


class GenericPRM(Family):
    name = "generic"
    step_pooling_refusal = ("its head is whatever the caller describes (any module, LM-head rows, the model's own "
                           "head), read at the last token of a separator that may be several tokens")
    auto_class = "AutoModelForTokenClassification"

    def __init__(
        self,
        tokenizer: Any,
        *,
        step_separator: str = "\n",
        reward_tokens: tuple[str, str] | None = None,
        head: torch.nn.Module | None = None,
        activation: str = "sigmoid",
        threshold: float = 0.5,
    ):
        super().__init__(tokenizer, step_separator=step_separator, reward_tokens=reward_tokens, activation=activation,
                         threshold=threshold, head=None if head is None else type(head).__name__)
        if activation not in ("sigmoid", "none"):
            raise FamilyError(f"generic: activation must be 'sigmoid' or 'none', got {activation!r}")
        self.separator_ids = tokenizer(step_separator, add_special_tokens=False)["input_ids"]
        if not self.separator_ids:
            raise FamilyError(f"generic: the step separator {step_separator!r} encodes to no tokens")
        self.reward_token_ids = (
            None if reward_tokens is None else tuple(single_token_id(tokenizer, t, self.name) for t in reward_tokens)
        )
        self.bos_ids = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
        self.head = head
        self.activation = activation
        self.validity_threshold = threshold
        if reward_tokens is None and activation == "none":
            self.threshold_range = None  # a one-output head's raw value: any real number

    def texts(self, sample: Sample):
        return [(sample.question, False), *((step, False) for step in sample.steps)]

    def encode(self, sample: Sample) -> Encoded:
        ids = list(self.bos_ids) + self.tokens(sample.question)
        reward_pos = []
        for step in sample.steps:
            ids += self.tokens(step) + self.separator_ids
            reward_pos.append(len(ids) - 1)
        return Encoded(ids, reward_pos)

    def step_scores(self, model, hidden, step_pos, *, backend="auto"):
        if self.reward_token_ids is not None:
            return {"validity": lm_head_pair_probability(model, hidden, step_pos, self.reward_token_ids, backend=backend)}
        head = self.head if self.head is not None else getattr(model, "score", None)
        if head is None:
            raise FamilyError("generic: pass reward_tokens= or head=, or use a model with a token-classification head")
        out = head(gather_step_hidden(hidden, step_pos)).float()
        if out.dim() == 2 and out.shape[1] == 2:
            return {"validity": out.softmax(-1)[:, 1]}
        if not (out.dim() == 1 or (out.dim() == 2 and out.shape[1] == 1)):
            raise FamilyError(f"generic: the head must output (S,), (S, 1) or (S, 2) values, got {tuple(out.shape)}")
        out = out.reshape(-1)
        return {"validity": torch.sigmoid(out) if self.activation == "sigmoid" else out}
