"""Norm family: LayerNorm and RMSNorm forward / backward / full, and the fused
add + norm of a pre-norm block.

Bytes model (elt = element size, N = rows * hidden; the weight, bias, mean
and rstd are O(hidden + rows) and left out):
  norm fwd       read x, write y                              2 N elt
  norm bwd       read x, g, write dx                          3 N elt
  norm full      fwd + bwd                                    5 N elt
  add+norm full  fwd: read x, r, write y, s (4 N elt);
                 bwd: read g_y, s, write dx (3 N elt)         7 N elt
                 (the timed loss uses y only: the harness differentiates
                 one output; s's gradient would add one read of N elt)
Providers: fastdl-cuda, fastdl-triton, torch eager (F.layer_norm / F.rms_norm;
for add+norm: `s = x + r` then the norm), torch.compile of the same, and
Liger-Kernel (LigerLayerNorm / LigerRMSNorm) when it is installed.
Bars (issue 3, H100): forward >= 90% of copy bandwidth for hidden >= 1024;
full >= 1.5x eager and >= 1.0x compile and Liger at every hidden size;
add+norm full >= 1.3x eager.
"""
import torch
import torch.nn.functional as F

from benchmarks import harness as H

OP = "norm"
HIDDEN = [256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536]


def _sizes(ctx):
    if ctx.smoke:
        return [(64, 256), (8, 1000)]
    if ctx.quick:
        return [(4096, 1024), (4096, 4096), (4096, 16384), (4096, 65536)]
    # rows 4096 and 32768 for every hidden, up to 2^28 elements a tensor.
    return [(r, h) for h in HIDDEN for r in (4096, 32768) if r * h <= 2**28]


def _liger(kind, hidden, eps, weight, bias, device):
    """A Liger module holding our weight, or None when Liger is not installed."""
    try:
        if kind == "layer":
            from liger_kernel.transformers.layer_norm import LigerLayerNorm
            m = LigerLayerNorm(hidden, eps=eps, bias=True)
        else:
            from liger_kernel.transformers.rms_norm import LigerRMSNorm
            # in_place=False: Liger would otherwise write dx into the
            # upstream gradient, which the timing loop reuses.
            m = LigerRMSNorm(hidden, eps=eps, in_place=False)
    except ImportError:
        return None
    m = m.to(device=device, dtype=weight.dtype)
    with torch.no_grad():
        m.weight.copy_(weight)
        if bias is not None:
            m.bias.copy_(bias)
    return m


def _bench_shape(ctx: H.Context, dtype: torch.dtype, r: int, h: int) -> list:
    import fastdl.functional as FF
    rows = []
    dev, eps = ctx.device, 1e-5
    elt = torch.tensor([], dtype=dtype).element_size()
    shape, n = f"{r}x{h}", r * h
    x = torch.randn(r, h, device=dev, dtype=dtype, requires_grad=True)
    res = torch.randn(r, h, device=dev, dtype=dtype, requires_grad=True)
    w = (torch.rand(h, device=dev, dtype=dtype) + 0.5).requires_grad_()
    b = torch.randn(h, device=dev, dtype=dtype, requires_grad=True)

    def eager_layer(x, w, b):
        return F.layer_norm(x, (h,), w, b, eps)

    def eager_rms(x, w):
        return F.rms_norm(x, (h,), w, eps)

    for kind in ("layer", "rms"):
        if kind == "layer":
            fwd = {"eager": lambda: eager_layer(x, w, b), "compile": H.compiled(eager_layer, x, w, b),
                   **H.fastdl_providers(ctx, OP, lambda: FF.layer_norm(x, (h,), w, b, eps))}
            params = [x, w, b]
        else:
            fwd = {"eager": lambda: eager_rms(x, w), "compile": H.compiled(eager_rms, x, w),
                   **H.fastdl_providers(ctx, OP, lambda: FF.rms_norm(x, (h,), w, eps))}
            params = [x, w]
        params_of = {}
        liger = _liger(kind, h, eps, w.detach(), b.detach() if kind == "layer" else None, dev)
        if liger is not None:
            fwd["liger"] = lambda liger=liger: liger(x)
            params_of["liger"] = [x, *liger.parameters()]
        extra = {"case": f"{kind}_norm"}
        with torch.no_grad():
            rows += H.measure(ctx, OP, "fwd", dtype, shape, fwd, bytes_moved=2 * n * elt, extra=extra)
        bwd = {k: H.backward_of(f, params_of.get(k, params)) for k, f in fwd.items()}
        rows += H.measure(ctx, OP, "bwd", dtype, shape, bwd, bytes_moved=3 * n * elt, extra=extra)
        full = {k: H.full_of(f, params_of.get(k, params)) for k, f in fwd.items()}
        rows += H.measure(ctx, OP, "full", dtype, shape, full, bytes_moved=5 * n * elt, extra=extra)

    # add + rms_norm, as in a pre-norm block (s, the new residual stream, is
    # produced but only y enters the timed loss).
    def eager_add(x, res, w):
        return F.rms_norm(x + res, (h,), w, eps)
    add = {"eager": H.full_of(lambda: eager_add(x, res, w), [x, res, w]),
           "compile": H.full_of(H.compiled(eager_add, x, res, w), [x, res, w]),
           **{k: H.full_of(f, [x, res, w]) for k, f in H.fastdl_providers(
               ctx, OP, lambda: FF.add_rms_norm(x, res, (h,), w, eps)[0]).items()}}
    rows += H.measure(ctx, OP, "full", dtype, shape, add, bytes_moved=7 * n * elt,
                      extra={"case": "add_rms_norm"})
    return rows


def run(ctx: H.Context) -> list:
    rows = []
    for dtype in ctx.torch_dtypes:
        for r, h in _sizes(ctx):
            rows += _bench_shape(ctx, dtype, r, h)
            if ctx.device == "cuda":
                torch.cuda.empty_cache()
    return rows


if __name__ == "__main__":
    H.main(run, OP)
