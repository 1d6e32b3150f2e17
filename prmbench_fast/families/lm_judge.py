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
    step_pooling_refusal = ("its rewards are read at the last token of each 'Verdict:', a token the question and "
                           "steps may hold too, so it marks no reward position alone")

    def __init__(self, tokenizer: Any, *, positive: str = " +", negative: str = " -", threshold: float = 0.5):
        super().__init__(tokenizer, positive=positive, negative=negative, threshold=threshold)
        self.verdict_ids = (single_token_id(tokenizer, positive, self.name), single_token_id(tokenizer, negative, self.name))
        self.after_verdict = tokenizer(positive + "\n", add_special_tokens=False)["input_ids"]
        #: question -> its rendered prompt: a problem's variants share their question, and :meth:`texts` and
        #: :meth:`encode` both need it.
        self._prompts: dict[str, str] = {}
        self.validity_threshold = threshold

    def prompt_text(self, question: str) -> str:
        if question not in self._prompts:
            messages = [{"role": "system", "content": SYSTEM_PROMPT},
                        {"role": "user", "content": USER_PROMPT.format(question=question)}]
            self._prompts[question] = self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                                         add_generation_prompt=True)
        return self._prompts[question]

    @staticmethod
    def step_text(i: int, step: str) -> str:
        return f"Step {i}: {clean_step(step)}\nVerdict:"

    def texts(self, sample: Sample):
        return [(self.prompt_text(sample.question), False),
                *((self.step_text(i, step), False) for i, step in enumerate(sample.steps, start=1))]

    def encode(self, sample: Sample) -> Encoded:
        ids = self.tokens(self.prompt_text(sample.question))
        reward_pos = []
        for i, step in enumerate(sample.steps, start=1):
            # Each piece is tokenized on its own, so the reward position is exact whatever the tokenizer merges.
            ids += self.tokens(self.step_text(i, step))
            reward_pos.append(len(ids) - 1)
            ids += self.after_verdict
        return Encoded(ids, reward_pos)

    def step_scores(self, model, hidden, step_pos, *, backend="auto"):
        return {"validity": lm_head_pair_probability(model, hidden, step_pos, self.verdict_ids, backend=backend)}
