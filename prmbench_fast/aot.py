"""Ahead-of-time compilation of the package's Triton kernels for real GPUs, on a machine without one.

The real Python wrappers (``prmbench_fast.kernels.step_reward``) run on CPU tensors; each kernel launch they make is
intercepted and, instead of running, bound and specialised exactly as ``JITFunction.run`` would bind it (same integer
and pointer specialisation, same constexprs and options), then compiled with ``triton.compile`` for a
``GPUTarget`` by Triton's bundled ptxas. The cubin's resources come from Triton's bundled ``cuobjdump -res-usage``.

Used by ``tests/test_aot_compile.py``; see TOOLCHAIN.md ("Ahead-of-time compilation of Triton kernels").
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import subprocess
import tempfile
from collections.abc import Callable, Iterator

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

from .kernels import step_reward

#: Every Triton kernel of the package.
KERNELS = (step_reward._step_rewards_kernel, step_reward._step_vocab_lse_kernel)

#: The targets every kernel must compile for: A100-class (sm_80) and H100-class (sm_90) GPUs.
TARGETS = {80: GPUTarget("cuda", 80, 32), 90: GPUTarget("cuda", 90, 32)}
#: Dynamic shared memory one block may use after opting in (CUDA programming guide, "Compute capabilities"). For
#: sm_80 the limit is that of the smallest 8.x parts (8.6 and 8.9: 99 KiB), so a kernel that fits runs on every
#: Ampere/Ada GPU, not only on the A100 (163 KiB); sm_90 (H100/H200): 227 KiB.
MAX_SHARED_BYTES = {80: 99 * 1024, 90: 227 * 1024}
#: Largest grid: 2**31 - 1 blocks in x, 65,535 in y and z.
MAX_GRID = (2**31 - 1, 65535, 65535)


@dataclasses.dataclass(frozen=True)
class Launch:
    """One kernel launch a wrapper made, bound as ``JITFunction.run`` binds it, not run.

    ``key`` identifies the specialisation (what Triton's kernel cache keys on): two launches with the same key
    compile to the same binary.
    """

    kernel: JITFunction
    key: str
    grid: tuple[int, int, int]
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__

    def constant(self, name: str):
        """The value the launch gave constexpr (or specialised-to-constant) argument ``name``."""
        return self.constexprs[(list(self.signature).index(name),)]

    def describe(self) -> str:
        names = list(self.signature)
        constants = {names[path[0]]: value for path, value in self.constexprs.items()}
        pointers = {k: v for k, v in self.signature.items() if v.startswith("*")}
        return f"{self.name} {constants} {pointers} {self.options}"


@dataclasses.dataclass(frozen=True)
class Resources:
    """Per-thread registers, stack and local memory, and per-block shared memory of one compiled kernel."""

    registers: int
    stack: int
    local: int
    shared: int

    @property
    def spills(self) -> bool:
        # ptxas puts spilled registers on the stack in local memory; a kernel without spills has neither.
        return self.stack > 0 or self.local > 0


def _as_jit(kernel) -> JITFunction:
    """The JITFunction of a kernel; under TRITON_INTERPRET=1 ``@triton.jit`` made an InterpretedFunction instead,
    so a JITFunction is built from the same Python function (enough to record launches, not to compile them)."""
    return kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn)


@contextlib.contextmanager
def record_launches(kernels=KERNELS, target: GPUTarget = TARGETS[90]) -> Iterator[list[Launch]]:
    """Within the block, launches of ``kernels`` are recorded into the yielded list instead of running.

    The wrappers are called with CPU tensors; they accept those only under the Triton interpreter, so the
    interpreter switch is on inside the block (the kernels themselves stay compilable JIT functions), and the
    wrappers' interpreter-only choices (``step_reward._interpreted``) are made as for GPU tensors. Outputs of the
    wrappers are garbage (nothing ran); only the launches matter. Binding depends on the target's backend only for
    the attribute spelling, so launches recorded for one CUDA target compile for any other.
    """
    launches: list[Launch] = []
    backend = make_backend(target)

    def recorder(kernel):
        jit = _as_jit(kernel)
        binder = create_function_from_signature(jit.signature, jit.params, backend)

        def run(*args, grid, warmup, **kwargs):
            # The two options JITFunction.run adds before binding.
            kwargs["debug"] = kwargs.get("debug", jit.debug) or triton.knobs.runtime.debug
            kwargs["instrumentation_mode"] = triton.knobs.compilation.instrumentation_mode
            bound, specialization, _ = binder(*args, **kwargs)
            _, signature, constexprs, attrs = jit._pack_args(backend, kwargs, bound, specialization, None)
            # Launch options (num_warps, ...) are kept as given: each target's backend parses them for itself.
            options = {k: v for k, v in kwargs.items() if k not in bound}
            grid = tuple(grid(bound) if callable(grid) else grid)
            key = f"{jit.fn.__name__}|{specialization}|{sorted(options.items())}"
            launches.append(Launch(jit, key, grid + (1,) * (3 - len(grid)), signature, constexprs, attrs, options))

        return run

    interpreted = step_reward._interpreted
    # scope() restores the knob and the TRITON_INTERPRET it writes into os.environ: assigning the old value back
    # would pin the knob, and later code would no longer follow the environment variable.
    with triton.knobs.runtime.scope():
        triton.knobs.runtime.interpret = True
        step_reward._interpreted = lambda tensor: False
        for kernel in kernels:
            kernel.run = recorder(kernel)  # an instance attribute shadows the class's run
        try:
            yield launches
        finally:
            for kernel in kernels:
                del kernel.run
            step_reward._interpreted = interpreted


def distinct(launches: list[Launch]) -> list[Launch]:
    """The launches with distinct keys, first occurrence kept (the grid does not change the binary)."""
    seen: dict[str, Launch] = {}
    for launch in launches:
        seen.setdefault(launch.key, launch)
    return list(seen.values())


def compile_launch(launch: Launch, arch: int):
    """The compiled kernel (``triton.compiler.CompiledKernel``) of one launch for ``TARGETS[arch]``."""
    target = TARGETS[arch]
    options = make_backend(target).parse_options(launch.options)
    if triton.knobs.runtime.interpret:
        raise RuntimeError("compiling needs TRITON_INTERPRET unset (see prmbench_fast.aot.main)")
    source = ASTSource(launch.kernel, launch.signature, launch.constexprs, launch.attrs)
    return triton.compile(source, target=target, options=options.__dict__)


def _cuobjdump() -> str:
    return triton.knobs.nvidia.cuobjdump.path


_RES_USAGE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def resources(compiled) -> Resources:
    """Registers, stack and local memory from ``cuobjdump -res-usage`` of the cubin; shared memory from Triton's
    metadata (the cubin's SHARED counts static shared memory only, Triton's is dynamic)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        report = subprocess.run([_cuobjdump(), "-res-usage", cubin.name], capture_output=True, text=True, check=True)
    match = _RES_USAGE.search(report.stdout)
    if match is None:
        raise RuntimeError(f"no resource line in cuobjdump -res-usage output:\n{report.stdout}{report.stderr}")
    registers, stack, static_shared, local = map(int, match.groups())
    return Resources(registers, stack, local, static_shared + compiled.metadata.shared)


def problems(launch: Launch, arch: int, usage: Resources) -> list[str]:
    """What would go wrong running this launch on ``arch``: too much shared memory, a grid too large, spills."""
    found = []
    if usage.shared > MAX_SHARED_BYTES[arch]:
        found.append(f"shared memory {usage.shared} B > {MAX_SHARED_BYTES[arch]} B on sm_{arch}")
    if any(g > limit or g < 1 for g, limit in zip(launch.grid, MAX_GRID)):
        found.append(f"grid {launch.grid} outside [1, {MAX_GRID}]")
    if usage.spills:
        found.append(f"spills on sm_{arch}: {usage}")
    return found


@dataclasses.dataclass(frozen=True)
class Result:
    """One launch compiled for one arch."""

    description: str
    kernel: str
    arch: int
    resources: Resources
    problems: tuple[str, ...]


def check(launches: list[Launch], arches=tuple(TARGETS)) -> list[Result]:
    """Compiles every launch for every arch."""
    results = []
    for launch in launches:
        for arch in arches:
            usage = resources(compile_launch(launch, arch))
            problems_found = tuple(problems(launch, arch, usage))
            results.append(Result(launch.describe(), launch.name, arch, usage, problems_found))
    return results


# -- what the wrappers are called with ----------------------------------------------------------------------------
#: The dtypes a model's hidden states and heads come in.
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: (hidden, head) dtype pairs the families pass: one model dtype, or a 16-bit model with an fp32 head (Llemma's
#: mean LM-head row is fp32, see ``step_reward.mean_logit_head``).
FAMILY_DTYPES = (
    (torch.float32, torch.float32),
    (torch.float16, torch.float16),
    (torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float32),
)
#: Hidden-state shapes, by what they change in the specialisation (integer arguments equal to 1 or divisible by 16,
#: pointers aligned to 16 bytes, and the BLOCK_H the wrapper derives from H). "model": every real model width is a
#: multiple of 16 above the widest H tile (64 or 32), so H = 144 stands for all of them.
SHAPES = ("model", "one step", "odd width", "narrow", "column slice", "transposed")


def _hidden(shape: str, dtype: torch.dtype, narrow_width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden (T, H), step_pos (S,)) of one of the :data:`SHAPES`."""
    T, H = 48, 144
    if shape == "odd width":
        H = 67
    elif shape == "narrow":
        H = narrow_width
    if shape == "column slice":
        hidden = torch.zeros(T, 2 * H + 3, dtype=dtype)[:, 3 : 3 + H]  # odd row stride, pointer off by 3 elements
    elif shape == "transposed":
        hidden = torch.zeros(H, T, dtype=dtype).T  # strides (1, T)
    else:
        hidden = torch.zeros(T, H, dtype=dtype)
    step_pos = torch.zeros(1 if shape == "one step" else 40, dtype=torch.int64)
    return hidden, step_pos


def _step_rewards_call(shape, hidden_dtype, weight_dtype, has_bias, activation, classes) -> Callable[[], object]:
    def call():
        # H = 16 gives BLOCK_H = 16, the narrowest tile a model of width 16..31 gets.
        hidden, step_pos = _hidden(shape, hidden_dtype, narrow_width=16)
        weight = torch.zeros(classes, hidden.shape[1], dtype=weight_dtype)
        bias = torch.zeros(classes, dtype=weight_dtype) if has_bias else None
        step_reward.step_rewards(hidden, step_pos, weight, bias, activation=activation, backend="triton")

    return call


#: LM-head vocabularies: 1,000 (a multiple of 8, not of 16: the vocabulary-size argument is not specialised as
#: divisible by 16) and the real ones, all multiples of 16 (Llama 2 / Mistral 32,000, Llama 3 128,256, Qwen2
#: 152,064), which compile to the same specialisation: it is the one real models run, and the one that spilled on
#: sm_80 while the sweep only tried 1,000. The split size is always a multiple of BLOCK_V.
VOCABS = (1000, 32000, 128256, 152064)
#: The vocabulary of the representative set: a real one.
REPRESENTATIVE_VOCAB = 152064


def _step_token_probs_call(shape, hidden_dtype, weight_dtype, has_bias, num_ids, vocab) -> Callable[[], object]:
    def call():
        # H = 8 gives BLOCK_H = 16 (tl.dot's minimum), half of it masked.
        hidden, step_pos = _hidden(shape, hidden_dtype, narrow_width=8)
        # Never read (nothing runs), so not filled: a real vocabulary's head is up to 152,064 x 144 x 4 B = 88 MB.
        weight = torch.empty(vocab, hidden.shape[1], dtype=weight_dtype)
        bias = torch.zeros(vocab, dtype=weight_dtype) if has_bias else None
        ids = list(range(num_ids))
        step_reward.step_token_probs(hidden, step_pos, weight, ids, lm_head_bias=bias, backend="triton")

    return call


def wrapper_calls(full: bool) -> list[Callable[[], object]]:
    """Calls of the wrappers whose launches are checked.

    Representative (``full=False``): per family dtype pair, each wrapper at its largest tiles (4 classes with bias,
    softmax; 4 token ids with bias, a real vocabulary) in the model shape.

    Full: every (hidden, head) dtype pair, bias or not, every activation and class count, every number of token ids
    up to 4 and every vocabulary of :data:`VOCABS`, in the model shape; and every other shape with the family dtype
    pairs at the largest tiles and every vocabulary. The other shapes change only masks, strides and alignment, which
    do not interact with the dtype and constexpr choices that set the tile sizes, so crossing them with every such
    choice would add compile time, not distinct risks. The vocabularies divisible by 16 share one specialisation
    (deduplicated before compiling), so the sweep compiles two vocabulary cases, not four.
    """
    every_pair = [(h, w) for h in DTYPES for w in DTYPES]
    calls = []
    for hidden_dtype, weight_dtype in FAMILY_DTYPES:
        calls.append(_step_rewards_call("model", hidden_dtype, weight_dtype, True, "softmax", 4))
        calls.append(_step_token_probs_call("model", hidden_dtype, weight_dtype, True, 4, REPRESENTATIVE_VOCAB))
    if not full:
        return calls
    for hidden_dtype, weight_dtype in every_pair:
        for has_bias in (False, True):
            for activation in step_reward.ACTIVATIONS:
                for classes in range(1, step_reward.MAX_CLASSES + 1):
                    calls.append(_step_rewards_call("model", hidden_dtype, weight_dtype, has_bias, activation, classes))
            for num_ids in (1, 2, 3, 4):
                for vocab in VOCABS:
                    calls.append(_step_token_probs_call("model", hidden_dtype, weight_dtype, has_bias, num_ids, vocab))
    for shape in SHAPES[1:]:
        for hidden_dtype, weight_dtype in FAMILY_DTYPES:
            calls.append(_step_rewards_call(shape, hidden_dtype, weight_dtype, True, "softmax", 4))
            for vocab in VOCABS:
                calls.append(_step_token_probs_call(shape, hidden_dtype, weight_dtype, True, 4, vocab))
    return calls


def launches(full: bool) -> list[Launch]:
    """The distinct launches of :func:`wrapper_calls`."""
    with record_launches() as recorded:
        for call in wrapper_calls(full):
            call()
    return distinct(recorded)


def _check_share(full: bool, share: int, shares: int) -> list[Result]:
    return check(launches(full)[share::shares])


def main(argv=None) -> int:
    """``python -m prmbench_fast.aot [--full] [--workers N]``: compile, print a summary, exit 1 on any problem.

    Run it with TRITON_INTERPRET unset: kernels decorated under the interpreter do not compile (Triton's code
    generator then treats their loop variables as raw IR values), which is why the tests call this in a subprocess.
    Workers are processes, each recording the same launches and compiling its share.
    """
    import argparse
    import json
    import multiprocessing
    import os
    import time

    parser = argparse.ArgumentParser(description="AOT-compile every Triton specialisation for sm_80 and sm_90")
    parser.add_argument("--full", action="store_true", help="every distinct specialisation, not a representative set")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    if triton.knobs.runtime.interpret:
        parser.error("run with TRITON_INTERPRET unset (see the docstring of prmbench_fast.aot.main)")

    start = time.perf_counter()
    workers = max(1, args.workers)
    if workers == 1:
        results = check(launches(args.full))
    else:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            shares = pool.starmap(_check_share, [(args.full, share, workers) for share in range(workers)])
        results = [result for share in shares for result in share]
    summary = {
        "specialisations": len(results) // len(TARGETS),
        "compiles": len(results),
        "seconds": round(time.perf_counter() - start, 1),
        "workers": workers,
        "max_registers": {},
        "max_shared_bytes": {},
        "problems": [f"{r.description}: {p}" for r in results for p in r.problems],
    }
    for r in results:
        name = f"{r.kernel} sm_{r.arch}"
        summary["max_registers"][name] = max(summary["max_registers"].get(name, 0), r.resources.registers)
        summary["max_shared_bytes"][name] = max(summary["max_shared_bytes"].get(name, 0), r.resources.shared)
    print(json.dumps(summary, indent=1))
    return 1 if summary["problems"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
