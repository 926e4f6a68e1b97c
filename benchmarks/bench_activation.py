"""Activation family: GELU forward/backward, bias+GELU, GEGLU/SwiGLU.

Bytes model (elt = element size, N = elements of the input):
  gelu fwd      read x, write y                     2 N elt
  gelu bwd      read g, x, write dx                 3 N elt
  bias+gelu     fwd 2 N elt + bwd 3 N elt + the bias-grad reduction reading dx (N elt)
  geglu/swiglu  x is (rows, 2h): fwd reads 2h, writes h per row; bwd reads 2h + h, writes 2h
Providers: fastdl-cuda, fastdl-triton, torch eager (the unfused composite),
torch.compile of that composite.
"""
import torch
import torch.nn.functional as F

from benchmarks import harness as H

OP = "activation"


def _sizes(ctx):
    if ctx.smoke:
        return [(64, 256)]
    if ctx.quick:
        return [(4096, 4096), (32768, 8192)]
    # 8 x 128: per-call dispatch overhead (the bytes are negligible); then
    # 2^20 .. 2^28 elements in rows of 4096 (the MLP width of a 1B model).
    return [(8, 128), (256, 4096), (4096, 4096), (16384, 4096), (65536, 4096)]


def run(ctx: H.Context) -> list:
    import fastdl.functional as FF
    rows = []
    dev = ctx.device
    for dtype in ctx.torch_dtypes:
        elt = torch.tensor([], dtype=dtype).element_size()
        for r, c in _sizes(ctx):
            shape, n = f"{r}x{c}", r * c
            x = torch.randn(r, c, device=dev, dtype=dtype, requires_grad=True)
            b = torch.randn(c, device=dev, dtype=dtype, requires_grad=True)

            # gelu, forward only and backward only
            fwd = {"eager": lambda: F.gelu(x), "compile": H.compiled(F.gelu, x),
                   **H.fastdl_providers(ctx, OP, lambda: FF.gelu(x))}
            with torch.no_grad():
                rows += H.measure(ctx, OP, "fwd", dtype, shape, fwd, bytes_moved=2 * n * elt,
                                  extra={"case": "gelu"})
            bwd = {name: H.backward_of(fn, [x]) for name, fn in fwd.items()}
            rows += H.measure(ctx, OP, "bwd", dtype, shape, bwd, bytes_moved=3 * n * elt,
                              extra={"case": "gelu"})

            # bias + gelu, forward + backward
            def eager_bias_gelu(x, b):
                return F.gelu(x + b)
            full = {"eager": H.full_of(lambda: eager_bias_gelu(x, b), [x, b]),
                    "compile": H.full_of(H.compiled(eager_bias_gelu, x, b), [x, b]),
                    **{k: H.full_of(v, [x, b]) for k, v in
                       H.fastdl_providers(ctx, OP, lambda: FF.gelu(x, bias=b)).items()}}
            rows += H.measure(ctx, OP, "full", dtype, shape, full, bytes_moved=6 * n * elt,
                              extra={"case": "bias_gelu"})

            # gated: x is (rows, 2h)
            for case, ours, ref in (("geglu", FF.geglu, lambda x: F.gelu(x.chunk(2, -1)[0]) * x.chunk(2, -1)[1]),
                                    ("swiglu", FF.swiglu, lambda x: F.silu(x.chunk(2, -1)[0]) * x.chunk(2, -1)[1])):
                gated = {"eager": H.full_of(lambda: ref(x), [x]),
                         "compile": H.full_of(H.compiled(ref, x), [x]),
                         **{k: H.full_of(v, [x]) for k, v in
                            H.fastdl_providers(ctx, OP, lambda: ours(x)).items()}}
                # fwd: read N, write N/2; bwd: read N + N/2, write N
                rows += H.measure(ctx, OP, "full", dtype, shape, gated, bytes_moved=4 * n * elt,
                                  extra={"case": case})
            del x, b
    return rows


if __name__ == "__main__":
    H.main(run, OP)
