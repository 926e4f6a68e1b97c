"""Fused AdamW step: fastdl.optim.AdamW against torch.optim.AdamW(fused=True).

Cases: N parameters (10M, 100M, 1B) as 4 large tensors ("large") and as 10k
small tensors ("10k", the real model case); fp32 params, and bf16 params with
fp32 master weights (torch has no master weights: its row runs fused AdamW on
bf16 params and bf16 moments, the cheaper thing it can do).
Modes: "step" (one optimizer step), "clip+step" (global grad-norm clipping to
1.0 then the step: torch clip_grad_norm_(foreach) + fused step; fastdl
max_grad_norm=1.0, two passes over the grads instead of four).

Bytes model per param, of fastdl's kernel (the same figure for every provider
of a row, so GB/s compare like p50 does):
  fp32           read p, g, m, v; write p, m, v              7 x 4 = 28 B
  bf16 + master  read g (2), master, m, v; write master, m, v,
                 the bf16 param (2)                          4 + 6 x 4 = 28 B
  clip+step      + one more read of g (4 B fp32, 2 B bf16)
Providers: eager = torch.optim.AdamW(fused=True), torch-foreach, fastdl-cuda,
fastdl-triton. Each provider checks one step on a small model against torch's
fp32 AdamW before any timing.
"""
import torch

from benchmarks import harness as H

OP = "adamw"


def _cases(ctx):
    """(label, tensor sizes)."""
    if ctx.smoke:
        return [("large", [2500] * 4), ("10k", [37] * 50)]
    totals = [100_000_000] if ctx.quick else [10_000_000, 100_000_000, 1_000_000_000]
    cases = []
    for n in totals:
        cases.append((f"large-{n // 10**6}M", [n // 4] * 4))
        cases.append((f"10k-{n // 10**6}M", [n // 10_000] * 10_000))
    return cases


def _optimizers(ctx, params, master, clip):
    """provider -> (optimizer, params it steps)."""
    import fastdl
    out = {}
    torch_params = params
    if master:  # torch keeps no fp32 copy: its fused step runs on the bf16 params
        torch_params = [p.detach().bfloat16().requires_grad_() for p in params]
        for p, q in zip(params, torch_params):
            q.grad = p.grad
    out["eager"] = (torch.optim.AdamW(torch_params, lr=1e-3, fused=True), torch_params)
    out["torch-foreach"] = (torch.optim.AdamW(torch_params, lr=1e-3, foreach=True), torch_params)
    ours = fastdl.optim.AdamW(params, lr=1e-3, master_weights=master, max_grad_norm=1.0 if clip else None)
    for name in H.fastdl_providers(ctx, OP, lambda: None, probe=lambda: _probe(ctx, params[0].dtype)):
        out[name] = (ours, params)
    return out


def _probe(ctx, dtype):
    import fastdl
    p = torch.zeros(3, device=ctx.device, dtype=dtype, requires_grad=True)
    p.grad = torch.ones_like(p)
    fastdl.optim.AdamW([p]).step()


def _step_fn(name, opt, params, clip):
    import fastdl
    backend = name.split("-", 1)[1] if name.startswith("fastdl-") else None

    def step():
        if backend is not None:
            with fastdl.use_backend(backend, op=OP):
                opt.step()
        else:
            if clip:
                torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
            opt.step()
    return step


def _check(ctx, dtype, master, clip):
    """One step of every provider on a small model against torch's fp32 AdamW
    (with clip_grad_norm_) on fp32 copies."""
    dev = ctx.device
    shapes = [(257, 129), (4099,), (1,)]
    init = [torch.randn(s, device=dev).to(dtype) for s in shapes]
    grads = [torch.randn(s, device=dev).to(dtype) for s in shapes]
    exact = [p.detach().float().clone().requires_grad_() for p in init]
    for p, g in zip(exact, grads):
        p.grad = g.float()
    if clip:
        torch.nn.utils.clip_grad_norm_(exact, 1.0)
    torch.optim.AdamW(exact, lr=1e-3).step()
    params = [p.detach().clone().requires_grad_() for p in init]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    for name, (opt, ps) in _optimizers(ctx, params, master, clip).items():
        snapshot = [p.detach().clone() for p in ps]
        _step_fn(name, opt, ps, clip)()
        if ps[0].dtype == torch.float32:
            # Compare the updates, not the params: one step moves them by ~lr.
            H.check_close(name, [p.detach().double() - s.double() for p, s in zip(ps, snapshot)],
                          [e.detach().double() - i.detach().double() for e, i in zip(exact, init)], torch.float32)
        else:
            # A 1e-3 step is below bf16's resolution: the params themselves are the check.
            H.check_close(name, [p.detach() for p in ps], [e.detach() for e in exact], ps[0].dtype)
        for p, s in zip(ps, snapshot):
            p.data.copy_(s)
        opt.state.clear()


def run(ctx: H.Context) -> list:
    rows = []
    dev = ctx.device
    for dtype in ctx.torch_dtypes:
        if dtype == torch.float16:
            continue  # fp16 params are covered by the bf16 + master case
        master = dtype == torch.bfloat16
        grad_bytes = 2 if master else 4
        for clip in (False, True):
            _check(ctx, dtype, master, clip)
            for label, sizes in _cases(ctx):
                params = [torch.randn(n, device=dev).to(dtype).requires_grad_() for n in sizes]
                for p in params:
                    p.grad = torch.randn_like(p) * 1e-3
                opts = _optimizers(ctx, params, master, clip)
                providers = {name: _step_fn(name, opt, ps, clip) for name, (opt, ps) in opts.items()}
                n = sum(sizes)
                rows += H.measure(ctx, OP, "clip+step" if clip else "step", dtype, f"{label}",
                                  providers, bytes_moved=(28 + (grad_bytes if clip else 0)) * n,
                                  extra={"case": "master" if master else "plain", "tensors": len(sizes)})
                del opts, providers, params
                if dev == "cuda":
                    torch.cuda.empty_cache()
    return rows


if __name__ == "__main__":
    H.main(run, OP)
