"""Triton kernels of the fused Adam/AdamW step and the grad-norm pass.

One launch per tensor (the CUDA C++ kernel is the multi-tensor one). The
per-tensor scalars that need double precision (bias corrections of the step
count, the decoupled decay) are computed on the device by the caller
(fastdl/_ops/adamw.py, `coefficients`) and read here from `coef_ptr`, so no
step reads device memory on the host. The element math is the one written out
in csrc/adamw.h; the stochastic-rounding hash is the same bit for bit.
"""
import torch
import triton
import triton.language as tl

BLOCK = 1024
# Per-tensor coefficient row, fp32: grad_mult, decay, step_size, bc2_sqrt, skip.
N_COEF = 5


@triton.jit
def _mix(x):
    # 32-bit integer finalizer (csrc/adamw.h sr_mix); x is uint32.
    x = x ^ (x >> 16)
    x = x * 0x21F0AAAD
    x = x ^ (x >> 15)
    x = x * 0x735A2D97
    x = x ^ (x >> 15)
    return x


@triton.jit
def _round_bf16_stochastic(x, key, offs):
    # Add 16 random bits below the bf16 mantissa, then truncate: unbiased.
    lo = offs.to(tl.uint32)
    hi = (offs >> 32).to(tl.uint32)
    bits = _mix(lo ^ _mix(hi ^ key))
    u = x.to(tl.uint32, bitcast=True)
    u = (u + (bits & 0xFFFF)) >> 16
    r = u.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return tl.where(x != x, x.to(tl.bfloat16), r)


@triton.jit
def _adamw_step_kernel(
    param_ptr,  # (numel,) fp32/fp16/bf16, updated in place
    grad_ptr,  # (numel,) param dtype
    exp_avg_ptr,  # (numel,) state dtype
    exp_avg_sq_ptr,  # (numel,) state dtype
    max_exp_avg_sq_ptr,  # (numel,) state dtype; unused without AMSGRAD
    master_ptr,  # (numel,) fp32; unused without HAS_MASTER
    coef_ptr,  # (N_COEF,) fp32 row of this tensor
    key_ptr,  # () int64 rounding key of this tensor at this step
    numel,
    beta1,
    one_minus_beta1,
    beta2,
    one_minus_beta2,
    eps,
    l2,  # coupled weight decay (Adam); 0 for AdamW
    AMSGRAD: tl.constexpr,
    HAS_MASTER: tl.constexpr,
    SR: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    grad_mult = tl.load(coef_ptr + 0)
    decay = tl.load(coef_ptr + 1)
    step_size = tl.load(coef_ptr + 2)
    bc2_sqrt = tl.load(coef_ptr + 3)
    # GradScaler found inf/NaN: every store is masked off, nothing changes.
    mask = offs < tl.where(tl.load(coef_ptr + 4) == 0, numel, 0)
    g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_MASTER:
        p = tl.load(master_ptr + offs, mask=mask, other=0.0)
    else:
        p = tl.load(param_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(exp_avg_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(exp_avg_sq_ptr + offs, mask=mask, other=0.0).to(tl.float32)

    g = g * grad_mult
    p = p * decay
    g = g + l2 * p
    m = m + one_minus_beta1 * (g - m)
    v = v * beta2 + one_minus_beta2 * g * g
    vhat = v
    if AMSGRAD:
        vmax = tl.maximum(tl.load(max_exp_avg_sq_ptr + offs, mask=mask, other=0.0).to(tl.float32), v)
        tl.store(max_exp_avg_sq_ptr + offs, vmax.to(max_exp_avg_sq_ptr.dtype.element_ty), mask=mask)
        vhat = vmax
    # IEEE sqrt and division (Triton's defaults are approximate), as in C++.
    denom = tl.div_rn(tl.sqrt_rn(vhat), bc2_sqrt) + eps
    p = p - step_size * tl.div_rn(m, denom)

    state_ty = exp_avg_ptr.dtype.element_ty
    tl.store(exp_avg_ptr + offs, m.to(state_ty), mask=mask)
    tl.store(exp_avg_sq_ptr + offs, v.to(state_ty), mask=mask)
    if HAS_MASTER:
        tl.store(master_ptr + offs, p, mask=mask)
    if SR:
        key = tl.load(key_ptr).to(tl.uint32)
        tl.store(param_ptr + offs, _round_bf16_stochastic(p, key, offs), mask=mask)
    else:
        tl.store(param_ptr + offs, p.to(param_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grad_sumsq_kernel(
    grad_ptr,  # (numel,)
    partial_ptr,  # (cdiv(numel, BLOCK),) fp32 sums of squares, one per program
    numel,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    g = tl.load(grad_ptr + offs, mask=offs < numel, other=0.0).to(tl.float32)
    tl.store(partial_ptr + tl.program_id(0), tl.sum(g * g, axis=0))


def adamw_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, coefs, keys,
               beta1, beta2, eps, l2, stochastic_rounding):
    """One launch per non-empty tensor; coefs is (len(params), N_COEF) fp32,
    keys (len(params),) int64, both on the params' device."""
    amsgrad, master = bool(max_exp_avg_sqs), bool(master_params)
    for i, p in enumerate(params):
        n = p.numel()
        if n == 0:
            continue
        _adamw_step_kernel[(triton.cdiv(n, BLOCK),)](
            p, grads[i], exp_avgs[i], exp_avg_sqs[i],
            max_exp_avg_sqs[i] if amsgrad else p, master_params[i] if master else p,
            coefs[i], keys[i], n, beta1, 1.0 - beta1, beta2, 1.0 - beta2, eps, l2,
            AMSGRAD=amsgrad, HAS_MASTER=master,
            SR=stochastic_rounding and p.dtype == torch.bfloat16, BLOCK=BLOCK)


def grad_sumsq_partials(grads) -> torch.Tensor:
    """fp32 sums of squares per BLOCK of every grad, in list order."""
    counts = [triton.cdiv(g.numel(), BLOCK) for g in grads]
    partial = torch.empty(sum(counts), dtype=torch.float32, device=grads[0].device)
    offset = 0
    for g, c in zip(grads, counts):
        if c:
            _grad_sumsq_kernel[(c,)](g, partial[offset:], g.numel(), BLOCK=BLOCK)
        offset += c
    return partial
