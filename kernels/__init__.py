"""Triton kernels of fastdl, installed as the private package fastdl._kernels.

Import these through fastdl (fastdl._backend.load_kernels); they are not a
public API. One module per op family, named as the op's stem everywhere else.
"""
