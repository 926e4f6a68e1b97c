"""BatchNorm family: y = act(batch_norm(input) + residual), channel = dim 1.

Ops (schemas in csrc/registration.cpp; Triton twins fastdl::<name>_triton here).
Each is usable on its own (fused Conv+BN builds on them):
  batch_norm_stats(input) -> (mean, var)
      per-channel mean and biased variance in fp32 (Welford, then Chan's
      merge of the partial results: stable for means far from zero).
  batch_norm_fwd(input, mean, scale, shift, residual, act, slope) -> y
      y = act((input - mean[c]) * scale[c] + shift[c] + residual), one pass.
      Training: mean = batch mean, scale = weight * invstd, shift = bias.
      Eval: the running stats in place of the batch ones.
  batch_norm_bwd_reduce(grad_out, input, mean, scale, shift, residual, act, slope, write_dz)
      -> (sum(dz), sum(dz * (input - mean)), dz or empty), dz = grad_out * act'(z).
  batch_norm_bwd(grad_out, input, mean, scale, shift, residual, coef_xmu, coef_const, act, slope)
      -> dz * scale + coef_xmu * (input - mean) + coef_const.
Inputs: NCHW-contiguous or channels_last (any number of trailing dims, also
(N, C)) are read in place; other strides are copied first. Outputs take the
layout the kernels used (the rule: `channels_last_dense`).

Backward. With x_hat = (x - mean) * invstd, z = x_hat * w + b + r, y = act(z),
n = elements per channel, dz = dy * act'(z):
  d residual = dz,  d bias = sum(dz) = S1,  d weight = sum(dz * x_hat) = invstd * S2
  with S2 = sum(dz * (x - mean)).
With batch statistics mean and invstd depend on x; differentiating
x_hat_i = (x_i - mean) * invstd through both gives the classic
  dx = w * invstd * (dz - S1 / n - x_hat * sum(dz * x_hat) / n)
     = scale * dz + coef_xmu * (x - mean) + coef_const,
  coef_xmu = -scale * invstd^2 * S2 / n,  coef_const = -scale * S1 / n,
so the second pass is one per-channel affine map of (dz, x - mean). With
running statistics (eval) mean and invstd are constants: coef_* = 0.

Both passes compute dz in fp32 from grad_out, x and the residual; pass 1
also writes dz in input's dtype when the residual needs its gradient (that
is d residual, in its own dtype). Pass 2 must not read that rounded dz:
where dz is mostly a per-channel affine function of x_hat (e.g. a gradient
with a large per-channel mean), dx is a small difference and dz's rounding
error lands whole on it. relu's dz (g or 0) rounds exactly; silu's, gelu's,
tanh's do not. Measured (N=4, C=3, 7x7, silu + residual, bf16 and fp16,
grad_out ~ 4 + 0.25 randn): 2.3-4.4x the error of the exact dx rounded once
when reading the rounded dz, 1.0x when recomputing. Bytes per element
(e = element size) with an activation and a residual that needs its gradient:
  recompute (this):     pass 1 read g, x, r, write dz;   pass 2 read g, x, r, write dx      8e
  read the rounded dz:  pass 1 the same;                 pass 2 read dz, x, write dx         7e
  also an fp32 dz:      pass 1 also writes 4 bytes;      pass 2 read fp32 dz, x, write dx    6e + 8
so recomputing costs one extra read of the residual (bf16: 16 vs 14 bytes,
+14%) where an fp32 dz would cost 20 (+43%).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from fastdl import _backend
from fastdl._ops.activation import _TORCH_ACTS, ACTS

OP = "batchnorm"
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

_backend.register_op(
    OP, native_op="fastdl::batch_norm_fwd", has_triton=True, auto_cuda=("cuda", "triton"),
    auto_why="CUDA C++ first: 16-byte vector accesses; not yet measured against Triton on this GPU")


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the per-channel tensors the ops take and return."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# --- the layout rule (same as csrc/batchnorm.h) -------------------------------------------
def channels_last_dense(x: Tensor) -> bool:
    """Dense with the channel as the fastest dim: read as a (rows, C) matrix."""
    return x.movedim(1, -1).is_contiguous()


def in_layout(t: Tensor, channels_last: bool) -> Tensor:
    return t.movedim(1, -1).contiguous().movedim(-1, 1) if channels_last else t.contiguous()


def empty_in_layout(x: Tensor) -> Tensor:
    """What an op returns for input `x`: empty_like of x in the kernels' layout."""
    return torch.empty_like(in_layout(x, channels_last_dense(x)))


# --- fake kernels (shapes only), for the C++ and the Triton ops --------------------------
def _fake_stats(input):
    c, dt = input.shape[1], stat_dtype(input.dtype)
    return input.new_empty(c, dtype=dt), input.new_empty(c, dtype=dt)


def _fake_fwd(input, *args):
    return empty_in_layout(input)


def _fake_bwd_reduce(grad_out, input, mean, scale, shift, residual, act, negative_slope, write_dz):
    c, dt = input.shape[1], stat_dtype(input.dtype)
    dz = empty_in_layout(input) if write_dz else input.new_empty(0)
    return input.new_empty(c, dtype=dt), input.new_empty(c, dtype=dt), dz


def _fake_bwd(grad_out, input, *args):
    return empty_in_layout(input)


if _backend._C is not None:
    torch.library.register_fake("fastdl::batch_norm_stats")(_fake_stats)
    torch.library.register_fake("fastdl::batch_norm_fwd")(_fake_fwd)
    torch.library.register_fake("fastdl::batch_norm_bwd_reduce")(_fake_bwd_reduce)
    torch.library.register_fake("fastdl::batch_norm_bwd")(_fake_bwd)


# --- Triton ops ----------------------------------------------------------------------------
def _triton():
    return _backend.load_kernels("batchnorm")


def _act_id(act: str) -> int:
    return -1 if act == "none" else ACTS[act]


@torch.library.custom_op("fastdl::batch_norm_stats_triton", mutates_args=())
def batch_norm_stats_triton(input: Tensor) -> tuple[Tensor, Tensor]:
    return _triton().batch_norm_stats(input)


@torch.library.custom_op("fastdl::batch_norm_fwd_triton", mutates_args=())
def batch_norm_fwd_triton(input: Tensor, mean: Tensor, scale: Tensor, shift: Tensor,
                          residual: Optional[Tensor], act: str, negative_slope: float) -> Tensor:
    return _triton().batch_norm_forward(input, mean, scale, shift, residual, _act_id(act), negative_slope)


@torch.library.custom_op("fastdl::batch_norm_bwd_reduce_triton", mutates_args=())
def batch_norm_bwd_reduce_triton(grad_out: Tensor, input: Tensor, mean: Tensor, scale: Tensor, shift: Tensor,
                                 residual: Optional[Tensor], act: str, negative_slope: float,
                                 write_dz: bool) -> tuple[Tensor, Tensor, Tensor]:
    return _triton().batch_norm_backward_reduce(grad_out, input, mean, scale, shift, residual, _act_id(act),
                                                negative_slope, write_dz)


@torch.library.custom_op("fastdl::batch_norm_bwd_triton", mutates_args=())
def batch_norm_bwd_triton(grad_out: Tensor, input: Tensor, mean: Tensor, scale: Tensor, shift: Tensor,
                          residual: Optional[Tensor], coef_xmu: Tensor, coef_const: Tensor, act: str,
                          negative_slope: float) -> Tensor:
    return _triton().batch_norm_backward(grad_out, input, mean, scale, shift, residual, coef_xmu, coef_const,
                                         _act_id(act), negative_slope)


batch_norm_stats_triton.register_fake(_fake_stats)
batch_norm_fwd_triton.register_fake(_fake_fwd)
batch_norm_bwd_reduce_triton.register_fake(_fake_bwd_reduce)
batch_norm_bwd_triton.register_fake(_fake_bwd)


class Impl(NamedTuple):
    stats: object
    fwd: object
    bwd_reduce: object
    bwd: object


def _native(name: str):
    return getattr(torch.ops.fastdl, name).default if _backend._C is not None else None


_IMPLS = {
    "cuda": Impl(_native("batch_norm_stats"), _native("batch_norm_fwd"), _native("batch_norm_bwd_reduce"),
                 _native("batch_norm_bwd")),
    "triton": Impl(torch.ops.fastdl.batch_norm_stats_triton.default, torch.ops.fastdl.batch_norm_fwd_triton.default,
                   torch.ops.fastdl.batch_norm_bwd_reduce_triton.default,
                   torch.ops.fastdl.batch_norm_bwd_triton.default),
}
_IMPLS["cpu"] = _IMPLS["cuda"]  # one C++ op, dispatched on the tensor's device


# --- autograd ----------------------------------------------------------------------------------
class BatchNormFunction(torch.autograd.Function):
    """y = act((input - mean) * invstd * weight + bias + residual).

    mean and invstd (per channel, stat dtype) come in detached: with
    batch_stats they are input's batch statistics and the backward accounts
    for their dependence on input (module docstring); without, constants.
    """

    @staticmethod
    def forward(ctx, input, weight, bias, residual, mean, invstd, act, negative_slope, batch_stats, backend):
        impl = _IMPLS[backend]
        scale = invstd * weight.to(invstd.dtype) if weight is not None else invstd
        shift = bias.to(invstd.dtype) if bias is not None else torch.zeros_like(invstd)
        ctx.save_for_backward(input, residual, mean, invstd, scale, shift)
        ctx.impl, ctx.act, ctx.negative_slope, ctx.batch_stats = impl, act, negative_slope, batch_stats
        ctx.weight_dtype = weight.dtype if weight is not None else None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return impl.fwd(input, mean, scale, shift, residual, act, negative_slope)

    @staticmethod
    def backward(ctx, grad_out):
        input, residual, mean, invstd, scale, shift = ctx.saved_tensors
        need_x, need_w, need_b, need_r = ctx.needs_input_grad[:4]
        impl, act, slope = ctx.impl, ctx.act, ctx.negative_slope
        # act'(z) needs z, hence the residual; without an activation dz = grad_out.
        res_z = residual if act != "none" else None
        # Pass 1 writes dz only as the residual's gradient; pass 2 recomputes
        # it in fp32 (module docstring: why, and the bytes it costs).
        write_dz = res_z is not None and need_r
        s1, s2, dz = impl.bwd_reduce(grad_out, input, mean, scale, shift, res_z, act, slope, write_dz)
        if act == "none":
            dz = grad_out
        grad_in = None
        if need_x:
            if ctx.batch_stats:
                n = max(1, input.numel() // max(1, input.shape[1]))
                coef_xmu = -scale * invstd * invstd * s2 / n
                coef_const = -scale * s1 / n
            else:
                coef_xmu = coef_const = torch.zeros_like(scale)
            grad_in = impl.bwd(grad_out, input, mean, scale, shift, res_z, coef_xmu, coef_const, act, slope)
        grad_w = (s2 * invstd).to(ctx.weight_dtype) if need_w else None
        grad_b = s1.to(ctx.bias_dtype) if need_b else None
        grad_r = dz if need_r else None
        return grad_in, grad_w, grad_b, grad_r, None, None, None, None, None, None


# --- reference composite (backend "torch") -----------------------------------------------------
def _batch_norm_torch(input, mean, var, weight, bias, residual, act, negative_slope, eps, batch_stats):
    """Same contract as the kernels: statistics and math in fp32 (fp64 for
    fp64), one rounding to input's dtype. Returns (y, mean, var), the latter
    detached (batch statistics when batch_stats)."""
    cd = stat_dtype(input.dtype)
    x = input.to(cd)
    shape = (1, -1) + (1,) * (input.dim() - 2)
    if batch_stats:
        var, mean = torch.var_mean(x, dim=[0, *range(2, input.dim())], correction=0)
    z = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + eps)
    if weight is not None:
        z = z * weight.to(cd).view(shape)
    if bias is not None:
        z = z + bias.to(cd).view(shape)
    if residual is not None:
        z = z + residual.to(cd)
    if act != "none":
        z = _TORCH_ACTS[act](z, negative_slope)
    return z.to(input.dtype), mean.detach(), var.detach()


# --- checks and the entry point --------------------------------------------------------------------
def _check_channel_tensor(t: Optional[Tensor], name: str, input: Tensor) -> None:
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"fastdl: {name} must be a Tensor or None, got {type(t).__name__}")
    if t.device != input.device:
        raise ValueError(f"fastdl: {name} must be on input's device ({input.device}), got {t.device}")
    if t.shape != (input.shape[1],):
        raise ValueError(f"fastdl: {name} must have shape [{input.shape[1]}] (the channels of input, "
                         f"dim 1), got {list(t.shape)}")
    if t.dtype not in (torch.float32, input.dtype):
        raise TypeError(f"fastdl: {name} must be float32 or input's dtype ({input.dtype}), got {t.dtype}")


def _check_args(input, running_mean, running_var, weight, bias, training, eps, act, residual) -> None:
    if not isinstance(input, Tensor):
        raise TypeError(f"fastdl: input must be a Tensor, got {type(input).__name__}")
    if input.dtype not in DTYPES:
        raise TypeError(f"fastdl: input must be float32, float16, bfloat16 or float64, got {input.dtype}")
    if input.dim() < 2:
        raise ValueError(f"fastdl: input must have at least 2 dims (N, C, ...), got shape {list(input.shape)}")
    for t, name in ((running_mean, "running_mean"), (running_var, "running_var"), (weight, "weight"),
                    (bias, "bias")):
        _check_channel_tensor(t, name, input)
    if (running_mean is None) != (running_var is None):
        raise ValueError("fastdl: running_mean and running_var must both be given or both be None")
    if not training and running_mean is None:
        raise ValueError("fastdl: running_mean must be defined in evaluation mode (training=False)")
    if residual is not None:
        if not isinstance(residual, Tensor):
            raise TypeError(f"fastdl: residual must be a Tensor or None, got {type(residual).__name__}")
        if residual.shape != input.shape or residual.device != input.device:
            raise ValueError(f"fastdl: residual must have input's shape {list(input.shape)} and device "
                             f"({input.device}), got {list(residual.shape)} on {residual.device}")
        if residual.dtype != input.dtype:
            raise TypeError(f"fastdl: residual must have input's dtype ({input.dtype}), got {residual.dtype}")
    if act != "none" and act not in ACTS:
        raise ValueError(f"fastdl: act must be None or one of {', '.join(ACTS)}; got {act!r}")
    # torch's own checks, with its messages.
    if training:
        size_prods = input.shape[0]
        for d in input.shape[2:]:
            size_prods *= d
        if size_prods == 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {input.size()}")
        if eps <= 0.0:
            raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    elif eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")


def _unsupported(input: Tensor) -> dict:
    if input.dtype == torch.float64:
        why = "the {} kernels compute in fp32 and take no float64 input (use backend 'cpu' or 'torch')"
        return {"cuda": why.format("CUDA"), "triton": why.format("Triton")}
    return {}


@torch.no_grad()
def update_running_stats(running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor,
                         momentum: float, n: int) -> None:
    """torch's update: running = (1 - momentum) * running + momentum * batch,
    with the unbiased variance (n / (n - 1)) for running_var. In fp32 (fp64),
    stored in the buffers' dtype."""
    unbiased = var * (n / (n - 1))
    running_mean.copy_(running_mean.to(mean.dtype) * (1 - momentum) + mean * momentum)
    running_var.copy_(running_var.to(var.dtype) * (1 - momentum) + unbiased * momentum)


def batch_norm(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
               weight: Optional[Tensor], bias: Optional[Tensor], training: bool, momentum: float,
               eps: float, act: Optional[str], negative_slope: float, residual: Optional[Tensor]) -> Tensor:
    act = "none" if act is None else act
    _check_args(input, running_mean, running_var, weight, bias, training, eps, act, residual)
    backend = _backend.resolve(OP, input.device, _unsupported(input))
    cd = stat_dtype(input.dtype)
    if training:
        if backend == "torch":
            y, mean, var = _batch_norm_torch(input, None, None, weight, bias, residual, act, negative_slope,
                                             eps, True)
        else:
            mean, var = _IMPLS[backend].stats(input.detach())
            invstd = torch.rsqrt(var + eps)
            if input.numel() == 0:
                # No statistics (NaN); the output is empty either way, and
                # invstd 1 gives zero weight gradients as torch does.
                invstd = torch.ones_like(invstd)
            y = BatchNormFunction.apply(input, weight, bias, residual, mean, invstd, act,
                                        float(negative_slope), True, backend)
        # Like torch: an empty batch leaves the running statistics as they are.
        if running_mean is not None and input.numel():
            update_running_stats(running_mean, running_var, mean, var, float(momentum),
                                 input.numel() // input.shape[1])
        return y
    mean, var = running_mean.detach().to(cd), running_var.detach().to(cd)
    if backend == "torch":
        return _batch_norm_torch(input, mean, var, weight, bias, residual, act, negative_slope, eps, False)[0]
    return BatchNormFunction.apply(input, weight, bias, residual, mean, torch.rsqrt(var + eps), act,
                                   float(negative_slope), False, backend)
