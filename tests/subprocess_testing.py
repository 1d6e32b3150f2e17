"""Child processes of the tests: the pipeline in a fresh interpreter, or under torchrun with two gloo ranks on CPU."""

import json
import os
import pathlib
import subprocess
import sys

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]  # a free port


def cpu_child_env() -> dict[str, str]:
    """The environment of a child running the pipeline on CPU: one thread per process (two ranks share the two
    cores), offline, and the torch backend (Triton's interpreter is for the kernel tests)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env.pop("TRITON_INTERPRET", None)
    return env


def run_two_ranks(script: pathlib.Path, *args, timeout: int = 600) -> subprocess.CompletedProcess:
    """``script`` (with ``args``) under torchrun with two ranks; asserts that it succeeded."""
    run = subprocess.run([*TORCHRUN, str(script), *map(str, args)], env=cpu_child_env(), capture_output=True,
                         text=True, timeout=timeout)
    assert run.returncode == 0, run.stderr[-4000:]
    return run


def write_rank_result(folder, rank: int, result) -> None:
    """What a rank reports back, in a file of its own: the ranks share one stdout, where their lines can interleave."""
    (pathlib.Path(folder) / f"result.rank{rank}.json").write_text(json.dumps(result, sort_keys=True))


def rank_results(folder) -> list:
    """What ranks 0 and 1 wrote with :func:`write_rank_result`, in rank order."""
    return [json.loads((pathlib.Path(folder) / f"result.rank{rank}.json").read_text()) for rank in (0, 1)]
