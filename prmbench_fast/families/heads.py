"""Reward heads shared by several families: reading a softmax over a few LM-head rows at the reward positions."""

from __future__ import annotations

import torch

from ..kernels.step_reward import step_rewards
from .base import FamilyError


def single_token_id(tokenizer, text: str, family: str) -> int:
    """The id of ``text`` when the tokenizer encodes it as exactly one token (reward tokens must be one token)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise FamilyError(f"{family}: {text!r} is not a single token for this tokenizer (ids {ids})")
    return ids[0]


def lm_head_pair_probability(
    model: torch.nn.Module, hidden: torch.Tensor, step_pos: torch.Tensor, token_ids: tuple[int, int], *, backend: str
) -> torch.Tensor:
    """P(token_ids[0]) under the softmax over the two LM-head rows of ``token_ids``, at each reward position: (S,)."""
    lm_head = model.get_output_embeddings()
    if lm_head is None:
        raise FamilyError(
            f"{type(model).__name__} has no LM head (get_output_embeddings() is None); a family that reads LM-head rows "
            "(lm_judge, math_shepherd, rlhflow, generic with reward_tokens) needs a causal LM"
        )
    rows = torch.tensor(token_ids, device=lm_head.weight.device)
    weight = lm_head.weight.index_select(0, rows)
    bias = None if getattr(lm_head, "bias", None) is None else lm_head.bias.index_select(0, rows)
    return step_rewards(hidden, step_pos, weight, bias, activation="softmax", backend=backend)[:, 0]
