"""Attention: flash-style (FlashAttention-2 schedule), forward and backward.

Ops:
  fastdl::flash_attn_fwd / flash_attn_bwd   CUDA C++ (csrc/attention.cu): dense (B, H, N, D),
        fp16/bf16, D in {64, 128}, bottom-right causal, GQA; no masks, dropout or varlen
  fastdl::attention_fwd_triton / _bwd_triton Triton (kernels/attention.py): everything
        below (masks, dropout, varlen, both causal alignments, D = 8..256 in steps of 8,
        fp16/bf16/fp32)
  backend "torch": a plain PyTorch composite (O(N^2) memory), the reference.

Causal alignment: "top_left" (torch SDPA's is_causal: query i sees keys j <= i)
and "bottom_right" (flash_attention / varlen_attention: j <= i + Nk - Nq, the
last query sees every key, as KV-cache decoding needs). They agree when
Nq == Nk. A query that sees no key outputs 0 (lse = -inf).

lse (natural-log log-sum-exp of the scaled, masked scores, fp32) is returned
detached: no gradient flows through it, as in FlashAttention.

Dropout draws a 64-bit seed from torch's generator of the device (so
torch.manual_seed makes it reproducible); the Triton kernels derive the mask
from the seed with Philox and regenerate it in the backward. `dropout_mask`
replays the draw and returns the mask (for tests and debugging). The "torch"
backend uses torch's own dropout: its masks differ from the kernels'.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from fastdl import _backend

OP = "attention"
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_HEAD_DIM = 256

_backend.register_op(
    OP, native_op="fastdl::flash_attn_fwd", has_triton=True, auto_cuda=("triton", "cuda"),
    auto_why="Triton first until the CUDA kernel is measured against it; CUDA serves "
             "fp16/bf16 D 64/128 without masks, dropout or varlen")

_HAS_NATIVE = _backend._C is not None and hasattr(torch.ops.fastdl, "flash_attn_fwd")


# --- fake kernels (shapes only) -----------------------------------------------------------
# The CUDA ops return contiguous tensors; the Triton ops follow q's layout
# (torch.empty_like of q once its last dim is contiguous).
def _fake_flash_fwd(q, k, v, scale, causal):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


def _fake_flash_bwd(grad_out, q, k, v, out, lse, scale, causal):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


if _HAS_NATIVE:
    torch.library.register_fake("fastdl::flash_attn_fwd")(_fake_flash_fwd)
    torch.library.register_fake("fastdl::flash_attn_bwd")(_fake_flash_bwd)


def _dense_last(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _lse_shape(q: Tensor, varlen: bool):
    return (q.shape[1], q.shape[0]) if varlen else tuple(q.shape[:3])


# --- Triton ops ---------------------------------------------------------------------------
def _triton():
    return _backend.load_kernels("attention")


@torch.library.custom_op("fastdl::attention_fwd_triton", mutates_args=())
def attention_fwd_triton(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor],
                         cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor],
                         max_seqlen_q: int, max_seqlen_k: int, scale: float, causal: str,
                         dropout_p: float, seed: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """Dense q (B, Hq, Nq, D) or packed q (Tq, Hq, D) with cu_seqlens; returns
    (out like q, lse fp32 (B, Hq, Nq) or (Hq, Tq)). max_seqlen_* are read in varlen only."""
    return _triton().attention_forward(q, k, v, attn_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                       max_seqlen_k, scale, causal, dropout_p, seed)


@attention_fwd_triton.register_fake
def _(q, k, v, attn_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, causal,
      dropout_p, seed):
    return (torch.empty_like(_dense_last(q)),
            q.new_empty(_lse_shape(q, cu_seqlens_q is not None), dtype=torch.float32))


@torch.library.custom_op("fastdl::attention_bwd_triton", mutates_args=())
def attention_bwd_triton(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                         attn_mask: Optional[Tensor], cu_seqlens_q: Optional[Tensor],
                         cu_seqlens_k: Optional[Tensor], max_seqlen_q: int, max_seqlen_k: int,
                         scale: float, causal: str, dropout_p: float, seed: Optional[Tensor],
                         deterministic: bool) -> tuple[Tensor, Tensor, Tensor]:
    return _triton().attention_backward(grad_out, q, k, v, out, lse, attn_mask, cu_seqlens_q, cu_seqlens_k,
                                        max_seqlen_q, max_seqlen_k, scale, causal, dropout_p, seed,
                                        deterministic)


@attention_bwd_triton.register_fake
def _(grad_out, q, k, v, out, lse, attn_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
      scale, causal, dropout_p, seed, deterministic):
    return (torch.empty_like(_dense_last(q)), torch.empty_like(_dense_last(k)),
            torch.empty_like(_dense_last(v)))


# --- reference composite (backend "torch") ------------------------------------------------
def _hidden_by_causal(nq: int, nk: int, causal: str, device) -> Tensor:
    shift = nk - nq if causal == "bottom_right" else 0
    i = torch.arange(nq, device=device)[:, None]
    j = torch.arange(nk, device=device)[None, :]
    return j > i + shift


def attention_torch(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], causal: str,
                    scale: float, dropout_p: float) -> tuple[Tensor, Tensor]:
    """Dense (B, Hq, Nq, D) attention in fp32 (fp64 for fp64), one rounding
    to q's dtype. Returns (out, lse)."""
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    group = q.shape[1] // k.shape[1]
    k, v = k.to(ct), v.to(ct)
    if group > 1:
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = q.to(ct) @ k.transpose(-1, -2) * scale
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, -math.inf) if attn_mask.dtype == torch.bool else s + attn_mask.to(ct)
    if causal != "none":
        s = s.masked_fill(_hidden_by_causal(s.shape[-2], s.shape[-1], causal, s.device), -math.inf)
    # Softmax with rows that see no key giving 0 (not NaN) in value and gradient:
    # the max is a constant shift (detached), a row of -inf has e = 0, l = 0.
    m = s.detach().amax(-1, keepdim=True) if s.shape[-1] else s.new_zeros((*s.shape[:-1], 1))
    m = torch.where(m == -math.inf, 0.0, m)
    e = torch.exp(s - m)
    l = e.sum(-1, keepdim=True)
    p = e / torch.where(l == 0, 1.0, l)
    lse = (m + torch.log(l)).squeeze(-1).detach()
    if dropout_p > 0:
        p = torch.nn.functional.dropout(p, dropout_p)
    return (p @ v).to(q.dtype), lse


def varlen_attention_torch(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, scale, dropout_p):
    """Packed (T, H, D) attention, one sequence at a time through attention_torch."""
    outs, lses = [], []
    bounds = zip(cu_seqlens_q.tolist()[:-1], cu_seqlens_q.tolist()[1:],
                 cu_seqlens_k.tolist()[:-1], cu_seqlens_k.tolist()[1:])
    for q0, q1, k0, k1 in bounds:
        o, lse = attention_torch(q[q0:q1].transpose(0, 1)[None], k[k0:k1].transpose(0, 1)[None],
                                 v[k0:k1].transpose(0, 1)[None], None, causal, scale, dropout_p)
        outs.append(o[0].transpose(0, 1))
        lses.append(lse[0])
    return torch.cat(outs), torch.cat(lses, dim=1)


# --- autograd over the registered ops -----------------------------------------------------
def _fwd_op(backend, q, k, v, attn_mask, cu_q, cu_k, max_q, max_k, scale, causal, dropout_p, seed):
    if backend == "cuda":
        return torch.ops.fastdl.flash_attn_fwd(q, k, v, scale, causal != "none")
    return torch.ops.fastdl.attention_fwd_triton(q, k, v, attn_mask, cu_q, cu_k, max_q, max_k, scale, causal,
                                                 dropout_p, seed)


class AttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, attn_mask, cu_q, cu_k, max_q, max_k, scale, causal, dropout_p, seed,
                deterministic, backend):
        out, lse = _fwd_op(backend, q, k, v, attn_mask, cu_q, cu_k, max_q, max_k, scale, causal, dropout_p,
                           seed)
        ctx.save_for_backward(q, k, v, out, lse, attn_mask, cu_q, cu_k, seed)
        ctx.args = (max_q, max_k, scale, causal, dropout_p, deterministic, backend)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse, attn_mask, cu_q, cu_k, seed = ctx.saved_tensors
        max_q, max_k, scale, causal, dropout_p, deterministic, backend = ctx.args
        if backend == "cuda":  # its backward is deterministic (a separate dQ pass)
            grad_out = _dense_last(grad_out)  # e.g. the stride-0 gradient of out.sum()
            dq, dk, dv = torch.ops.fastdl.flash_attn_bwd(grad_out, q, k, v, out, lse, scale, causal != "none")
        else:
            dq, dk, dv = torch.ops.fastdl.attention_bwd_triton(
                grad_out, q, k, v, out, lse, attn_mask, cu_q, cu_k, max_q, max_k, scale, causal, dropout_p,
                seed, deterministic)
        return dq, dk, dv, None, None, None, None, None, None, None, None, None, None, None


# --- checks -------------------------------------------------------------------------------
def _check_tensors(names: str, *tensors: Tensor) -> None:
    """names: e.g. "q k v", one per tensor; the first sets dtype and device."""
    names = names.split()
    together = f"{', '.join(names[:-1])} and {names[-1]}"
    for name, t in zip(names, tensors):
        if not isinstance(t, Tensor):
            raise TypeError(f"fastdl: {name} must be a Tensor, got {type(t).__name__}")
    q = tensors[0]
    if q.dtype not in DTYPES:
        raise TypeError(f"fastdl: {names[0]} must be float16, bfloat16, float32 or float64, got {q.dtype}")
    for name, t in zip(names[1:], tensors[1:]):
        if t.dtype != q.dtype:
            raise TypeError(f"fastdl: {together} must have the same dtype, got {name} {t.dtype} "
                            f"and {names[0]} {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"fastdl: {together} must be on the same device, got {name} on {t.device} "
                             f"and {names[0]} on {q.device}")


def _check_head_dim(d: int, name: str = "q") -> None:
    if d % 8 or not 8 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"fastdl: head dim ({name}.shape[-1]) must be a multiple of 8 from 8 to "
                         f"{MAX_HEAD_DIM}, got {d}")


def _check_dropout(dropout_p: float) -> None:
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"fastdl: dropout_p must be in [0, 1), got {dropout_p}")


def _check_groups(hq: int, hkv: int) -> None:
    if hkv == 0 or hq % hkv:
        raise ValueError(f"fastdl: the number of q heads ({hq}) must be a multiple of the number of "
                         f"k/v heads ({hkv})")


def _unsupported(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], varlen: bool, causal: str,
                 dropout_p: float) -> dict:
    """Backends that cannot serve this call, and why (see _backend.resolve)."""
    why = {}
    d, dv = q.shape[-1], v.shape[-1]
    triton = []
    if q.dtype == torch.float64:
        triton.append("float64 input (the kernels take fp16, bf16, fp32)")
    if q.dtype == torch.bfloat16 and q.device.type == "cpu":
        triton.append("bfloat16 on CPU (the Triton interpreter's tl.dot is wrong for bf16)")
    if d != dv:
        triton.append(f"value head dim {dv} differs from the query's {d}")
    if d % 8 or d > MAX_HEAD_DIM:
        triton.append(f"head dim {d} (supported: multiples of 8 up to {MAX_HEAD_DIM})")
    if attn_mask is not None and attn_mask.requires_grad:
        triton.append("a gradient w.r.t. attn_mask")
    if triton:
        why["triton"] = "; ".join(triton)
    cuda = list(triton)
    if q.dtype not in (torch.float16, torch.bfloat16):
        cuda.append(f"{q.dtype} input (the CUDA kernels take fp16 and bf16)")
    if d not in (64, 128):
        cuda.append(f"head dim {d} (the CUDA kernels are built for 64 and 128)")
    if attn_mask is not None:
        cuda.append("attn_mask")
    if dropout_p > 0:
        cuda.append("dropout")
    if varlen:
        cuda.append("varlen")
    if causal == "top_left" and q.shape[-2] != k.shape[-2]:
        cuda.append("top-left causal alignment with Nq != Nk (the CUDA kernels align bottom-right)")
    if cuda:
        why["cuda"] = "; ".join(dict.fromkeys(cuda))
    return why


def _draw_seed(device: torch.device) -> Tensor:
    """The 64-bit dropout seed, drawn from torch's generator of `device`."""
    return torch.randint(0, 2**62, (), device=device, dtype=torch.int64)


# --- entry points -------------------------------------------------------------------------
def attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor] = None, causal: str = "none",
              scale: Optional[float] = None, dropout_p: float = 0.0, deterministic: bool = False
              ) -> tuple[Tensor, Tensor]:
    """(out, lse) of dense (B, Hq, Nq, D) attention; k, v (B, Hkv, Nk, D), Hq % Hkv == 0;
    scale None means 1 / sqrt(D). Shapes are the caller's to check.

    attn_mask: bool (True = attend) or additive float (q's dtype or fp32), a
    (B, Hq, Nq, Nk) tensor or a stride-0 expanded view of one.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    deterministic = deterministic or torch.are_deterministic_algorithms_enabled()
    backend = _backend.resolve(OP, q.device, _unsupported(q, k, v, attn_mask, False, causal, dropout_p))
    if backend == "torch":
        return attention_torch(q, k, v, attn_mask, causal, scale, dropout_p)
    seed = _draw_seed(q.device) if dropout_p > 0 else None
    return AttentionFunction.apply(q, k, v, attn_mask, None, None, 0, 0, scale, causal, float(dropout_p), seed,
                                   deterministic, backend)


def _expand_mask(attn_mask: Optional[Tensor], q: Tensor, nk: int, name: str = "attn_mask") -> Optional[Tensor]:
    """attn_mask broadcast to (*q.shape[:-1], Nk), checked."""
    if attn_mask is None:
        return None
    if not isinstance(attn_mask, Tensor):
        raise TypeError(f"fastdl: {name} must be a Tensor or None, got {type(attn_mask).__name__}")
    if attn_mask.dtype != torch.bool and attn_mask.dtype not in (q.dtype, torch.float32):
        raise TypeError(f"fastdl: {name} must be bool or float ({q.dtype} or float32), got {attn_mask.dtype}")
    if attn_mask.device != q.device:
        raise ValueError(f"fastdl: {name} must be on the query's device ({q.device}), got {attn_mask.device}")
    target = (*q.shape[:-1], nk)
    try:
        return attn_mask.expand(target)
    except RuntimeError:
        raise ValueError(f"fastdl: {name} of shape {list(attn_mask.shape)} does not broadcast to "
                         f"(..., Hq, Nq, Nk) = {list(target)}") from None


def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None,
                                 dropout_p: float = 0.0, is_causal: bool = False, scale: Optional[float] = None,
                                 enable_gqa: bool = False) -> Tensor:
    _check_tensors("query key value", query, key, value)
    _check_dropout(dropout_p)
    if query.dim() < 3 or key.dim() != query.dim() or value.dim() != query.dim():
        raise ValueError(f"fastdl: query, key and value must have the same number of dims (at least 3: "
                         f"(..., H, L, E)), got {query.dim()}, {key.dim()}, {value.dim()}")
    if key.shape[:-3] != query.shape[:-3] or value.shape[:-3] != query.shape[:-3]:
        raise ValueError(f"fastdl: query, key and value must have the same batch dims, got "
                         f"{list(query.shape)}, {list(key.shape)}, {list(value.shape)}")
    if key.shape[-1] != query.shape[-1] or key.shape[-3:-1] != value.shape[-3:-1]:
        raise ValueError(f"fastdl: key must be (..., H, S, E) with E = query's {query.shape[-1]} and value "
                         f"(..., H, S, Ev); got key {list(key.shape)}, value {list(value.shape)}")
    hq, hkv = query.shape[-3], key.shape[-3]
    if hq != hkv and not enable_gqa:
        raise ValueError(f"fastdl: query has {hq} heads and key/value {hkv}: pass enable_gqa=True for "
                         f"grouped-query attention")
    _check_groups(hq, hkv)
    if is_causal and attn_mask is not None:
        raise ValueError("fastdl: pass either attn_mask or is_causal=True, not both (as torch's SDPA)")
    mask = _expand_mask(attn_mask, query, key.shape[-2])
    batch = query.shape[:-3]
    flat = lambda t: t.reshape(-1, *t.shape[-3:])  # noqa: E731  (views for the usual 4-D input)
    q, k, v = flat(query), flat(key), flat(value)
    out, _ = attention(q, k, v, flat(mask) if mask is not None else None,
                       "top_left" if is_causal else "none", scale, dropout_p)
    return out.reshape(*batch, *out.shape[-3:])


def _check_dense(q: Tensor, k: Tensor, v: Tensor) -> None:
    _check_tensors("q k v", q, k, v)
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"fastdl: q, k and v must be 4-D (B, H, N, D), got shapes {list(q.shape)}, "
                         f"{list(k.shape)}, {list(v.shape)}")
    if k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3]:
        raise ValueError(f"fastdl: k and v must have shape (B, Hkv, Nk, D) = (B, Hkv, Nk, {q.shape[3]}) with "
                         f"B = {q.shape[0]}, got k {list(k.shape)}, v {list(v.shape)}")
    _check_head_dim(q.shape[-1])
    _check_groups(q.shape[1], k.shape[1])


def flash_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = False, scale: Optional[float] = None,
                    dropout_p: float = 0.0, deterministic: bool = False, return_lse: bool = False):
    _check_dense(q, k, v)
    _check_dropout(dropout_p)
    out, lse = attention(q, k, v, None, "bottom_right" if causal else "none", scale, dropout_p, deterministic)
    return (out, lse) if return_lse else out


def _check_cu(name: str, cu: Tensor, q: Tensor) -> None:
    if not isinstance(cu, Tensor) or cu.dim() != 1 or cu.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"fastdl: {name} must be a 1-D int32 (or int64) tensor (B + 1 offsets), got "
                        f"{cu.dtype if isinstance(cu, Tensor) else type(cu).__name__}"
                        f"{'' if not isinstance(cu, Tensor) else ' of shape ' + str(list(cu.shape))}")
    if cu.device != q.device:
        raise ValueError(f"fastdl: {name} must be on q's device ({q.device}), got {cu.device}")


def _check_varlen_lengths(name: str, cu: Tensor, total: int, max_seqlen: int) -> None:
    """Offsets start at 0, never decrease, end at the token count; the longest
    sequence fits max_seqlen (a shorter max_seqlen would silently skip rows)."""
    offsets = cu.tolist()
    lengths = [b - a for a, b in zip(offsets[:-1], offsets[1:])]
    if offsets[0] != 0 or offsets[-1] != total or min(lengths, default=0) < 0:
        raise ValueError(f"fastdl: {name} must rise from 0 to the token count {total}, got {offsets}")
    if max(lengths, default=0) > max_seqlen:
        raise ValueError(f"fastdl: max_seqlen for {name} is {max_seqlen} but a sequence has "
                         f"{max(lengths)} tokens")


def varlen_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                     max_seqlen_q: int, max_seqlen_k: int, causal: bool = False, scale: Optional[float] = None,
                     deterministic: bool = False) -> Tensor:
    _check_tensors("q k v", q, k, v)
    if q.dim() != 3 or k.dim() != 3 or k.shape != v.shape or k.shape[2] != q.shape[2]:
        raise ValueError(f"fastdl: q must be (Tq, Hq, D), k and v (Tk, Hkv, D) with the same D, got "
                         f"{list(q.shape)}, {list(k.shape)}, {list(v.shape)}")
    _check_head_dim(q.shape[-1])
    _check_groups(q.shape[1], k.shape[1])
    _check_cu("cu_seqlens_q", cu_seqlens_q, q)
    _check_cu("cu_seqlens_k", cu_seqlens_k, q)
    if cu_seqlens_q.shape != cu_seqlens_k.shape or cu_seqlens_q.numel() < 1:
        raise ValueError(f"fastdl: cu_seqlens_q and cu_seqlens_k must both hold B + 1 offsets, got "
                         f"{cu_seqlens_q.numel()} and {cu_seqlens_k.numel()}")
    if not torch.compiler.is_compiling():  # reading the offsets syncs; checked in eager only
        _check_varlen_lengths("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q)
        _check_varlen_lengths("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k)
    # The kernels index tokens with int32 offsets read from cu_seqlens.
    if max(q.shape[0], k.shape[0]) >= 2**31:
        raise ValueError(f"fastdl: varlen_attention takes fewer than 2^31 tokens, got {q.shape[0]} and {k.shape[0]}")
    cu_seqlens_q, cu_seqlens_k = cu_seqlens_q.to(torch.int32), cu_seqlens_k.to(torch.int32)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    causal_mode = "bottom_right" if causal else "none"
    deterministic = deterministic or torch.are_deterministic_algorithms_enabled()
    backend = _backend.resolve(OP, q.device, _unsupported(q, k, v, None, True, causal_mode, 0.0))
    if backend == "torch":
        return varlen_attention_torch(q, k, v, cu_seqlens_q, cu_seqlens_k, causal_mode, scale, 0.0)[0]
    out, _ = AttentionFunction.apply(q, k, v, None, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q),
                                     int(max_seqlen_k), scale, causal_mode, 0.0, None, deterministic, backend)
    return out


def dropout_mask(batch: int, heads: int, seqlen_q: int, seqlen_k: int, dropout_p: float,
                 device="cpu") -> Tensor:
    """The keep mask (batch, heads, seqlen_q, seqlen_k), bool, that the Triton
    kernels apply when called now with these sizes: it draws the seed as they
    do, so after the same torch.manual_seed it replays their mask. The kept
    probabilities are scaled by 1 / (1 - dropout_p)."""
    _check_dropout(dropout_p)
    return _triton().dropout_mask(_draw_seed(torch.device(device)), batch, heads, seqlen_q, seqlen_k, dropout_p)
