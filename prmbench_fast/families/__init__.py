"""The PRM families ``score()`` knows, by name, and ``family="auto"`` selection."""

from __future__ import annotations

import importlib
from typing import Any

from .base import Encoded, Family, FamilyError

#: name -> module defining the family class (imported on first use, so a family's extra imports cost nothing
#: to the others).
_MODULES = {
    "math_shepherd": "math_shepherd",
    "qwen_prm": "qwen_prm",
    "skywork": "skywork",
    "rlhflow": "rlhflow",
    "reasoneval": "reasoneval",
    "llemma": "llemma",
    "mathminos": "mathminos",
    "pure_prm": "pure_prm",
    "generic": "generic",
    "lm_judge": "lm_judge",
}
FAMILY_NAMES = tuple(_MODULES)


def family_class(name: str) -> type[Family]:
    if name not in _MODULES:
        raise FamilyError(f"unknown PRM family {name!r}; choose one of: {', '.join(FAMILY_NAMES)}")
    module = importlib.import_module(f"{__name__}.{_MODULES[name]}")
    for value in vars(module).values():
        if isinstance(value, type) and issubclass(value, Family) and getattr(value, "name", None) == name:
            return value
    raise FamilyError(f"module {module.__name__} defines no Family named {name!r}")


def detect_family(config: Any, name_or_path: str) -> str:
    """The family whose ``matches`` accepts this model; a clear error listing the families otherwise."""
    found = [name for name in FAMILY_NAMES if family_class(name).matches(config, name_or_path)]
    if len(found) == 1:
        return found[0]
    what = f"model {name_or_path!r}" + (f" ({type(config).__name__})" if config is not None else "")
    if not found:
        raise FamilyError(
            f"cannot tell which PRM family {what} belongs to; pass family= one of: {', '.join(FAMILY_NAMES)}"
        )
    raise FamilyError(f"{what} matches several PRM families ({', '.join(found)}); pass family= explicitly")


__all__ = ["Encoded", "Family", "FamilyError", "FAMILY_NAMES", "detect_family", "family_class"]
