"""A cheap, deterministic fingerprint of a model's weights, for the run identity of a results folder.

The same weights give the same fingerprint wherever they are (any device, any number of CPU threads, after a save and
load); one changed element, one optimizer step, a changed buffer, dtype or shape give another. It is computed where
the weights are, without a copy of the model and with one device-to-host transfer per device; sharded weights
(DTensors, FSDP2) from each rank's shards, summed across ranks into one fingerprint for every rank and layout.
"""

from __future__ import annotations

import hashlib
import json
import math

import torch

#: Elements of each tensor read at a fixed stride for the position-weighted checksum (the full-tensor sum below
#: catches changes between the sampled positions).
SAMPLE_WORDS = 1024
#: The full-tensor sum runs over chunks of at most this many words: its int64 accumulation copies a chunk
#: (2**24 words = 128 MiB of int64), never the whole of a large embedding matrix.
SUM_CHUNK_WORDS = 2**24
#: Hex digits kept from the sha256 (64 bits: collisions between two runs of one folder are not a concern).
FINGERPRINT_HEX_DIGITS = 16

# Each element is read as the integer words of its exact bits: 1- and 2-byte dtypes as one word, 4- and 8-byte (and
# complex) dtypes as 32-bit words. Integer sums of these are exact and independent of the reduction order, so the
# result does not depend on the device or the thread count (a float sum would: its rounding follows the order).
_WORD_DTYPE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int32, 16: torch.int32}


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A short hex string identifying the model's parameters and buffers.

    For every parameter and buffer, in name order: its name, shape and dtype, the exact sum of all its elements' bit
    patterns (as integer words), and a position-weighted checksum of ``SAMPLE_WORDS`` words read at a fixed stride.
    These figures are computed on the tensors' devices, gathered into one int64 tensor per device and copied to the
    host once; the names, shapes, dtypes and figures are then hashed with sha256.

    Sharded parameters (``DTensor``, e.g. after FSDP2 ``fully_shard``) are never gathered. Each rank computes the
    figures of its local shard at the shard's positions in the whole tensor, and the ranks' figures are summed over
    the mesh (one ``all_reduce`` per sharded mesh dimension and mesh): integer sums, so every rank gets the figures of
    the whole tensor, and one fingerprint for the same weights however they are sharded (any number of ranks, any
    ``Shard``/``Replicate`` placements). The header marks the tensor as sharded, so the fingerprint differs from the
    same weights held whole. Other placements (``Partial``, the strided sharding of FSDP over tensor parallelism):
    the local shard's own figures, with its placement and mesh coordinate in the header, and the fingerprint is the
    hash of every rank's (``all_gather_object``): one for all ranks, but specific to the layout.

    Every rank must call it when the model holds DTensors (it then runs collectives, the same on every rank).

    Raises:
        ValueError: a tensor is on the meta device (its values do not exist yet).
    """
    headers: list[list] = []
    figures: dict[torch.device, list[torch.Tensor]] = {}
    order: list[tuple[torch.device, int]] = []
    reductions: dict[tuple, list[tuple[torch.device, int]]] = {}  # (mesh, sharded mesh dims) -> its tensors' figures
    layout_specific = False
    dtensor = _dtensor_class()
    named = list(model.named_parameters()) + list(model.named_buffers())
    for name, tensor in sorted(named, key=lambda item: item[0]):
        local, header, part = _local_tensor(name, tensor)
        headers.append(header)
        per_device = figures.setdefault(local.device, [])
        order.append((local.device, len(per_device)))
        if part is not None and part[1]:
            mesh, dims, offset = part
            per_device.append(_figures(local, shape=tuple(tensor.shape), offset=offset))
            reductions.setdefault((mesh, dims), []).append(order[-1])
        else:  # a whole tensor (or replicated), or a shard that is no box of it
            per_device.append(_figures(local))
            layout_specific |= part is None and dtensor is not None and isinstance(tensor, dtensor)
    stacked = {device: torch.stack(parts) for device, parts in figures.items()}
    for (mesh, dims), members in reductions.items():  # in name order of their first tensor: the same on every rank
        device = members[0][0]
        rows = torch.tensor([i for _, i in members], device=device)
        summed = stacked[device].index_select(0, rows)
        for dim in dims:
            torch.distributed.all_reduce(summed, group=mesh.get_group(dim))
        stacked[device].index_copy_(0, rows, summed)
    on_host = {device: parts.cpu().tolist() for device, parts in stacked.items()}
    record = [header + on_host[device][i] for header, (device, i) in zip(headers, order)]
    digest = _sha256(record)
    if layout_specific:
        digests: list = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(digests, digest)
        digest = _sha256(digests)
    return digest[:FINGERPRINT_HEX_DIGITS]


def _sha256(record: list) -> str:
    return hashlib.sha256(json.dumps(record, separators=(",", ":")).encode("utf-8")).hexdigest()


def _local_tensor(name: str, tensor: torch.Tensor) -> tuple[torch.Tensor, list, tuple | None]:
    """The tensor this process holds, its header (name, shape, dtype, and for a DTensor a sharding mark), and for a
    DTensor whose local shard is a box of the whole tensor: (mesh, the mesh dims it is sharded over, the box's
    offset in the whole tensor)."""
    header: list = [name, list(tensor.shape), str(tensor.dtype)]
    part = None
    dtensor = _dtensor_class()
    if dtensor is not None and isinstance(tensor, dtensor):
        from torch.distributed.tensor import Replicate, Shard

        mesh, placements = tensor.device_mesh, tensor.placements
        local = tensor.to_local()
        # Decided by the placements alone, the same on every rank: the two ways run different collectives.
        # (type(), not isinstance: _StridedShard, FSDP's sharding over tensor parallelism, is a subclass of Shard.)
        if all(type(p) in (Shard, Replicate) for p in placements):
            offset, size = _box(name, tuple(tensor.shape), mesh, placements)
            if size != list(local.shape):
                raise ValueError(f"cannot fingerprint {name!r}: this rank's shard has shape {list(local.shape)}, not "
                                 f"the {size} its placements {placements} give")
            header.append("sharded")
            part = (mesh, tuple(i for i, p in enumerate(placements) if type(p) is Shard), offset)
        else:
            header += [[str(p) for p in placements], mesh.get_coordinate()]
        tensor = local
    if tensor.is_meta:
        raise ValueError(f"cannot fingerprint {name!r}: it is on the meta device (its weights are not loaded)")
    return tensor.detach(), header, part


def _box(name: str, shape: tuple[int, ...], mesh, placements) -> tuple[list[int], list[int]]:
    """(offset, shape) of this rank's shard, in the whole tensor of ``shape``, of a DTensor placed with ``Shard`` and
    ``Replicate`` placements only.

    A ``Shard(d)`` placement splits dimension ``d`` as ``torch.chunk`` does (chunks of ceil(n / mesh size), the last
    ones shorter or empty), mesh dimension by mesh dimension; the caller checks the result against the local shape.
    """
    coordinate = mesh.get_coordinate()
    if coordinate is None:
        raise ValueError(f"cannot fingerprint {name!r}: this rank is outside its device mesh")
    offset, size = [0] * len(shape), list(shape)
    for mesh_dim, placement in enumerate(placements):
        if placement.is_replicate():
            continue
        dim = placement.dim % len(shape)
        chunk = -(-size[dim] // mesh.size(mesh_dim))
        start = min(coordinate[mesh_dim] * chunk, size[dim])
        offset[dim] += start
        size[dim] = min(chunk, size[dim] - start)
    return offset, size


def _dtensor_class():
    # Imported lazily and only when torch.distributed exists: some builds have no distributed package.
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def _figures(tensor: torch.Tensor, *, shape: tuple[int, ...] | None = None,
             offset: list[int] | None = None) -> torch.Tensor:
    """(2,) int64 on the tensor's device: the sum of all its words, and the strided sample's weighted checksum.

    ``tensor`` is the whole tensor, or (with ``shape`` and ``offset``) the box of a tensor of ``shape`` starting at
    ``offset``: then the sample positions are the whole tensor's, and only those inside the box are counted, so the
    figures of boxes that tile the whole tensor sum to the whole tensor's.
    """
    words = _words(tensor)
    total = torch.zeros((), dtype=torch.int64, device=words.device)
    for start in range(0, words.numel(), SUM_CHUNK_WORDS):
        total += words[start : start + SUM_CHUNK_WORDS].sum(dtype=torch.int64)
    per_element = max(1, tensor.element_size() // 4)  # as _words splits it: 8-byte dtypes in two 32-bit words...
    whole_words = words.numel() if shape is None else math.prod(shape) * per_element
    stride = max(1, whole_words // SAMPLE_WORDS)
    positions = torch.arange(0, whole_words, stride, device=words.device)[:SAMPLE_WORDS]
    # Weights 1..1024 make the checksum sensitive to which sampled word changed; |word| < 2**32, so every term is
    # below 2**42 and the sum below 2**52: exact in int64.
    weights = torch.arange(1, positions.numel() + 1, dtype=torch.int64, device=words.device)
    if shape is not None:
        positions, weights = _in_box(positions, weights, per_element, shape, offset, tensor.shape)
    sample = words[positions].to(torch.int64)
    return torch.stack([total, (sample * weights).sum()])


def _in_box(positions: torch.Tensor, weights: torch.Tensor, per_element: int, shape: tuple[int, ...],
            offset: list[int], box: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
    """The word positions of a whole tensor of ``shape`` that fall in the box at ``offset`` (as positions in the
    box's own words), with their weights."""
    element, word = positions // per_element, positions % per_element
    coordinates = torch.stack(torch.unravel_index(element, shape), dim=-1) - torch.tensor(offset, device=element.device)
    inside = ((coordinates >= 0) & (coordinates < torch.tensor(box, device=element.device))).all(dim=-1)
    local = torch.zeros_like(element)
    for dim, size in enumerate(box):  # row-major index in the box
        local = local * size + coordinates[:, dim]
    return (local * per_element + word)[inside], weights[inside]


def _words(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's elements as a flat integer view of their bits, in logical (row-major) order."""
    flat = tensor.contiguous().view(-1)  # a view of the usual contiguous tensor; a copy only of a non-contiguous one
    if flat.is_complex():
        flat = torch.view_as_real(flat).reshape(-1)
    if flat.dtype == torch.bool:
        return flat.view(torch.uint8)
    return flat.view(_WORD_DTYPE[flat.element_size()])
