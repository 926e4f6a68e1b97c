"""fastdl: fused CUDA C++ and Triton kernels for PyTorch training.

    import fastdl
    y = fastdl.functional.gelu(x, bias=b)      # fused bias + GELU
    fastdl.set_backend("triton")               # or "cuda", "cpu", "torch", "auto"
    fastdl.info()                              # what was built, which backend runs what
"""
__version__ = "0.1.0"

from fastdl import _backend
from fastdl._backend import BackendUnavailable, get_backend, set_backend, use_backend
from fastdl import _ops  # noqa: F401  (fake kernels, Triton ops)
from fastdl import functional, nn, optim
from fastdl._info import info
from fastdl.patch import PatchReport, patch

__all__ = ["functional", "nn", "optim", "info", "patch", "PatchReport", "set_backend", "get_backend",
           "use_backend", "BackendUnavailable"]
