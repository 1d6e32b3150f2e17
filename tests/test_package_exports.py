"""The package's top-level names: each is the object its module defines, ``__all__`` lists them, and importing the
package imports neither Triton nor transformers."""

import json
import subprocess
import sys

import prmbench_fast
from prmbench_fast import streaming_metric
from prmbench_fast.tasks import processbench
from subprocess_testing import cpu_child_env

PROCESSBENCH_NAMES = {
    "ProcessBenchMetric": streaming_metric,
    "ProcessBenchDataError": processbench,
    "ProcessBenchDataset": processbench,
    "ProcessBenchReport": processbench,
    "ProcessBenchSample": processbench,
    "load_processbench": processbench,
}


def test_processbench_names_are_exported():
    for name, module in PROCESSBENCH_NAMES.items():
        assert name in prmbench_fast.__all__
        assert getattr(prmbench_fast, name) is getattr(module, name)
        assert name in prmbench_fast.__doc__


def test_every_listed_name_resolves():
    assert len(set(prmbench_fast.__all__)) == len(prmbench_fast.__all__)
    for name in prmbench_fast.__all__:
        assert getattr(prmbench_fast, name) is not None


def test_load_processbench_is_the_processbench_task(tmp_path):
    row = {"id": "gsm8k-0", "generator": "g", "problem": "p", "steps": ["a", "b"], "final_answer_correct": True,
           "label": -1}
    (tmp_path / "gsm8k.jsonl").write_text(json.dumps(row) + "\n")
    direct = prmbench_fast.load_processbench(tmp_path)
    assert isinstance(direct, prmbench_fast.ProcessBenchDataset)
    assert list(direct) == list(prmbench_fast.load_prmbench(tmp_path, task="processbench"))


def test_importing_the_package_imports_neither_triton_nor_transformers():
    code = ("import sys, prmbench_fast\n"
            "print(sorted(m for m in ('triton', 'transformers') if m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cpu_child_env(), timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"
