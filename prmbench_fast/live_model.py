"""The live model that ``score()`` runs: the module inside DDP-style wrappers, with whole parameters under FSDP2.

score() calls the backbone (``model.base_model``) and then reads the reward head's weights directly (``model.score``,
the LM-head rows), so every parameter it touches must be whole on every rank for the duration of the call:

- DDP / DataParallel keep the full module as ``.module``: it is unwrapped and used as it is.
- FSDP2 (``torch.distributed.fsdp.fully_shard``) keeps each parameter as a DTensor shard. :func:`whole_parameters`
  all-gathers every FSDP2 group once before the forward passes and reshards after, on every rank together.
- FSDP1 (``FullyShardedDataParallel``) is refused: its parameters are flat shards, and its nested instances all-gather
  inside their forward, which would need every rank to run the same number of forward passes; score() gives each
  rank a different shard of the samples.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from .compat import fsdp_param_groups

FSDP1_REFUSAL = (
    "score() cannot run a model wrapped in FullyShardedDataParallel (FSDP1): its parameters are flat shards and its "
    "nested instances all-gather inside forward, while score() runs a different number of batches on each rank. "
    "Shard it with torch.distributed.fsdp.fully_shard (FSDP2, e.g. accelerate's fsdp_version: 2), which score() "
    "unshards for the duration of the call, or score a full copy (a saved checkpoint folder)."
)


def _distributed() -> bool:
    # Both FSDP versions need an initialised process group to shard, so without one there is nothing to look for
    # (and torch.distributed.fsdp is not imported).
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DDP / DataParallel-style wrappers (they keep it as ``.module``).

    Raises ValueError for a model wrapped in, or containing, FSDP1 ``FullyShardedDataParallel`` (see the module
    docstring); FSDP2 modules are the model itself and need no unwrapping (see :func:`whole_parameters`).
    """
    fsdp1 = None
    if _distributed():
        from torch.distributed.fsdp import FullyShardedDataParallel as fsdp1
    while True:
        if fsdp1 is not None and isinstance(model, fsdp1):
            raise ValueError(FSDP1_REFUSAL)
        if not isinstance(getattr(model, "module", None), torch.nn.Module):
            break
        model = model.module
    if fsdp1 is not None and any(isinstance(m, fsdp1) for m in model.modules()):
        raise ValueError(FSDP1_REFUSAL)
    return model


@contextlib.contextmanager
def whole_parameters(model: torch.nn.Module) -> Iterator[None]:
    """For the duration, every FSDP2 parameter of ``model`` is whole on every rank; a no-op for other models.

    Every rank must enter it (one all-gather per FSDP2 group, in module order). Inside, FSDP2's forward hooks find
    their groups unsharded and, with resharding after forward switched off, run no collective: each rank may then run
    its own number of forward passes, and the heads read whole weights. On exit the groups are resharded and FSDP2's
    per-module settings and forward records are put back as they were, so training continues as if no forward had
    run. Needs the memory of the whole model's parameters (in FSDP's ``param_dtype``) on each rank meanwhile.

    Enter it before ``torch.inference_mode``: the first all-gather creates the unsharded parameters FSDP2 keeps for
    training, and they must not be inference tensors.
    """
    if not _distributed():
        yield
        return
    from torch.distributed.fsdp import FSDPModule

    named = [(name, m) for name, m in model.named_modules() if isinstance(m, FSDPModule)]
    modules = [m for _, m in named]
    if not modules:
        yield
        return
    # What follows reads and restores FSDP2 state that has no public getter (torch 2.10-2.15; compat.fsdp_param_groups
    # bridges the one rename among them). A torch that renamed it again gets a clear refusal here, before anything is
    # changed, rather than a half-restored model.
    try:
        states = [m._get_fsdp_state() for m in modules]
        # FSDP2 picks as root the first module to run forward. score() calls the backbone and the heads directly,
        # never the root's forward, so a model scored before its first training step would otherwise make its first
        # decoder layer the root; initialise from the outermost FSDP2 modules first (a no-op once they have run).
        for (name, _), state in zip(named, states):
            if not any(_inside(name, other) for other, _ in named):
                state._lazy_init()
        saved = [
            (state, state._auto_reshard_after_forward, [g.post_forward_mesh_info for g in fsdp_param_groups(state)])
            for state in states
        ]
        groups = [g for state in states for g in fsdp_param_groups(state)]
        recorded = {id(g.comm_ctx): (g.comm_ctx, len(g.comm_ctx.post_forward_order)) for g in groups}
        indices = [(g, len(g._post_forward_indices)) for g in groups]
    except AttributeError as error:
        raise ValueError(
            f"score() cannot unshard this FSDP2 model with torch {torch.__version__} ({error}); score a full copy "
            "(a saved checkpoint folder) instead"
        ) from error

    try:
        for module in modules:
            # A layer that resharded after its forward would all-gather again at the next batch: a collective that
            # ranks scoring different numbers of batches would not all join.
            module.set_reshard_after_forward(False, recurse=False)
        for module in modules:
            module.unshard()
        yield
    finally:
        for state, auto, mesh_infos in saved:
            state._auto_reshard_after_forward = auto
            for group, mesh_info in zip(fsdp_param_groups(state), mesh_infos):
                group.post_forward_mesh_info = mesh_info
        # The forward order FSDP2 records drives its backward prefetching; the scoring forwards (a different number
        # on each rank) must not be in it.
        for comm_ctx, length in recorded.values():
            del comm_ctx.post_forward_order[length:]
        for group, length in indices:
            del group._post_forward_indices[length:]
        for module in modules:
            module.reshard()


def _inside(name: str, other: str) -> bool:
    """Whether the module named ``name`` lies strictly inside the module named ``other`` (qualified names)."""
    return name != other and (other == "" or name.startswith(other + "."))
