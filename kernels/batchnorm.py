"""Triton kernels for the BatchNorm family (channel = dim 1).

Every kernel walks a [BLOCK_R, BLOCK_C] tile: BLOCK_C channels by BLOCK_R
positions of those channels. `_rows` maps a work unit to the tile's row
offsets for the two layouts the ops accept:
  channels_last (rows, C) row-major: unit u covers rows [u*BLOCK_R, ...);
      element (r, c) is at r * C + c (channels contiguous).
  NCHW (N, C, S): unit u is (n, block of S) = divmod(u, cdiv(S, BLOCK_R));
      element (n, c, s) is at n*C*S + c*S + s (positions contiguous).
Offsets are int64, so tensors past 2^31 elements index correctly. Math and
statistics are fp32.

z = (x - mean[c]) * scale[c] + shift[c] (+ residual), y = act(z); ACT is an
id of kernels/activation.py or -1 for none. Backward math: fastdl/_ops/batchnorm.py.
"""
import torch
import triton
import triton.language as tl

from fastdl._ops.batchnorm import channels_last_dense, in_layout

from .activation import _act_fwd, _act_grad

# Elements per tile; the interpreter pays per program, the GPU per register.
TILE = 2048


@triton.jit
def _rows(unit, rows, S, C, BLOCK_R: tl.constexpr, CHANNELS_LAST: tl.constexpr):
    """(offsets, mask) of the BLOCK_R positions of work unit `unit`."""
    r = tl.arange(0, BLOCK_R)
    if CHANNELS_LAST:
        row = tl.cast(unit, tl.int64) * BLOCK_R + r
        offs = row * C
        mask = row < rows
    else:
        blocks = tl.cdiv(S, BLOCK_R)
        n = unit // blocks
        s = (unit - n * blocks) * BLOCK_R + r
        offs = tl.cast(n, tl.int64) * C * S + s
        mask = s < S
    return offs, mask


@triton.jit
def _welford_combine(mean_a, m2_a, n_a, mean_b, m2_b, n_b):
    # Chan et al.: merge two (mean, sum of squared deviations, count) triples.
    n = n_a + n_b
    w_b = n_b / tl.maximum(n, 1.0)
    delta = mean_b - mean_a
    return mean_a + delta * w_b, m2_a + m2_b + delta * delta * n_a * w_b, n


@triton.jit
def _batch_norm_stats_kernel(
    x_ptr,  # (N, C, S) or channels_last (rows, C)
    part_ptr,  # (3, SPLITS, C) fp32: mean, m2, count of each split
    rows, S, C, units, SPLITS,
    CHANNELS_LAST: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    split = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    col = c.to(tl.int64) * (1 if CHANNELS_LAST else S)
    mean = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
    m2 = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
    cnt = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
    # Welford per lane: stable however large the mean is against the spread.
    for unit in range(split, units, SPLITS):
        offs, rmask = _rows(unit, rows, S, C, BLOCK_R, CHANNELS_LAST)
        mask = rmask[:, None] & cmask[None, :]
        x = tl.load(x_ptr + offs[:, None] + col[None, :], mask=mask, other=0.0).to(tl.float32)
        cnt += mask.to(tl.float32)
        delta = x - mean
        mean += tl.where(mask, delta / tl.maximum(cnt, 1.0), 0.0)
        m2 += tl.where(mask, delta * (x - mean), 0.0)
    # Merge the lanes exactly: pooled mean, then the lanes' m2 plus their
    # spread around it (plain sums, no sequential combine over lanes).
    n = tl.sum(cnt, 0)
    pooled = tl.sum(cnt * mean, 0) / tl.maximum(n, 1.0)
    dev = mean - pooled[None, :]
    out = part_ptr + split * C + c
    tl.store(out, pooled, mask=cmask)
    tl.store(out + SPLITS * C, tl.sum(m2, 0) + tl.sum(cnt * dev * dev, 0), mask=cmask)
    tl.store(out + 2 * SPLITS * C, n, mask=cmask)


@triton.jit
def _batch_norm_stats_finalize_kernel(
    part_ptr,  # (3, SPLITS, C) from _batch_norm_stats_kernel
    mean_ptr, var_ptr,  # (C,) fp32
    C, SPLITS, BLOCK_C: tl.constexpr,
):
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    mean = tl.zeros([BLOCK_C], tl.float32)
    m2 = tl.zeros([BLOCK_C], tl.float32)
    cnt = tl.zeros([BLOCK_C], tl.float32)
    for i in range(0, SPLITS):
        p = part_ptr + i * C + c
        mean, m2, cnt = _welford_combine(
            mean, m2, cnt, tl.load(p, mask=cmask, other=0.0), tl.load(p + SPLITS * C, mask=cmask, other=0.0),
            tl.load(p + 2 * SPLITS * C, mask=cmask, other=0.0))
    tl.store(mean_ptr + c, mean, mask=cmask)
    tl.store(var_ptr + c, m2 / tl.maximum(cnt, 1.0), mask=cmask)


@triton.jit
def _tile(rows, S, C, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, CHANNELS_LAST: tl.constexpr):
    """This program's (BLOCK_R positions, BLOCK_C channels) tile of an
    elementwise pass: channels, their mask, element offsets and mask."""
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    offs, rmask = _rows(tl.program_id(0), rows, S, C, BLOCK_R, CHANNELS_LAST)
    offs = offs[:, None] + c.to(tl.int64)[None, :] * (1 if CHANNELS_LAST else S)
    return c, cmask, offs, rmask[:, None] & cmask[None, :]


@triton.jit
def _load_affine(mean_ptr, scale_ptr, shift_ptr, c, cmask):
    mean = tl.load(mean_ptr + c, mask=cmask, other=0.0)
    scale = tl.load(scale_ptr + c, mask=cmask, other=0.0)
    shift = tl.load(shift_ptr + c, mask=cmask, other=0.0)
    return mean[None, :], scale[None, :], shift[None, :]


@triton.jit
def _batch_norm_fwd_kernel(
    x_ptr, res_ptr, y_ptr,  # input layout; res_ptr unused without HAS_RES
    mean_ptr, scale_ptr, shift_ptr,  # (C,) fp32
    rows, S, C, slope,
    ACT: tl.constexpr, HAS_RES: tl.constexpr, CHANNELS_LAST: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    c, cmask, offs, mask = _tile(rows, S, C, BLOCK_R, BLOCK_C, CHANNELS_LAST)
    mean, scale, shift = _load_affine(mean_ptr, scale_ptr, shift_ptr, c, cmask)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    z = (x - mean) * scale + shift
    if HAS_RES:
        z += tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if ACT >= 0:
        z = _act_fwd(z, slope, ACT)
    tl.store(y_ptr + offs, z.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dz(g_ptr, x_ptr, res_ptr, offs, mask, mean, scale, shift, slope, ACT: tl.constexpr, HAS_RES: tl.constexpr):
    """(dz, x - mean) with dz = grad_out * act'(z), z recomputed from x (+ residual)."""
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    xmu = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) - mean
    if ACT >= 0:
        z = xmu * scale + shift
        if HAS_RES:
            z += tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = g * _act_grad(z, slope, ACT)
    return g, xmu


@triton.jit
def _batch_norm_bwd_reduce_kernel(
    g_ptr, x_ptr, res_ptr, dz_ptr,  # input layout; dz_ptr written when WRITE_DZ
    mean_ptr, scale_ptr, shift_ptr,  # (C,) fp32
    part_ptr,  # (2, SPLITS, C) fp32: sum(dz), sum(dz * (x - mean)) of each split
    rows, S, C, units, SPLITS, slope,
    ACT: tl.constexpr, HAS_RES: tl.constexpr, WRITE_DZ: tl.constexpr, CHANNELS_LAST: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    split = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    col = c.to(tl.int64) * (1 if CHANNELS_LAST else S)
    mean, scale, shift = _load_affine(mean_ptr, scale_ptr, shift_ptr, c, cmask)
    s1 = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
    s2 = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
    for unit in range(split, units, SPLITS):
        offs, rmask = _rows(unit, rows, S, C, BLOCK_R, CHANNELS_LAST)
        offs = offs[:, None] + col[None, :]
        mask = rmask[:, None] & cmask[None, :]
        dz, xmu = _dz(g_ptr, x_ptr, res_ptr, offs, mask, mean, scale, shift, slope, ACT, HAS_RES)
        if WRITE_DZ:
            tl.store(dz_ptr + offs, dz.to(dz_ptr.dtype.element_ty), mask=mask)
        s1 += dz
        s2 += tl.where(mask, dz * xmu, 0.0)
    out = part_ptr + split * C + c
    tl.store(out, tl.sum(s1, 0), mask=cmask)
    tl.store(out + SPLITS * C, tl.sum(s2, 0), mask=cmask)


@triton.jit
def _batch_norm_bwd_kernel(
    g_ptr, x_ptr, res_ptr, dx_ptr,  # input layout
    mean_ptr, scale_ptr, shift_ptr, kx_ptr, k0_ptr,  # (C,) fp32
    rows, S, C, slope,
    ACT: tl.constexpr, HAS_RES: tl.constexpr, CHANNELS_LAST: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    c, cmask, offs, mask = _tile(rows, S, C, BLOCK_R, BLOCK_C, CHANNELS_LAST)
    mean, scale, shift = _load_affine(mean_ptr, scale_ptr, shift_ptr, c, cmask)
    kx = tl.load(kx_ptr + c, mask=cmask, other=0.0)[None, :]
    k0 = tl.load(k0_ptr + c, mask=cmask, other=0.0)[None, :]
    dz, xmu = _dz(g_ptr, x_ptr, res_ptr, offs, mask, mean, scale, shift, slope, ACT, HAS_RES)
    tl.store(dx_ptr + offs, (dz * scale + kx * xmu + k0).to(dx_ptr.dtype.element_ty), mask=mask)


# --- host side ----------------------------------------------------------------------
class _Geometry:
    """Tile shape and work units of an input in the layout the kernels use."""

    def __init__(self, x: torch.Tensor, channels_last: bool):
        self.cl = channels_last
        self.n, self.c = x.shape[0], x.shape[1]
        self.s = x.numel() // max(1, self.n * self.c)
        self.rows = self.n * self.s
        if channels_last:
            self.block_c = min(triton.next_power_of_2(max(self.c, 1)), 256)
            self.block_r = max(1, TILE // self.block_c)
            self.units = triton.cdiv(self.rows, self.block_r)
        else:
            self.block_r = min(triton.next_power_of_2(max(self.s, 1)), TILE)
            self.block_c = min(max(1, TILE // self.block_r), triton.next_power_of_2(max(self.c, 1)))
            self.units = self.n * triton.cdiv(self.s, self.block_r)
        self.c_blocks = triton.cdiv(self.c, self.block_c)

    def splits(self, device: torch.device) -> int:
        """Programs per channel block of a reduction: about four per SM."""
        target = 4 * (torch.cuda.get_device_properties(device).multi_processor_count
                      if device.type == "cuda" else 1)
        return max(1, min(self.units, triton.cdiv(target, self.c_blocks), 65535))


def batch_norm_stats(x: torch.Tensor):
    cl = channels_last_dense(x)
    x = in_layout(x, cl)
    geo = _Geometry(x, cl)
    mean = torch.empty(geo.c, dtype=torch.float32, device=x.device)
    var = torch.empty_like(mean)
    if x.numel() == 0:
        return mean.fill_(float("nan")), var.fill_(float("nan"))
    splits = geo.splits(x.device)
    part = torch.empty(3, splits, geo.c, dtype=torch.float32, device=x.device)
    _batch_norm_stats_kernel[(splits, geo.c_blocks)](
        x, part, geo.rows, geo.s, geo.c, geo.units, splits,
        CHANNELS_LAST=cl, BLOCK_R=geo.block_r, BLOCK_C=geo.block_c)
    block = min(triton.next_power_of_2(geo.c), 1024)
    _batch_norm_stats_finalize_kernel[(triton.cdiv(geo.c, block),)](
        part, mean, var, geo.c, splits, BLOCK_C=block)
    return mean, var


def batch_norm_forward(x, mean, scale, shift, residual, act: int, slope: float):
    cl = channels_last_dense(x)
    x = in_layout(x, cl)
    res = in_layout(residual, cl) if residual is not None else x
    y = torch.empty_like(x)
    if x.numel():
        geo = _Geometry(x, cl)
        _batch_norm_fwd_kernel[(geo.units, geo.c_blocks)](
            x, res, y, mean, scale, shift, geo.rows, geo.s, geo.c, slope,
            ACT=act, HAS_RES=residual is not None, CHANNELS_LAST=cl,
            BLOCK_R=geo.block_r, BLOCK_C=geo.block_c)
    return y


def batch_norm_backward_reduce(g, x, mean, scale, shift, residual, act: int, slope: float, write_dz: bool):
    cl = channels_last_dense(x)
    x, g = in_layout(x, cl), in_layout(g, cl)
    res = in_layout(residual, cl) if residual is not None else x
    dz = torch.empty_like(x) if write_dz else x.new_empty(0)
    geo = _Geometry(x, cl)
    if x.numel() == 0:
        zeros = torch.zeros(geo.c, dtype=torch.float32, device=x.device)
        return zeros, zeros.clone(), dz
    splits = geo.splits(x.device)
    part = torch.empty(2, splits, geo.c, dtype=torch.float32, device=x.device)
    _batch_norm_bwd_reduce_kernel[(splits, geo.c_blocks)](
        g, x, res, dz if write_dz else x, mean, scale, shift, part,
        geo.rows, geo.s, geo.c, geo.units, splits, slope,
        ACT=act, HAS_RES=residual is not None, WRITE_DZ=write_dz, CHANNELS_LAST=cl,
        BLOCK_R=geo.block_r, BLOCK_C=geo.block_c)
    return part[0].sum(0), part[1].sum(0), dz


def batch_norm_backward(g, x, mean, scale, shift, residual, coef_xmu, coef_const, act: int, slope: float):
    cl = channels_last_dense(x)
    x, g = in_layout(x, cl), in_layout(g, cl)
    res = in_layout(residual, cl) if residual is not None else x
    dx = torch.empty_like(x)
    if x.numel():
        geo = _Geometry(x, cl)
        _batch_norm_bwd_kernel[(geo.units, geo.c_blocks)](
            g, x, res, dx, mean, scale, shift, coef_xmu, coef_const, geo.rows, geo.s, geo.c, slope,
            ACT=act, HAS_RES=residual is not None, CHANNELS_LAST=cl,
            BLOCK_R=geo.block_r, BLOCK_C=geo.block_c)
    return dx
