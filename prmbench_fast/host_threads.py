"""Small host-side array work run on the calling thread, not on torch's intra-op thread pool.

torch splits an elementwise op over more than 32,768 elements (its grain size) across its intra-op threads. On idle
cores a parallel region costs ~10 us; when other processes use the cores, the region waits for threads that are not
scheduled, and the evaluator's ~30 small ops over PRMBench's ~94k steps took 70-160 ms instead of 3-10 ms (measured
on the project's 2-core machine with two CPU-bound processes beside it). An op over n elements takes ~1 ns per element
on one thread, so splitting it can save at most ~n/2 ns on two cores: it pays only beyond millions of elements, where
one busy-core stall (milliseconds) is small against the op. :func:`single_threaded` therefore runs CPU work of up to
:data:`SINGLE_THREAD_MAX_ELEMENTS` elements with one intra-op thread.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

#: Up to 2^24 (~16.8M) elements, one thread: ~17 ms of work on one core, of which two idle cores would save ~8 ms,
#: the order of a single stall of a parallel region on busy cores.
SINGLE_THREAD_MAX_ELEMENTS = 1 << 24

#: torch's thread count is per thread with its OpenMP backend (omp_set_num_threads) and per process with its native
#: pool: one block runs at a time, holding this lock (reentrant: blocks nest), so that whichever the backend, the count
#: a block restores is the one its thread had before. The blocks are milliseconds of work; concurrent ones wait.
_lock = threading.RLock()
_depth = 0
_saved_threads = 0


@contextlib.contextmanager
def single_threaded(device: torch.device | str = "cpu", elements: int = 0) -> Iterator[None]:
    """Run the block with one intra-op thread when its work is on the CPU and at most
    :data:`SINGLE_THREAD_MAX_ELEMENTS` elements; restore the thread count afterwards. Other devices, larger work and a
    pool already of one thread are left as they are.

    Results do not change: the ops run are the same, and the evaluator's reductions are over integers.
    """
    global _depth, _saved_threads
    if torch.device(device).type != "cpu" or elements > SINGLE_THREAD_MAX_ELEMENTS:
        yield
        return
    with _lock:
        if _depth == 0:
            _saved_threads = torch.get_num_threads()
            if _saved_threads != 1:
                torch.set_num_threads(1)
        _depth += 1
        try:
            yield
        finally:
            _depth -= 1
            if _depth == 0 and _saved_threads != 1:
                torch.set_num_threads(_saved_threads)
