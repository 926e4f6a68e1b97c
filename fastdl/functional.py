"""Public functions, mirroring torch.nn.functional signatures.

Each dispatches to the backend chosen for its op (see fastdl.set_backend) and
is differentiable through a torch.autograd.Function over registered ops, so
torch.compile(fullgraph=True) traces it without graph breaks.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from fastdl._ops import activation as _act
from fastdl._ops import batchnorm as _bn
from fastdl._ops import conv_block as _conv_block
from fastdl._ops import attention as _attn
from fastdl._ops import norm as _norm

__all__ = [
    "bias_act", "gelu", "relu", "leaky_relu", "silu", "sigmoid", "tanh",
    "geglu", "swiglu", "gated_act",
    "batch_norm",
    "conv_bn_act",
    "scaled_dot_product_attention", "flash_attention", "varlen_attention", "attention_dropout_mask",
    "layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm",
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


# --- norms ----------------------------------------------------------------------------
def layer_norm(input: Tensor, normalized_shape, weight: Optional[Tensor] = None,
               bias: Optional[Tensor] = None, eps: float = 1e-5) -> Tensor:
    """F.layer_norm. weight/bias may be input's dtype or float32; statistics in
    fp32, one rounding of the output to input's dtype."""
    return _norm.norm(input, None, normalized_shape, weight, bias, eps, rms=False)


def rms_norm(input: Tensor, normalized_shape, weight: Optional[Tensor] = None,
             eps: Optional[float] = None) -> Tensor:
    """F.rms_norm; eps None means torch.finfo(input.dtype).eps."""
    return _norm.norm(input, None, normalized_shape, weight, None, eps, rms=True)


def add_layer_norm(input: Tensor, residual: Tensor, normalized_shape, weight: Optional[Tensor] = None,
                   bias: Optional[Tensor] = None, eps: float = 1e-5) -> tuple[Tensor, Tensor]:
    """(layer_norm(s), s) with s = input + residual, in one pass: the add & norm
    of a pre-norm transformer block. s is rounded to input's dtype (as
    `input + residual` is) before it is normalized."""
    return _norm.norm(input, residual, normalized_shape, weight, bias, eps, rms=False)


def add_rms_norm(input: Tensor, residual: Tensor, normalized_shape, weight: Optional[Tensor] = None,
                 eps: Optional[float] = None) -> tuple[Tensor, Tensor]:
    """(rms_norm(s), s) with s = input + residual, in one pass (see add_layer_norm)."""
    return _norm.norm(input, residual, normalized_shape, weight, None, eps, rms=True)


# --- attention ------------------------------------------------------------------------
def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None,
                                 dropout_p: float = 0.0, is_causal: bool = False, scale: Optional[float] = None,
                                 enable_gqa: bool = False) -> Tensor:
    """torch.nn.functional.scaled_dot_product_attention: (..., H, L, E) layout,
    is_causal aligned top-left (query i sees keys j <= i), attn_mask bool
    (True = attend) or additive, broadcastable to (..., H, L, S). A query that
    sees no key outputs 0. Calls the kernels cannot serve (value head dim !=
    E, E not a multiple of 8 up to 256, float64, a mask that requires grad) run
    the "torch" backend (auto warns once; an explicit backend raises)."""
    return _attn.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale,
                                              enable_gqa)


def flash_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = False, scale: Optional[float] = None,
                    dropout_p: float = 0.0, deterministic: bool = False, return_lse: bool = False):
    """Attention on q (B, Hq, Nq, D), k/v (B, Hkv, Nk, D) with Hq % Hkv == 0 (GQA/MQA),
    D a multiple of 8 up to 256. causal aligns bottom-right: query i sees keys
    j <= i + Nk - Nq (the last query sees all keys, as in KV-cache decoding;
    the same as top-left when Nq == Nk). deterministic=True (also implied by
    torch.use_deterministic_algorithms) gives bitwise reproducible gradients:
    dQ from a separate pass instead of fp32 atomics, two more matmuls of the
    seven in the backward. return_lse: also return the fp32 log-sum-exp of the
    scaled scores, (B, Hq, Nq), detached. fp32 inputs are computed in fp32
    (TF32 only if torch.backends.cuda.matmul.allow_tf32)."""
    return _attn.flash_attention(q, k, v, causal, scale, dropout_p, deterministic, return_lse)


def varlen_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                     max_seqlen_q: int, max_seqlen_k: int, causal: bool = False, scale: Optional[float] = None,
                     deterministic: bool = False) -> Tensor:
    """Attention over packed sequences: q (Tq, Hq, D), k/v (Tk, Hkv, D); sequence
    b holds rows cu_seqlens[b]:cu_seqlens[b + 1] (int32, B + 1 offsets from 0).
    No padding is computed or stored, forward or backward. causal aligns
    bottom-right within each sequence."""
    return _attn.varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
                                  scale, deterministic)


def attention_dropout_mask(batch: int, heads: int, seqlen_q: int, seqlen_k: int, dropout_p: float,
                           device="cpu") -> Tensor:
    """Debugging aid: the bool keep mask (batch, heads, seqlen_q, seqlen_k) that
    the Triton attention kernels would draw if called now with dropout_p (it
    replays their seed draw from torch's generator of `device`)."""
    return _attn.dropout_mask(batch, heads, seqlen_q, seqlen_k, dropout_p, device)


# --- batch norm -------------------------------------------------------------------------
def batch_norm(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
               weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, training: bool = False,
               momentum: float = 0.1, eps: float = 1e-5, act: Optional[str] = None,
               residual: Optional[Tensor] = None, negative_slope: float = 0.01) -> Tensor:
    """act(F.batch_norm(input, ...) + residual) in one pass over the data.

    Same semantics as F.batch_norm (channel = dim 1; biased variance to
    normalize, unbiased for running_var; running stats updated in place only
    when training and given; eval normalizes with them). act: None or a
    bias_act name; residual: input's shape and dtype, added before act.
    weight, bias and running stats may be float32 or input's dtype; statistics
    and math in fp32, one rounding to input's dtype. NCHW and channels_last
    inputs are read in place, and the output keeps input's layout.
    """
    return _bn.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps, act,
                          negative_slope, residual)


# --- conv + batch norm + activation -----------------------------------------------------
def conv_bn_act(input: Tensor, conv_weight: Tensor, conv_bias: Optional[Tensor], bn_weight: Optional[Tensor],
                bn_bias: Optional[Tensor], running_mean: Optional[Tensor], running_var: Optional[Tensor],
                stride=1, padding=0, dilation=1, groups: int = 1, training: bool = False, momentum: float = 0.1,
                eps: float = 1e-5, act: Optional[str] = "relu", residual: Optional[Tensor] = None,
                negative_slope: float = 0.01) -> Tensor:
    """act(batch_norm(conv2d(input, conv_weight, conv_bias)) + residual).

    Arguments as F.conv2d and F.batch_norm (training: batch statistics, and
    the running ones updated in place with `momentum` when given; else the
    running statistics, folded into the convolution). act: None/"none",
    gelu, gelu_tanh, relu, leaky_relu (negative_slope), silu, sigmoid, tanh.
    channels_last input gives channels_last output, NCHW gives NCHW. fp16/bf16
    accumulate in fp32; fp32 uses tf32 when torch.backends.cudnn.allow_tf32
    is set (as cuDNN does). Under autocast the convolution runs in the
    autocast dtype."""
    return _conv_block.conv_bn_act(input, conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var,
                                   stride, padding, dilation, groups, training, momentum, eps, act, residual,
                                   negative_slope)
