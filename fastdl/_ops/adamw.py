"""Fused Adam / AdamW step over lists of tensors, and the global grad norm.

Ops (schemas in csrc/registration.cpp):
  fastdl::adamw_step / adamw_grad_norm                C++ kernels, CPU and CUDA
                                                      (CUDA: multi-tensor apply)
  fastdl::adamw_step_triton / adamw_grad_norm_triton  Triton kernels (defined here)
and the "torch" backend, a composite of plain torch ops with the same contract
(it also serves float64 params, which the kernels do not take).

Contract of a step, for every param i (math in fp32, written out in
csrc/adamw.h): steps[i] += 1, then the Adam/AdamW update of params[i],
exp_avgs[i], exp_avg_sqs[i] (+ max_exp_avg_sqs[i], + master_params[i], the fp32
copy that is updated and rounded into params[i]). grads are read, never
written. With found_inf nonzero nothing changes, steps included. With
grad_norm, grads are scaled by min(1, max_grad_norm / (grad_norm / grad_scale
+ 1e-6)). None of this reads device memory on the host.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastdl import _backend

OP = "adamw"
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_backend.register_op(
    OP, native_op="fastdl::adamw_step", has_triton=True, auto_cuda=("cuda", "triton"),
    auto_why="CUDA C++ first: one multi-tensor launch per 48 tensors against one Triton launch "
             "per tensor; not yet measured on this GPU")


# --- fake kernels ---------------------------------------------------------------------------
def _fake_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, steps, lr,
               lr_tensor, beta1, beta2, eps, weight_decay, decoupled, maximize, grad_scale,
               found_inf, grad_norm, max_grad_norm, stochastic_rounding, seed) -> None:
    return None


def _fake_norm(grads):
    return grads[0].new_empty((), dtype=torch.float32)


if _backend._C is not None:
    torch.library.register_fake("fastdl::adamw_step")(_fake_step)
    torch.library.register_fake("fastdl::adamw_grad_norm")(_fake_norm)


# --- per-tensor coefficients and the rounding hash, in torch ops ------------------------------
_U32 = 0xFFFFFFFF


def _mix(x: Tensor) -> Tensor:
    """csrc/adamw.h sr_mix on int64 tensors holding uint32 values."""
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & _U32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & _U32
    return x ^ (x >> 15)


def sr_keys(seed: int, steps: Tensor) -> Tensor:
    """Rounding key of tensor j at step steps[j] (float counts), int64."""
    index = torch.arange(steps.numel(), device=steps.device)
    return _mix((seed & _U32) ^ _mix(index ^ _mix(steps.long() & _U32)))


def round_bf16_stochastic(x: Tensor, key: Tensor) -> Tensor:
    """fp32 -> bf16, rounding up with probability equal to the dropped fraction."""
    offs = torch.arange(x.numel(), device=x.device).view(x.shape)
    bits = _mix((offs & _U32) ^ _mix((offs >> 32) ^ key))
    u = ((x.view(torch.int32).long() & _U32) + (bits & 0xFFFF)) >> 16
    r = torch.where(u >= 0x8000, u - 0x10000, u).to(torch.int16).view(torch.bfloat16)
    return torch.where(torch.isnan(x), x.to(torch.bfloat16), r)


def _grad_mult(device, maximize, grad_scale, grad_norm, max_grad_norm) -> Tensor:
    """fp32 multiplier of the raw grads: unscale, clip, maximize (as csrc/adamw.h)."""
    scale = grad_scale.reshape(()) if grad_scale is not None else torch.ones((), device=device)
    mult = 1.0 / scale
    if grad_norm is not None:
        coef = max_grad_norm / (grad_norm.reshape(()) / scale + 1e-6)
        mult = torch.where(coef < 1.0, coef / scale, mult)
    return -mult if maximize else mult


def coefficients(steps, lr, lr_tensor, beta1, beta2, weight_decay, decoupled, maximize,
                 grad_scale, found_inf, grad_norm, max_grad_norm) -> Tensor:
    """(len(steps), 5) float64 rows: grad_mult, decay, step_size, bc2_sqrt, skip.

    Bias corrections in double from the (already advanced) step counts, as
    torch computes them; the kernels use them in fp32.
    """
    device = steps[0].device
    t = torch.stack([s.reshape(()) for s in steps]).double()
    # A float lr stays a Python number: nothing is copied from the host (CUDA graph capture).
    lr64 = lr_tensor.reshape(()).double() if lr_tensor is not None else lr
    step_size = lr64 / (1.0 - beta1 ** t)
    bc2_sqrt = (1.0 - beta2 ** t).sqrt()
    decay = 1.0 - lr64 * weight_decay if decoupled else 1.0
    if not isinstance(decay, Tensor):
        decay = torch.full((), decay, dtype=torch.float64, device=device)
    mult = _grad_mult(device, maximize, grad_scale, grad_norm, max_grad_norm).double()
    skip = torch.zeros((), dtype=torch.float64, device=device)
    if found_inf is not None:
        skip = (found_inf.reshape(()) != 0).double()
    return torch.stack(torch.broadcast_tensors(mult, decay, step_size, bc2_sqrt, skip), dim=1)


def _advance_steps(steps, found_inf) -> None:
    if found_inf is None:
        torch._foreach_add_(steps, 1.0)
    else:
        torch._foreach_add_(steps, (found_inf.reshape(()) == 0).float())


# --- Triton ops ------------------------------------------------------------------------------
def _triton():
    return _backend.load_kernels("adamw")


_MUTATED = ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "master_params", "steps")


@torch.library.custom_op("fastdl::adamw_step_triton", mutates_args=_MUTATED)
def adamw_step_triton(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                      exp_avg_sqs: list[Tensor], max_exp_avg_sqs: list[Tensor],
                      master_params: list[Tensor], steps: list[Tensor], lr: float,
                      lr_tensor: Optional[Tensor], beta1: float, beta2: float, eps: float,
                      weight_decay: float, decoupled: bool, maximize: bool,
                      grad_scale: Optional[Tensor], found_inf: Optional[Tensor],
                      grad_norm: Optional[Tensor], max_grad_norm: float,
                      stochastic_rounding: bool, seed: int) -> None:
    if not params:
        return
    _advance_steps(steps, found_inf)
    coefs = coefficients(steps, lr, lr_tensor, beta1, beta2, weight_decay, decoupled, maximize,
                         grad_scale, found_inf, grad_norm, max_grad_norm).float()
    keys = sr_keys(seed, torch.stack([s.reshape(()) for s in steps]))
    _triton().adamw_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params,
                         coefs, keys, beta1, beta2, eps, 0.0 if decoupled else weight_decay,
                         stochastic_rounding)


@torch.library.custom_op("fastdl::adamw_grad_norm_triton", mutates_args=())
def adamw_grad_norm_triton(grads: list[Tensor]) -> Tensor:
    # fp32 partial sums per block, then one fixed-order sum in double.
    return _triton().grad_sumsq_partials(grads).double().sum().sqrt().float()


adamw_step_triton.register_fake(_fake_step)
adamw_grad_norm_triton.register_fake(_fake_norm)


# --- reference composite (backend "torch") ---------------------------------------------------
def adamw_step_torch(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, steps,
                     lr, lr_tensor, beta1, beta2, eps, weight_decay, decoupled, maximize,
                     grad_scale, found_inf, grad_norm, max_grad_norm, stochastic_rounding,
                     seed) -> None:
    """The same contract in plain torch ops, one tensor at a time; math in fp32
    (fp64 for fp64 params)."""
    if not params:
        return
    _advance_steps(steps, found_inf)
    rows64 = coefficients(steps, lr, lr_tensor, beta1, beta2, weight_decay, decoupled, maximize,
                          grad_scale, found_inf, grad_norm, max_grad_norm)
    keys = sr_keys(seed, torch.stack([s.reshape(()) for s in steps]))
    keep = rows64[0, 4] != 0  # GradScaler found inf: write back the old values
    for i, p in enumerate(params):
        c = torch.float64 if p.dtype == torch.float64 else torch.float32
        mult, decay, step_size, bc2_sqrt, _ = rows64[i].to(c).unbind()
        b1, b2 = torch.tensor(beta1, dtype=c), torch.tensor(beta2, dtype=c)
        omb1, omb2 = torch.tensor(1.0 - beta1, dtype=c), torch.tensor(1.0 - beta2, dtype=c)
        g = grads[i].to(c) * mult
        p0 = (master_params[i] if master_params else p).to(c) * decay
        if not decoupled:
            g = g + torch.tensor(weight_decay, dtype=c) * p0
        m = exp_avgs[i].to(c)
        m = m + omb1 * (g - m)
        v = exp_avg_sqs[i].to(c) * b2 + omb2 * g * g
        vhat = v
        if max_exp_avg_sqs:
            vhat = torch.maximum(max_exp_avg_sqs[i].to(c), v)
            _write(max_exp_avg_sqs[i], vhat, keep)
        p1 = p0 - step_size * (m / (vhat.sqrt() / bc2_sqrt + torch.tensor(eps, dtype=c)))
        _write(exp_avgs[i], m, keep)
        _write(exp_avg_sqs[i], v, keep)
        if master_params:
            _write(master_params[i], p1, keep)
        if stochastic_rounding and p.dtype == torch.bfloat16:
            p1 = round_bf16_stochastic(p1.float(), keys[i])
        _write(p, p1, keep)


def _write(dst: Tensor, value: Tensor, keep: Tensor) -> None:
    dst.copy_(torch.where(keep, dst, value.to(dst.dtype)))


def grad_norm_torch(grads) -> Tensor:
    c = torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32
    return torch.stack([g.to(c).square().sum() for g in grads]).sum().sqrt().float()


# --- entry points ------------------------------------------------------------------------------
def _native(name: str):
    return getattr(torch.ops.fastdl, name).default if _backend._C is not None else None


_STEP = {"cuda": _native("adamw_step"), "cpu": _native("adamw_step"),
         "triton": torch.ops.fastdl.adamw_step_triton.default, "torch": adamw_step_torch}
_NORM = {"cuda": _native("adamw_grad_norm"), "cpu": _native("adamw_grad_norm"),
         "triton": torch.ops.fastdl.adamw_grad_norm_triton.default, "torch": grad_norm_torch}


def _unsupported(tensors) -> dict:
    bad = next((t.dtype for t in tensors if t.dtype not in KERNEL_DTYPES), None)
    if bad is None:
        return {}
    why = f"the kernels take float32, float16 and bfloat16 params, got {bad}"
    return {"cuda": why, "cpu": why, "triton": why}


def fused_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, steps, *,
               lr, lr_tensor, beta1, beta2, eps, weight_decay, decoupled, maximize, grad_scale,
               found_inf, grad_norm, max_grad_norm, stochastic_rounding, seed) -> None:
    """One step over lists of tensors on one device (see the module docstring)."""
    if not params:
        return
    backend = _backend.resolve(OP, params[0].device, _unsupported(params))
    _STEP[backend](params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, steps,
                   float(lr), lr_tensor, float(beta1), float(beta2), float(eps),
                   float(weight_decay), decoupled, maximize, grad_scale, found_inf, grad_norm,
                   float(max_grad_norm), stochastic_rounding, int(seed))


def grad_norm(grads) -> Tensor:
    """L2 norm of all grads (one device), fp32 scalar, deterministic."""
    backend = _backend.resolve(OP, grads[0].device, _unsupported(grads))
    return _NORM[backend](grads)
