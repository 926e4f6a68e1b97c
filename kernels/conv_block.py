"""Triton kernels of the conv block: a 2-D convolution computed as an implicit
GEMM, with its epilogue fused.

The GEMM: rows m = (n, oh, ow) are output pixels (M = N * OH * OW), columns
are the output channels of one group, and the reduction runs over
k = (kh, kw, ci), the input channels of the group under each filter tap. The
A tile is gathered straight from the input (no im2col buffer): for a tap
(kh, kw) the pixel rows read x[n, ci, oh*SH - PH + kh*DH, ow*SW - PW + kw*DW],
zero outside the image. With channels_last input a row of the A tile is a run
of contiguous channels; with a weight whose output channel is its fastest dim
a row of the B tile is too. Inputs in other layouts index correctly through
their strides, only slower. Products accumulate in fp32 (tf32 for fp32
operands when INPUT_PRECISION says so).

Two ways to walk k:
  per tap   (FLAT_K False) loop over taps, then over BLOCK_K channels of the
            group: the A addresses of a tap are one base per pixel.
  flat      (FLAT_K True) k runs over all KH*KW*CIN_G at once, decoded per
            element: for few input channels (the RGB stem: 3 channels x 49
            taps = 147) this wastes no lanes on padding channels to 16.

Depthwise convolutions (one input channel per group) have no reduction worth
a tensor-core tile; `_conv_block_dw_kernel` does them as per-channel FMAs.

Epilogue (`_epilogue`), in fp32 before the one rounding to the output dtype:
  inference  out = act(acc + bias + residual)   (BN already folded into the
             weights and bias by the caller)
  training   out = acc + bias, and per program and output channel the count,
             mean and centered sum of squares (M2) of the rounded outputs of
             its BLOCK_M rows. The caller merges the per-tile partials in
             fixed order (Chan et al.: M2 = sum M2_t + sum n_t (mean_t -
             mean)^2), so the statistics are deterministic, never read the
             output again, and do not cancel when |mean| >> std as
             sum(x^2)/n - mean^2 would.

ACT ids are those of kernels/activation.py (fastdl/_ops/activation.py owns the
table); -1 is no activation.
"""
import os

import torch
import triton
import triton.language as tl

from . import AUTOTUNE
from .activation import _act_fwd

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _epilogue(
    acc, mask_m, n, oh, ow, co, mask_n, pid_m, M, COUT,
    bias_ptr, res_ptr, out_ptr, pmean_ptr, pm2_ptr,
    stride_on, stride_oc, stride_oh, stride_ow,
    stride_rn, stride_rc, stride_rh, stride_rw,
    slope,
    ACT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, STATS: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    mask = mask_m[:, None] & mask_n[None, :]
    co64 = co.to(tl.int64)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + co, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if HAS_RES:
        r_off = (n * stride_rn + oh.to(tl.int64) * stride_rh + ow.to(tl.int64) * stride_rw)[:, None]
        acc += tl.load(res_ptr + r_off + co64[None, :] * stride_rc, mask=mask, other=0.0).to(tl.float32)
    if ACT >= 0:
        acc = _act_fwd(acc, slope, ACT)
    y = acc.to(out_ptr.dtype.element_ty)
    o_off = (n * stride_on + oh.to(tl.int64) * stride_oh + ow.to(tl.int64) * stride_ow)[:, None]
    tl.store(out_ptr + o_off + co64[None, :] * stride_oc, y, mask=mask)
    if STATS:
        # Statistics of the stored (rounded) values: what BatchNorm would see
        # reading this output back.
        yr = tl.where(mask, y.to(tl.float32), 0.0)
        cnt = tl.minimum(M - pid_m * BLOCK_M, BLOCK_M).to(tl.float32)
        mean = tl.sum(yr, axis=0) / cnt
        d = tl.where(mask, yr - mean[None, :], 0.0)
        p_off = pid_m.to(tl.int64) * COUT + co64
        tl.store(pmean_ptr + p_off, mean, mask=mask_n)
        tl.store(pm2_ptr + p_off, tl.sum(d * d, axis=0), mask=mask_n)


@triton.jit
def _conv_block_fwd_kernel(
    x_ptr,  # (N, G*CIN_G, H, W), any strides
    w_ptr,  # (G*COUT_G, CIN_G, KH, KW), any strides
    bias_ptr,  # (COUT,) or unused
    res_ptr,  # (N, COUT, OH, OW) or unused
    out_ptr,  # (N, COUT, OH, OW)
    pmean_ptr, pm2_ptr,  # (cdiv(M, BLOCK_M), COUT) fp32, or unused
    M, H, W, OH, OW, CIN_G, COUT_G, COUT,
    stride_xn, stride_xc, stride_xh, stride_xw,
    stride_wo, stride_wc, stride_wh, stride_ww,
    stride_on, stride_oc, stride_oh, stride_ow,
    stride_rn, stride_rc, stride_rh, stride_rw,
    SH, SW, PH, PW, DH, DW,
    slope,
    KH: tl.constexpr, KW: tl.constexpr, FLAT_K: tl.constexpr,
    ACT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, STATS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)  # group * tiles_per_group + tile
    tiles_n = tl.cdiv(COUT_G, BLOCK_N)
    grp = pid_n // tiles_n
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = (pid_n % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)  # channel within the group
    mask_m = offs_m < M
    mask_n = offs_n < COUT_G
    ow = offs_m % OW
    oh = (offs_m // OW) % OH
    n = (offs_m // (OW * OH)).to(tl.int64)
    co = grp * COUT_G + offs_n
    x_row = x_ptr + n * stride_xn + (grp * CIN_G).to(tl.int64) * stride_xc  # (BLOCK_M,) pointers
    w_col = w_ptr + co.to(tl.int64) * stride_wo  # (BLOCK_N,) pointers
    ih0 = oh * SH - PH
    iw0 = ow * SW - PW
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if FLAT_K:
        K = CIN_G * KH * KW
        for k0 in range(0, K, BLOCK_K):
            k = k0 + offs_k
            ok_k = k < K
            ci = k % CIN_G
            kh = (k // CIN_G) // KW
            kw = (k // CIN_G) % KW
            ih = ih0[:, None] + kh[None, :] * DH
            iw = iw0[:, None] + kw[None, :] * DW
            ok = mask_m[:, None] & ok_k[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            a_off = ci[None, :] * stride_xc + ih.to(tl.int64) * stride_xh + iw.to(tl.int64) * stride_xw
            a = tl.load(x_row[:, None] + a_off, mask=ok, other=0.0)
            b_off = (ci * stride_wc + kh * stride_wh + kw * stride_ww)[:, None]
            b = tl.load(w_col[None, :] + b_off, mask=ok_k[:, None] & mask_n[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    else:
        blocks_c = tl.cdiv(CIN_G, BLOCK_K)
        for step in range(0, KH * KW * blocks_c):
            tap = step // blocks_c
            ci = (step - tap * blocks_c) * BLOCK_K + offs_k
            kh = tap // KW
            kw = tap - kh * KW
            ih = ih0 + kh * DH
            iw = iw0 + kw * DW
            ok_m = mask_m & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            ok_k = ci < CIN_G
            a_row = x_row + ih.to(tl.int64) * stride_xh + iw.to(tl.int64) * stride_xw
            a = tl.load(a_row[:, None] + ci[None, :] * stride_xc, mask=ok_m[:, None] & ok_k[None, :], other=0.0)
            b_off = (ci * stride_wc + kh * stride_wh + kw * stride_ww)[:, None]
            b = tl.load(w_col[None, :] + b_off, mask=ok_k[:, None] & mask_n[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    _epilogue(acc, mask_m, n, oh, ow, co, mask_n, pid_m, M, COUT,
              bias_ptr, res_ptr, out_ptr, pmean_ptr, pm2_ptr,
              stride_on, stride_oc, stride_oh, stride_ow, stride_rn, stride_rc, stride_rh, stride_rw,
              slope, ACT, HAS_BIAS, HAS_RES, STATS, BLOCK_M)


@triton.jit
def _conv_block_dw_kernel(
    x_ptr,  # (N, CIN, H, W)
    w_ptr,  # (COUT, 1, KH, KW), COUT = CIN * MULT
    bias_ptr, res_ptr, out_ptr, pmean_ptr, pm2_ptr,  # as in _conv_block_fwd_kernel
    M, H, W, OH, OW, MULT, COUT,
    stride_xn, stride_xc, stride_xh, stride_xw,
    stride_wo, stride_wh, stride_ww,
    stride_on, stride_oc, stride_oh, stride_ow,
    stride_rn, stride_rc, stride_rh, stride_rw,
    SH, SW, PH, PW, DH, DW,
    slope,
    KH: tl.constexpr, KW: tl.constexpr,
    ACT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, STATS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    co = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = co < COUT
    ow = offs_m % OW
    oh = (offs_m // OW) % OH
    n = (offs_m // (OW * OH)).to(tl.int64)
    x_col = (co // MULT).to(tl.int64) * stride_xc  # output channel co reads input channel co // MULT
    w_col = w_ptr + co.to(tl.int64) * stride_wo
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kh in tl.static_range(KH):
        for kw in tl.static_range(KW):
            ih = oh * SH - PH + kh * DH
            iw = ow * SW - PW + kw * DW
            ok_m = mask_m & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            x_row = x_ptr + n * stride_xn + ih.to(tl.int64) * stride_xh + iw.to(tl.int64) * stride_xw
            a = tl.load(x_row[:, None] + x_col[None, :], mask=ok_m[:, None] & mask_n[None, :], other=0.0)
            wk = tl.load(w_col + kh * stride_wh + kw * stride_ww, mask=mask_n, other=0.0)
            acc += a.to(tl.float32) * wk.to(tl.float32)[None, :]
    _epilogue(acc, mask_m, n, oh, ow, co, mask_n, pid_m, M, COUT,
              bias_ptr, res_ptr, out_ptr, pmean_ptr, pm2_ptr,
              stride_on, stride_oc, stride_oh, stride_ow, stride_rn, stride_rc, stride_rh, stride_rw,
              slope, ACT, HAS_BIAS, HAS_RES, STATS, BLOCK_M)


# --- launch configuration --------------------------------------------------------------
def _p2(v: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(v, 1))))


def _prune(configs, nargs, **kwargs):
    """Drop tiles much wider than the group's channels (all-masked lanes)."""
    a = {**nargs, **kwargs}
    cout_g, k = a["COUT_G"], a["CIN_G"] * (a["KH"] * a["KW"] if a["FLAT_K"] else 1)
    keep = [c for c in configs
            if c.kwargs["BLOCK_N"] <= _p2(cout_g, 16, 256) and c.kwargs["BLOCK_K"] <= _p2(k, 16, 64)]
    return keep or [min(configs, key=lambda c: c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"])]


# BLOCK_M is left to the caller: the training statistics buffer has one row
# per BLOCK_M rows of output, so the caller must know it.
_GPU_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
    for bn, bk, w, s in [(128, 64, 8, 3), (128, 32, 4, 4), (64, 64, 4, 4), (256, 64, 8, 3),
                         (64, 32, 4, 4), (32, 32, 4, 4), (16, 16, 4, 3)]
]
_fwd_tuned = triton.autotune(
    _GPU_CONFIGS if AUTOTUNE else _GPU_CONFIGS[:1], key=["CIN_G", "COUT_G", "KH", "KW", "FLAT_K", "STATS", "HAS_RES", "ACT"],
    prune_configs_by={"early_config_prune": _prune})(_conv_block_fwd_kernel)


def _launch(x, weight, bias, residual, out, stride, padding, dilation, groups, act, slope, stats):
    n, cin, h, w = x.shape
    cout, cin_g, kh, kw = weight.shape
    oh, ow = out.shape[2:]
    m = n * oh * ow
    # The A tile reads runs of channels: gather from NHWC, whatever came in.
    x = x.contiguous(memory_format=torch.channels_last)
    depthwise = cin_g == 1 and groups > 1
    if not depthwise and weight.stride(0) != 1:
        # B tile rows are runs of output channels: Cout fastest. One
        # weight-sized copy; the folded inference weights are cached this way.
        weight = weight.permute(2, 3, 1, 0).contiguous().permute(3, 2, 0, 1)
    block_m = 32 if INTERPRET else (128 if m >= 128 * 512 else 64)
    tiles_m = triton.cdiv(m, block_m)
    pmean = pm2 = out
    if stats:
        pmean = torch.empty((tiles_m, cout), dtype=torch.float32, device=x.device)
        pm2 = torch.empty_like(pmean)
    r = residual if residual is not None else out
    common = dict(ACT=act, HAS_BIAS=bias is not None, HAS_RES=residual is not None, STATS=stats,
                  KH=kh, KW=kw, BLOCK_M=block_m)
    geometry = (*stride, *padding, *dilation, slope)
    if m and cout:
        b = bias if bias is not None else out
        if depthwise:
            bn = _p2(cout, 16, 64 if INTERPRET else 128)
            _conv_block_dw_kernel[(tiles_m, triton.cdiv(cout, bn))](
                x, weight, b, r, out, pmean, pm2, m, h, w, oh, ow, cout // cin, cout,
                *x.stride(), weight.stride(0), weight.stride(2), weight.stride(3),
                *out.stride(), *r.stride(), *geometry, BLOCK_N=bn, **common,
                **({} if INTERPRET else {"num_warps": 4}))
        else:
            cout_g = cout // groups
            flat_k = cin_g < 16
            args = (x, weight, b, r, out, pmean, pm2, m, h, w, oh, ow, cin_g, cout_g, cout,
                    *x.stride(), *weight.stride(), *out.stride(), *r.stride(), *geometry)
            # "ieee" only changes fp32 operands (no tf32 tensor cores then).
            precision = "ieee" if x.dtype == torch.float32 and not torch.backends.cudnn.allow_tf32 else "tf32"
            if INTERPRET:
                bn = _p2(cout_g, 16, 64)
                bk = _p2(cin_g * kh * kw if flat_k else cin_g, 16, 64)
                grid = (tiles_m, groups * triton.cdiv(cout_g, bn))
                _conv_block_fwd_kernel[grid](*args, FLAT_K=flat_k, INPUT_PRECISION=precision,
                                             BLOCK_N=bn, BLOCK_K=bk, **common)
            else:
                grid = lambda meta: (tiles_m, groups * triton.cdiv(cout_g, meta["BLOCK_N"]))  # noqa: E731
                _fwd_tuned[grid](*args, FLAT_K=flat_k, INPUT_PRECISION=precision, **common)
    return out, pmean, pm2, block_m


def conv_block_forward(x, weight, bias, residual, out, stride, padding, dilation, groups, act: int,
                       slope: float) -> torch.Tensor:
    """out = act(conv2d(x, weight) + bias + residual), written into `out`
    (allocated by the caller: the output layout rule lives with the op)."""
    return _launch(x, weight, bias, residual, out, stride, padding, dilation, groups, act, slope, False)[0]


def conv_block_stats(x, weight, bias, out, stride, padding, dilation, groups):
    """(out, mean, var): out = conv2d(x, weight) + bias, and the per-channel
    mean and biased variance of out over (N, OH, OW), in fp32."""
    y, pmean, pm2, block_m = _launch(x, weight, bias, None, out, stride, padding, dilation, groups, -1, 0.0, True)
    m = y.numel() // max(y.shape[1], 1)
    if m == 0:
        nan = torch.full((y.shape[1],), float("nan"), dtype=torch.float32, device=y.device)
        return y, nan, nan.clone()
    # Chan's merge of the per-tile (count, mean, M2), tiles in order.
    cnt = (m - torch.arange(pmean.shape[0], device=y.device, dtype=torch.float32) * block_m).clamp_(max=block_m)
    mean = (pmean * cnt[:, None]).sum(0) / m
    m2 = pm2.sum(0) + ((pmean - mean).square() * cnt[:, None]).sum(0)
    return y, mean, m2 / m
