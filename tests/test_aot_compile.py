"""Every Triton kernel compiled ahead of time for sm_80 and sm_90 on this CPU machine (prmbench_fast.aot).

The real wrappers run on CPU tensors; each launch they make is compiled, not run, with Triton's bundled ptxas for both
targets and checked: it compiles, its shared memory fits the arch, its grid fits CUDA's limits, and ptxas spilled no
register (``cuobjdump -res-usage``: STACK 0 and LOCAL 0). The default run checks a representative set (seconds with
Triton's cache warm); ``pytest -m aot_full`` checks every distinct specialisation (``aot.wrapper_calls`` says which),
with vocabularies of 1,000 and of real models (``aot.VOCABS``).

Compiling runs ``python -m prmbench_fast.aot`` in a subprocess: this test session imported the kernels under
TRITON_INTERPRET=1, and such kernels can be recorded but not compiled.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from prmbench_fast import aot
from prmbench_fast.kernels import step_reward


def _compile_all(record_property, *flags: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-m", "prmbench_fast.aot", *flags], capture_output=True, text=True, env=env
    )
    assert result.returncode in (0, 1), result.stderr
    summary = json.loads(result.stdout)
    for key in ("specialisations", "seconds", "workers", "max_registers", "max_shared_bytes"):
        record_property(key, summary[key])
    assert not summary["problems"], "\n".join(summary["problems"])
    assert result.returncode == 0
    return summary


def test_representative_specialisations(record_property):
    summary = _compile_all(record_property)
    # One launch per (family dtype pair, kernel): a dedupe that merged them would hide a dtype.
    assert summary["specialisations"] == 2 * len(aot.FAMILY_DTYPES)


@pytest.mark.aot_full
def test_every_specialisation(record_property):
    summary = _compile_all(record_property, "--full")
    assert summary["specialisations"] == len(aot.launches(full=True))


def test_bf16_launch_is_recorded_as_on_a_gpu():
    # On CPU tensors the wrapper multiplies bf16 in fp32 (the interpreter's bf16 dot is wrong); the recorder must
    # see the GPU choice, the native 16-bit dot, or the sweep would never compile it.
    launches = aot.launches(full=False)
    dot_fp32 = {
        launch.signature["HIDDEN"] + launch.signature["WEIGHT"]: launch.constant("DOT_FP32")
        for launch in launches
        if launch.name == "_step_vocab_lse_kernel"
    }
    assert dot_fp32 == {"*fp32*fp32": True, "*fp16*fp16": False, "*bf16*bf16": False, "*bf16*fp32": True}


def test_real_vocabularies_are_one_specialisation_and_not_the_toy_ones():
    # Every real vocabulary is a multiple of 16, which Triton specialises on; 1,000 is not. The full sweep must hold
    # both (the sm_80 spills of fp16/bf16 x fp32 launches showed only with the former), and compiles the real ones once.
    with aot.record_launches() as recorded:
        for vocab in aot.VOCABS:
            aot._step_token_probs_call("model", torch.bfloat16, torch.float32, True, 2, vocab)()
    keys = [launch.key for launch in recorded]
    assert keys[0] != keys[1] and len(set(keys[1:])) == 1
    full = {launch.key for launch in aot.launches(full=True)}
    assert set(keys) <= full


def test_grids_fit_at_extreme_sizes():
    # A million steps on a 256k vocabulary: meta tensors give the wrappers real sizes without memory.
    hidden = torch.empty(4_000_000, 8192, dtype=torch.bfloat16, device="meta")
    step_pos = torch.empty(1_000_000, dtype=torch.int64, device="meta")
    lm_head = torch.empty(256_000, 8192, dtype=torch.bfloat16, device="meta")
    with aot.record_launches() as launches:
        step_reward.step_rewards(hidden, step_pos, lm_head[:4], backend="triton")
        step_reward.step_token_probs(hidden, step_pos, lm_head, [1, 2], backend="triton")
    assert len(launches) == 2
    for launch in launches:
        assert all(1 <= g <= limit for g, limit in zip(launch.grid, aot.MAX_GRID)), launch.grid


def test_spills_and_limits_are_reported():
    launch = aot.launches(full=False)[0]
    fits = aot.Resources(registers=96, stack=0, local=0, shared=2048)
    assert aot.problems(launch, 80, fits) == []
    found = aot.problems(launch, 80, aot.Resources(registers=255, stack=16, local=0, shared=100 * 1024))
    assert len(found) == 2 and "spills" in found[1] and "shared memory 102400 B > 101376 B" in found[0]
