"""``score(path, engine="pooling-api", api_base=URL, api_model=NAME)``: a running vLLM server asked over HTTP.

The server serves the checkpoint with STEP pooling (the options :meth:`prmbench_fast.families.base.StepPooling.
server_args` gives, e.g. ``--runner pooling --pooler-config '{"pooling_type": "STEP", "step_tag_id": ID}'``); this
client tokenizes with the family (from the local checkpoint folder ``path``: its tokenizer and config, not its
weights) and sends the token ids::

    POST {api_base}/pooling  {"model": NAME, "task": "token_classify", "use_activation": true,
                              "input": [[ids...], ...]}
    -> {"data": [{"index": i, "data": [[p0, p1], ...]}, ...]}   one pair per step tag of prompt i

A request holds about ``batch_tokens`` tokens of prompts; ``concurrency`` requests are in flight. Retries, timeouts,
the errors that stop the run and the masking of the key are the critic's (:mod:`prmbench_fast.endpoint`). A request
that still fails after its retries stops the run: a PRM's score has no "invalid answer" to store, and the chunks
already stored are resumed by running the same command again.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import torch

from ..data import PRMBenchDataset, load_prmbench
from ..endpoint import EndpointError, RetryPolicy, ask_all, call_with_retries, check_api_base, masker, public_url
from ..evaluate import Report
from ..extras import require
from .step_pooled import Prompt, score_step_pooled
from .vllm_engine import family_from_folder

POOLING_PATH = "/pooling"
OPTION = "--pooling-api / api_base"


def pooling_request(api_model: str, chunk: list[Prompt]) -> dict[str, Any]:
    """The JSON body of one ``/pooling`` request for the prompts of ``chunk``."""
    return {"model": api_model, "task": "token_classify", "use_activation": True, "input": [p.ids for p in chunk]}


def pooling_probabilities(body: Any, count: int) -> list[torch.Tensor]:
    """The ``count`` prompts' probabilities, float32 (steps, classes) tensors in prompt order, from a ``/pooling``
    answer; ValueError for an answer of another shape (the request is then retried)."""
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list) or len(data) != count:
        got = f"{len(data)} items" if isinstance(data, list) else f"no 'data' list ({type(body).__name__})"
        raise ValueError(f"the /pooling answer has {got} for {count} prompts")
    by_index = {item.get("index"): item.get("data") for item in data if isinstance(item, dict)}
    if set(by_index) != set(range(count)):
        raise ValueError(f"the /pooling answer's indices are {list(by_index)}, expected 0..{count - 1} once each")
    out = []
    for i in range(count):
        try:
            # JSON numbers are the server's float32 values printed exactly: float32 again loses nothing.
            out.append(torch.tensor(by_index[i], dtype=torch.float32))
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"the /pooling answer's item {i} is no list of number lists") from None
    return out


def score_pooling_api(
    model: str | os.PathLike,
    dataset: PRMBenchDataset | None = None,
    *,
    api_base: str | None = None,
    api_model: str | None = None,
    api_key: str | None = None,
    tokenizer: Any = None,
    family: str = "auto",
    max_length: int = 2048,
    batch_tokens: int = 16384,
    concurrency: int = 4,
    max_retries: int = 5,
    retry_interval: float = 1.0,
    timeout: float = 600.0,
    output_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: bool = True,
    task: str = "prmbench",
    **family_options: Any,
) -> Report:
    """``score(model, engine="pooling-api", ...)``: see :func:`prmbench_fast.score` for the shared arguments.

    Args:
        model: the local checkpoint folder of the served model, for its tokenizer and config (the weights are not
            read).
        api_base: the server's root URL, e.g. ``http://localhost:8000`` (``/pooling`` is appended).
        api_model: the model name the server serves (its ``--served-model-name``).
        api_key: sent as a bearer token (default: ``$OPENAI_API_KEY``, else none); never stored or shown.
        batch_tokens: tokens of prompts per request.
        concurrency: requests in flight at once.
        max_retries, retry_interval, timeout: per request, as for the critic (:func:`prmbench_fast.critic.
            score_critic`); timeout in seconds.
    """
    if not api_base or not api_model:
        raise ValueError("engine='pooling-api' needs api_base (the server's URL, --pooling-api) and api_model (the "
                         "served model name, --api-model)")
    check_api_base(api_base, OPTION, "http://localhost:8000")
    if concurrency < 1 or max_retries < 1:
        raise ValueError("concurrency and max_retries must be at least 1")
    if not timeout > 0 or timeout == float("inf"):
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    path = os.fspath(model)
    fam = family_from_folder(path, family, tokenizer, max_length, family_options)
    fam.step_pooling()  # refused before anything is asked
    dataset = dataset if dataset is not None else load_prmbench(task=task)
    api_key = api_key or os.environ.get("OPENAI_API_KEY") or ""
    openai = require("openai", "critic", "the pooling-API client (HTTP to a vLLM server)")
    # Retries are ours (call_with_retries), hence max_retries=0 for the client.
    client = openai.OpenAI(base_url=api_base, api_key=api_key or "EMPTY", max_retries=0, timeout=timeout)
    endpoint = public_url(api_base.rstrip("/") + POOLING_PATH)
    policy = RetryPolicy(max_retries=max_retries, retry_interval=retry_interval, stop=threading.Event(),
                         endpoint=endpoint, mask=masker(api_key, api_base),
                         refused_hint="--pooling-api (the server's root URL, without /v1), --api-model and "
                                      "OPENAI_API_KEY",
                         unreachable_hint="--pooling-api", what=f"model {api_model!r}")

    def ask(chunk: list[Prompt]) -> list[torch.Tensor] | None:
        body = pooling_request(api_model, chunk)
        tried = call_with_retries(
            lambda: pooling_probabilities(client.post(POOLING_PATH, cast_to=object, body=body), len(chunk)), policy)
        if tried is None:
            return None
        if not tried.succeeded:
            ids = [dataset.samples[p.position].id for p in chunk]
            raise EndpointError(
                f"{endpoint} gave no usable answer for the {len(chunk)} samples {ids[:3]}{'...' if len(ids) > 3 else ''}"
                f" after {tried.attempts} attempt(s): {tried.errors[-1]}; the finished results are kept: run the same "
                "command again to resume"
            )
        return tried.value

    def start():
        def pool(chunks: list[list[Prompt]]):
            try:
                yield from ask_all(ask, chunks, concurrency, policy.stop)
            finally:
                policy.stop.set()

        return pool

    engine = {"engine": "pooling-api", "endpoint": endpoint, "api_model": api_model}
    return score_step_pooled(fam, dataset, start, engine=engine, model_name=api_model, task=task,
                             max_length=max_length, batch_tokens=batch_tokens, output_dir=output_dir,
                             cache_dir=cache_dir, overwrite=overwrite, progress=progress)
