"""What differs across the supported torch, Triton and transformers releases, decided in one place.

The package supports torch 2.10 and later (with the Triton release each torch pairs, 3.6 and later) and transformers
5.17 and later. Everything that depends on which of them is installed is answered here, by looking at the installed
API rather than at version numbers (a backport or a patched build then still gets the right answer):

- Triton is optional: it exists only where its kernels can run (Linux). Without it ``triton`` and ``tl`` below are
  stand-ins whose kernels refuse to launch, and every ``backend="auto"`` path runs its torch implementation.
- ``torch.nn.attention.varlen.varlen_attn``: torch 2.10's takes neither ``scale`` nor ``window_size`` (it is
  unusable here: :func:`varlen_attn` is None there), torch 2.11's takes both but not ``enable_gqa`` (grouped-query
  attention then runs on key/value heads expanded to the query heads, the same arithmetic), 2.12 and later take all.
- Whether a compiled op has a kernel for a device (a CPU-only build of the extension on a GPU machine).
- FSDP2's private per-module state (prmbench_fast/live_model.py unshards a training model through it): torch 2.10 and
  2.11 keep one parameter group per module (``_fsdp_param_group``), later releases a list (``_fsdp_param_groups``).

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
    "fsdp_param_groups",
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
        reason = __getattr__("TRITON_IMPORT_ERROR")
        raise RuntimeError(
            f"the Triton kernel {self.__name__} cannot run: Triton is not installed ({reason}); "
            "install it (`pip install triton`, Linux only) or use backend=\"torch\""
        )


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length() if n > 0 else 0  # as triton.next_power_of_2, which maps 0 to 0


def _load_triton() -> dict:
    try:
        import triton
        import triton.language as tl

        return {"triton": triton, "tl": tl, "HAS_TRITON": True, "TRITON_IMPORT_ERROR": None}
    except ImportError as error:
        # The host-side helpers the kernel wrappers use, and a decorator that keeps kernel definitions importable.
        stand_in = types.SimpleNamespace(
            jit=_TritonUnavailable,
            cdiv=_cdiv,
            next_power_of_2=_next_power_of_2,
            knobs=types.SimpleNamespace(runtime=types.SimpleNamespace(interpret=False)),
            __version__=None,
        )
        return {"triton": stand_in, "tl": types.SimpleNamespace(constexpr=int), "HAS_TRITON": False,
                "TRITON_IMPORT_ERROR": error}


def __getattr__(name: str):
    # Triton (``triton``, ``tl``, ``HAS_TRITON``, ``TRITON_IMPORT_ERROR``) and ``varlen_attn`` are resolved at first
    # use (PEP 562): importing prmbench_fast (its evaluator reaches this module) must not import Triton, which takes
    # seconds; torch.nn.attention.varlen imports it through torch._dynamo.
    if name in ("triton", "tl", "HAS_TRITON", "TRITON_IMPORT_ERROR"):
        globals().update(_load_triton())
    elif name == "varlen_attn":
        globals()["varlen_attn"] = _find_varlen_attn()
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return globals()[name]


# -- varlen attention --------------------------------------------------------------------------------------------------
def _keywords(fn: Callable) -> frozenset[str]:
    try:
        return frozenset(inspect.signature(fn).parameters)
    except (TypeError, ValueError):  # a builtin without a signature: assume nothing beyond the positionals
        return frozenset()


def usable_varlen_attn(fn: Callable | None) -> Callable | None:
    """``fn`` (a torch release's ``varlen_attn``) if it takes ``scale`` and ``window_size``, else None: segments with a
    sliding window and models with their own softmax scale need both (torch 2.10's takes neither)."""
    return fn if fn is not None and {"scale", "window_size"} <= _keywords(fn) else None


def _find_varlen_attn() -> Callable | None:
    try:
        from torch.nn.attention.varlen import varlen_attn as found
    except ImportError:
        return None
    return usable_varlen_attn(found)


# ``varlen_attn`` (resolved by __getattr__ below): torch.nn.attention.varlen.varlen_attn when it takes ``scale`` and
# ``window_size`` (torch >= 2.11), else None.


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


# -- FSDP2 -------------------------------------------------------------------------------------------------------------
def fsdp_param_groups(state) -> list:
    """The parameter groups of an FSDP2 module's state (``module._get_fsdp_state()``), as a list on every torch.

    Raises AttributeError when the state has neither attribute (a torch that renamed them again)."""
    if hasattr(state, "_fsdp_param_groups"):
        return list(state._fsdp_param_groups)
    group = state._fsdp_param_group
    return [] if group is None else [group]
