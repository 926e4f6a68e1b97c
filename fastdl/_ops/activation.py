"""Activation family: y = act(input + bias) and gated y = act(a) * b.

Ops (schemas in csrc/registration.cpp):
  fastdl::bias_act_fwd / bias_act_bwd          C++ kernels, CPU and CUDA
  fastdl::glu_fwd / glu_bwd
  fastdl::bias_act_fwd_triton / ..._bwd_triton Triton kernels (defined here)
  fastdl::glu_fwd_triton / glu_bwd_triton

Backward: grad_input = grad_out * act'(input + bias); grad_bias is the sum of
grad_input over all leading dims, reduced in fp32 by torch (deterministic).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fastdl import _backend

OP = "activation"
# The id each Triton kernel specializes on (kernels/activation.py).
ACTS = {"gelu": 0, "gelu_tanh": 1, "relu": 2, "leaky_relu": 3, "silu": 4, "sigmoid": 5, "tanh": 6}
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

_backend.register_op(
    OP, native_op="fastdl::bias_act_fwd", has_triton=True, auto_cuda=("cuda", "triton"),
    auto_why="CUDA C++ first: 16-byte vector accesses; not yet measured against Triton on this GPU")


# --- fake kernels (shapes only), for the C++ and the Triton ops ----------------
def _fake_bias_act(input: Tensor, bias: Optional[Tensor], *args) -> Tensor:
    # Without a bias the kernels keep input's dense layout (empty_like), with
    # one they work contiguous: see csrc/activation.h, as_layout_of.
    if bias is None:
        return torch.empty_like(input)
    return torch.empty(input.shape, dtype=input.dtype, device=input.device)


def _fake_bias_act_bwd(grad_out: Tensor, input: Tensor, bias: Optional[Tensor], *args) -> Tensor:
    return _fake_bias_act(input, bias)


def _fake_glu_bwd(grad_out: Tensor, input: Tensor, *args) -> Tensor:
    return torch.empty(input.shape, dtype=input.dtype, device=input.device)


def _fake_glu(input: Tensor, *args) -> Tensor:
    return input.new_empty((*input.shape[:-1], input.shape[-1] // 2))


if _backend._C is not None:
    torch.library.register_fake("fastdl::bias_act_fwd")(_fake_bias_act)
    torch.library.register_fake("fastdl::bias_act_bwd")(_fake_bias_act_bwd)
    torch.library.register_fake("fastdl::glu_fwd")(_fake_glu)
    torch.library.register_fake("fastdl::glu_bwd")(_fake_glu_bwd)


# --- Triton ops -------------------------------------------------------------------
def _triton():
    return _backend.load_kernels("activation")


@torch.library.custom_op("fastdl::bias_act_fwd_triton", mutates_args=())
def bias_act_fwd_triton(input: Tensor, bias: Optional[Tensor], act: str, negative_slope: float) -> Tensor:
    return _triton().bias_act_forward(input, bias, ACTS[act], negative_slope)


@torch.library.custom_op("fastdl::bias_act_bwd_triton", mutates_args=())
def bias_act_bwd_triton(grad_out: Tensor, input: Tensor, bias: Optional[Tensor], act: str,
                        negative_slope: float) -> Tensor:
    return _triton().bias_act_backward(grad_out, input, bias, ACTS[act], negative_slope)


@torch.library.custom_op("fastdl::glu_fwd_triton", mutates_args=())
def glu_fwd_triton(input: Tensor, act: str, negative_slope: float) -> Tensor:
    return _triton().glu_forward(input, ACTS[act], negative_slope)


@torch.library.custom_op("fastdl::glu_bwd_triton", mutates_args=())
def glu_bwd_triton(grad_out: Tensor, input: Tensor, act: str, negative_slope: float) -> Tensor:
    return _triton().glu_backward(grad_out, input, ACTS[act], negative_slope)


bias_act_fwd_triton.register_fake(_fake_bias_act)
bias_act_bwd_triton.register_fake(_fake_bias_act_bwd)
glu_fwd_triton.register_fake(_fake_glu)
glu_bwd_triton.register_fake(_fake_glu_bwd)


def _native(name: str):
    return getattr(torch.ops.fastdl, name).default if _backend._C is not None else None


# backend -> (bias_act fwd, bias_act bwd, glu fwd, glu bwd)
_IMPLS = {
    "cuda": (_native("bias_act_fwd"), _native("bias_act_bwd"), _native("glu_fwd"), _native("glu_bwd")),
    "triton": (torch.ops.fastdl.bias_act_fwd_triton.default, torch.ops.fastdl.bias_act_bwd_triton.default,
               torch.ops.fastdl.glu_fwd_triton.default, torch.ops.fastdl.glu_bwd_triton.default),
}
_IMPLS["cpu"] = _IMPLS["cuda"]  # one C++ op, dispatched on the tensor's device


# --- reference composite (backend "torch") --------------------------------------------
_TORCH_ACTS = {
    "gelu": lambda x, s: F.gelu(x),
    "gelu_tanh": lambda x, s: F.gelu(x, approximate="tanh"),
    "relu": lambda x, s: F.relu(x),
    "leaky_relu": lambda x, s: F.leaky_relu(x, s),
    "silu": lambda x, s: F.silu(x),
    "sigmoid": lambda x, s: torch.sigmoid(x),
    "tanh": lambda x, s: torch.tanh(x),
}


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def bias_act_torch(input: Tensor, bias: Optional[Tensor], act: str, negative_slope: float) -> Tensor:
    # Same contract as the kernels: fp32 math, one rounding to input's dtype.
    x = input.to(_compute_dtype(input.dtype))
    if bias is not None:
        x = x + bias.to(x.dtype)
    return _TORCH_ACTS[act](x, negative_slope).to(input.dtype)


def glu_torch(input: Tensor, act: str, negative_slope: float) -> Tensor:
    a, b = input.to(_compute_dtype(input.dtype)).chunk(2, dim=-1)
    return (_TORCH_ACTS[act](a, negative_slope) * b).to(input.dtype)


# --- autograd -----------------------------------------------------------------------------
class BiasActFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, bias, act, negative_slope, backend):
        fwd, bwd = _IMPLS[backend][0], _IMPLS[backend][1]
        ctx.save_for_backward(input, bias)
        ctx.bwd, ctx.act, ctx.negative_slope = bwd, act, negative_slope
        return fwd(input, bias, act, negative_slope)

    @staticmethod
    def backward(ctx, grad_out):
        input, bias = ctx.saved_tensors
        grad_in = ctx.bwd(grad_out, input, bias, ctx.act, ctx.negative_slope)
        grad_bias = None
        if bias is not None and ctx.needs_input_grad[1]:
            # Rows as a product, not -1: reshape(-1, 0) of an empty last dim is ambiguous and raises.
            rows = math.prod(grad_in.shape[:-1])
            grad_bias = grad_in.reshape(rows, grad_in.shape[-1]).sum(0, dtype=torch.float32).to(bias.dtype)
        return (grad_in if ctx.needs_input_grad[0] else None), grad_bias, None, None, None


class GluFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, act, negative_slope, backend):
        ctx.save_for_backward(input)
        ctx.bwd, ctx.act, ctx.negative_slope = _IMPLS[backend][3], act, negative_slope
        return _IMPLS[backend][2](input, act, negative_slope)

    @staticmethod
    def backward(ctx, grad_out):
        (input,) = ctx.saved_tensors
        return ctx.bwd(grad_out, input, ctx.act, ctx.negative_slope), None, None, None


# --- checks and entry points ----------------------------------------------------------------
def _check_input(input: Tensor) -> None:
    if not isinstance(input, Tensor):
        raise TypeError(f"fastdl: input must be a Tensor, got {type(input).__name__}")
    if input.dtype not in DTYPES:
        raise TypeError(f"fastdl: input must be float32, float16, bfloat16 or float64, got {input.dtype}")


def _check_act(act: str) -> None:
    if act not in ACTS:
        raise ValueError(f"fastdl: act must be one of {', '.join(ACTS)}; got {act!r}")


def _unsupported(input: Tensor) -> dict:
    if input.dtype == torch.float64:
        return {"triton": "the Triton kernels compute in fp32 and take no float64 input"}
    return {}


def bias_act(input: Tensor, bias: Optional[Tensor], act: str, negative_slope: float) -> Tensor:
    _check_input(input)
    _check_act(act)
    if bias is not None:
        if bias.device != input.device:
            raise ValueError(f"fastdl: bias must be on input's device ({input.device}), got {bias.device}")
        if input.dim() == 0 or bias.dim() != 1 or bias.shape[0] != input.shape[-1]:
            raise ValueError(f"fastdl: bias must have shape [{input.shape[-1] if input.dim() else '?'}] "
                             f"(the last dim of input), got {list(bias.shape)}")
        if bias.dtype not in (input.dtype, torch.float32) or (
                input.dtype == torch.float64 and bias.dtype != torch.float64):
            raise TypeError(f"fastdl: bias must be float32 or input's dtype ({input.dtype}), got {bias.dtype}")
    backend = _backend.resolve(OP, input.device, _unsupported(input))
    if backend == "torch":
        return bias_act_torch(input, bias, act, negative_slope)
    return BiasActFunction.apply(input, bias, act, float(negative_slope), backend)


def gated(input: Tensor, act: str, negative_slope: float = 0.01) -> Tensor:
    _check_input(input)
    _check_act(act)
    if input.dim() == 0 or input.shape[-1] % 2:
        raise ValueError(f"fastdl: input's last dim must be even (it is split into two halves), "
                         f"got shape {list(input.shape)}")
    backend = _backend.resolve(OP, input.device, _unsupported(input))
    if backend == "torch":
        return glu_torch(input, act, negative_slope)
    return GluFunction.apply(input, act, float(negative_slope), backend)
