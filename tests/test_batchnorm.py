"""BatchNorm family: fastdl.functional.batch_norm (+ act, + residual) and the
BatchNorm1d / BatchNorm2d / BatchNormAct2d modules, against fp64 references
(torch's own F.batch_norm in fp64), on every backend this machine has."""
import pytest
import torch

import fastdl
import fastdl.functional as FF
import reference as ref
from conftest import HAS_CUDA, INTERPRET, assert_close, assert_rel_l2, backend_cases

CASES = backend_cases()
KERNEL_CASES = [c for c in CASES if c.values[1] != "torch"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (shape, channels_last): N=1 with 7x7 spatial and C=3; primes; 1d (N, C) and
# (N, C, L); C=64 (the CUDA vector paths); H*W=1 with C past the Triton tile.
SHAPES = [((1, 3, 7, 7), False), ((1, 3, 7, 7), True), ((5, 13, 4, 3), False), ((5, 13, 4, 3), True),
          ((6, 3), False), ((4, 7, 10), False), ((4, 7, 10), True), ((3, 64, 5, 5), True),
          ((2, 64, 4, 4), False), ((3, 300, 1, 1), False)]
# fp16 shares bf16's code path: a few shapes keep the interpreter's time down.
TRAIN_CASES = ([(dt, *sc) for dt in (torch.float32, torch.bfloat16) for sc in SHAPES]
               + [(torch.float16, *sc) for sc in SHAPES[:4]])
# act, residual: plain BN, the ResNet tail, an activation alone.
EPILOGUES = [(None, False), ("relu", True), ("silu", False)]


def _make(shape, dtype, channels_last, device, scale=2.0, offset=3.0):
    x = torch.randn(shape) * scale + offset
    if channels_last:
        x = x.movedim(1, -1).contiguous().movedim(-1, 1)
    return x.to(dtype=dtype, device=device)


def _params(c, device, dtype=torch.float32):
    w = (torch.rand(c) + 0.5).to(device=device, dtype=dtype).requires_grad_()
    b = torch.randn(c).to(device=device, dtype=dtype).requires_grad_()
    return w, b


def _leaf64(t):
    return None if t is None else t.detach().double().requires_grad_()


def _grads_close(got, want, dtype, msg):
    # Low-precision gradients pass through one rounding of dz (as eager's do)
    # and per-channel sums: relative L2, not elementwise.
    if dtype == torch.float32:
        assert_close(got, want, dtype, msg)
    else:
        assert_rel_l2(got, want, dtype, msg)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("dtype,shape,channels_last", TRAIN_CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("act,with_res", EPILOGUES, ids=["bn", "bn_add_relu", "bn_silu"])
def test_training(device, backend, dtype, shape, channels_last, act, with_res):
    c = shape[1]
    x = _make(shape, dtype, channels_last, device).requires_grad_()
    w, b = _params(c, device)
    res = _make(shape, dtype, False, device, 1.0, 0.0).requires_grad_() if with_res else None
    rm, rv = torch.randn(c, device=device), torch.rand(c, device=device) + 0.5
    rm64, rv64 = rm.double(), rv.double()
    with fastdl.use_backend(backend):
        y = FF.batch_norm(x, rm, rv, w, b, training=True, momentum=0.2, eps=1e-3, act=act, residual=res)
    leaves = [_leaf64(t) for t in (x, w, b, res)]
    want = ref.batch_norm(leaves[0], rm64, rv64, leaves[1], leaves[2], True, 0.2, 1e-3, act, leaves[3])
    assert y.dtype == dtype and y.shape == x.shape
    assert y.stride() == x.stride(), "output must keep input's memory format"
    assert_close(y, want, dtype, "forward")
    assert_close(rm, rm64, torch.float32, "running_mean")
    assert_close(rv, rv64, torch.float32, "running_var")
    g = torch.randn_like(y)
    y.backward(g)
    want.backward(g.double())
    _grads_close(x.grad, leaves[0].grad, dtype, "grad input")
    assert_rel_l2(w.grad, leaves[1].grad, dtype, "grad weight")
    assert_rel_l2(b.grad, leaves[2].grad, dtype, "grad bias")
    if with_res:
        _grads_close(res.grad, leaves[3].grad, dtype, "grad residual")


def _rel_err(t, exact):
    return ((t.double() - exact).norm() / exact.norm()).item()


def _rounding_err(exact, dtype, toward_zero):
    """Relative error of exact stored once in dtype the way a kernel stores
    an fp32 result: to nearest, or toward zero as the Triton interpreter
    does for bf16 (which keeps the high 16 bits of the fp32)."""
    if not toward_zero:
        return _rel_err(exact.to(dtype), exact)
    bits = exact.float().view(torch.int32) & ~0xFFFF
    return _rel_err(bits.view(torch.float32).to(dtype), exact)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("act", ["silu", "relu"])
def test_low_precision_grad_error(device, backend, dtype, act):
    # Small C, an activation, a residual, and a gradient with a large
    # per-channel mean: dx is a small difference of dz terms, so dz rounded
    # to dtype before pass 2 shows (silu's dz rounds, relu's, g or 0, does
    # not). Reading it cost 3.5x the error of the exact dx rounded once here:
    # still under 2x torch's own, whose act backward rounds dz too, hence the
    # second bound.
    shape = (4, 3, 7, 7)
    x = _make(shape, dtype, False, device).requires_grad_()
    res = _make(shape, dtype, False, device, 1.0, 0.0).requires_grad_()
    w, b = _params(3, device)
    g = (torch.randn(shape) * 0.25 + 4.0).to(device=device, dtype=dtype)
    with fastdl.use_backend(backend):
        y = FF.batch_norm(x, None, None, w, b, training=True, act=act, residual=res)
    y.backward(g)
    # torch's own: F.batch_norm, + residual, act, all in dtype.
    low = [t.detach().clone().requires_grad_() for t in (x, w, b, res)]
    theirs = ref.act(torch.nn.functional.batch_norm(low[0], None, None, low[1], low[2], True) + low[3], act)
    theirs.backward(g)
    leaves = [_leaf64(t) for t in (x, w, b, res)]
    ref.batch_norm(leaves[0], None, None, leaves[1], leaves[2], True, act_name=act,
                   residual=leaves[3]).backward(g.double())
    toward_zero = backend == "triton" and INTERPRET and dtype == torch.bfloat16
    for name, ours, torchs, exact in zip(("input", "weight", "bias", "residual"), (x, w, b, res), low, leaves):
        err, torch_err = _rel_err(ours.grad, exact.grad), _rel_err(torchs.grad, exact.grad)
        # What truncating alone adds (about 2x) to a gradient stored in dtype;
        # nothing where dtype holds it exactly (relu's d residual).
        mode = 1.0
        if toward_zero and ours.grad.dtype == dtype:
            nearest = _rounding_err(exact.grad, dtype, False)
            mode = _rounding_err(exact.grad, dtype, True) / nearest if nearest > 0 else 1.0
        assert err <= 2 * mode * torch_err, (
            f"grad {name}: rel. error {err:.3g} > 2 x {mode:.2f} x torch's {torch_err:.3g}")
    err, once = _rel_err(x.grad, leaves[0].grad), _rounding_err(leaves[0].grad, dtype, toward_zero)
    assert err <= 1.5 * once, f"grad input: rel. error {err:.3g} > 1.5 x one rounding's {once:.3g}"


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_eval(device, backend, dtype, channels_last):
    shape = (3, 5, 7, 7)
    x = _make(shape, dtype, channels_last, device).requires_grad_()
    w, b = _params(5, device)
    res = _make(shape, dtype, not channels_last, device).requires_grad_()  # the other layout
    rm, rv = torch.randn(5, device=device), torch.rand(5, device=device) + 0.5
    rm0, rv0 = rm.clone(), rv.clone()
    with fastdl.use_backend(backend):
        y = FF.batch_norm(x, rm, rv, w, b, training=False, act="leaky_relu", residual=res, negative_slope=0.2)
    leaves = [_leaf64(t) for t in (x, w, b, res)]
    want = ref.batch_norm(leaves[0], rm.double(), rv.double(), leaves[1], leaves[2], False,
                          act_name="leaky_relu", residual=leaves[3], negative_slope=0.2)
    assert_close(y, want, dtype, "forward")
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0), "eval must not touch the running stats"
    g = torch.randn_like(y).to(memory_format=torch.contiguous_format)
    y.backward(g)
    want.backward(g.double())
    _grads_close(x.grad, leaves[0].grad, dtype, "grad input")
    _grads_close(res.grad, leaves[3].grad, dtype, "grad residual")
    assert_rel_l2(w.grad, leaves[1].grad, dtype, "grad weight")
    assert_rel_l2(b.grad, leaves[2].grad, dtype, "grad bias")


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum0.1", "cumulative"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_module_steps_match_torch(device, backend, momentum, channels_last):
    ours = fastdl.nn.BatchNorm2d(6, momentum=momentum).to(device)
    theirs = torch.nn.BatchNorm2d(6, momentum=momentum).to(device).double()
    assert isinstance(ours, torch.nn.BatchNorm2d)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        ours.bias.normal_()
        theirs.weight.copy_(ours.weight)
        theirs.bias.copy_(ours.bias)
    with fastdl.use_backend(backend):
        for step in range(3):
            x = _make((4, 6, 5, 3), torch.float32, channels_last, device, 1.0 + step, step - 1.0)
            assert_close(ours(x), theirs(x.double()), torch.float32, f"step {step}")
        assert ours.num_batches_tracked.item() == theirs.num_batches_tracked.item() == 3
        assert_close(ours.running_mean, theirs.running_mean, torch.float32, "running_mean")
        assert_close(ours.running_var, theirs.running_var, torch.float32, "running_var")
        ours.eval()
        theirs.eval()
        x = _make((2, 6, 5, 3), torch.float32, channels_last, device)
        assert_close(ours(x), theirs(x.double()), torch.float32, "eval")
        assert ours.num_batches_tracked.item() == 3


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("track", [True, False])
def test_module_flags_match_torch(device, backend, affine, track):
    ours = fastdl.nn.BatchNorm1d(7, affine=affine, track_running_stats=track).to(device)
    theirs = torch.nn.BatchNorm1d(7, affine=affine, track_running_stats=track).to(device).double()
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    with fastdl.use_backend(backend):
        for shape in ((8, 7), (3, 7, 9)):
            x = _make(shape, torch.float32, False, device)
            assert_close(ours(x), theirs(x.double()), torch.float32, f"train {shape}")
        ours.eval()
        theirs.eval()
        x = _make((5, 7), torch.float32, False, device)
        assert_close(ours(x), theirs(x.double()), torch.float32, "eval")
    for k, v in theirs.state_dict().items():
        assert_close(ours.state_dict()[k], v, torch.float32, k)


def test_state_dict_loads_both_ways():
    theirs = torch.nn.BatchNorm2d(4)
    theirs.train()(torch.randn(3, 4, 2, 2))
    ours = fastdl.nn.BatchNorm2d(4)
    ours.load_state_dict(theirs.state_dict())
    torch.nn.BatchNorm2d(4).load_state_dict(ours.state_dict())
    assert ours.num_batches_tracked.item() == 1
    assert fastdl.nn.batchnorm.REPLACES[torch.nn.BatchNorm2d] is fastdl.nn.BatchNorm2d
    assert fastdl.nn.batchnorm.REPLACES[torch.nn.BatchNorm1d] is fastdl.nn.BatchNorm1d


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batchnorm_act2d(device, backend, dtype):
    m = fastdl.nn.BatchNormAct2d(5, act="relu").to(device)
    theirs = torch.nn.BatchNorm2d(5).to(device).double()
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
        theirs.weight.copy_(m.weight)
    x = _make((2, 5, 7, 7), dtype, True, device).requires_grad_()
    res = _make((2, 5, 7, 7), dtype, True, device).requires_grad_()
    with fastdl.use_backend(backend):
        y = m(x, res)
    x64, r64 = _leaf64(x), _leaf64(res)
    want = torch.relu(theirs(x64) + r64)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert_close(y, want, dtype, "forward")
    g = torch.randn_like(y)
    y.backward(g)
    want.backward(g.double())
    _grads_close(x.grad, x64.grad, dtype, "grad input")
    _grads_close(res.grad, r64.grad, dtype, "grad residual")
    assert_rel_l2(m.weight.grad, theirs.weight.grad, dtype, "grad weight")
    assert_close(m.running_var, theirs.running_var, torch.float32, "running_var")
    assert "act='relu'" in repr(m)


@pytest.mark.parametrize("device,backend", CASES)
def test_low_precision_params_and_buffers(device, backend):
    # model.bfloat16() converts weights and running stats too.
    m = fastdl.nn.BatchNorm2d(3).to(device).bfloat16()
    theirs = torch.nn.BatchNorm2d(3).to(device).double()
    x = _make((4, 3, 5, 5), torch.bfloat16, False, device)
    with fastdl.use_backend(backend):
        y = m(x)
    assert y.dtype == torch.bfloat16 and m.running_mean.dtype == torch.bfloat16
    assert_close(y, theirs(x.double()), torch.bfloat16)
    assert_close(m.running_var, theirs.running_var, torch.bfloat16)


@pytest.mark.parametrize("device,backend", KERNEL_CASES)
def test_stats_stable_for_large_mean(device, backend):
    # E[x^2] - E[x]^2 in fp32 loses everything at mean 1e3, std 1 (ulp of
    # E[x^2] ~ 0.06); Welford / Chan keep it to ~1e-5.
    x = (torch.randn(8, 4, 33, 31, dtype=torch.float64) + 1000.0).float().to(device)
    op = torch.ops.fastdl.batch_norm_stats_triton if backend == "triton" else torch.ops.fastdl.batch_norm_stats
    for t in (x, x.to(memory_format=torch.channels_last)):
        mean, var = op(t)
        var64, mean64 = torch.var_mean(t.double(), dim=(0, 2, 3), correction=0)
        torch.testing.assert_close(mean.double(), mean64, rtol=1e-6, atol=0)  # a few fp32 ulp
        torch.testing.assert_close(var.double(), var64, rtol=1e-4, atol=0)


@pytest.mark.parametrize("device,backend", CASES)
def test_empty_batch(device, backend):
    x = torch.randn(0, 3, 4, 4, device=device, requires_grad=True)
    w, b = _params(3, device)
    rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
    with fastdl.use_backend(backend):
        y = FF.batch_norm(x, rm, rv, w, b, training=True, act="relu")
    assert y.shape == x.shape
    assert torch.equal(rm, torch.zeros(3, device=device)) and torch.equal(rv, torch.ones(3, device=device))
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))


@pytest.mark.parametrize("device,backend", CASES)
def test_non_dense_input(device, backend):
    base = torch.randn(4, 10, 6, 5, device=device)
    x = base[:, ::2, :, 1:]  # strided channels and an offset: copied, then normalized
    w, b = _params(5, device)
    with fastdl.use_backend(backend):
        y = FF.batch_norm(x, None, None, w, b, training=True, act="gelu")
    assert_close(y, ref.batch_norm(x, None, None, w, b, True, act_name="gelu"), torch.float32)


def test_gradcheck_fp64_cpu():
    x = torch.randn(3, 4, 3, 2, dtype=torch.float64, requires_grad=True)
    w = torch.rand(4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    r = torch.randn(3, 4, 3, 2, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    xc = x.detach().to(memory_format=torch.channels_last).requires_grad_()
    with fastdl.use_backend("cpu"):
        for inp in (x, xc):
            assert torch.autograd.gradcheck(
                lambda x, w, b, r: FF.batch_norm(x, None, None, w, b, True, act="silu", residual=r), (inp, w, b, r))
            assert torch.autograd.gradcheck(
                lambda x, w, b, r: FF.batch_norm(x, rm, rv, w, b, False, act="tanh", residual=r), (inp, w, b, r))
        assert torch.autograd.gradcheck(lambda x: FF.batch_norm(x, None, None, training=True), (x,))


# --- registered ops -------------------------------------------------------------------------
@pytest.mark.parametrize("device,backend", KERNEL_CASES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_opcheck(device, backend, channels_last):
    ops = torch.ops.fastdl
    sfx = "_triton" if backend == "triton" else ""
    x = _make((2, 5, 3, 3), torch.float16, channels_last, device)
    g, r = torch.randn_like(x), torch.randn_like(x)
    mean, scale, shift = (torch.randn(5, device=device) for _ in range(3))
    torch.library.opcheck(getattr(ops, "batch_norm_stats" + sfx), (x,))
    for res, act in ((None, "none"), (r, "relu")):
        torch.library.opcheck(getattr(ops, "batch_norm_fwd" + sfx), (x, mean, scale, shift, res, act, 0.0))
        for write_dz in (False, True):
            torch.library.opcheck(getattr(ops, "batch_norm_bwd_reduce" + sfx),
                                  (g, x, mean, scale, shift, res, act, 0.0, write_dz))
        torch.library.opcheck(getattr(ops, "batch_norm_bwd" + sfx),
                              (g, x, mean, scale, shift, res, scale, shift, act, 0.0))


@pytest.mark.parametrize("device,backend", CASES)
def test_compile_fullgraph(device, backend):
    m = fastdl.nn.BatchNormAct2d(4).to(device)
    x = _make((3, 4, 5, 5), torch.float32, True, device).requires_grad_()
    r = torch.randn(3, 4, 5, 5, device=device)

    def f(x, r):
        y = FF.batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias, True, 0.1, 1e-5, "silu")
        return y.sum() + m(x, r).square().sum()

    with fastdl.use_backend(backend):
        torch._dynamo.reset()
        out = torch.compile(f, fullgraph=True, backend="aot_eager")(x, r)
        out.backward()
        assert m.num_batches_tracked.item() == 1
        gx, gw, stats = x.grad.clone(), m.weight.grad.clone(), (m.running_mean.clone(), m.running_var.clone())
        x.grad = m.weight.grad = None
        m.running_mean.zero_()
        m.running_var.fill_(1)
        m.num_batches_tracked.zero_()
        f(x, r).backward()
    torch.testing.assert_close(gx, x.grad)
    torch.testing.assert_close(gw, m.weight.grad)
    torch.testing.assert_close(stats[0], m.running_mean)
    torch.testing.assert_close(stats[1], m.running_var)
    assert m.num_batches_tracked.item() == 1


def test_compile_inductor_cpu():
    x = torch.randn(4, 6, 3, 3)
    rm, rv = torch.randn(6), torch.rand(6) + 0.5
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: FF.batch_norm(x, rm, rv, act="relu") * 2, fullgraph=True)
    assert_close(compiled(x), ref.batch_norm(x, rm.double(), rv.double(), None, None, False, act_name="relu") * 2,
                 torch.float32)


# --- bad input -------------------------------------------------------------------------------
def test_errors():
    x = torch.randn(4, 3, 2, 2)
    rm, rv = torch.zeros(3), torch.ones(3)
    with pytest.raises(ValueError, match=r"weight must have shape \[3\] \(the channels of input"):
        FF.batch_norm(x, rm, rv, weight=torch.ones(4))
    with pytest.raises(ValueError, match=r"running_mean must have shape \[3\]"):
        FF.batch_norm(x, torch.zeros(5), rv)
    with pytest.raises(TypeError, match="running_var must be float32 or input's dtype"):
        FF.batch_norm(x, rm, torch.ones(3, dtype=torch.float64))
    with pytest.raises(TypeError, match="running_mean must be float32 or input's dtype"):
        FF.batch_norm(x.bfloat16(), rm.half(), rv)
    with pytest.raises(ValueError, match="running_mean and running_var must both be given"):
        FF.batch_norm(x, rm, None, training=True)
    with pytest.raises(ValueError, match="running_mean must be defined in evaluation mode"):
        FF.batch_norm(x, None, None, training=False)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        FF.batch_norm(torch.randn(1, 3), rm, rv, training=True)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        fastdl.nn.BatchNorm2d(3)(torch.randn(1, 3, 1, 1))
    with pytest.raises(ValueError, match="eps must be positive during training"):
        FF.batch_norm(x, rm, rv, training=True, eps=0.0)
    with pytest.raises(ValueError, match="residual must have input's shape"):
        FF.batch_norm(x, rm, rv, residual=torch.randn(4, 3, 2, 1))
    with pytest.raises(TypeError, match="residual must have input's dtype"):
        FF.batch_norm(x, rm, rv, residual=x.half())
    with pytest.raises(ValueError, match="act must be None or one of"):
        FF.batch_norm(x, rm, rv, act="swish")
    with pytest.raises(ValueError, match="at least 2 dims"):
        FF.batch_norm(torch.randn(3), rm, rv)
    with pytest.raises(TypeError, match="input must be float32"):
        FF.batch_norm(x.int(), rm, rv)
    with pytest.raises(ValueError, match="running_mean must be on input's device"):
        FF.batch_norm(x, rm.to("meta"), rv)
    with pytest.raises(ValueError, match="expected 4D input"):
        fastdl.nn.BatchNorm2d(3)(torch.randn(4, 3))


def test_cpp_errors_name_the_argument():
    ops = torch.ops.fastdl
    x, p = torch.randn(2, 3, 4), torch.randn(3)
    with pytest.raises(RuntimeError, match=r"scale must have shape \[3\]"):
        ops.batch_norm_fwd(x, p, torch.randn(4), p, None, "relu", 0.0)
    with pytest.raises(RuntimeError, match="shift must be Float for a BFloat16 input"):
        ops.batch_norm_fwd(x.bfloat16(), p, p, p.bfloat16(), None, "relu", 0.0)
    with pytest.raises(RuntimeError, match="residual must have the shape of input"):
        ops.batch_norm_fwd(x, p, p, p, torch.randn(2, 3, 5), "none", 0.0)
    with pytest.raises(RuntimeError, match="act must be one of"):
        ops.batch_norm_fwd(x, p, p, p, None, "swish", 0.0)
    with pytest.raises(RuntimeError, match="grad_out must have the dtype of input"):
        ops.batch_norm_bwd_reduce(x.half(), x, p, p, p, None, "none", 0.0, False)
    with pytest.raises(RuntimeError, match="input must have at least 2 dims"):
        ops.batch_norm_stats(torch.randn(5))


@pytest.mark.skipif(HAS_CUDA, reason="checks the error a CPU-only machine gives for backend 'cuda'")
def test_explicit_backend_that_cannot_serve_raises():
    x, rm, rv = torch.randn(3, 2), torch.zeros(2), torch.ones(2)
    with fastdl.use_backend("cuda"), pytest.raises(fastdl.BackendUnavailable, match="cuda tensors only"):
        FF.batch_norm(x, rm, rv)
    with fastdl.use_backend("triton"), pytest.raises(fastdl.BackendUnavailable, match="no float64"):
        FF.batch_norm(x.double(), rm.double(), rv.double())


# --- sizes (GPU) -------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (none visible on this machine)")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,channels_last", [((256, 64, 56, 56), True), ((256, 64, 56, 56), False),
                                                 ((256, 2048, 7, 7), False), ((7, 4096, 3, 5), True),
                                                 ((2, 1, 3000, 3001), False), ((4_000_000, 3), False)],
                         ids=str)
def test_large_cuda(backend, dtype, shape, channels_last):
    x = _make(shape, dtype, channels_last, "cuda").requires_grad_()
    res = torch.randn_like(x).requires_grad_()
    w, b = _params(shape[1], "cuda")
    with fastdl.use_backend(backend):
        y = FF.batch_norm(x, None, None, w, b, True, act="relu", residual=res)
    leaves = [_leaf64(t) for t in (x, w, b, res)]
    want = ref.batch_norm(leaves[0], None, None, leaves[1], leaves[2], True, act_name="relu", residual=leaves[3])
    assert_close(y, want, dtype, "forward")
    g = torch.randn_like(y)
    y.backward(g)
    want.backward(g.double())
    assert_rel_l2(x.grad, leaves[0].grad, dtype, "grad input")
    assert_rel_l2(w.grad, leaves[1].grad, dtype, "grad weight")
    assert_rel_l2(res.grad, leaves[3].grad, dtype, "grad residual")


@pytest.mark.large
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (none visible on this machine)")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_more_than_2_31_elements(backend, channels_last):
    if torch.cuda.get_device_properties(0).total_memory < 24 * 2**30:
        pytest.skip("needs a 24 GiB GPU")
    n, c, h, w = 2**31 // (8 * 256 * 256) + 1, 8, 256, 256
    x = torch.empty(n, c, h, w, dtype=torch.bfloat16, device="cuda")
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.fill_(1.0)
    x[-1] = torch.randn(c, h, w, dtype=torch.bfloat16)
    ops = torch.ops.fastdl
    sfx = "_triton" if backend == "triton" else ""
    mean, var = getattr(ops, "batch_norm_stats" + sfx)(x)
    tail = x[-1].double()
    want_mean = (tail.sum((1, 2)) + (n - 1) * h * w) / (n * h * w)
    torch.testing.assert_close(mean.double(), want_mean, rtol=1e-5, atol=1e-6)
    one = torch.ones(c, device="cuda")
    y = getattr(ops, "batch_norm_fwd" + sfx)(x, mean, one, one * 0, None, "relu", 0.0)
    assert_close(y[-1], torch.relu(tail - mean.double()[:, None, None]), torch.bfloat16, "last sample")
