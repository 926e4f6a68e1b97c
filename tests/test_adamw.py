"""fastdl.optim.Adam / AdamW (fused adamw_step op) against torch.optim.Adam /
AdamW, on every backend this machine has."""
import copy
import itertools
import math
import warnings

import pytest
import torch

import fastdl
import reference as ref
from conftest import HAS_CUDA, NO_GPU, TOL, assert_rel_l2, backend_cases
from fastdl._ops import adamw as adamw_ops
from fastdl.optim import Adam, AdamW

CASES = backend_cases()
# 1 element, a prime, just past the Triton block (1024) and the CUDA vector
# width, an odd 3-d shape, an empty tensor.
SHAPES = [(1,), (13,), (3, 1031), (2, 3, 8), (0, 4)]
STEPS = 20
# AdamW options: every combination on the C++ and torch backends; the
# interpreter runs a covering subset (each option on and off at least once).
OPTIONS = [dict(amsgrad=a, maximize=m, weight_decay=w, lr_tensor=t)
           for a, m, w, t in itertools.product([False, True], [False, True], [0.0, 0.1], [False, True])]
TRITON_OPTIONS = [OPTIONS[0], OPTIONS[-1], dict(amsgrad=True, maximize=False, weight_decay=0.1, lr_tensor=False)]


def _close_fp32(actual, expected, msg):
    """fp32 results of the same math in a different order: 1e-6 relative
    (L2 per tensor), and elementwise a few ulps."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, msg
    if expected.numel() == 0:
        return
    err = (actual.double() - expected.double()).norm().item()
    assert err <= 1e-6 * expected.double().norm().item() + 1e-12, f"{msg}: relative L2 error too large ({err:.3g})"
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6, msg=lambda m: f"{msg}\n{m}")


def _params(device, shapes=SHAPES, dtype=torch.float32):
    return [torch.randn(s, device=device).to(dtype) for s in shapes]


def _twins(params):
    return [p.clone().requires_grad_() for p in params], [p.clone().requires_grad_() for p in params]


def _set_grads(pairs, grads):
    for params in pairs:
        for p, g in zip(params, grads):
            p.grad = None if g is None else g.clone().to(p.dtype)


def _compare_states(ours, o, theirs, t, keys=("exp_avg", "exp_avg_sq", "max_exp_avg_sq")):
    for i, (a, b) in enumerate(zip(ours, theirs)):
        _close_fp32(a.detach(), b.detach(), f"param {i}")
        sa, sb = o.state[a], t.state[b]
        assert sa.keys() == sb.keys(), f"state keys of param {i}: {sa.keys()} != {sb.keys()}"
        for k in keys:
            if k in sb:
                _close_fp32(sa[k], sb[k], f"{k} of param {i}")
        if sb:
            assert sa["step"].item() == sb["step"].item()


def _kwargs(opt, device):
    kw = {k: v for k, v in opt.items() if k != "lr_tensor"}
    kw["lr"] = torch.tensor(3e-2, device=device) if opt["lr_tensor"] else 3e-2
    return kw


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("cls,torch_cls", [(AdamW, torch.optim.AdamW), (Adam, torch.optim.Adam)],
                         ids=["adamw", "adam"])
def test_matches_torch_every_option(device, backend, cls, torch_cls):
    options = TRITON_OPTIONS if backend == "triton" else OPTIONS
    for opt in options:
        ours, theirs = _twins(_params(device))
        o = cls(ours, **_kwargs(opt, device))
        t = torch_cls(theirs, **_kwargs(opt, device))
        with fastdl.use_backend(backend):
            for _ in range(STEPS):
                _set_grads((ours, theirs), [torch.randn_like(p) for p in ours])
                o.step()
                t.step()
        _compare_states(ours, o, theirs, t)


# --- low precision -----------------------------------------------------------------------------
def _fp64_reference(params, grads_per_step, **kw):
    ref_params = [p.detach().double().requires_grad_() for p in params]
    opt = torch.optim.AdamW(ref_params, **kw)
    for grads in grads_per_step:
        for p, g in zip(ref_params, grads):
            p.grad = g.double()
        opt.step()
    return ref_params


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_master_weights_track_fp32(device, backend, dtype):
    """With master weights the fp32 copy follows torch's fp32 AdamW on the same
    grads, and the param is that copy rounded once."""
    init = _params(device, dtype=dtype)
    ours = [p.clone().requires_grad_() for p in init]
    theirs = [p.float().requires_grad_() for p in init]
    o = AdamW(ours, lr=1e-2, master_weights=True)
    t = torch.optim.AdamW(theirs, lr=1e-2)
    with fastdl.use_backend(backend):
        for _ in range(STEPS):
            grads = [torch.randn_like(p, dtype=torch.float32).to(dtype) for p in ours]
            _set_grads((ours, theirs), grads)
            o.step()
            t.step()
    for i, (a, b) in enumerate(zip(ours, theirs)):
        master = o.state[a]["master_param"]
        assert master.dtype == torch.float32 and o.state[a]["exp_avg"].dtype == torch.float32
        _close_fp32(master, b.detach(), f"master {i}")
        if backend == "triton" and device == "cpu":  # the interpreter rounds bf16/fp16 toward zero
            torch.testing.assert_close(a.detach(), master.to(dtype), **TOL[dtype])
        else:
            assert torch.equal(a.detach(), master.to(dtype)), f"param {i} is not its master rounded"


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("dtype,state_dtype,master", [
    (torch.bfloat16, None, False), (torch.float32, torch.bfloat16, False),
    (torch.bfloat16, torch.bfloat16, True), (torch.bfloat16, torch.float32, False),
    (torch.float16, torch.float32, False)], ids=str)
def test_low_precision_error_bound(device, backend, dtype, state_dtype, master):
    """Against an fp64 reference, our error is at most that of torch's own
    AdamW in the same precision (bf16 params and moments when either is bf16),
    plus a little: the fp32 math may only help. (fp16 moments are not tested:
    v underflows in fp16 for torch too; fp16 params want fp32 state.)"""
    if backend == "triton" and device == "cpu" and torch.bfloat16 in (dtype, state_dtype):
        pytest.skip("the interpreter rounds bf16 stores toward zero, a bias this bound would catch; "
                    "checked on GPU")
    shapes = [(13,), (3, 1031)]
    init = _params(device, shapes, dtype=dtype)
    grads_per_step = [[torch.randn(s, device=device).to(dtype) for s in shapes] for _ in range(STEPS)]
    ours = [p.clone().requires_grad_() for p in init]
    o = AdamW(ours, lr=1e-2, master_weights=master, state_dtype=state_dtype)
    # torch in the same storage: bf16 moments need bf16 params in torch.
    low = torch.bfloat16 if torch.bfloat16 in (dtype, state_dtype) else dtype
    theirs = [p.to(low, copy=True).requires_grad_() for p in init]
    t = torch.optim.AdamW(theirs, lr=1e-2)
    with fastdl.use_backend(backend):
        for grads in grads_per_step:
            _set_grads((ours,), grads)
            _set_grads((theirs,), grads)
            o.step()
            t.step()
    exact = _fp64_reference(init, grads_per_step, lr=1e-2)
    for i, (a, b, e) in enumerate(zip(ours, theirs, exact)):
        assert a.dtype == dtype and o.state[a]["exp_avg"].dtype == (state_dtype or (
            torch.float32 if master else dtype))
        ours_err = (a.detach().double() - e.detach()).norm().item()
        torch_err = (b.detach().double() - e.detach()).norm().item()
        ulp = torch.finfo(dtype).eps * e.detach().norm().item()
        assert ours_err <= 1.05 * torch_err + ulp, f"param {i}: {ours_err:.3g} vs torch {torch_err:.3g}"


@pytest.mark.parametrize("device,backend", CASES)
def test_stochastic_rounding_same_bits_everywhere(device, backend):
    """The rounding hash is a pure function of (seed, tensor, step, element):
    every backend writes the same bf16 bits as the torch composite."""
    init = _params(device, [(3, 1031), (13,)], dtype=torch.bfloat16)
    grads = [[torch.randn_like(p, dtype=torch.float32).bfloat16() for p in init] for _ in range(3)]
    results = []
    for b in (backend, "torch"):
        params = [p.clone().requires_grad_() for p in init]
        # fp32 moments: the interpreter's bf16 stores round toward zero.
        o = AdamW(params, lr=1e-2, stochastic_rounding=True, seed=1234, state_dtype=torch.float32)
        with fastdl.use_backend(b):
            for g in grads:
                _set_grads((params,), g)
                o.step()
        results.append(params)
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device,backend", CASES)
def test_stochastic_rounding_is_unbiased(device, backend):
    """Updates far below half a bf16 ulp: round-to-nearest never moves the
    param, stochastic rounding moves it by the exact amount on average."""
    n, steps, lr = 4096, 8, 1e-4
    init = torch.ones(n, device=device, dtype=torch.bfloat16)  # ulp 2^-7: lr is 1/78 of it
    results = {}
    for sr in (False, True):
        p = init.clone().requires_grad_()
        o = AdamW([p], lr=lr, weight_decay=0.0, stochastic_rounding=sr)
        with fastdl.use_backend(backend):
            for _ in range(steps):
                p.grad = torch.ones_like(p)  # Adam's update is then exactly lr
                o.step()
        results[sr] = p.detach().double()
    if not (backend == "triton" and device == "cpu"):  # the interpreter rounds toward zero
        assert torch.equal(results[False], init.double())
    drift = (init.double() - results[True]).mean().item()
    expected = steps * lr
    # Each step moves an element by 0 or one ulp: per-element variance below ulp^2/4.
    sd = 2**-7 / 2 * math.sqrt(steps / n)
    assert abs(drift - expected) < 5 * sd, f"mean drift {drift:.3g}, expected {expected:.3g}"


# --- GradScaler, clipping, schedulers -------------------------------------------------------------
def _scaler_loop(device, params, opt, grads_per_step, clip=None, unscale_first=False):
    scaler = torch.amp.GradScaler(device, init_scale=2.0**10, growth_interval=2)
    for grads in grads_per_step:
        scaler.scale(torch.zeros((), device=device))  # creates the scale tensor on first use
        scale = scaler.get_scale()
        for p, g in zip(params, grads):
            p.grad = (g * scale).to(p.dtype)
        if unscale_first or clip is not None:
            scaler.unscale_(opt)
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(params, clip)
        scaler.step(opt)
        scaler.update()
    return scaler


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("unscale_first", [False, True], ids=["fused-unscale", "unscale_"])
def test_grad_scaler_skips_inf_steps(device, backend, unscale_first):
    ours, theirs = _twins(_params(device, [(13,), (3, 1031)]))
    o, t = AdamW(ours, lr=1e-2), torch.optim.AdamW(theirs, lr=1e-2)
    grads_per_step = [[torch.randn_like(p) for p in ours] for _ in range(8)]
    grads_per_step[3][1][1, 5] = float("inf")
    grads_per_step[6][0][2] = float("nan")
    with fastdl.use_backend(backend):
        s1 = _scaler_loop(device, ours, o, grads_per_step, unscale_first=unscale_first)
    s2 = _scaler_loop(device, theirs, t, grads_per_step)
    assert s1.get_scale() == s2.get_scale()
    _compare_states(ours, o, theirs, t)
    assert o.state[ours[0]]["step"].item() == 6  # two of eight steps skipped


@pytest.mark.parametrize("device,backend", CASES)
def test_inf_step_changes_nothing(device, backend):
    params = _params(device, [(13,), (2, 3, 8)])
    ours = [p.clone().requires_grad_() for p in params]
    o = AdamW(ours, lr=1e-2, amsgrad=True)
    with fastdl.use_backend(backend):
        _set_grads((ours,), [torch.randn_like(p) for p in ours])
        o.step()
        before = {k: v.clone() for k, v in o.state[ours[0]].items()}
        p_before = [p.detach().clone() for p in ours]
        o.found_inf = torch.ones((), device=device)
        o.grad_scale = torch.full((), 4.0, device=device)
        o.step()
    for a, b in zip(ours, p_before):
        assert torch.equal(a.detach(), b)
    for k, v in o.state[ours[0]].items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("max_norm", [0.5, 1e3], ids=["clipped", "unclipped"])
def test_fused_clipping_matches_clip_grad_norm(device, backend, max_norm):
    ours, theirs = _twins(_params(device))
    o = AdamW(ours, lr=1e-2, max_grad_norm=max_norm)
    t = torch.optim.AdamW(theirs, lr=1e-2)
    with fastdl.use_backend(backend):
        for _ in range(STEPS):
            grads = [torch.randn_like(p) for p in ours]
            _set_grads((ours, theirs), grads)
            o.step()
            norm = torch.nn.utils.clip_grad_norm_(theirs, max_norm)
            t.step()
            assert_rel_l2(o.last_grad_norm.reshape(1), ref.grad_norm(grads).reshape(1), torch.float32)
            torch.testing.assert_close(o.last_grad_norm, norm, rtol=2e-6, atol=0)
            for p, g in zip(ours, grads):
                assert torch.equal(p.grad, g), "clipping must not write .grad"
    _compare_states(ours, o, theirs, t)


@pytest.mark.parametrize("device,backend", CASES)
def test_clipping_with_grad_scaler(device, backend):
    """Fused unscale + clip + step against GradScaler.unscale_ + clip_grad_norm_ + step."""
    ours, theirs = _twins(_params(device, [(13,), (3, 1031)]))
    o = AdamW(ours, lr=1e-2, max_grad_norm=0.5)
    t = torch.optim.AdamW(theirs, lr=1e-2)
    grads_per_step = [[torch.randn_like(p) for p in ours] for _ in range(6)]
    grads_per_step[2][0][0] = float("inf")
    with fastdl.use_backend(backend):
        _scaler_loop(device, ours, o, grads_per_step)
    _scaler_loop(device, theirs, t, grads_per_step, clip=0.5)
    _compare_states(ours, o, theirs, t)


@pytest.mark.parametrize("device,backend", CASES)
def test_lambda_lr_warmup_cosine(device, backend):
    def warmup_cosine(step, warmup=5, total=STEPS):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))

    ours, theirs = _twins(_params(device))
    o, t = AdamW(ours, lr=3e-2), torch.optim.AdamW(theirs, lr=3e-2)
    so = torch.optim.lr_scheduler.LambdaLR(o, warmup_cosine)
    st = torch.optim.lr_scheduler.LambdaLR(t, warmup_cosine)
    with fastdl.use_backend(backend):
        for _ in range(STEPS):
            _set_grads((ours, theirs), [torch.randn_like(p) for p in ours])
            o.step()
            t.step()
            so.step()
            st.step()
            assert so.get_last_lr() == st.get_last_lr()
    _compare_states(ours, o, theirs, t)


@pytest.mark.parametrize("device,backend", CASES)
def test_params_without_grads_and_empty_groups(device, backend):
    ours, theirs = _twins(_params(device, [(13,), (5, 7), (3,)]))
    o = AdamW([{"params": ours[:2]}, {"params": []}, {"params": ours[2:], "lr": 1e-1}], lr=1e-2)
    t = torch.optim.AdamW([{"params": theirs[:2]}, {"params": []}, {"params": theirs[2:], "lr": 1e-1}], lr=1e-2)
    with fastdl.use_backend(backend):
        o.step()  # no grads at all
        for i in range(STEPS):
            grads = [torch.randn_like(p) for p in ours]
            grads[1] = grads[1] if i % 3 else None  # param 1 skips every third step
            grads[2] = grads[2] if i >= 4 else None  # param 2 has no grad at first
            _set_grads((ours, theirs), grads)
            o.step()
            t.step()
    _compare_states(ours, o, theirs, t)
    assert o.state[ours[1]]["step"].item() == STEPS - 7


@pytest.mark.parametrize("device,backend", CASES)
def test_complex_and_channels_last_params(device, backend):
    shapes = [(4, 3, 5, 5)]
    base = _params(device, shapes)
    ours = [base[0].to(memory_format=torch.channels_last).requires_grad_(), torch.randn(7, dtype=torch.complex64, device=device).requires_grad_()]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    o, t = AdamW(ours, lr=1e-2), torch.optim.AdamW(theirs, lr=1e-2)
    with fastdl.use_backend(backend):
        for _ in range(5):
            grads = [torch.randn_like(ours[0]).contiguous(), torch.randn_like(ours[1])]  # grad strides differ
            _set_grads((ours, theirs), grads)
            o.step()
            t.step()
    assert ours[0].is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(ours, theirs):
        _close_fp32(torch.view_as_real(a.detach()) if a.is_complex() else a.detach(),
                    torch.view_as_real(b.detach()) if b.is_complex() else b.detach(), "param")


# --- state dicts -------------------------------------------------------------------------------------
def _train(params, opt, grads_per_step):
    for grads in grads_per_step:
        _set_grads((params,), grads)
        opt.step()


@pytest.mark.parametrize("direction", ["torch_to_fastdl", "fastdl_to_torch"])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_state_dict_round_trip_with_torch(direction, amsgrad):
    init = _params("cpu", [(13,), (3, 31)])
    grads = [[torch.randn_like(p) for p in init] for _ in range(10)]
    make = {"fastdl": lambda ps: AdamW(ps, lr=1e-2, amsgrad=amsgrad),
            "torch": lambda ps: torch.optim.AdamW(ps, lr=1e-2, amsgrad=amsgrad)}
    src_kind, dst_kind = ("torch", "fastdl") if direction == "torch_to_fastdl" else ("fastdl", "torch")
    # The source trains 5 steps; the destination loads its state and both go on.
    src_params = [p.clone().requires_grad_() for p in init]
    src = make[src_kind](src_params)
    _train(src_params, src, grads[:5])
    dst_params = [p.detach().clone().requires_grad_() for p in src_params]
    dst = make[dst_kind](dst_params)
    dst.load_state_dict(copy.deepcopy(src.state_dict()))  # load_state_dict may share tensors
    _train(src_params, src, grads[5:])
    _train(dst_params, dst, grads[5:])
    ours, o, theirs, t = (dst_params, dst, src_params, src) if dst_kind == "fastdl" else (src_params, src, dst_params, dst)
    _compare_states(ours, o, theirs, t)


def test_state_dict_keeps_master_weights_and_state_dtype():
    init = _params("cpu", [(13,), (3, 31)], dtype=torch.bfloat16)
    grads = [[torch.randn_like(p) for p in init] for _ in range(6)]
    a_params = [p.clone().requires_grad_() for p in init]
    a = AdamW(a_params, lr=1e-2, master_weights=True, state_dtype=torch.bfloat16)
    _train(a_params, a, grads[:3])
    b_params = [p.detach().clone().requires_grad_() for p in a_params]
    b = AdamW(b_params, lr=1e-2, master_weights=True, state_dtype=torch.bfloat16)
    b.load_state_dict(a.state_dict())
    for pa, pb in zip(a_params, b_params):
        sa, sb = a.state[pa], b.state[pb]
        assert sb["master_param"].dtype == torch.float32 and sb["exp_avg"].dtype == torch.bfloat16
        assert torch.equal(sa["master_param"], sb["master_param"])
        assert torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    _train(a_params, a, grads[3:])
    _train(b_params, b, grads[3:])
    for pa, pb in zip(a_params, b_params):
        assert torch.equal(pa, pb)
    # torch's own AdamW takes it too (master copies ignored, moments cast to the param dtype).
    c = torch.optim.AdamW([p.detach().clone().requires_grad_() for p in init], lr=1e-2)
    c.load_state_dict(copy.deepcopy(a.state_dict()))
    # And a torch state dict gets master copies from the params.
    c_params = [p.detach().clone().requires_grad_() for p in init]
    c = torch.optim.AdamW(c_params, lr=1e-2)
    _train(c_params, c, grads[:2])
    d_params = [p.detach().clone().requires_grad_() for p in c_params]
    d = AdamW(d_params, lr=1e-2, master_weights=True)
    d.load_state_dict(copy.deepcopy(c.state_dict()))
    assert d.param_groups[0]["master_weights"] is True
    for p in d_params:
        assert torch.equal(d.state[p]["master_param"], p.detach().float())
        assert d.state[p]["exp_avg"].dtype == torch.float32


# --- ops: grad norm, opcheck, compile, errors ---------------------------------------------------------
@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_grad_norm(device, backend, dtype):
    grads = [(torch.randn(s, device=device) * 3).to(dtype) for s in SHAPES + [(20000,)]]
    grads.append(grads[2][:, 1:])  # a view with an offset (unaligned)
    with fastdl.use_backend(backend):
        dense = [g.contiguous() for g in grads]
        n1, n2 = adamw_ops.grad_norm(dense), adamw_ops.grad_norm(dense)
    assert n1.dtype == torch.float32 and n1.shape == ()
    assert torch.equal(n1, n2), "the norm must be deterministic"
    assert_rel_l2(n1.reshape(1), ref.grad_norm(grads).reshape(1), torch.float32, "grad norm")


def _op_args(device, amsgrad=True, master=True):
    params = [torch.randn(s, device=device).bfloat16() for s in [(13,), (2, 40)]]
    grads = [torch.randn_like(p) for p in params]
    masters = [p.float() for p in params] if master else []
    exp_avgs = [torch.rand_like(p, dtype=torch.float32) for p in params]
    exp_avg_sqs = [torch.rand_like(p, dtype=torch.float32) for p in params]
    maxes = [v + 0.1 for v in exp_avg_sqs] if amsgrad else []
    steps = [torch.full((), 3.0, device=device) for _ in params]
    one = torch.ones(1, device=device)
    return (params, grads, exp_avgs, exp_avg_sqs, maxes, masters, steps, 1e-2, one * 1e-2, 0.9, 0.99,
            1e-8, 0.1, True, False, one * 2.0, one * 0.0, one * 3.0, 1.0, True, 7)


@pytest.mark.parametrize("device,backend", [c for c in CASES if c.values[1] != "torch"])
def test_opcheck(device, backend):
    suffix = "_triton" if backend == "triton" else ""
    step = getattr(torch.ops.fastdl, "adamw_step" + suffix)
    norm = getattr(torch.ops.fastdl, "adamw_grad_norm" + suffix)
    torch.library.opcheck(step, _op_args(device))
    torch.library.opcheck(step, _op_args(device, amsgrad=False, master=False))
    torch.library.opcheck(norm, ([torch.randn(13, device=device), torch.randn(3, 5, device=device).half()],))


@pytest.mark.parametrize("device,backend", CASES)
def test_compile_fullgraph(device, backend):
    """The op under torch.compile: functionalized in-place lists, fake kernels."""
    args = _op_args(device)
    expected = _op_args(device)
    for a, b in zip(args, expected):
        if isinstance(a, list):
            for x, y in zip(a, b):
                y.copy_(x)

    def step(*a):
        adamw_ops.fused_step(*a[:7], lr=a[7], lr_tensor=a[8], beta1=a[9], beta2=a[10], eps=a[11],
                             weight_decay=a[12], decoupled=a[13], maximize=a[14], grad_scale=a[15],
                             found_inf=a[16], grad_norm=a[17], max_grad_norm=a[18],
                             stochastic_rounding=a[19], seed=a[20])
        return adamw_ops.grad_norm(a[1])

    with fastdl.use_backend(backend):
        torch._dynamo.reset()
        n1 = torch.compile(step, fullgraph=True, backend="aot_eager")(*args)
        n2 = step(*expected)
    assert torch.equal(n1, n2)
    for a, b in zip(args, expected):
        if isinstance(a, list):
            for x, y in zip(a, b):
                assert torch.equal(x, y)


def test_errors():
    p = torch.randn(3, requires_grad=True)
    with pytest.raises(ValueError, match="state_dtype must be"):
        AdamW([p], state_dtype=torch.float16)
    with pytest.raises(ValueError, match="max_grad_norm must be positive"):
        AdamW([p], max_grad_norm=0.0)
    with pytest.raises(ValueError, match="Invalid beta parameter at index 1"):
        AdamW([p], betas=(0.9, 1.0))
    emb = torch.nn.Embedding(10, 3, sparse=True)
    emb(torch.tensor([1, 4])).sum().backward()
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        AdamW(emb.parameters()).step()
    q = torch.randn(3, device="meta", requires_grad=True)
    p.grad, q.grad = torch.randn(3), torch.randn(3, device="meta")
    with pytest.raises(ValueError, match="every param of a param group must be on one device"):
        AdamW([p, q]).step()


@pytest.mark.skipif(not hasattr(torch.Tensor, "grad_dtype"),
                    reason="this torch cannot give a param a grad of another dtype")
def test_grad_of_another_dtype_is_an_error():
    h = torch.randn(3, requires_grad=True)
    h.grad_dtype = None  # lets the grad be of another dtype
    h.grad = torch.randn(3).half()
    with pytest.raises(TypeError, match="a grad must have its param's dtype"):
        AdamW([h]).step()


def test_cpp_errors_name_the_argument():
    args = list(_op_args("cpu"))
    step = torch.ops.fastdl.adamw_step
    bad = list(args)
    bad[1] = args[1][:1]
    with pytest.raises(RuntimeError, match=r"grads must have 2 tensors \(one per param\), got 1"):
        step(*bad)
    bad = list(args)
    bad[1] = [args[1][0].float(), args[1][1]]
    with pytest.raises(RuntimeError, match=r"grads\[0\] must have the dtype of params\[0\]"):
        step(*bad)
    bad = list(args)
    bad[2] = [args[2][0], args[2][1].t()]
    with pytest.raises(RuntimeError, match=r"exp_avgs\[1\] must have the shape"):
        step(*bad)
    bad = list(args)
    bad[6] = [args[6][0].double(), args[6][1]]
    with pytest.raises(RuntimeError, match=r"steps\[0\] must be a one-element float32 tensor"):
        step(*bad)
    bad = list(args)
    bad[15] = torch.ones(2)
    with pytest.raises(RuntimeError, match="grad_scale must be a one-element float32 tensor"):
        step(*bad)
    bad = list(args)
    bad[0] = [args[0][0].double(), args[0][1]]
    with pytest.raises(RuntimeError, match=r"params\[0\] must be float32, float16 or bfloat16"):
        step(*bad)


def test_float64_falls_back_to_torch_and_explicit_backend_raises():
    p = torch.randn(5, dtype=torch.float64, requires_grad=True)
    theirs = p.detach().clone().requires_grad_()
    o, t = AdamW([p], lr=1e-2), torch.optim.AdamW([theirs], lr=1e-2)
    with pytest.warns(RuntimeWarning, match="falls back to 'torch'"):
        for _ in range(5):
            g = torch.randn(5, dtype=torch.float64)
            p.grad, theirs.grad = g.clone(), g.clone()
            o.step()
            t.step()
    torch.testing.assert_close(p, theirs, rtol=1e-12, atol=1e-14)
    with fastdl.use_backend("cpu"), pytest.raises(fastdl.BackendUnavailable, match="float64"):
        p.grad = torch.randn(5, dtype=torch.float64)
        o.step()


@pytest.mark.skipif(HAS_CUDA, reason="checks the error a CPU-only machine gives for backend 'cuda'")
def test_explicit_cuda_backend_on_cpu_raises():
    p = torch.randn(3, requires_grad=True)
    p.grad = torch.randn(3)
    with fastdl.use_backend("cuda"), pytest.raises(fastdl.BackendUnavailable, match="cuda tensors only"):
        AdamW([p]).step()


# --- CUDA only -----------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason=NO_GPU)
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cuda_graph_capture_full_step(backend):
    """capturable=True with a tensor lr, GradScaler's scale and found_inf and
    fused clipping: replays of one captured step match eager steps bit for bit,
    and a replay with found_inf set changes nothing."""
    init = _params("cuda", [(13,), (3, 1031), (1 << 20,)], dtype=torch.bfloat16)
    grads = [[torch.randn_like(p) for p in init] for _ in range(6)]

    def make():
        params = [p.clone().requires_grad_() for p in init]
        lr = torch.tensor(1e-2, device="cuda")
        opt = AdamW(params, lr=lr, capturable=True, master_weights=True, max_grad_norm=1.0)
        opt.grad_scale = torch.full((), 8.0, device="cuda")
        opt.found_inf = torch.zeros((), device="cuda")
        for p in params:
            p.grad = torch.zeros_like(p)
        return params, opt, lr

    def load(params, lr, i):
        for p, g in zip(params, grads[i]):
            p.grad.copy_(g * 8)
        lr.fill_(1e-2 / (i + 1))

    with fastdl.use_backend(backend):
        eager_params, eager, eager_lr = make()
        params, opt, lr = make()
        for ps, o, r in ((eager_params, eager, eager_lr), (params, opt, lr)):
            load(ps, r, 0)
            o.step()  # creates the state outside the graph
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            opt.step()
        torch.cuda.synchronize()
        assert opt.state[params[0]]["step"].item() == 1, "capture must not run the step"
        for i in range(1, len(grads)):
            load(params, lr, i)
            graph.replay()
            load(eager_params, eager_lr, i)
            eager.step()
        opt.found_inf.fill_(1.0)
        before = [p.detach().clone() for p in params]
        graph.replay()
        torch.cuda.synchronize()
    for p, q, b in zip(params, eager_params, before):
        assert torch.equal(p, q) and torch.equal(p, b)
        assert torch.equal(opt.state[p]["master_param"], eager.state[q]["master_param"])
        assert opt.state[p]["step"].item() == len(grads)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason=NO_GPU)
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cuda_many_tensors_and_large(backend):
    """More tensors than one launch holds (48), mixed dtypes in one group, and
    one tensor of several chunks, against torch's fused AdamW."""
    shapes = [(int(n),) for n in torch.randint(1, 3000, (130,))] + [(3, 100_003)]
    for dtype in (torch.float32, torch.bfloat16):
        ours, theirs = _twins(_params("cuda", shapes, dtype=dtype))
        o = AdamW(ours, lr=1e-2, amsgrad=True)
        t = torch.optim.AdamW(theirs, lr=1e-2, amsgrad=True, fused=True)
        with fastdl.use_backend(backend):
            for _ in range(5):
                _set_grads((ours, theirs), [torch.randn_like(p) for p in ours])
                o.step()
                t.step()
        for a, b in zip(ours, theirs):
            if dtype == torch.float32:
                _close_fp32(a.detach(), b.detach(), "param")
            else:
                torch.testing.assert_close(a, b, rtol=1.6e-2, atol=1e-2)


def test_no_warning_on_plain_cpu_step():
    p = torch.randn(3, requires_grad=True)
    p.grad = torch.randn(3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        AdamW([p]).step()


def test_compiled_step_fullgraph_matches_eager():
    # optimizer.step() itself under torch.compile(fullgraph=True): no graph break
    # in the param loop, the state init or the fused op.
    torch.manual_seed(3)
    init = [torch.randn(10), torch.randn(3, 4)]
    grads = [[torch.randn_like(t) for t in init] for _ in range(3)]
    results = []
    for compiled in (False, True):
        params = [t.clone().requires_grad_() for t in init]
        opt = fastdl.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
        step = torch.compile(opt.step, fullgraph=True, backend="aot_eager") if compiled else opt.step
        for gs in grads:
            for p, g in zip(params, gs):
                p.grad = g.clone()
            step()
        results.append([p.detach() for p in params])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
