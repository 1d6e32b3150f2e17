"""ScalableMath llemma-7b PRMs (tokenizer EleutherAI/llemma_7b), PRMBench adapter ``mr_eval/models/llemma7b_prm.py``.

Input (SPEC §3): ``"# Question\\n\\n{question}\\n\\n# Solution\\n\\n"`` followed, for every step, by the step with every
"\\n\\n" removed, stripped, and "\\n\\n" appended; no step numbers. Encoded with the tokenizer's default special tokens
(BOS), untruncated.

Reward positions, by the adapter's index logic, reproduced literally:

- ``scoring`` = ``encode("\\n\\n", add_special_tokens=False)[1:]`` and ``begin`` =
  ``encode("\\n\\n# Solution", add_special_tokens=False)[1:]`` (the [1:] drops the sentencepiece "▁" prefix, so with
  the Llama tokenizer ``scoring`` is the pair (13, 13), one <0x0A> per newline);
- scanning every start position: once ``begin`` has matched (at or before this position), a position where
  ``scoring`` starts is collected; a position holding the EOS id is collected and ends the scan;
- the first collected position is deleted. It is the "\\n\\n" in front of "# Solution" (collected on the very
  position where ``begin`` matches), so the one right after "# Solution" survives.

So N steps give **N+1 scores, shifted**: [after the header, end of step 1, ..., end of step N]; the evaluator then
judges step i with the score read at the end of step i-1. Matches of the pair overlap: an empty step gives
"\\n\\n\\n\\n", i.e. three matches where two separators are written, and one score more.

Score: ``sigmoid(mean over the whole vocabulary of the logits)`` at each position, computed as one precomputed mean
LM-head row (mean(W h + b) = mean(W) h + mean(b)). Label: score > 0.5.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from ..data import Sample
from ..kernels.step_reward import mean_logit_head, step_rewards
from .base import Encoded, Family, FamilyError

SEPARATOR = "\n\n"
_BEGIN_SOLUTION = "\n\n# Solution"
_NEWLINE_RUN = re.compile(r"\n{2,}")


class LlemmaFamily(Family):
    """ScalableMath llemma-7b-{prm,oprm}-{prm800k,metamath}-level-1to3-hf.

    Options:
        strict: (default True) raise :class:`FamilyError` when the positions found differ from the count the official
            rule gives with the Llemma tokenizer (one token per newline): the separator merged into neighbouring text.
            ``strict=False`` keeps whatever the official rule finds.
    """

    name = "llemma"
    step_pooling_refusal = ("its score is the sigmoid of the mean of all LM-head logits, not a softmax of a head, "
                           "read at '\\n\\n' pairs rather than at one tag token")
    auto_class = "AutoModelForCausalLM"

    def __init__(self, tokenizer: Any, *, strict: bool = True, **unknown: Any):
        if unknown:
            raise FamilyError(f"llemma: unknown options {sorted(unknown)}; this family takes only strict=")
        super().__init__(tokenizer, strict=strict)
        self.strict = strict
        self.scoring = tuple(tokenizer.encode(SEPARATOR, add_special_tokens=False)[1:])
        self.begin = tuple(tokenizer.encode(_BEGIN_SOLUTION, add_special_tokens=False)[1:])
        if not self.scoring or not self.begin:
            # An empty pattern would match at every position: the official rule needs a sentencepiece-style
            # tokenizer that writes a "▁" prefix and then the newlines.
            raise FamilyError(
                f"llemma: encode({SEPARATOR!r})[1:] = {list(self.scoring)} and encode({_BEGIN_SOLUTION!r})[1:] = "
                f"{list(self.begin)}; the official rule needs both non-empty (a Llama/Llemma tokenizer)"
            )
        self.eos_id = tokenizer.eos_token_id
        self._mean_head: tuple[torch.Tensor, int, torch.device, tuple] | None = None

    @classmethod
    def matches(cls, config: Any, name_or_path: str) -> bool:
        lowered = str(name_or_path).lower()
        return "llemma" in lowered and "prm" in lowered

    @staticmethod
    def build_text(sample: Sample) -> str:
        """The string the official adapter encodes."""
        steps = "".join(step.replace(SEPARATOR, "").strip() + SEPARATOR for step in sample.steps)
        return f"# Question\n\n{sample.question}\n\n# Solution\n\n{steps}"

    @staticmethod
    def expected_positions(sample: Sample) -> int:
        """The count the official rule yields with the Llemma tokenizer: one per overlapping "\\n" pair after the
        header's "\\n\\n", i.e. (run length - 1) summed over the runs of newlines from there on (N+1 without empty
        steps)."""
        text = LlemmaFamily.build_text(sample)
        solution = text[text.index("\n\n# Solution") + len("\n\n# Solution"):]
        return sum(len(run.group()) - 1 for run in _NEWLINE_RUN.finditer(solution))

    def texts(self, sample: Sample):
        return [(self.build_text(sample), True)]

    def encode(self, sample: Sample) -> Encoded:
        ids = [int(t) for t in self.tokens(self.build_text(sample), add_special_tokens=True)]
        begun = False
        positions = []
        n_begin, n_scoring = len(self.begin), len(self.scoring)
        for start in range(len(ids)):
            if tuple(ids[start:start + n_begin]) == self.begin:
                begun = True
            if begun and tuple(ids[start:start + n_scoring]) == self.scoring:
                positions.append(start)
            if ids[start] == self.eos_id:
                positions.append(start)
                break
        if not positions:
            raise FamilyError(
                f"llemma: sample {sample.id!r}: no '\\n\\n' found after '# Solution' (ids {list(self.begin)} then "
                f"{list(self.scoring)}); the tokenizer merged the separators into neighbouring text"
            )
        del positions[0]
        if self.strict:
            expected = self.expected_positions(sample)
            if len(positions) != expected:
                raise FamilyError(
                    f"llemma: sample {sample.id!r}: the official rule finds {len(positions)} reward positions where "
                    f"the Llemma tokenizer gives {expected}; the tokenizer merged '\\n\\n' into neighbouring text "
                    "(strict=False keeps the official positions)"
                )
        return Encoded(ids, positions)

    def step_scores(
        self, model: torch.nn.Module, hidden: torch.Tensor, step_pos: torch.Tensor, *, backend: str = "auto"
    ) -> dict[str, torch.Tensor]:
        weight, bias = self._mean_logit_head(model, hidden.device)
        return {"validity": step_rewards(hidden, step_pos, weight, bias, activation="sigmoid", backend=backend)[:, 0]}

    def _mean_logit_head(self, model: torch.nn.Module, device: torch.device) -> tuple:
        """``mean_logit_head`` of the model's LM head, computed once per weight (a full pass over V x H values)."""
        lm_head = model.get_output_embeddings()
        weight = lm_head.weight
        cached = self._mean_head
        if cached is None or cached[0] is not weight or cached[1] != weight._version or cached[2] != device:
            mean_weight, mean_bias = mean_logit_head(weight, getattr(lm_head, "bias", None))
            head = (mean_weight.to(device), None if mean_bias is None else mean_bias.to(device))
            self._mean_head = cached = (weight, weight._version, device, head)
        return cached[3]
