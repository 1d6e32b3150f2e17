"""The precision of the official bf16 runs (SPEC §2.6 item 9), for families whose adapters load bf16 weights.

The official Qwen-PRM, PURE and ReasonEval adapters load the checkpoint in bf16 and run it through accelerate. The
probabilities they store then depend on the accelerate config's ``mixed_precision``:

- ``"bf16"`` -- the toolkit's example configs, so the likely setting of the published numbers: accelerate converts the
  model's outputs to fp32. The head's logits carry bf16 rounding (bf16 backbone, bf16 head), but the softmax runs in
  fp32 and the probabilities are not rounded.
- ``"no"`` -- the adapter's softmax of the bf16 logits returns bf16 probabilities (bf16 spacing near 0.5 is 2**-9, so
  exact ties with the threshold occur).

The family option ``official_mixed_precision="bf16"`` or ``"no"`` reproduces one of them; ``official_rounding=True``
is the earlier spelling of ``"no"``. They apply to a half-precision model, as the official runs load it: an fp32 model
has no bf16 rounding to reproduce and scores as by default. By default the head and the softmax run in fp32 on the
backbone's hidden states (the "exact" reading, within a bf16 ulp or two of either official setting).

The official numbers also need the official hidden states. The packed, unshared pipeline gives them (measured equal
to the official ``respond()`` bit for bit in bf16); prefix sharing computes a prefix's keys in an earlier forward
call of another shape, which moves bf16 hidden states by up to a bf16 ulp (5-18 % of the scores by up to 0.009 on
tiny bf16 models, and a label at an exact 0.5 tie flipped). So ``score()`` turns prefix sharing off by default when
an official setting is asked for (:func:`prefix_sharing_note`); ``share_prefixes=True`` still turns it on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .base import FamilyError

#: The accelerate ``mixed_precision`` values of the official runs that can be reproduced.
MIXED_PRECISION = ("bf16", "no")
#: The family options this module reads.
OPTIONS = ("official_mixed_precision", "official_rounding")


def official_mixed_precision(family: str, options: dict[str, Any]) -> str | None:
    """The official setting to reproduce, from a family's options: "bf16", "no", or None (the fp32 reading)."""
    value = options.get("official_mixed_precision")
    if value is not None and value not in MIXED_PRECISION:
        raise FamilyError(f"{family}: official_mixed_precision must be 'bf16' or 'no', got {value!r}")
    if options.get("official_rounding", False):
        if value == "bf16":
            raise FamilyError(
                f"{family}: official_rounding=True rounds the probabilities as under mixed_precision 'no'; "
                "it contradicts official_mixed_precision='bf16'"
            )
        return "no"
    return value


def applies(mixed_precision: str | None, head_dtype: torch.dtype) -> bool:
    """Whether the official setting changes anything: one was asked for and the head is in half precision."""
    return mixed_precision is not None and head_dtype != torch.float32


def official_probabilities(
    head: Callable[[torch.Tensor], torch.Tensor], rows: torch.Tensor, dtype: torch.dtype, mixed_precision: str
) -> torch.Tensor:
    """The head's softmax probabilities as the official run computes them, (S, C).

    The head runs in the model's ``dtype`` on the gathered rows (its logits rounded to ``dtype``), the softmax in fp32.
    Under ``"bf16"`` the fp32 probabilities are returned; under ``"no"`` they are rounded to ``dtype`` (what
    ``F.softmax`` of bf16 logits returns) and stay in ``dtype``, so that arithmetic on them (PURE's p1 - p0) rounds
    as the official run's does.
    """
    probs = torch.softmax(head(rows.to(dtype)).float(), dim=-1)
    return probs if mixed_precision == "bf16" else probs.to(dtype)


def prefix_sharing_note(family: Any) -> str | None:
    """Why ``score()`` leaves prefix sharing off by default for ``family`` (module docstring), or None."""
    mode = getattr(family, "mixed_precision", None)
    if mode is None:
        return None
    return (f"{family.name}: official_mixed_precision={mode!r} asks for the official numbers, which prefix sharing "
            "changes by up to a bf16 ulp: scoring without it (share_prefixes=True trades that for speed)")
