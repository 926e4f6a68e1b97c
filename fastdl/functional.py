"""Public functions, mirroring torch.nn.functional signatures.

Each dispatches to the backend chosen for its op (see fastdl.set_backend) and
is differentiable through a torch.autograd.Function over registered ops, so
torch.compile(fullgraph=True) traces it without graph breaks.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from fastdl._ops import activation as _act

__all__ = [
    "bias_act", "gelu", "relu", "leaky_relu", "silu", "sigmoid", "tanh",
    "geglu", "swiglu", "gated_act",
]


# --- activations ------------------------------------------------------------------
def bias_act(input: Tensor, bias: Optional[Tensor] = None, act: str = "gelu",
             negative_slope: float = 0.01) -> Tensor:
    """act(input + bias) in one pass; bias (shape [input.shape[-1]]) may be
    input's dtype or float32. Math in fp32, one rounding to input's dtype.
    act: gelu, gelu_tanh, relu, leaky_relu (negative_slope), silu, sigmoid, tanh."""
    return _act.bias_act(input, bias, act, negative_slope)


def gelu(input: Tensor, approximate: str = "none", bias: Optional[Tensor] = None) -> Tensor:
    """F.gelu, with an optional bias over the last dim fused in."""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"fastdl: approximate must be 'none' or 'tanh', got {approximate!r}")
    return _act.bias_act(input, bias, "gelu" if approximate == "none" else "gelu_tanh", 0.0)


# `inplace` is accepted for signature compatibility; fastdl always returns a
# new tensor (the saved input must stay intact for the backward).
def relu(input: Tensor, inplace: bool = False) -> Tensor:
    return _act.bias_act(input, None, "relu", 0.0)


def leaky_relu(input: Tensor, negative_slope: float = 0.01, inplace: bool = False) -> Tensor:
    return _act.bias_act(input, None, "leaky_relu", negative_slope)


def silu(input: Tensor, inplace: bool = False) -> Tensor:
    return _act.bias_act(input, None, "silu", 0.0)


def sigmoid(input: Tensor) -> Tensor:
    return _act.bias_act(input, None, "sigmoid", 0.0)


def tanh(input: Tensor) -> Tensor:
    return _act.bias_act(input, None, "tanh", 0.0)


def gated_act(input: Tensor, act: str = "silu", negative_slope: float = 0.01) -> Tensor:
    """a, b = input.chunk(2, dim=-1); return act(a) * b."""
    return _act.gated(input, act, negative_slope)


def geglu(input: Tensor, approximate: str = "none") -> Tensor:
    """a, b = input.chunk(2, dim=-1); return gelu(a, approximate) * b."""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"fastdl: approximate must be 'none' or 'tanh', got {approximate!r}")
    return _act.gated(input, "gelu" if approximate == "none" else "gelu_tanh", 0.0)


def swiglu(input: Tensor) -> Tensor:
    """a, b = input.chunk(2, dim=-1); return silu(a) * b."""
    return _act.gated(input, "silu", 0.0)
