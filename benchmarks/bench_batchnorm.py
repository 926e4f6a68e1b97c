"""BatchNorm family on ResNet-50's BN layer shapes (batch 256), NCHW and
channels_last: training BN+ReLU and BN+add+ReLU (forward, backward, full)
and eval BN+ReLU (forward).

Bytes model (elt = element size, N = elements of the input), what the
two-pass kernels must move:
  train fwd       stats read x; normalize read x (+ residual), write y   3 N elt (+ N with residual)
  train bwd       pass 1 read g, x; pass 2 read g, x, write dx           5 N elt
    with residual pass 1 read g, x, r, write dz (= d residual);
                  pass 2 read g, x, r, write dx (dz recomputed in fp32)  8 N elt
  eval fwd        read x, write y                                        2 N elt
Per-channel tensors (C floats) are negligible and not counted.
Providers: fastdl-cuda, fastdl-triton, torch eager (F.batch_norm, then
+ residual, then F.relu), torch.compile of that composite.
Bars (issue 4, H100): BN+ReLU full >= 1.5x eager; BN+add+ReLU full >= 1.8x
eager and >= 1.0x compile; >= 80% of copy bandwidth for these bytes.
"""
import torch
import torch.nn.functional as F

from benchmarks import harness as H

OP = "batchnorm"

# (C, H*W side) of ResNet-50's BatchNorm layers: stem, then each stage's
# bottleneck widths and outputs.
RESNET50 = [(64, 112), (64, 56), (256, 56), (128, 28), (512, 28), (256, 14), (1024, 14), (512, 7), (2048, 7)]


def _shapes(ctx):
    if ctx.smoke:
        return [(4, 8, 5, 5)]
    layers = [(64, 56), (256, 56), (1024, 14), (2048, 7)] if ctx.quick else RESNET50
    return [(256, c, s, s) for c, s in layers]


def _eager(x, rm, rv, w, b, residual=None, training=True):
    y = F.batch_norm(x, rm, rv, w, b, training, 0.1, 1e-5)
    if residual is not None:
        y = y + residual
    return F.relu(y)


def run(ctx: H.Context) -> list:
    import fastdl.functional as FF
    rows = []
    dev = ctx.device
    for dtype in ctx.torch_dtypes:
        elt = torch.tensor([], dtype=dtype).element_size()
        for shape in _shapes(ctx):
            c, n = shape[1], shape[0] * shape[1] * shape[2] * shape[3]
            for layout in ("channels_last", "nchw"):
                torch._dynamo.reset()  # each shape and layout compiles afresh, not past the recompile limit
                fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
                x = torch.randn(shape, device=dev, dtype=dtype).to(memory_format=fmt).requires_grad_()
                r = torch.randn(shape, device=dev, dtype=dtype).to(memory_format=fmt).requires_grad_()
                w = torch.rand(c, device=dev).add_(0.5).requires_grad_()
                b = torch.randn(c, device=dev).requires_grad_()
                # Own running stats per provider: torch's backward saves them, and
                # another provider's forward would bump their version.
                stats = {p: (torch.zeros(c, device=dev), torch.ones(c, device=dev))
                         for p in ("eager", "compile", "fastdl")}
                label = f"{'x'.join(map(str, shape))} {layout}"

                for case, res in (("bn_relu", None), ("bn_add_relu", r)):
                    inputs = [x, w, b] + ([r] if res is not None else [])
                    fwd = {"eager": lambda res=res: _eager(x, *stats["eager"], w, b, res),
                           "compile": H.compiled(_eager, x, *stats["compile"], w, b, res),
                           **H.fastdl_providers(ctx, OP, lambda res=res: FF.batch_norm(
                               x, *stats["fastdl"], w, b, True, act="relu", residual=res))}
                    fwd_bytes = (3 + (res is not None)) * n * elt
                    bwd_bytes = (8 if res is not None else 5) * n * elt
                    with torch.no_grad():
                        rows += H.measure(ctx, OP, "fwd", dtype, label, fwd, bytes_moved=fwd_bytes,
                                          extra={"case": case})
                    bwd = {k: H.backward_of(v, inputs) for k, v in fwd.items()}
                    rows += H.measure(ctx, OP, "bwd", dtype, label, bwd, bytes_moved=bwd_bytes,
                                      extra={"case": case})
                    full = {k: H.full_of(v, inputs) for k, v in fwd.items()}
                    rows += H.measure(ctx, OP, "full", dtype, label, full, bytes_moved=fwd_bytes + bwd_bytes,
                                      extra={"case": case})

                rm, rv = stats["eager"]
                ev = {"eager": lambda: _eager(x, rm, rv, w, b, training=False),
                      "compile": H.compiled(lambda x: _eager(x, rm, rv, w, b, training=False), x),
                      **H.fastdl_providers(ctx, OP, lambda: FF.batch_norm(x, rm, rv, w, b, False, act="relu"))}
                with torch.no_grad():
                    rows += H.measure(ctx, OP, "fwd", dtype, label, ev, bytes_moved=2 * n * elt,
                                      extra={"case": "eval_bn_relu"})
                del x, r
    return rows


if __name__ == "__main__":
    H.main(run, OP)
