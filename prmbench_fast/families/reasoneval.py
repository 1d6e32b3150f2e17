"""GAIR ReasonEval-7B (Mistral) and -34B (Llama) (PRMBench adapter ``mr_eval/models/reasoneval.py``, SPEC §3).

Input text: ``"Question:\\n{q}\\nAnswer:\\nLet's think step by step.\\n" + PAD + sum(clean_step(step) + PAD)`` with
PAD = ``tokenizer.pad_token`` used as a text separator, tokenized with the tokenizer's defaults (BOS added). The
separator id is ``tokenizer(PAD)["input_ids"][-1]``. Then, walking the ids, every separator at position p records the
index ``p - 1 - (separators seen before it)`` and is removed from the ids. Finally (copied by PRMBench from GAIR's
example code, reproduced as is):

- 7B: id 1 (BOS) is put back at the front and the first two recorded indices are dropped. The "beginning" separator
  is the auto-added BOS, so PAD must be the BOS token; the indices then point at the second-to-last token of each step.
- 34B: the first recorded index (end of the question) is dropped; the indices point at the last token of each step.

Exactly N indices must remain (the official code asserts it; here :class:`FamilyError` names the sample). Indices
>= max_length are dropped later by the packer, like the official filter on the adjusted indices.

Rewards: ``score_head`` = Linear(h, 3) on the rows at those indices, softmax over [negative, neutral, positive]:
validity = p_neutral + p_positive (label > 0.5), redundancy = p_neutral (label > 0.15). The official code adds the two
probabilities as Python floats and compares with the thresholds in float64; this family does the same (see
:meth:`ReasonEvalFamily.step_scores` and :meth:`ReasonEvalFamily.step_labels`).

Precision (:mod:`prmbench_fast.families.precision`, SPEC §2.6 item 9): the official run loads bf16 weights; the default
reads in fp32. With a half-precision model, ``official_mixed_precision="bf16"`` reproduces the example accelerate
configs (bf16 logits, fp32 softmax); ``"no"`` (or ``official_rounding=True``) also rounds the probabilities to bf16,
as under ``mixed_precision: no``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import LlamaModel, MistralModel
from transformers.models.llama.modeling_llama import LlamaPreTrainedModel
from transformers.models.mistral.modeling_mistral import MistralPreTrainedModel

from ..data import Sample
from ..kernels.step_reward import gather_step_hidden, step_rewards
from . import precision
from .base import Encoded, Family, FamilyError
from .text import clean_step

PROMPT_FORMAT = "Question:\n{question}\nAnswer:\nLet's think step by step.\n"
SIZES = ("7B", "34B")
#: The id the official 7B code puts back at the front (Mistral's BOS), hard-coded there.
_MISTRAL_BOS_ID = 1
_ARCHITECTURES = {"ReasonEval_7B": "7B", "ReasonEval_34B": "34B"}


class ReasonEval7B(MistralPreTrainedModel):
    """ReasonEval-7B: a Mistral backbone (``model.*``) and ``score_head`` = Linear(h, score_dimension)."""

    _keys_to_ignore_on_load_missing = [r"lm_head\.weight"]
    _keys_to_ignore_on_load_unexpected = [r"^lm_head\."]

    def __init__(self, config):
        super().__init__(config)
        self.model = MistralModel(config)
        self.score_head = nn.Linear(
            config.hidden_size, getattr(config, "score_dimension", 3), bias=getattr(config, "use_bias", False)
        )
        self.post_init()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """(B, T, 3) per-token scores, like the official class."""
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        return self.score_head(hidden)


class ReasonEval34B(LlamaPreTrainedModel):
    """ReasonEval-34B: a Llama backbone (``model.*``) and ``score_head`` = Linear(h, score_dim)."""

    _keys_to_ignore_on_load_missing = [r"lm_head\.weight"]
    _keys_to_ignore_on_load_unexpected = [r"^lm_head\."]

    def __init__(self, config):
        super().__init__(config)
        self.model = LlamaModel(config)
        self.score_head = nn.Linear(
            config.hidden_size, getattr(config, "score_dim", 3), bias=getattr(config, "bias", False)
        )
        self.post_init()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """(B, T, 3) per-token scores, like the official class."""
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        return self.score_head(hidden)


_MODEL_CLASSES = {"7B": ReasonEval7B, "34B": ReasonEval34B}


def size_for(config: Any, name_or_path: str = "") -> str | None:
    """"7B" or "34B" from a checkpoint's config (architecture, else Mistral -> 7B, Llama -> 34B) or its name."""
    for arch in getattr(config, "architectures", None) or []:
        if arch in _ARCHITECTURES:
            return _ARCHITECTURES[arch]
    model_type = getattr(config, "model_type", None)
    if model_type == "mistral":
        return "7B"
    if model_type == "llama":
        return "34B"
    lowered = str(name_or_path).lower()
    if "34b" in lowered:
        return "34B"
    if "7b" in lowered:
        return "7B"
    return None


class ReasonEvalFamily(Family):
    """ReasonEval. Options: ``size`` ("7B", "34B" or "auto", default "auto"), ``official_mixed_precision`` ("bf16" or
    "no") or ``official_rounding`` (bool), see the module docstring.

    ``size="auto"`` reads the size from the tokenizer's ``name_or_path``; when that does not tell, from the only
    arithmetic that can work with this tokenizer: the 7B needs PAD == BOS, the 34B needs PAD != BOS. Callers that
    have the model's config should pass ``size=size_for(config, name)`` (Mistral -> 7B, Llama -> 34B).
    """

    name = "reasoneval"
    step_pooling_refusal = ("its reward positions are step ends found by removing the separator tokens from the "
                           "prompt, so no tag token is left at them; its validity adds two of three class probabilities")
    #: What the official adapter loads with; no transformers auto class builds this head without remote code, so
    #: load checkpoints with :meth:`load_model`.
    auto_class = "AutoModel"
    validity_threshold = 0.5
    redundancy_threshold = 0.15

    def __init__(self, tokenizer: Any, **options: Any):
        unknown = set(options) - {"size", *precision.OPTIONS}
        if unknown:
            raise FamilyError(
                f"reasoneval: unknown options {sorted(unknown)}; known: size, {', '.join(precision.OPTIONS)}"
            )
        super().__init__(tokenizer, **options)
        self.mixed_precision = precision.official_mixed_precision(self.name, options)
        pad = getattr(tokenizer, "pad_token", None)
        if pad is None:
            raise FamilyError("reasoneval: the tokenizer has no pad_token; ReasonEval uses it as the step separator")
        self.separator = pad
        # The 7B drops the auto-added BOS as the "beginning" separator: that only happens when PAD is the BOS.
        pad_ids = tokenizer(pad)["input_ids"]
        self.separator_id = pad_ids[-1]
        pad_is_bos = getattr(tokenizer, "bos_token", None) == pad and pad_ids[0] == self.separator_id
        size = options.get("size", "auto")
        if size == "auto":
            size = size_for(None, getattr(tokenizer, "name_or_path", "")) or ("7B" if pad_is_bos else "34B")
        if size not in SIZES:
            raise FamilyError(f"reasoneval: size must be '7B', '34B' or 'auto', got {size!r}")
        self.size = size
        if size == "7B" and not (pad_is_bos and tokenizer.bos_token_id == _MISTRAL_BOS_ID):
            raise FamilyError(
                "reasoneval: the 7B arithmetic needs the pad token to be the BOS token with id 1 (got pad "
                f"{pad!r}, bos {getattr(tokenizer, 'bos_token', None)!r} id {getattr(tokenizer, 'bos_token_id', None)})"
            )

    @classmethod
    def load_model(cls, name_or_path: str, *, size: str | None = None, **from_pretrained_kwargs: Any) -> nn.Module:
        """The checkpoint loaded with :class:`ReasonEval7B` or :class:`ReasonEval34B` (``size`` from its config)."""
        if size is None:
            from transformers import AutoConfig

            size = size_for(AutoConfig.from_pretrained(name_or_path), name_or_path)
        if size not in SIZES:
            raise FamilyError(f"reasoneval: cannot tell the size of {name_or_path!r}; pass size='7B' or '34B'")
        return _MODEL_CLASSES[size].from_pretrained(name_or_path, **from_pretrained_kwargs)

    @classmethod
    def matches(cls, config: Any, name_or_path: str) -> bool:
        architectures = getattr(config, "architectures", None) or []
        return any(arch in _ARCHITECTURES for arch in architectures) or "reasoneval" in str(name_or_path).lower()

    def build_text(self, sample: Sample) -> str:
        """The string the official adapter tokenizes, separators included."""
        steps = "".join(clean_step(step) + self.separator for step in sample.steps)
        return PROMPT_FORMAT.format(question=sample.question) + self.separator + steps

    def texts(self, sample: Sample):
        return [(self.build_text(sample), True)]

    def encode(self, sample: Sample) -> Encoded:
        tokens = self.tokens(self.build_text(sample), add_special_tokens=True)
        indices, ids = [], []
        for position, token in enumerate(tokens):
            if token == self.separator_id:
                indices.append(position - 1 - len(indices))
            else:
                ids.append(token)
        if self.size == "7B":
            ids = [_MISTRAL_BOS_ID] + ids
            indices = indices[2:]
        else:
            indices = indices[1:]
        if len(indices) != len(sample.steps):
            raise FamilyError(
                f"reasoneval: sample {sample.id!r}: {len(indices)} step indices for {len(sample.steps)} steps "
                f"({self.size} arithmetic; separator {self.separator!r} id {self.separator_id})"
            )
        return Encoded(input_ids=ids, reward_pos=indices)

    def step_scores(
        self, model: torch.nn.Module, hidden: torch.Tensor, step_pos: torch.Tensor, *, backend: str = "auto"
    ) -> dict[str, torch.Tensor]:
        other = _MODEL_CLASSES["34B" if self.size == "7B" else "7B"]
        if isinstance(model, other):
            raise FamilyError(
                f"reasoneval: the family was set up for {self.size} but the model is {type(model).__name__}"
            )
        head = model.score_head
        dtype = head.weight.dtype
        if precision.applies(self.mixed_precision, dtype):
            rows = gather_step_hidden(hidden, step_pos)
            probs = precision.official_probabilities(head, rows, dtype, self.mixed_precision).float()
        else:
            probs = step_rewards(hidden, step_pos, head.weight, head.bias, activation="softmax", backend=backend)
        # float64 sum as the official Python floats; stored as float32, see step_labels for the exact labels.
        validity64 = probs[:, 1].double() + probs[:, 2].double()
        validity = validity64.float()
        # Rounding to float32 can turn a sum just above 0.5 into 0.5 itself (never the other way round): keep the
        # official label by moving such a score one float32 step up.
        threshold = torch.tensor(self.validity_threshold, dtype=torch.float32, device=validity.device)
        above = torch.nextafter(threshold, torch.tensor(1.0, device=validity.device))
        validity = torch.where((validity64 > self.validity_threshold) & (validity <= threshold), above, validity)
        return {"validity": validity, "redundancy": probs[:, 1].contiguous()}

    def step_labels(self, scores: dict[str, torch.Tensor], cu_steps: torch.Tensor) -> dict[str, torch.Tensor]:
        """Strict ``>`` against the thresholds in float64 (0.15 is not a float32 number; the official compares
        Python floats), without host syncs."""
        return {
            "validity": scores["validity"].double() > self.validity_threshold,
            "redundancy": scores["redundancy"].double() > self.redundancy_threshold,
        }
