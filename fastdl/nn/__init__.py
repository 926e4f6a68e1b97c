"""Drop-in modules: each subclasses its torch counterpart (same constructor
arguments, same state_dict) and runs fastdl's kernels in forward."""
from fastdl.nn.activation import GEGLU, GELU, LeakyReLU, ReLU, Sigmoid, SiLU, SwiGLU, Tanh

__all__ = ["GELU", "ReLU", "LeakyReLU", "SiLU", "Sigmoid", "Tanh", "GEGLU", "SwiGLU"]
