"""torch.distributed helpers: every rank's flat predictions, gathered as device tensors."""

from __future__ import annotations

import dataclasses

import torch

from .predictions import StepPredictions


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _all_gather_ragged(tensor: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """Every rank's 1-D ``tensor`` (rank r holds ``lengths[r]`` values) concatenated in rank order, on its device."""
    world = len(lengths)
    if max(lengths) == 0:  # every rank knows the lengths, so all skip the collective together
        return tensor
    # Not every backend gathers bool tensors: they travel as uint8.
    wire = tensor.to(torch.uint8) if tensor.dtype == torch.bool else tensor
    padded = torch.zeros(max(lengths), dtype=wire.dtype, device=wire.device)
    padded[: wire.numel()] = wire
    parts = [torch.empty_like(padded) for _ in range(world)]
    torch.distributed.all_gather(parts, padded)
    joined = torch.cat([part[:n] for part, n in zip(parts, lengths)])
    return joined.bool() if tensor.dtype == torch.bool else joined


def gather_predictions(local: StepPredictions) -> StepPredictions:
    """Every rank's flat predictions, concatenated in rank order on each rank's device (so the first prediction of a
    sample is the lowest rank's). An optional field present on some ranks only is filled on the others
    (``StepPredictions.with_fields``). One host sync: the ranks' sizes and fields."""
    _, world = rank_and_world()
    if world == 1:
        return local
    device = local.device
    optional = list(StepPredictions.OPTIONAL_FIELDS)
    present = local.present_fields()
    header = torch.tensor([local.num_samples, local.num_steps] + [n in present for n in optional],
                          dtype=torch.int64, device=device)
    headers = [torch.empty_like(header) for _ in range(world)]
    torch.distributed.all_gather(headers, header)
    table = torch.stack(headers).tolist()
    samples, steps = [row[0] for row in table], [row[1] for row in table]
    local = local.with_fields([n for i, n in enumerate(optional) if any(row[2 + i] for row in table)])
    per_sample = {"sample_pos", "has_redundancy", "valid"}
    gathered = {}
    for field in dataclasses.fields(local):
        value = getattr(local, field.name)
        if field.name == "cu_steps":
            continue
        if value is not None:
            value = _all_gather_ragged(value, samples if field.name in per_sample else steps)
        gathered[field.name] = value
    counts = _all_gather_ragged(local.step_counts(), samples)
    cu_steps = torch.zeros(counts.numel() + 1, dtype=torch.int32, device=device)
    cu_steps[1:] = counts.cumsum(0)
    return StepPredictions(cu_steps=cu_steps, **gathered)
