"""``PRMBenchCallback`` for Lightning 2.x: PRMBench scores of the model being trained, logged through
``pl_module.log`` so that ``ModelCheckpoint(monitor="prmbench/Overall", mode="max")`` and ``EarlyStopping`` use them::

    from prmbench_fast.integrations.lightning import PRMBenchCallback

    trainer = lightning.pytorch.Trainer(callbacks=[
        PRMBenchCallback(load_prmbench(limit_per_class=20), tokenizer=tokenizer),   # scores pl_module.model
        ModelCheckpoint(monitor="prmbench/Overall", mode="max"),
    ])

Two classes, one per package name Lightning ships under (a Trainer accepts callbacks of its own package only):
``PRMBenchCallback`` subclasses ``lightning.pytorch.Callback``, ``PyTorchLightningPRMBenchCallback``
``pytorch_lightning.Callback``. Importing this module imports neither package; naming a class imports its package, or
raises an ImportError naming ``pip install lightning`` (the ``lightning`` extra).
"""

from __future__ import annotations

import os
from typing import Any, Callable

import torch

from ..data import PRMBenchDataset
from ..extras import require
from ._scoring import ScoringSetup, check_positive_int

__all__ = ["PRMBenchCallback", "PyTorchLightningPRMBenchCallback"]

_OWN_PARAMETERS = {"tokenizer", "family", "model", "every_n_steps", "on_validation", "prefix", "output_dir",
                   "analyses"}
#: Class name -> the package whose ``Callback`` it subclasses.
_PACKAGES = {"PRMBenchCallback": "lightning.pytorch", "PyTorchLightningPRMBenchCallback": "pytorch_lightning"}
_CLASSES: dict[str, type] = {}


class _PRMBenchHooks:
    """Scores the live model on PRMBench sets during a Lightning fit and logs the leaderboard row with
    ``pl_module.log``.

    The model is scored at the end of every validation epoch (``on_validation=True``; not during the sanity check)
    and, with ``every_n_steps``, after every N optimizer steps; a step at which both happen is scored once. Each value
    is logged as ``prefix + column`` (``prmbench/Overall``, ..., ``prmbench/AUROC``, ``prmbench/trivial``; with several
    sets ``prmbench/<name>/Overall``), identical on every rank, so a ``ModelCheckpoint`` or ``EarlyStopping`` that
    monitors it decides alike on every rank. Lightning stores logged values in float32.

    Everything that can be checked is checked when the callback is built (unknown or misspelled keywords, family,
    tokenizer or data set given as a path, ``output_dir`` a file); what needs the model (the module to score, family
    "auto", family options, a ``monitor`` naming a PRMBench column this callback will not log, the strategy) in
    ``setup()``, before the first training step.

    Args:
        dataset: a ``PRMBenchDataset`` (``prmbench_fast.load_prmbench(...)``), or a mapping name -> one.
        tokenizer: the model's tokenizer (default: ``pl_module.tokenizer``).
        family: the PRM family, or ``"auto"`` (a ``*ForTokenClassification`` model no official family claims is
            ``generic``).
        model: where the PRM is: the name of a LightningModule attribute (default ``"model"``, e.g. an
            ``AutoModelForTokenClassification`` set in ``__init__``), a callable ``pl_module -> nn.Module``, or None
            for the LightningModule itself.
        every_n_steps: also score after every N optimizer steps (``trainer.global_step``).
        on_validation: score at the end of every validation epoch.
        prefix, output_dir, analyses, **score_options: as the transformers ``PRMBenchCallback``.

    Strategies: DDP (each rank scores its share, the ranks' predictions are gathered, every rank logs the same
    values) and FSDP2 (``ModelParallelStrategy`` with ``fully_shard``: parameters all-gathered for the call).
    ``FSDPStrategy`` wraps the model in ``FullyShardedDataParallel`` (FSDP1), which ``score()`` cannot run: refused in
    ``setup()``.
    """

    def __init__(
        self,
        dataset: PRMBenchDataset | dict[str, PRMBenchDataset],
        *,
        tokenizer: Any = None,
        family: str = "auto",
        model: str | Callable[[Any], torch.nn.Module] | None = "model",
        every_n_steps: int | None = None,
        on_validation: bool = True,
        prefix: str = "prmbench/",
        output_dir: str | os.PathLike | None = None,
        analyses: bool = True,
        **score_options: Any,
    ):
        super().__init__()
        check_positive_int("every_n_steps", every_n_steps, optional=True)
        if not isinstance(on_validation, bool):
            raise TypeError(f"on_validation must be True or False, got {on_validation!r}")
        if not on_validation and every_n_steps is None:
            raise ValueError("the callback would never score: give every_n_steps= or leave on_validation=True")
        if model is not None and not isinstance(model, str) and not callable(model):
            raise TypeError(f"model must be an attribute name, a callable or None, got {type(model).__name__}")
        self.scoring = ScoringSetup(type(self).__name__, dataset, tokenizer=tokenizer, family=family, prefix=prefix,
                                   output_dir=output_dir, options=score_options, own_parameters=_OWN_PARAMETERS,
                                   analyses=analyses)
        self.model, self.every_n_steps, self.on_validation = model, every_n_steps, on_validation
        self._scored: tuple[int, dict[str, float]] | None = None

    @property
    def family(self) -> str | None:
        """The family the model is scored as (resolved from "auto" in ``setup()``)."""
        return self.scoring.family

    def _module(self, pl_module) -> torch.nn.Module:
        if self.model is None:
            return pl_module
        if callable(self.model):
            module = self.model(pl_module)
        else:
            module = getattr(pl_module, self.model, None)
            if module is None:
                raise ValueError(f"model={self.model!r}: {type(pl_module).__name__} has no attribute {self.model!r} "
                                 "holding the PRM; pass model= the attribute's name, a callable, or None")
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"model={self.model!r} gives a {type(module).__name__}, not a torch.nn.Module")
        return module

    def setup(self, trainer, pl_module, stage: str) -> None:
        strategy = type(trainer.strategy).__name__
        if strategy == "FSDPStrategy":
            raise ValueError("PRMBenchCallback cannot score under FSDPStrategy: it shards with FullyShardedDataParallel "
                             "(FSDP1), which score() cannot run; use ModelParallelStrategy and shard the model with "
                             "torch.distributed.fsdp.fully_shard (FSDP2) in configure_model()")
        module = self._module(pl_module)
        self.scoring.resolve(module, getattr(pl_module, "tokenizer", None))
        logged = self.scoring.column_names()
        prefix = self.scoring.prefix
        for callback in trainer.callbacks:
            monitor = getattr(callback, "monitor", None)
            if isinstance(monitor, str) and prefix and monitor.startswith(prefix) and monitor not in logged:
                raise ValueError(f"{type(callback).__name__}(monitor={monitor!r}) names no value this callback logs; "
                                 f"it logs: {', '.join(sorted(logged))}")
        self._scored = None

    def on_fit_end(self, trainer, pl_module) -> None:
        self._scored = None  # the weights may change without a step (a checkpoint loaded for testing)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps is None or step == 0 or step % self.every_n_steps:
            return
        if self._scored is not None and self._scored[0] == step:
            return  # another micro-batch of the same optimizer step (gradient accumulation)
        for key, value in self._values(trainer, pl_module).items():
            pl_module.log(key, value, on_step=True, on_epoch=False)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not self.on_validation or trainer.sanity_checking:
            return
        for key, value in self._values(trainer, pl_module).items():
            # The value is the same on every rank; "max" keeps it exactly (a mean of equal floats need not).
            pl_module.log(key, value, on_step=False, on_epoch=True, sync_dist=True, reduce_fx="max")

    def _values(self, trainer, pl_module) -> dict[str, float]:
        step = trainer.global_step
        if self._scored is None or self._scored[0] != step:
            self._scored = (step, self.scoring.score(self._module(pl_module), step))
        return self._scored[1]


def __getattr__(name: str) -> type:
    if name not in _PACKAGES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if name not in _CLASSES:
        package = require(_PACKAGES[name], "lightning", f"the Lightning PRMBenchCallback (pip install lightning; "
                                                        f"{name} needs {_PACKAGES[name]})")
        _CLASSES[name] = type(name, (_PRMBenchHooks, package.Callback), {"__doc__": _PRMBenchHooks.__doc__,
                                                                         "__module__": __name__})
    return _CLASSES[name]
