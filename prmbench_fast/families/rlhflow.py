"""RLHFlow Llama3.1-8B-PRM-{Mistral,Deepseek}-Data, PRMBench adapter ``mr_eval/models/llama3_1_8b_prm.py``.

Input (SPEC §3): a multi-turn chat. Step i (from 1) is a user turn, its text ``clean_step(step)`` (the official
``remove_step_prefix``), except that the first user turn is ``question + " " + clean_step(step_1)``; every user turn is
answered by an assistant turn "+". The conversation goes through ``tokenizer.apply_chat_template`` with its defaults
(no generation prompt; the template's own BOS and any default system block; no further special tokens).

Rewards: every match of the id pattern [<|start_header_id|>, "assistant", <|end_header_id|>, "\\n\\n", "+",
<|eot_id|>] (Llama 3: 128006, 78191, 128007, 271, 10, 128009) is read at **match + 3**, the "\\n\\n" that predicts
"+". Score (PRMBench): the probability of "+" under the softmax over the **whole vocabulary**, computed from the step
rows only with a streaming log-sum-exp (``step_token_probs``). Label: score > 0.5.

Truncation quirk: the adapter searches the pattern in the ids the collator already cut to 2048 tokens, so a score
survives only if its whole 6-token pattern fits (match + 5 < 2048), not merely its read position (match + 3). The
generic cut of the pipeline (read positions < max_length) would keep up to two scores more, so :meth:`encode` drops
the positions whose pattern is cut at ``max_length`` (option, default 2048). The collator pads with the tokenizer's pad
token (<|end_of_text|> for these checkpoints), which can never complete a cut pattern.

Option ``pair_softmax=True`` gives the rule of RLHFlow's own evaluation code instead: P("+") under the softmax over
just the {"+", "-"} LM-head rows. PRMBench numbers need the default.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..data import Sample
from ..kernels.step_reward import step_token_probs
from .base import Encoded, Family, FamilyError
from .heads import lm_head_pair_probability, single_token_id
from .text import clean_step

_NAME_MARKERS = ("rlhflow", "llama3.1-8b-prm")
#: Offset from a pattern match to the reward position: the "\n\n" after <|end_header_id|>.
_READ_OFFSET = 3
#: The collator's cut (the task config's max_length).
OFFICIAL_MAX_LENGTH = 2048


class RLHFlowFamily(Family):
    """RLHFlow Llama3.1-8B PRMs.

    Options:
        pair_softmax: (default False) softmax over the {"+", "-"} pair, as RLHFlow's own code, instead of PRMBench's
            full-vocabulary softmax.
        max_length: (default 2048) the collator's cut; a score whose 6-token pattern does not fit in it is dropped.
    """

    name = "rlhflow"
    step_pooling_refusal = ("its reward is read at the '\\n\\n' closing an assistant header, a token that closes every "
                           "header, so no tag token marks the reward positions alone; and its score is P('+') under the "
                           "whole vocabulary's softmax")
    takes_max_length = True
    auto_class = "AutoModelForCausalLM"

    def __init__(
        self, tokenizer: Any, *, pair_softmax: bool = False, max_length: int = OFFICIAL_MAX_LENGTH, **unknown: Any
    ):
        if unknown:
            raise FamilyError(
                f"rlhflow: unknown options {sorted(unknown)}; this family takes pair_softmax= and max_length="
            )
        if max_length < 1:
            raise FamilyError(f"rlhflow: max_length must be >= 1, got {max_length}")
        super().__init__(tokenizer, pair_softmax=pair_softmax, max_length=max_length)
        self.pair_softmax = pair_softmax
        self.max_length = max_length
        if not getattr(tokenizer, "chat_template", None):
            raise FamilyError("rlhflow: the tokenizer has no chat template; a Llama-3.1 tokenizer is needed")
        # The official pattern is hard-coded Llama-3 ids; derive the same tokens from this tokenizer instead.
        self.pattern = (
            self._special_id("<|start_header_id|>"),
            single_token_id(tokenizer, "assistant", self.name),
            self._special_id("<|end_header_id|>"),
            single_token_id(tokenizer, "\n\n", self.name),
            single_token_id(tokenizer, "+", self.name),
            self._special_id("<|eot_id|>"),
        )
        self.plus_id = self.pattern[4]
        self.minus_id = single_token_id(tokenizer, "-", self.name) if pair_softmax else None

    def _special_id(self, token: str) -> int:
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == self.tokenizer.unk_token_id:
            raise FamilyError(f"rlhflow: the tokenizer has no {token} token; a Llama-3.1 tokenizer is needed")
        return int(token_id)

    @classmethod
    def matches(cls, config: Any, name_or_path: str) -> bool:
        lowered = str(name_or_path).lower()
        return any(marker in lowered for marker in _NAME_MARKERS)

    @staticmethod
    def build_conversation(sample: Sample) -> list[dict[str, str]]:
        """The chat turns the official adapter passes to ``apply_chat_template``."""
        conversation = []
        for i, step in enumerate(sample.steps):
            text = clean_step(step)
            if i == 0:
                text = sample.question + " " + text
            conversation.append({"content": text, "role": "user"})
            conversation.append({"content": "+", "role": "assistant"})
        return conversation

    def encode(self, sample: Sample) -> Encoded:
        ids = self.tokenizer.apply_chat_template(self.build_conversation(sample), tokenize=True, return_dict=False)
        return self._encoded(sample, ids)

    def encode_many(self, samples: Sequence[Sample]) -> list[Encoded]:
        """``[self.encode(s) for s in samples]`` with one ``apply_chat_template`` call for all conversations: the
        same rendering and tokenizer call as one conversation's, on a batch."""
        if not samples:
            return []
        conversations = [self.build_conversation(sample) for sample in samples]
        ids = self.tokenizer.apply_chat_template(conversations, tokenize=True, return_dict=False)
        return [self._encoded(sample, sample_ids) for sample, sample_ids in zip(samples, ids)]

    def _encoded(self, sample: Sample, ids) -> Encoded:
        ids = [int(t) for t in ids]
        width = len(self.pattern)
        starts = [start for start in range(len(ids) - width + 1) if tuple(ids[start:start + width]) == self.pattern]
        # One pattern per assistant turn: anything else means the template or the tokenizer renders the turns
        # differently from Llama 3.1 ("+" merged with its neighbours, another header layout).
        if len(starts) != len(sample.steps):
            raise FamilyError(
                f"rlhflow: sample {sample.id!r}: the assistant-turn id pattern {list(self.pattern)} occurs "
                f"{len(starts)} times for {len(sample.steps)} steps; the chat template or tokenizer does not "
                "render turns as Llama 3.1 does"
            )
        reward_pos = [start + _READ_OFFSET for start in starts if start + width <= self.max_length]
        return Encoded(ids, reward_pos)

    def step_scores(
        self, model: torch.nn.Module, hidden: torch.Tensor, step_pos: torch.Tensor, *, backend: str = "auto"
    ) -> dict[str, torch.Tensor]:
        if self.pair_softmax:
            pair = (self.plus_id, self.minus_id)
            return {"validity": lm_head_pair_probability(model, hidden, step_pos, pair, backend=backend)}
        lm_head = model.get_output_embeddings()
        probs = step_token_probs(
            hidden, step_pos, lm_head.weight, [self.plus_id], lm_head_bias=getattr(lm_head, "bias", None),
            backend=backend,
        )
        return {"validity": probs[:, 0]}
