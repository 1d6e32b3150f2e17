"""A feature whose optional package is missing fails with one message naming the extra that installs it, and the rest
of the package keeps working. The package is made missing in a child process (``sys.modules[name] = None`` is what
``import name`` meets when it is not installed), so this runs the same on every stack, with or without the extra."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import PRMBENCH_JSONL
from subprocess_testing import cpu_child_env

CHILD = r"""
import json, sys
sys.modules[sys.argv[1]] = None
from prmbench_fast import evaluate, load_prmbench
from prmbench_fast.extras import MissingExtraError

data = load_prmbench(sys.argv[2], limit_per_class=1)
labels = [{"idx": s.id, "scores": {"step_level_validity_labels": [True] * len(s.steps)}} for s in data]
report = evaluate(data, labels)  # works without the extra
try:
    exec(sys.argv[3])
    outcome = "no error"
except MissingExtraError as error:
    outcome = str(error)
print(json.dumps({"overall": report.table["Overall"], "outcome": outcome}))
"""

CASES = {
    "openai": (
        "from prmbench_fast.critic import score_critic\n"
        "score_critic(data, api_base='http://127.0.0.1:9/v1', api_model='m', progress=False)",
        "critic",
    ),
    "matplotlib": ("from prmbench_fast.report import figures\nfigures._figure(4, 3)", "report"),
    "datasets": ("load_prmbench('hitsmy/PRMBench_Preview')", "hub"),
    "lightning": ("from prmbench_fast.integrations import lightning\nlightning.PRMBenchCallback", "lightning"),
}


@pytest.mark.parametrize("module", sorted(CASES))
def test_a_missing_extra_is_named_and_the_rest_works(module, prmbench_jsonl):
    code, extra = CASES[module]
    run = subprocess.run([sys.executable, "-c", CHILD, module, str(PRMBENCH_JSONL), code], capture_output=True,
                         text=True, env=cpu_child_env(), timeout=300)
    assert run.returncode == 0, run.stderr
    found = json.loads(run.stdout)
    assert 0 < found["overall"] < 100
    assert f"'{module}" in found["outcome"] and "is needed for" in found["outcome"]
    assert f"pip install 'prmbench-fast[{extra}]'" in found["outcome"]
