"""``score()``: a PRM (a checkpoint path or a live module) in, the PRMBench report out.

Pipeline: each sample is tokenized with its family's template (cached), samples are packed into variable-length
batches (``prmbench_fast.packing``), the backbone runs once per batch without its LM head, the family reads step
rewards at the reward positions only (``prmbench_fast.kernels.step_reward``) and turns them into labels with its
official rule, and the evaluator scores the labels with the counting op (``prmbench_fast.evaluate``).
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any

import torch

from .data import PRMBenchDataset, load_prmbench
from .evaluate import Report, evaluate
from .families import Family, detect_family, family_class
from .packing import TokenizedSample, backbone_hidden_states
from .prefix_sharing import prefix_sharing_unsupported, shared_step_hidden
from .results_store import ResultsStore, ordered_predictions
from .token_cache import encode_dataset, packed_batches

SCORE_FIELDS = {"validity": "step_level_validity_scores", "redundancy": "step_level_redundancy_scores"}
LABEL_FIELDS = {"validity": "step_level_validity_labels", "redundancy": "step_level_redundancy_labels"}


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DDP / FSDP(1) / DataParallel-style wrappers (they keep it as ``.module``)."""
    while isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    return model


def _model_name(model: torch.nn.Module) -> str:
    config = getattr(model, "config", None)
    return str(getattr(config, "_name_or_path", "") or type(model).__name__)


def _load(model: str | os.PathLike, family: str, tokenizer, dtype, device):
    """Load a checkpoint folder (offline files) with the class its family uses."""
    import transformers

    path = os.fspath(model)
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


def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _shared_units(fam: Family, dataset: PRMBenchDataset, todo, *, max_length: int, batch_tokens: int, cache_dir):
    """Samples of ``todo`` as lists of whole problem groups (same source problem) of about ``batch_tokens`` tokens.

    A group's variants share their prefixes, so a group is never split; a list is also the unit written to
    ``output_dir`` at once (what a crash can lose). Returns the lists and their total tokens after truncation.
    """
    encoded = encode_dataset(fam, dataset, todo, cache_dir=cache_dir)
    groups: dict[str, list[TokenizedSample]] = {}
    for position, e in zip(todo, encoded):
        groups.setdefault(dataset.samples[position].source_idx, []).append(
            TokenizedSample(e.input_ids, e.reward_pos, key=position)
        )
    units: list[list[TokenizedSample]] = []
    size = total = 0
    for group in groups.values():
        group_tokens = sum(min(len(s.input_ids), max_length) for s in group)
        if not units or size + group_tokens > batch_tokens:
            units.append([])
            size = 0
        units[-1].extend(group)
        size += group_tokens
        total += group_tokens
    return units, total


def _batch_results(dataset: PRMBenchDataset, positions, num_rewards, scores, labels) -> list[dict[str, Any]]:
    """Official result lines of samples whose scores are concatenated in ``scores``/``labels`` (one device-to-host
    copy per tensor); ``positions`` are their dataset positions, ``num_rewards`` their score counts, in that order."""
    host_scores = {k: v.float().cpu().tolist() for k, v in scores.items()}
    host_labels = {k: v.cpu().tolist() for k, v in labels.items()}
    results = []
    start = 0
    for position, count in zip(positions, num_rewards):
        end = start + count
        fields = {SCORE_FIELDS[k]: v[start:end] for k, v in host_scores.items()}
        fields.update({LABEL_FIELDS[k]: v[start:end] for k, v in host_labels.items()})
        results.append({"idx": dataset.samples[position].id, "scores": fields})
        start = end
    return results


def _all_gather_ragged(tensor: torch.Tensor, world: int) -> torch.Tensor:
    """Every rank's 1-D ``tensor`` concatenated in rank order, on the tensors' device (lengths may differ)."""
    size = torch.tensor([tensor.numel()], dtype=torch.int64, device=tensor.device)
    sizes = [torch.empty_like(size) for _ in range(world)]
    torch.distributed.all_gather(sizes, size)
    lengths = [int(n) for n in torch.cat(sizes).tolist()]  # one sync, after the forward passes
    if max(lengths) == 0:  # every rank agrees on this, so all skip the second collective together
        return tensor
    padded = torch.zeros(max(lengths), dtype=tensor.dtype, device=tensor.device)
    padded[: tensor.numel()] = tensor
    parts = [torch.empty_like(padded) for _ in range(world)]
    torch.distributed.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, lengths)])


def _gathered_outputs(outputs, fields: tuple[str, ...], device: torch.device, world: int):
    """All ranks' per-sample outputs as flat device tensors: (positions, num_rewards, scores, labels).

    ``outputs`` holds, per batch of this rank, (sample positions, score counts, scores, labels). Labels travel as
    uint8 (not every backend reduces bool tensors).
    """
    positions = torch.tensor([p for keys, _, _, _ in outputs for p in keys], dtype=torch.int64, device=device)
    counts = torch.tensor([n for _, nums, _, _ in outputs for n in nums], dtype=torch.int64, device=device)
    scores = {f: torch.cat([s[f].float() for _, _, s, _ in outputs] or [torch.empty(0, device=device)]) for f in fields}
    labels = {
        f: torch.cat([lab[f].to(torch.uint8) for _, _, _, lab in outputs] or [torch.empty(0, dtype=torch.uint8, device=device)])
        for f in fields
    }
    if world > 1:
        positions, counts = _all_gather_ragged(positions, world), _all_gather_ragged(counts, world)
        scores = {f: _all_gather_ragged(v, world) for f, v in scores.items()}
        labels = {f: _all_gather_ragged(v, world) for f, v in labels.items()}
    return positions, counts, scores, {f: v.bool() for f, v in labels.items()}


class _Progress:
    """Tokens/s and ETA on stderr (rank 0 only)."""

    def __init__(self, total_tokens: int, enabled: bool):
        self.bar = None
        if enabled and total_tokens:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_tokens, unit="tok", unit_scale=True, desc="prmbench", dynamic_ncols=True)

    def update(self, tokens: int) -> None:
        if self.bar is not None:
            self.bar.update(tokens)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


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
    **family_options: Any,
) -> Report:
    """Evaluate a process reward model on PRMBench.

    Args:
        model: a checkpoint folder (loaded offline with the family's model class), or a live ``nn.Module`` — e.g. the
            policy/PRM in the middle of training. A live model is used as it is (its device and dtype; DDP/FSDP-style
            wrappers are unwrapped), run in eval mode under ``torch.inference_mode`` and put back in its previous
            mode; its weights are never copied or reloaded.
        dataset: the evaluation set (default: ``load_prmbench()``; pass a subset for quick checks).
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
            same folder skips finished samples.
        cache_dir: keep tokenized samples on disk (safetensors, keyed by family, options and tokenizer) across
            processes; default ``output_dir/cache`` when an output_dir is given. In-memory caching is always on.
        share_prefixes: compute each prefix shared by a problem's variants once, from its KV cache
            (``prmbench_fast.prefix_sharing``); scores equal the unshared pipeline's within fp32 rounding. Default
            (None): on for causal decoders that support it, off otherwise.
        progress: show a progress bar with tokens/s and ETA.
        **family_options: passed to the family (e.g. ``separator=``/``reward_tokens=`` for ``generic``).

    Returns:
        The :class:`~prmbench_fast.evaluate.Report` of ``evaluate()`` on the model's predictions, plus ``report.run``
        (tokens, samples, seconds, tokens/s, truncation) and ``report.predictions`` (every sample's official result).

    Under ``torch.distributed`` every rank scores a disjoint shard and all ranks return the same report.
    """
    if family == "critic":
        # An LLM prompted as a critic behind an OpenAI-compatible API: `model` is the served model's name.
        from .critic import score_critic

        return score_critic(dataset, api_model=str(model), output_dir=output_dir, progress=progress, **family_options)
    if isinstance(model, (str, os.PathLike)):
        model, tokenizer, family = _load(model, family, tokenizer, dtype, device)
    else:
        model = unwrap_model(model)
        if tokenizer is None:
            raise ValueError("score() on a live model needs its tokenizer: pass tokenizer=")
        if family == "auto":
            family = detect_family(getattr(model, "config", None), _model_name(model))
    cls = family_class(family)
    if cls.takes_max_length:
        family_options["max_length"] = max_length
    fam: Family = cls(tokenizer, **family_options)
    dataset = dataset if dataset is not None else load_prmbench()
    rank, world = _dist()

    store = None
    finished: dict[str, Any] = {}
    if output_dir is not None:
        run_config = {"model": _model_name(model), "family": fam.name, "cache_key": fam.cache_key(),
                      "max_length": max_length, "samples": len(dataset)}
        store = ResultsStore(output_dir, run_config, rank=rank)
        finished = store.finished()
        if cache_dir is None:
            cache_dir = store.dir / "cache"  # a resumed run does not tokenize again
    todo = [i for i, s in enumerate(dataset.samples) if s.id not in finished][rank::world]

    share = prefix_sharing_unsupported(model) is None if share_prefixes is None else share_prefixes
    if share:
        units, tokens = _shared_units(fam, dataset, todo, max_length=max_length, batch_tokens=batch_tokens,
                                      cache_dir=cache_dir)
    else:
        units = packed_batches(fam, dataset, todo, max_length=max_length, batch_tokens=batch_tokens, cache_dir=cache_dir)
        tokens = sum(b.num_tokens for b in units)
    device = next(model.parameters()).device
    bar = _Progress(tokens, progress and rank == 0)
    start = time.perf_counter()
    outputs = []  # per batch: (sample positions, score counts, scores, labels); tensors stay on the device
    tokens_computed = 0
    dropped: list[int] = []  # rewards lost to truncation, per sample
    try:
        with _inference(model):
            for unit in units:
                if share:
                    # `unit` is a list of whole problem groups; their shared prefixes are computed once.
                    rows = shared_step_hidden(model, unit, max_length=max_length, batch_tokens=batch_tokens)
                    meta, hidden, step_pos, cu_steps = rows, rows.hidden, rows.step_pos, rows.cu_steps
                    tokens_computed += rows.stats.tokens_computed
                else:
                    meta, on_device = unit, unit.to(device)
                    hidden = backbone_hidden_states(model, on_device)
                    step_pos, cu_steps = on_device.step_pos, on_device.cu_steps
                    tokens_computed += unit.num_tokens
                dropped.extend(meta.dropped_rewards)
                scores = fam.step_scores(model, hidden, step_pos, backend=backend)
                labels = fam.step_labels(scores, cu_steps)
                outputs.append((meta.sample_keys, meta.num_rewards, scores, labels))
                if store is not None:
                    store.append(_batch_results(dataset, meta.sample_keys, meta.num_rewards, scores, labels))
                bar.update(meta.num_tokens)
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    truncated_samples, rewards_lost = sum(1 for d in dropped if d), sum(dropped)

    # Under torch.distributed every rank gathers every rank's outputs (as tensors, on the device) and evaluates them
    # all, so every rank returns the same report.
    fields = ("validity",) if fam.redundancy_threshold is None else ("validity", "redundancy")
    positions, counts, scores, labels = _gathered_outputs(outputs, fields, device, world)
    new_results = _batch_results(dataset, positions.tolist(), counts.tolist(), scores, labels)
    ordered = ordered_predictions(dataset, finished, new_results)

    report = evaluate(dataset, ordered)
    report.run = {
        "family": fam.name,
        "model": _model_name(model),
        "samples_scored": len(todo),
        "samples_resumed": len(finished),
        "tokens": tokens,
        "tokens_computed": tokens_computed,
        "prefix_sharing": share,
        "seconds": seconds,
        "tokens_per_second": tokens / seconds if seconds > 0 else None,
        "samples_per_second": len(todo) / seconds if seconds > 0 else None,
        "truncated_samples": truncated_samples,
        "rewards_lost_to_truncation": rewards_lost,
        "world_size": world,
    }
    report.predictions = ordered
    if store is not None and rank == 0:
        store.write_report(report)
    return report
