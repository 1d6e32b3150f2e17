"""What every benchmark row records: the device, the versions and the time of the run."""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import subprocess
import sys

import torch


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: str = "cpu") -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def environment_line(device: str = "cpu") -> str:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "absent"
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return (
        f"device: {device_name(device)} | torch {torch.__version__} | triton {triton_version} | "
        f"python {platform.python_version()} | {stamp}"
    )


@contextlib.contextmanager
def busy_processes(count: int, seconds: float):
    """``count`` CPU-bound background processes (a Python spin loop each) for the duration of the block: the load of
    other jobs sharing the cores. Each process also stops by itself after ``seconds``, so none outlives a benchmark
    that is killed; on leaving the block they are terminated and waited for."""
    spin = f"import time\nend = time.monotonic() + {float(seconds)}\nwhile time.monotonic() < end:\n    pass\n"
    processes = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(count)]
    try:
        yield processes
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait()
