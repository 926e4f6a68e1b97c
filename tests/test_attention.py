"""Attention: flash_attention / scaled_dot_product_attention / varlen_attention /
MultiheadAttention against fp64 references, on every backend this machine has.

Accuracy criterion (FlashAttention's): the kernel's max error against the
fp64 reference may be at most 2x the error of PyTorch computing the same
attention in the inputs' own precision (plus a tiny floor), for the output and
for every gradient. Under the Triton interpreter (CPU) the cases use fp16/fp32
and small sizes (tl.dot on bf16 is broken there); long sequences and bf16 run
on CUDA only.
"""
import sys
import types
import warnings

import pytest
import torch

import fastdl
import fastdl.functional as FF
import reference as ref
from conftest import HAS_CUDA, NO_GPU, backend_cases
from fastdl._ops import attention as attn_ops

CASES = backend_cases(native_cpu=False)
KERNEL_CASES = [c for c in CASES if c.values[1] != "torch"]
GPU = [pytest.mark.skipif(not HAS_CUDA, reason=NO_GPU), pytest.mark.gpu]
FLOOR = {torch.float32: 2e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}


@pytest.fixture(autouse=True)
def _backend_runs_here(request):
    """Skip a (device, backend) case this machine cannot run (say, Triton on
    CPU tensors without the interpreter, or a build without CUDA kernels)."""
    params = getattr(getattr(request.node, "callspec", None), "params", {})
    if "device" in params and "backend" in params:
        why = fastdl._backend._why_not(fastdl._backend.OPS["attention"], params["backend"], params["device"])
        if why:
            pytest.skip(f"backend {params['backend']} cannot run on {params['device']} here: {why}")


def _skip_if_unserved(backend, q, k, v, mask=None, varlen=False, causal="none", dropout_p=0.0):
    why = attn_ops._unsupported(q, k, v, mask, varlen, causal, dropout_p).get(backend)
    if why:
        pytest.skip(f"backend {backend} does not serve this call: {why}")


def _qkv(b, hq, hkv, nq, nk, d, dtype, device, grad=True):
    make = lambda *s: torch.randn(*s, dtype=dtype, device=device).requires_grad_(grad)  # noqa: E731
    return make(b, hq, nq, d), make(b, hkv, nk, d), make(b, hkv, nk, d)


def _assert_within(name, got, want, lowp, dtype):
    """max |got - want| <= 2 max |lowp - want| + floor (want: fp64 reference)."""
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    err = (got.double() - want).abs().max().item() if want.numel() else 0.0
    base = (lowp.double() - want).abs().max().item() if want.numel() else 0.0
    bound = 2 * base + FLOOR[dtype]
    assert err <= bound, f"{name}: max error {err:.3g} > 2 x torch's own {base:.3g} + {FLOOR[dtype]:g}"


def _check_against_reference(run, q, k, v, ref_kwargs, dtype):
    """run() -> out on (q, k, v); compares out and its gradients with the fp64
    reference and with the reference computed in `dtype` (torch's own error)."""
    out = run()
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    leaves64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out64, lse64 = ref.attention(*leaves64, **ref_kwargs)
    grads64 = torch.autograd.grad(out64, leaves64, g.double())
    lowp_leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out_lp, _ = ref.attention(*lowp_leaves, **ref_kwargs, dtype=dtype)
    grads_lp = torch.autograd.grad(out_lp, lowp_leaves, g)
    assert out.dtype == dtype
    _assert_within("out", out, out64, out_lp, dtype)
    for name, a, e, lp in zip(("dq", "dk", "dv"), grads, grads64, grads_lp):
        assert a.dtype == dtype
        _assert_within(name, a, e, lp, dtype)


# (B, Hq, Hkv, Nq, Nk, D, causal, dtype): length 1, primes, just past a block,
# Nq != Nk both ways (bottom-right causal with Nq > Nk leaves rows that see no
# key), GQA groups 1/2/8, D = 8 .. 256 with non powers of two.
SMALL = [
    (1, 1, 1, 1, 1, 8, False, torch.float32),
    (1, 2, 1, 17, 17, 40, True, torch.float16),
    (2, 2, 2, 97, 97, 64, True, torch.float16),
    (1, 2, 2, 128, 128, 128, False, torch.float16),
    (1, 8, 1, 17, 97, 72, True, torch.float32),
    (1, 2, 1, 97, 17, 256, True, torch.float16),
    (1, 4, 2, 33, 17, 136, False, torch.float32),
    (1, 2, 2, 1, 128, 64, True, torch.float16),
]
LARGE = [  # CUDA only: long sequences, bf16, the CUDA kernel's head dims
    (2, 16, 2, 1000, 1000, 128, True, torch.bfloat16),
    (1, 8, 8, 4097, 4097, 64, False, torch.bfloat16),
    (1, 4, 1, 1000, 4097, 128, True, torch.float16),
    (1, 4, 4, 4097, 1000, 64, True, torch.bfloat16),
    (2, 8, 4, 1000, 1000, 256, False, torch.bfloat16),
    (1, 2, 2, 1000, 1000, 96, True, torch.float32),
]
SHAPE_CASES = [pytest.param(*c, id=f"{c[0]}x{c[1]}/{c[2]}x{c[3]}x{c[4]}xd{c[5]}-{'causal' if c[6] else 'full'}-"
                            f"{str(c[7])[6:]}") for c in SMALL]
SHAPE_CASES += [pytest.param(*c, id=f"{c[0]}x{c[1]}/{c[2]}x{c[3]}x{c[4]}xd{c[5]}-{'causal' if c[6] else 'full'}-"
                             f"{str(c[7])[6:]}", marks=GPU) for c in LARGE]


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("b,hq,hkv,nq,nk,d,causal,dtype", SHAPE_CASES)
def test_flash_attention(device, backend, b, hq, hkv, nq, nk, d, causal, dtype):
    if device == "cpu" and nq * nk > 2**16:
        pytest.skip("large case: CUDA only")
    q, k, v = _qkv(b, hq, hkv, nq, nk, d, dtype, device)
    _skip_if_unserved(backend, q, k, v, causal="bottom_right" if causal else "none")
    res = {}

    def run():
        with fastdl.use_backend(backend):
            res["out"], res["lse"] = FF.flash_attention(q, k, v, causal=causal, return_lse=True)
        return res["out"]

    _check_against_reference(run, q, k, v, dict(causal="bottom_right" if causal else "none"), dtype)
    _, lse64 = ref.attention(q.double(), k.double(), v.double(), causal="bottom_right" if causal else "none")
    assert res["lse"].dtype == torch.float32 and res["lse"].shape == lse64.shape
    assert torch.equal(torch.isneginf(res["lse"]), torch.isneginf(lse64)), "lse: rows that see no key"
    seen = ~torch.isneginf(lse64)
    torch.testing.assert_close(res["lse"][seen].double(), lse64[seen], atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("device,backend", CASES)
def test_strided_and_empty_inputs(device, backend):
    """q/k/v as views of a (B, N, H, D) projection (the usual layout), a k whose
    last dim is strided, and empty batches / sequences."""
    dt = torch.float32
    qkv = torch.randn(2, 19, 3, 4, 16, device=device)  # (B, N, 3, H, D)
    q, k, v = (t.transpose(1, 2).requires_grad_() for t in qkv.unbind(2))
    k_strided = torch.randn(2, 4, 16, 19, device=device).transpose(-1, -2).requires_grad_()
    with fastdl.use_backend(backend):
        _check_against_reference(lambda: FF.flash_attention(q, k, v, causal=True), q, k, v,
                                 dict(causal="bottom_right"), dt)
        _check_against_reference(lambda: FF.flash_attention(q, k_strided, v), q, k_strided, v, dict(), dt)
        for nq, nk, b in ((0, 5, 2), (5, 0, 2), (5, 5, 0)):
            q0, k0, v0 = _qkv(b, 2, 1, nq, nk, 8, dt, device)
            out, lse = FF.flash_attention(q0, k0, v0, causal=True, return_lse=True)
            assert out.shape == q0.shape and lse.shape == (b, 2, nq)
            assert (out == 0).all() and torch.isneginf(lse).all()
            grads = torch.autograd.grad(out.sum(), (q0, k0, v0), allow_unused=True)
            assert all(g is None or (g.shape == t.shape and (g == 0).all()) for g, t in zip(grads, (q0, k0, v0)))


@pytest.mark.parametrize("device,backend", CASES)
def test_sdpa_semantics(device, backend):
    """torch SDPA's conventions: top-left causal with L != S, enable_gqa, scale,
    bool and additive masks broadcast from smaller shapes, extra batch dims."""
    dt = torch.float32
    q, k, v = _qkv(2, 4, 2, 23, 37, 16, dt, device)
    with fastdl.use_backend(backend):
        _check_against_reference(
            lambda: FF.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3, enable_gqa=True),
            q, k, v, dict(causal="top_left", scale=0.3), dt)
        q2, k2, v2 = _qkv(2, 2, 2, 37, 23, 16, dt, device)
        _check_against_reference(lambda: FF.scaled_dot_product_attention(q2, k2, v2, is_causal=True),
                                 q2, k2, v2, dict(causal="top_left"), dt)
        keep = torch.rand(2, 1, 1, 37, device=device) > 0.3  # a key padding mask
        keep[..., 0] = True
        _check_against_reference(
            lambda: FF.scaled_dot_product_attention(q, k, v, attn_mask=keep, enable_gqa=True),
            q, k, v, dict(attn_mask=keep.expand(2, 4, 23, 37)), dt)
        bias = torch.randn(23, 37, device=device)
        _check_against_reference(
            lambda: FF.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=True),
            q, k, v, dict(attn_mask=bias.expand(2, 4, 23, 37)), dt)
        q5 = torch.randn(2, 3, 2, 9, 16, device=device)  # (N, batch, H, L, E)
        k5, v5 = torch.randn(2, 3, 2, 11, 16, device=device), torch.randn(2, 3, 2, 11, 16, device=device)
        out = FF.scaled_dot_product_attention(q5, k5, v5)
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q5, k5, v5),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("dtype", [torch.float16, pytest.param(torch.bfloat16, marks=GPU)])
def test_masks_low_precision(device, backend, dtype):
    """Additive masks in q's dtype and in fp32 (with -inf entries), and a bool
    mask that hides every key of some rows (they output 0, gradients 0)."""
    q, k, v = _qkv(1, 2, 2, 40, 33, 32, dtype, device)
    add = torch.randn(1, 2, 40, 33, device=device).masked_fill(torch.rand(1, 2, 40, 33, device=device) < 0.2,
                                                               float("-inf"))
    keep = torch.rand(1, 1, 40, 33, device=device) > 0.5
    keep[:, :, 3] = False
    _skip_if_unserved(backend, q, k, v, mask=keep)
    for mask in (add.to(dtype), add, keep):
        with fastdl.use_backend(backend):
            _check_against_reference(lambda: FF.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                                     q, k, v, dict(attn_mask=mask.expand(1, 2, 40, 33)), dtype)
    with fastdl.use_backend(backend):
        out = FF.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        dq, = torch.autograd.grad(out.sum(), q)
    assert out[:, :, 3].abs().max() == 0 and dq[:, :, 3].abs().max() == 0 and dq.isfinite().all()


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_varlen(device, backend, causal):
    """Packed sequences (one empty, one of length 1) against per-sequence references;
    the gradients of the packed inputs are checked too."""
    dt = torch.float16
    lens_q, lens_k = [5, 0, 1, 37, 20], [9, 3, 1, 37, 13]
    cu_q = torch.tensor([0] + lens_q, device=device).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0] + lens_k, device=device).cumsum(0).to(torch.int32)
    q = torch.randn(sum(lens_q), 4, 24, device=device, dtype=dt, requires_grad=True)
    k = torch.randn(sum(lens_k), 2, 24, device=device, dtype=dt, requires_grad=True)
    v = torch.randn(sum(lens_k), 2, 24, device=device, dtype=dt, requires_grad=True)
    mode = "bottom_right" if causal else "none"
    with fastdl.use_backend(backend):
        out = FF.varlen_attention(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    leaves64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out64 = ref.varlen_attention(*leaves64, cu_q, cu_k, mode)
    grads64 = torch.autograd.grad(out64, leaves64, g.double())
    leaves_lp = [t.detach().requires_grad_() for t in (q, k, v)]
    out_lp = ref.varlen_attention(*leaves_lp, cu_q, cu_k, mode, dtype=dt)
    grads_lp = torch.autograd.grad(out_lp, leaves_lp, g)
    _assert_within("out", out, out64, out_lp, dt)
    for name, a, e, lp in zip(("dq", "dk", "dv"), grads, grads64, grads_lp):
        _assert_within(name, a, e, lp, dt)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=GPU)])
def test_dropout(device):
    """Triton kernels: the mask replays from the seed (attention_dropout_mask),
    forward and gradients equal the reference run with that mask, the kept
    fraction is 1 - p, and another seed gives another mask."""
    p, dt = 0.3, torch.float32
    q, k, v = _qkv(2, 4, 2, 33, 47, 16, dt, device)
    with fastdl.use_backend("triton"):
        torch.manual_seed(7)
        out1 = FF.flash_attention(q, k, v, dropout_p=p)
        torch.manual_seed(7)
        out2 = FF.flash_attention(q, k, v, dropout_p=p)
        torch.manual_seed(7)
        keep = FF.attention_dropout_mask(2, 4, 33, 47, p, device=device)
        torch.manual_seed(8)
        other = FF.attention_dropout_mask(2, 4, 33, 47, p, device=device)
        torch.manual_seed(7)
        _check_against_reference(lambda: FF.flash_attention(q, k, v, dropout_p=p), q, k, v,
                                 dict(keep=keep, dropout_p=p), dt)
    assert torch.equal(out1, out2), "the same seed must give the same output"
    assert keep.shape == (2, 4, 33, 47) and keep.dtype == torch.bool
    frac = keep.float().mean().item()
    assert abs(frac - (1 - p)) < 0.02, f"kept fraction {frac:.3f}, expected {1 - p}"
    assert (keep != other).float().mean().item() > 0.3, "another seed must give another mask"
    big = FF.attention_dropout_mask(1, 1, 33, 1025, p, device=device)  # every row and key counter differs
    assert abs(big.float().mean().item() - (1 - p)) < 0.01
    assert not torch.equal(big[0, 0, 0], big[0, 0, 1]) and not torch.equal(big[0, 0, :, 0], big[0, 0, :, 1])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=GPU)])
def test_deterministic_backward(device):
    """deterministic=True: bitwise identical gradients run to run, equal (to
    rounding) to the atomic dQ path's."""
    dt = torch.float16
    q, k, v = _qkv(1, 4, 2, 67, 67, 32, dt, device)
    g = torch.randn(1, 4, 67, 32, dtype=dt, device=device)

    def grads(det):
        with fastdl.use_backend("triton"):
            out = FF.flash_attention(q, k, v, causal=True, deterministic=det)
        return torch.autograd.grad(out, (q, k, v), g)

    first, second, atomic = grads(True), grads(True), grads(False)
    for a, b, c in zip(first, second, atomic):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c, atol=2e-3, rtol=2e-3)


def test_fp32_dot_precision_follows_allow_tf32(monkeypatch):
    kernels = attn_ops._triton()
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    assert kernels._dot_precision(torch.float32) == "ieee"
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    assert kernels._dot_precision(torch.float32) == "tf32"


# --- registered ops ---------------------------------------------------------------------------
def _op_args(device, dtype):
    q, k, v = _qkv(2, 4, 2, 5, 7, 16, dtype, device, grad=False)
    return q, k, v


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=GPU)])
def test_opcheck_triton(device):
    q, k, v = _op_args(device, torch.float32)
    ops = torch.ops.fastdl
    mask = torch.rand(2, 1, 5, 7, device=device).expand(2, 4, 5, 7) > 0.3
    seed = torch.tensor(123, device=device)
    torch.library.opcheck(ops.attention_fwd_triton, (q, k, v, None, None, None, 0, 0, 0.5, "bottom_right", 0.0, None))
    args = (mask, None, None, 0, 0, 0.25, "top_left", 0.2, seed)
    torch.library.opcheck(ops.attention_fwd_triton, (q, k, v, *args))
    out, lse = ops.attention_fwd_triton(q, k, v, *args)
    torch.library.opcheck(ops.attention_bwd_triton, (torch.randn_like(out), q, k, v, out, lse, *args, False))
    cu = torch.tensor([0, 2, 5], device=device, dtype=torch.int32)
    qp, kp, vp = q[0, :, :5].transpose(0, 1), k[0, :, :5].transpose(0, 1), v[0, :, :5].transpose(0, 1)
    args = (None, cu, cu, 3, 3, 0.25, "bottom_right", 0.0, None)
    torch.library.opcheck(ops.attention_fwd_triton, (qp, kp, vp, *args))
    out, lse = ops.attention_fwd_triton(qp, kp, vp, *args)
    torch.library.opcheck(ops.attention_bwd_triton, (torch.randn_like(out), qp, kp, vp, out, lse, *args, True))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason=NO_GPU)
def test_opcheck_cuda():
    if not fastdl._backend.OPS["attention"].has_cuda:
        pytest.skip("fastdl._C has no CUDA flash attention kernel in this build")
    q, k, v = _qkv(2, 4, 2, 70, 130, 64, torch.float16, "cuda", grad=False)
    ops = torch.ops.fastdl
    for causal in (False, True):
        torch.library.opcheck(ops.flash_attn_fwd, (q, k, v, 0.125, causal))
        out, lse = ops.flash_attn_fwd(q, k, v, 0.125, causal)
        torch.library.opcheck(ops.flash_attn_bwd, (torch.randn_like(out), q, k, v, out, lse, 0.125, causal))


@pytest.mark.parametrize("device,backend", CASES)
def test_compile_fullgraph(device, backend):
    q, k, v = _qkv(1, 4, 2, 9, 13, 16, torch.float32, device)
    cu = torch.tensor([0, 4, 9], device=device, dtype=torch.int32)
    cuk = torch.tensor([0, 6, 13], device=device, dtype=torch.int32)
    mask = torch.rand(9, 13, device=device) > 0.2
    mask[:, 0] = True

    def f(q, k, v):
        a = FF.flash_attention(q, k, v, causal=True).sum()
        b = FF.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True).sum()
        if backend == "torch":  # its varlen loops over sequence lengths read from the device
            return a + b
        c = FF.varlen_attention(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), cu, cuk,
                                5, 7, causal=True).sum()
        return a + b + c

    with fastdl.use_backend(backend):
        torch._dynamo.reset()
        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
        got = torch.autograd.grad(compiled(q, k, v), (q, k, v))
        want = torch.autograd.grad(f(q, k, v), (q, k, v))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


# --- MultiheadAttention -----------------------------------------------------------------------
MHA_CONFIGS = [
    dict(batch_first=True),
    dict(batch_first=False, bias=False),
    dict(batch_first=True, kdim=24, vdim=40),
    dict(batch_first=False, add_bias_kv=True, add_zero_attn=True),
]


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("config", MHA_CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_multihead_attention_matches_torch(device, backend, config):
    torch.manual_seed(0)
    e, h, L, S, B = 32, 2, 6, 9, 3
    theirs = torch.nn.MultiheadAttention(e, h, **config).to(device)
    ours = fastdl.nn.MultiheadAttention(e, h, **config).to(device)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    ours.load_state_dict(theirs.state_dict())
    bf = config["batch_first"]
    shape = lambda n, dim: (B, n, dim) if bf else (n, B, dim)  # noqa: E731
    query = torch.randn(shape(L, e), device=device)
    key = torch.randn(shape(S, config.get("kdim", e)), device=device)
    value = torch.randn(shape(S, config.get("vdim", e)), device=device)
    pad = torch.zeros(B, S, dtype=torch.bool, device=device)
    pad[0, -3:] = True
    bool_mask = torch.rand(L, S, device=device) > 0.8
    bool_mask[:, 0] = False
    float_mask = torch.randn(B * h, L, S, device=device)
    calls = [dict(), dict(key_padding_mask=pad), dict(attn_mask=bool_mask, key_padding_mask=pad),
             dict(attn_mask=float_mask)]
    with fastdl.use_backend(backend):
        for kwargs in calls:
            got, w = ours(query, key, value, need_weights=False, **kwargs)
            want, _ = theirs(query, key, value, need_weights=False, **kwargs)
            assert w is None
            torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5, msg=lambda m: f"{kwargs}: {m}")
        if "kdim" not in config and not config.get("add_bias_kv"):  # causal self-attention, with gradients
            x = torch.randn(shape(L, e), device=device, requires_grad=True)
            causal = torch.nn.Transformer.generate_square_subsequent_mask(L, device=device)
            got, _ = ours(x, x, x, need_weights=False, attn_mask=causal, is_causal=True)
            want, _ = theirs(x, x, x, need_weights=False, attn_mask=causal, is_causal=True)
            torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
            gx, = torch.autograd.grad(got.sum(), x)
            wx, = torch.autograd.grad(want.sum(), x)
            torch.testing.assert_close(gx, wx, atol=2e-5, rtol=2e-5)


def test_multihead_attention_unbatched_and_need_weights():
    torch.manual_seed(0)
    theirs = torch.nn.MultiheadAttention(16, 2)
    ours = fastdl.nn.MultiheadAttention(16, 2)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(5, 16)
    torch.testing.assert_close(ours(x, x, x, need_weights=False)[0], theirs(x, x, x, need_weights=False)[0])
    fastdl.nn.MultiheadAttention._warned_need_weights = False
    with pytest.warns(RuntimeWarning, match="need_weights=True runs torch's implementation"):
        out, weights = ours(x, x, x)
    assert weights.shape == (5, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours(x, x, x)  # warns once only
    with pytest.raises(RuntimeError, match="is_causal=True is a hint"):
        ours(x, x, x, need_weights=False, is_causal=True)


# --- transformers -------------------------------------------------------------------------------
def test_transformers_registration(monkeypatch):
    """Without transformers the registration is a no-op returning False; with
    it, "fastdl" goes to AttentionInterface and gets SDPA-style masks. A stub
    module stands in for transformers, which this test machine does not have."""
    from fastdl.nn import attention as nn_attn

    if "transformers" not in sys.modules:
        monkeypatch.setitem(sys.modules, "transformers", None)  # import fails as if absent
        assert nn_attn.register_transformers_attention() is False
    registry, masks = {}, {}
    tf = types.ModuleType("transformers")
    tf.AttentionInterface = types.SimpleNamespace(register=lambda name, fn: registry.__setitem__(name, fn))
    masking = types.ModuleType("transformers.masking_utils")
    masking.AttentionMaskInterface = types.SimpleNamespace(register=lambda name, fn: masks.__setitem__(name, fn))
    masking.sdpa_mask = object()
    monkeypatch.setitem(sys.modules, "transformers", tf)
    monkeypatch.setitem(sys.modules, "transformers.masking_utils", masking)
    assert nn_attn.register_transformers_attention() is True
    assert registry["fastdl"] is nn_attn.transformers_attention_forward
    assert masks["fastdl"] is masking.sdpa_mask


def test_transformers_attention_forward():
    """transformers' calling convention: (B, H, L, D) in, (B, L, H, D) out, GQA,
    a (B, 1, L, S) bool mask, causal from module.is_causal when no mask."""
    from fastdl.nn.attention import transformers_attention_forward

    module = torch.nn.Module()
    module.is_causal = True
    q, k, v = _qkv(2, 4, 2, 7, 7, 16, torch.float32, "cpu", grad=False)
    out, weights = transformers_attention_forward(module, q, k, v, None, scaling=0.5)
    want, _ = ref.attention(q, k, v, causal="top_left", scale=0.5)
    assert weights is None and out.shape == (2, 7, 4, 16)
    torch.testing.assert_close(out, want.transpose(1, 2).float())
    mask = torch.rand(2, 1, 7, 9) > 0.3
    mask[..., 0] = True
    out, _ = transformers_attention_forward(module, q, k, v, mask)
    want, _ = ref.attention(q, k, v, attn_mask=mask[..., :7].expand(2, 4, 7, 7))
    torch.testing.assert_close(out, want.transpose(1, 2).float())
    with pytest.raises(ValueError, match="softcap"):
        transformers_attention_forward(module, q, k, v, None, softcap=30.0)


# --- backend choice and bad input -----------------------------------------------------------------
def test_auto_on_cpu_runs_the_reference_quietly():
    q, k, v = _qkv(1, 2, 2, 5, 5, 8, torch.float32, "cpu", grad=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = FF.flash_attention(q, k, v)
    torch.testing.assert_close(out, ref.attention(q, k, v)[0].float())
    assert fastdl._backend.resolve_quietly("attention", torch.device("cpu")) == "torch"


def test_gradcheck_fp64_reference_backend():
    q, k, v = (t.double() for t in _qkv(1, 2, 1, 3, 4, 8, torch.float32, "cpu", grad=False))
    q, k, v = q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
    mask = torch.tensor([[True, False, True, True]] * 3)
    with fastdl.use_backend("torch"):
        assert torch.autograd.gradcheck(lambda q, k, v: FF.flash_attention(q, k, v, causal=True), (q, k, v))
        assert torch.autograd.gradcheck(
            lambda q, k, v: FF.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True), (q, k, v))


@pytest.mark.skipif(HAS_CUDA, reason="checks the errors a CPU-only machine gives for explicit backends")
def test_explicit_backend_that_cannot_serve_raises():
    q, k, v = _qkv(1, 2, 2, 5, 5, 8, torch.float32, "cpu", grad=False)
    with fastdl.use_backend("cuda"), pytest.raises(fastdl.BackendUnavailable, match="cuda tensors only"):
        FF.flash_attention(q, k, v)
    with fastdl.use_backend("triton"), pytest.raises(fastdl.BackendUnavailable, match="float64"):
        FF.flash_attention(q.double(), k.double(), v.double())
    with fastdl.use_backend("triton"), pytest.raises(fastdl.BackendUnavailable, match="head dim 12"):
        FF.scaled_dot_product_attention(q[..., :4].repeat(1, 1, 1, 3), k[..., :4].repeat(1, 1, 1, 3),
                                        v[..., :4].repeat(1, 1, 1, 3))
    bias = torch.randn(5, 5, requires_grad=True)
    with fastdl.use_backend("triton"), pytest.raises(fastdl.BackendUnavailable, match="attn_mask"):
        FF.scaled_dot_product_attention(q, k, v, attn_mask=bias)


def test_sdpa_runs_what_the_kernels_cannot_on_the_reference():
    """Head dim 12, value head dim != key's, and a mask gradient: torch's own results."""
    q, k, v = torch.randn(1, 2, 5, 12), torch.randn(1, 2, 6, 12), torch.randn(1, 2, 6, 20)
    bias = torch.randn(5, 6, requires_grad=True)
    out = FF.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    torch.testing.assert_close(out, want)
    g, = torch.autograd.grad(out.sum(), bias)
    w, = torch.autograd.grad(want.sum(), bias)
    torch.testing.assert_close(g, w)


def test_errors():
    q, k, v = _qkv(1, 4, 2, 5, 6, 16, torch.float16, "cpu", grad=False)
    with pytest.raises(ValueError, match=r"head dim \(q.shape\[-1\]\) must be a multiple of 8 from 8 to 256, got 12"):
        FF.flash_attention(q[..., :12], k[..., :12], v[..., :12])
    big = torch.randn(1, 1, 2, 264, dtype=torch.float16)
    with pytest.raises(ValueError, match="got 264"):
        FF.flash_attention(big, big, big)
    with pytest.raises(ValueError, match=r"number of q heads \(4\) must be a multiple of the number of k/v heads \(3\)"):
        FF.flash_attention(q, k.repeat(1, 2, 1, 1)[:, :3], v.repeat(1, 2, 1, 1)[:, :3])
    with pytest.raises(ValueError, match="pass enable_gqa=True"):
        FF.scaled_dot_product_attention(q, k, v)
    with pytest.raises(TypeError, match="must be float16, bfloat16, float32 or float64, got torch.int64"):
        FF.flash_attention(q.long(), k.long(), v.long())
    with pytest.raises(TypeError, match="same dtype, got k torch.float32"):
        FF.flash_attention(q, k.float(), v)
    with pytest.raises(ValueError, match="same device, got v on meta"):
        FF.flash_attention(q, k, v.to("meta"))
    with pytest.raises(ValueError, match="must be 4-D"):
        FF.flash_attention(q[0], k[0], v[0])
    with pytest.raises(ValueError, match=r"k and v must have shape \(B, Hkv, Nk, D\)"):
        FF.flash_attention(q, k, v[:, :, :3])
    with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\)"):
        FF.flash_attention(q, k, v, dropout_p=1.0)
    with pytest.raises(ValueError, match="does not broadcast"):
        FF.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(5, 5, dtype=torch.bool), enable_gqa=True)
    with pytest.raises(TypeError, match="attn_mask must be bool or float"):
        FF.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(5, 6, dtype=torch.int32), enable_gqa=True)
    with pytest.raises(ValueError, match="either attn_mask or is_causal"):
        FF.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(5, 6, dtype=torch.bool), is_causal=True,
                                        enable_gqa=True)
    qp, kp = torch.randn(7, 4, 16), torch.randn(9, 2, 16)
    cu_q, cu_k = torch.tensor([0, 3, 7], dtype=torch.int32), torch.tensor([0, 4, 9], dtype=torch.int32)
    with pytest.raises(ValueError, match="max_seqlen for cu_seqlens_q is 3 but a sequence has 4 tokens"):
        FF.varlen_attention(qp, kp, kp, cu_q, cu_k, 3, 5)
    with pytest.raises(ValueError, match="must rise from 0 to the token count 9"):
        FF.varlen_attention(qp, kp, kp, cu_q, torch.tensor([0, 4, 8], dtype=torch.int32), 4, 5)
    with pytest.raises(TypeError, match="cu_seqlens_k must be a 1-D int32"):
        FF.varlen_attention(qp, kp, kp, cu_q, cu_k.float(), 4, 5)
    with pytest.raises(ValueError, match="both hold B \\+ 1 offsets"):
        FF.varlen_attention(qp, kp, kp, cu_q, cu_k[:2], 4, 5)


# --- memory: O(N) beyond inputs and outputs ---------------------------------------------------------
@pytest.mark.large
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason=NO_GPU)
def test_long_sequence_memory():
    """B=1, H=16, N=131072, D=128 bf16, forward and backward (the issue's bar):
    peak memory stays within a few input-sized buffers (an N^2 matrix would
    need 512 GiB)."""
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2**30:
        pytest.skip("needs a 40 GiB GPU")
    n = 131072
    q, k, v = (torch.randn(1, 16, n, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with fastdl.use_backend("triton"):
        out = FF.flash_attention(q, k, v, causal=True)
    out.backward(torch.ones_like(out))
    torch.cuda.synchronize()
    one = q.numel() * q.element_size()
    assert torch.cuda.max_memory_allocated() - base < 12 * one
    assert q.grad.isfinite().all() and k.grad.isfinite().all()
