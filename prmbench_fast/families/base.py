"""What a PRM family is: how a sample becomes tokens, where and how step rewards are read, how rewards become labels.

A family reproduces one official PRMBench adapter (SPEC §3) exactly, quirks included, but reads rewards only at the
reward positions, from the backbone's final hidden states (``prmbench_fast.packing``), never through (T × V) logits.
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import json
import math
import weakref
from typing import Any, ClassVar, Iterable, Sequence

import torch

from ..data import Sample


class FamilyError(ValueError):
    """A family cannot handle this model, tokenizer or sample; the message names the family (and the sample)."""


@dataclasses.dataclass(frozen=True)
class Encoded:
    """One sample, tokenized as the official adapter tokenizes it, before the ``max_length`` truncation.

    ``reward_pos`` are the local token positions where the family reads a reward, one per emitted score, in order.
    A family that emits N+1 scores for N steps (Skywork, Llemma) has N+1 positions here, as the official code does.
    """

    input_ids: list[int]
    reward_pos: list[int]


@dataclasses.dataclass(frozen=True)
class StepPooling:
    """How a serving engine with STEP pooling (vLLM: ``runner="pooling"``, ``PoolerConfig(pooling_type="STEP")``,
    task ``token_classify``) computes this family's step scores.

    STEP pooling returns, for every token of the prompt whose id is ``step_tag_id``, in prompt order, the softmax of
    a classification head at that token: the PRM's own head, or for an LM-head PRM a head made of the LM-head rows of
    ``lm_head_tokens`` (vLLM's ``convert="classify"`` with ``classifier_from_token``; its ``returned_token_ids``
    cannot do this: it selects columns of the hidden states, before the head). The family's reward positions must
    therefore be exactly the tag's positions in each truncated prompt; the engines check that per sample.

    Attributes:
        step_tag_id: the token id that marks every reward position.
        lm_head_tokens: the tokens (as the tokenizer spells them) whose LM-head rows make the head; None for a
            checkpoint with its own classification head.
        score_class: the column of the returned probabilities that is the step score.
        num_classes: how many probabilities each tag returns.
    """

    step_tag_id: int
    lm_head_tokens: tuple[str, ...] | None
    score_class: int
    num_classes: int = 2

    def pooler_config(self) -> dict[str, Any]:
        """vLLM's pooler configuration (``PoolerConfig(**it)``, or a server's ``--pooler-config`` JSON)."""
        return {"pooling_type": "STEP", "step_tag_id": self.step_tag_id}

    def engine_args(self) -> dict[str, Any]:
        """The other ``vllm.LLM`` arguments the mapping needs (a server takes them as ``--convert``,
        ``--hf-overrides``)."""
        if self.lm_head_tokens is None:
            return {}
        return {"convert": "classify",
                "hf_overrides": {"classifier_from_token": list(self.lm_head_tokens), "method": "no_post_processing"}}

    def server_args(self) -> list[str]:
        """The pooling options of ``python -m vllm.entrypoints.openai.api_server`` for this mapping."""
        args = ["--runner", "pooling", "--pooler-config", json.dumps(self.pooler_config())]
        for name, value in self.engine_args().items():
            args += [f"--{name.replace('_', '-')}", value if isinstance(value, str) else json.dumps(value)]
        return args

    def scores(self, probs: torch.Tensor) -> torch.Tensor:
        """(S,) float32 step scores from the (S, num_classes) probabilities returned at the S tags."""
        return probs[:, self.score_class].float().contiguous()


class Family(abc.ABC):
    """Base class of every PRM family. Subclasses set the class attributes and implement the three methods.

    The instance is bound to one tokenizer (token ids of separators and tags depend on it) and to the options the
    user passed through ``score(**family_options)``.
    """

    #: Registry name (``score(family=name)``).
    name: ClassVar[str]
    #: transformers auto class that loads a checkpoint of this family from a path.
    auto_class: ClassVar[str] = "AutoModelForCausalLM"
    #: Official default thresholds (SPEC §3): label = score > threshold.
    validity_threshold: ClassVar[float] = 0.5
    #: Families that also emit redundancy scores (ReasonEval) set this; None otherwise.
    redundancy_threshold: ClassVar[float | None] = None
    #: The closed range of the values the thresholds are compared with (probabilities by default); a threshold
    #: outside it labels every step alike, so it is refused. None: unbounded (raw logits).
    threshold_range: ClassVar[tuple[float, float] | None] = (0.0, 1.0)
    #: Families whose official encoding itself depends on the truncation length take a ``max_length`` option;
    #: ``score()`` then passes its own ``max_length``, so the two cuts cannot disagree.
    takes_max_length: ClassVar[bool] = False

    def __init__(self, tokenizer: Any, **options: Any):
        self.tokenizer = tokenizer
        self.options = options
        #: (text, add_special_tokens) -> token ids, tokenized in one batch by :meth:`encode_many` while it runs.
        self._batch: dict[tuple[str, bool], list[int]] | None = None

    @classmethod
    def build(
        cls,
        tokenizer: Any,
        *,
        validity_threshold: float | str | None = None,
        redundancy_threshold: float | str | None = None,
        **options: Any,
    ) -> "Family":
        """The family with the label-threshold overrides every official adapter accepts (``model_args``
        ``validity_threshold`` / ``redundancy_threshold``, SPEC §3; label = score > threshold) and its own options.

        What ``score()`` calls. An override is cast to float (as the official base class casts its string model
        arguments), replaces the family's official default (for Skywork, the threshold of its difference rule; for
        ``generic``/``lm_judge``, their ``threshold=``) and is recorded in :attr:`options`, so it enters
        :meth:`cache_key` and the run's settings: a run resumed with another threshold is another run.
        """
        overrides = {"validity_threshold": validity_threshold, "redundancy_threshold": redundancy_threshold}
        overrides = {name: float(value) for name, value in overrides.items() if value is not None}
        for name, value in overrides.items():
            if not math.isfinite(value):
                raise FamilyError(f"{cls.name}: {name} must be a finite number, got {value}")
        if "redundancy_threshold" in overrides and cls.redundancy_threshold is None:
            raise FamilyError(f"{cls.name}: emits no redundancy scores, so redundancy_threshold does not apply")
        family = cls(tokenizer, **options)
        for name, value in overrides.items():
            setattr(family, name, value)
            family.options[name] = value
        family.check_thresholds()
        return family

    def check_thresholds(self) -> None:
        """Raise :class:`FamilyError` for a threshold outside :attr:`threshold_range` (e.g. 5.0 for probabilities)."""
        if self.threshold_range is None:
            return
        low, high = self.threshold_range
        for name in ("validity_threshold", "redundancy_threshold"):
            value = getattr(self, name)
            if value is not None and not low <= value <= high:
                raise FamilyError(f"{self.name}: {name} {value:g} is outside the range of the values it is compared "
                                  f"with, [{low:g}, {high:g}]: every step would get the same label")

    @classmethod
    def load_model(cls, name_or_path: str, **from_pretrained_kwargs: Any) -> torch.nn.Module:
        """Load a checkpoint of this family (offline files). Default: ``transformers.<auto_class>``; families whose
        heads no auto class builds (custom value/score heads) override this with their own model class."""
        import transformers

        return getattr(transformers, cls.auto_class).from_pretrained(name_or_path, **from_pretrained_kwargs)

    # -- input ------------------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def encode(self, sample: Sample) -> Encoded:
        """Token ids and reward positions of ``sample`` exactly as the official adapter builds them.

        Raises :class:`FamilyError` naming the family and ``sample.id`` when the tokenizer breaks the family's
        assumptions (e.g. a separator merged into neighbouring text so that it is not found where expected).
        """

    def texts(self, sample: Sample) -> Iterable[tuple[str, bool]]:
        """The ``(text, add_special_tokens)`` pairs :meth:`encode` tokenizes through :meth:`tokens`, so that
        :meth:`encode_many` can tokenize them in one batch first. Default: none (``encode`` calls the tokenizer)."""
        return ()

    def tokens(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """``tokenizer(text, add_special_tokens=...)["input_ids"]``, from :meth:`encode_many`'s batch when it holds
        the text."""
        ids = None if self._batch is None else self._batch.get((text, add_special_tokens))
        if ids is None:
            ids = self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
        return list(ids)

    def encode_many(self, samples: Sequence[Sample]) -> list[Encoded]:
        """``[self.encode(s) for s in samples]``, with every text of :meth:`texts` tokenized first in one batch call
        per ``add_special_tokens`` value.

        A fast tokenizer encodes a batch in parallel in Rust, releasing the GIL, and gives each text the ids it gives
        that text alone; texts repeated across samples (a question shared by its variants, steps shared by a problem's
        variants: about half of PRMBench's questions and steps) are tokenized once.
        """
        wanted = dict.fromkeys(pair for sample in samples for pair in self.texts(sample))
        batch: dict[tuple[str, bool], list[int]] = {}
        for special in (False, True):
            texts = [text for text, add in wanted if add is special]
            if texts:
                batch.update(zip(((text, special) for text in texts), batch_token_ids(self.tokenizer, texts, special)))
        self._batch = batch
        try:
            return [self.encode(sample) for sample in samples]
        finally:
            self._batch = None

    # -- rewards ----------------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def step_scores(
        self, model: torch.nn.Module, hidden: torch.Tensor, step_pos: torch.Tensor, *, backend: str = "auto"
    ) -> dict[str, torch.Tensor]:
        """The official step scores at the reward positions of a packed batch.

        Args:
            model: the PRM (its heads are read from it; its backbone already produced ``hidden``).
            hidden: (T, H), the backbone's final hidden states (``packing.backbone_hidden_states``).
            step_pos: (S,) int64, global token indices of the reward positions.
            backend: kernel backend for ``prmbench_fast.kernels.step_reward``.

        Returns:
            ``{"validity": (S,) float32}`` and, for families with redundancy scores, ``"redundancy": (S,) float32``:
            the values the official adapter stores as ``step_level_validity_scores`` / ``_redundancy_scores``.
        """

    # -- serving engines ---------------------------------------------------------------------------------------------
    #: Why an engine with STEP pooling cannot compute this family's scores; families that it can compute override
    #: :meth:`step_pooling` instead.
    step_pooling_refusal: ClassVar[str] = "no mapping to STEP pooling is defined for it"

    def step_pooling(self) -> StepPooling:
        """How an engine with STEP pooling (vLLM) computes this family's step scores; raises :class:`FamilyError`
        naming the family and the reason when it cannot (reward positions not marked by one tag token, a score
        that is no function of a softmax at the tags, an option only the torch engine reproduces)."""
        raise FamilyError(f"{self.name}: cannot be scored with STEP pooling (vLLM): {self.step_pooling_refusal}")

    # -- labels -----------------------------------------------------------------------------------------------------
    def step_labels(self, scores: dict[str, torch.Tensor], cu_steps: torch.Tensor) -> dict[str, torch.Tensor]:
        """Labels from scores, on the scores' device, without host syncs. Default: strict ``score > threshold``.

        Args:
            scores: the output of :meth:`step_scores`.
            cu_steps: (B+1,) int32, per-sample offsets into the S scores (for rules that look at neighbours).

        Returns:
            ``{"validity": (S,) bool}`` (+ ``"redundancy"`` when scored): ``step_level_validity_labels`` etc.
        """
        labels = {"validity": scores["validity"] > self.validity_threshold}
        if "redundancy" in scores:
            labels["redundancy"] = scores["redundancy"] > self.redundancy_threshold
        return labels

    # -- selection and caching ---------------------------------------------------------------------------------------
    @classmethod
    def matches(cls, config: Any, name_or_path: str) -> bool:
        """Whether ``family="auto"`` should pick this family for a model with this config and name."""
        return False

    def cache_key(self) -> str:
        """Identifies the token ids :meth:`encode` produces: family, options, tokenizer vocabulary and specials."""
        if getattr(self, "_cache_key", None) is None:
            self._cache_key = self._fingerprint()
        return self._cache_key

    def _fingerprint(self) -> str:
        fingerprint = {
            "family": self.name,
            "options": {k: repr(v) for k, v in sorted(self.options.items())},
            "tokenizer": tokenizer_fingerprint(self.tokenizer),
        }
        return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]


def batch_token_ids(tokenizer: Any, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    """``tokenizer(texts, add_special_tokens=...)["input_ids"]``, straight from the Rust backend where that is the
    same call.

    A transformers fast tokenizer's ``__call__`` checks its arguments, clears the backend's truncation and padding,
    sets its ``encode_special_tokens`` from ``split_special_tokens``, calls the backend's ``encode_batch`` and converts
    every encoding to a dict of lists (~0.5 s of the ~2.3 s PRMBench's 48k distinct texts take on two idle cores).
    When the tokenizer's class keeps transformers' own encoding path and its backend already has no truncation or
    padding and the special-token setting ``__call__`` would set, the backend alone gives the same ids, and its
    ``encode_batch_fast`` (the same encoding without character offsets) gives them ~20 % sooner; any other tokenizer
    (a slow one, a subclass with its own encoding, a backend left truncating) goes through ``__call__``.
    """
    from transformers import PreTrainedTokenizerFast

    backend = getattr(tokenizer, "_tokenizer", None)
    cls = type(tokenizer)
    direct = (
        isinstance(tokenizer, PreTrainedTokenizerFast)
        and cls.__call__ is PreTrainedTokenizerFast.__call__
        and cls._encode_plus is PreTrainedTokenizerFast._encode_plus
        and not hasattr(tokenizer, "_switch_to_input_mode")
        and backend is not None
        and backend.truncation is None
        and backend.padding is None
        and backend.encode_special_tokens == bool(tokenizer.split_special_tokens)
    )
    if not direct:
        return tokenizer(texts, add_special_tokens=add_special_tokens, return_attention_mask=False)["input_ids"]
    return [encoding.ids for encoding in backend.encode_batch_fast(texts, add_special_tokens=add_special_tokens)]


#: tokenizer -> (its state when hashed, its hash): every score() call builds a family, and hashing a 150k vocabulary
#: costs ~0.1 s, a few percent of a repeated in-training call.
_TOKENIZER_HASHES: "weakref.WeakKeyDictionary[Any, tuple[tuple, str]]" = weakref.WeakKeyDictionary()


def tokenizer_fingerprint(tok: Any) -> str:
    """A hash of what maps text to token ids: the tokenizer's class, whole vocabulary, special tokens and chat template.

    Cached per tokenizer object, and recomputed when its size, special tokens or chat template changed (added tokens
    change the size)."""
    state = (len(tok), repr(getattr(tok, "all_special_tokens", [])), getattr(tok, "chat_template", None) or "")
    try:
        cached = _TOKENIZER_HASHES.get(tok)
    except TypeError:  # not weak-referenceable: hash every time
        cached = None
    if cached is not None and cached[0] == state:
        return cached[1]
    fingerprint = {
        "tokenizer": type(tok).__name__,
        # The whole vocabulary, not its size: a retrained tokenizer of the same size maps text differently.
        "vocab": sorted(tok.get_vocab().items()),
        "specials": state[1],
        "chat_template": state[2],
    }
    digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]
    try:
        _TOKENIZER_HASHES[tok] = (state, digest)
    except TypeError:
        pass
    return digest
