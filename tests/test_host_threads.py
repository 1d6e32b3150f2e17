"""single_threaded(): small CPU work on one intra-op thread, the thread count restored however the block ends."""

from __future__ import annotations

import importlib
import threading

import pytest
import torch

from prmbench_fast import PRMBenchMetric, evaluate
from prmbench_fast.data import load_prmbench
from prmbench_fast.host_threads import SINGLE_THREAD_MAX_ELEMENTS, single_threaded

#: The module, not the function prmbench_fast exports under the same name.
evaluate_module = importlib.import_module("prmbench_fast.evaluate")


@pytest.fixture
def two_threads():
    """torch with 2 intra-op threads for the test (so that 1 inside a block is a change), then as it was."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_cpu_work_runs_on_one_thread_and_the_count_is_restored(two_threads):
    with single_threaded("cpu", 94_203):  # the full benchmark's steps
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2


def test_restored_when_the_block_raises(two_threads):
    with pytest.raises(KeyError):
        with single_threaded("cpu"):
            raise KeyError("x")
    assert torch.get_num_threads() == 2


def test_nested_blocks_restore_once_at_the_outermost_end(two_threads):
    with single_threaded("cpu"):
        with single_threaded("cpu"):
            pass
        assert torch.get_num_threads() == 1  # the inner block's end must not restore 2 inside the outer one
    assert torch.get_num_threads() == 2


def test_blocks_on_two_threads_each_run_single_threaded_and_restore_their_own_count(two_threads):
    # With torch's OpenMP backend the count is per thread: a block that trusted another thread's setting would run
    # its work on the full pool, and one that restored another thread's saved count would leave its thread at 1.
    seen = {}
    inside_first = threading.Event()

    def block(name: str, hold: threading.Event | None):
        before = torch.get_num_threads()
        with single_threaded("cpu"):
            if hold is not None:
                inside_first.set()
                hold.wait(timeout=30)
            inside = torch.get_num_threads()
        seen[name] = (before, inside, torch.get_num_threads())

    release = threading.Event()
    first = threading.Thread(target=block, args=("first", release))
    first.start()
    inside_first.wait(timeout=30)
    second = threading.Thread(target=block, args=("second", None))
    second.start()  # enters while the first block runs
    release.set()
    first.join()
    second.join()
    block("main", None)
    for name, (before, inside, after) in seen.items():
        assert inside == 1, name
        assert after == before, name


@pytest.mark.parametrize("device, elements", [("meta", 10), ("cpu", SINGLE_THREAD_MAX_ELEMENTS + 1)])
def test_other_devices_and_large_work_keep_the_pool(two_threads, device, elements):
    with single_threaded(device, elements):
        assert torch.get_num_threads() == 2


def test_evaluate_and_metric_count_on_one_thread_and_restore_the_pool(two_threads, prmbench_jsonl, monkeypatch):
    dataset = load_prmbench(prmbench_jsonl, limit_per_class=2)
    threads_in_op = []
    counting_op = evaluate_module.step_confusion

    def recording_op(*args, **kwargs):
        threads_in_op.append(torch.get_num_threads())
        return counting_op(*args, **kwargs)

    monkeypatch.setattr(evaluate_module, "step_confusion", recording_op)
    results = [{"idx": s.id, "scores": {"step_level_validity_labels": [True] * len(s.steps)}} for s in dataset]
    evaluate(dataset, results)
    metric = PRMBenchMetric(dataset)
    metric.update(list(range(len(dataset))), [[0.9] * len(s.steps) for s in dataset])
    metric.compute()
    assert threads_in_op == [1, 1]
    assert torch.get_num_threads() == 2
