"""PURE: jinachris/Qwen2.5-Math-7B-PRM800K (PRMBench adapter ``mr_eval/models/pure_prm.py``, SPEC §3 and §7.3).

Input: token ids concatenated, every piece tokenized on its own without special tokens and without a chat template:
``tok(question) + tok(step_1) + tok("\\n\\n") + tok(step_2) + tok("\\n\\n") + ...``. The steps are the raw strings of
the data: no ``remove_step_prefix``, not even stripped, and nothing separates the question from step 1.

Rewards: at the "\\n\\n" token appended after each step, the 2-label token-classification head ``score`` gives
softmax probabilities (p0, p1); the step score is p1 - p0 in [-1, 1]. Label: score > 0.0.

The official code requires "\\n\\n" to be a single token (it calls ``.item()`` on its ids and asserts that every masked
input id equals it); :class:`PurePRMFamily` raises :class:`FamilyError` otherwise.

Precision (:mod:`prmbench_fast.families.precision`, SPEC §2.6 item 9): the official run loads bf16 weights. By default
the head and softmax run in fp32. With a half-precision model, ``official_mixed_precision="bf16"`` reproduces the
example accelerate configs (bf16 logits, fp32 softmax and difference); ``"no"`` (or ``official_rounding=True``)
reproduces ``mixed_precision: no`` (bf16 probabilities and a bf16 difference).
"""

from __future__ import annotations

from typing import Any

import torch

from ..data import Sample
from ..kernels.step_reward import gather_step_hidden, step_rewards
from . import precision
from .base import Encoded, Family, FamilyError

STEP_SEPARATOR = "\n\n"
_NAME_MARKERS = ("qwen2.5-math-7b-prm800k", "pure-prm")


class PurePRMFamily(Family):
    """PURE (Qwen2ForTokenClassification, 2 labels). Options: ``official_mixed_precision`` ("bf16" or "no") or
    ``official_rounding`` (bool), see the module docstring."""

    name = "pure_prm"
    step_pooling_refusal = "its checkpoint is a Qwen2ForTokenClassification, which vLLM 0.32 has no model class for"
    auto_class = "AutoModelForTokenClassification"
    validity_threshold = 0.0
    threshold_range = (-1.0, 1.0)  # p1 - p0

    def __init__(self, tokenizer: Any, **options: Any):
        unknown = set(options) - set(precision.OPTIONS)
        if unknown:
            raise FamilyError(f"pure_prm: unknown options {sorted(unknown)}; known: {', '.join(precision.OPTIONS)}")
        super().__init__(tokenizer, **options)
        self.mixed_precision = precision.official_mixed_precision(self.name, options)
        ids = self.tokens(STEP_SEPARATOR)
        if len(ids) != 1:
            raise FamilyError(
                f"pure_prm: the tokenizer encodes the step separator {STEP_SEPARATOR!r} as {len(ids)} tokens "
                f"({ids}); the official code needs exactly one"
            )
        self.separator_id = ids[0]

    @classmethod
    def load_model(cls, name_or_path: str, **from_pretrained_kwargs: Any) -> torch.nn.Module:
        """The checkpoint loaded with ``AutoModelForTokenClassification``, as the official adapter loads it."""
        from transformers import AutoModelForTokenClassification

        return AutoModelForTokenClassification.from_pretrained(name_or_path, **from_pretrained_kwargs)

    @classmethod
    def matches(cls, config: Any, name_or_path: str) -> bool:
        lowered = str(name_or_path).lower()
        if not any(marker in lowered for marker in _NAME_MARKERS):
            return False
        architectures = getattr(config, "architectures", None)
        # A config that names another architecture is not a PURE checkpoint, whatever its name says.
        return not architectures or "Qwen2ForTokenClassification" in architectures

    def texts(self, sample: Sample):
        return [(sample.question, False), *((step, False) for step in sample.steps)]

    def encode(self, sample: Sample) -> Encoded:
        ids = self.tokens(sample.question)
        reward_pos = []
        for step in sample.steps:
            ids.extend(self.tokens(step))
            reward_pos.append(len(ids))
            ids.append(self.separator_id)
        return Encoded(input_ids=ids, reward_pos=reward_pos)

    def step_scores(
        self, model: torch.nn.Module, hidden: torch.Tensor, step_pos: torch.Tensor, *, backend: str = "auto"
    ) -> dict[str, torch.Tensor]:
        head = model.score
        dtype = head.weight.dtype
        if precision.applies(self.mixed_precision, dtype):
            # The difference in the probabilities' dtype: bf16 under mixed_precision "no", fp32 under "bf16".
            rows = gather_step_hidden(hidden, step_pos)
            probs = precision.official_probabilities(head, rows, dtype, self.mixed_precision)
            return {"validity": (probs[:, 1] - probs[:, 0]).float()}
        probs = step_rewards(hidden, step_pos, head.weight, head.bias, activation="softmax", backend=backend)
        return {"validity": probs[:, 1] - probs[:, 0]}
