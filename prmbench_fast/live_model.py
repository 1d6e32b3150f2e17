"""The live model that ``score()`` runs: the module inside DDP-style wrappers, FSDP2 unsharded layer by layer.

score() calls the backbone (``model.base_model``) and then reads the reward head's weights directly (``model.score``,
the LM-head rows), outside any module's forward:

- DDP / DataParallel keep the full module as ``.module``: it is unwrapped and used as it is.
- FSDP2 (``torch.distributed.fsdp.fully_shard``) keeps each parameter as a DTensor shard. :func:`sharded_scoring`
  splits its parameter groups in two. The *layer groups* (FSDP2 modules inside the backbone, typically one per
  decoder layer) are unsharded by FSDP2 itself in each layer's forward and resharded after it. The *held groups*
  (those holding a parameter read outside the backbone's forward, or whose forward score() never calls: typically the
  root group with the embeddings, the final norm and the reward or LM head) are unsharded for the forward loop. At
  any time a rank then holds its shards, the held groups whole, the layer whose forward runs, and what FSDP2 keeps
  for overlap or prefetches (one more layer's all-gather result; more only for modules the caller told FSDP2 to
  prefetch). A layer group's all-gather is a collective, so every rank runs the same number of backbone forwards:
  ranks with fewer batches run padding forwards (:meth:`ShardedScoring.forwards`).
- FSDP1 (``FullyShardedDataParallel``) is refused: its parameters are flat shards that score() cannot split into
  layer and head groups.
- DeepSpeed ZeRO-3 is refused: its partitioned parameters are empty tensors outside the modules' forwards, where the
  reward heads read them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from .compat import fsdp_param_groups
from .packing import TokenizedSample, _decoder, backbone_hidden_states, pack_batches

FSDP1_REFUSAL = (
    "score() cannot run a model wrapped in FullyShardedDataParallel (FSDP1): its parameters are flat shards, which "
    "score() cannot unshard per layer while the reward head's weights stay whole. Shard it with "
    "torch.distributed.fsdp.fully_shard (FSDP2, e.g. accelerate's fsdp_version: 2), which score() unshards layer by "
    "layer, or score a full copy (a saved checkpoint folder)."
)
ZERO3_REFUSAL = (
    "score() cannot run a model whose parameters DeepSpeed ZeRO-3 partitions (they carry ds_id): outside a module's "
    "forward they are empty, and the reward heads read them there, so the scores would be wrong. Score a full copy "
    "instead: load the weights into an unpartitioned model inside deepspeed.zero.GatheredParameters(model."
    "parameters()), or save a checkpoint folder (engine.save_16bit_model, or zero_to_fp32.py) and score that folder; "
    "or shard with torch.distributed.fsdp.fully_shard (FSDP2), which score() unshards layer by layer."
)
PREFIX_SHARING_REFUSAL = (
    "share_prefixes=True cannot run on a model whose decoder layers FSDP2 shards: each layer's forward all-gathers "
    "its parameters, a collective every rank must join the same number of times, while prefix sharing runs a number "
    "of forwards per rank that is known only as it goes. Leave share_prefixes at its default (off for such models)."
)


def _distributed() -> bool:
    # Both FSDP versions need an initialised process group to shard, so without one there is nothing to look for
    # (and torch.distributed.fsdp is not imported).
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DDP / DataParallel / DeepSpeed-engine-style wrappers (they keep it as ``.module``).

    Raises ValueError for a model wrapped in, or containing, FSDP1 ``FullyShardedDataParallel``, and for one with
    DeepSpeed ZeRO-3 partitioned parameters (see the module docstring); FSDP2 modules are the model itself and need no
    unwrapping (see :func:`sharded_scoring`).
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
    # ZeRO-3 marks every parameter it partitions with a ds_id; ZeRO-1/2 leave parameters whole and unmarked.
    if any(hasattr(p, "ds_id") for p in model.parameters()):
        raise ValueError(ZERO3_REFUSAL)
    return model


def shards_layers(model: torch.nn.Module) -> bool:
    """Whether score() runs ``model``'s backbone with FSDP2 all-gathering layer groups inside its forward (so that
    every rank must run the same number of backbone forwards)."""
    return bool(_groups(model)[1])


def forward_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype of the model's first parameter as the forward computes with it: FSDP2's ``param_dtype`` (its
    ``MixedPrecisionPolicy``) for a sharded parameter that has one, else the parameter's own dtype."""
    first = next(model.parameters())
    if _distributed():
        from torch.distributed.fsdp import FSDPModule

        # One FSDP2 module manages the parameter; its policy decides the dtype the parameter is all-gathered in.
        for module in model.modules():
            if isinstance(module, FSDPModule) and any(p is first for p in _managed(module, FSDPModule)):
                policy = getattr(module._get_fsdp_state(), "_mp_policy", None)
                return getattr(policy, "param_dtype", None) or first.dtype
    return first.dtype


def _managed(module: torch.nn.Module, fsdp_module: type) -> list[torch.nn.Parameter]:
    """The parameters the FSDP2 ``module`` shards: those below it that no nested FSDP2 module shards."""
    nested = {id(p) for m in module.modules() if m is not module and isinstance(m, fsdp_module) for p in m.parameters()}
    return [p for p in module.parameters() if id(p) not in nested]


def _groups(model: torch.nn.Module) -> tuple[list[tuple[str, torch.nn.Module]], list[tuple[str, torch.nn.Module]]]:
    """(the held FSDP2 modules, the layer FSDP2 modules), each with its qualified name; see the module docstring."""
    if not _distributed():
        return [], []
    from torch.distributed.fsdp import FSDPModule

    backbone = {id(m) for m in _decoder(model).modules()}
    # Parameters of modules outside the backbone: the reward head's, an LM head's (tied to the embeddings or not).
    read_outside = {id(p) for m in model.modules() if id(m) not in backbone for p in m.parameters(recurse=False)}
    held, layers = [], []
    for name, module in model.named_modules():
        if not isinstance(module, FSDPModule):
            continue
        if id(module) in backbone and not any(id(p) in read_outside for p in _managed(module, FSDPModule)):
            layers.append((name, module))
        else:
            held.append((name, module))
    return held, layers


class ShardedScoring:
    """What :func:`sharded_scoring` yields: the forward loop's FSDP2 bookkeeping (no-ops for other models)."""

    def __init__(self, model: torch.nn.Module, held: list[torch.nn.Module], layers: list[torch.nn.Module]):
        self.model = model
        self.held = held
        self.layers = layers

    @contextlib.contextmanager
    def forwards(self, batches: int | None) -> Iterator[int]:
        """For the forward loop: the held groups unsharded, and the number of padding forwards this rank runs
        (:meth:`pad`) after its ``batches`` backbone forwards, so that every rank runs as many as the busiest one.

        Every rank must enter it at the same point (one all-gather per held group, in module order, then one
        ``all_gather_object`` of the batch counts when layer groups exist). Enter it before ``torch.inference_mode``:
        FSDP2 keeps the unsharded parameters of a group's first all-gather for training, and they must not be
        inference tensors. ``batches`` None (an unknown count, prefix sharing) is refused when layer groups exist.
        """
        if self.layers and batches is None:
            raise ValueError(PREFIX_SHARING_REFUSAL)
        try:
            for module in self.held:
                module.unshard()
            padding = 0
            if self.layers:
                counts: list = [None] * torch.distributed.get_world_size()
                torch.distributed.all_gather_object(counts, batches)
                padding = max(counts) - batches
            yield padding
        finally:
            for module in self.held:
                module.reshard()

    def pad(self, forwards: int, device: torch.device) -> None:
        """Run ``forwards`` backbone forwards on a one-token batch, their outputs discarded: each runs the layer
        groups' all-gathers that the other ranks' remaining batches run."""
        if forwards <= 0:
            return
        batch = pack_batches([TokenizedSample([0], [], key=None)], max_length=1, batch_tokens=1)[0].to(device)
        for _ in range(forwards):
            backbone_hidden_states(self.model, batch)


@contextlib.contextmanager
def sharded_scoring(model: torch.nn.Module) -> Iterator[ShardedScoring]:
    """For the duration of a score() call, ``model``'s FSDP2 groups set up for scoring layer by layer; a no-op for
    other models. Nothing is unsharded on entry: the held groups are, inside :meth:`ShardedScoring.forwards`.

    Every rank must enter it. Layer groups reshard after each forward (whatever the training setting), so a rank holds
    one layer unsharded at a time (module docstring). On exit every group is resharded, and FSDP2's per-module
    settings and forward records are put back as they were, so training continues as if no forward had run.
    """
    held_named, layers_named = _groups(model)
    named = held_named + layers_named
    held, layers = [m for _, m in held_named], [m for _, m in layers_named]
    modules = held + layers
    if not modules:
        yield ShardedScoring(model, [], [])
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
        never_gathered = [
            module for module, state in zip(layers, states[len(held):])
            if any(not hasattr(p, "_unsharded_param") for g in fsdp_param_groups(state) for p in g.fsdp_params)
        ]
    except AttributeError as error:
        raise ValueError(
            f"score() cannot unshard this FSDP2 model with torch {torch.__version__} ({error}); score a full copy "
            "(a saved checkpoint folder) instead"
        ) from error

    try:
        for module in held:
            # Unsharded once for the loop: a reshard after a forward would all-gather again at the next batch.
            module.set_reshard_after_forward(False, recurse=False)
        for module in layers:
            module.set_reshard_after_forward(True, recurse=False)
        # FSDP2 creates a group's unsharded parameters at its first all-gather and keeps them for training; created
        # inside score()'s torch.inference_mode they would be inference tensors, which autograd refuses to save for
        # backward. A layer never all-gathered yet (a model scored before its first training step) is all-gathered
        # once here, one layer at a time. Every rank has run the same forwards, so all agree on which.
        for module in never_gathered:
            module.unshard()
            module.reshard()
        yield ShardedScoring(model, held, layers)
    finally:
        for state, auto, mesh_infos in saved:
            state._auto_reshard_after_forward = auto
            for group, mesh_info in zip(fsdp_param_groups(state), mesh_infos):
                group.post_forward_mesh_info = mesh_info
        # The forward order FSDP2 records drives its backward prefetching; the scoring forwards must not be in it.
        for comm_ctx, length in recorded.values():
            del comm_ctx.post_forward_order[length:]
        for group, length in indices:
            del group._post_forward_indices[length:]
        for module in modules:
            module.reshard()


def _inside(name: str, other: str) -> bool:
    """Whether the module named ``name`` lies strictly inside the module named ``other`` (qualified names)."""
    return name != other and (other == "" or name.startswith(other + "."))
