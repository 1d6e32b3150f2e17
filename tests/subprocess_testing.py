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
    # PYTHONFAULTHANDLER: a child killed by a signal prints every thread's Python stack (in the assertion message).
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONFAULTHANDLER="1")
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


def train_step(model, optimizer, vocab_size: int, seed: int) -> float:
    """One token-classification training step of a rank's child on a random batch drawn from ``seed`` (two rows of 48
    tokens, a label at every eighth); ``seed`` also seeds the global generator, which the head's dropout draws from.
    Returns the loss."""
    import torch

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab_size, (2, 48), generator=generator)
    labels = torch.full_like(ids, -100)
    labels[:, 7::8] = torch.randint(0, 2, labels[:, 7::8].shape, generator=generator)
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return loss.item()


def leave_group() -> None:
    """End a torchrun child once its result is written: wait for every rank, destroy the process group, and exit
    without interpreter finalization.

    A DDP-wrapped model (a Trainer's, Lightning's) or an FSDP2-sharded one keeps a reference to the gloo process
    group, so the group and its worker threads outlive ``destroy_process_group`` and are torn down during
    finalization, where a thread that needs the GIL aborts the process ("terminate called without an active
    exception", SIGABRT: the Trainer child and the four-rank FSDP2 child, once each in CI; pytorch/pytorch#179291
    describes the race). The results are on disk by then, so finalization has
    nothing left to do that the test reads.
    """
    import torch

    torch.distributed.barrier()  # every rank's result is written before any rank tears the group down
    torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def rank_results(folder) -> list:
    """What ranks 0 and 1 wrote with :func:`write_rank_result`, in rank order."""
    return [json.loads((pathlib.Path(folder) / f"result.rank{rank}.json").read_text()) for rank in (0, 1)]
