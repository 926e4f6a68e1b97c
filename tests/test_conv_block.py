"""Conv + BN + activation blocks: fastdl.functional.conv_bn_act, nn.ConvBNAct2d
and nn.fuse_conv_bn, against fp64 references (tests/reference.py) on every
backend this machine has. Shapes are ResNet-50 and U-Net layers scaled down
for the Triton interpreter, plus odd ones; full-size layers run on CUDA only."""
import copy
import pickle
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import fastdl
import fastdl.functional as FF
import reference as ref
from conftest import HAS_CUDA, NO_GPU, TOL, assert_close, assert_rel_l2, backend_cases

ROOT = str(Path(__file__).resolve().parent.parent)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
from benchmarks import models as M  # noqa: E402

CASES = backend_cases()
GPU = [pytest.mark.skipif(not HAS_CUDA, reason=NO_GPU), pytest.mark.gpu]
BF16_INTERP = "tl.dot on bf16 operands returns garbage under the Triton interpreter; checked on GPU"


@pytest.fixture(autouse=True)
def _exact_fp32():
    # fp32 cases compare against fp64 at fp32 tolerances: no tf32 (the
    # Triton kernel follows torch.backends.cudnn.allow_tf32, as cuDNN does).
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = old


# name: (N, C_in, H, W, C_out, kernel, stride, padding, dilation, groups, residual)
SHAPES = {
    "stem7x7s2_c3_b1": (1, 3, 13, 11, 16, 7, 2, 3, 1, 1, False),      # ResNet stem: RGB input, batch 1
    "r50_1x1_reduce_7x7": (2, 32, 7, 7, 16, 1, 1, 0, 1, 1, False),    # bottleneck conv1 at 7x7 spatial
    "r50_3x3_s2": (2, 16, 9, 9, 24, 3, 2, 1, 1, 1, False),            # v1.5 strided 3x3
    "r50_1x1_expand_res": (2, 16, 7, 7, 40, 1, 1, 0, 1, 1, True),     # bottleneck conv3 + identity
    "r50_1x1_s2_down": (3, 24, 8, 8, 32, 1, 2, 0, 1, 1, False),       # downsample shortcut
    "unet_3x3_prime": (2, 5, 12, 10, 17, 3, 1, 1, 1, 1, False),       # U-Net block, prime C_out
    "dilated": (1, 8, 11, 11, 8, 3, 1, 2, 2, 1, True),
    "grouped": (2, 16, 6, 6, 32, 3, 1, 1, 1, 4, False),
    "depthwise_s2": (2, 16, 7, 7, 16, 3, 2, 1, 1, 16, False),
    "depthwise_x2": (2, 8, 5, 6, 16, 3, 1, 1, 1, 8, True),
}
# Full-size ResNet-50 / U-Net layers (batch cut to 8): CUDA only.
BIG = {
    "r50_stem": (8, 3, 224, 224, 64, 7, 2, 3, 1, 1, False),
    "r50_l1_3x3": (8, 64, 56, 56, 64, 3, 1, 1, 1, 1, False),
    "r50_l1_1x1_res": (8, 64, 56, 56, 256, 1, 1, 0, 1, 1, True),
    "r50_l3_3x3_s2": (8, 256, 28, 28, 256, 3, 2, 1, 1, 1, False),
    "r50_l4_1x1": (8, 512, 7, 7, 2048, 1, 1, 0, 1, 1, True),
    "unet_dec_3x3": (4, 256, 64, 64, 128, 3, 1, 1, 1, 1, False),
}


def _make(shape, dtype, device, channels_last=True, bias=False):
    n, cin, h, w, cout, k, s, p, d, g, res = shape
    x = torch.randn(n, cin, h, w) + 0.5  # a mean away from 0, as after a ReLU
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    fan_in = cin // g * k * k
    t = dict(
        x=x, w=torch.randn(cout, cin // g, k, k) / fan_in ** 0.5,
        b=torch.randn(cout) if bias else None,
        gamma=torch.rand(cout) + 0.5, beta=torch.randn(cout),
        rm=torch.randn(cout) * 0.1, rv=torch.rand(cout) + 0.5)
    oh = (h + 2 * p - d * (k - 1) - 1) // s + 1
    ow = (w + 2 * p - d * (k - 1) - 1) // s + 1
    t["r"] = torch.randn(n, cout, oh, ow).to(memory_format=torch.channels_last) if res else None
    out = {}
    for name, v in t.items():
        if v is None:
            out[name] = None
        elif name in ("x", "w", "r") or (name == "b"):
            out[name] = v.to(device=device, dtype=dtype)
        else:
            out[name] = v.to(device)  # BN parameters and statistics stay fp32
    return out, dict(stride=s, padding=p, dilation=d, groups=g)


def _skip_bf16_interp(device, backend, dtype):
    if dtype == torch.bfloat16 and device == "cpu" and backend == "triton":
        pytest.skip(BF16_INTERP)


def _check_block(device, backend, dtype, shape, training, act="relu", channels_last=True, bias=False):
    t, geom = _make(shape, dtype, device, channels_last, bias)
    grads = [k for k in ("x", "w", "b", "gamma", "beta", "r") if t[k] is not None]
    for k in grads:
        t[k].requires_grad_()
    rm, rv = t["rm"].clone(), t["rv"].clone()
    with fastdl.use_backend(backend, op="conv_block"):
        out = FF.conv_bn_act(t["x"], t["w"], t["b"], t["gamma"], t["beta"], rm, rv, training=training,
                             act=act, residual=t["r"], **geom)
    t64 = {k: (v.detach().double().requires_grad_() if k in grads else v) for k, v in t.items()}
    rm64, rv64 = t["rm"].double(), t["rv"].double()
    expected = ref.conv_bn_act(t64["x"], t64["w"], t64["b"], t64["gamma"], t64["beta"], rm64, rv64,
                               training=training, act_name=act, residual=t64["r"], **geom)
    assert out.dtype == dtype and out.shape == expected.shape
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    g = torch.randn_like(expected)
    out.backward(g.to(dtype))
    expected.backward(g)
    if dtype in (torch.float32, torch.float64):
        assert_close(out, expected, dtype, "forward")
        for k in grads:
            assert_rel_l2(t[k].grad, t64[k].grad, dtype, f"grad {k}")
    else:
        # Low precision: at most twice the error of torch's own conv + BN
        # in the same dtype (both against fp64), plus one rounding.
        low = {k: (v.detach().requires_grad_() if k in grads else v) for k, v in t.items()}
        theirs = ref.act(nn.functional.batch_norm(
            nn.functional.conv2d(low["x"], low["w"], low["b"], **geom), t["rm"].clone(), t["rv"].clone(),
            low["gamma"], low["beta"], training) + (low["r"] if low["r"] is not None else 0), act)
        theirs.backward(g.to(dtype))
        _within_torch_error(out, theirs, expected, dtype, "forward")
        for k in grads:
            _within_torch_error(t[k].grad, low[k].grad, t64[k].grad, dtype, f"grad {k}")
    if training:
        # The statistics are fp32 sums of outputs rounded to dtype.
        assert_close(rm, rm64, dtype if dtype != torch.float64 else torch.float32, "running_mean")
        assert_close(rv, rv64, dtype if dtype != torch.float64 else torch.float32, "running_var")
    else:
        assert torch.equal(rm, t["rm"]) and torch.equal(rv, t["rv"])


def _within_torch_error(ours, theirs, expected, dtype, what):
    e = expected.double()
    ours_err = (ours.double() - e).norm().item()
    torch_err = (theirs.double() - e).norm().item()
    bound = 2 * torch_err + TOL[dtype]["atol"] * e.numel() ** 0.5
    assert ours_err <= bound, f"{what}: L2 error {ours_err:.3g} > 2 x torch's {torch_err:.3g} + atol"


# --- forward and backward against fp64 ---------------------------------------------------------
@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", list(SHAPES))
def test_block_fp32(device, backend, training, name):
    _check_block(device, backend, torch.float32, SHAPES[name], training)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", ["stem7x7s2_c3_b1", "r50_1x1_expand_res", "depthwise_x2", "grouped"])
def test_block_low_precision(device, backend, dtype, training, name):
    _skip_bf16_interp(device, backend, dtype)
    # silu, not relu: a relu kink at z ~ 0 flips with the rounding of z and
    # moves one whole gradient element, whichever side is right.
    _check_block(device, backend, dtype, SHAPES[name], training, act="silu")


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("act", [None, "silu", "leaky_relu", "gelu_tanh"])
def test_activations_bias_and_nchw(device, backend, act):
    _check_block(device, backend, torch.float32, SHAPES["r50_3x3_s2"], True, act=act, channels_last=False,
                 bias=True)
    _check_block(device, backend, torch.float32, SHAPES["dilated"], False, act=act, bias=True)


@pytest.mark.parametrize("device,backend", CASES)
def test_empty_batch_eval(device, backend):
    t, geom = _make((0,) + SHAPES["r50_3x3_s2"][1:], torch.float32, device)
    with fastdl.use_backend(backend, op="conv_block"), torch.no_grad():
        out = FF.conv_bn_act(t["x"], t["w"], None, t["gamma"], t["beta"], t["rm"], t["rv"], **geom)
    assert out.shape == (0, 24, 5, 5)


@pytest.mark.parametrize("device,backend", [c for c in CASES if c.values[0] == "cuda"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", list(BIG))
def test_block_full_size(device, backend, dtype, training, name):
    _check_block(device, backend, dtype, BIG[name], training)


@pytest.mark.parametrize("device,backend", [c for c in CASES if c.values[0] == "cuda" and c.values[1] != "torch"])
def test_tf32_follows_cudnn_flag(device, backend):
    t, geom = _make(BIG["r50_l1_3x3"], torch.float32, device)
    args = (t["x"], t["w"], None, t["gamma"], t["beta"], t["rm"], t["rv"])
    expected = ref.conv_bn_act(*args, **geom)
    with fastdl.use_backend(backend, op="conv_block"), torch.no_grad():
        exact = FF.conv_bn_act(*args, **geom)
        torch.backends.cudnn.allow_tf32 = True
        fast = FF.conv_bn_act(*args, **geom)
    assert_close(exact, expected, torch.float32, "ieee fp32")
    # tf32 keeps 10 mantissa bits: fp16-like error on unit-scale outputs.
    torch.testing.assert_close(fast.double(), expected, atol=2e-2, rtol=1e-2)


def test_gradcheck_fp64_cpu():
    t, geom = _make((2, 4, 4, 4, 6, 3, 1, 1, 1, 2, True), torch.float64, "cpu", bias=True)
    t = {k: v.double() for k, v in t.items()}
    leaves = [t[k].requires_grad_() for k in ("x", "w", "b", "gamma", "beta", "r")]
    with fastdl.use_backend("cpu", op="conv_block"):
        for training in (True, False):
            def f(x, w, b, gamma, beta, r):
                return FF.conv_bn_act(x, w, b, gamma, beta, t["rm"].clone(), t["rv"].clone(),
                                      training=training, act="silu", residual=r, **geom)
            assert torch.autograd.gradcheck(f, leaves)


# --- running statistics and the module ---------------------------------------------------------------
@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_module_matches_unfused_over_steps(device, backend, momentum):
    block = fastdl.nn.ConvBNAct2d(6, 10, 3, stride=2, padding=1, bias=True, act="relu").to(device)
    block.bn.momentum = momentum
    with torch.no_grad():
        block.bn.weight.uniform_(0.5, 1.5)
        block.bn.bias.normal_()
    plain = nn.Sequential(copy.deepcopy(block.conv), copy.deepcopy(block.bn), nn.ReLU()).double()
    with fastdl.use_backend(backend, op="conv_block"):
        for step in range(3):
            x = (torch.randn(2, 6, 9, 8, device=device) + step).to(memory_format=torch.channels_last)
            assert_close(block(x), plain(x.double()), torch.float32, f"train step {step}")
        assert block.bn.num_batches_tracked.item() == plain[1].num_batches_tracked.item() == 3
        assert_close(block.bn.running_mean, plain[1].running_mean, torch.float32, "running_mean")
        assert_close(block.bn.running_var, plain[1].running_var, torch.float32, "running_var")
        block.eval()
        plain.eval()
        x = torch.randn(3, 6, 9, 8, device=device)
        with torch.no_grad():
            assert_close(block(x), plain(x.double()), torch.float32, "eval")
        # Eval with gradients (frozen BN statistics, trainable affine).
        xg = x.clone().requires_grad_()
        block(xg).sum().backward()
        x64 = x.double().requires_grad_()
        plain(x64).sum().backward()
        assert_close(xg.grad, x64.grad, torch.float32, "eval grad input")
        assert_rel_l2(block.bn.weight.grad, plain[1].weight.grad, torch.float32, "eval grad gamma")


@pytest.mark.parametrize("device,backend", CASES)
def test_module_residual_and_state_dict(device, backend):
    block = fastdl.nn.ConvBNAct2d(8, 8, 3, padding=1, act="relu").to(device).eval()
    assert set(block.state_dict()) == {"conv.weight", "bn.weight", "bn.bias", "bn.running_mean",
                                       "bn.running_var", "bn.num_batches_tracked"}
    pair = nn.Module()
    pair.conv, pair.bn = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
    with torch.no_grad():
        pair.bn.running_mean.normal_()
        pair.bn.running_var.uniform_(0.5, 2)
    block.load_state_dict(pair.state_dict())
    x = torch.randn(2, 8, 5, 5, device=device)
    r = torch.randn(2, 8, 5, 5, device=device)
    pair.double().to(device).eval()
    with fastdl.use_backend(backend, op="conv_block"), torch.no_grad():
        assert_close(block(x, r), torch.relu(pair.bn(pair.conv(x.double())) + r.double()), torch.float32)


@pytest.mark.parametrize("device,backend", [c for c in CASES if c.values[1] != "torch"])
def test_fold_cache_follows_parameter_changes(device, backend):
    block = fastdl.nn.ConvBNAct2d(4, 6, 1, act=None).to(device).eval()
    x = torch.randn(2, 4, 3, 3, device=device)

    def expected():
        with torch.no_grad():
            b = block.double()
            y = nn.functional.batch_norm(b.conv(x.double()), b.bn.running_mean, b.bn.running_var, b.bn.weight,
                                         b.bn.bias, False, 0.0, b.bn.eps)
            block.float()
            return y
    with fastdl.use_backend(backend, op="conv_block"), torch.no_grad():
        block(x)
        first = block._fold_cache[2]
        block(x)
        assert block._fold_cache[2] is first  # reused while nothing changed
        block.bn.running_mean.add_(1.0)  # in place: the version counter moves
        assert_close(block(x), expected(), torch.float32, "after running_mean.add_")
        block.conv.weight = nn.Parameter(torch.randn_like(block.conv.weight))  # replaced
        assert_close(block(x), expected(), torch.float32, "after a new conv.weight")
        block.load_state_dict({k: v * 2 if v.is_floating_point() else v for k, v in block.state_dict().items()})
        assert_close(block(x), expected(), torch.float32, "after load_state_dict")
    assert pickle.loads(pickle.dumps(block))._fold_cache is None


def test_autocast_cpu():
    block = fastdl.nn.ConvBNAct2d(4, 8, 3, padding=1).train()
    x = torch.randn(2, 4, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = block(x)
    assert out.dtype == torch.bfloat16
    ref_block = copy.deepcopy(block)
    ref_block.bn.reset_running_stats()
    expected = ref.conv_bn_act(x.bfloat16(), block.conv.weight.bfloat16(), None, block.bn.weight, block.bn.bias,
                               None, None, padding=1, training=True)
    torch.testing.assert_close(out.double(), expected, atol=3e-2, rtol=2e-2)


# --- the fusion pass ---------------------------------------------------------------------------------
class BasicBlock(nn.Module):
    """torchvision's BasicBlock, as written there (one relu used twice)."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class TVResNet(nn.Module):
    """A torchvision-style ResNet: stem conv1/bn1/relu/maxpool, layers of
    BasicBlocks with downsample shortcuts, avgpool, fc."""

    def __init__(self, w=8):
        super().__init__()
        self.conv1 = nn.Conv2d(3, w, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = nn.Sequential(BasicBlock(w, w), BasicBlock(w, w))
        self.layer2 = nn.Sequential(BasicBlock(w, 2 * w, 2), BasicBlock(2 * w, 2 * w))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * w, 5)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class Tapped(nn.Module):
    """conv output used twice: must not be fused."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.act = nn.SiLU()

    def forward(self, x):
        y = self.conv(x)
        return self.act(self.bn(y)) + y


def _randomize_bn(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return model


MODELS = {
    "course_cnn": (lambda: M.CNN(num_classes=5, in_ch=3, width=4), (2, 3, 12, 12), 3),
    "course_resnet": (lambda: M.SimpleResNet(num_classes=5, width=8, blocks=2), (2, 3, 20, 20), 5),
    "course_unet": (lambda: M.UNet(in_ch=1, out_ch=2, width=4), (2, 1, 8, 8), 0),
    "resnet50": (lambda: M.ResNet50(num_classes=5, base=4, layers=(1, 1, 1, 1)), (2, 3, 32, 32), 17),
    "torchvision_style_resnet": (lambda: TVResNet(), (2, 3, 20, 20), 10),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_fuse_preserves_outputs_and_state_dict(name):
    build, shape, n_fused = MODELS[name]
    model = _randomize_bn(build()).eval()
    fused, report = fastdl.nn.fuse_conv_bn(model)
    assert len(report.fused) == n_fused, str(report)
    assert sum(isinstance(m, fastdl.nn.ConvBNAct2d) for m in fused.modules()) == n_fused
    assert not any(isinstance(m, fastdl.nn.ConvBNAct2d) for m in model.modules())  # a copy by default
    sd, fsd = model.state_dict(), fused.state_dict()
    assert list(sd) == list(fsd)
    assert all(torch.equal(sd[k], fsd[k]) for k in sd)
    # Against the unfused model in fp64; a whole network of fp32 layers is
    # allowed 10x one layer's fp32 tolerance.
    model64 = copy.deepcopy(model).double()
    x = torch.randn(shape)
    close = dict(atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(fused(x).double(), model64(x.double()), **close)
    # Training: same outputs, and the same running statistics afterwards.
    model64.train()
    fused.train()
    torch.testing.assert_close(fused(x).double(), model64(x.double()), **close)
    for k, v in model64.state_dict().items():
        torch.testing.assert_close(fused.state_dict()[k].double(), v.double(), **close, msg=k)
    # A checkpoint of the unfused model loads into the fused one and back.
    other = _randomize_bn(build())
    fused.load_state_dict(other.state_dict())
    model.load_state_dict(fused.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))


def test_fuse_report_says_what_and_why():
    model = TVResNet()
    fused, report = fastdl.nn.fuse_conv_bn(model)
    text = str(report)
    assert "conv1 -> bn1 as ConvBNAct2d(act=None); relu left separate (it is also called elsewhere)" in text
    assert "downsample.0: 0 -> 1 as ConvBNAct2d" in text
    assert fused.layer1[0].bn1.__class__ is nn.Identity and fused.layer1[0].relu.__class__ is nn.ReLU
    seq = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.LeakyReLU(0.2), nn.Conv2d(4, 4, 1))
    fused_seq, report = fastdl.nn.fuse_conv_bn(seq)
    assert fused_seq[0].act == "leaky_relu" and fused_seq[0].negative_slope == 0.2
    assert isinstance(fused_seq[2], nn.Identity)
    assert ("3", "not followed by a BatchNorm2d") in report.skipped
    tapped, report = fastdl.nn.fuse_conv_bn(Tapped())
    assert not report.fused and "also used elsewhere" in str(report)
    resnet, report = fastdl.nn.fuse_conv_bn(M.SimpleResNet(width=4, blocks=1))
    assert "relu stays separate" in str(report)
    fast_bn = nn.Sequential(nn.Conv2d(3, 4, 1), fastdl.nn.BatchNorm2d(4), fastdl.nn.SiLU())
    assert fastdl.nn.fuse_conv_bn(fast_bn)[0][0].act == "silu"
    shared = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))
    shared.add_module("again", shared[0])
    assert not fastdl.nn.fuse_conv_bn(shared)[1].fused


def test_fuse_untraceable_module_is_reported():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

        def forward(self, x):
            return self.bn(self.conv(x)) if x.sum() > 0 else x

    model, report = fastdl.nn.fuse_conv_bn(Branchy())
    assert not report.fused and "could not be traced" in str(report)
    assert type(model.conv) is nn.Conv2d


def test_fused_model_pickles_and_inplace():
    model = M.CNN(num_classes=3, in_ch=1, width=2)
    same, _ = fastdl.nn.fuse_conv_bn(model, inplace=True)
    assert same is model and isinstance(model.features[0], fastdl.nn.ConvBNAct2d)
    back = pickle.loads(pickle.dumps(model))
    assert list(back.state_dict()) == list(model.state_dict())


@pytest.mark.parametrize("device,backend", [c for c in CASES if c.values[1] == "triton"])
def test_fused_cnn_on_triton(device, backend):
    model = _randomize_bn(M.CNN(num_classes=3, in_ch=3, width=4)).to(device).eval()
    fused, _ = fastdl.nn.fuse_conv_bn(model)
    x = torch.randn(2, 3, 8, 8, device=device).to(memory_format=torch.channels_last)
    with fastdl.use_backend(backend, op="conv_block"), torch.no_grad():
        assert_close(fused(x), model(x), torch.float32)


# --- registered ops, compile ------------------------------------------------------------------------
@pytest.mark.parametrize("device", [pytest.param("cpu", id="cpu-triton_interp"),
                                    pytest.param("cuda", id="cuda-triton", marks=GPU)])
def test_opcheck(device):
    ops = torch.ops.fastdl
    x = torch.randn(2, 4, 5, 5, device=device).to(memory_format=torch.channels_last)
    w = torch.randn(8, 4, 3, 3, device=device)
    b = torch.randn(8, device=device)
    r = torch.randn(2, 8, 3, 3, device=device)
    torch.library.opcheck(ops.conv_block_fwd_triton, (x, w, b, r, [2, 2], [1, 1], [1, 1], 1, "silu", 0.0))
    torch.library.opcheck(ops.conv_block_fwd_triton, (x.contiguous(), w[:, :2], None, None, [1, 1], [0, 0],
                                                      [2, 2], 2, "none", 0.0))
    torch.library.opcheck(ops.conv_block_stats_triton, (x, w, b, [1, 1], [1, 1], [1, 1], 1))
    torch.library.opcheck(ops.conv_block_stats_triton, (x, w[:, :1], None, [1, 1], [1, 1], [1, 1], 4))


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_compile_fullgraph(device, backend, training):
    block = fastdl.nn.ConvBNAct2d(4, 8, 3, padding=1, act="silu").to(device).train(training)
    x = torch.randn(2, 4, 6, 6, device=device).to(memory_format=torch.channels_last).requires_grad_()
    r = torch.randn(2, 8, 6, 6, device=device)

    def f(x, r):
        return block(x, r)
    with fastdl.use_backend(backend, op="conv_block"):
        torch._dynamo.reset()
        eager_block = copy.deepcopy(block)
        out = torch.compile(f, fullgraph=True, backend="aot_eager")(x, r)
        out.sum().backward()
        gx = x.grad.clone()
        x.grad = None
        expected = eager_block(x, r)
        expected.sum().backward()
    assert_close(out, expected, torch.float32)
    assert_close(gx, x.grad, torch.float32)
    assert_close(block.bn.running_var, eager_block.bn.running_var, torch.float32)
    with fastdl.use_backend(backend, op="conv_block"), torch.no_grad():
        block.eval()
        torch._dynamo.reset()
        assert_close(torch.compile(f, fullgraph=True, backend="aot_eager")(x, r), eager_block.eval()(x, r),
                     torch.float32, "eval, no grad")


# --- bad input --------------------------------------------------------------------------------------------
def test_errors():
    x, w = torch.randn(2, 4, 5, 5), torch.randn(8, 4, 3, 3)
    c = torch.ones(8)
    args = (c, c, c, c)

    def call(x=x, w=w, bias=None, args=args, **kw):
        return FF.conv_bn_act(x, w, bias, *args, **kw)
    with pytest.raises(TypeError, match="input must be float32"):
        call(x=x.int())
    with pytest.raises(ValueError, match="input must be 4-D"):
        call(x=x[0])
    with pytest.raises(TypeError, match="conv_weight must have input's dtype"):
        call(w=w.double())
    with pytest.raises(ValueError, match=r"groups \(3\) must divide"):
        call(groups=3)
    with pytest.raises(ValueError, match="conv_weight.shape\\[1\\] must be 2"):
        call(groups=2)
    with pytest.raises(ValueError, match=r"conv_bias must have shape \[8\]"):
        call(bias=torch.ones(4))
    with pytest.raises(ValueError, match=r"running_var must have shape \[8\]"):
        call(args=(c, c, c, torch.ones(7)))
    with pytest.raises(ValueError, match="must be given when training=False"):
        call(args=(c, c, None, None))
    with pytest.raises(ValueError, match="residual must have the output's shape"):
        call(residual=torch.randn(2, 8, 5, 5))
    with pytest.raises(ValueError, match="stride must be an int or a pair"):
        call(stride=0)
    with pytest.raises(ValueError, match="output would be empty"):
        call(x=torch.randn(1, 4, 2, 2))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        call(x=torch.randn(1, 4, 3, 3), training=True)
    with pytest.raises(ValueError, match="act must be None or one of"):
        call(act="swish")
    with pytest.raises(ValueError, match="asymmetric"):
        call(w=torch.randn(8, 4, 2, 2), padding="same")
    with pytest.raises(ValueError, match="act must be None or one of"):
        fastdl.nn.ConvBNAct2d(3, 3, 1, act="swish")


@pytest.mark.skipif(HAS_CUDA, reason="checks the errors a CPU-only machine gives")
def test_explicit_backend_that_cannot_serve_raises():
    x, w, c = torch.randn(2, 4, 5, 5, dtype=torch.float64), torch.randn(8, 4, 3, 3, dtype=torch.float64), torch.ones(8)
    with fastdl.use_backend("triton", op="conv_block"), pytest.raises(fastdl.BackendUnavailable, match="no float64"):
        FF.conv_bn_act(x, w, None, c, c, c, c)
    with fastdl.use_backend("cuda", op="conv_block"), pytest.raises(fastdl.BackendUnavailable, match="cuda tensors"):
        FF.conv_bn_act(x, w, None, c, c, c, c)
