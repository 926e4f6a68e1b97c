"""Conv2d + BatchNorm2d + activation (+ residual) as one block.

    out = act(BN(conv2d(input, W) + b) + residual)
    BN(y) = (y - mean) * rstd * gamma + beta,  rstd = 1 / sqrt(var + eps)

Backends (fastdl._backend, op "conv_block"):
  triton      Triton implicit-GEMM convolution (kernels/conv_block.py) with
              the epilogue fused; the normalize pass and the BN backward by
              the BatchNorm C++ kernels fastdl::batch_norm_* (their Triton
              twins where fastdl._C has no kernel for the device)
  cuda / cpu  ATen's convolution (cuDNN on CUDA) and the same BatchNorm C++
              kernels (statistics by fastdl::batch_norm_stats)
  torch       the reference composite: F.conv2d, F.batch_norm, residual, act

Inference (running statistics, no gradient needed): BN is folded into the
convolution, W' = W * s, b' = (b - running_mean) * s + beta with
s = gamma * rsqrt(running_var + eps), computed in fp32 (fp64 for fp64 input),
and one kernel computes act(conv2d(input, W') + b' + residual).
fastdl.nn.ConvBNAct2d caches W', b'; this functional form folds per call.

Training: the Triton convolution also returns the per-channel mean and
biased variance of its output (fp32, merged from per-tile partials in fixed
order, so deterministic), then fastdl::batch_norm_fwd computes
act((y - mean) * scale + shift + residual), scale = gamma * rstd, shift = beta.

Backward of the training block (N = elements per channel, z the
pre-activation, dz = grad_out * act'(z), xhat = (y - mean) * rstd):
  dbeta  = sum(dz),  dgamma = sum(dz * xhat) = rstd * sum(dz * (y - mean))
  dy     = gamma * rstd * (dz - dbeta / N - xhat * dgamma / N)
         = dz * scale + coef_xmu * (y - mean) + coef_const,
           coef_xmu = -scale * rstd^2 * sum(dz * (y - mean)) / N,
           coef_const = -scale * sum(dz) / N
  d residual = dz
fastdl::batch_norm_bwd_reduce gives the two sums (and dz when the residual
needs it), fastdl::batch_norm_bwd gives dy; with running statistics (eval
mode with gradients) mean and rstd are constants and both coefs are 0. The
convolution's backward is ATen's (cuDNN on CUDA): aten.convolution_backward.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from fastdl import _backend
from fastdl._ops import batchnorm as _bn
from fastdl._ops.activation import _TORCH_ACTS, ACTS

OP = "conv_block"
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
ACT_NAMES = ("none",) + tuple(ACTS)

_backend.register_op(
    OP, native_op="fastdl::batch_norm_fwd", has_triton=True, auto_cuda=("cuda", "triton"),
    auto_why="cuDNN conv + the fused BatchNorm kernels first; the Triton implicit GEMM (fused "
             "epilogue, free statistics) takes over only once measured faster on this GPU")


# --- the output layout rule (shared by the kernels and their fake kernels) ---------------
def _out_size(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def _empty_output(input: Tensor, weight: Tensor, stride, padding, dilation) -> Tensor:
    """channels_last unless the input is plain contiguous (NCHW in, NCHW out)."""
    oh = _out_size(input.shape[2], weight.shape[2], stride[0], padding[0], dilation[0])
    ow = _out_size(input.shape[3], weight.shape[3], stride[1], padding[1], dilation[1])
    fmt = torch.contiguous_format if input.is_contiguous() else torch.channels_last
    return torch.empty((input.shape[0], weight.shape[0], oh, ow), dtype=input.dtype, device=input.device,
                       memory_format=fmt)


# --- Triton ops ------------------------------------------------------------------------------
def _triton():
    return _backend.load_kernels("conv_block")


def _act_id(act: str) -> int:
    return -1 if act == "none" else ACTS[act]


@torch.library.custom_op("fastdl::conv_block_fwd_triton", mutates_args=())
def conv_block_fwd_triton(input: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor],
                          stride: List[int], padding: List[int], dilation: List[int], groups: int,
                          act: str, negative_slope: float) -> Tensor:
    """act(conv2d(input, weight) + bias + residual) in one kernel."""
    out = _empty_output(input, weight, stride, padding, dilation)
    return _triton().conv_block_forward(input, weight, bias, residual, out, stride, padding, dilation, groups,
                                        _act_id(act), negative_slope)


@torch.library.custom_op("fastdl::conv_block_stats_triton", mutates_args=())
def conv_block_stats_triton(input: Tensor, weight: Tensor, bias: Optional[Tensor], stride: List[int],
                            padding: List[int], dilation: List[int], groups: int) -> Tuple[Tensor, Tensor, Tensor]:
    """(y, mean, var): y = conv2d(input, weight) + bias and the per-channel
    mean and biased variance of y (fp32), from the convolution's epilogue."""
    out = _empty_output(input, weight, stride, padding, dilation)
    return _triton().conv_block_stats(input, weight, bias, out, stride, padding, dilation, groups)


@conv_block_fwd_triton.register_fake
def _(input, weight, bias, residual, stride, padding, dilation, groups, act, negative_slope):
    return _empty_output(input, weight, stride, padding, dilation)


@conv_block_stats_triton.register_fake
def _(input, weight, bias, stride, padding, dilation, groups):
    stat = input.new_empty((weight.shape[0],), dtype=torch.float32)
    return _empty_output(input, weight, stride, padding, dilation), stat, stat.clone()


# --- the pieces of each backend ---------------------------------------------------------------
# Plain values fixed at import, so torch.compile traces the choice below.
_CPP_BN = {dev: _backend._has_kernel("fastdl::batch_norm_fwd", dev.upper()) for dev in ("cpu", "cuda")}


def _bn_impl(backend: str, device: torch.device) -> _bn.Impl:
    """The BatchNorm kernels a backend's normalize pass and backward use: the
    C++ ones for the device where this build has them, else their Triton twins."""
    if backend != "triton" or _CPP_BN.get(device.type, False):
        return _bn._IMPLS["cuda"]
    return _bn._IMPLS["triton"]


def _conv(backend: str, x, w, b, geom, groups) -> Tensor:
    if backend == "triton":
        return torch.ops.fastdl.conv_block_fwd_triton(x, w, b, None, *geom, groups, "none", 0.0)
    return torch.ops.aten.convolution(x, w, b, *geom, False, [0, 0], groups)


def _conv_stats(backend: str, bn: _bn.Impl, x, w, b, geom, groups) -> Tuple[Tensor, Tensor, Tensor]:
    if backend == "triton":
        return torch.ops.fastdl.conv_block_stats_triton(x, w, b, *geom, groups)
    y = torch.ops.aten.convolution(x, w, b, *geom, False, [0, 0], groups)
    return (y, *bn.stats(y))


def _scale_shift(rstd, bn_weight, bn_bias):
    scale = rstd * bn_weight.to(rstd.dtype) if bn_weight is not None else rstd
    shift = bn_bias.to(rstd.dtype) if bn_bias is not None else torch.zeros_like(rstd)
    return scale, shift


# --- autograd ----------------------------------------------------------------------------------
class ConvBNActFunction(torch.autograd.Function):
    """Outputs (out, mean, var); mean and var (the statistics used, fp32) are
    not differentiable and feed the running-statistics update."""

    @staticmethod
    def forward(ctx, input, weight, bias, bn_weight, bn_bias, residual, running_mean, running_var,
                geom, groups, batch_stats, eps, act, slope, backend):
        bn = _bn_impl(backend, input.device)
        sd = _bn.stat_dtype(input.dtype)
        if batch_stats:
            y, mean, var = _conv_stats(backend, bn, input, weight, bias, geom, groups)
        else:
            y = _conv(backend, input, weight, bias, geom, groups)
            mean, var = running_mean.to(sd, copy=True), running_var.to(sd, copy=True)
        rstd = torch.rsqrt(var + eps)
        scale, shift = _scale_shift(rstd, bn_weight, bn_bias)
        out = bn.fwd(y, mean, scale, shift, residual, act, slope)
        ctx.save_for_backward(input, weight, y, mean, rstd, scale, shift, residual)
        ctx.bn, ctx.geom, ctx.groups, ctx.batch_stats, ctx.act, ctx.slope = bn, geom, groups, batch_stats, act, slope
        ctx.has_bias, ctx.param_dtypes = bias is not None, (
            bn_weight.dtype if bn_weight is not None else None, bn_bias.dtype if bn_bias is not None else None)
        ctx.mark_non_differentiable(mean, var)
        return out, mean, var

    @staticmethod
    def backward(ctx, grad_out, _grad_mean, _grad_var):
        x, w, y, mean, rstd, scale, shift, residual = ctx.saved_tensors
        need, bn = ctx.needs_input_grad, ctx.bn
        # Pass 2 recomputes dz in fp32 from grad_out rather than reading the
        # dz pass 1 can write: dz rounded to bf16 before its mean is taken
        # out loses digits to cancellation (measured: 7x torch's bf16 error
        # on small channels). Pass 1 writes dz only as the residual's grad.
        want_dres = residual is not None and need[5]
        sum_dz, sum_dz_xmu, dz = bn.bwd_reduce(grad_out, y, mean, scale, shift, residual, ctx.act, ctx.slope,
                                               want_dres)
        grads = [None] * 3
        if any(need[:3]):
            if ctx.batch_stats:
                n = y.numel() // y.shape[1]
                coef_const = -scale * sum_dz / n
                coef_xmu = -scale * rstd * rstd * sum_dz_xmu / n
            else:
                coef_const = coef_xmu = torch.zeros_like(scale)
            dy = bn.bwd(grad_out, y, mean, scale, shift, residual, coef_xmu, coef_const, ctx.act, ctx.slope)
            grads = list(torch.ops.aten.convolution_backward(
                dy, x, w, [w.shape[0]] if ctx.has_bias else None, *ctx.geom, False, [0, 0], ctx.groups,
                [need[0], need[1], need[2] and ctx.has_bias]))
        gw_dtype, gb_dtype = ctx.param_dtypes
        d_gamma = (sum_dz_xmu * rstd).to(gw_dtype) if need[3] else None
        d_beta = sum_dz.to(gb_dtype) if need[4] else None
        return (*grads, d_gamma, d_beta, dz if want_dres else None) + (None,) * 9


# --- reference composite (backend "torch") -------------------------------------------------------
def _act_torch(z: Tensor, act: str, slope: float) -> Tensor:
    if act == "none":
        return z
    return _TORCH_ACTS[act](z, slope)


def conv_bn_act_torch(input, conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, geom,
                      groups, training, momentum, eps, act, slope, residual):
    y = F.conv2d(input, conv_weight, conv_bias, geom[0], geom[1], geom[2], groups)
    z = F.batch_norm(y, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps)
    if residual is not None:
        z = z + residual
    return _act_torch(z, act, slope)


# --- inference: folding and the fused kernel ---------------------------------------------------------
def fold(backend: str, conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, eps):
    """(W', b') with BN folded in: W' in conv_weight's dtype (for the Triton
    kernel laid out output-channel fastest), b' in fp32 (fp64 for fp64)."""
    sd = _bn.stat_dtype(conv_weight.dtype)
    s = torch.rsqrt(running_var.to(sd) + eps)
    if bn_weight is not None:
        s = s * bn_weight.to(sd)
    b = -running_mean.to(sd) if conv_bias is None else conv_bias.to(sd) - running_mean.to(sd)
    b = b * s
    if bn_bias is not None:
        b = b + bn_bias.to(sd)
    if backend == "triton":
        w = (conv_weight.to(sd).permute(2, 3, 1, 0) * s).to(conv_weight.dtype).contiguous().permute(3, 2, 0, 1)
    else:
        w = (conv_weight.to(sd) * s[:, None, None, None]).to(conv_weight.dtype)
    return w, b


def infer(backend: str, input, w, b, residual, geom, groups, act, slope) -> Tensor:
    """act(conv2d(input, w) + b + residual) with folded (w, b)."""
    if backend == "triton":
        return torch.ops.fastdl.conv_block_fwd_triton(input, w, b, residual, *geom, groups, act, slope)
    if act == "none" and residual is None:
        return torch.ops.aten.convolution(input, w, b.to(input.dtype), *geom, False, [0, 0], groups)
    # The fp32 bias rides in the epilogue pass, unrounded.
    y = torch.ops.aten.convolution(input, w, None, *geom, False, [0, 0], groups)
    return _bn_impl(backend, input.device).fwd(y, torch.zeros_like(b), torch.ones_like(b), b, residual, act, slope)


# --- checks and entry points -------------------------------------------------------------------------
def _pair(v, name: str, lo: int) -> List[int]:
    vals = [v, v] if isinstance(v, int) else list(v)
    if len(vals) != 2 or not all(isinstance(i, int) and i >= lo for i in vals):
        raise ValueError(f"fastdl: {name} must be an int or a pair of ints >= {lo}, got {v!r}")
    return vals


def _check_vec(t, name, input, cout, allow_fp32=True):
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"fastdl: {name} must be a Tensor or None, got {type(t).__name__}")
    if t.device != input.device:
        raise ValueError(f"fastdl: {name} must be on input's device ({input.device}), got {t.device}")
    if t.shape != (cout,):
        raise ValueError(f"fastdl: {name} must have shape [{cout}] (the output channels), got {list(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"fastdl: {name} must be a floating-point tensor, got {t.dtype}")


def check_args(input, conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, stride, padding,
               dilation, groups, training, act, residual):
    """Validates the call; returns (geom, act) with geom = (stride, padding,
    dilation) as int pairs and act a name of ACT_NAMES."""
    if not isinstance(input, Tensor):
        raise TypeError(f"fastdl: input must be a Tensor, got {type(input).__name__}")
    if input.dtype not in DTYPES:
        raise TypeError(f"fastdl: input must be float32, float16, bfloat16 or float64, got {input.dtype}")
    if input.dim() != 4:
        raise ValueError(f"fastdl: input must be 4-D (N, C, H, W), got shape {list(input.shape)}")
    if not isinstance(conv_weight, Tensor) or conv_weight.dim() != 4:
        raise ValueError("fastdl: conv_weight must be a 4-D Tensor (C_out, C_in / groups, kH, kW), got "
                         f"{list(conv_weight.shape) if isinstance(conv_weight, Tensor) else type(conv_weight).__name__}")
    if conv_weight.device != input.device:
        raise ValueError(f"fastdl: conv_weight must be on input's device ({input.device}), got {conv_weight.device}")
    if conv_weight.dtype != input.dtype:
        raise TypeError(f"fastdl: conv_weight must have input's dtype ({input.dtype}), got {conv_weight.dtype}")
    if not isinstance(groups, int) or groups < 1:
        raise ValueError(f"fastdl: groups must be a positive int, got {groups!r}")
    cin, cout = input.shape[1], conv_weight.shape[0]
    if cin % groups or cout % groups or conv_weight.shape[1] * groups != cin:
        raise ValueError(f"fastdl: groups ({groups}) must divide input channels ({cin}) and output channels "
                         f"({cout}), and conv_weight.shape[1] must be {cin // groups if cin % groups == 0 else '?'}, "
                         f"got conv_weight of shape {list(conv_weight.shape)}")
    stride, dilation = _pair(stride, "stride", 1), _pair(dilation, "dilation", 1)
    if isinstance(padding, str):
        if padding not in ("valid", "same"):
            raise ValueError(f"fastdl: padding must be 'valid', 'same', an int or a pair, got {padding!r}")
        if padding == "same":
            if stride != [1, 1]:
                raise ValueError("fastdl: padding='same' needs stride 1 (as torch), got stride {stride}")
            span = [d * (k - 1) for d, k in zip(dilation, conv_weight.shape[2:])]
            if any(s % 2 for s in span):
                raise ValueError("fastdl: padding='same' with an even dilated kernel span needs asymmetric "
                                 f"padding, which conv_bn_act does not do (kernel {list(conv_weight.shape[2:])})")
            padding = [s // 2 for s in span]
        else:
            padding = [0, 0]
    padding = _pair(padding, "padding", 0)
    oh = _out_size(input.shape[2], conv_weight.shape[2], stride[0], padding[0], dilation[0])
    ow = _out_size(input.shape[3], conv_weight.shape[3], stride[1], padding[1], dilation[1])
    if oh < 1 or ow < 1:
        raise ValueError(f"fastdl: the output would be empty ({oh}x{ow}): input {list(input.shape[2:])} is smaller "
                         f"than the dilated kernel {list(conv_weight.shape[2:])} with padding {padding}")
    _check_vec(conv_bias, "conv_bias", input, cout)
    if conv_bias is not None and conv_bias.dtype not in (input.dtype, torch.float32):
        raise TypeError(f"fastdl: conv_bias must be float32 or input's dtype ({input.dtype}), got {conv_bias.dtype}")
    for t, name in ((bn_weight, "bn_weight"), (bn_bias, "bn_bias"), (running_mean, "running_mean"),
                    (running_var, "running_var")):
        _check_vec(t, name, input, cout)
    if (running_mean is None) != (running_var is None):
        raise ValueError("fastdl: running_mean and running_var must both be given or both be None")
    if not training and running_mean is None:
        raise ValueError("fastdl: running_mean and running_var must be given when training=False")
    if training and input.shape[0] * oh * ow <= 1:
        raise ValueError(f"fastdl: expected more than 1 value per channel when training, got an output of "
                         f"{input.shape[0]}x{oh}x{ow} per channel")
    if residual is not None:
        out_shape = [input.shape[0], cout, oh, ow]
        if not isinstance(residual, Tensor) or list(residual.shape) != out_shape:
            raise ValueError(f"fastdl: residual must have the output's shape {out_shape}, got "
                             f"{list(residual.shape) if isinstance(residual, Tensor) else type(residual).__name__}")
        if residual.dtype != input.dtype or residual.device != input.device:
            raise TypeError(f"fastdl: residual must have input's dtype and device ({input.dtype}, {input.device}), "
                            f"got {residual.dtype}, {residual.device}")
    act = "none" if act is None else act
    if act not in ACT_NAMES:
        raise ValueError(f"fastdl: act must be None or one of {', '.join(ACT_NAMES)}; got {act!r}")
    return (stride, padding, dilation), act


def _unsupported(input: Tensor, out_pixels: int) -> dict:
    if input.dtype == torch.float64:
        return {"triton": "the Triton kernels compute in fp32 and take no float64 input"}
    if out_pixels >= 2**31 - 2**16:
        return {"triton": "the Triton convolution indexes output pixels (N*H_out*W_out) in int32"}
    return {}


def pick_backend(input: Tensor, conv_weight: Tensor, geom) -> str:
    oh, ow = (_out_size(input.shape[2 + i], conv_weight.shape[2 + i], geom[0][i], geom[1][i], geom[2][i])
              for i in (0, 1))
    return _backend.resolve(OP, input.device, _unsupported(input, input.shape[0] * oh * ow))


def _autocast(input, conv_weight, conv_bias, residual):
    # Under autocast the convolution runs in the autocast dtype, as F.conv2d
    # would; the BN parameters stay as they are (fp32), as F.batch_norm's do.
    dev = input.device.type
    if not torch.is_autocast_enabled(dev):
        return input, conv_weight, conv_bias, residual
    dt = torch.get_autocast_dtype(dev)
    cast = lambda t: t.to(dt) if t is not None and t.is_floating_point() else t  # noqa: E731
    return cast(input), cast(conv_weight), cast(conv_bias), cast(residual)


def needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def conv_bn_act(input, conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, stride=1,
                padding=0, dilation=1, groups=1, training=False, momentum=0.1, eps=1e-5, act="relu",
                residual=None, negative_slope=0.01, folded=None):
    """The functional entry point. `folded(backend) -> (W', b')` lets a module
    supply cached folded parameters for the inference path."""
    input, conv_weight, conv_bias, residual = _autocast(input, conv_weight, conv_bias, residual)
    geom, act = check_args(input, conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, stride,
                           padding, dilation, groups, training, act, residual)
    slope = float(negative_slope)
    backend = pick_backend(input, conv_weight, geom)
    if backend == "torch":
        return conv_bn_act_torch(input, conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var,
                                 geom, groups, training, momentum, eps, act, slope, residual)
    if not training and not needs_grad(input, conv_weight, conv_bias, bn_weight, bn_bias, residual):
        if folded is not None:
            w, b = folded(backend)
        else:
            w, b = fold(backend, conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, eps)
        return infer(backend, input, w, b, residual, geom, groups, act, slope)
    out, mean, var = ConvBNActFunction.apply(
        input, conv_weight, conv_bias, bn_weight, bn_bias, residual, running_mean, running_var, geom, groups,
        training, float(eps), act, slope, backend)
    if training and running_mean is not None:
        update_running_stats(running_mean, running_var, mean, var, momentum, out.numel() // out.shape[1])
    return out


def update_running_stats(running_mean, running_var, mean, var, momentum, n):
    """As torch: r = (1 - momentum) r + momentum s, the variance unbiased."""
    with torch.no_grad():
        running_mean.copy_(momentum * mean + (1 - momentum) * running_mean)
        running_var.copy_(momentum * var * (n / (n - 1)) + (1 - momentum) * running_var)
