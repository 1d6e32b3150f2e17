"""``score(path, engine="vllm")``: the checkpoint loaded by vLLM in this process, step rewards read with STEP pooling.

vLLM shards a model over ``tensor_parallel_size`` GPUs, so models bigger than one GPU can be scored; it computes
every prompt whole (its prefix cache is not read for STEP pooling, so the prefix sharing of the torch engine has no
counterpart here). The prompts are the family's own token ids (:mod:`prmbench_fast.engines.step_pooled`), sent as
``TokensPrompt``: vLLM never tokenizes them again.

vLLM starts worker processes: a script that calls this must guard its entry point with
``if __name__ == "__main__":``.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import torch

from ..data import PRMBenchDataset, load_prmbench
from ..evaluate import Report
from ..extras import MissingExtraError
from ..families import Family, detect_family, family_class
from ..models import check_model_folder
from .step_pooled import Prompt, checkpoint_fingerprint, score_step_pooled

#: What to do when vLLM is not importable.
INSTALL_HINT = ("run in the environment `make vllm-env` builds (`.ci/vllm-env` prints its path; CPU build) or "
                "`pip install vllm` on a GPU machine")


def family_from_folder(path: str, family: str, tokenizer: Any, max_length: int,
                       family_options: dict[str, Any]) -> Family:
    """The family of the checkpoint folder ``path`` (``family="auto"``: from its config and name), built with its
    tokenizer (``tokenizer``, or the folder's), as ``score()`` builds it; the weights are not loaded."""
    import transformers

    check_model_folder(path, tokenizer=tokenizer is None)
    if family == "auto":
        family = detect_family(transformers.AutoConfig.from_pretrained(path), path)
    cls = family_class(family)
    if tokenizer is None:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    if cls.takes_max_length:
        family_options = {**family_options, "max_length": max_length}
    return cls.build(tokenizer, **family_options)


def import_vllm():
    """The ``vllm`` module, or :class:`~prmbench_fast.extras.MissingExtraError` saying where to get it."""
    try:
        import vllm
    except ImportError as err:
        raise MissingExtraError(f"engine='vllm' needs vLLM, which cannot be imported here ({err}); {INSTALL_HINT}",
                                name="vllm") from err
    return vllm


def score_vllm(
    model: str | os.PathLike,
    dataset: PRMBenchDataset | None = None,
    *,
    tokenizer: Any = None,
    family: str = "auto",
    max_length: int = 2048,
    batch_tokens: int = 16384,
    dtype: torch.dtype | None = None,
    output_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: bool = True,
    task: str = "prmbench",
    tensor_parallel_size: int = 1,
    vllm_options: Mapping[str, Any] | None = None,
    **family_options: Any,
) -> Report:
    """``score(model, engine="vllm", ...)``: see :func:`prmbench_fast.score` for the shared arguments.

    Args:
        model: the checkpoint folder vLLM loads.
        dtype: the weights' dtype in vLLM (default float32, as ``score()`` loads a checkpoint).
        batch_tokens: tokens of prompts per ``LLM.encode`` call: the unit written to ``output_dir`` at once (vLLM
            schedules its own batches inside a call).
        tensor_parallel_size: GPUs to shard the model over.
        vllm_options: more ``vllm.LLM`` arguments (``gpu_memory_utilization``, ``enforce_eager``, ...); by default
            ``max_model_len`` is ``max_length`` (no prompt is longer).
    """
    path = os.fspath(model)
    if isinstance(tensor_parallel_size, bool) or not isinstance(tensor_parallel_size, int) or tensor_parallel_size < 1:
        raise TypeError(f"tensor_parallel_size must be a positive int (a number of GPUs), got {tensor_parallel_size!r}")
    fam = family_from_folder(path, family, tokenizer, max_length, family_options)
    pooling = fam.step_pooling()  # refused before vLLM starts
    dataset = dataset if dataset is not None else load_prmbench(task=task)
    dtype = dtype or torch.float32
    engine = {"engine": "vllm", "weights": checkpoint_fingerprint(path), "dtype": str(dtype)}
    vllm = import_vllm()  # before the run folder is touched: a missing vLLM changes nothing there

    def start():
        from vllm.config import PoolerConfig
        from vllm.inputs import TokensPrompt

        options = {"max_model_len": max_length, **pooling.engine_args(), **dict(vllm_options or {})}
        llm = vllm.LLM(model=path, runner="pooling", pooler_config=PoolerConfig(**pooling.pooler_config()),
                       tensor_parallel_size=tensor_parallel_size, dtype=str(dtype).removeprefix("torch."), **options)

        def pool(chunks: list[list[Prompt]]):
            for chunk in chunks:
                outputs = llm.encode([TokensPrompt(prompt_token_ids=p.ids) for p in chunk],
                                     pooling_task="token_classify", use_tqdm=False)
                yield chunk, [output.outputs.data for output in outputs]

        return pool

    return score_step_pooled(fam, dataset, start, engine=engine, model_name=path, task=task, max_length=max_length,
                             batch_tokens=batch_tokens, output_dir=output_dir, cache_dir=cache_dir,
                             overwrite=overwrite, progress=progress)
