"""Glue to training frameworks. Each module imports its framework itself, so importing this package imports none.

- :mod:`prmbench_fast.integrations.transformers`: :class:`PRMBenchCallback`, a ``transformers.TrainerCallback``
  (also for TRL's trainers, which subclass ``Trainer``); exported lazily as ``prmbench_fast.PRMBenchCallback``.
"""
