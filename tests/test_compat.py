"""prmbench_fast.compat: what differs across the supported torch, Triton and transformers releases.

The other stacks themselves are exercised by .ci/test-stack (the whole fast suite under torch 2.10, 2.11 and 2.15);
these tests pin each decision to the API shape that triggers it, whatever this environment's versions are.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import types
import warnings

import pytest
import torch

from prmbench_fast import compat
from subprocess_testing import cpu_child_env


# -- varlen_attn signatures of torch 2.10, 2.11 and 2.12+ -------------------------------------------------------------
def varlen_2_10(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
    raise AssertionError("never called")


def varlen_2_11(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                window_size=(-1, -1)):
    raise AssertionError("never called")


def varlen_2_12(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                window_size=(-1, -1), enable_gqa=False):
    raise AssertionError("never called")


def test_varlen_attn_is_used_only_with_scale_and_window():
    assert compat.usable_varlen_attn(None) is None
    assert compat.usable_varlen_attn(varlen_2_10) is None
    assert compat.usable_varlen_attn(varlen_2_11) is varlen_2_11
    assert compat.usable_varlen_attn(varlen_2_12) is varlen_2_12


def test_gqa_keyword_is_detected():
    assert not compat.varlen_attn_takes_gqa(varlen_2_11)
    assert compat.varlen_attn_takes_gqa(varlen_2_12)


def test_this_torchs_varlen_attn_is_classified_by_its_signature():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        varlen_attn = None
    assert compat.varlen_attn is compat.usable_varlen_attn(varlen_attn)


# -- FSDP2 state across the rename -------------------------------------------------------------------------------------
def test_fsdp_param_groups_before_and_after_the_rename():
    group = object()
    assert compat.fsdp_param_groups(types.SimpleNamespace(_fsdp_param_group=group)) == [group]  # torch 2.10, 2.11
    assert compat.fsdp_param_groups(types.SimpleNamespace(_fsdp_param_group=None)) == []
    assert compat.fsdp_param_groups(types.SimpleNamespace(_fsdp_param_groups=(group, group))) == [group, group]
    with pytest.raises(AttributeError):
        compat.fsdp_param_groups(types.SimpleNamespace())


# -- Triton missing ----------------------------------------------------------------------------------------------------
def test_triton_stand_in_helpers_equal_tritons():
    triton = pytest.importorskip("triton")
    for n in range(0, 300):
        assert compat._next_power_of_2(n) == triton.next_power_of_2(n)
        for d in (1, 3, 16, 128):
            assert compat._cdiv(n, d) == triton.cdiv(n, d)


WITHOUT_TRITON = r"""
import json, sys, warnings
sys.modules["triton"] = None  # what `import triton` meets where Triton is not installed
import torch
import prmbench_fast
from prmbench_fast import compat
from prmbench_fast.kernels.step_reward import _step_rewards_kernel, step_rewards, step_token_probs

hidden, pos = torch.randn(12, 8), torch.tensor([0, 5, 11])
rewards = step_rewards(hidden, pos, torch.randn(2, 8), activation="softmax")
probs = step_token_probs(hidden, pos, torch.randn(40, 8), torch.tensor([3, 7]))
errors = {}
for name, call in {
    "backend": lambda: step_rewards(hidden, pos, torch.randn(2, 8), backend="triton"),
    "launch": lambda: _step_rewards_kernel[(1,)](),
}.items():
    try:
        call()
    except RuntimeError as error:
        errors[name] = str(error)
print(json.dumps({"has_triton": compat.HAS_TRITON, "rewards": list(rewards.shape), "probs": list(probs.shape),
                  "errors": errors}))
"""


def test_without_triton_everything_but_the_kernels_works():
    env = cpu_child_env()
    run = subprocess.run([sys.executable, "-c", WITHOUT_TRITON], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    found = json.loads(run.stdout)
    assert found["has_triton"] is False and found["rewards"] == [3, 2] and found["probs"] == [3, 2]
    assert found["errors"]["backend"] == 'backend="triton" needs Triton, which is not installed; use backend="torch"'
    assert "the Triton kernel _step_rewards_kernel cannot run: Triton is not installed" in found["errors"]["launch"]


def test_importing_the_package_imports_neither_triton_nor_varlen_attention():
    code = (
        "import sys, prmbench_fast.evaluate\n"
        "print(sorted(m for m in ('triton', 'torch.nn.attention.varlen') if m in sys.modules))"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cpu_child_env(), timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"


def test_warn_once(monkeypatch):
    monkeypatch.setattr(compat, "_WARNED", set())
    with pytest.warns(compat.FallbackWarning, match="first"):
        compat.warn_once("key", "first")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second warning would raise
        compat.warn_once("key", "again")


# -- prmbench-fast env -------------------------------------------------------------------------------------------------
def test_env_command_reports_versions_and_paths():
    bin_dir = pathlib.Path(sys.executable).parent
    text = subprocess.run([str(bin_dir / "prmbench-fast"), "env"], capture_output=True, text=True, env=cpu_child_env())
    assert text.returncode == 0, text.stderr
    assert f"torch         {torch.__version__}" in text.stdout
    as_json = subprocess.run([str(bin_dir / "prmbench-fast"), "env", "--json"], capture_output=True, text=True,
                             env=cpu_child_env())
    facts = json.loads(as_json.stdout)
    assert facts["torch"] == torch.__version__ and facts["python"] == ".".join(map(str, sys.version_info[:3]))
    assert facts["extension"]["loaded"] and "CPU" in facts["extension"]["kernels"] and facts["extension"]["result_walk"]
    cpu = facts["paths"]["cpu"]
    assert cpu["step_confusion"] == "compiled CPU kernel (prmbench_fast._C)"
    assert cpu["attention"].startswith("one SDPA call per segment")
    if not torch.cuda.is_available():
        assert facts["gpus"] == [] and list(facts["paths"]) == ["cpu"]
