"""Triton kernels for LayerNorm and RMSNorm, with the residual add fused in.

The input is viewed as (rows, cols), cols = prod(normalized_shape); every
offset is int64. Math and statistics in fp32; mean/rstd are stored in fp32 for
the backward.

Forward, per row: s = x (+ residual, rounded to x's dtype and also stored),
mean = sum(s) / n (LayerNorm; 0 for RMSNorm), var = sum((s - mean)^2) / n,
rstd = 1 / sqrt(var + eps), y = (s - mean) * rstd * w + b.

Backward, per row, with xhat = (s - mean) * rstd and gw = g * w:
    y_i = xhat_i w_i + b_i,   d xhat_j / d s_i = rstd (delta_ij - 1/n - xhat_i xhat_j / n)
    => ds_i = sum_j gw_j d xhat_j / d s_i
            = rstd (gw_i - mean_j(gw_j) - xhat_i mean_j(gw_j xhat_j))
For RMSNorm xhat = s rstd, so d xhat_j / d s_i = rstd (delta_ij - xhat_i xhat_j / n)
and the mean_j(gw_j) term drops. The gradient of the returned s (residual
path) adds to ds. dw = sum_rows g xhat and db = sum_rows g.

Widths: a row up to MAX_BLOCK_N[_BWD] wide is held whole in one program
(several rows per program when narrow); wider rows loop over chunks, the
forward merging per-chunk (count, mean, M2) statistics (Chan et al.) so the
variance never comes from a difference of large sums.

dweight/dbias are deterministic: each program of a fixed grid sums its rows
into its own fp32 row of a partial buffer, then _sum_partials_kernel adds the
partial rows in a fixed order. No atomics.
"""
import torch
import triton
import triton.language as tl

# Widest row held whole in one program (forward / backward); wider rows loop
# over chunks of this size. Module globals so tests can shrink them and reach
# the chunked paths with small tensors.
MAX_BLOCK_N = 16384
MAX_BLOCK_N_BWD = 8192
# Each tile holds about this many elements (rows per program for narrow rows).
TILE_ELEMS = 4096
# Rows per program-group of the column-wise dweight/dbias kernel (wide rows).
DW_BLOCK_R = 32
DW_BLOCK_C = 256


@triton.jit
def _load_input(x_ptr, res_ptr, res_out_ptr, offs, mask, HAS_RES: tl.constexpr, STORE_SUM: tl.constexpr):
    """The values to normalize, in fp32: x, or with a residual the sum x + r
    rounded to x's dtype, exactly as the op returns it (stored when STORE_SUM),
    so the backward, which reads that sum back, differentiates what the
    forward normalized."""
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        s = (x + tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)).to(x_ptr.dtype.element_ty)
        if STORE_SUM:
            tl.store(res_out_ptr + offs, s, mask=mask)
        x = s.to(tl.float32)
    return x


@triton.jit
def _norm_fwd_kernel(
    x_ptr,  # (rows, cols) input
    res_ptr,  # (rows, cols) residual, or unused without HAS_RES
    w_ptr,  # (cols,) weight, or unused
    b_ptr,  # (cols,) bias, or unused
    y_ptr,  # (rows, cols) output
    res_out_ptr,  # (rows, cols) x + residual, or unused
    mean_ptr,  # (rows,) fp32, or unused for RMS
    rstd_ptr,  # (rows,) fp32
    rows,
    cols,
    eps,
    RMS: tl.constexpr,
    HAS_RES: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SINGLE: tl.constexpr,  # cols <= BLOCK_N: the row is loaded once
):
    row = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = row < rows
    base = row[:, None] * cols  # (BLOCK_M, 1) int64
    if SINGLE:
        col = tl.arange(0, BLOCK_N)
        mask = row_mask[:, None] & (col < cols)[None, :]
        offs = base + col[None, :]
        x = _load_input(x_ptr, res_ptr, res_out_ptr, offs, mask, HAS_RES, True)
        if RMS:
            mean = tl.zeros([BLOCK_M], dtype=tl.float32)
            var = tl.sum(x * x, axis=1) / cols
        else:
            mean = tl.sum(x, axis=1) / cols
            d = tl.where(mask, x - mean[:, None], 0.0)
            var = tl.sum(d * d, axis=1) / cols
        rstd = 1.0 / tl.sqrt(var + eps)
        y = (x - mean[:, None]) * rstd[:, None]
        if HAS_W:
            y = y * tl.load(w_ptr + col, mask=col < cols, other=0.0).to(tl.float32)[None, :]
        if HAS_B:
            y = y + tl.load(b_ptr + col, mask=col < cols, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        # Pass 1: statistics chunk by chunk, merged as (count, mean, M2).
        mean = tl.zeros([BLOCK_M], dtype=tl.float32)
        m2 = tl.zeros([BLOCK_M], dtype=tl.float32)
        for start in range(0, cols, BLOCK_N):
            col = start + tl.arange(0, BLOCK_N)
            mask = row_mask[:, None] & (col < cols)[None, :]
            offs = base + col[None, :]
            x = _load_input(x_ptr, res_ptr, res_out_ptr, offs, mask, HAS_RES, True)
            if RMS:
                m2 += tl.sum(x * x, axis=1)
            else:
                # Every earlier chunk was full: `start` values are merged so far.
                n_old = tl.cast(start, tl.float32)
                n_c = tl.minimum(cols - start, BLOCK_N).to(tl.float32)
                mean_c = tl.sum(x, axis=1) / n_c
                d = tl.where(mask, x - mean_c[:, None], 0.0)
                delta = mean_c - mean
                total = n_old + n_c
                mean += delta * (n_c / total)
                m2 += tl.sum(d * d, axis=1) + delta * delta * (n_old * n_c / total)
        if RMS:
            mean = tl.zeros([BLOCK_M], dtype=tl.float32)
        rstd = 1.0 / tl.sqrt(m2 / cols + eps)
        # Pass 2: normalize. The sum is recomputed from the inputs (and
        # rounded as in pass 1) rather than read back from res_out_ptr.
        for start in range(0, cols, BLOCK_N):
            col = start + tl.arange(0, BLOCK_N)
            mask = row_mask[:, None] & (col < cols)[None, :]
            offs = base + col[None, :]
            x = _load_input(x_ptr, res_ptr, res_out_ptr, offs, mask, HAS_RES, False)
            y = (x - mean[:, None]) * rstd[:, None]
            if HAS_W:
                y = y * tl.load(w_ptr + col, mask=col < cols, other=0.0).to(tl.float32)[None, :]
            if HAS_B:
                y = y + tl.load(b_ptr + col, mask=col < cols, other=0.0).to(tl.float32)[None, :]
            tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
    if not RMS:
        tl.store(mean_ptr + row, mean, mask=row_mask)
    tl.store(rstd_ptr + row, rstd, mask=row_mask)


@triton.jit
def _norm_bwd_kernel(
    g_ptr,  # (rows, cols) grad of the output
    gres_ptr,  # (rows, cols) grad of the returned x + residual, or unused
    x_ptr,  # (rows, cols) what the forward normalized
    w_ptr,  # (cols,) weight, or unused
    mean_ptr,  # (rows,) fp32, or unused for RMS
    rstd_ptr,  # (rows,) fp32
    dx_ptr,  # (rows, cols)
    pw_ptr,  # (programs, cols) fp32 partial dweight, or unused
    pb_ptr,  # (programs, cols) fp32 partial dbias, or unused
    rows,
    cols,
    RMS: tl.constexpr,
    HAS_GRES: tl.constexpr,
    HAS_W: tl.constexpr,
    ACC_W: tl.constexpr,  # accumulate partial dweight here (SINGLE only)
    ACC_B: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SINGLE: tl.constexpr,
):
    # Persistent: program p takes row tiles p, p + P, p + 2P, ... so its
    # partial dweight row is the sum over a fixed set of rows.
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    n_tiles = tl.cdiv(rows, BLOCK_M)
    if SINGLE:
        col = tl.arange(0, BLOCK_N)
        col_mask = col < cols
        if HAS_W:
            w = tl.load(w_ptr + col, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        acc_w = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_b = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for tile in range(pid, n_tiles, n_prog):
            row = tl.cast(tile, tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
            row_mask = row < rows
            mask = row_mask[:, None] & col_mask[None, :]
            offs = row[:, None] * cols + col[None, :]
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(rstd_ptr + row, mask=row_mask, other=0.0)[:, None]
            if RMS:
                xhat = x * rstd
            else:
                xhat = tl.where(mask, (x - tl.load(mean_ptr + row, mask=row_mask, other=0.0)[:, None]) * rstd, 0.0)
            gw = g
            if HAS_W:
                gw = g * w
            c2 = tl.sum(gw * xhat, axis=1)[:, None] / cols
            if RMS:
                dx = rstd * (gw - xhat * c2)
            else:
                dx = rstd * (gw - tl.sum(gw, axis=1)[:, None] / cols - xhat * c2)
            if HAS_GRES:
                dx += tl.load(gres_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
            if ACC_W:
                acc_w += g * xhat
            if ACC_B:
                acc_b += g
        if ACC_W:
            tl.store(pw_ptr + pid.to(tl.int64) * cols + col, tl.sum(acc_w, axis=0), mask=col_mask)
        if ACC_B:
            tl.store(pb_ptr + pid.to(tl.int64) * cols + col, tl.sum(acc_b, axis=0), mask=col_mask)
    else:
        # One row at a time: pass 1 the two row sums, pass 2 dx.
        for r in range(pid, rows, n_prog):
            base = tl.cast(r, tl.int64) * cols
            rstd = tl.load(rstd_ptr + r)
            mean = 0.0
            if not RMS:
                mean = tl.load(mean_ptr + r)
            sum_gw = tl.zeros([BLOCK_N], dtype=tl.float32)
            sum_gwx = tl.zeros([BLOCK_N], dtype=tl.float32)
            for start in range(0, cols, BLOCK_N):
                col = start + tl.arange(0, BLOCK_N)
                mask = col < cols
                x = tl.load(x_ptr + base + col, mask=mask, other=0.0).to(tl.float32)
                gw = tl.load(g_ptr + base + col, mask=mask, other=0.0).to(tl.float32)
                if HAS_W:
                    gw *= tl.load(w_ptr + col, mask=mask, other=0.0).to(tl.float32)
                sum_gw += gw
                sum_gwx += gw * tl.where(mask, (x - mean) * rstd, 0.0)
            c1 = 0.0
            if not RMS:
                c1 = tl.sum(sum_gw, axis=0) / cols
            c2 = tl.sum(sum_gwx, axis=0) / cols
            for start in range(0, cols, BLOCK_N):
                col = start + tl.arange(0, BLOCK_N)
                mask = col < cols
                x = tl.load(x_ptr + base + col, mask=mask, other=0.0).to(tl.float32)
                gw = tl.load(g_ptr + base + col, mask=mask, other=0.0).to(tl.float32)
                if HAS_W:
                    gw *= tl.load(w_ptr + col, mask=mask, other=0.0).to(tl.float32)
                dx = rstd * (gw - c1 - (x - mean) * rstd * c2)
                if HAS_GRES:
                    dx += tl.load(gres_ptr + base + col, mask=mask, other=0.0).to(tl.float32)
                tl.store(dx_ptr + base + col, dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _norm_bwd_dwdb_kernel(
    g_ptr,  # (rows, cols)
    x_ptr,  # (rows, cols)
    mean_ptr,  # (rows,) fp32, or unused for RMS
    rstd_ptr,  # (rows,)
    pw_ptr,  # (groups, cols) fp32 partial dweight, or unused
    pb_ptr,  # (groups, cols) fp32 partial dbias, or unused
    rows,
    cols,
    rows_per_group,
    RMS: tl.constexpr,
    ACC_W: tl.constexpr,
    ACC_B: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # Wide rows: program (c, grp) sums g * xhat and g over its group's rows
    # for BLOCK_C columns. Reads x and g once more, but keeps the partial sums
    # in registers however wide the row is.
    col = tl.program_id(0).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    grp = tl.program_id(1).to(tl.int64)
    col_mask = col < cols
    acc_w = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    first = grp * rows_per_group
    last = tl.minimum(first + rows_per_group, rows)
    for start in range(first, last, BLOCK_R):
        row = start + tl.arange(0, BLOCK_R)
        row_mask = row < last
        mask = row_mask[:, None] & col_mask[None, :]
        offs = row[:, None] * cols + col[None, :]
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if ACC_W:
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(rstd_ptr + row, mask=row_mask, other=0.0)[:, None]
            if RMS:
                acc_w += g * x * rstd
            else:
                mean = tl.load(mean_ptr + row, mask=row_mask, other=0.0)[:, None]
                acc_w += g * (x - mean) * rstd
        if ACC_B:
            acc_b += g
    if ACC_W:
        tl.store(pw_ptr + grp * cols + col, tl.sum(acc_w, axis=0), mask=col_mask)
    if ACC_B:
        tl.store(pb_ptr + grp * cols + col, tl.sum(acc_b, axis=0), mask=col_mask)


@triton.jit
def _sum_partials_kernel(
    p_ptr,  # (parts, cols) fp32
    out_ptr,  # (cols,) in the parameter's dtype
    parts,
    cols,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # Fixed order: lane i of the accumulator adds parts i, i + BLOCK_P, ...,
    # then one tree sum over the lanes. Same inputs, same bits.
    col = tl.program_id(0).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = col < cols
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for start in range(0, parts, BLOCK_P):
        p = start + tl.arange(0, BLOCK_P)
        mask = (p < parts)[:, None] & col_mask[None, :]
        acc += tl.load(p_ptr + p[:, None].to(tl.int64) * cols + col[None, :], mask=mask, other=0.0)
    tl.store(out_ptr + col, tl.sum(acc, axis=0).to(out_ptr.dtype.element_ty), mask=col_mask)


# --- launchers --------------------------------------------------------------------------
def _num_warps(elems: int) -> int:
    # About 8 elements per thread, 1 to 16 warps.
    return max(1, min(16, triton.next_power_of_2(max(1, elems // 256))))


def _tile(cols: int, max_block: int) -> tuple[int, int, bool]:
    """(BLOCK_M, BLOCK_N, SINGLE) for rows of `cols` values."""
    block_n = max(16, triton.next_power_of_2(cols))
    if block_n <= max_block:
        return max(1, TILE_ELEMS // block_n), block_n, True
    return 1, max_block, False


def _programs(device: torch.device) -> int:
    # Persistent backward grid: a few programs per SM. The grid is a function
    # of the device only, so the partial sums (and dweight's bits) are too.
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _sum_partials(part: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    parts, cols = part.shape
    out = torch.empty(like.shape, dtype=like.dtype, device=like.device)
    block_c = 128
    _sum_partials_kernel[(triton.cdiv(cols, block_c),)](
        part, out, parts, cols, BLOCK_P=32, BLOCK_C=block_c, num_warps=4)
    return out


def layer_norm_forward(x, residual, weight, bias, normalized_shape, eps: float, rms: bool):
    cols = 1
    for s in normalized_shape:
        cols *= s
    stat_shape = x.shape[:x.dim() - len(normalized_shape)]
    x = x.contiguous()
    y = torch.empty_like(x)
    res_out = torch.empty_like(x) if residual is not None else x.new_empty(0)
    mean = x.new_empty(0, dtype=torch.float32) if rms else x.new_zeros(stat_shape, dtype=torch.float32)
    rstd = x.new_zeros(stat_shape, dtype=torch.float32)
    if x.numel() == 0:
        return y, res_out, mean, rstd
    rows = x.numel() // cols
    res = residual.contiguous() if residual is not None else x
    w = weight.contiguous() if weight is not None else x
    b = bias.contiguous() if bias is not None else x
    block_m, block_n, single = _tile(cols, MAX_BLOCK_N)
    _norm_fwd_kernel[(triton.cdiv(rows, block_m),)](
        x, res, w, b, y, res_out if residual is not None else y, rstd if rms else mean, rstd,
        rows, cols, eps, RMS=rms, HAS_RES=residual is not None, HAS_W=weight is not None,
        HAS_B=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, SINGLE=single,
        num_warps=_num_warps(block_m * block_n))
    return y, res_out, mean, rstd


def layer_norm_backward(g, grad_residual, x, weight, bias, mean, rstd, rms: bool, grad_mask):
    rows = rstd.numel()
    cols = x.numel() // rows if rows else 0
    x, g = x.contiguous(), g.contiguous()
    dx = torch.empty_like(x)
    need_dw = bool(grad_mask[0]) and weight is not None
    need_db = bool(grad_mask[1]) and bias is not None
    pdtype = weight.dtype if weight is not None else bias.dtype if bias is not None else x.dtype
    dw = dx.new_empty(0, dtype=pdtype)
    db = dx.new_empty(0, dtype=pdtype)
    if x.numel() == 0:
        if need_dw:
            dw = torch.zeros_like(weight)
        if need_db:
            db = torch.zeros_like(bias)
        return dx, dw, db
    gres = grad_residual.contiguous() if grad_residual is not None else g
    w = weight.contiguous() if weight is not None else x
    mean_arg = rstd if rms else mean.contiguous()
    rstd = rstd.contiguous()
    block_m, block_n, single = _tile(cols, MAX_BLOCK_N_BWD)
    n_prog = max(1, min(triton.cdiv(rows, block_m), _programs(x.device)))
    if single:
        n_part = n_prog
    else:
        rows_per_group = max(DW_BLOCK_R, triton.cdiv(rows, _programs(x.device)))
        n_part = triton.cdiv(rows, rows_per_group)
    pw = torch.empty(n_part, cols, dtype=torch.float32, device=x.device) if need_dw else dx
    pb = torch.empty(n_part, cols, dtype=torch.float32, device=x.device) if need_db else dx
    _norm_bwd_kernel[(n_prog,)](
        g, gres, x, w, mean_arg, rstd, dx, pw, pb, rows, cols,
        RMS=rms, HAS_GRES=grad_residual is not None, HAS_W=weight is not None,
        ACC_W=need_dw and single, ACC_B=need_db and single,
        BLOCK_M=block_m, BLOCK_N=block_n, SINGLE=single, num_warps=_num_warps(block_m * block_n))
    if not single and (need_dw or need_db):
        _norm_bwd_dwdb_kernel[(triton.cdiv(cols, DW_BLOCK_C), n_part)](
            g, x, mean_arg, rstd, pw, pb, rows, cols, rows_per_group, RMS=rms, ACC_W=need_dw,
            ACC_B=need_db, BLOCK_R=DW_BLOCK_R, BLOCK_C=DW_BLOCK_C, num_warps=8)
    if need_dw:
        dw = _sum_partials(pw, weight)
    if need_db:
        db = _sum_partials(pb, bias)
    return dx, dw, db
