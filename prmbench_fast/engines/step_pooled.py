"""What both vLLM engines share: the family's prompts (token ids exactly as ``score()`` builds them), the checks on
what STEP pooling returns, and the run around it (run folder, resume, report), as ``score()`` gives them.

An engine is started by a function ``start() -> pool``, called once the run folder is checked and only when there
is something to score; ``pool(chunks) -> iterator of (chunk, probabilities)`` gets the prompts in chunks of about
``batch_tokens`` tokens and yields, for each chunk in any order, one (steps, classes) float tensor per prompt, the
probabilities STEP pooling returned at that prompt's tags in order. The chunk is the unit written to ``output_dir``
at once (what a crash can lose).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import pathlib
import time
from typing import Any, Callable, Iterator, Sequence

import torch

from ..data import PRMBenchDataset
from ..evaluate import Report, evaluate_steps
from ..families import Family, FamilyError
from ..families.base import StepPooling
from ..predictions import StepPredictions, parse_results
from ..progress import progress_bar
from ..results_store import ResultsStore
from ..tasks import get_task
from ..token_cache import encode_dataset

#: Bytes read from each weight file for :func:`checkpoint_fingerprint`: 64 blocks of 64 KiB at a fixed stride
#: (4 MiB per file, ~10 ms from the page cache), on top of its size and its safetensors header.
FINGERPRINT_BLOCKS, FINGERPRINT_BLOCK_BYTES = 64, 1 << 16
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One sample as sent to the engine.

    Attributes:
        position: the sample's index in ``dataset.samples``.
        ids: its token ids, truncated to ``max_length``.
        num_steps: reward positions kept after truncation: the number of tags in ``ids``.
        dropped: reward positions lost to truncation.
    """

    position: int
    ids: list[int]
    num_steps: int
    dropped: int


Pool = Callable[[list[list[Prompt]]], Iterator[tuple[list[Prompt], list[torch.Tensor]]]]


def prompts(fam: Family, pooling: StepPooling, dataset: PRMBenchDataset, positions: Sequence[int], *,
            max_length: int, cache_dir) -> list[Prompt]:
    """The prompts of ``dataset.samples[p]`` for each position: the family's encoding (cached like ``score()``'s),
    cut to its first ``max_length`` tokens, as the official collator cuts.

    Raises :class:`FamilyError` naming the sample when the tag's positions in the cut prompt are not exactly the
    family's reward positions there (STEP pooling reads at every tag, and only there).
    """
    out = []
    for position, encoded in zip(positions, encode_dataset(fam, dataset, positions, cache_dir=cache_dir)):
        sample = dataset.samples[position]
        if not encoded.input_ids:
            raise FamilyError(f"{fam.name}: sample {sample.id!r} encodes to no tokens")
        ids = [int(token) for token in encoded.input_ids[:max_length]]
        kept = [p for p in encoded.reward_pos if p < max_length]
        tags = [p for p, token in enumerate(ids) if token == pooling.step_tag_id]
        if tags != list(kept):
            raise FamilyError(
                f"{fam.name}: sample {sample.id!r}: STEP pooling reads at every token {pooling.step_tag_id}, at "
                f"positions {tags}, but the family reads rewards at {list(kept)}; use engine='torch' for this sample"
            )
        out.append(Prompt(position, ids, len(kept), len(encoded.reward_pos) - len(kept)))
    return out


def chunked(items: Sequence[Prompt], batch_tokens: int) -> list[list[Prompt]]:
    """Consecutive prompts in chunks of at most ``batch_tokens`` tokens (a longer prompt is a chunk of its own)."""
    chunks: list[list[Prompt]] = []
    size = batch_tokens
    for prompt in items:
        if size + len(prompt.ids) > batch_tokens:
            chunks.append([])
            size = 0
        chunks[-1].append(prompt)
        size += len(prompt.ids)
    return chunks


def chunk_predictions(fam: Family, pooling: StepPooling, dataset: PRMBenchDataset, chunk: Sequence[Prompt],
                      probabilities: Sequence[torch.Tensor]) -> StepPredictions:
    """The chunk's step predictions from what the engine returned: one (steps, classes) tensor per prompt.

    Raises :class:`FamilyError` naming the sample when a prompt got another number of steps than it has reward
    positions, or vectors of another width than the mapping's (an engine configured with another step tag or
    head), or values that are not probabilities.
    """
    if len(probabilities) != len(chunk):
        raise FamilyError(f"{fam.name}: the engine returned {len(probabilities)} outputs for {len(chunk)} prompts")
    for prompt, probs in zip(chunk, probabilities):
        sample_id = dataset.samples[prompt.position].id
        shape = tuple(probs.shape)
        if shape != (prompt.num_steps, pooling.num_classes) and not (prompt.num_steps == 0 and probs.numel() == 0):
            raise FamilyError(
                f"{fam.name}: sample {sample_id!r}: the engine returned probabilities of shape {shape} for "
                f"{prompt.num_steps} reward positions of {pooling.num_classes} classes; is it configured with "
                f"{pooling.server_args()}?"
            )
        if probs.numel() and not bool(((probs >= 0) & (probs <= 1)).all()):
            raise FamilyError(f"{fam.name}: sample {sample_id!r}: the engine returned values outside [0, 1] "
                              f"({probs.flatten()[:4].tolist()}...), not probabilities")
    counts = torch.tensor([0] + [p.num_steps for p in chunk], dtype=torch.int64)
    cu_steps = counts.cumsum(0).to(torch.int32)
    flat = [p.reshape(-1, pooling.num_classes).float() for p in probabilities]
    probs = torch.cat(flat) if flat else torch.zeros(0, pooling.num_classes)
    scores = {"validity": pooling.scores(probs)}
    labels = fam.step_labels(scores, cu_steps)
    return StepPredictions(
        sample_pos=torch.tensor([p.position for p in chunk], dtype=torch.int64),
        cu_steps=cu_steps,
        validity_labels=labels["validity"],
        validity_scores=scores["validity"],
    )


def run_identity(fam: Family, dataset: PRMBenchDataset, *, task: str, max_length: int,
                 engine: dict[str, Any]) -> dict[str, Any]:
    """What a run's results depend on: ``engine`` (its name and what identifies the weights it runs) and the rest
    as ``score()`` records it. The engine's name is in it, so a folder of another engine is never resumed."""
    from ..scoring import scoring_identity  # here: scoring imports this package

    return {"task": task, **engine, **scoring_identity(fam, dataset, max_length)}


def checkpoint_fingerprint(folder: str | os.PathLike) -> str:
    """A short hex string identifying a checkpoint folder's weight files without reading them whole: per file (name
    order) its name, size, safetensors header (names, shapes, dtypes, offsets) and ``FINGERPRINT_BLOCKS`` blocks read
    at a fixed stride. Another fine-tune of the same shapes differs in the sampled blocks."""
    digest = hashlib.sha256()
    files = sorted(p for p in pathlib.Path(folder).iterdir() if p.suffix in _WEIGHT_SUFFIXES and p.is_file())
    if not files:
        raise FileNotFoundError(f"{folder}: no weight files ({', '.join(_WEIGHT_SUFFIXES)}) to fingerprint")
    for path in files:
        size = path.stat().st_size
        digest.update(f"{path.name}\0{size}\0".encode())
        with open(path, "rb") as f:
            if path.suffix == ".safetensors" and size >= 8:
                header = int.from_bytes(f.read(8), "little")
                digest.update(f.read(min(header, size - 8)))
            stride = max(size // FINGERPRINT_BLOCKS, 1)
            for offset in range(0, size, stride):
                f.seek(offset)
                digest.update(f.read(FINGERPRINT_BLOCK_BYTES))
    return digest.hexdigest()[:16]


def score_step_pooled(
    fam: Family,
    dataset: PRMBenchDataset,
    start: Callable[[], Pool],
    *,
    engine: dict[str, Any],
    model_name: str,
    task: str,
    max_length: int,
    batch_tokens: int,
    output_dir,
    cache_dir,
    overwrite: bool,
    progress: bool,
) -> Report:
    """``score()``'s run around an engine with STEP pooling: resume from ``output_dir``, prompts of the other
    samples, ``start()`` the engine and pool them chunk by chunk, store each chunk's result lines as it arrives, evaluate everything.

    ``engine`` is what identifies the engine and its weights in the run folder (``{"engine": "vllm", ...}``); it is
    also recorded in ``report.run``.
    """
    pooling = fam.step_pooling()  # a family that cannot be served is refused before anything runs
    with contextlib.ExitStack() as stack:
        store = None
        resumed = StepPredictions.empty()
        finished: dict[str, Any] = {}
        if output_dir is not None:
            identity = run_identity(fam, dataset, task=task, max_length=max_length, engine=engine)
            store = stack.enter_context(ResultsStore(output_dir, identity, overwrite=overwrite))
            finished = store.finished(dataset)
            if finished:
                resumed = parse_results(dataset, finished).predictions
            if cache_dir is None:
                cache_dir = store.dir / "cache"
        todo = [i for i, s in enumerate(dataset.samples) if s.id not in finished]
        items = prompts(fam, pooling, dataset, todo, max_length=max_length, cache_dir=cache_dir)
        tokens = sum(len(p.ids) for p in items)
        bar = progress_bar(progress, unit="tok", total=tokens)
        stack.callback(bar.close)
        sample_ids = [s.id for s in dataset.samples]
        parts = []
        began = time.perf_counter()
        pool = start() if items else None
        for chunk, probabilities in pool(chunked(items, batch_tokens)) if pool is not None else ():
            part = chunk_predictions(fam, pooling, dataset, chunk, probabilities)
            parts.append(part)
            if store is not None:
                store.append(part.to_results(sample_ids))
            bar.update(sum(len(p.ids) for p in chunk))
        seconds = time.perf_counter() - began

        predictions = StepPredictions.concat([resumed, *parts])
        report = evaluate_steps(dataset, predictions) if task == "prmbench" else get_task(task).evaluate(
            dataset, predictions)
        report.run = {
            "family": fam.name,
            "model": model_name,
            **engine,
            "samples_scored": len(todo),
            "samples_resumed": len(finished),
            "tokens": tokens,
            "seconds": seconds,
            "tokens_per_second": tokens / seconds if seconds > 0 else None,
            "samples_per_second": len(todo) / seconds if seconds > 0 else None,
            "truncated_samples": sum(1 for p in items if p.dropped),
            "rewards_lost_to_truncation": sum(p.dropped for p in items),
            "validity_threshold": fam.validity_threshold,
            "redundancy_threshold": fam.redundancy_threshold,
        }
        if store is not None:
            if isinstance(report, Report):  # a run folder carries the analyses its report page draws
                from ..analysis import analyze

                report.analysis = analyze(dataset, report, validity_threshold=fam.validity_threshold)
            store.write_report(report)
    return report
