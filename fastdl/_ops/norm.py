"""LayerNorm / RMSNorm family, with the pre-norm residual add fused in.

Ops (schemas in csrc/registration.cpp), one per direction for both norms:
  fastdl::layer_norm_fwd / layer_norm_bwd                 C++ kernels, CPU and CUDA
  fastdl::layer_norm_fwd_triton / layer_norm_bwd_triton   Triton kernels (defined here)

Forward: s = input (+ residual, rounded to input's dtype and returned),
y = (s - mean) * rstd * weight + bias, with mean = 0 for RMSNorm; mean/rstd in
fp32 (fp64 for fp64 input) are saved for the backward, which never recomputes
them from low-precision copies. The backward math is derived in
kernels/norm.py. dweight/dbias are reduced in a fixed order: the same inputs
give bitwise the same gradients every run.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from fastdl import _backend

OP = "norm"
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

_backend.register_op(
    OP, native_op="fastdl::layer_norm_fwd", has_triton=True, auto_cuda=("cuda", "triton"),
    auto_why="CUDA C++ first: register-resident rows, 16-byte accesses; not yet measured against Triton")


# --- fake kernels (shapes only), for the C++ and the Triton ops ----------------
def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fake_fwd(input, residual, weight, bias, normalized_shape, eps, rms):
    stat_shape = input.shape[:input.dim() - len(normalized_shape)]
    sdt = _stat_dtype(input.dtype)
    out = input.new_empty(input.shape)
    res_out = input.new_empty(input.shape) if residual is not None else input.new_empty(0)
    mean = input.new_empty(0, dtype=sdt) if rms else input.new_empty(stat_shape, dtype=sdt)
    return out, res_out, mean, input.new_empty(stat_shape, dtype=sdt)


def _fake_bwd(grad_out, grad_residual, x, weight, bias, mean, rstd, rms, grad_mask):
    pdt = weight.dtype if weight is not None else bias.dtype if bias is not None else x.dtype
    dw = weight.new_empty(weight.shape) if grad_mask[0] and weight is not None else x.new_empty(0, dtype=pdt)
    db = bias.new_empty(bias.shape) if grad_mask[1] and bias is not None else x.new_empty(0, dtype=pdt)
    return x.new_empty(x.shape), dw, db


if _backend._C is not None:
    torch.library.register_fake("fastdl::layer_norm_fwd")(_fake_fwd)
    torch.library.register_fake("fastdl::layer_norm_bwd")(_fake_bwd)


# --- Triton ops -------------------------------------------------------------------
def _triton():
    return _backend.load_kernels("norm")


@torch.library.custom_op("fastdl::layer_norm_fwd_triton", mutates_args=())
def layer_norm_fwd_triton(input: Tensor, residual: Optional[Tensor], weight: Optional[Tensor],
                          bias: Optional[Tensor], normalized_shape: List[int], eps: float,
                          rms: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _triton().layer_norm_forward(input, residual, weight, bias, normalized_shape, eps, rms)


@torch.library.custom_op("fastdl::layer_norm_bwd_triton", mutates_args=())
def layer_norm_bwd_triton(grad_out: Tensor, grad_residual: Optional[Tensor], x: Tensor,
                          weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor, rstd: Tensor,
                          rms: bool, grad_mask: List[bool]) -> tuple[Tensor, Tensor, Tensor]:
    return _triton().layer_norm_backward(grad_out, grad_residual, x, weight, bias, mean, rstd, rms, grad_mask)


layer_norm_fwd_triton.register_fake(_fake_fwd)
layer_norm_bwd_triton.register_fake(_fake_bwd)


def _native(name: str):
    return getattr(torch.ops.fastdl, name).default if _backend._C is not None else None


# backend -> (forward op, backward op)
_IMPLS = {
    "cuda": (_native("layer_norm_fwd"), _native("layer_norm_bwd")),
    "triton": (torch.ops.fastdl.layer_norm_fwd_triton.default, torch.ops.fastdl.layer_norm_bwd_triton.default),
}
_IMPLS["cpu"] = _IMPLS["cuda"]  # one C++ op, dispatched on the tensor's device


# --- reference composite (backend "torch") ----------------------------------------------
def norm_torch(input: Tensor, residual: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
               normalized_shape: List[int], eps: float, rms: bool) -> tuple[Tensor, Optional[Tensor]]:
    """Same contract as the kernels: the sum rounded to input's dtype, fp32 math
    (fp64 for fp64), one rounding of the output."""
    s = input + residual if residual is not None else input
    cdt = _stat_dtype(input.dtype)
    x = s.to(cdt)
    w = weight.to(cdt) if weight is not None else None
    b = bias.to(cdt) if bias is not None else None
    if rms:
        y = F.rms_norm(x, normalized_shape, w, eps)
        if b is not None:
            y = y + b
    else:
        y = F.layer_norm(x, normalized_shape, w, b, eps)
    return y.to(input.dtype), (s if residual is not None else None)


# --- autograd -------------------------------------------------------------------------------
class NormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, residual, weight, bias, normalized_shape, eps, rms, backend):
        fwd, bwd = _IMPLS[backend]
        out, res_out, mean, rstd = fwd(input, residual, weight, bias, normalized_shape, eps, rms)
        has_res = residual is not None
        # The backward reads back what was normalized: the returned sum when
        # there is a residual. bias is passed only for dbias's shape and dtype.
        need_b = bias is not None and ctx.needs_input_grad[3]
        ctx.save_for_backward(res_out if has_res else input, weight, bias if need_b else None, mean, rstd)
        ctx.bwd, ctx.rms, ctx.has_res = bwd, rms, has_res
        ctx.set_materialize_grads(False)
        return (out, res_out) if has_res else out

    @staticmethod
    def backward(ctx, grad_out, grad_res=None):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        need_w = weight is not None and ctx.needs_input_grad[2]
        need_b = bias is not None
        dw = db = None
        if grad_out is None:  # only the returned sum was used downstream
            dx = grad_res
        else:
            dx, dw, db = ctx.bwd(grad_out, grad_res, x, weight, bias, mean, rstd, ctx.rms, [need_w, need_b])
        d_input = dx if ctx.needs_input_grad[0] else None
        d_res = dx if ctx.has_res and ctx.needs_input_grad[1] else None
        return (d_input, d_res, dw if need_w else None, db if need_b else None, None, None, None, None)


# --- checks and entry points ----------------------------------------------------------------
def _shape(normalized_shape: Union[int, Sequence[int]]) -> List[int]:
    if isinstance(normalized_shape, int):
        return [normalized_shape]
    shape = list(normalized_shape)
    if not shape:
        raise ValueError("fastdl: normalized_shape must have at least one dim, got []")
    return shape


def _check_param(p: Optional[Tensor], name: str, input: Tensor, shape: List[int]) -> None:
    if p is None:
        return
    if not isinstance(p, Tensor):
        raise TypeError(f"fastdl: {name} must be a Tensor or None, got {type(p).__name__}")
    if p.device != input.device:
        raise ValueError(f"fastdl: {name} must be on input's device ({input.device}), got {p.device}")
    if list(p.shape) != shape:
        raise ValueError(f"fastdl: {name} must have shape {shape} (normalized_shape), got {list(p.shape)}")
    ok = p.dtype == input.dtype or (p.dtype == torch.float32 and input.dtype != torch.float64)
    if not ok:
        raise TypeError(f"fastdl: {name} must be float32 or input's dtype ({input.dtype}), got {p.dtype}")


def _check(input: Tensor, residual: Optional[Tensor], shape: List[int], weight: Optional[Tensor],
           bias: Optional[Tensor]) -> None:
    if not isinstance(input, Tensor):
        raise TypeError(f"fastdl: input must be a Tensor, got {type(input).__name__}")
    if input.dtype not in DTYPES:
        raise TypeError(f"fastdl: input must be float32, float16, bfloat16 or float64, got {input.dtype}")
    k = len(shape)
    if input.dim() < k or list(input.shape[input.dim() - k:]) != shape:
        raise ValueError(f"fastdl: normalized_shape {shape} must match the trailing dims of input, "
                         f"got input of shape {list(input.shape)}")
    if math.prod(shape) > 2**30:
        raise ValueError(f"fastdl: prod(normalized_shape) must be at most 2^30, got {math.prod(shape)}")
    if residual is not None:
        if not isinstance(residual, Tensor):
            raise TypeError(f"fastdl: residual must be a Tensor, got {type(residual).__name__}")
        if residual.device != input.device:
            raise ValueError(f"fastdl: residual must be on input's device ({input.device}), got {residual.device}")
        if residual.shape != input.shape:
            raise ValueError(f"fastdl: residual must have input's shape {list(input.shape)}, "
                             f"got {list(residual.shape)}")
        if residual.dtype != input.dtype:
            raise TypeError(f"fastdl: residual must have input's dtype ({input.dtype}), got {residual.dtype}")
    _check_param(weight, "weight", input, shape)
    _check_param(bias, "bias", input, shape)
    if weight is not None and bias is not None and weight.dtype != bias.dtype:
        raise TypeError(f"fastdl: weight and bias must have one dtype, got {weight.dtype} and {bias.dtype}")


def _unsupported(input: Tensor) -> dict:
    if input.dtype == torch.float64:
        why = "the {} kernels compute in fp32 and take no float64 input (the cpu kernels do)"
        return {"cuda": why.format("CUDA"), "triton": why.format("Triton")}
    return {}


def norm(input: Tensor, residual: Optional[Tensor], normalized_shape, weight: Optional[Tensor],
         bias: Optional[Tensor], eps: Optional[float], rms: bool):
    """Entry point of all four public functions: returns y, or (y, input + residual)."""
    shape = _shape(normalized_shape)
    _check(input, residual, shape, weight, bias)
    if eps is None:
        eps = torch.finfo(input.dtype).eps
    backend = _backend.resolve(OP, input.device, _unsupported(input))
    if backend == "torch":
        y, s = norm_torch(input, residual, weight, bias, shape, float(eps), rms)
        return (y, s) if residual is not None else y
    return NormFunction.apply(input, residual, weight, bias, shape, float(eps), rms, backend)
