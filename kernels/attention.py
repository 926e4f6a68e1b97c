"""Triton kernels for flash-style attention (FlashAttention-2 schedule),
forward and backward.

Layouts (D = head dim, last dim contiguous):
  dense   q (B, Hq, Nq, D), k/v (B, Hkv, Nk, D); lse/delta (B, Hq, Nq)
  varlen  q (Tq, Hq, D), k/v (Tk, Hkv, D) packed, sequence b spanning rows
          cu_seqlens[b] .. cu_seqlens[b+1]; lse/delta (Hq, Tq)
One kernel serves both: a varlen launch sets the batch strides to 0 and reads
each sequence's start and length from cu_seqlens.

Semantics, for query row i and key j of one (batch, head) pair:
  s_ij = scale * q_i . k_j  (+ additive mask, or -inf where a boolean mask is False,
         or -inf where causal hides j: j > i + shift)
  P = softmax_j(s),  O = (P * Z) V,  Z_ij = keep_ij / (1 - p) with dropout else 1
  lse_i = log sum_j exp(s_ij)  (natural log, fp32; -inf for a row that sees no key)
CAUSAL: 0 none, 1 top-left (shift = 0, torch SDPA's is_causal), 2 bottom-right
(shift = Nk - Nq per sequence, what KV-cache decoding needs). A row that sees no
key outputs 0.

GQA: q head h reads kv head h // GROUP.

Softmax in log2 space: scores are scaled by scale * log2(e) once, so every
exponential is an exp2, and the running max m / sum l are kept per row in fp32
(online softmax): for each key block, m' = max(m, rowmax(s)), l' = l 2^(m - m')
+ rowsum(2^(s - m')), acc' = acc 2^(m - m') + 2^(s - m') V. A row whose scores
are all -inf so far uses 0 as its max so no inf - inf appears.

Backward (the derivation FlashAttention-2 uses), with dO the output gradient:
  dV = (P*Z)^T dO
  dP = (dO V^T) * Z
  dS = P * (dP - delta),  delta_i = sum_j P_ij dP_ij = sum_d dO_id O_id
       (the second form because O = (P*Z) V; one fp32 value per row,
       computed first by the preprocess kernel)
  dQ = scale dS K,  dK = scale dS^T Q
P is rebuilt from the saved lse: P_ij = 2^(s_ij log2e - lse_i log2e), no
running max needed. A row that saw no key (lse = -inf) gets lse = +inf there,
so its P is 0 rather than NaN; rows and keys past the sequence end load
lse = +inf / score -inf and contribute 0.

dK/dV: one program per (key block, kv head) accumulates over every query block
of each of the GROUP query heads that share the kv head, in a fixed order: no
atomics, deterministic. dQ either (a) accumulates in the same program with fp32
atomics into a zeroed buffer (ATOMIC_DQ; fastest, summation order varies run to
run), or (b) comes from a separate kernel, one program per (query block, q head)
looping over key blocks (deterministic=True; recomputes S and dP, two extra
matmuls of the five).

Dropout: keep_ij = u_ij >= p with u from Philox-4x32 keyed by a 64-bit seed
(read from device memory, so no host sync) and counter (j, i, batch*Hq + head, 0):
any (batch, head, row, key) gets its own counter at every size, and the
backward regenerates the same mask. `dropout_mask` materializes it for tests.

Loops are split into blocks that need no masking (fully visible, in bounds)
and edge blocks that apply the bounds/causal masks; causal programs skip key
blocks no row of theirs sees. Pointer offsets: per-program bases are int64;
tile offsets within a block stay small.

fp32 inputs: tl.dot in full fp32 ("ieee") unless
torch.backends.cuda.matmul.allow_tf32 is set, then TF32 (the launcher passes
DOT_PRECISION). fp16/bf16: tensor-core dots with fp32 accumulation; P and dS
are rounded to the input dtype before their matmuls, as in FlashAttention.
"""
import functools
import os

import torch
import triton
import triton.language as tl

from . import AUTOTUNE

LOG2E = 1.4426950408889634
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


# --- helpers ------------------------------------------------------------------------------
@triton.jit
def _load_rows(ptrs, rows_ok, d_ok, CHECK_ROWS: tl.constexpr, PAD_D: tl.constexpr):
    """Load a (rows, BLOCK_D) tile; masks only what may be out of bounds."""
    if CHECK_ROWS:
        if PAD_D:
            x = tl.load(ptrs, mask=rows_ok[:, None] & d_ok[None, :], other=0.0)
        else:
            x = tl.load(ptrs, mask=rows_ok[:, None], other=0.0)
    else:
        if PAD_D:
            x = tl.load(ptrs, mask=d_ok[None, :], other=0.0)
        else:
            x = tl.load(ptrs)
    return x


@triton.jit
def _seq_bounds(cu_q_ptr, cu_k_ptr, b, seqlen_q, seqlen_k, VARLEN: tl.constexpr):
    """(first row, length) of sequence b for q and for k/v."""
    if VARLEN:
        q_start = tl.load(cu_q_ptr + b)
        q_len = tl.load(cu_q_ptr + b + 1) - q_start
        k_start = tl.load(cu_k_ptr + b)
        k_len = tl.load(cu_k_ptr + b + 1) - k_start
    else:
        q_start = 0
        q_len = seqlen_q
        k_start = 0
        k_len = seqlen_k
    return q_start, q_len, k_start, k_len


@triton.jit
def _keep_tile(seed, offs_m, offs_n, bh, dropout_p):
    """Dropout keep mask of a (BLOCK_M, BLOCK_N) tile: Philox(seed; j, i, bh, 0)."""
    zero = tl.zeros((offs_m.shape[0], offs_n.shape[0]), dtype=tl.uint32)
    c0 = zero + offs_n[None, :].to(tl.uint32)
    c1 = zero + offs_m[:, None].to(tl.uint32)
    c2 = zero + bh.to(tl.uint32)
    r, _, _, _ = tl.philox(seed, c0, c1, c2, zero)
    # top 24 bits -> uniform in [0, 1) exactly representable in fp32
    u = (r >> 8).to(tl.float32) * (1.0 / 16777216.0)
    return u >= dropout_p


@triton.jit
def _scores(q, k, offs_m, offs_n, seqlen_q, seqlen_k, shift, qk_scale,
            mask_base, stride_mm, stride_mn,
            MASK: tl.constexpr, CAUSAL: tl.constexpr, CHECK: tl.constexpr,
            DOT_PRECISION: tl.constexpr):
    """Scores of one (BLOCK_M, BLOCK_N) tile in log2 units with every mask applied.

    CHECK: the tile may hold keys past the sequence end or causally hidden keys.
    """
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    if MASK != 0:
        inb = (offs_m[:, None] < seqlen_q) & (offs_n[None, :] < seqlen_k)
        # int64: a broadcast (Nq, Nk) mask alone may pass 2^31 elements
        mptrs = mask_base + offs_m.to(tl.int64)[:, None] * stride_mm + offs_n.to(tl.int64)[None, :] * stride_mn
        if MASK == 1:  # boolean, True = attend
            s = tl.where(tl.load(mptrs, mask=inb, other=0) != 0, s, float("-inf"))
        else:  # additive, in natural-log units
            s += tl.load(mptrs, mask=inb, other=0.0).to(tl.float32) * 1.4426950408889634
    if CHECK:
        valid = offs_n[None, :] < seqlen_k
        if CAUSAL != 0:
            valid = valid & (offs_n[None, :] <= offs_m[:, None] + shift)
        s = tl.where(valid, s, float("-inf"))
    return s


@triton.jit
def _row_ranges_for_keys(n0, seqlen_q, seqlen_k, shift,
                         CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """For key block [n0, n0 + BLOCK_N): query blocks [lo, full_lo) and
    [full_hi, hi) need masks, [full_lo, full_hi) are fully visible and in bounds."""
    hi = tl.cdiv(seqlen_q, BLOCK_M) * BLOCK_M
    if CAUSAL != 0:
        # row i sees key j iff j <= i + shift
        lo = (tl.maximum(n0 - shift, 0) // BLOCK_M) * BLOCK_M
        full_lo = tl.cdiv(tl.maximum(n0 + BLOCK_N - 1 - shift, 0), BLOCK_M) * BLOCK_M
    else:
        lo = 0
        full_lo = 0
    lo = tl.minimum(lo, hi)
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    if n0 + BLOCK_N <= seqlen_k:
        full_hi = tl.maximum((seqlen_q // BLOCK_M) * BLOCK_M, full_lo)
    else:
        full_hi = full_lo
    return lo, full_lo, full_hi, hi


@triton.jit
def _key_ranges_for_rows(m0, seqlen_k, shift,
                         CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """For query block [m0, m0 + BLOCK_M): key blocks [0, full_hi) are fully
    visible and in bounds, [full_hi, hi) need masks, later keys are hidden."""
    if CAUSAL != 0:
        hi = tl.minimum(tl.maximum(m0 + BLOCK_M + shift, 0), seqlen_k)
        full_hi = (tl.maximum(tl.minimum(m0 + shift + 1, seqlen_k), 0) // BLOCK_N) * BLOCK_N
    else:
        hi = seqlen_k
        full_hi = (seqlen_k // BLOCK_N) * BLOCK_N
    return full_hi, hi


# --- forward ------------------------------------------------------------------------------
@triton.jit
def _fwd_inner(acc, m_i, l_i, q, k_ptrs, v_ptrs, lo, hi, offs_m, d_ok,
               seqlen_q, seqlen_k, shift, qk_scale, mask_base, stride_mm, stride_mn,
               stride_kn, stride_vn, seed, bh, dropout_p,
               MASK: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, CHECK: tl.constexpr,
               PAD_D: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    k_ptrs += tl.cast(lo, tl.int64) * stride_kn
    v_ptrs += tl.cast(lo, tl.int64) * stride_vn
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k = _load_rows(k_ptrs, offs_n < seqlen_k, d_ok, CHECK, PAD_D)
        s = _scores(q, k, offs_m, offs_n, seqlen_q, seqlen_k, shift, qk_scale, mask_base,
                    stride_mm, stride_mn, MASK, CAUSAL, CHECK, DOT_PRECISION)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:  # the normalizer counts dropped entries; only P V loses them
            p = tl.where(_keep_tile(seed, offs_m, offs_n, bh, dropout_p), p, 0.0)
        v = _load_rows(v_ptrs, offs_n < seqlen_k, d_ok, CHECK, PAD_D)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
        k_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn
    return acc, m_i, l_i


@triton.jit
def _attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr,  # see the module docstring for the layouts
    o_ptr,  # like q
    lse_ptr,  # (B, Hq, Nq) or (Hq, Tq) fp32
    mask_ptr,  # (B, Hq, Nq, Nk) view, stride 0 where broadcast; unused unless MASK
    seed_ptr,  # () int64; unused unless DROPOUT
    cu_q_ptr, cu_k_ptr,  # (B + 1,) int32; unused unless VARLEN
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    stride_lb, stride_lh, stride_lm,
    stride_mb, stride_mh, stride_mm, stride_mn,
    n_heads,  # Hq
    seqlen_q, seqlen_k,  # dense lengths; varlen reads them per sequence
    qk_scale,  # scale * log2(e)
    dropout_p,
    seq_bucket,  # autotuning key only
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, MASK: tl.constexpr, DROPOUT: tl.constexpr, VARLEN: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Causal: the last query blocks see the most keys; launch them first.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0) if CAUSAL != 0 else tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // n_heads
    h = bh % n_heads
    q_start, seqlen_q, k_start, seqlen_k = _seq_bounds(cu_q_ptr, cu_k_ptr, b, seqlen_q, seqlen_k, VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 >= seqlen_q:
        return
    shift = seqlen_k - seqlen_q if CAUSAL == 2 else 0
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    hk64 = (h // GROUP).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_M)
    offs_m = m0 + offs_r
    offs_j = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    rows_ok = offs_m < seqlen_q
    PAD_D: tl.constexpr = BLOCK_D != HEAD_DIM

    q_rows = q_ptr + b64 * stride_qb + h64 * stride_qh + (q_start + m0).to(tl.int64) * stride_qm
    q = _load_rows(q_rows + offs_r[:, None] * stride_qm + offs_d[None, :], rows_ok, d_ok, True, PAD_D)
    k_ptrs = (k_ptr + b64 * stride_kb + hk64 * stride_kh + k_start.to(tl.int64) * stride_kn
              + offs_j[:, None] * stride_kn + offs_d[None, :])
    v_ptrs = (v_ptr + b64 * stride_vb + hk64 * stride_vh + k_start.to(tl.int64) * stride_vn
              + offs_j[:, None] * stride_vn + offs_d[None, :])
    mask_base = mask_ptr + b64 * stride_mb + h64 * stride_mh
    seed = tl.load(seed_ptr) if DROPOUT else 0

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    full_hi, hi = _key_ranges_for_rows(m0, seqlen_k, shift, CAUSAL, BLOCK_M, BLOCK_N)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, k_ptrs, v_ptrs, 0, full_hi, offs_m, d_ok,
                               seqlen_q, seqlen_k, shift, qk_scale, mask_base, stride_mm, stride_mn,
                               stride_kn, stride_vn, seed, bh, dropout_p,
                               MASK, CAUSAL, DROPOUT, False, PAD_D, BLOCK_N, DOT_PRECISION)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, k_ptrs, v_ptrs, full_hi, hi, offs_m, d_ok,
                               seqlen_q, seqlen_k, shift, qk_scale, mask_base, stride_mm, stride_mn,
                               stride_kn, stride_vn, seed, bh, dropout_p,
                               MASK, CAUSAL, DROPOUT, True, PAD_D, BLOCK_N, DOT_PRECISION)

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    if DROPOUT:
        out = out * (1.0 / (1.0 - dropout_p))
    o_rows = o_ptr + b64 * stride_ob + h64 * stride_oh + (q_start + m0).to(tl.int64) * stride_om
    tl.store(o_rows + offs_r[:, None] * stride_om + offs_d[None, :], out.to(o_ptr.dtype.element_ty),
             mask=rows_ok[:, None] & d_ok[None, :])
    lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    lse_rows = lse_ptr + b64 * stride_lb + h64 * stride_lh + (q_start + m0).to(tl.int64) * stride_lm
    tl.store(lse_rows + offs_r * stride_lm, lse, mask=rows_ok)


# --- backward -----------------------------------------------------------------------------
@triton.jit
def _attn_bwd_preprocess_kernel(
    o_ptr, do_ptr,  # like q
    delta_ptr,  # like lse: delta_i = sum_d dO_id O_id in fp32
    cu_q_ptr,
    stride_ob, stride_oh, stride_om,
    stride_gb, stride_gh, stride_gm,
    stride_lb, stride_lh, stride_lm,
    n_heads, seqlen_q,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, VARLEN: tl.constexpr, BLOCK_M: tl.constexpr,
):
    bh = tl.program_id(1)
    b = bh // n_heads
    h = bh % n_heads
    q_start, seqlen_q, _, _ = _seq_bounds(cu_q_ptr, cu_q_ptr, b, seqlen_q, seqlen_q, VARLEN)
    m0 = tl.program_id(0) * BLOCK_M
    if m0 >= seqlen_q:
        return
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    row0 = (q_start + m0).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    rows_ok = m0 + offs_r < seqlen_q
    d_ok = offs_d < HEAD_DIM
    o = _load_rows(o_ptr + b64 * stride_ob + h64 * stride_oh + row0 * stride_om
                   + offs_r[:, None] * stride_om + offs_d[None, :], rows_ok, d_ok, True, BLOCK_D != HEAD_DIM)
    do = _load_rows(do_ptr + b64 * stride_gb + h64 * stride_gh + row0 * stride_gm
                    + offs_r[:, None] * stride_gm + offs_d[None, :], rows_ok, d_ok, True, BLOCK_D != HEAD_DIM)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(delta_ptr + b64 * stride_lb + h64 * stride_lh + row0 * stride_lm + offs_r * stride_lm, delta,
             mask=rows_ok)


@triton.jit
def _probs_and_dscores(q, k, v, do, lse2, delta, offs_m, offs_n, seqlen_q, seqlen_k, shift, qk_scale,
                       mask_base, stride_mm, stride_mn, seed, bh, dropout_p,
                       MASK: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, CHECK: tl.constexpr,
                       DOT_PRECISION: tl.constexpr):
    """(P * Z, dS) of one (BLOCK_M, BLOCK_N) tile, rebuilt from the saved lse."""
    s = _scores(q, k, offs_m, offs_n, seqlen_q, seqlen_k, shift, qk_scale, mask_base,
                stride_mm, stride_mn, MASK, CAUSAL, CHECK, DOT_PRECISION)
    p = tl.math.exp2(s - lse2[:, None])
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    if DROPOUT:
        keep = _keep_tile(seed, offs_m, offs_n, bh, dropout_p)
        inv_keep = 1.0 / (1.0 - dropout_p)
        pz = tl.where(keep, p * inv_keep, 0.0)
        dp = tl.where(keep, dp * inv_keep, 0.0)
    else:
        pz = p
    ds = p * (dp - delta[:, None])
    return pz, ds


@triton.jit
def _load_row_stats(lse_rows, delta_rows, offs_r, rows_ok, stride_lm, CHECK: tl.constexpr):
    """lse in log2 units (+inf for rows out of bounds or seeing no key: P = 0) and delta."""
    if CHECK:
        lse = tl.load(lse_rows + offs_r * stride_lm, mask=rows_ok, other=float("inf"))
        delta = tl.load(delta_rows + offs_r * stride_lm, mask=rows_ok, other=0.0)
    else:
        lse = tl.load(lse_rows + offs_r * stride_lm)
        delta = tl.load(delta_rows + offs_r * stride_lm)
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    return lse2, delta


@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, offs_n, lo, hi, d_ok, q_rows, do_rows, dq_rows, lse_rows, delta_rows,
                    stride_qm, stride_gm, stride_dqm, stride_lm,
                    seqlen_q, seqlen_k, shift, qk_scale, sm_scale, mask_base, stride_mm, stride_mn,
                    seed, bh, dropout_p,
                    MASK: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, CHECK: tl.constexpr,
                    ATOMIC_DQ: tl.constexpr, PAD_D: tl.constexpr, BLOCK_M: tl.constexpr,
                    DOT_PRECISION: tl.constexpr):
    offs_r = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, k.shape[1])
    q_ptrs = q_rows + lo.to(tl.int64) * stride_qm + offs_r[:, None] * stride_qm + offs_d[None, :]
    do_ptrs = do_rows + lo.to(tl.int64) * stride_gm + offs_r[:, None] * stride_gm + offs_d[None, :]
    dq_ptrs = dq_rows + lo.to(tl.int64) * stride_dqm + offs_r[:, None] * stride_dqm + offs_d[None, :]
    lse_ptrs = lse_rows + lo.to(tl.int64) * stride_lm
    delta_ptrs = delta_rows + lo.to(tl.int64) * stride_lm
    for m0 in range(lo, hi, BLOCK_M):
        offs_m = m0 + offs_r
        rows_ok = offs_m < seqlen_q
        q = _load_rows(q_ptrs, rows_ok, d_ok, CHECK, PAD_D)
        do = _load_rows(do_ptrs, rows_ok, d_ok, CHECK, PAD_D)
        lse2, delta = _load_row_stats(lse_ptrs, delta_ptrs, offs_r, rows_ok, stride_lm, CHECK)
        pz, ds = _probs_and_dscores(q, k, v, do, lse2, delta, offs_m, offs_n, seqlen_q, seqlen_k, shift,
                                    qk_scale, mask_base, stride_mm, stride_mn, seed, bh, dropout_p,
                                    MASK, CAUSAL, DROPOUT, CHECK, DOT_PRECISION)
        dv += tl.dot(tl.trans(pz.to(do.dtype)), do, input_precision=DOT_PRECISION)
        ds = ds.to(q.dtype)
        dk += tl.dot(tl.trans(ds), q, input_precision=DOT_PRECISION)
        if ATOMIC_DQ:
            dq = tl.dot(ds, k, input_precision=DOT_PRECISION) * sm_scale
            tl.atomic_add(dq_ptrs, dq, mask=rows_ok[:, None] & d_ok[None, :])
        q_ptrs += BLOCK_M * stride_qm
        do_ptrs += BLOCK_M * stride_gm
        dq_ptrs += BLOCK_M * stride_dqm
        lse_ptrs += BLOCK_M * stride_lm
        delta_ptrs += BLOCK_M * stride_lm
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr,
    lse_ptr, delta_ptr,
    dk_ptr, dv_ptr,  # like k / v
    dq_ptr,  # fp32 accumulator like q (contiguous); unused unless ATOMIC_DQ
    mask_ptr, seed_ptr, cu_q_ptr, cu_k_ptr,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_gb, stride_gh, stride_gm,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    stride_dqb, stride_dqh, stride_dqm,
    stride_lb, stride_lh, stride_lm,
    stride_mb, stride_mh, stride_mm, stride_mn,
    n_kv_heads,
    seqlen_q, seqlen_k,
    qk_scale, sm_scale, dropout_p,
    seq_bucket,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, MASK: tl.constexpr, DROPOUT: tl.constexpr, VARLEN: tl.constexpr,
    ATOMIC_DQ: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    bhk = tl.program_id(1)
    b = bhk // n_kv_heads
    hk = bhk % n_kv_heads
    q_start, seqlen_q, k_start, seqlen_k = _seq_bounds(cu_q_ptr, cu_k_ptr, b, seqlen_q, seqlen_k, VARLEN)
    n0 = pid_n * BLOCK_N
    if n0 >= seqlen_k:
        return
    shift = seqlen_k - seqlen_q if CAUSAL == 2 else 0
    b64 = b.to(tl.int64)
    hk64 = hk.to(tl.int64)
    offs_j = tl.arange(0, BLOCK_N)
    offs_n = n0 + offs_j
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    keys_ok = offs_n < seqlen_k
    PAD_D: tl.constexpr = BLOCK_D != HEAD_DIM
    row_k = (k_start + n0).to(tl.int64)
    k = _load_rows(k_ptr + b64 * stride_kb + hk64 * stride_kh + row_k * stride_kn
                   + offs_j[:, None] * stride_kn + offs_d[None, :], keys_ok, d_ok, True, PAD_D)
    v = _load_rows(v_ptr + b64 * stride_vb + hk64 * stride_vh + row_k * stride_vn
                   + offs_j[:, None] * stride_vn + offs_d[None, :], keys_ok, d_ok, True, PAD_D)
    seed = tl.load(seed_ptr) if DROPOUT else 0
    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    lo, full_lo, full_hi, hi = _row_ranges_for_keys(n0, seqlen_q, seqlen_k, shift, CAUSAL, BLOCK_M, BLOCK_N)
    row_q = q_start.to(tl.int64)
    # The group's q heads in a fixed order: dK/dV sums without atomics.
    for g in range(GROUP):
        h = hk * GROUP + g
        bh = b * (n_kv_heads * GROUP) + h
        h64 = h.to(tl.int64)
        q_rows = q_ptr + b64 * stride_qb + h64 * stride_qh + row_q * stride_qm
        do_rows = do_ptr + b64 * stride_gb + h64 * stride_gh + row_q * stride_gm
        dq_rows = dq_ptr + b64 * stride_dqb + h64 * stride_dqh + row_q * stride_dqm
        lse_rows = lse_ptr + b64 * stride_lb + h64 * stride_lh + row_q * stride_lm
        delta_rows = delta_ptr + b64 * stride_lb + h64 * stride_lh + row_q * stride_lm
        mask_base = mask_ptr + b64 * stride_mb + h64 * stride_mh
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, offs_n, lo, full_lo, d_ok, q_rows, do_rows, dq_rows, lse_rows,
                                 delta_rows, stride_qm, stride_gm, stride_dqm, stride_lm,
                                 seqlen_q, seqlen_k, shift, qk_scale, sm_scale, mask_base, stride_mm, stride_mn,
                                 seed, bh, dropout_p, MASK, CAUSAL, DROPOUT, True, ATOMIC_DQ, PAD_D, BLOCK_M,
                                 DOT_PRECISION)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, offs_n, full_lo, full_hi, d_ok, q_rows, do_rows, dq_rows,
                                 lse_rows, delta_rows, stride_qm, stride_gm, stride_dqm, stride_lm,
                                 seqlen_q, seqlen_k, shift, qk_scale, sm_scale, mask_base, stride_mm, stride_mn,
                                 seed, bh, dropout_p, MASK, CAUSAL, DROPOUT, False, ATOMIC_DQ, PAD_D, BLOCK_M,
                                 DOT_PRECISION)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, offs_n, full_hi, hi, d_ok, q_rows, do_rows, dq_rows, lse_rows,
                                 delta_rows, stride_qm, stride_gm, stride_dqm, stride_lm,
                                 seqlen_q, seqlen_k, shift, qk_scale, sm_scale, mask_base, stride_mm, stride_mn,
                                 seed, bh, dropout_p, MASK, CAUSAL, DROPOUT, True, ATOMIC_DQ, PAD_D, BLOCK_M,
                                 DOT_PRECISION)
    out_ok = keys_ok[:, None] & d_ok[None, :]
    tl.store(dk_ptr + b64 * stride_dkb + hk64 * stride_dkh + row_k * stride_dkn
             + offs_j[:, None] * stride_dkn + offs_d[None, :], (dk * sm_scale).to(dk_ptr.dtype.element_ty),
             mask=out_ok)
    tl.store(dv_ptr + b64 * stride_dvb + hk64 * stride_dvh + row_k * stride_dvn
             + offs_j[:, None] * stride_dvn + offs_d[None, :], dv.to(dv_ptr.dtype.element_ty), mask=out_ok)


@triton.jit
def _bwd_dq_inner(dq, q, do, lse2, delta, k_ptrs, v_ptrs, lo, hi, offs_m, d_ok,
                  seqlen_q, seqlen_k, shift, qk_scale, mask_base, stride_mm, stride_mn,
                  stride_kn, stride_vn, seed, bh, dropout_p,
                  MASK: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, CHECK: tl.constexpr,
                  PAD_D: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    k_ptrs += tl.cast(lo, tl.int64) * stride_kn
    v_ptrs += tl.cast(lo, tl.int64) * stride_vn
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k = _load_rows(k_ptrs, offs_n < seqlen_k, d_ok, CHECK, PAD_D)
        v = _load_rows(v_ptrs, offs_n < seqlen_k, d_ok, CHECK, PAD_D)
        _, ds = _probs_and_dscores(q, k, v, do, lse2, delta, offs_m, offs_n, seqlen_q, seqlen_k, shift,
                                   qk_scale, mask_base, stride_mm, stride_mn, seed, bh, dropout_p,
                                   MASK, CAUSAL, DROPOUT, CHECK, DOT_PRECISION)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
        k_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn
    return dq


@triton.jit
def _attn_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr,
    lse_ptr, delta_ptr,
    dq_ptr,  # like q
    mask_ptr, seed_ptr, cu_q_ptr, cu_k_ptr,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_gb, stride_gh, stride_gm,
    stride_dqb, stride_dqh, stride_dqm,
    stride_lb, stride_lh, stride_lm,
    stride_mb, stride_mh, stride_mm, stride_mn,
    n_heads,
    seqlen_q, seqlen_k,
    qk_scale, sm_scale, dropout_p,
    seq_bucket,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, MASK: tl.constexpr, DROPOUT: tl.constexpr, VARLEN: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0) if CAUSAL != 0 else tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // n_heads
    h = bh % n_heads
    q_start, seqlen_q, k_start, seqlen_k = _seq_bounds(cu_q_ptr, cu_k_ptr, b, seqlen_q, seqlen_k, VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 >= seqlen_q:
        return
    shift = seqlen_k - seqlen_q if CAUSAL == 2 else 0
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    hk64 = (h // GROUP).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_M)
    offs_m = m0 + offs_r
    offs_j = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    rows_ok = offs_m < seqlen_q
    PAD_D: tl.constexpr = BLOCK_D != HEAD_DIM
    row_q = (q_start + m0).to(tl.int64)
    q = _load_rows(q_ptr + b64 * stride_qb + h64 * stride_qh + row_q * stride_qm
                   + offs_r[:, None] * stride_qm + offs_d[None, :], rows_ok, d_ok, True, PAD_D)
    do = _load_rows(do_ptr + b64 * stride_gb + h64 * stride_gh + row_q * stride_gm
                    + offs_r[:, None] * stride_gm + offs_d[None, :], rows_ok, d_ok, True, PAD_D)
    lse2, delta = _load_row_stats(lse_ptr + b64 * stride_lb + h64 * stride_lh + row_q * stride_lm,
                                  delta_ptr + b64 * stride_lb + h64 * stride_lh + row_q * stride_lm,
                                  offs_r, rows_ok, stride_lm, True)
    k_ptrs = (k_ptr + b64 * stride_kb + hk64 * stride_kh + k_start.to(tl.int64) * stride_kn
              + offs_j[:, None] * stride_kn + offs_d[None, :])
    v_ptrs = (v_ptr + b64 * stride_vb + hk64 * stride_vh + k_start.to(tl.int64) * stride_vn
              + offs_j[:, None] * stride_vn + offs_d[None, :])
    mask_base = mask_ptr + b64 * stride_mb + h64 * stride_mh
    seed = tl.load(seed_ptr) if DROPOUT else 0
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    full_hi, hi = _key_ranges_for_rows(m0, seqlen_k, shift, CAUSAL, BLOCK_M, BLOCK_N)
    dq = _bwd_dq_inner(dq, q, do, lse2, delta, k_ptrs, v_ptrs, 0, full_hi, offs_m, d_ok,
                       seqlen_q, seqlen_k, shift, qk_scale, mask_base, stride_mm, stride_mn,
                       stride_kn, stride_vn, seed, bh, dropout_p,
                       MASK, CAUSAL, DROPOUT, False, PAD_D, BLOCK_N, DOT_PRECISION)
    dq = _bwd_dq_inner(dq, q, do, lse2, delta, k_ptrs, v_ptrs, full_hi, hi, offs_m, d_ok,
                       seqlen_q, seqlen_k, shift, qk_scale, mask_base, stride_mm, stride_mn,
                       stride_kn, stride_vn, seed, bh, dropout_p,
                       MASK, CAUSAL, DROPOUT, True, PAD_D, BLOCK_N, DOT_PRECISION)
    tl.store(dq_ptr + b64 * stride_dqb + h64 * stride_dqh + row_q * stride_dqm
             + offs_r[:, None] * stride_dqm + offs_d[None, :], (dq * sm_scale).to(dq_ptr.dtype.element_ty),
             mask=rows_ok[:, None] & d_ok[None, :])


@triton.jit
def _dropout_mask_kernel(seed_ptr, keep_ptr,  # keep: (B, H, Nq, Nk) uint8, contiguous
                         seqlen_q, seqlen_k, dropout_p,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    bh = tl.program_id(2)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = _keep_tile(tl.load(seed_ptr), offs_m, offs_n, bh, dropout_p)
    ptrs = (keep_ptr + bh.to(tl.int64) * seqlen_q * seqlen_k
            + offs_m.to(tl.int64)[:, None] * seqlen_k + offs_n[None, :])
    tl.store(ptrs, keep.to(tl.uint8), mask=(offs_m[:, None] < seqlen_q) & (offs_n[None, :] < seqlen_k))


# --- launch configuration -------------------------------------------------------------------
# (BLOCK_M, BLOCK_N, num_warps, num_stages) per padded head dim, for sm_80/sm_90.
# Starting points for autotuning, not yet measured on this project's GPUs.
_FWD_CONFIGS = {
    64: [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 4), (128, 32, 4, 4)],
    128: [(128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (128, 32, 4, 3)],
    256: [(64, 32, 4, 2), (64, 64, 8, 2), (128, 32, 8, 2)],
}
_DKDV_CONFIGS = {  # BLOCK_M: query step, BLOCK_N: the program's keys
    64: [(32, 128, 4, 3), (64, 128, 8, 2), (32, 64, 4, 3), (64, 64, 4, 2)],
    128: [(32, 128, 8, 2), (64, 128, 8, 2), (32, 64, 4, 3), (64, 64, 4, 2)],
    256: [(16, 64, 4, 2), (32, 64, 8, 1), (32, 32, 4, 2)],
}
_DQ_CONFIGS = {  # BLOCK_M: the program's rows, BLOCK_N: key step
    64: [(128, 32, 4, 3), (128, 64, 8, 2), (64, 64, 4, 3), (64, 32, 4, 3)],
    128: [(128, 32, 8, 2), (128, 64, 8, 2), (64, 64, 4, 2), (64, 32, 4, 3)],
    256: [(64, 16, 4, 2), (64, 32, 8, 1), (32, 32, 4, 2)],
}
# The interpreter runs every program one by one on the CPU: one small config,
# no autotuning; unequal query and key blocks.
_INTERPRET_CONFIG = {"fwd": (64, 32), "dkdv": (32, 64), "dq": (64, 32)}
_TUNE_KEY = ["seq_bucket", "GROUP", "CAUSAL", "MASK", "DROPOUT", "VARLEN"]


def _bucket(block_d: int) -> int:
    return 64 if block_d <= 64 else block_d


@functools.cache
def _tuned(kind: str, block_d: int):
    kernel = {"fwd": _attn_fwd_kernel, "dkdv": _attn_bwd_dkdv_kernel, "dq": _attn_bwd_dq_kernel}[kind]
    table = {"fwd": _FWD_CONFIGS, "dkdv": _DKDV_CONFIGS, "dq": _DQ_CONFIGS}[kind][_bucket(block_d)]
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in table]
    if not AUTOTUNE:
        configs = configs[:1]
    # Autotuning reruns the kernel: the atomic dQ buffer must start from zero each time.
    reset = ["dq_ptr"] if kind == "dkdv" else None
    return triton.autotune(configs, key=_TUNE_KEY, reset_to_zero=reset)(kernel)


def _launch(kind: str, block_d: int, grid_rows: int, grid_bh: int, *args, **kwargs):
    if INTERPRET:
        bm, bn = _INTERPRET_CONFIG[kind]
        kernel = {"fwd": _attn_fwd_kernel, "dkdv": _attn_bwd_dkdv_kernel, "dq": _attn_bwd_dq_kernel}[kind]
        block = bn if kind == "dkdv" else bm
        kernel[(triton.cdiv(grid_rows, block), grid_bh)](*args, BLOCK_M=bm, BLOCK_N=bn, **kwargs)
        return
    by = "BLOCK_N" if kind == "dkdv" else "BLOCK_M"
    _tuned(kind, block_d)[lambda meta: (triton.cdiv(grid_rows, meta[by]), grid_bh)](*args, **kwargs)


# --- host side ----------------------------------------------------------------------------
CAUSAL_MODES = {"none": 0, "top_left": 1, "bottom_right": 2}


def _dims(t: torch.Tensor, varlen: bool):
    """(stride batch, stride head, stride row) of a dense (B, H, N, D) or packed (T, H, D) tensor."""
    return (0, t.stride(1), t.stride(0)) if varlen else (t.stride(0), t.stride(1), t.stride(2))


def _lse_dims(lse: torch.Tensor, varlen: bool):
    return (0, lse.stride(0), lse.stride(1)) if varlen else tuple(lse.stride())


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _dot_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"  # the default; only fp32 operands read it


def _common(q, k, mask, cu_q, varlen, max_q, max_k, causal, dropout_p, seed):
    """Arguments shared by every launch: sizes, mask strides, constexprs."""
    d = q.shape[-1]
    block_d = max(16, triton.next_power_of_2(d))
    if varlen:
        batch, n_heads, n_kv = cu_q.numel() - 1, q.shape[1], k.shape[1]
        seqlen_q, seqlen_k = max_q, max_k
    else:
        batch, n_heads, n_kv = q.shape[0], q.shape[1], k.shape[1]
        seqlen_q, seqlen_k = q.shape[2], k.shape[2]
    if mask is None:
        mask_arg, mask_strides, mask_kind = q, (0, 0, 0, 0), 0
    elif mask.dtype == torch.bool:
        mask_arg, mask_strides, mask_kind = mask.view(torch.uint8), tuple(mask.stride()), 1
    else:
        mask_arg, mask_strides, mask_kind = mask, tuple(mask.stride()), 2
    consts = dict(GROUP=n_heads // n_kv, HEAD_DIM=d, BLOCK_D=block_d, CAUSAL=CAUSAL_MODES[causal],
                  MASK=mask_kind, DROPOUT=dropout_p > 0, VARLEN=varlen, DOT_PRECISION=_dot_precision(q.dtype))
    return dict(batch=batch, n_heads=n_heads, n_kv=n_kv, seqlen_q=seqlen_q, seqlen_k=seqlen_k,
                block_d=block_d, mask=mask_arg, mask_strides=mask_strides,
                seed=seed if seed is not None else q, cu_q=cu_q if varlen else q,
                bucket=triton.next_power_of_2(max(seqlen_q, seqlen_k, 1)), consts=consts)


def attention_forward(q, k, v, mask, cu_q, cu_k, max_q, max_k, scale, causal, dropout_p, seed):
    """out (like q) and lse (fp32: (B, Hq, Nq) dense, (Hq, Tq) varlen)."""
    varlen = cu_q is not None
    q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
    c = _common(q, k, mask, cu_q, varlen, max_q, max_k, causal, dropout_p, seed)
    out = torch.empty_like(q)
    lse = (torch.empty((q.shape[1], q.shape[0]), device=q.device, dtype=torch.float32) if varlen else
           torch.empty(q.shape[:3], device=q.device, dtype=torch.float32))
    if out.numel() == 0:
        return out, lse
    if k.numel() == 0:  # no keys at all: every row sees none
        out.zero_()
        lse.fill_(float("-inf"))
        return out, lse
    _launch("fwd", c["block_d"], c["seqlen_q"], c["batch"] * c["n_heads"],
            q, k, v, out, lse, c["mask"], c["seed"], c["cu_q"], cu_k if varlen else q,
            *_dims(q, varlen), *_dims(k, varlen), *_dims(v, varlen), *_dims(out, varlen),
            *_lse_dims(lse, varlen), *c["mask_strides"],
            c["n_heads"], c["seqlen_q"], c["seqlen_k"], scale * LOG2E, dropout_p, c["bucket"], **c["consts"])
    return out, lse


def attention_backward(grad_out, q, k, v, out, lse, mask, cu_q, cu_k, max_q, max_k, scale, causal,
                       dropout_p, seed, deterministic):
    """(dq, dk, dv) like (q, k, v)."""
    varlen = cu_q is not None
    q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
    grad_out, out = _last_dim_contiguous(grad_out), _last_dim_contiguous(out)
    c = _common(q, k, mask, cu_q, varlen, max_q, max_k, causal, dropout_p, seed)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    if q.numel() == 0 or k.numel() == 0:
        return torch.zeros_like(q), dk.zero_(), dv.zero_()
    consts = c["consts"]
    delta = torch.empty_like(lse)
    pre_block = 16 if INTERPRET else 64
    _attn_bwd_preprocess_kernel[(triton.cdiv(c["seqlen_q"], pre_block), c["batch"] * c["n_heads"])](
        out, grad_out, delta, c["cu_q"], *_dims(out, varlen), *_dims(grad_out, varlen), *_lse_dims(delta, varlen),
        c["n_heads"], c["seqlen_q"], HEAD_DIM=consts["HEAD_DIM"], BLOCK_D=consts["BLOCK_D"], VARLEN=varlen,
        BLOCK_M=pre_block)
    # fp32 accumulator for the atomic path; the deterministic path writes dq directly.
    dq_acc = torch.zeros(q.shape, device=q.device, dtype=torch.float32) if not deterministic else None
    dq = torch.empty_like(q)
    dq_target = dq_acc if dq_acc is not None else dq
    shared = (c["mask"], c["seed"], c["cu_q"], cu_k if varlen else q)
    sizes = (c["seqlen_q"], c["seqlen_k"], scale * LOG2E, scale, dropout_p, c["bucket"])
    _launch("dkdv", c["block_d"], c["seqlen_k"], c["batch"] * c["n_kv"],
            q, k, v, grad_out, lse, delta, dk, dv, dq_target, *shared,
            *_dims(q, varlen), *_dims(k, varlen), *_dims(v, varlen), *_dims(grad_out, varlen),
            *_dims(dk, varlen), *_dims(dv, varlen), *_dims(dq_target, varlen), *_lse_dims(lse, varlen),
            *c["mask_strides"], c["n_kv"], *sizes, ATOMIC_DQ=not deterministic, **consts)
    if deterministic:
        _launch("dq", c["block_d"], c["seqlen_q"], c["batch"] * c["n_heads"],
                q, k, v, grad_out, lse, delta, dq, *shared,
                *_dims(q, varlen), *_dims(k, varlen), *_dims(v, varlen), *_dims(grad_out, varlen),
                *_dims(dq, varlen), *_lse_dims(lse, varlen), *c["mask_strides"], c["n_heads"], *sizes, **consts)
    else:
        dq.copy_(dq_acc)
    return dq, dk, dv


def dropout_mask(seed: torch.Tensor, batch: int, heads: int, seqlen_q: int, seqlen_k: int,
                 dropout_p: float) -> torch.Tensor:
    """The keep mask (batch, heads, seqlen_q, seqlen_k) the kernels draw for `seed`."""
    keep = torch.empty((batch, heads, seqlen_q, seqlen_k), device=seed.device, dtype=torch.uint8)
    if keep.numel():
        bm, bn = 32, 128
        grid = (triton.cdiv(seqlen_q, bm), triton.cdiv(seqlen_k, bn), batch * heads)
        _dropout_mask_kernel[grid](seed, keep, seqlen_q, seqlen_k, dropout_p, BLOCK_M=bm, BLOCK_N=bn)
    return keep.view(torch.bool)


