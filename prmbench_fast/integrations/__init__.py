"""Glue to training frameworks. Each module imports its framework itself, so importing this package imports none.

- :mod:`prmbench_fast.integrations.transformers`: :class:`PRMBenchCallback`, a ``transformers.TrainerCallback``
  (also for TRL's trainers, which subclass ``Trainer``); exported lazily as ``prmbench_fast.PRMBenchCallback``.
- :mod:`prmbench_fast.integrations.lightning`: ``PRMBenchCallback`` for ``lightning.pytorch`` and
  ``PyTorchLightningPRMBenchCallback`` for ``pytorch_lightning`` (Lightning 2.x; the ``lightning`` extra).
- :mod:`prmbench_fast.integrations._scoring`: what both share (options checked at construction, the family resolved
  from the model, sets by name, the values a scoring call logs); imports no framework.
"""
