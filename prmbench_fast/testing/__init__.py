"""Helpers shared by the test suite and the benchmarks (bench/ must not import from tests/).

- ``official_oracle``: an independent, plain-Python statement of the official PRMBench evaluator, the oracle the
  evaluator is checked and benchmarked against.
- ``tiny_models``: tiny offline models and tokenizers (no model hub on these machines).

Not imported by ``prmbench_fast`` itself; ``tiny_models`` needs transformers and tokenizers.
"""
