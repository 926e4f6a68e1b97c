"""Per-op glue: fake kernels, Triton op registration, autograd.Functions and
backend choice. The C++ registration (csrc/registration.cpp) names this
package as the home of the fake kernels of its ops."""
from fastdl._ops import activation  # noqa: F401
from fastdl._ops import attention  # noqa: F401
from fastdl._ops import norm  # noqa: F401
from fastdl._ops import batchnorm  # noqa: F401
from fastdl._ops import conv_block  # noqa: F401
from fastdl._ops import adamw  # noqa: F401
