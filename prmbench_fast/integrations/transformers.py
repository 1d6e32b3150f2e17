"""``PRMBenchCallback``: PRMBench scores of the model being trained, in a ``transformers.Trainer``'s logs.

Works with ``transformers.Trainer`` and so with TRL's trainers (``PRMTrainer`` trains an
``AutoModelForTokenClassification`` PRM, which is the ``generic`` family with the model's ``score`` head)::

    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=dev)
    trainer.add_callback(PRMBenchCallback(load_prmbench(limit_per_class=20), tokenizer=tokenizer, family="generic",
                                          trainer=trainer, every_n_steps=100))
    trainer.train()   # log history gets prmbench/Overall, prmbench/NR, ... every 100 steps and at each evaluation
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..data import PRMBenchDataset
from ..scoring import score

__all__ = ["PRMBenchCallback"]


class PRMBenchCallback(TrainerCallback):
    """Scores the live model on a PRMBench set during training and logs the leaderboard row.

    The model is scored at every evaluation (``on_evaluate``) and, with ``every_n_steps``, after every N optimizer
    steps (``on_step_end``); a step at which both happen is scored once. Each column of ``report.table`` with a value
    is logged as ``f"{prefix}{column}"`` (``prmbench/Overall``, ``prmbench/NR``, ...); a column is None, and not
    logged, when its classes are absent from ``dataset``.

    Args:
        dataset: the PRMBench samples to score (``prmbench_fast.load_prmbench(...)``; a stratified subset keeps it
            cheap). Tokenized and packed once, at the first call; later calls only run the model.
        tokenizer: the model's tokenizer.
        trainer: the ``Trainer`` the callback is added to (``trainer.add_callback(...)``). A callback has no other
            way to make the Trainer log: the values go through ``trainer.log()``, as TRL's ``WinRateCallback`` does.
        family: the PRM family (``"generic"`` for a token-classification PRM), or ``"auto"``.
        every_n_steps: also score after every N optimizer steps (None: only at evaluations).
        prefix: prepended to each column name.
        output_dir: if set, each call writes its results to ``output_dir/step-<global step>`` (started over if it
            exists, e.g. from an earlier run resumed from a checkpoint: those results belong to other weights), and
            the tokenized samples are kept once in ``output_dir/cache``.
        **score_options: passed to :func:`prmbench_fast.score` (``max_length=``, ``batch_tokens=``, family options
            such as ``step_separator=``...); ``progress`` is off unless given.

    The model scored is the Trainer's live one (``trainer.model_wrapped``, read at each call; DDP wrappers are
    unwrapped, FSDP2 parameters all-gathered for the call), in eval mode under ``torch.inference_mode``, put back in
    its previous mode afterwards. Under ``torch.distributed`` every rank scores its share of ``dataset`` (the callback
    runs on every rank, and every rank must call ``score()``) and the world process zero logs.
    """

    def __init__(
        self,
        dataset: PRMBenchDataset,
        *,
        tokenizer: Any,
        trainer: Trainer,
        family: str = "auto",
        every_n_steps: int | None = None,
        prefix: str = "prmbench/",
        output_dir: str | os.PathLike | None = None,
        **score_options: Any,
    ):
        if every_n_steps is not None and (isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int)
                                          or every_n_steps < 1):
            raise ValueError(f"every_n_steps must be a positive int or None, got {every_n_steps!r}")
        if not isinstance(trainer, Trainer):
            raise TypeError(f"trainer must be the transformers.Trainer the callback is added to, got "
                            f"{type(trainer).__name__}")
        self.dataset = dataset
        self.tokenizer = tokenizer
        self.trainer = trainer
        self.family = family
        self.every_n_steps = every_n_steps
        self.prefix = prefix
        self.output_dir = None if output_dir is None else pathlib.Path(output_dir)
        self.score_options = {"progress": False, **score_options}
        if self.output_dir is not None:
            self.score_options.setdefault("cache_dir", self.output_dir / "cache")
        # The global step whose weights were scored last: evaluation right after an every_n_steps call, or a second
        # evaluation dataset, sees the same weights and is not scored again. Weights may change between training
        # runs without a step (load_best_model_at_end, resuming), so this is forgotten at each run's start and end.
        self._scored_step: int | None = None

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self._scored_step = None

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self._scored_step = None

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self.every_n_steps is not None and state.global_step % self.every_n_steps == 0:
            return self._score_and_log(state, control)
        return None

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        return self._score_and_log(state, control)

    def _score_and_log(self, state: TrainerState, control: TrainerControl) -> TrainerControl | None:
        step = state.global_step
        if step == self._scored_step:
            return None
        options = dict(self.score_options)
        if self.output_dir is not None:
            options.update(output_dir=self.output_dir / f"step-{step}", overwrite=True)
        model = self.trainer.model_wrapped
        report = score(model, self.dataset, tokenizer=self.tokenizer, family=self.family, **options)
        self._scored_step = step
        if not state.is_world_process_zero:
            return None
        # Trainer.log() appends the values (with epoch and step) to state.log_history and calls every callback's
        # on_log: the reporters (wandb, tensorboard, ...) and the progress printer. It also clears control.should_log
        # (set by DefaultFlowCallback at a logging step before this callback runs); put it back, or the Trainer's own
        # loss log of this step would be skipped.
        should_log = control.should_log
        self.trainer.log({f"{self.prefix}{column}": v for column, v in report.table.items() if v is not None})
        control.should_log = should_log
        return control
