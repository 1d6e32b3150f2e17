"""What differs across the supported torch, Triton and transformers releases, decided in one place.

The package supports torch 2.10 and later (with the Triton release each torch pairs, 3.5 and later) and transformers
5.17 and later. Everything that depends on which of them is installed is answered here, by looking at the installed
API rather than at version numbers (a backport or a patched build then still gets the right answer):

- Triton is optional: it exists only where its kernels can run (Linux). Without it ``triton`` and ``tl`` below are
  stand-ins whose kernels refuse to launch, and every ``backend="auto"`` path runs its torch implementation.
- ``torch.nn.attention.varlen.varlen_attn``: torch 2.10's takes neither ``scale`` nor ``window_size`` (it is
  unusable here: :func:`varlen_attn` is None there), torch 2.11's takes both but not ``enable_gqa`` (grouped-query
  attention then runs on key/value heads expanded to the query heads, the same arithmetic), 2.12 and later take all.
- Whether a compiled op has a kernel for a device (a CPU-only build of the extension on a GPU machine).

Nothing here touches CUDA at import.
"""

from __future__ import annotations

import functools
import inspect
import types
import warnings
from typing import Callable

import torch

__all__ = [
    "FallbackWarning",
    "HAS_TRITON",
    "TRITON_IMPORT_ERROR",
    "has_kernel",
    "tl",
    "triton",
    "varlen_attn",
    "varlen_attn_takes_gqa",
    "warn_once",
]


class FallbackWarning(UserWarning):
    """A slower path runs because a faster one is unavailable in this environment; the message names the fix."""


_WARNED: set[str] = set()


def warn_once(key: str, message: str) -> None:
    """Warn with :class:`FallbackWarning` the first time ``key`` is seen in this process, silently after that."""
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, FallbackWarning, stacklevel=3)


# -- Triton ------------------------------------------------------------------------------------------------------------
class _TritonUnavailable:
    """Stands in for a ``@triton.jit`` kernel when Triton is not installed: defining it works, launching it raises."""

    def __init__(self, fn: Callable) -> None:
        self.__name__ = fn.__name__
        self.__doc__ = fn.__doc__

    def __getitem__(self, grid):
        raise RuntimeError(
            f"the Triton kernel {self.__name__} cannot run: Triton is not installed ({TRITON_IMPORT_ERROR}); "
            "install it (`pip install triton`, Linux only) or use backend=\"torch\""
        )


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
    TRITON_IMPORT_ERROR: ImportError | None = None
except ImportError as error:
    HAS_TRITON = False
    TRITON_IMPORT_ERROR = error
    # The host-side helpers the kernel wrappers use, and a decorator that keeps kernel definitions importable.
    triton = types.SimpleNamespace(
        jit=_TritonUnavailable,
        cdiv=_cdiv,
        next_power_of_2=_next_power_of_2,
        knobs=types.SimpleNamespace(runtime=types.SimpleNamespace(interpret=False)),
        __version__=None,
    )
    tl = types.SimpleNamespace(constexpr=int)


# -- varlen attention --------------------------------------------------------------------------------------------------
def _keywords(fn: Callable) -> frozenset[str]:
    try:
        return frozenset(inspect.signature(fn).parameters)
    except (TypeError, ValueError):  # a builtin without a signature: assume nothing beyond the positionals
        return frozenset()


def _find_varlen_attn() -> Callable | None:
    try:
        from torch.nn.attention.varlen import varlen_attn as found
    except ImportError:
        return None
    # Segments with a sliding window and models with their own softmax scale need both keywords (torch >= 2.11).
    return found if {"scale", "window_size"} <= _keywords(found) else None


#: ``torch.nn.attention.varlen.varlen_attn`` when it takes ``scale`` and ``window_size`` (torch >= 2.11), else None.
varlen_attn: Callable | None = _find_varlen_attn()


@functools.lru_cache(maxsize=None)
def varlen_attn_takes_gqa(fn: Callable) -> bool:
    """Whether a ``varlen_attn`` takes ``enable_gqa`` (torch >= 2.12); without it, grouped-query attention needs its
    key/value heads expanded to the query heads first."""
    return "enable_gqa" in _keywords(fn)


# -- compiled ops ------------------------------------------------------------------------------------------------------
def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether the registered op ``op`` ("namespace::name") has a kernel for ``dispatch_key`` ("CPU", "CUDA").

    A CPU-only build of the extension registers no CUDA kernel; calling the op on CUDA tensors would raise
    NotImplementedError from the dispatcher. (torch has asked this through the same private function in every
    supported release; should it disappear, the answer is "yes" and the dispatcher's error stays the safety net.)
    """
    ask = getattr(torch._C, "_dispatch_has_kernel_for_dispatch_key", None)
    return True if ask is None else bool(ask(op, dispatch_key))
