"""torch.distributed helpers: every rank's flat predictions, gathered as device tensors."""

from __future__ import annotations

import dataclasses
import functools

import torch

from .predictions import StepPredictions

#: The dtypes a field of :class:`StepPredictions` may have, by the code that names them in the gather's header.
_DTYPES = (torch.bool, torch.int32, torch.int64, torch.float16, torch.bfloat16, torch.float32, torch.float64)


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _all_gather_ragged(tensor: torch.Tensor, lengths: list[int], dtype: torch.dtype) -> torch.Tensor:
    """Every rank's 1-D ``tensor`` (rank r holds ``lengths[r]`` values) concatenated in rank order, on its device, in
    ``dtype``: the dtype every rank agreed on (``all_gather`` needs one dtype on every rank)."""
    world = len(lengths)
    tensor = tensor.to(dtype)
    if max(lengths) == 0:  # every rank knows the lengths, so all skip the collective together
        return tensor
    # Not every backend gathers bool tensors: they travel as uint8.
    wire = tensor.to(torch.uint8) if dtype == torch.bool else tensor
    padded = torch.zeros(max(lengths), dtype=wire.dtype, device=wire.device)
    padded[: wire.numel()] = wire
    parts = [torch.empty_like(padded) for _ in range(world)]
    torch.distributed.all_gather(parts, padded)
    joined = torch.cat([part[:n] for part, n in zip(parts, lengths)])
    return joined.bool() if dtype == torch.bool else joined


def _common_dtype(codes: list[int]) -> torch.dtype:
    """The dtype of a field gathered from ranks whose dtypes are ``_DTYPES[codes[r]]``: their promotion, as
    ``StepPredictions.concat`` promotes its parts. Promotion is exact for every value: each dtype of :data:`_DTYPES`
    is a subset of its promotion with the others (bf16 and fp16 promote to fp32, anything with fp64 to fp64), so a
    rank's bf16 scores arrive unchanged next to another rank's fp32 ones (or an empty rank's fp32 NaN fill)."""
    return functools.reduce(torch.promote_types, (_DTYPES[code] for code in codes))


def gather_predictions(local: StepPredictions) -> StepPredictions:
    """Every rank's flat predictions, concatenated in rank order on each rank's device (so the first prediction of a
    sample is the lowest rank's). An optional field present on some ranks only is filled on the others
    (``StepPredictions.with_fields``); a field whose dtype differs between ranks (bf16 scores on one, fp32 on
    another or the fp32 NaN fill of an empty rank) is gathered in the ranks' common dtype (:func:`_common_dtype`).
    One host sync: the ranks' sizes, fields and dtypes."""
    _, world = rank_and_world()
    if world == 1:
        return local
    device = local.device
    optional = list(StepPredictions.OPTIONAL_FIELDS)
    present = local.present_fields()
    # Each field's dtype as it will travel: a field this rank lacks counts in the dtype it would be filled in.
    names = [f.name for f in dataclasses.fields(local) if f.name != "cu_steps"]
    filled = local.with_fields(optional)
    codes = [_DTYPES.index(getattr(filled, n).dtype) for n in names]
    header = torch.tensor([local.num_samples, local.num_steps] + [n in present for n in optional] + codes,
                          dtype=torch.int64, device=device)
    headers = [torch.empty_like(header) for _ in range(world)]
    torch.distributed.all_gather(headers, header)
    table = torch.stack(headers).tolist()
    samples, steps = [row[0] for row in table], [row[1] for row in table]
    local = local.with_fields([n for i, n in enumerate(optional) if any(row[2 + i] for row in table)])
    first_code = 2 + len(optional)
    per_sample = {"sample_pos", "has_redundancy", "valid"}
    gathered = {}
    for i, name in enumerate(names):
        value = getattr(local, name)
        if value is not None:
            lengths = samples if name in per_sample else steps
            dtype = _common_dtype([row[first_code + i] for row in table])
            value = _all_gather_ragged(value, lengths, dtype)
        gathered[name] = value
    counts = _all_gather_ragged(local.step_counts(), samples, torch.int64)
    cu_steps = torch.zeros(counts.numel() + 1, dtype=torch.int32, device=device)
    cu_steps[1:] = counts.cumsum(0)
    return StepPredictions(cu_steps=cu_steps, **gathered)
