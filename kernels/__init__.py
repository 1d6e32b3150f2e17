"""Triton kernels of prmbench_fast (installed as ``prmbench_fast.kernels``). Importing this package touches no GPU."""
