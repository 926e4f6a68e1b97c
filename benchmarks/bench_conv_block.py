"""Conv + BatchNorm + activation blocks: the layers of ResNet-50's bottlenecks
(batch 256, channels_last), inference and training.

Cases (C_in -> C_out, kernel, stride, spatial in):
  stem        3 -> 64,    7x7 s2, 224      (ReLU)
  lN_reduce   1x1 into the bottleneck width (ReLU)
  lN_3x3      3x3 at the bottleneck width (ReLU); l2_3x3_s2 is v1.5's strided one
  lN_expand   1x1 back out, + identity residual, then ReLU (the block tail)
Modes:
  infer  eval, no_grad: fastdl's ConvBNAct2d with BN folded (cached) into one
         implicit-GEMM kernel with bias + residual + ReLU in its epilogue
  full   training forward + backward (grads of input, conv weight, BN affine)
FLOPs model: the convolution, 2 * N * H_out * W_out * C_out * C_in * k * k per
forward; `full` counts 3x (forward, grad input, grad weight). BN and the
elementwise work are not counted (memory-bound, small against the GEMM).
Providers: fastdl-<backend> (ConvBNAct2d), eager (nn.Conv2d + nn.BatchNorm2d
+ add + ReLU on cuDNN), compile (torch.compile of the eager modules).
"""
import copy

import torch
from torch import nn

from benchmarks import harness as H

OP = "conv_block"

# name: (C_in, C_out, kernel, stride, H_in, residual)
LAYERS = {
    "stem": (3, 64, 7, 2, 224, False),
    "l1_reduce": (256, 64, 1, 1, 56, False),
    "l1_3x3": (64, 64, 3, 1, 56, False),
    "l1_expand": (64, 256, 1, 1, 56, True),
    "l2_3x3_s2": (128, 128, 3, 2, 56, False),
    "l2_expand": (128, 512, 1, 1, 28, True),
    "l3_reduce": (1024, 256, 1, 1, 14, False),
    "l3_3x3": (256, 256, 3, 1, 14, False),
    "l3_expand": (256, 1024, 1, 1, 14, True),
    "l4_3x3": (512, 512, 3, 1, 7, False),
    "l4_expand": (512, 2048, 1, 1, 7, True),
}


def _cases(ctx):
    if ctx.smoke:
        return 2, {"l1_3x3": (8, 8, 3, 1, 6, False), "l1_expand": (8, 16, 1, 1, 6, True),
                   "stem": (3, 8, 7, 2, 12, False)}
    if ctx.quick:
        return 256, {k: LAYERS[k] for k in ("l1_3x3", "l1_expand", "l3_3x3")}
    return 256, LAYERS


class Eager(nn.Module):
    def __init__(self, block):
        super().__init__()
        self.conv, self.bn, self.relu = copy.deepcopy(block.conv), copy.deepcopy(block.bn), nn.ReLU()

    def forward(self, x, r=None):
        y = self.bn(self.conv(x))
        return self.relu(y if r is None else y + r)


def run(ctx: H.Context) -> list:
    import fastdl

    rows = []
    dev = ctx.device
    batch, layers = _cases(ctx)
    dtypes = ctx.torch_dtypes
    if ctx.smoke:  # the interpreter's bf16 tl.dot is wrong: CPU smoke runs fp32
        dtypes = [torch.float32]
    for dtype in dtypes:
        for name, (cin, cout, k, s, h, res) in layers.items():
            block = fastdl.nn.ConvBNAct2d(cin, cout, k, stride=s, padding=k // 2).to(dev, dtype)
            with torch.no_grad():
                block.bn.weight.uniform_(0.5, 1.5)
                block.bn.bias.normal_(0, 0.1)
                block.bn.running_var.uniform_(0.5, 1.5)
            eager = Eager(block).to(memory_format=torch.channels_last)
            x = torch.randn(batch, cin, h, h, device=dev, dtype=dtype).to(memory_format=torch.channels_last)
            oh = (h + 2 * (k // 2) - k) // s + 1
            r = (torch.randn(batch, cout, oh, oh, device=dev, dtype=dtype).to(memory_format=torch.channels_last)
                 if res else None)
            flops = 2 * batch * oh * oh * cout * cin * k * k
            shape = f"{batch}x{cin}x{h}x{h}->{cout} k{k}s{s}" + (" +res" if res else "")
            extra = {"case": name}

            # inference
            block.eval()
            eager.eval()
            compiled = torch.compile(eager)
            infer = {"eager": lambda: eager(x, r), "compile": lambda: compiled(x, r),
                     **H.fastdl_providers(ctx, OP, lambda: block(x, r))}
            with torch.no_grad():
                rows += H.measure(ctx, OP, "infer", dtype, shape, infer, flops=flops, extra=extra)

            # training forward + backward
            block.train()
            eager.train()
            compiled_t = torch.compile(eager)
            xg = x.detach().requires_grad_()

            def params(m):
                return [xg, m.conv.weight, m.bn.weight, m.bn.bias]
            full = {"eager": H.full_of(lambda: eager(xg, r), params(eager)),
                    "compile": H.full_of(lambda: compiled_t(xg, r), params(eager)),
                    **{p: H.full_of(fn, params(block)) for p, fn in
                       H.fastdl_providers(ctx, OP, lambda: block(xg, r)).items()}}
            rows += H.measure(ctx, OP, "full", dtype, shape, full, flops=3 * flops, extra=extra)
            del block, eager, compiled, compiled_t, x, xg, r
            if dev == "cuda":
                torch.cuda.empty_cache()
    return rows


if __name__ == "__main__":
    H.main(run, OP)
