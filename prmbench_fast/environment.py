"""What this environment gives the package: versions, GPUs, the compiled op, and which paths will run.

``describe()`` returns it as a dict (JSON-ready); ``prmbench-fast env`` prints it. Unlike the rest of the package it
asks CUDA about its devices (``torch.cuda.is_available()``, capabilities), which it does only when called.
"""

from __future__ import annotations

import importlib.metadata
import platform
import sys

import torch

from . import compat, ops, varlen_attention

#: Optional packages and the extra that installs each (pyproject.toml).
OPTIONAL = {
    "datasets": "hub", "openai": "critic", "matplotlib": "report", "gguf": "default-model", "lightning": "lightning"
}
# A released model's head dim and dtype, to say which attention kernel "auto" picks for a typical PRM.
_TYPICAL_HEAD_DIM = 128


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _attention(device: torch.device) -> str:
    if device.type != "cuda":
        return "one SDPA call per segment (no varlen attention kernel on CPU)"
    if compat.varlen_attn is None:
        return f"one SDPA call per segment (torch {torch.__version__} has no varlen_attn with scale= and window_size=)"
    chosen = varlen_attention.auto_backend(device, torch.bfloat16, _TYPICAL_HEAD_DIM)
    if chosen == "sdpa":
        return "one SDPA call per segment (flash varlen attention needs sm_80 or newer)"
    gqa = "" if compat.varlen_attn_takes_gqa(compat.varlen_attn) else ", GQA on expanded key/value heads"
    return f"flash varlen attention for fp16/bf16 (head dim <= 256, a multiple of 8){gqa}; SDPA per segment otherwise"


def _reward_kernels(device: torch.device) -> str:
    if device.type == "cuda":
        if compat.HAS_TRITON:
            return f"Triton {compat.triton.__version__} kernels (step_rewards, step_token_probs)"
        return f"torch implementations (Triton is not installed: {compat.TRITON_IMPORT_ERROR})"
    if compat.HAS_TRITON and compat.triton.knobs.runtime.interpret:
        return "Triton kernels in the interpreter with backend='triton' (TRITON_INTERPRET=1, slow), else torch"
    return "torch implementations (Triton kernels run on CUDA tensors only)"


def _counting(device: torch.device) -> str:
    missing = ops.compiled_kernel_missing(device.type)
    if missing is None:
        return f"compiled {device.type.upper()} kernel (prmbench_fast._C)"
    return f"torch reference ({missing})"


def describe() -> dict:
    """Versions, devices, the compiled extension and the path each piece takes on each device, as a dict."""
    devices = [torch.device("cpu")]
    gpus = []
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(index)
            gpus.append({"index": index, "name": torch.cuda.get_device_name(index), "capability": f"sm_{major}{minor}"})
            devices.append(torch.device("cuda", index))
    extension = sys.modules.get("prmbench_fast._C")
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "prmbench_fast": _version("prmbench-fast"),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": compat.triton.__version__ if compat.HAS_TRITON else None,
        "transformers": _version("transformers"),
        "numpy": _version("numpy"),
        "safetensors": _version("safetensors"),
        "tokenizers": _version("tokenizers"),
        "optional": {name: {"version": _version(name), "extra": extra} for name, extra in OPTIONAL.items()},
        "gpus": gpus,
        "extension": {
            "loaded": ops.HAS_C_EXTENSION,
            "file": getattr(extension, "__file__", None),
            "error": None if ops.HAS_C_EXTENSION else f"{type(ops.C_IMPORT_ERROR).__name__}: {ops.C_IMPORT_ERROR}",
            "kernels": [key for key in ("CPU", "CUDA") if ops.HAS_C_EXTENSION and compat.has_kernel(ops.OP_NAME, key)],
            "result_walk": ops.flat_from_results is not None,  # parse_results' compiled fast path
        },
        "paths": {
            str(device): {
                "attention": _attention(device),
                "step_rewards": _reward_kernels(device),
                "step_confusion": _counting(device),
            }
            for device in devices
        },
    }


def format_report(facts: dict) -> str:
    """``describe()`` as the lines ``prmbench-fast env`` prints."""
    def shown(version):
        return version or "not installed"

    lines = [
        f"prmbench_fast {shown(facts['prmbench_fast'])} on Python {facts['python']} ({facts['platform']})",
        f"torch         {facts['torch']} (CUDA {facts['torch_cuda'] or 'none: a CPU build'})",
        f"triton        {shown(facts['triton'])}",
        f"transformers  {shown(facts['transformers'])}",
        f"numpy {shown(facts['numpy'])}, safetensors {shown(facts['safetensors'])}, "
        f"tokenizers {shown(facts['tokenizers'])}",
        "optional      " + ", ".join(
            f"{name} {info['version']}" if info["version"] else f"{name} missing ([{info['extra']}])"
            for name, info in facts["optional"].items()
        ),
        "GPUs          " + (", ".join(f"cuda:{g['index']} {g['name']} ({g['capability']})" for g in facts["gpus"])
                            or "none visible"),
    ]
    extension = facts["extension"]
    if extension["loaded"]:
        walk = "compiled" if extension["result_walk"] else "in Python (an extension built before the walk)"
        lines.append(f"compiled op   loaded from {extension['file']}; kernels: {', '.join(extension['kernels'])}; "
                     f"result dicts parsed {walk}")
    else:
        lines.append(f"compiled op   not loaded ({extension['error']}); rebuild: {ops.REBUILD_COMMAND}")
    for device, paths in facts["paths"].items():
        lines.append(f"on {device}:")
        lines += [f"  {what:<15} {how}" for what, how in paths.items()]
    return "\n".join(lines)
