"""Triton kernels for the activation family: y = act(x + bias) and the gated
y = act(a) * b with a, b = x.chunk(2, -1), forward and backward.

Elementwise and memory-bound: one program handles BLOCK contiguous elements,
math in fp32, offsets in int64 so tensors past 2^31 elements index correctly.
The activation is a compile-time constant (ACT), one specialization each.

ACT ids (fastdl/_ops/activation.py owns the name -> id table):
  0 gelu, 1 gelu_tanh, 2 relu, 3 leaky_relu, 4 silu, 5 sigmoid, 6 tanh
"""
import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _tanh(x):
    # libdevice tanh is unavailable under TRITON_INTERPRET; build it from exp.
    # (1 - e) / (1 + e) with e = exp(-2|x|) never overflows but cancels for
    # small |x|, where the odd Taylor series to x^7 is exact to fp32 (|x| < 0.2:
    # next term 62/2835 x^9 is below 2^-24 relative).
    ax = tl.abs(x)
    e = tl.exp(-2.0 * ax)
    big = (1.0 - e) / (1.0 + e)
    x2 = x * x
    small = ax * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0))))
    t = tl.where(ax < 0.2, small, big)
    return tl.where(x < 0, -t, t)


@triton.jit
def _act_fwd(x, slope, ACT: tl.constexpr):
    if ACT == 0:  # gelu: x Phi(x)
        y = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    elif ACT == 1:  # gelu_tanh
        y = 0.5 * x * (1.0 + _tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))
    elif ACT == 2:  # relu; x < 0 ? 0 : x keeps NaN
        y = tl.where(x < 0, 0.0, x)
    elif ACT == 3:  # leaky_relu
        y = tl.where(x > 0, x, x * slope)
    elif ACT == 4:  # silu
        y = x * tl.sigmoid(x)
    elif ACT == 5:  # sigmoid
        y = tl.sigmoid(x)
    else:  # tanh
        y = _tanh(x)
    return y


@triton.jit
def _act_grad(x, slope, ACT: tl.constexpr):
    """f'(x); the formulas are derived next to the C++ functors in csrc/activation.h."""
    if ACT == 0:
        cdf = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))
        d = cdf + x * tl.exp(-0.5 * x * x) * 0.3989422804014327
    elif ACT == 1:
        t = _tanh(0.7978845608028654 * (x + 0.044715 * x * x * x))
        d = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * x * x)
    elif ACT == 2:
        d = tl.where(x > 0, 1.0, 0.0)
    elif ACT == 3:
        d = tl.where(x > 0, 1.0, slope)
    elif ACT == 4:
        s = tl.sigmoid(x)
        d = s * (1.0 + x * (1.0 - s))
    elif ACT == 5:
        s = tl.sigmoid(x)
        d = s * (1.0 - s)
    else:
        t = _tanh(x)
        d = 1.0 - t * t
    return d


@triton.jit
def _bias_act_fwd_kernel(
    x_ptr,  # (numel,) input, contiguous
    bias_ptr,  # (cols,) or unused when HAS_BIAS is False
    y_ptr,  # (numel,) output
    numel,
    cols,  # bias length = last dim of x
    slope,
    ACT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        x += tl.load(bias_ptr + offs % cols, mask=mask, other=0.0).to(tl.float32)
    y = _act_fwd(x, slope, ACT)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bias_act_bwd_kernel(
    g_ptr,  # (numel,) grad of the output
    x_ptr,  # (numel,) saved input
    bias_ptr,  # (cols,)
    dx_ptr,  # (numel,) grad of the input (= grad of x + bias)
    numel,
    cols,
    slope,
    ACT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        x += tl.load(bias_ptr + offs % cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(dx_ptr + offs, (g * _act_grad(x, slope, ACT)).to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _glu_fwd_kernel(
    x_ptr,  # (rows, 2h)
    y_ptr,  # (rows, h)
    numel_out,  # rows * h
    h,
    slope,
    ACT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel_out
    row = offs // h
    a_offs = offs + row * h  # row * 2h + col
    a = tl.load(x_ptr + a_offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(x_ptr + a_offs + h, mask=mask, other=0.0).to(tl.float32)
    y = _act_fwd(a, slope, ACT) * b
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _glu_bwd_kernel(
    g_ptr,  # (rows, h)
    x_ptr,  # (rows, 2h)
    dx_ptr,  # (rows, 2h)
    numel_out,
    h,
    slope,
    ACT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # y = f(a) b  =>  da = g b f'(a),  db = g f(a)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel_out
    row = offs // h
    a_offs = offs + row * h
    a = tl.load(x_ptr + a_offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(x_ptr + a_offs + h, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dt = dx_ptr.dtype.element_ty
    tl.store(dx_ptr + a_offs, (g * b * _act_grad(a, slope, ACT)).to(dt), mask=mask)
    tl.store(dx_ptr + a_offs + h, (g * _act_fwd(a, slope, ACT)).to(dt), mask=mask)


def _grid(n):
    return (triton.cdiv(n, BLOCK),)


def _layout(x: torch.Tensor, bias, g=None):
    """(x, g, out) lined up element for element in memory. Without a bias the
    op is elementwise: dense layouts (channels_last, ...) are kept, as in
    csrc/activation.h's as_layout_of. With a bias, all contiguous."""
    out = torch.empty_like(x) if bias is None else torch.empty(x.shape, dtype=x.dtype, device=x.device)

    def like_out(t):  # same sizes and strides as the dense out: same memory layout
        return t if t.stride() == out.stride() else torch.empty_like(out).copy_(t)
    return like_out(x), (like_out(g) if g is not None else None), out


def bias_act_forward(x: torch.Tensor, bias, act: int, slope: float) -> torch.Tensor:
    x, _, y = _layout(x, bias)
    if x.numel():
        b = bias.contiguous() if bias is not None else x
        _bias_act_fwd_kernel[_grid(x.numel())](
            x, b, y, x.numel(), x.shape[-1], slope, ACT=act, HAS_BIAS=bias is not None, BLOCK=BLOCK)
    return y


def bias_act_backward(g: torch.Tensor, x: torch.Tensor, bias, act: int, slope: float) -> torch.Tensor:
    x, g, dx = _layout(x, bias, g)
    if x.numel():
        b = bias.contiguous() if bias is not None else x
        _bias_act_bwd_kernel[_grid(x.numel())](
            g, x, b, dx, x.numel(), x.shape[-1], slope, ACT=act, HAS_BIAS=bias is not None, BLOCK=BLOCK)
    return dx


def glu_forward(x: torch.Tensor, act: int, slope: float) -> torch.Tensor:
    x = x.contiguous()
    h = x.shape[-1] // 2
    y = x.new_empty(*x.shape[:-1], h)
    if y.numel():
        _glu_fwd_kernel[_grid(y.numel())](x, y, y.numel(), h, slope, ACT=act, BLOCK=BLOCK)
    return y


def glu_backward(g: torch.Tensor, x: torch.Tensor, act: int, slope: float) -> torch.Tensor:
    x, g = x.contiguous(), g.contiguous()
    dx = torch.empty_like(x)
    if g.numel():
        _glu_bwd_kernel[_grid(g.numel())](g, x, dx, g.numel(), x.shape[-1] // 2, slope, ACT=act, BLOCK=BLOCK)
    return dx
