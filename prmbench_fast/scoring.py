"""``score()``: a PRM (a checkpoint path or a live module) in, the PRMBench report out.

Pipeline: each sample is tokenized with its family's template (cached), samples are packed into variable-length
batches (``prmbench_fast.packing``), the backbone runs once per batch without its LM head, the family reads step
rewards at the reward positions only (``prmbench_fast.kernels.step_reward``) and turns them into labels with its
official rule, and the evaluator scores the labels with the counting op (``prmbench_fast.evaluate``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import queue
import threading
import time
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from . import analysis
from .data import PRMBenchDataset, load_prmbench
from .distributed import gather_predictions, rank_and_world
from .engines import check_engine
from .evaluate import Report, evaluate_steps
from .families import Family, detect_family, family_class, precision
from .fingerprint import weights_fingerprint
from .live_model import PREFIX_SHARING_REFUSAL, forward_dtype, shards_layers, sharded_scoring, unwrap_model
from .io import check_checkpoint_files, check_output_dir, looks_like_hub_id
from .models import check_device, check_model_folder
from .packing import PackedBatch, TokenizedSample, backbone_hidden_states
from .predictions import StepPredictions, parse_results
from .prefix_sharing import prefix_sharing_unsupported, shared_step_hidden
from .progress import progress_bar
from .results_store import ResultsStore, ResultsWriter
from .tasks import check_task_dataset, get_task
from .token_cache import encode_chunks, streamed_batches

def _model_name(model: torch.nn.Module) -> str:
    config = getattr(model, "config", None)
    return str(getattr(config, "_name_or_path", "") or type(model).__name__)


def _load(model: str | os.PathLike, family: str, tokenizer, dtype, device):
    """Load a checkpoint (a folder, or a hub id `owner/name`) with the class its family uses."""
    import transformers

    path = os.fspath(model)
    if os.path.exists(path) or not looks_like_hub_id(path):  # an `owner/name` id goes to the hub as it is
        check_model_folder(path, tokenizer=tokenizer is None)
    if device is not None:
        check_device(device)
    config = transformers.AutoConfig.from_pretrained(path)
    name = family if family != "auto" else detect_family(config, path)
    cls = family_class(name)
    loaded = cls.load_model(path, dtype=dtype or torch.float32)
    if tokenizer is None:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    return loaded.to(device or "cpu"), tokenizer, name


@contextlib.contextmanager
def _inference(model: torch.nn.Module):
    """Eval mode and no autograd for the duration, whatever mode the (possibly training) model was in."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        for module, training in modes:
            module.training = training


#: Samples tokenized per chunk on the prefix-sharing path: the first forward waits for the first chunk, so it is small
#: (256 PRMBench samples are ~165k tokens, ~10 batches of 16k, ~0.1 s of tokenization), and large enough for a fast
#: tokenizer's batch call and for the texts a problem's variants share to be tokenized once.
SHARED_CHUNK_SAMPLES = 256


def _shared_units(fam: Family, dataset: PRMBenchDataset, todo, *, max_length: int, batch_tokens: int, cache_dir,
                  chunk_samples: int = SHARED_CHUNK_SAMPLES) -> Iterator[list[TokenizedSample]]:
    """Samples of ``todo`` as lists of whole problem groups (same source problem) of about ``batch_tokens`` tokens,
    each yielded as soon as it is formed.

    A group's variants share their prefixes, so a group is never split; a list is also the unit written to
    ``output_dir`` at once (what a crash can lose). The groups are taken in data order and tokenized a chunk of whole
    groups at a time, so a list is formed from the groups before it only: the lists are the ones tokenizing everything
    first would give, while the forwards of the first ones run.
    """
    groups: dict[str, list[int]] = {}
    for position in todo:
        groups.setdefault(dataset.samples[position].source_idx, []).append(position)
    chunks: list[list[list[int]]] = [[]]
    size = 0
    for group in groups.values():
        if size >= chunk_samples:
            chunks.append([])
            size = 0
        chunks[-1].append(group)
        size += len(group)
    positions = ([p for group in chunk for p in group] for chunk in chunks)
    unit: list[TokenizedSample] = []
    size = 0
    # Driven by encode_chunks (not zipped with `chunks`): it writes the cache file after its last chunk.
    for chunk, encoded in enumerate(encode_chunks(fam, dataset, positions, cache_dir=cache_dir)):
        encoded = iter(encoded)
        for group in chunks[chunk]:
            members = [TokenizedSample(e.input_ids, e.reward_pos, key=p) for p, e in zip(group, encoded)]
            group_tokens = sum(min(len(s.input_ids), max_length) for s in members)
            if unit and size + group_tokens > batch_tokens:
                yield unit
                unit, size = [], 0
            unit.extend(members)
            size += group_tokens
    if unit:
        yield unit


def _in_background(items: Iterable, depth: int = 2) -> Iterator:
    """The items of ``items``, produced by a thread at most ``depth`` ahead of the caller (a fast tokenizer releases
    the GIL, and the host mostly waits for the device while a forward runs). An error of the producer is raised here;
    closing the generator stops the producer after its current item."""
    handoff: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                handoff.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
            put((end, None))
        except BaseException as err:  # noqa: BLE001 handed to the caller, raised there
            put((end, err))

    thread = threading.Thread(target=produce, name="prmbench-tokenize", daemon=True)
    thread.start()
    try:
        while True:
            item, err = handoff.get()
            if item is end:
                if err is not None:
                    raise err
                return
            yield item
    finally:
        stop.set()
        thread.join()


def score(
    model: torch.nn.Module | str | os.PathLike,
    dataset: PRMBenchDataset | None = None,
    *,
    tokenizer: Any = None,
    family: str = "auto",
    max_length: int = 2048,
    batch_tokens: int = 16384,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    backend: str = "auto",
    output_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    share_prefixes: bool | None = None,
    progress: bool = True,
    overwrite: bool = False,
    task: str = "prmbench",
    engine: str = "torch",
    **family_options: Any,
) -> Report:
    """Evaluate a process reward model on PRMBench.

    Args:
        model: a checkpoint folder (loaded offline with the family's model class), or a live ``nn.Module`` — e.g. the
            policy/PRM in the middle of training. A live model is used as it is (its device and dtype; DDP-style
            wrappers are unwrapped, FSDP2 parameters all-gathered for the call, FSDP1 refused), run in eval mode
            under ``torch.inference_mode`` and put back in its previous mode; its weights are never copied or reloaded.
        dataset: the evaluation set (default: ``load_prmbench(task=task)``; pass a subset for quick checks).
        tokenizer: the model's tokenizer (default: loaded from the checkpoint folder).
        family: a name from ``prmbench_fast.families.FAMILY_NAMES``, or "auto" (from the model's config and name), or
            "critic": an LLM prompted as a critic through an OpenAI-compatible API (``model`` is the served model's
            name; ``api_base=``, ``api_key=``, ``shots=``, ``concurrency=``… go to
            :func:`prmbench_fast.critic.score_critic`).
        max_length: official truncation: the first ``max_length`` tokens of each sample are kept, rewards past them
            vanish (PRMBench uses 2048).
        batch_tokens: tokens per packed batch (bounds activation memory; attention cost is per sample).
        dtype, device: for a model loaded from a path (default float32 on CPU).
        backend: kernel backend for the reward heads ("auto": Triton on CUDA, torch on CPU).
        output_dir: write per-sample results as they finish, the report and the table there; re-running with the
            same folder skips finished samples. The folder records the run's identity (model, weights fingerprint,
            family and options, thresholds, max_length, dtype, data): a call whose identity differs (e.g. the same
            live model after more training steps) is refused rather than mixing two models' results.
        cache_dir: keep tokenized samples on disk (safetensors, keyed by family, options and tokenizer) across
            processes; default ``output_dir/cache`` when an output_dir is given. In-memory caching is always on.
        share_prefixes: compute each prefix shared by a problem's variants once, from its KV cache
            (``prmbench_fast.prefix_sharing``); scores equal the unshared pipeline's within fp32 rounding (in bf16
            within a bf16 ulp of the hidden states). Default (None): on for causal decoders that support it, off
            otherwise, and off (with a one-line warning) when the family was asked for an official precision
            (``official_mixed_precision``/``official_rounding``), whose numbers only the unshared pipeline gives.
        progress: show a progress bar with tokens/s and ETA.
        task: "prmbench", "subset400" (``dataset`` from ``load_prmbench(task="subset400")``; scored with that task's
            evaluator) or "bon" (``dataset`` from ``load_prmbench(path, task="bon")``; returns the BoN report).
        overwrite: start ``output_dir``'s run over (its results, report and identity are deleted; the tokenization
            cache is kept).
        engine: what runs the model (``prmbench_fast.engines``): "torch" (this pipeline; a live module or a
            checkpoint folder), "vllm" (``model`` is a checkpoint folder that vLLM loads in this process, sharded over
            ``tensor_parallel_size=`` GPUs; ``vllm_options=`` go to ``vllm.LLM``) or "pooling-api" (a vLLM server at
            ``api_base=`` serving ``api_model=``; ``model`` is the local checkpoint folder, for its tokenizer and
            config). The vLLM engines read rewards with STEP pooling (``Family.step_pooling``; families it cannot
            express are refused), write the same run folder and return the same report; ``device``, ``backend``
            and ``share_prefixes`` are the torch engine's.
        **family_options: passed to the family (e.g. ``separator=``/``reward_tokens=`` for ``generic``).

    Returns:
        The :class:`~prmbench_fast.evaluate.Report` of the model's predictions, with ``report.step_predictions`` (the
        flat predictions, on the model's device), ``report.run`` (tokens, samples, seconds, tokens/s, truncation) and
        ``report.predictions`` (every sample's official result, built on first use).

    Step scores and labels stay tensors on the model's device from the reward heads to the counting op; they are
    copied to the host once per batch only to write ``output_dir``'s result lines. Under ``torch.distributed`` every
    rank scores a disjoint shard, the ranks' predictions are gathered as device tensors, and all ranks return the
    same report.

    Raises:
        TypeError: a dataset that is not the task's data (PRMBench data for "prmbench"/"subset400", BoN data for
            "bon"), a tokenizer given as a path, a max_length or batch_tokens that is not a positive int.
        ValueError: a live model without ``tokenizer``, a tokenizer with more tokens than the model's embedding,
            a checkpoint file that is truncated or not JSON, an ``output_dir`` or ``cache_dir`` that is a file or
            cannot be written (``FileError`` naming it), a threshold outside the
            family's score range, a family that does not fit the model, a run folder with
            another identity (``RunMismatchError``) or in use by another process (``RunLockedError``).
    """
    _check_arguments(dataset, task=task, max_length=max_length, batch_tokens=batch_tokens, model=model,
                     folders=(output_dir, cache_dir))
    check_engine(engine, model, family)
    if family == "critic":
        # An LLM prompted as a critic behind an OpenAI-compatible API: `model` is the served model's name.
        from .critic import score_critic

        return score_critic(dataset, api_model=str(model), task=task, output_dir=output_dir, progress=progress,
                            overwrite=overwrite, **family_options)
    if isinstance(tokenizer, (str, os.PathLike)):
        raise TypeError("tokenizer must be a tokenizer object, not a path: load it with "
                        "transformers.AutoTokenizer.from_pretrained(path), or pass the checkpoint folder as model")
    if engine != "torch":
        # vLLM, in this process or behind a server, with STEP pooling: `model` is the checkpoint folder.
        from .engines import score_with_engine

        return score_with_engine(engine, model, dataset, tokenizer=tokenizer, family=family, max_length=max_length,
                                 batch_tokens=batch_tokens, dtype=dtype, device=device, backend=backend,
                                 share_prefixes=share_prefixes, output_dir=output_dir, cache_dir=cache_dir,
                                 overwrite=overwrite, progress=progress, task=task, **family_options)
    if isinstance(model, (str, os.PathLike)):
        model, tokenizer, family = _load(model, family, tokenizer, dtype, device)
    else:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a checkpoint folder or a torch.nn.Module, got {type(model).__name__}")
        model = unwrap_model(model)
        if tokenizer is None:
            raise ValueError("score() on a live model needs its tokenizer: pass tokenizer=")
        if family == "auto":
            family = detect_family(getattr(model, "config", None), _model_name(model))
    _check_vocabulary(model, tokenizer)
    cls = family_class(family)
    if cls.takes_max_length:
        family_options["max_length"] = max_length
    fam: Family = cls.build(tokenizer, **family_options)
    dataset = dataset if dataset is not None else load_prmbench(task=task)
    rank, world = rank_and_world()
    device = next(model.parameters()).device

    # FSDP2: set up for layer-by-layer unsharding (live_model.sharded_scoring) and put back afterwards; the run
    # folder's lock is released however the call ends.
    with contextlib.ExitStack() as stack:
        sharded = stack.enter_context(sharded_scoring(model))
        store = None
        resumed = StepPredictions.empty(device)
        finished: dict[str, Any] = {}
        if output_dir is not None:
            identity = {"task": task, **_run_identity(model, fam, dataset, max_length)}
            store = stack.enter_context(_open_store(output_dir, identity, rank, world, overwrite))
            finished = store.finished(dataset)
            if finished:
                resumed = parse_results(dataset, finished).predictions.to(device)
            if cache_dir is None:
                cache_dir = store.dir / "cache"  # a resumed run does not tokenize again
        todo = [i for i, s in enumerate(dataset.samples) if s.id not in finished][rank::world]
        share, sharing_note = _share_prefixes(model, fam, share_prefixes)
        # The units (problem groups with prefix sharing, packed batches without) are tokenized and formed by a
        # producer thread while the forwards run, so the first forward waits for one chunk of samples only; the total
        # is known when the last unit is formed. FSDP2 layer sharding needs this rank's batch count before the first
        # forward (sharded.forwards): its batches are all formed first.
        formed = (_shared_units(fam, dataset, todo, max_length=max_length, batch_tokens=batch_tokens,
                                cache_dir=cache_dir) if share
                  else streamed_batches(fam, dataset, todo, max_length=max_length, batch_tokens=batch_tokens,
                                        cache_dir=cache_dir))
        if sharded.layers and not share:
            units = list(formed)
        else:
            units = stack.enter_context(contextlib.closing(_in_background(formed)))
        run = _Run(fam, dataset, store, progress=progress and rank == 0 and bool(todo))
        stack.callback(run.stop)  # also when a batch fails: the batches already scored are still written
        # FSDP2's layer groups all-gather inside each backbone forward, a collective: a rank with fewer batches runs
        # padding forwards until it has run as many as the busiest rank.
        with sharded.forwards(len(units) if isinstance(units, list) else None) as padding, _inference(model):
            analyses_ahead = store is not None and rank == 0 and task == "prmbench"
            for unit in (units if share else _on_device(units, device)):
                run.batch(model, unit, share=share, device=device, max_length=max_length, batch_tokens=batch_tokens,
                          backend=backend)
                if analyses_ahead:  # the run folder's analyses' data-only work, once the first forward is queued
                    analysis.prepare_in_background(dataset, device)
                    analyses_ahead = False
            sharded.pad(padding, device)
        run.finish(device)
        tokens = run.tokens

        # Every rank gathers every rank's predictions (device tensors) and evaluates them all: the same report
        # everywhere.
        new = gather_predictions(StepPredictions.concat(run.parts) if run.parts else StepPredictions.empty(device))
        predictions = StepPredictions.concat([resumed, new])
        report = evaluate_steps(dataset, predictions) if task == "prmbench" else get_task(task).evaluate(dataset, predictions)
        report.run = {
            "family": fam.name,
            "model": _model_name(model),
            "samples_scored": len(todo),
            "samples_resumed": len(finished),
            "tokens": tokens,
            "tokens_computed": run.tokens_computed,
            "prefix_sharing": share,
            "prefix_sharing_note": sharing_note,
            "seconds": run.seconds,
            "tokens_per_second": tokens / run.seconds if run.seconds > 0 else None,
            "samples_per_second": len(todo) / run.seconds if run.seconds > 0 else None,
            "truncated_samples": sum(1 for d in run.dropped if d),
            "rewards_lost_to_truncation": sum(run.dropped),
            "world_size": world,
            "validity_threshold": fam.validity_threshold,
            "redundancy_threshold": fam.redundancy_threshold,
        }
        if store is not None and rank == 0:
            if isinstance(report, Report):  # a run folder carries the analyses its report page draws
                report.analysis = analysis.analyze(dataset, report, validity_threshold=fam.validity_threshold)
            store.write_report(report)
    return report


def _check_arguments(dataset, *, task: str, max_length: Any, batch_tokens: Any, model: Any,
                     folders: tuple) -> None:
    """score()'s argument errors, named at the call rather than deep in the pipeline (an output or cache folder that
    is a file or cannot be written, too: a warm call reaches its cache folder only after the forwards)."""
    get_task(task)  # an unknown task: a ValueError listing the tasks
    if dataset is not None:
        check_task_dataset(task, dataset)
    for name, value in (("max_length", max_length), ("batch_tokens", batch_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise TypeError(f"{name} must be a positive int (a number of tokens), got {value!r}")
    if isinstance(model, (str, os.PathLike)) and os.path.isdir(model):
        check_checkpoint_files(model)
    for folder in folders:
        if folder is not None:
            check_output_dir(folder)


def _check_vocabulary(model: torch.nn.Module, tokenizer: Any) -> None:
    """A tokenizer with more tokens than the model's embedding has rows would index past it (an IndexError in the
    middle of a run, or a device assert on GPU): the tokenizer is not the model's."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    rows = getattr(embeddings, "num_embeddings", None)
    if rows is not None and len(tokenizer) > rows:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the model's embedding has {rows} rows: the "
                         f"tokenizer is not this model's ({_model_name(model)}); pass the model's own tokenizer")


def _share_prefixes(model: torch.nn.Module, fam: Family, requested: bool | None) -> tuple[bool, str | None]:
    """(whether to share prefixes, why not when the default turned it off for the family's precision or for FSDP2
    layer sharding).

    Raises ValueError for ``requested`` True on a model whose layers FSDP2 shards (``PREFIX_SHARING_REFUSAL``)."""
    layers_sharded = shards_layers(model)
    if requested and layers_sharded:
        raise ValueError(PREFIX_SHARING_REFUSAL)
    if requested is not None:
        return requested, None
    note = precision.prefix_sharing_note(fam)
    if note is not None:
        warnings.warn(note, stacklevel=3)
        return False, note
    if layers_sharded:
        # Off without a warning: the scores are the same either way, only the speed differs.
        return False, "prefix sharing is off: FSDP2 shards the decoder layers (every rank must run as many forwards)"
    return prefix_sharing_unsupported(model) is None, None


class _Run:
    """The forward passes of one score() call: each batch's step predictions on the device, its result lines in the
    run folder (the one host copy), progress and throughput figures."""

    def __init__(self, fam: Family, dataset, store: ResultsStore | None, *, progress: bool):
        self.fam = fam
        self.tokens = 0  # tokens of the batches run (after truncation)
        self.writer = ResultsWriter(store) if store is not None else None
        self.sample_ids = [s.id for s in dataset.samples] if store is not None else None
        self.parts: list[StepPredictions] = []
        self.tokens_computed = 0
        self.dropped: list[int] = []  # rewards lost to truncation, per sample
        # No total: the batches are formed while the forwards run.
        self.bar = progress_bar(progress, unit="tok")
        self.start = time.perf_counter()
        self.seconds = 0.0

    def batch(self, model, unit, *, share: bool, device, max_length: int, batch_tokens: int, backend: str) -> None:
        if share:
            # `unit` is a list of whole problem groups; their shared prefixes are computed once.
            rows = shared_step_hidden(model, unit, max_length=max_length, batch_tokens=batch_tokens)
            meta, hidden, step_pos, cu_steps = rows, rows.hidden, rows.step_pos, rows.cu_steps
            self.tokens_computed += rows.stats.tokens_computed
        else:
            meta, on_device = unit
            hidden = backbone_hidden_states(model, on_device)
            step_pos, cu_steps = on_device.step_pos, on_device.cu_steps
            self.tokens_computed += meta.num_tokens
        self.dropped.extend(meta.dropped_rewards)
        scores = self.fam.step_scores(model, hidden, step_pos, backend=backend)
        labels = self.fam.step_labels(scores, cu_steps)
        sample_pos = torch.tensor(meta.sample_keys, dtype=torch.int64)
        part = StepPredictions(
            sample_pos=sample_pos.to(device, non_blocking=True),
            cu_steps=cu_steps,
            validity_labels=labels["validity"],
            validity_scores=scores["validity"],
            redundancy_labels=labels.get("redundancy"),
            redundancy_scores=scores.get("redundancy"),
        )
        self.parts.append(part)
        if self.writer is not None:
            # The one host copy, for the file: queued behind the batch's kernels, waited for and written on the
            # writer thread, so the host goes on queueing the next batch.
            host, ready = _host_copy(dataclasses.replace(part, sample_pos=sample_pos))
            self.writer.submit(ready, functools.partial(host.to_results, self.sample_ids))
        self.tokens += meta.num_tokens
        self.bar.update(meta.num_tokens)

    def finish(self, device: torch.device) -> None:
        # The batches' kernels are queued, not finished, when the loop ends (nothing syncs per batch): the clock is
        # read after the device has run them and the writer has written their lines, or tokens/s would count queued
        # work as done.
        if self.writer is not None:
            self.writer.close()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self.seconds = time.perf_counter() - self.start
        self.bar.close()

    def stop(self) -> None:
        if self.writer is not None:
            self.writer.stop()
        self.bar.close()


def _host_copy(part: StepPredictions) -> tuple[StepPredictions, Any]:
    """``part`` with its device tensors copied to page-locked host memory without blocking the host, and the CUDA
    event after which the copies are complete; a part already on the host is returned as it is, with no event."""
    if part.cu_steps.device.type != "cuda":
        return part, None
    host = {}
    for field in dataclasses.fields(part):
        value = getattr(part, field.name)
        if value is not None and value.device.type == "cuda":
            value = torch.empty(value.shape, dtype=value.dtype, pin_memory=True).copy_(value, non_blocking=True)
        host[field.name] = value
    ready = torch.cuda.Event()
    ready.record()
    return StepPredictions(**host), ready


def _on_device(units: Iterable[PackedBatch], device: torch.device) -> Iterator[tuple[PackedBatch, PackedBatch]]:
    """(host batch, the batch on ``device``) for each packed batch. On CUDA, batch k+1's copies are issued from
    pinned memory on a side stream before batch k is handed out, so they run while batch k's forward runs and the
    host never waits for a copy; the compute stream waits for the copy's event before using the batch."""
    if device.type != "cuda":
        for unit in units:
            yield unit, unit.to(device)
        return
    side = torch.cuda.Stream(device)

    def issue(unit: PackedBatch):
        with torch.cuda.stream(side):
            on_device = unit.pin_memory().to(device, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(side)
        return unit, on_device, copied

    def hand_out(unit: PackedBatch, on_device: PackedBatch, copied) -> tuple[PackedBatch, PackedBatch]:
        compute = torch.cuda.current_stream(device)
        compute.wait_event(copied)
        for tensor in on_device.tensors():
            tensor.record_stream(compute)  # allocated on the side stream, freed after the compute stream's use
        return unit, on_device

    pending = None
    for unit in units:
        issued = issue(unit)
        if pending is not None:
            yield hand_out(*pending)
        pending = issued
    if pending is not None:
        yield hand_out(*pending)


def _run_identity(model: torch.nn.Module, fam: Family, dataset: PRMBenchDataset, max_length: int) -> dict[str, Any]:
    """What a run's results depend on (``ResultsStore``): a folder whose identity differs is never resumed."""
    return {
        "model": _model_name(model),
        "weights": weights_fingerprint(model),  # under FSDP2 the same on every rank (a collective; see its doc)
        "dtype": str(forward_dtype(model)),
        **scoring_identity(fam, dataset, max_length),
    }


def scoring_identity(fam: Family, dataset: PRMBenchDataset, max_length: int) -> dict[str, Any]:
    """The part of a run's identity every engine shares: the family, its options and token ids, its thresholds, the
    truncation and the data (the model part is the engine's)."""
    return {
        "family": fam.name,
        "family_options": {k: repr(v) for k, v in sorted(fam.options.items())},
        "tokens": fam.cache_key(),  # family, options and tokenizer: the token ids a sample becomes
        "validity_threshold": fam.validity_threshold,
        "redundancy_threshold": fam.redundancy_threshold,
        "max_length": max_length,
        "data": dataset.content_hash,
    }


def _open_store(output_dir, identity: dict[str, Any], rank: int, world: int, overwrite: bool) -> ResultsStore:
    """The rank's results store; under torch.distributed rank 0 checks (or overwrites) the folder first, then the
    other ranks open theirs.

    A rank that cannot open its store raises its error; the other ranks then raise a RuntimeError naming it, rather
    than go on alone and wait forever in the next collective."""
    if world == 1:
        return ResultsStore(output_dir, identity, overwrite=overwrite)
    store = None
    for turn_of_rank_0 in (True, False):
        error = None
        if (rank == 0) == turn_of_rank_0:
            try:
                store = ResultsStore(output_dir, identity, rank=rank, overwrite=overwrite and rank == 0)
            except Exception as err:  # noqa: BLE001 raised below, once every rank knows
                error = err
        failures: list = [None] * world
        torch.distributed.all_gather_object(failures, None if error is None else f"{type(error).__name__}: {error}")
        failed = [(r, failure) for r, failure in enumerate(failures) if failure is not None]
        if failed:
            if store is not None:
                store.close()
            if error is not None:
                raise error
            raise RuntimeError(f"rank {failed[0][0]} cannot use the run folder {output_dir}: {failed[0][1]}")
    return store
