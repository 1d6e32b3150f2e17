"""Math-Shepherd (peiyi9979/math-shepherd-mistral-7b-prm), PRMBench adapter ``mr_eval/models/math_shepherd.py``.

Input (SPEC §3): ``f"{question} "`` followed, for every step i (from 1), by ``f"{step.strip()} ки\\n"`` when the
stripped step already starts with "Step" or "step", else by ``f"Step {i}: {step.strip()} ки\\n"``. The step text is
not passed through ``remove_step_prefix``: "Step 3. ..." is kept verbatim (and so is any step starting with
"Step"/"step", e.g. "Stepping back ..."), "0.15" keeps its integer part. The string is encoded with the tokenizer's
default special tokens (BOS for the Mistral tokenizer), untruncated; the collator truncates to ``max_length``.

Rewards are read at every token whose id equals the step-tag id, taken as the adapter takes it: the last id of
``encode("ки")`` (12902). Score = softmax over the two LM-head logits of ``encode("+ -")[1:]`` (the ids of "▁+" and
"▁-", 648 and 387, after the BOS), taking "+": two LM-head rows, never the (T, V) logits. Label: score > 0.5.
"""

from __future__ import annotations

from typing import Any

import torch

from ..data import Sample
from .base import Encoded, Family, FamilyError, StepPooling
from .heads import lm_head_pair_probability

STEP_TAG = "ки"
_GOOD_BAD = "+ -"
_NAME_MARKERS = ("math-shepherd", "math_shepherd")


class MathShepherdFamily(Family):
    """Math-Shepherd Mistral-7B PRM.

    Options:
        strict: (default True) raise :class:`FamilyError` when a sample's tag count is not its step count (the tag
            merged into neighbouring text, or "ки" inside the question or a step). ``strict=False`` keeps whatever the
            official rule finds, as the official adapter silently does.
    """

    name = "math_shepherd"
    auto_class = "AutoModelForCausalLM"

    def __init__(self, tokenizer: Any, *, strict: bool = True, **unknown: Any):
        if unknown:
            raise FamilyError(f"math_shepherd: unknown options {sorted(unknown)}; this family takes only strict=")
        super().__init__(tokenizer, strict=strict)
        self.strict = strict
        # Both derived exactly as the adapter derives them; the [1:] drops the BOS the encode adds.
        self.tag_id = tokenizer.encode(STEP_TAG)[-1]
        candidates = tokenizer.encode(_GOOD_BAD)[1:]
        if len(candidates) != 2:
            raise FamilyError(
                f"math_shepherd: encode({_GOOD_BAD!r})[1:] gives {candidates}, not the two ids of '+' and '-' "
                "(the official rule assumes a tokenizer that adds one BOS and writes '+' and ' -' as one token each)"
            )
        self.good_bad_ids = (int(candidates[0]), int(candidates[1]))

    @classmethod
    def matches(cls, config: Any, name_or_path: str) -> bool:
        lowered = str(name_or_path).lower()
        # MATH-Minos was trained on data converted from Math-Shepherd's; its names must not land here.
        return any(marker in lowered for marker in _NAME_MARKERS) and "minos" not in lowered

    @staticmethod
    def build_text(sample: Sample) -> str:
        """The string the official adapter encodes."""
        parts = []
        for i, step in enumerate(sample.steps, 1):
            text = step.strip()
            if text.startswith("Step") or text.startswith("step"):
                parts.append(f"{text} {STEP_TAG}\n")
            else:
                parts.append(f"Step {i}: {text} {STEP_TAG}\n")
        return f"{sample.question} " + "".join(parts)

    def texts(self, sample: Sample):
        return [(self.build_text(sample), True)]

    def encode(self, sample: Sample) -> Encoded:
        ids = self.tokens(self.build_text(sample), add_special_tokens=True)
        reward_pos = [p for p, token in enumerate(ids) if token == self.tag_id]
        if self.strict and len(reward_pos) != len(sample.steps):
            raise FamilyError(
                f"math_shepherd: sample {sample.id!r}: found the step tag {STEP_TAG!r} (id {self.tag_id}) "
                f"{len(reward_pos)} times for {len(sample.steps)} steps; the tokenizer merged the tag into "
                "neighbouring text or the text contains it (strict=False keeps the official, miscounted rewards)"
            )
        return Encoded(ids, reward_pos)

    def step_pooling(self) -> StepPooling:
        """At every tag, the softmax over the "+" and "-" LM-head rows (a head made of those rows); P("+")."""
        tokens = tuple(self.tokenizer.convert_ids_to_tokens(list(self.good_bad_ids)))
        # vLLM finds the rows by these spellings (convert_tokens_to_ids): they must lead back to the same ids.
        if list(self.tokenizer.convert_tokens_to_ids(list(tokens))) != list(self.good_bad_ids):
            raise FamilyError(f"math_shepherd: the tokens {tokens} do not map back to the ids {self.good_bad_ids}, "
                              "so a serving engine could not find the '+'/'-' LM-head rows by name")
        return StepPooling(self.tag_id, tokens, score_class=0)

    def step_scores(
        self, model: torch.nn.Module, hidden: torch.Tensor, step_pos: torch.Tensor, *, backend: str = "auto"
    ) -> dict[str, torch.Tensor]:
        return {"validity": lm_head_pair_probability(model, hidden, step_pos, self.good_bad_ids, backend=backend)}
