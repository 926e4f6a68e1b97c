"""Norm family: layer_norm / rms_norm / add_layer_norm / add_rms_norm and the
LayerNorm / RMSNorm modules, against fp64 references, on every backend this
machine has."""
import os

import pytest
import torch

import fastdl
import fastdl.functional as FF
import reference as ref
from conftest import HAS_CUDA, assert_close, assert_rel_l2, backend_cases

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
KINDS = ["layer", "rms", "add_layer", "add_rms"]
# 1, primes, just past a power of two, the Triton interpreter's widest fused
# row (4096 + 3 -> an 8192 block), and 65536 (chunked on every backend but the
# CPU one, which has no chunks).
COLS = [1, 7, 127, 1000, 1024, 4096 + 3, 65536]
CASES = backend_cases()
INTERP_SLOW = "the Triton interpreter would take minutes at this width; test_triton_chunked_paths covers the chunked path"


def _is_interp(device, backend):
    return device == "cpu" and backend == "triton"


def _call(kind, x, r, shape, w, b, eps=1e-5):
    if kind == "layer":
        return FF.layer_norm(x, shape, w, b, eps)
    if kind == "rms":
        return FF.rms_norm(x, shape, w, eps)
    if kind == "add_layer":
        return FF.add_layer_norm(x, r, shape, w, b, eps)
    return FF.add_rms_norm(x, r, shape, w, eps)


def _check(device, backend, kind, x, shape, w=None, b=None, eps=1e-5):
    """Forward and every gradient of `kind` against the fp64 reference."""
    dtype = x.dtype
    rms, add = kind.endswith("rms"), kind.startswith("add")
    x = x.to(device).requires_grad_()
    r = torch.randn_like(x).requires_grad_() if add else None
    w = w.to(device).requires_grad_() if w is not None else None
    b = b.to(device).requires_grad_() if b is not None and not rms else None
    with fastdl.use_backend(backend):
        out = _call(kind, x, r, shape, w, b, eps)
    y, s = out if add else (out, None)

    # The sum must match `x + r` (rounded to x's dtype) and y must be the
    # fp64 norm of the sum returned. (The Triton interpreter rounds bf16 toward
    # zero: its sum may be 1 ulp off torch's, and y follows its own sum.)
    s_ref = (x + r).detach() if add else x.detach()
    s64 = (s.detach() if add else s_ref).double().requires_grad_()
    w64 = w.detach().double().requires_grad_() if w is not None else None
    b64 = b.detach().double().requires_grad_() if b is not None else None
    y_ref = ref.norm(s64, shape, w64, b64, eps, rms)
    assert y.dtype == dtype and y.shape == x.shape
    assert_close(y, y_ref, dtype, "forward")
    if add:
        assert s.dtype == dtype and s.shape == x.shape
        assert_close(s, s_ref, dtype, "input + residual")

    g = torch.randn_like(y)
    g_s = torch.randn_like(s) if add else None
    torch.autograd.backward([y, s] if add else [y], [g, g_s] if add else [g])
    y_ref.backward(g.double())
    ds = s64.grad + (g_s.double() if add else 0)
    assert_close(x.grad, ds, dtype, "grad input")
    if add:
        assert_close(r.grad, ds, dtype, "grad residual")
    if w is not None:
        assert w.grad.dtype == w.dtype and w.grad.shape == w.shape
        assert_rel_l2(w.grad, w64.grad, dtype, "grad weight")
    if b is not None:
        assert b.grad.dtype == b.dtype
        assert_rel_l2(b.grad, b64.grad, dtype, "grad bias")


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("cols", COLS)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_norm(device, backend, dtype, kind, cols, affine):
    if _is_interp(device, backend) and cols > 5000:
        pytest.skip(INTERP_SLOW)
    if backend == "torch" and cols > 5000:
        pytest.skip("the torch composite is F.layer_norm / F.rms_norm; checked at smaller widths")
    lead = (2, 3) if cols <= 1024 else (2,)
    # With one value per row var = 0 and rstd = 1/sqrt(eps): a small eps would
    # turn torch's own 1-ulp mean error (the 'torch' backend) into 1e-4.
    eps = 1e-3 if cols == 1 else 1e-5
    x = (torch.randn(*lead, cols) * 2 + 0.5).to(dtype)
    w = (torch.rand(cols) + 0.5).to(dtype) if affine else None
    b = torch.randn(cols).to(dtype) if affine else None
    _check(device, backend, kind, x, [cols], w, b, eps)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
def test_fp32_weights_with_low_precision_input(device, backend, dtype, kind):
    # Mixed precision keeps norm weights in fp32: taken as they are, grads in fp32.
    x = torch.randn(37, 96).to(dtype)
    _check(device, backend, kind, x, [96], torch.rand(96) + 0.5, torch.randn(96))


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("kind", KINDS)
def test_shapes(device, backend, kind):
    # Several normalized dims; a 1-d input (statistics of shape ()); many rows
    # (more than one tile and program); a weight without a bias.
    _check(device, backend, kind, torch.randn(2, 3, 4, 5), [4, 5], torch.randn(4, 5), torch.randn(4, 5))
    _check(device, backend, kind, torch.randn(33), [33], torch.randn(33), torch.randn(33))
    _check(device, backend, kind, torch.randn(517, 24), [24], torch.randn(24), None)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous(device, backend, dtype):
    base = torch.randn(40, 17).to(dtype)
    _check(device, backend, "layer", base.t(), [40], torch.randn(40), torch.randn(40))
    sliced = torch.randn(9, 70).to(dtype)[:, 3:61:2]
    _check(device, backend, "add_rms", sliced, [29], torch.randn(29).to(dtype))


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("kind", KINDS)
def test_empty(device, backend, kind):
    _check(device, backend, kind, torch.randn(0, 16), [16], torch.randn(16), torch.randn(16))
    _check(device, backend, kind, torch.randn(2, 0, 5), [5], torch.randn(5), torch.randn(5))


@pytest.mark.parametrize("device,backend", CASES)
def test_eps_and_constant_rows(device, backend):
    # A constant row has var = 0: the output is bias, rstd = 1/sqrt(eps).
    x = torch.full((3, 50), 2.5)
    _check(device, backend, "layer", x, [50], torch.randn(50), torch.randn(50), eps=1e-3)
    _check(device, backend, "rms", torch.randn(4, 50) * 1e-3, [50], torch.randn(50), eps=1e-4)
    # rms_norm's default eps is the dtype's, as F.rms_norm.
    x = (torch.randn(4, 50) * 1e-4).to(device)
    with fastdl.use_backend(backend):
        y = FF.rms_norm(x, [50])
    assert_close(y, torch.nn.functional.rms_norm(x.double(), [50], eps=torch.finfo(torch.float32).eps),
                 torch.float32)


def test_triton_chunked_paths(monkeypatch):
    # Shrink the widest fused row so small tensors take the chunked forward,
    # the row-loop backward and the column-wise dweight/dbias kernel (several
    # row groups: rows > DW_BLOCK_R).
    kernels = fastdl._backend.load_kernels("norm")
    monkeypatch.setattr(kernels, "MAX_BLOCK_N", 64)
    monkeypatch.setattr(kernels, "MAX_BLOCK_N_BWD", 32)
    monkeypatch.setattr(kernels, "DW_BLOCK_R", 8)
    for kind in KINDS:
        for cols in (100, 127):
            x = torch.randn(20, cols, dtype=torch.float16) * 3 + 1
            _check("cpu", "triton", kind, x, [cols], torch.randn(cols), torch.randn(cols))


def test_gradcheck_fp64_cpu():
    x = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    r = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    w = torch.randn(9, dtype=torch.float64, requires_grad=True)
    b = torch.randn(9, dtype=torch.float64, requires_grad=True)
    with fastdl.use_backend("cpu"):
        assert torch.autograd.gradcheck(lambda x, w, b: FF.layer_norm(x, [9], w, b), (x, w, b))
        assert torch.autograd.gradcheck(lambda x, w: FF.rms_norm(x, [9], w), (x, w))
        assert torch.autograd.gradcheck(lambda x, r, w, b: FF.add_layer_norm(x, r, [9], w, b), (x, r, w, b))
        assert torch.autograd.gradcheck(lambda x, r, w: FF.add_rms_norm(x, r, [9], w), (x, r, w))


# --- determinism ------------------------------------------------------------------------
@pytest.mark.parametrize("device,backend", [c for c in CASES if c.values[1] != "torch"])
@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_dweight_bitwise_deterministic(device, backend, kind):
    cols = 4099 if device == "cuda" else 129
    x = torch.randn(3000 if device == "cuda" else 300, cols, device=device, requires_grad=True)
    w = torch.randn(cols, device=device, requires_grad=True)
    b = torch.randn(cols, device=device, requires_grad=True) if kind == "layer" else None
    g = torch.randn_like(x)
    grads = []
    with fastdl.use_backend(backend):
        for _ in range(2):
            y = _call(kind, x, None, [cols], w, b)
            grads.append(torch.autograd.grad(y, [w] + ([b] if b is not None else []), g))
    for a, c in zip(*grads):
        assert torch.equal(a, c), "dweight/dbias differ between two identical runs"


# --- registered ops -----------------------------------------------------------------------
def _op_samples(device, dtype):
    x = torch.randn(5, 3, 16, device=device, dtype=dtype)
    return {"x": x, "r": torch.randn_like(x), "w": torch.randn(16, device=device, dtype=dtype),
            "b": torch.randn(16, device=device, dtype=dtype), "g": torch.randn_like(x)}


@pytest.mark.parametrize("device,backend", [c for c in CASES if c.values[1] != "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(device, backend, dtype):
    s = _op_samples(device, dtype)
    suffix = "_triton" if backend == "triton" else ""
    fwd = getattr(torch.ops.fastdl, "layer_norm_fwd" + suffix)
    bwd = getattr(torch.ops.fastdl, "layer_norm_bwd" + suffix)
    cases = [(False, None, None, None, [True, True]), (False, s["r"], s["w"], s["b"], [False, True]),
             (True, s["r"], s["w"].float(), None, [True, False])]
    for rms, res, w, b, mask in cases:
        torch.library.opcheck(fwd, (s["x"], res, w, b, [16], 1e-5, rms))
        _, res_out, mean, rstd = fwd(s["x"], res, w, b, [16], 1e-5, rms)
        xs = res_out if res is not None else s["x"]
        torch.library.opcheck(bwd, (s["g"], res, xs, w, b, mean, rstd, rms, mask))


@pytest.mark.parametrize("device,backend", CASES)
def test_compile_fullgraph(device, backend):
    x = torch.randn(6, 40, device=device, requires_grad=True)
    r = torch.randn(6, 40, device=device, requires_grad=True)
    w = torch.randn(40, device=device, requires_grad=True)
    b = torch.randn(40, device=device, requires_grad=True)

    def f(x, r, w, b):
        y1 = FF.layer_norm(x, [40], w, b)
        y2 = FF.rms_norm(x, [40], w)
        y3, s3 = FF.add_layer_norm(x, r, [40], w, b)
        y4, s4 = FF.add_rms_norm(x, r, (40,), w)
        return y1.sum() + (y2 * y1).sum() + (y3 * s3).sum() + y4.sum() + s4.square().sum()

    inputs = (x, r, w, b)
    with fastdl.use_backend(backend):
        torch._dynamo.reset()
        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
        got = torch.autograd.grad(compiled(*inputs), inputs)
        want = torch.autograd.grad(f(*inputs), inputs)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e)


def test_compile_inductor_cpu():
    x = torch.randn(8, 24)
    w = torch.randn(24)
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, w: FF.rms_norm(x, [24], w) * 2, fullgraph=True)
    assert_close(compiled(x, w), ref.norm(x, [24], w, rms=True, eps=torch.finfo(torch.float32).eps) * 2,
                 torch.float32)


# --- modules -------------------------------------------------------------------------------
@pytest.mark.parametrize("device,backend", CASES)
def test_modules_match_torch(device, backend):
    pairs = [
        (fastdl.nn.LayerNorm(8), torch.nn.LayerNorm(8)),
        (fastdl.nn.LayerNorm([3, 8], eps=1e-3, bias=False), torch.nn.LayerNorm([3, 8], eps=1e-3, bias=False)),
        (fastdl.nn.LayerNorm(8, elementwise_affine=False), torch.nn.LayerNorm(8, elementwise_affine=False)),
        (fastdl.nn.RMSNorm(8), torch.nn.RMSNorm(8)),
        (fastdl.nn.RMSNorm([3, 8], eps=1e-6), torch.nn.RMSNorm([3, 8], eps=1e-6)),
        (fastdl.nn.RMSNorm(8, elementwise_affine=False), torch.nn.RMSNorm(8, elementwise_affine=False)),
    ]
    x = torch.randn(5, 3, 8, device=device)
    for ours, theirs in pairs:
        assert isinstance(ours, type(theirs))
        assert ours.state_dict().keys() == theirs.state_dict().keys()
        ours.to(device)
        theirs.to(device)
        with torch.no_grad():
            for p in ours.parameters():
                p.copy_(torch.randn_like(p))
        theirs.load_state_dict(ours.state_dict())
        with fastdl.use_backend(backend):
            got = ours(x)
        assert_close(got, theirs.double()(x.double()), torch.float32, type(ours).__name__)


def test_replaces():
    from fastdl.nn.norm import REPLACES
    assert REPLACES[torch.nn.LayerNorm] is fastdl.nn.LayerNorm
    assert REPLACES[torch.nn.RMSNorm] is fastdl.nn.RMSNorm


# --- bad input -------------------------------------------------------------------------------
def test_errors():
    x = torch.randn(4, 6)
    with pytest.raises(ValueError, match=r"normalized_shape \[5\] must match the trailing dims of input"):
        FF.layer_norm(x, [5])
    with pytest.raises(ValueError, match=r"normalized_shape \[2, 4, 6\] must match"):
        FF.rms_norm(x, [2, 4, 6])
    with pytest.raises(ValueError, match="normalized_shape must have at least one dim"):
        FF.layer_norm(x, [])
    with pytest.raises(ValueError, match=r"weight must have shape \[6\] \(normalized_shape\), got \[5\]"):
        FF.layer_norm(x, [6], torch.randn(5))
    with pytest.raises(ValueError, match=r"bias must have shape \[6\]"):
        FF.layer_norm(x, [6], torch.randn(6), torch.randn(1, 6))
    with pytest.raises(ValueError, match="weight must be on input's device"):
        FF.rms_norm(x, [6], torch.randn(6, device="meta"))
    with pytest.raises(ValueError, match="residual must be on input's device"):
        FF.add_rms_norm(x, torch.randn(4, 6, device="meta"), [6])
    with pytest.raises(ValueError, match=r"residual must have input's shape \[4, 6\]"):
        FF.add_layer_norm(x, torch.randn(6), [6])
    with pytest.raises(TypeError, match="residual must have input's dtype"):
        FF.add_layer_norm(x, torch.randn(4, 6, dtype=torch.float16), [6])
    with pytest.raises(TypeError, match="weight must be float32 or input's dtype"):
        FF.layer_norm(x.half(), [6], torch.randn(6, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="weight and bias must have one dtype"):
        FF.layer_norm(x.half(), [6], torch.randn(6), torch.randn(6, dtype=torch.float16))
    with pytest.raises(TypeError, match="input must be float32"):
        FF.layer_norm(torch.ones(4, 6, dtype=torch.int32), [6])


def test_cpp_errors_name_the_argument():
    ops = torch.ops.fastdl
    x = torch.randn(4, 6)
    with pytest.raises(RuntimeError, match=r"normalized_shape \[5\] must match the trailing dims"):
        ops.layer_norm_fwd(x, None, None, None, [5], 1e-5, False)
    with pytest.raises(RuntimeError, match=r"weight must have shape \[6\]"):
        ops.layer_norm_fwd(x, None, torch.randn(7), None, [6], 1e-5, False)
    with pytest.raises(RuntimeError, match="residual must have the shape of input"):
        ops.layer_norm_fwd(x, torch.randn(6), None, None, [6], 1e-5, False)
    with pytest.raises(RuntimeError, match="input must be float32"):
        ops.layer_norm_fwd(torch.ones(4, 6, dtype=torch.int64), None, None, None, [6], 1e-5, True)
    _, _, mean, rstd = ops.layer_norm_fwd(x, None, None, None, [6], 1e-5, False)
    with pytest.raises(RuntimeError, match="grad_out must have the shape of x"):
        ops.layer_norm_bwd(torch.randn(4, 5), None, x, None, None, mean, rstd, False, [True, True])
    with pytest.raises(RuntimeError, match="rstd must have the leading shape of x"):
        ops.layer_norm_bwd(x, None, x, None, None, mean, rstd[:2], False, [True, True])


@pytest.mark.skipif(HAS_CUDA, reason="checks the error a CPU-only machine gives for backend 'cuda'")
def test_explicit_backend_that_cannot_serve_raises():
    with fastdl.use_backend("cuda"), pytest.raises(fastdl.BackendUnavailable, match="cuda tensors only"):
        FF.layer_norm(torch.randn(3, 4), [4])
    with fastdl.use_backend("triton"), pytest.raises(fastdl.BackendUnavailable, match="no float64"):
        FF.rms_norm(torch.randn(3, 4, dtype=torch.float64), [4])


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (none visible on this machine)")
def test_mismatched_devices_cuda():
    x = torch.randn(4, 6, device="cuda")
    with pytest.raises(ValueError, match="weight must be on input's device"):
        FF.layer_norm(x, [6], torch.randn(6))
    with pytest.raises(RuntimeError, match="residual and input must be on the same device"):
        torch.ops.fastdl.layer_norm_fwd(x, torch.randn(4, 6), None, None, [6], 1e-5, False)


# --- int64 offsets ----------------------------------------------------------------------------
def _free_gib():
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30


@pytest.mark.large
@pytest.mark.parametrize("device,backend", [c for c in CASES if c.values[1] != "torch"])
def test_more_than_2_31_elements(device, backend):
    if _is_interp(device, backend):
        pytest.skip("the interpreter would take minutes on 2^31 elements; checked on GPU")
    if device == "cpu" and _free_gib() < 20:
        pytest.skip("needs 20 GiB of free memory")
    if device == "cuda" and torch.cuda.get_device_properties(0).total_memory < 24 * 2**30:
        pytest.skip("needs a 24 GiB GPU")
    cols = 64
    rows = 2**31 // cols + 3
    x = torch.ones(rows, cols, dtype=torch.bfloat16, device=device)
    x[-3:] = torch.randn(3, cols, dtype=torch.bfloat16)
    w = torch.randn(cols, dtype=torch.bfloat16, device=device)
    ops = torch.ops.fastdl
    suffix = "_triton" if backend == "triton" else ""
    y, _, mean, rstd = getattr(ops, "layer_norm_fwd" + suffix)(x, None, w, None, [cols], 1e-5, False)
    assert_close(y[-3:], ref.norm(x[-3:], [cols], w), torch.bfloat16, "tail rows")
    del y
    dx, dw, _ = getattr(ops, "layer_norm_bwd" + suffix)(x, None, x, w, None, mean, rstd, False, [True, False])
    x64 = x[-3:].double().requires_grad_()
    ref.norm(x64, [cols], w).backward(x[-3:].double())
    assert_close(dx[-3:], x64.grad, torch.bfloat16, "tail rows grad")
    # Constant rows contribute xhat = 0: dweight comes from the 3 tail rows only.
    xhat = (x[-3:].double() - mean[-3:, None].double()) * rstd[-3:, None].double()
    assert_rel_l2(dw, (x[-3:].double() * xhat).sum(0), torch.bfloat16, "dweight")


def test_row_size_limit_is_a_clear_error():
    # Rows past 2^30 elements would overflow the kernels' 32-bit column indices.
    x = torch.empty(1, 2**30 + 1, device="meta")
    with pytest.raises(ValueError, match=r"must be at most 2\^30"):
        FF.layer_norm(x, (2**30 + 1,))
