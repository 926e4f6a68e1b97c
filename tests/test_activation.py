"""Activation family: bias_act / gelu / relu / ... and the gated geglu / swiglu,
against fp64 references, on every backend this machine has."""
import warnings

import pytest
import torch

import fastdl
import fastdl.functional as FF
import reference as ref
from conftest import HAS_CUDA, REL_L2, assert_close, assert_rel_l2, backend_cases

ACTS = ["gelu", "gelu_tanh", "relu", "leaky_relu", "silu", "sigmoid", "tanh"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# 1, a prime, just past the 1024-element Triton block, rows of a width the
# CUDA vector path takes (multiple of 8) and one it cannot, empty.
SHAPES = [(1,), (13,), (3, 1031), (2, 3, 8), (257, 24), (0, 5)]
CASES = backend_cases()


def _run(device, backend, fn, *tensors):
    with fastdl.use_backend(backend):
        return fn(*tensors)


def _check_fwd_bwd(device, backend, dtype, x, bias, fn, ref_fn):
    x = x.to(device).detach().requires_grad_()  # a fresh leaf: never the caller's tensor
    if bias is not None:
        bias = bias.to(device).detach().requires_grad_()
    out = _run(device, backend, fn, x, bias)
    x64 = x.detach().double().requires_grad_()
    b64 = bias.detach().double().requires_grad_() if bias is not None else None
    expected = ref_fn(x64, b64)
    assert out.dtype == dtype and out.shape == expected.shape
    assert_close(out, expected, dtype, "forward")
    g = torch.randn_like(out)
    out.backward(g)
    expected.backward(g.double())
    assert_close(x.grad, x64.grad, dtype, "grad input")
    if bias is not None:
        assert bias.grad.dtype == bias.dtype
        assert_rel_l2(bias.grad, b64.grad, dtype, "grad bias")


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_bias_act(device, backend, dtype, act, shape, with_bias):
    x = torch.randn(shape) * 3
    bias = torch.randn(shape[-1]) if with_bias else None
    x, bias = x.to(dtype), bias.to(dtype) if with_bias else None
    _check_fwd_bwd(device, backend, dtype, x, bias,
                   lambda x, b: FF.bias_act(x, b, act, negative_slope=0.2),
                   lambda x, b: ref.bias_act(x, b, act, 0.2))


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fp32_bias_with_low_precision_input(device, backend, dtype):
    # Autocast keeps Linear biases in fp32: the fused op takes them as they are.
    x, bias = (torch.randn(37, 40) * 2).to(dtype), torch.randn(40)
    _check_fwd_bwd(device, backend, dtype, x, bias,
                   lambda x, b: FF.gelu(x, bias=b), lambda x, b: ref.bias_act(x, b, "gelu"))


@pytest.mark.parametrize("device,backend", CASES)
def test_empty_last_dim_with_bias(device, backend):
    # An empty last dim with its (0,) bias: the backward returns empty grads
    # (the bias grad's row count cannot be inferred with reshape(-1, 0)).
    x = torch.randn(3, 0, device=device, requires_grad=True)
    bias = torch.randn(0, device=device, requires_grad=True)
    with fastdl.use_backend(backend):
        y = FF.bias_act(x, bias, "gelu")
        y.backward(torch.randn_like(y))
    assert y.shape == (3, 0) and x.grad.shape == (3, 0) and bias.grad.shape == (0,)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous(device, backend, dtype):
    base = torch.randn(24, 17, dtype=dtype)
    x = base.t()  # (17, 24), last dim strided
    bias = torch.randn(24, dtype=dtype)
    _check_fwd_bwd(device, backend, dtype, x, bias,
                   lambda x, b: FF.gelu(x, "tanh", bias=b), lambda x, b: ref.bias_act(x, b, "gelu_tanh"))
    sliced = torch.randn(9, 40, dtype=dtype)[:, 3:35:2]  # offset and stride 2
    _check_fwd_bwd(device, backend, dtype, sliced, None,
                   lambda x, b: FF.silu(x), lambda x, b: ref.bias_act(x, b, "silu"))


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_layout_is_kept_without_bias(device, backend, dtype):
    # channels_last activations (the ResNet case) must not turn into NCHW copies.
    x = torch.randn(2, 5, 3, 7).to(dtype=dtype, memory_format=torch.channels_last)
    _check_fwd_bwd(device, backend, dtype, x, None,
                   lambda x, b: FF.relu(x), lambda x, b: ref.bias_act(x, b, "relu"))
    xx = x.to(device).detach().requires_grad_()
    with fastdl.use_backend(backend):
        y = FF.silu(xx)
        assert y.is_contiguous(memory_format=torch.channels_last)
        g = torch.randn(y.shape, dtype=dtype, device=device)  # NCHW grad for a channels_last input
        y.backward(g)
    x64 = xx.detach().double().requires_grad_()
    ref.bias_act(x64, None, "silu").backward(g.double())
    assert_close(xx.grad, x64.grad, dtype, "grad with a grad_out in another layout")


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ["gelu", "gelu_tanh", "silu", "relu", "sigmoid"])
@pytest.mark.parametrize("shape", [(1, 2), (5, 14), (3, 2 * 1031), (2, 4, 16), (0, 6)], ids=str)
def test_gated(device, backend, dtype, act, shape):
    x = (torch.randn(shape) * 3).to(dtype)
    _check_fwd_bwd(device, backend, dtype, x, None,
                   lambda x, b: FF.gated_act(x, act), lambda x, b: ref.gated(x, act))


@pytest.mark.parametrize("device,backend", CASES)
def test_geglu_swiglu_modules(device, backend):
    x = torch.randn(4, 7, 30, device=device)
    with fastdl.use_backend(backend):
        assert_close(fastdl.nn.GEGLU()(x), ref.gated(x, "gelu"), torch.float32)
        assert_close(fastdl.nn.GEGLU("tanh")(x), ref.gated(x, "gelu_tanh"), torch.float32)
        assert_close(fastdl.nn.SwiGLU()(x), ref.gated(x, "silu"), torch.float32)


@pytest.mark.parametrize("device,backend", CASES)
def test_modules_match_torch(device, backend):
    x = torch.randn(6, 33, device=device)
    pairs = [(fastdl.nn.GELU(), torch.nn.GELU()), (fastdl.nn.GELU("tanh"), torch.nn.GELU("tanh")),
             (fastdl.nn.ReLU(), torch.nn.ReLU()), (fastdl.nn.LeakyReLU(0.3), torch.nn.LeakyReLU(0.3)),
             (fastdl.nn.SiLU(), torch.nn.SiLU()), (fastdl.nn.Sigmoid(), torch.nn.Sigmoid()),
             (fastdl.nn.Tanh(), torch.nn.Tanh())]
    with fastdl.use_backend(backend):
        for ours, theirs in pairs:
            assert isinstance(ours, type(theirs))
            assert_close(ours(x), theirs(x.double()), torch.float32, type(ours).__name__)


def test_gradcheck_fp64_cpu():
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    with fastdl.use_backend("cpu"):
        for act in ACTS:
            if act in ("relu", "leaky_relu"):  # kink at 0: keep inputs away from it
                xx = (x.detach().abs() + 0.1).requires_grad_()
                assert torch.autograd.gradcheck(lambda x: FF.bias_act(x, None, act), (xx,))
            else:
                assert torch.autograd.gradcheck(lambda x, b: FF.bias_act(x, b, act), (x, b))
        xg = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda x: FF.gated_act(x, "gelu"), (xg,))
        assert torch.autograd.gradcheck(lambda x: FF.swiglu(x), (xg,))


# --- registered ops -----------------------------------------------------------------
def _op_samples(device, dtype):
    x = torch.randn(7, 16, device=device, dtype=dtype)
    b = torch.randn(16, device=device, dtype=dtype)
    return x, b, torch.randn_like(x)


@pytest.mark.parametrize("device,backend", [c for c in CASES if c.values[1] != "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_opcheck(device, backend, dtype):
    x, b, g = _op_samples(device, dtype)
    suffix = "_triton" if backend == "triton" else ""
    ops = torch.ops.fastdl
    for act in ("gelu", "leaky_relu"):
        for bias in (b, None):
            torch.library.opcheck(getattr(ops, "bias_act_fwd" + suffix), (x, bias, act, 0.1))
            torch.library.opcheck(getattr(ops, "bias_act_bwd" + suffix), (g, x, bias, act, 0.1))
    # layouts: channels_last kept without a bias; transposed input and grad
    x4 = x.reshape(1, 7, 4, 4).to(memory_format=torch.channels_last)
    torch.library.opcheck(getattr(ops, "bias_act_fwd" + suffix), (x4, None, "silu", 0.0))
    torch.library.opcheck(getattr(ops, "bias_act_bwd" + suffix), (g.reshape(1, 7, 4, 4), x4, None, "silu", 0.0))
    torch.library.opcheck(getattr(ops, "bias_act_bwd" + suffix), (g.t(), x.t(), None, "gelu", 0.0))
    torch.library.opcheck(getattr(ops, "glu_fwd" + suffix), (x, "silu", 0.0))
    torch.library.opcheck(getattr(ops, "glu_bwd" + suffix), (g[:, :8].contiguous(), x, "silu", 0.0))


@pytest.mark.parametrize("device,backend", CASES)
def test_compile_fullgraph(device, backend):
    x = torch.randn(8, 24, device=device, requires_grad=True)
    b = torch.randn(24, device=device, requires_grad=True)

    def f(x, b):
        return FF.gelu(x, bias=b).sum() + FF.swiglu(x).sum() + FF.relu(x).sum()

    with fastdl.use_backend(backend):
        torch._dynamo.reset()
        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
        out = compiled(x, b)
        out.backward()
        gx, gb = x.grad.clone(), b.grad.clone()
        x.grad = b.grad = None
        f(x, b).backward()
    torch.testing.assert_close(gx, x.grad)
    torch.testing.assert_close(gb, b.grad)


def test_compile_inductor_cpu():
    x = torch.randn(8, 24)
    b = torch.randn(24)
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, b: FF.gelu(x, bias=b) * 2, fullgraph=True)
    assert_close(compiled(x, b), ref.bias_act(x, b, "gelu") * 2, torch.float32)


# --- bad input -------------------------------------------------------------------------
def test_errors():
    x = torch.randn(4, 6)
    with pytest.raises(TypeError, match="input must be float32"):
        FF.gelu(torch.ones(4, 6, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"bias must have shape \[6\]"):
        FF.gelu(x, bias=torch.randn(5))
    with pytest.raises(ValueError, match=r"bias must have shape \[6\]"):
        FF.gelu(x, bias=torch.randn(1, 6))
    with pytest.raises(TypeError, match="bias must be float32 or input's dtype"):
        FF.gelu(x.half(), bias=torch.randn(6, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="bias must be on input's device"):
        FF.gelu(x, bias=torch.randn(6, device="meta"))
    with pytest.raises(ValueError, match="act must be one of"):
        FF.bias_act(x, None, act="swish")
    with pytest.raises(ValueError, match="approximate must be"):
        FF.gelu(x, approximate="fast")
    with pytest.raises(ValueError, match="last dim must be even"):
        FF.swiglu(torch.randn(3, 5))
    with pytest.raises(ValueError, match="backend must be one of"):
        fastdl.set_backend("cudnn")


def test_cpp_errors_name_the_argument():
    ops = torch.ops.fastdl
    with pytest.raises(RuntimeError, match="act must be one of"):
        ops.bias_act_fwd(torch.randn(3), None, "swish", 0.0)
    with pytest.raises(RuntimeError, match=r"bias must have shape \[3\]"):
        ops.bias_act_fwd(torch.randn(3), torch.randn(4), "gelu", 0.0)
    with pytest.raises(RuntimeError, match="input must be float32"):
        ops.bias_act_fwd(torch.ones(3, dtype=torch.int64), None, "gelu", 0.0)
    with pytest.raises(RuntimeError, match="grad_out must have the shape of input"):
        ops.bias_act_bwd(torch.randn(4), torch.randn(3), None, "gelu", 0.0)
    with pytest.raises(RuntimeError, match="last dim must be even"):
        ops.glu_fwd(torch.randn(3), "gelu", 0.0)


@pytest.mark.skipif(HAS_CUDA, reason="checks the error a CPU-only machine gives for backend 'cuda'")
def test_explicit_backend_that_cannot_serve_raises():
    with fastdl.use_backend("cuda"), pytest.raises(fastdl.BackendUnavailable, match="cuda tensors only"):
        FF.gelu(torch.randn(3))
    with fastdl.use_backend("triton"), pytest.raises(fastdl.BackendUnavailable, match="no float64"):
        FF.gelu(torch.randn(3, dtype=torch.float64))


def test_auto_fallback_warns_once_and_info_shows_it(monkeypatch, capsys):
    from fastdl import _backend

    # As if fastdl._C had failed to build: auto on CPU must say it fell back.
    monkeypatch.setattr(_backend, "_C", None)
    monkeypatch.setattr(_backend, "C_ERROR", "ImportError: simulated")
    monkeypatch.setattr(_backend, "FALLBACKS", {})
    with pytest.warns(RuntimeWarning, match="falls back to 'torch'"):
        y = FF.gelu(torch.randn(5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        FF.gelu(torch.randn(5))  # no second warning
    assert y.shape == (5,)
    fastdl.info()
    assert "activation on cpu -> torch" in capsys.readouterr().out


def test_per_op_backend_choice():
    fastdl.set_backend("torch", op="activation")
    assert fastdl.get_backend("activation") == "torch"
    with fastdl.use_backend("cpu", op="activation"):
        assert fastdl.get_backend("activation") == "cpu"
    assert fastdl.get_backend("activation") == "torch"
    with pytest.raises(ValueError, match="unknown op"):
        fastdl.set_backend("torch", op="nope")


# --- int64 offsets ------------------------------------------------------------------------
def _free_gib():
    import os
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30


@pytest.mark.large
@pytest.mark.parametrize("device,backend", [c for c in CASES if c.values[1] != "torch"])
def test_more_than_2_31_elements(device, backend):
    if device == "cpu" and backend == "triton":
        pytest.skip("the interpreter would take minutes on 2^31 elements; checked on GPU")
    need = 20 if device == "cpu" else 0
    if device == "cpu" and _free_gib() < need:
        pytest.skip(f"needs {need} GiB of free memory")
    if device == "cuda" and torch.cuda.get_device_properties(0).total_memory < 24 * 2**30:
        pytest.skip("needs a 24 GiB GPU")
    cols = 40
    rows = 2**31 // cols + 3
    x = torch.empty(rows, cols, dtype=torch.bfloat16, device=device)
    x[-5:] = torch.randn(5, cols, dtype=torch.bfloat16)
    x[:-5] = 1.0
    b = torch.randn(cols, dtype=torch.bfloat16, device=device)
    ops = torch.ops.fastdl
    suffix = "_triton" if backend == "triton" else ""
    y = getattr(ops, "bias_act_fwd" + suffix)(x, b, "silu", 0.0)
    assert_close(y[-5:], ref.bias_act(x[-5:], b, "silu"), torch.bfloat16, "tail rows")
    del y
    dx = getattr(ops, "bias_act_bwd" + suffix)(x, x, b, "silu", 0.0)
    x64 = (x[-5:].double() + b.double()).requires_grad_()
    torch.nn.functional.silu(x64).backward(x[-5:].double())
    assert_close(dx[-5:], x64.grad, torch.bfloat16, "tail rows grad")
