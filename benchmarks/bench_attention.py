"""Attention forward and backward: fastdl (Triton, CUDA) against every torch
SDPA backend and torch.compile of the math path.

Shapes (the issue's sweep): B * N = 16k tokens, hidden 2048 so H = 2048 / D,
N = 512 .. 16k, D = 64 and 128, causal and not, Nq = Nk (so torch's top-left
is_causal and fastdl's bottom-right causal agree).
FLOPs model: forward 4 B H N^2 D (two matmuls of 2 B H N^2 D), half when
causal; backward 2.5x the forward (five matmuls; the recomputed QK^T counts
as the extra half).
Providers:
  eager            torch.nn.functional.scaled_dot_product_attention, torch's own backend choice
  torch-flash / torch-efficient / torch-cudnn / torch-math
                   the same call pinned to one backend with torch.nn.attention.sdpa_kernel
                   (a backend that cannot serve the shape on this machine is left out)
  compile          torch.compile of softmax(q k^T scale [+ causal mask]) v in the input dtype,
                   only where its N x N scores fit (<= 4 GiB)
  fastdl-triton / fastdl-cuda    fastdl.functional.flash_attention on that backend
  fastdl-triton-deterministic    backward only: deterministic=True (dQ without atomics)
"""
import torch
import torch.nn.functional as F

from benchmarks import harness as H

OP = "attention"
TOKENS, HIDDEN = 16384, 2048
SCORES_LIMIT = 4 * 2**30  # bytes of fp32 scores the math path may materialize


def _shapes(ctx):
    """(B, H, N, D) per the model above."""
    if ctx.smoke:
        return [(1, 2, 64, 32)]
    ns = [1024, 4096, 16384] if ctx.quick else [512, 1024, 2048, 4096, 8192, 16384]
    return [(TOKENS // n, HIDDEN // d, n, d) for d in (64, 128) for n in ns]


def _math_attention(q, k, v, causal):
    s = q @ k.transpose(-1, -2) * (q.shape[-1] ** -0.5)
    if causal:
        n = s.shape[-1]
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    return torch.softmax(s, dim=-1) @ v


def _sdpa_providers(ctx, q, k, v, causal):
    """torch SDPA, automatic and pinned to each backend that accepts this call."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def pinned(backend):
        def call():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return call

    out = {"eager": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)}
    names = {"torch-flash": "FLASH_ATTENTION", "torch-efficient": "EFFICIENT_ATTENTION",
             "torch-cudnn": "CUDNN_ATTENTION", "torch-math": "MATH"}
    scores = q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] * 4
    for name, attr in names.items():
        backend = getattr(SDPBackend, attr, None)
        if backend is None or (attr == "MATH" and scores > SCORES_LIMIT):
            continue
        try:
            with torch.no_grad():
                pinned(backend)()
        except RuntimeError:  # "No available kernel": this backend cannot serve the shape here
            continue
        out[name] = pinned(backend)
    if scores <= SCORES_LIMIT:
        out["compile"] = H.compiled(_math_attention, q, k, v, causal)
    return out


def run(ctx: H.Context) -> list:
    import fastdl.functional as FF
    rows = []
    dev = ctx.device
    # fp32 attention is not what this benchmark is about (torch's flash/cuDNN take
    # fp16/bf16 only); on the CPU smoke run the interpreter takes fp32 only.
    dtypes = [torch.float32] if ctx.smoke else [d for d in ctx.torch_dtypes if d != torch.float32]
    for dtype in dtypes:
        for b, h, n, d in _shapes(ctx):
            for causal in (False, True):
                shape = f"{b}x{h}x{n}x{d}"
                extra = {"case": "causal" if causal else "full", "B": b, "H": h, "N": n, "D": d}
                q, k, v = (torch.randn(b, h, n, d, device=dev, dtype=dtype, requires_grad=True) for _ in range(3))
                flops = 4 * b * h * n * n * d * (0.5 if causal else 1.0)
                fwd = {**_sdpa_providers(ctx, q, k, v, causal),
                       **H.fastdl_providers(ctx, OP, lambda: FF.flash_attention(q, k, v, causal=causal))}
                with torch.no_grad():
                    rows += H.measure(ctx, OP, "fwd", dtype, shape, fwd, flops=flops, extra=extra)
                bwd = {name: H.backward_of(fn, [q, k, v]) for name, fn in fwd.items()}
                if "fastdl-triton" in fwd:
                    det = H.fastdl_providers(
                        ctx, OP, lambda: FF.flash_attention(q, k, v, causal=causal, deterministic=True))
                    if "fastdl-triton" in det:
                        bwd["fastdl-triton-deterministic"] = H.backward_of(det["fastdl-triton"], [q, k, v])
                rows += H.measure(ctx, OP, "bwd", dtype, shape, bwd, flops=2.5 * flops, extra=extra)
                del q, k, v, fwd, bwd
                if dev == "cuda":
                    torch.cuda.empty_cache()
    return rows


if __name__ == "__main__":
    H.main(run, OP)
