"""Text helpers shared by the families, reproducing the official adapters' string handling (SPEC §1.5)."""

from __future__ import annotations

import re

# One leading "Step <digits>." or "<digits>." (case-insensitive), with optional whitespace around the digits' dot.
# The colon form "Step 1:" is deliberately not matched: the official helper leaves it in place.
_STEP_PREFIX = re.compile(r"(?:step\s*\d+\.\s*|\d+\.\s*)", re.IGNORECASE)


def clean_step(step: str) -> str:
    """The official ``remove_step_prefix``: strip, then drop one leading step number.

    Its side effects are part of the official numbers and kept on purpose: "0.15" becomes "15", "7.8 minutes"
    becomes "8 minutes", and a step that is only "64." becomes empty.
    """
    text = step.strip()
    match = _STEP_PREFIX.match(text)
    return text[match.end():] if match else text
