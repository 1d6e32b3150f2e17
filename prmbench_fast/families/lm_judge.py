"""``lm_judge``: any instruct/chat causal LM used as a zero-shot PRM.

The chat asks the model to judge a solution step by step; the assistant turn holds the steps, each followed by
"Verdict:" and a teacher-forced " +" (as RLHFlow's PRM sees "+" after every step). The reward of step i is read at
the last token of its "Verdict:": P(" +") / (P(" +") + P(" -")), i.e. the softmax over those two LM-head rows.
Because attention is causal, one forward pass gives every step's verdict conditioned on the steps before it only.
Labels: reward > 0.5. The embedded default model is SmolLM2-135M-Instruct (``prmbench_fast.models``).
"""

from __future__ import annotations

from typing import Any

from ..data import Sample
from .base import Encoded, Family
from .heads import lm_head_pair_probability, single_token_id
from .text import clean_step

SYSTEM_PROMPT = (
    "You are a meticulous math teacher. You grade a student's solution one step at a time and never skip a step."
)
USER_PROMPT = (
    "Problem:\n{question}\n\n"
    "Grade the student's solution below. After each step, write + if the step is correct and - if it contains an "
    "error of any kind (a wrong calculation, an unjustified claim, a contradiction, circular or irrelevant reasoning)."
)


class LMJudge(Family):
    name = "lm_judge"

    def __init__(self, tokenizer: Any, *, positive: str = " +", negative: str = " -", threshold: float = 0.5):
        super().__init__(tokenizer, positive=positive, negative=negative, threshold=threshold)
        self.verdict_ids = (single_token_id(tokenizer, positive, self.name), single_token_id(tokenizer, negative, self.name))
        self.after_verdict = tokenizer(positive + "\n", add_special_tokens=False)["input_ids"]
        self.validity_threshold = threshold

    def prompt_ids(self, question: str) -> list[int]:
        messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": USER_PROMPT.format(question=question)}]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode(self, sample: Sample) -> Encoded:
        ids = self.prompt_ids(sample.question)
        reward_pos = []
        for i, step in enumerate(sample.steps, start=1):
            # Each piece is tokenized on its own, so the reward position is exact whatever the tokenizer merges.
            ids += self.tokenizer(f"Step {i}: {clean_step(step)}\nVerdict:", add_special_tokens=False)["input_ids"]
            reward_pos.append(len(ids) - 1)
            ids += self.after_verdict
        return Encoded(ids, reward_pos)

    def step_scores(self, model, hidden, step_pos, *, backend="auto"):
        return {"validity": lm_head_pair_probability(model, hidden, step_pos, self.verdict_ids, backend=backend)}
