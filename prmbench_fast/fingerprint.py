"""A cheap, deterministic fingerprint of a model's weights, for the run identity of a results folder.

The same weights give the same fingerprint wherever they are (any device, any number of CPU threads, after a save and
load); one changed element, one optimizer step, a changed buffer, dtype or shape give another. It is computed where
the weights are, without a copy of the model and with one device-to-host transfer per device.
"""

from __future__ import annotations

import hashlib
import json

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

    Sharded parameters (``DTensor``, e.g. after FSDP2 ``fully_shard``) are never read as if whole: each rank reads its
    local shard and records the shard's placement and mesh coordinate, so the fingerprint describes *this rank's
    shard* and differs between ranks. No collective is run. To identify the whole model, gather every rank's
    fingerprint (``torch.distributed.all_gather_object``) and hash the list.

    Raises:
        ValueError: a tensor is on the meta device (its values do not exist yet).
    """
    headers: list[list] = []
    figures: dict[torch.device, list[torch.Tensor]] = {}
    order: list[tuple[torch.device, int]] = []
    named = list(model.named_parameters()) + list(model.named_buffers())
    for name, tensor in sorted(named, key=lambda item: item[0]):
        local, header = _local_tensor(name, tensor)
        headers.append(header)
        per_device = figures.setdefault(local.device, [])
        order.append((local.device, len(per_device)))
        per_device.append(_figures(local))
    on_host = {device: torch.stack(parts).cpu().tolist() for device, parts in figures.items()}
    record = [header + on_host[device][i] for header, (device, i) in zip(headers, order)]
    digest = hashlib.sha256(json.dumps(record, separators=(",", ":")).encode("utf-8")).hexdigest()
    return digest[:FINGERPRINT_HEX_DIGITS]


def _local_tensor(name: str, tensor: torch.Tensor) -> tuple[torch.Tensor, list]:
    """The tensor this process holds, and its header (name, shape, dtype, plus placement and coordinate if sharded)."""
    header: list = [name, list(tensor.shape), str(tensor.dtype)]
    dtensor = _dtensor_class()
    if dtensor is not None and isinstance(tensor, dtensor):
        header += [[str(p) for p in tensor.placements], tensor.device_mesh.get_coordinate()]
        tensor = tensor.to_local()
    if tensor.is_meta:
        raise ValueError(f"cannot fingerprint {name!r}: it is on the meta device (its weights are not loaded)")
    return tensor.detach(), header


def _dtensor_class():
    # Imported lazily and only when torch.distributed exists: some builds have no distributed package.
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def _figures(tensor: torch.Tensor) -> torch.Tensor:
    """(2,) int64 on the tensor's device: the sum of all its words, and the strided sample's weighted checksum."""
    words = _words(tensor)
    total = torch.zeros((), dtype=torch.int64, device=words.device)
    for start in range(0, words.numel(), SUM_CHUNK_WORDS):
        total += words[start : start + SUM_CHUNK_WORDS].sum(dtype=torch.int64)
    stride = max(1, words.numel() // SAMPLE_WORDS)
    sample = words[::stride][:SAMPLE_WORDS].to(torch.int64)
    # Weights 1..1024 make the checksum sensitive to which sampled word changed; |word| < 2**32, so every term is
    # below 2**42 and the sum below 2**52: exact in int64.
    weights = torch.arange(1, sample.numel() + 1, dtype=torch.int64, device=words.device)
    return torch.stack([total, (sample * weights).sum()])


def _words(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's elements as a flat integer view of their bits, in logical (row-major) order."""
    flat = tensor.contiguous().view(-1)  # a view of the usual contiguous tensor; a copy only of a non-contiguous one
    if flat.is_complex():
        flat = torch.view_as_real(flat).reshape(-1)
    if flat.dtype == torch.bool:
        return flat.view(torch.uint8)
    return flat.view(_WORD_DTYPE[flat.element_size()])
