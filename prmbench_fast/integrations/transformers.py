"""``PRMBenchCallback``: PRMBench scores of the model being trained, in a ``transformers.Trainer``'s logs and in the
metrics of its evaluations, so that they can pick the checkpoint and stop training::

    args = TrainingArguments(..., eval_strategy="steps", save_strategy="steps", load_best_model_at_end=True,
                             metric_for_best_model="eval_prmbench/Overall")
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=dev, processing_class=tokenizer,
                      callbacks=[EarlyStoppingCallback(early_stopping_patience=3)])
    trainer.add_callback(PRMBenchCallback(load_prmbench(limit_per_class=20), trainer=trainer))
    trainer.train()   # ends on the checkpoint with the best PRMBench Overall

Works with the trainers that subclass ``Trainer`` (TRL's among them; ``trl.experimental.PRMTrainer`` up to TRL 0.29
trains an ``AutoModelForTokenClassification`` PRM, which is the ``generic`` family with the model's ``score`` head).
"""

from __future__ import annotations

import difflib
import os
from typing import Any

from transformers import ProcessorMixin, Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..data import PRMBenchDataset
from ._scoring import ScoringSetup, check_positive_int

__all__ = ["PRMBenchCallback"]

_OWN_PARAMETERS = {"trainer", "tokenizer", "family", "every_n_steps", "prefix", "output_dir", "analyses"}


class PRMBenchCallback(TrainerCallback):
    """Scores the live model on PRMBench sets during training; logs each set's leaderboard row and puts it into the
    metrics of the evaluation it runs at.

    The model is scored at every evaluation (``on_evaluate``) and, with ``every_n_steps``, after every N optimizer
    steps (``on_step_end``); a step at which both happen is scored once. Each value is logged as ``prefix + column``
    (``prmbench/Overall``, ``prmbench/NR``, ..., ``prmbench/AUROC``; with several sets ``prmbench/<name>/Overall``)
    through ``trainer.log()``, and at an evaluation it is also added to that evaluation's metrics as
    ``eval_prmbench/Overall`` ...: what ``metric_for_best_model``, ``load_best_model_at_end`` and
    ``EarlyStoppingCallback`` read (``metric_for_best_model="prmbench/Overall"`` works too: the Trainer adds
    ``eval_``). A column is None, and not logged, when its classes are absent from the set.

    Besides the row: ``AUROC`` (threshold-free: how well the validity scores rank correct steps above error steps,
    0-1), ``Overall_at_best_threshold`` and ``best_threshold`` (what a calibrated label threshold would give), and
    ``trivial`` (1.0 when the model labels every counted step the same, so that the row is exactly the all-positive
    or all-negative predictor's, with a :class:`~prmbench_fast.integrations._scoring.TrivialPredictorWarning`).

    Everything is checked here, before training starts: an unknown or misspelled keyword, an unknown family or
    family option, a tokenizer, data set or list given instead of the objects, an ``output_dir`` that is a file, a
    ``metric_for_best_model`` naming a PRMBench column this callback will not log.

    Args:
        dataset: the PRMBench samples to score (``prmbench_fast.load_prmbench(...)``; a stratified subset keeps it
            cheap), or a mapping name -> samples, each scored and logged under its name. Tokenized and packed once,
            at the first call; later calls only run the model.
        trainer: the ``Trainer`` the callback is added to (``trainer.add_callback(...)``). A callback has no other
            way to make the Trainer log: the values go through ``trainer.log()``, as TRL's ``WinRateCallback`` does.
        tokenizer: the model's tokenizer (default: the Trainer's ``processing_class``).
        family: the PRM family, or ``"auto"`` (from the model's config and name; a ``*ForTokenClassification`` model
            that no official family claims is ``generic``).
        every_n_steps: also score after every N optimizer steps (None: only at evaluations).
        prefix: prepended to each column name.
        output_dir: if set, each call writes its results to ``output_dir/step-<global step>`` (``output_dir/<name>/
            step-<global step>`` for a mapping), started over if it exists (e.g. from an earlier run resumed from a
            checkpoint: those results belong to other weights); tokenized samples are kept in ``output_dir/cache``.
        analyses: log the AUROC and best-threshold columns (they read the step scores on the host once per call).
        **score_options: passed to :func:`prmbench_fast.score` (``max_length=``, ``batch_tokens=``, family options
            such as ``step_separator=``...); ``progress`` is off unless given.

    The model scored is the Trainer's live one (``trainer.model_wrapped``, read at each call; DDP wrappers are
    unwrapped, FSDP2 parameters all-gathered for the call), in eval mode under ``torch.inference_mode``, put back in
    its previous mode afterwards. Under ``torch.distributed`` every rank scores its share (the callback runs on every
    rank, and every rank must call ``score()``), every rank's evaluation metrics get the values, and the world
    process zero logs.
    """

    def __init__(
        self,
        dataset: PRMBenchDataset | dict[str, PRMBenchDataset],
        *,
        trainer: Trainer,
        tokenizer: Any = None,
        family: str = "auto",
        every_n_steps: int | None = None,
        prefix: str = "prmbench/",
        output_dir: str | os.PathLike | None = None,
        analyses: bool = True,
        **score_options: Any,
    ):
        if not isinstance(trainer, Trainer):
            raise TypeError(f"trainer must be the transformers.Trainer the callback is added to, got "
                            f"{type(trainer).__name__}")
        check_positive_int("every_n_steps", every_n_steps, optional=True)
        self.scoring = ScoringSetup(type(self).__name__, dataset, tokenizer=tokenizer, family=family, prefix=prefix,
                                  output_dir=output_dir, options=score_options, own_parameters=_OWN_PARAMETERS,
                                  analyses=analyses)
        if tokenizer is None:
            tokenizer = trainer.processing_class
            if isinstance(tokenizer, ProcessorMixin):  # a multimodal processor holds the tokenizer
                tokenizer = tokenizer.tokenizer
        self.scoring.resolve(trainer.model, tokenizer)
        _check_metric_for_best_model(trainer.args.metric_for_best_model, prefix, self.scoring.column_names())
        self.trainer = trainer
        self.every_n_steps = every_n_steps
        # The global step whose weights were scored last, and what they gave: an evaluation right after an
        # every_n_steps call, or a second evaluation dataset, sees the same weights and is not scored again. Weights
        # may change between training runs without a step (load_best_model_at_end, resuming), so this is forgotten at
        # each run's start and end.
        self._scored: tuple[int, dict[str, float]] | None = None

    @property
    def datasets(self) -> dict[str, PRMBenchDataset]:
        """The sets scored, by name (``""`` for a single set)."""
        return self.scoring.datasets

    @property
    def family(self) -> str:
        """The family the model is scored as (resolved from "auto")."""
        return self.scoring.family

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self._scored = None
        # The values must be in an evaluation's metrics before a callback that reads them (EarlyStoppingCallback,
        # usually given to the Trainer's constructor, so listed before this one) sees them: move this callback right
        # after DefaultFlowCallback. The handler is iterating its list now; moving an item that was already visited
        # to an earlier place leaves the items after it where the iteration expects them.
        callbacks = self.trainer.callback_handler.callbacks
        if self in callbacks:
            callbacks.remove(self)
            first = next((i + 1 for i, c in enumerate(callbacks) if type(c).__name__ == "DefaultFlowCallback"), 0)
            callbacks.insert(first, self)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self._scored = None

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self.every_n_steps is not None and state.global_step % self.every_n_steps == 0:
            self._values(state, control)
            return control
        return None

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, metrics=None,
                    **kwargs):
        values = self._values(state, control)
        if metrics is not None:
            # The dict Trainer.evaluate() returns and hands to _determine_best_metric (load_best_model_at_end).
            metrics.update({f"eval_{key}": value for key, value in values.items()})
        return control

    def _values(self, state: TrainerState, control: TrainerControl) -> dict[str, float]:
        step = state.global_step
        if self._scored is not None and self._scored[0] == step:
            return self._scored[1]
        values = self.scoring.score(self.trainer.model_wrapped, step)
        self._scored = (step, values)
        if state.is_world_process_zero:
            # Trainer.log() appends the values (with epoch and step) to state.log_history and calls every callback's
            # on_log: the reporters (wandb, tensorboard, ...) and the progress printer. It also clears
            # control.should_log (set by DefaultFlowCallback at a logging step before this callback runs); put it
            # back, or the Trainer's own loss log of this step would be skipped.
            should_log = control.should_log
            self.trainer.log(dict(values))
            control.should_log = should_log
        return values


def _check_metric_for_best_model(metric: str | None, prefix: str, logged: set[str]) -> None:
    """A ``metric_for_best_model`` that names a PRMBench column must name one this callback puts into the metrics."""
    if metric is None or not prefix:
        return
    name = metric[len("eval_"):] if metric.startswith("eval_") else metric
    if name.startswith(prefix) and name not in logged:
        close = difflib.get_close_matches(name, sorted(logged), n=1)
        raise ValueError(f"metric_for_best_model={metric!r} names no value this callback gives an evaluation"
                         + (f" (did you mean {'eval_' + close[0]!r}?)" if close else "")
                         + f"; it gives: {', '.join(sorted('eval_' + n for n in logged))}")
