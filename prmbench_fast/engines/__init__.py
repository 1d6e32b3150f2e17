"""The engines ``score()`` runs a PRM with.

- ``"torch"``: this package's own pipeline (:mod:`prmbench_fast.scoring`): a live ``nn.Module`` or a checkpoint
  folder, packed batches, prefix sharing.
- ``"vllm"``: a checkpoint folder loaded by vLLM in this process (:mod:`prmbench_fast.engines.vllm_engine`), tensor
  parallel across GPUs.
- ``"pooling-api"``: a running vLLM server asked over HTTP (:mod:`prmbench_fast.engines.pooling_api`).

The two vLLM engines read step rewards with STEP pooling (:meth:`prmbench_fast.families.Family.step_pooling`) and
share everything after the engine's answer (:mod:`prmbench_fast.engines.step_pooled`).
"""

from __future__ import annotations

import os
from typing import Any

ENGINES = ("torch", "vllm", "pooling-api")


def check_engine(engine: Any, model: Any, family: str) -> None:
    """Raise for an unknown engine (ValueError listing the choices), an engine given with a critic (ValueError), or
    a live module given to a vLLM engine (TypeError: vLLM loads its weights from a path)."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose one of: {', '.join(ENGINES)}")
    if family == "critic" and engine != "torch":
        raise ValueError(f"engine={engine!r} runs a PRM; family='critic' asks an OpenAI-compatible chat endpoint "
                         "(api_base=), with no engine of its own")
    if engine != "torch" and not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"engine={engine!r} needs the checkpoint folder as model (vLLM loads the weights from a path; "
                        f"the pooling API needs the folder's tokenizer and config), got {type(model).__name__}; "
                        "score a live module with engine='torch'")


#: score() arguments of the torch engine alone, with their defaults: another engine refuses a value other than these.
TORCH_ONLY = {"device": None, "backend": "auto", "share_prefixes": None}


def score_with_engine(engine: str, model: str | os.PathLike, dataset: Any, **arguments: Any) -> Any:
    """``score(model, dataset, engine=engine, **arguments)`` for the vLLM engines."""
    given = [name for name, default in TORCH_ONLY.items() if arguments.pop(name, default) != default]
    if given:
        raise ValueError(f"{', '.join(given)}: options of engine='torch'; engine={engine!r} places and runs the "
                         "model itself (its prefix cache is not used for STEP pooling)")
    if engine == "vllm":
        from .vllm_engine import score_vllm

        return score_vllm(model, dataset, **arguments)
    if arguments.pop("dtype", None) is not None:
        raise ValueError("dtype: the server's choice (its --dtype); engine='pooling-api' loads no weights")
    from .pooling_api import score_pooling_api

    return score_pooling_api(model, dataset, **arguments)
