"""Skywork-o1-Open-PRM-Qwen-2.5-1.5B / -7B (PRMBench adapter ``mr_eval/models/skywork_prm.py``, SPEC §3 and §7.3).

Input, as the adapter builds it with ``prepare_input`` of ``SkyworkAI/skywork-o1-prm-inference``:

- response = concatenation over the steps of ``f"Step {i}: {clean_step(step)} ки\\n"`` (i from 1);
- ids = ``encode(bos_token + question + "\\n")``; then for every piece of ``response.split("ки")``:
  ``encode(piece)`` (nothing for an empty piece) followed by the tag id ``encode("ки")[-1]``, whose position is
  flagged as a reward position. All encodes use the tokenizer's default special tokens, as the original does.

The response ends with "ки\\n", so the last piece is "\\n" and gets a tag of its own: N steps give **N+1 rewards**
(the official scores have N+1 entries too, and the evaluator scores the extra label, SPEC §2.6 item 1).

Rewards: ``sigmoid(v_head(h))`` at the flagged positions, ``v_head`` = Linear(h, 1) (``v_head.summary``); the
official run is fp32. Labels compare differences of neighbouring scores: label[0] = score[0] > -0.05 and
label[i] = score[i] - score[i-1] > -0.05 within a sample. The official code subtracts Python floats, i.e. in float64,
so :meth:`SkyworkFamily.step_labels` does the same on device.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import Qwen2Model
from transformers.models.qwen2.modeling_qwen2 import Qwen2PreTrainedModel

from ..data import Sample
from ..kernels.step_reward import step_rewards
from .base import Encoded, Family, FamilyError
from .text import clean_step

STEP_TAG = "ки"
_ARCHITECTURE = "Qwen2ForPrmModel"
_NAME_MARKERS = ("skywork-o1-open-prm",)


class SkyworkValueHead(nn.Module):
    """The inference repo's ``ValueHead`` without dropout (inference only): ``summary`` = Linear(h, 1)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.summary = nn.Linear(hidden_size, 1)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # Like the original: the hidden states are cast to the head's dtype before the projection.
        return self.summary(hidden.to(self.summary.weight.dtype))


class SkyworkPRMModel(Qwen2PreTrainedModel):
    """A Qwen2 backbone (``model.*``) and the value head (``v_head.summary.*``): the state-dict keys of the Skywork
    checkpoints. Their ``lm_head.weight`` is not needed for rewards and is ignored on load.

    ``forward`` returns the per-token value logits (B, T), or probabilities with ``return_probs=True``.
    """

    _keys_to_ignore_on_load_unexpected = [r"^lm_head\."]

    def __init__(self, config):
        super().__init__(config)
        self.model = Qwen2Model(config)
        self.v_head = SkyworkValueHead(config.hidden_size)
        self.post_init()

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, return_probs: bool = False, **kwargs
    ) -> torch.Tensor:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        value = self.v_head(hidden).squeeze(-1)
        return torch.sigmoid(value) if return_probs else value


class SkyworkFamily(Family):
    """Skywork-o1-Open-PRM (Qwen2.5 1.5B / 7B). No options."""

    name = "skywork"
    step_pooling_refusal = "its score is the sigmoid of a one-output value head (v_head.summary), which vLLM 0.32 has no model class for"
    #: What the official adapter loads with; no transformers auto class builds this head without remote code, so
    #: load checkpoints with :meth:`load_model`.
    auto_class = "AutoModelForCausalLM"
    # The official label rule compares score differences with -0.05 (the adapter's validity_threshold).
    validity_threshold = -0.05
    threshold_range = (-1.0, 1.0)  # differences of sigmoids (and the first sigmoid)

    def __init__(self, tokenizer: Any, **options: Any):
        if options:
            raise FamilyError(f"skywork: unknown options {sorted(options)}; this family takes none")
        super().__init__(tokenizer, **options)
        if not getattr(tokenizer, "bos_token", None):
            # The original prepare_input concatenates tokenizer.bos_token with the question.
            raise FamilyError("skywork: the tokenizer has no bos_token; prepare_input needs it")
        if len(tokenizer.encode(STEP_TAG, add_special_tokens=False)) != 1:
            raise FamilyError(
                f"skywork: the tokenizer splits the step tag {STEP_TAG!r} into several tokens; "
                "a Skywork-o1-Open-PRM tokenizer is needed"
            )
        # As the original: the last id of encode(tag) (after any special tokens the tokenizer adds).
        self.tag_id = tokenizer.encode(STEP_TAG)[-1]

    @classmethod
    def load_model(cls, name_or_path: str, **from_pretrained_kwargs: Any) -> SkyworkPRMModel:
        """The checkpoint loaded with :class:`SkyworkPRMModel` (the official run keeps the default fp32)."""
        return SkyworkPRMModel.from_pretrained(name_or_path, **from_pretrained_kwargs)

    @classmethod
    def matches(cls, config: Any, name_or_path: str) -> bool:
        architectures = getattr(config, "architectures", None) or []
        lowered = str(name_or_path).lower()
        return _ARCHITECTURE in architectures or any(marker in lowered for marker in _NAME_MARKERS)

    @staticmethod
    def build_response(sample: Sample) -> str:
        """The response string the official adapter hands to ``prepare_input``."""
        return "".join(f"Step {i}: {clean_step(step).strip()} {STEP_TAG}\n" for i, step in enumerate(sample.steps, 1))

    def texts(self, sample: Sample):
        pieces = self.build_response(sample).split(STEP_TAG)
        return [(self.tokenizer.bos_token + sample.question + "\n", True), *((p, True) for p in pieces if p)]

    def encode(self, sample: Sample) -> Encoded:
        response = self.build_response(sample)
        # PRMBench texts never contain the tag; one inside a step would add a reward the steps do not account for.
        if response.count(STEP_TAG) != len(sample.steps):
            raise FamilyError(f"skywork: sample {sample.id!r}: a step contains the step tag {STEP_TAG!r}")
        ids = self.tokens(self.tokenizer.bos_token + sample.question + "\n", add_special_tokens=True)
        reward_pos = []
        for piece in response.split(STEP_TAG):
            if piece:
                ids.extend(self.tokens(piece, add_special_tokens=True))
            reward_pos.append(len(ids))
            ids.append(self.tag_id)
        return Encoded(input_ids=ids, reward_pos=reward_pos)

    def step_scores(
        self, model: torch.nn.Module, hidden: torch.Tensor, step_pos: torch.Tensor, *, backend: str = "auto"
    ) -> dict[str, torch.Tensor]:
        summary = model.v_head.summary
        probs = step_rewards(hidden, step_pos, summary.weight, summary.bias, activation="sigmoid", backend=backend)
        return {"validity": probs[:, 0].contiguous()}

    def step_labels(self, scores: dict[str, torch.Tensor], cu_steps: torch.Tensor) -> dict[str, torch.Tensor]:
        """label[i] = score[i] - score[i-1] > -0.05 inside each sample, label[first] = score[first] > -0.05.

        Args:
            scores: ``{"validity": (S,) float32}``.
            cu_steps: (B+1,) int32 offsets of the samples in the S scores.

        Returns:
            ``{"validity": (S,) bool}``. Computed in float64 like the official Python floats, without host syncs.
        """
        values = scores["validity"].double()
        previous = torch.cat([values.new_zeros(1), values])[:-1]
        # A sample's first score is compared as it is: zero its predecessor. cu_steps[:-1] marks every sample start;
        # starts of empty samples coincide with the next start (or S) and scatter harmlessly, S is clipped away.
        is_first = torch.zeros(values.shape[0] + 1, dtype=torch.bool, device=values.device)
        is_first[cu_steps[:-1].long()] = True
        previous = torch.where(is_first[:-1], torch.zeros_like(previous), previous)
        return {"validity": (values - previous) > self.validity_threshold}
