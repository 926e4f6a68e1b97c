"""Triton kernels of fastdl, installed as the private package fastdl._kernels.

Import these through fastdl (fastdl._backend.load_kernels); they are not a
public API. One module per op family, named as the op's stem everywhere else.

FASTDL_AUTOTUNE=0 makes every autotuned kernel use its first config without
benchmarking (the test suite sets it: tests check numerics, and tuning every
test shape would cost minutes of GPU time). Benchmarks leave it on.
"""
import os

AUTOTUNE = os.environ.get("FASTDL_AUTOTUNE", "1") != "0"
