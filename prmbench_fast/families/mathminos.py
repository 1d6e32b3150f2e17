"""MATH-Minos Mistral-7B PRM (``MistralForTokenClassification``, one label), PRMBench adapter
``mr_eval/models/mathminos_mistral.py``.

Input (SPEC §3): ``f"Human: {question}\\n\\nAssistant:"`` (no space after the colon) followed, for every step i
(from 1), by ``f"Step {i}: {clean_step(step)} и\\n"`` with the Cyrillic "и" as step tag and ``clean_step`` the official
``remove_step_prefix``. The adapter encodes it with the tokenizer's default special tokens (BOS) **and**
``max_length=2048, truncation=True``; :meth:`MathMinosFamily.encode` does the same (option ``max_length``), so the
collator's own cut at 2048 changes nothing afterwards.

Rewards are read at every token whose id equals the last id of ``encode("и")`` (839 with the MATH-Minos tokenizer).
Score: the raw token-classification logit (``model.score``, Linear(h, 1)), no activation. Label: score > 0.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..data import Sample
from ..kernels.step_reward import step_rewards
from .base import Encoded, Family, FamilyError
from .text import clean_step

STEP_TAG = "и"
_NAME_MARKERS = ("math-minos", "mathminos", "math_minos", "minos_mistral")
#: The adapter's encode truncation: the task config's generation max_length.
OFFICIAL_MAX_LENGTH = 2048


class MathMinosFamily(Family):
    """MATH-Minos Mistral-7B PRM.

    Options:
        max_length: (default 2048) the truncation the adapter applies while encoding.
        strict: (default True) raise :class:`FamilyError` when an untruncated sample's tag count is not its step count
            (the tag merged into neighbouring text, or "и" inside the question or a step). ``strict=False`` keeps
            whatever the official rule finds.
    """

    name = "mathminos"
    step_pooling_refusal = ("its checkpoint is a MistralForTokenClassification, which vLLM 0.32 has no model class "
                           "for, and its score is the raw logit, not a probability")
    takes_max_length = True
    auto_class = "AutoModelForTokenClassification"
    validity_threshold = 0.0
    threshold_range = None  # a raw logit

    def __init__(self, tokenizer: Any, *, max_length: int = OFFICIAL_MAX_LENGTH, strict: bool = True, **unknown: Any):
        if unknown:
            raise FamilyError(f"mathminos: unknown options {sorted(unknown)}; this family takes max_length=, strict=")
        if max_length < 1:
            raise FamilyError(f"mathminos: max_length must be >= 1, got {max_length}")
        super().__init__(tokenizer, max_length=max_length, strict=strict)
        self.max_length = max_length
        self.strict = strict
        # As the adapter: the last id of the tag's encoding (after the BOS the encode adds).
        self.tag_id = tokenizer.encode(STEP_TAG)[-1]

    @classmethod
    def matches(cls, config: Any, name_or_path: str) -> bool:
        lowered = str(name_or_path).lower()
        return any(marker in lowered for marker in _NAME_MARKERS)

    @staticmethod
    def build_text(sample: Sample) -> str:
        """The string the official adapter encodes."""
        steps = "".join(f"Step {i}: {clean_step(step)} {STEP_TAG}\n" for i, step in enumerate(sample.steps, 1))
        return f"Human: {sample.question}\n\nAssistant:{steps}"

    def encode(self, sample: Sample) -> Encoded:
        encoding = self.tokenizer(self.build_text(sample), max_length=self.max_length, truncation=True)
        return self._encoded(sample, encoding["input_ids"])

    def encode_many(self, samples: Sequence[Sample]) -> list[Encoded]:
        """``[self.encode(s) for s in samples]`` with one tokenizer call (same arguments; a batch truncates each text
        on its own, as a single call does)."""
        if not samples:
            return []
        texts = [self.build_text(sample) for sample in samples]
        ids = self.tokenizer(texts, max_length=self.max_length, truncation=True,
                             return_attention_mask=False)["input_ids"]
        return [self._encoded(sample, sample_ids) for sample, sample_ids in zip(samples, ids)]

    def _encoded(self, sample: Sample, ids) -> Encoded:
        ids = [int(t) for t in ids]
        reward_pos = [p for p, token in enumerate(ids) if token == self.tag_id]
        # After a cut, fewer tags than steps is the official behaviour; more is never right.
        truncated = len(ids) >= self.max_length
        wrong = len(reward_pos) > len(sample.steps) or (not truncated and len(reward_pos) != len(sample.steps))
        if self.strict and wrong:
            raise FamilyError(
                f"mathminos: sample {sample.id!r}: found the step tag {STEP_TAG!r} (id {self.tag_id}) "
                f"{len(reward_pos)} times for {len(sample.steps)} steps; the tokenizer merged the tag into "
                "neighbouring text or the text contains it (strict=False keeps the official, miscounted rewards)"
            )
        return Encoded(ids, reward_pos)

    def step_scores(
        self, model: torch.nn.Module, hidden: torch.Tensor, step_pos: torch.Tensor, *, backend: str = "auto"
    ) -> dict[str, torch.Tensor]:
        head = getattr(model, "score", None)
        if not isinstance(head, torch.nn.Linear) or head.out_features != 1:
            raise FamilyError(
                f"mathminos: the model needs a one-label token-classification head `score` (Linear(h, 1)), got "
                f"{type(model).__name__}.score = {head!r}; load it with AutoModelForTokenClassification"
            )
        return {"validity": step_rewards(hidden, step_pos, head.weight, head.bias, activation="none",
                                         backend=backend)[:, 0]}
