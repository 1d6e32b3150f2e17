"""Optional dependencies: import them where they are used, and name the extra that installs them when they are missing.

Every optional import in the package goes through :func:`require`, so that a user without the extra gets one clear
message with the command to run instead of a bare ``ModuleNotFoundError``::

    openai = require("openai", "critic", "LLM critics through an OpenAI-compatible API")

The extras are declared in ``pyproject.toml`` (``[project.optional-dependencies]``).
"""

from __future__ import annotations

import importlib
import types

__all__ = ["MissingExtraError", "require"]


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message names the extra that installs it."""


def require(module: str, extra: str, purpose: str) -> types.ModuleType:
    """Import and return ``module``, or raise :class:`MissingExtraError` naming the extra that provides it.

    Args:
        module: the import name, e.g. ``"openai"`` or ``"matplotlib.pyplot"``.
        extra: the name of the extra in ``pyproject.toml`` that installs it, e.g. ``"critic"``.
        purpose: what needs it, completing "... is needed for <purpose>", e.g. ``"the HTML report"``.

    Only a missing ``module`` (or a missing parent package of it) is reported this way; an error raised while the
    module itself imports (a broken installation, a missing dependency of *its own*) propagates unchanged.
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        missing = err.name or ""
        if not missing or not (module == missing or module.startswith(missing + ".")):
            raise
        raise MissingExtraError(
            f"{module!r} is needed for {purpose} but is not installed; install it with: "
            f"pip install 'prmbench-fast[{extra}]'",
            name=module,
        ) from err
