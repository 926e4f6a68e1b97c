"""fastdl.patch on the course's models and tiny transformers configs: outputs
and gradients match the unpatched model, the state_dict is unchanged, the
report says what happened; plus torch.compile (before and after patching),
autocast, DDP and FSDP2 on two gloo processes.

The checks are generic over the replacement tables (every fastdl.nn file's
REPLACES), so an op family added later is covered here without edits."""
import contextlib
import copy
import importlib.util
import os
import sys

import pytest
import torch
import torch.nn.functional as TF
from torch import nn

import fastdl
import fastdl.functional as FF
from benchmarks import models as M
from conftest import REL_L2, TOL, assert_rel_l2

P = sys.modules["fastdl.patch"]  # the module; fastdl.patch is the function
HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
NO_TRANSFORMERS = "transformers is not installed (pip install transformers)"


def _rules():
    return P._nn_tables(set(P.FAMILIES))[0] | P._hf_tables(set(P.FAMILIES))


# --- helpers --------------------------------------------------------------------------
def _call(model, x):
    return model(**x) if isinstance(x, dict) else model(x)


def _forward_backward(model, x, loss_fn, call):
    """Output and gradients (of the parameters, and of x when it requires grad)."""
    model.zero_grad(set_to_none=True)
    if isinstance(x, torch.Tensor) and x.requires_grad:
        x = x.detach().clone().requires_grad_()
    out = call(model, x)
    out = out.logits if hasattr(out, "logits") else out
    loss_fn(out).backward()
    # keyed by state_dict key: conv_bn fusion nests parameters (named_parameters
    # changes) but keeps the state_dict keys
    grads = {k.removeprefix("_orig_mod."): p.grad.clone() for k, p in model.state_dict(keep_vars=True).items()
             if isinstance(p, nn.Parameter) and p.grad is not None}
    if isinstance(x, torch.Tensor) and x.requires_grad:
        grads["(input)"] = x.grad
    return out.detach(), grads


def _check_equivalent(ref, patched, x, loss_fn=lambda y: y.float().square().mean(), dtype=torch.float32,
                      call=_call):
    """Outputs and parameter gradients of `patched` are as close to an fp64
    run of `ref` as `ref`'s own are: L2 error at most 2x torch's, plus the
    dtype's floors (REL_L2 relative, TOL atol per element). Deep BatchNorm
    nets amplify any reordering of a sum, so a fixed tolerance around the
    fp32 run would be either loose or flaky."""
    ref64 = copy.deepcopy(ref).double()
    x64 = {k: v.double() if v.is_floating_point() else v for k, v in x.items()} if isinstance(x, dict) else \
        (x.detach().double().requires_grad_(x.requires_grad) if x.is_floating_point() else x)
    runs = []
    for model, inp in ((ref64, x64), (ref, x), (patched, x)):
        torch.manual_seed(1)
        with torch.autocast("cpu", enabled=False) if model is ref64 else contextlib.nullcontext():
            runs.append(_forward_backward(model, inp, loss_fn, call))
    (y64, g64), (y_ref, g_ref), (y, g) = runs
    assert g.keys() == g_ref.keys()
    for name, a, b, e in [("output", y, y_ref, y64)] + [(f"grad of {n}", g[n], g_ref[n], g64[n]) for n in g64]:
        a, b, e = a.double().flatten(), b.double().flatten(), e.flatten()
        err, ref_err = (a - e).norm().item(), (b - e).norm().item()
        bound = 2 * ref_err + REL_L2[dtype] * e.norm().item() + TOL[dtype]["atol"] * e.numel() ** 0.5
        assert err <= bound, f"{name}: L2 error {err:.3g} vs fp64 > {bound:.3g} (torch's own {ref_err:.3g})"


def _check_state_dict(ref, patched):
    a, b = ref.state_dict(), patched.state_dict()
    assert list(a) == list(b), "state_dict keys changed"
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=lambda m: f"{k}: {m}")


def _check_complete(model, report):
    """Nothing replaceable is left, and every swap the report lists is real."""
    rules = _rules()

    def unpatched(module, prefix):  # a fastdl module's children are its parameter holders
        for name, child in module.named_children():
            if type(child) in rules:
                yield prefix + name
            elif not type(child).__module__.startswith("fastdl."):
                yield from unpatched(child, f"{prefix}{name}.")
    left = list(unpatched(model, ""))
    assert not left, f"replaceable modules left unpatched: {left}"
    mods = dict(model.named_modules())
    for e in report.swapped:
        if e.path == "(model)":
            continue
        first = e.path.split(" + ")[0]
        assert type(mods[first]).__module__.startswith("fastdl."), f"{first} was reported swapped, is {mods[first]}"


# --- the course's models ----------------------------------------------------------------------
COURSE = {
    "mlp": (lambda: M.MLP(37, 24, 5), lambda: torch.randn(6, 37)),
    "cnn": (lambda: M.CNN(num_classes=5, width=4), lambda: torch.randn(3, 1, 12, 12)),
    "resnet": (lambda: M.SimpleResNet(num_classes=5, width=8, blocks=2), lambda: torch.randn(2, 3, 20, 20)),
    "unet": (lambda: M.UNet(1, 2, width=4), lambda: torch.randn(2, 1, 12, 12)),
    "gpt": (lambda: M.GPT(vocab_size=67, d_model=32, n_heads=4, n_layers=2, max_len=16),
            lambda: torch.randint(0, 67, (2, 11))),
    "resnet50": (lambda: M.ResNet50(num_classes=7, base=4, layers=(1, 2, 1, 1)), lambda: torch.randn(2, 3, 32, 32)),
}


@pytest.mark.parametrize("name", list(COURSE))
def test_course_model(name):
    build, make_x = COURSE[name]
    ref = build()
    patched = copy.deepcopy(ref)
    report = fastdl.patch(patched)
    assert report.model is patched
    _check_state_dict(ref, patched)
    _check_complete(patched, report)
    _check_equivalent(ref, patched, make_x())
    if name == "mlp":  # two Linear-ReLU pairs in its Sequential, the last Linear alone
        assert [e.path for e in report.swapped if e.family == "linear_act"] == ["net.0 + net.1", "net.2 + net.3"]
        assert type(patched.net[4]) is nn.Linear
    if name == "gpt":
        assert report.counts()["linear_act"] == 2
    if name == "cnn" and hasattr(fastdl.nn, "fuse_conv_bn"):  # three Conv-BN-ReLU blocks
        assert report.counts() == {"conv_bn": 3}
        assert all(e.after == "fastdl.nn.ConvBNAct2d (act=relu)" for e in report.swapped)
    if name == "resnet":  # the stem's functional relu cannot be patched, and is not in the report
        assert not any(e.path == "relu" for e in report.swapped + report.skipped)


def test_same_tensors_and_earlier_optimizer():
    """inplace: the patched model holds the very same Parameter objects, so an
    optimizer built before patching trains the patched model."""
    torch.manual_seed(0)
    ref = COURSE["gpt"][0]()
    model = copy.deepcopy(ref)
    params = dict(model.named_parameters())
    # SGD, not Adam: Adam turns rounding noise in a zero gradient (W_k's bias
    # cannot change a softmax) into full-size steps.
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (ref, model)]
    fastdl.patch(model)
    assert all(p is params[n] for n, p in model.named_parameters())
    x = COURSE["gpt"][1]()
    for _ in range(3):
        for m, opt in zip((ref, model), opts):
            opt.zero_grad()
            TF.cross_entropy(m(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).backward()
            opt.step()
    for (n, p), q in zip(ref.named_parameters(), model.parameters()):
        assert_rel_l2(q.detach(), p.detach(), torch.float32, n)


@pytest.mark.parametrize("name", ["gpt", "cnn"])
def test_patching_twice_changes_nothing(name):
    model = COURSE[name][0]()
    first = fastdl.patch(model)
    modules = [type(m) for m in model.modules()]
    second = fastdl.patch(model)
    assert first.swapped and not second.swapped and not second.skipped
    assert [type(m) for m in model.modules()] == modules


def test_inplace_false_leaves_model_alone():
    model = M.MLP(9, 8, 3)
    before = [type(m) for m in model.modules()]
    report = fastdl.patch(model, inplace=False)
    assert [type(m) for m in model.modules()] == before
    assert report.model is not model and report.swapped
    _check_state_dict(model, report.model)


def test_report_contents_and_table():
    class MyLayerNorm(nn.LayerNorm):
        def forward(self, x):
            return super().forward(x) * 2

    model = nn.Sequential(nn.Linear(8, 8), nn.GELU(approximate="tanh"), nn.LayerNorm(8), MyLayerNorm(8),
                          nn.Softmax(-1), nn.Linear(8, 8, bias=False), nn.SiLU())
    report = fastdl.patch(model)
    swapped = {e.path: e for e in report.swapped}
    assert swapped["0 + 1"].family == "linear_act" and swapped["0 + 1"].before == "Linear + GELU (gelu_tanh)"
    assert model[0].act == "gelu_tanh" and type(model[1]) is nn.Identity
    # a Linear without bias gains nothing from the fusion: its activation is swapped alone
    assert swapped["6"].family == "activation" and swapped["6"].after == "fastdl.nn.SiLU"
    skipped = {e.path: e for e in report.skipped}
    assert "not the class itself" in skipped["3"].why
    assert skipped["4"].why == "no fastdl kernel for this module"
    if hasattr(fastdl.nn, "LayerNorm"):
        assert swapped["2"].family == "norm"
    else:
        assert "no replacement for LayerNorm" in skipped["2"].why
    text = str(report)
    assert text.startswith(f"fastdl.patch: {len(report.swapped)} swapped, {len(report.skipped)} skipped")
    for needle in ("linear_act", "fastdl.nn.LinearAct + Identity", "skipped:", "MyLayerNorm", "Softmax"):
        assert needle in text


def test_ops_filter():
    model = M.GPT(vocab_size=31, d_model=16, n_heads=2, n_layers=1, max_len=8)
    report = fastdl.patch(model, ops=["linear_act"])
    assert {e.family for e in report.swapped} == {"linear_act"}
    assert all(type(m) is nn.LayerNorm for m in model.modules() if isinstance(m, nn.LayerNorm))
    assert not report.skipped  # families not asked for are not reported
    with pytest.raises(ValueError, match="unknown ops \\['layernorm'\\]; choose from activation, norm"):
        fastdl.patch(model, ops=["layernorm"])
    with pytest.raises(TypeError, match="must be a torch.nn.Module"):
        fastdl.patch(lambda x: x)


def test_bn_act_pair():
    """Without conv_bn fusion, BatchNorm2d + activation pairs become BatchNormAct2d."""
    if not hasattr(fastdl.nn, "BatchNormAct2d"):
        pytest.skip("fastdl.nn.BatchNormAct2d does not exist yet")
    ref = M.CNN(num_classes=5, width=4)
    patched = copy.deepcopy(ref)
    report = fastdl.patch(patched, ops=["batchnorm"])
    assert [(e.path, e.before) for e in report.swapped] == [
        (f"features.{i} + features.{i + 1}", "BatchNorm2d + ReLU (relu)") for i in (1, 5, 9)]
    assert type(patched.features[1]) is fastdl.nn.BatchNormAct2d and type(patched.features[2]) is nn.Identity
    _check_state_dict(ref, patched)
    _check_equivalent(ref, patched, COURSE["cnn"][1]())


def test_shared_module_and_hooks():
    act = nn.ReLU()
    model = nn.ModuleDict({"a": nn.Sequential(nn.Conv2d(2, 2, 1), act), "b": nn.Sequential(act)})
    calls = []
    act.register_forward_hook(lambda m, i, o: calls.append(type(m).__name__))
    report = fastdl.patch(model)
    assert model["a"][1] is model["b"][0] and type(model["b"][0]) is fastdl.nn.ReLU
    assert len(report.swapped) == 1  # one module, reached twice
    model["b"](torch.randn(3))
    assert calls == ["ReLU"]  # the hook came along (the class name is fastdl.nn.ReLU's)


def test_linear_act_kept_apart_when_hooked():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    model[1].register_forward_hook(lambda m, i, o: None)
    report = fastdl.patch(model)
    assert [e.family for e in report.swapped] == ["activation"]
    assert type(model[0]) is nn.Linear


def _one(d, x):
    return d["m"](x)


def _self_attention(d, x):
    return d["m"](x, x, x, need_weights=False)[0]


EXAMPLES = {  # constructor, input shape and call of every torch module fastdl replaces
    nn.GELU: (lambda: nn.GELU(), (3, 7), _one), nn.ReLU: (lambda: nn.ReLU(), (3, 7), _one),
    nn.LeakyReLU: (lambda: nn.LeakyReLU(0.3), (3, 7), _one), nn.SiLU: (lambda: nn.SiLU(), (3, 7), _one),
    nn.Sigmoid: (lambda: nn.Sigmoid(), (3, 7), _one), nn.Tanh: (lambda: nn.Tanh(), (3, 7), _one),
    nn.LayerNorm: (lambda: nn.LayerNorm(7), (3, 7), _one),
    nn.RMSNorm: (lambda: nn.RMSNorm(7, eps=1e-5), (3, 7), _one),
    nn.BatchNorm1d: (lambda: nn.BatchNorm1d(7), (5, 7), _one),
    nn.BatchNorm2d: (lambda: nn.BatchNorm2d(4), (3, 4, 5, 5), _one),
    nn.MultiheadAttention: (lambda: nn.MultiheadAttention(8, 2, batch_first=True), (2, 5, 8), _self_attention),
}


def test_every_replacement_matches_torch():
    """Each REPLACES entry, alone: same output and gradients as the torch module."""
    for src, (family, _) in P._nn_tables(set(P.FAMILIES))[0].items():
        assert src in EXAMPLES, f"fastdl.nn replaces {src.__name__} ({family}): add an example to EXAMPLES"
        build, shape, call = EXAMPLES[src]
        torch.manual_seed(0)
        ref = nn.ModuleDict({"m": build()})
        patched = copy.deepcopy(ref)
        report = fastdl.patch(patched, ops=[family])
        assert [e.path for e in report.swapped] == ["m"], str(report)
        _check_equivalent(ref, patched, torch.randn(shape, requires_grad=True), call=call)


# --- autocast, compile -------------------------------------------------------------------------
def test_autocast_bf16():
    ref = COURSE["gpt"][0]()
    patched = copy.deepcopy(ref)
    fastdl.patch(patched)
    x = COURSE["gpt"][1]()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _check_equivalent(ref, patched, x, dtype=torch.bfloat16)


def _recording_backend(graphs):
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def fw(gm, example_inputs):
        graphs.append(gm.code)
        return make_boxed_func(gm.forward)
    return aot_autograd(fw_compiler=fw, bw_compiler=lambda gm, example_inputs: make_boxed_func(gm.forward))


@pytest.mark.parametrize("order", ["patch_then_compile", "compile_then_patch"])
def test_compile(order):
    torch._dynamo.reset()
    ref = M.MLP(13, 16, 3)
    model = copy.deepcopy(ref)
    graphs = []
    x = torch.randn(4, 13)
    if order == "patch_then_compile":
        fastdl.patch(model)
        compiled = torch.compile(model, backend=_recording_backend(graphs), fullgraph=True)
    else:
        compiled = torch.compile(model, backend=_recording_backend(graphs), fullgraph=True)
        compiled(x)
        assert "fastdl" not in graphs[-1]
        report = fastdl.patch(compiled)  # patches compiled._orig_mod; the next call recompiles
        assert report.model is compiled and report.counts() == {"linear_act": 2}
    _check_equivalent(ref, compiled, x)
    assert "torch.ops.fastdl.bias_act_fwd" in graphs[-1], graphs[-1]
    with pytest.raises(ValueError, match="inplace=False needs a plain nn.Module"):
        fastdl.patch(compiled, inplace=False)


# --- transformers --------------------------------------------------------------------------------
def _hf_models():
    import transformers as T
    common = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return {
        "gpt2": (lambda: T.GPT2LMHeadModel(T.GPT2Config(vocab_size=61, n_positions=16, n_embd=32, n_layer=2, n_head=4,
                                                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)),
                 lambda: {"input_ids": torch.randint(0, 61, (2, 9))}),
        "bert": (lambda: T.BertForMaskedLM(T.BertConfig(vocab_size=61, hidden_size=32, num_hidden_layers=2,
                                                        num_attention_heads=4, intermediate_size=48,
                                                        max_position_embeddings=16, **common)),
                 lambda: {"input_ids": torch.randint(0, 61, (2, 9)),
                          "attention_mask": torch.tensor([[1] * 9, [1] * 6 + [0] * 3])}),
        "llama": (lambda: T.LlamaForCausalLM(T.LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=40,
                                                           num_hidden_layers=2, num_attention_heads=4,
                                                           num_key_value_heads=2, max_position_embeddings=16)),
                  lambda: {"input_ids": torch.randint(0, 61, (2, 9))}),
        "vit": (lambda: T.ViTForImageClassification(T.ViTConfig(image_size=16, patch_size=4, num_channels=3,
                                                                hidden_size=32, num_hidden_layers=2,
                                                                num_attention_heads=4, intermediate_size=48,
                                                                num_labels=5, **common)),
                lambda: {"pixel_values": torch.randn(2, 3, 16, 16)}),
    }


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason=NO_TRANSFORMERS)
@pytest.mark.parametrize("name", ["gpt2", "bert", "llama", "vit"])
def test_transformers_model(name):
    build, make_x = _hf_models()[name]
    torch.manual_seed(0)
    ref = build()
    patched = copy.deepcopy(ref)
    report = fastdl.patch(patched)
    _check_state_dict(ref, patched)
    _check_complete(patched, report)
    _check_equivalent(ref, patched, make_x(), loss_fn=lambda y: y.float().square().mean())
    families = report.counts()
    # the MLP activation of each of the 2 layers (+ BERT's MLM head); the norms
    # around attention and MLP, the final one (+ BERT's embedding and head ones)
    assert families["activation"] == {"gpt2": 2, "bert": 3, "llama": 2, "vit": 2}[name]
    if hasattr(fastdl.nn, "LayerNorm"):
        assert families["norm"] == {"gpt2": 5, "bert": 6, "llama": 5, "vit": 5}[name]
    attn = [e for e in report.swapped + report.skipped if e.family == "attention"]
    assert len(attn) == 1 and attn[0].path == "(model)"
    if not hasattr(FF, "scaled_dot_product_attention"):
        assert "not available yet" in attn[0].why


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason=NO_TRANSFORMERS)
@pytest.mark.parametrize("name", ["gpt2", "bert", "llama"])
def test_transformers_attention(name, monkeypatch):
    """attn_implementation "fastdl" runs fastdl's attention op in every layer:
    causal without a mask (gpt2, llama with grouped-query heads), a padding
    mask and no causality (bert); outputs and gradients match sdpa's."""
    if not hasattr(fastdl.nn, "register_transformers_attention"):
        pytest.skip("fastdl.nn.register_transformers_attention does not exist yet")
    from fastdl._ops import attention as attn_ops
    calls = []
    real = attn_ops.attention

    def counted(q, k, v, mask, causal, *args):
        calls.append((causal, mask is not None))
        return real(q, k, v, mask, causal, *args)
    monkeypatch.setattr(attn_ops, "attention", counted)
    build, make_x = _hf_models()[name]
    torch.manual_seed(0)
    ref = build()
    patched = copy.deepcopy(ref)
    report = fastdl.patch(patched, ops=["attention"])
    assert patched.config._attn_implementation == "fastdl"
    assert report.swapped[0].after.endswith("-> fastdl")
    _check_equivalent(ref, patched, make_x())
    expected = ("none", True) if name == "bert" else ("bottom_right", False)
    assert calls == [expected, expected]  # 2 layers, one forward


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason=NO_TRANSFORMERS)
def test_transformers_rmsnorm_variants():
    """The Llama-style RMSNorm classes mapped to fastdl.nn.RMSNorm compute what it does."""
    if not hasattr(fastdl.nn, "RMSNorm"):
        pytest.skip("fastdl.nn.RMSNorm does not exist yet")
    import importlib
    for model, name in P._HF_RMSNORMS:
        cls = getattr(importlib.import_module(f"transformers.models.{model}.modeling_{model}"), name)
        ref = nn.ModuleDict({"n": cls(11, eps=1e-5)})
        with torch.no_grad():
            ref["n"].weight.normal_()
        patched = copy.deepcopy(ref)
        assert fastdl.patch(patched, ops=["norm"]).counts() == {"norm": 1}
        x = torch.randn(3, 11)
        assert_rel_l2(patched["n"](x), ref["n"](x), torch.float32, name)


# --- DDP and FSDP2 on two gloo processes ----------------------------------------------------------
def _distributed_worker(rank, world, init_file):
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP
    # A file rendezvous: no TCP port to race for with other processes on the machine.
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        def train(wrap, patch_when, optim_cls):
            torch.manual_seed(0)
            model = M.MLP(12, 16, 4)
            if patch_when == "before":
                assert fastdl.patch(model).counts() == {"linear_act": 2}
            model = wrap(model)
            if patch_when == "after":
                assert fastdl.patch(model).counts() == {"linear_act": 2}
            opt = optim_cls(model.parameters(), lr=1e-2)
            gen = torch.Generator().manual_seed(100 + rank)  # each rank its own data
            losses = []
            for _ in range(3):
                x, y = torch.randn(8, 12, generator=gen), torch.randint(0, 4, (8,), generator=gen)
                loss = TF.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(loss.detach())
            return torch.stack(losses), [p.detach().full_tensor() if hasattr(p, "full_tensor") else p.detach()
                                         for p in model.parameters()]

        for wrap, label in ((DDP, "DDP"), (lambda m: fully_shard(m), "FSDP2")):
            ref_loss, ref_params = train(wrap, None, torch.optim.AdamW)
            # fully_shard swaps the module's class for an FSDP one: patch before it.
            runs = [(when, torch.optim.AdamW) for when in (("before", "after") if label == "DDP" else ("before",))]
            runs.append(("before", fastdl.optim.AdamW))  # sharded params: the update runs per local shard
            for when, optim_cls in runs:
                loss, params = train(wrap, when, optim_cls)
                tol = dict(rtol=1e-4, atol=1e-5)
                what = f"{label} patch {when} {optim_cls.__module__}"
                torch.testing.assert_close(loss, ref_loss, **tol, msg=lambda m: f"{what}: loss {m}")
                for p, q in zip(params, ref_params):
                    torch.testing.assert_close(p, q, **tol, msg=lambda m: f"{what}: params {m}")
    finally:
        dist.destroy_process_group()


def test_ddp_and_fsdp2_gloo():
    """Two CPU processes: DDP with the model patched before and after wrapping,
    FSDP2 (fully_shard) patched before sharding, each also with
    fastdl.optim.AdamW; losses and parameters match unpatched runs with torch's
    AdamW."""
    import tempfile

    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_distributed_worker, args=(2, os.path.join(d, "rendezvous")), nprocs=2, join=True)
