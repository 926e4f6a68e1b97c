"""Conv2d + BatchNorm2d + activation (+ residual) as one module, and the pass
that builds them from existing models.

    block = fastdl.nn.ConvBNAct2d(64, 128, 3, padding=1, act="relu")
    y = block(x)                       # or block(x, residual) for a ResNet block tail
    model, report = fastdl.nn.fuse_conv_bn(model)
    print(report)                      # what was fused, what was skipped and why
"""
from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.fx as fx
from torch import Tensor, nn

from fastdl._ops import conv_block as _cb
from fastdl.nn.batchnorm import BatchNorm2d as _FastBatchNorm2d
from fastdl.nn.linear_act import act_spec

# BatchNorm classes whose forward is exactly nn.BatchNorm2d's (fastdl's runs
# the same math on its kernels), so a block may take over their parameters.
_BN_TYPES = (nn.BatchNorm2d, _FastBatchNorm2d)


class ConvBNAct2d(nn.Module):
    """act(bn(conv(input)) + residual) with `conv` an nn.Conv2d and `bn` an
    nn.BatchNorm2d, so the state_dict keys are those of the unfused pair
    ("conv.weight", "bn.running_mean", ...). BatchNorm semantics are torch's:
    batch statistics in training (running statistics updated, momentum=None
    a cumulative average, num_batches_tracked counted), running statistics
    in eval. In eval without gradients BN is folded into the convolution; the
    folded weights are cached and recomputed when a parameter or buffer is
    replaced or changed in place (tracked by tensor version counters: writes
    through `.data` bypass them, call `refresh()` after such writes).

    act: None or a bias_act name (relu, leaky_relu with negative_slope, gelu,
    gelu_tanh, silu, sigmoid, tanh).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = False, act: Optional[str] = "relu", negative_slope: float = 0.01,
                 eps: float = 1e-5, momentum: Optional[float] = 0.1, device=None, dtype=None):
        super().__init__()
        if act not in (None,) + _cb.ACT_NAMES:
            raise ValueError(f"fastdl: act must be None or one of {', '.join(_cb.ACT_NAMES)}; got {act!r}")
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                              device=device, dtype=dtype)
        self.bn = nn.BatchNorm2d(out_channels, eps, momentum, device=device, dtype=dtype)
        self.act = act
        self.negative_slope = float(negative_slope)
        self._fold_cache = None

    @classmethod
    def from_modules(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d, act: Optional[str] = None,
                     negative_slope: float = 0.01) -> "ConvBNAct2d":
        """A block holding these very modules (same parameter objects)."""
        if conv.padding_mode != "zeros":
            raise ValueError(f"fastdl: ConvBNAct2d needs padding_mode='zeros', got {conv.padding_mode!r}")
        if bn.num_features != conv.out_channels:
            raise ValueError(f"fastdl: bn.num_features ({bn.num_features}) must equal conv.out_channels "
                             f"({conv.out_channels})")
        block = cls.__new__(cls)
        nn.Module.__init__(block)
        block.conv, block.bn = conv, bn
        block.act, block.negative_slope, block._fold_cache = act, float(negative_slope), None
        block.train(bn.training)
        return block

    def refresh(self) -> None:
        """Drop the cached folded weights (after writes through `.data`)."""
        self._fold_cache = None

    def _folded(self, backend: str):
        conv, bn = self.conv, self.bn
        tensors = (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var)
        key = (backend, bn.eps) + tuple(None if t is None else (t._version, t.data_ptr(), t.dtype, t.device)
                                        for t in tensors)
        cache = self._fold_cache
        if cache is None or cache[0] != key or any(a is not b for a, b in zip(cache[1], tensors)):
            with torch.no_grad():
                folded = _cb.fold(backend, *tensors, bn.eps)
            self._fold_cache = cache = (key, tensors, folded)
        return cache[2]

    def forward(self, input: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        conv, bn = self.conv, self.bn
        # torch's _BatchNorm.forward, step for step.
        factor = 0.0 if bn.momentum is None else bn.momentum
        if self.training and bn.track_running_stats and bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
            factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
        batch_stats = self.training or (bn.running_mean is None and bn.running_var is None)
        pass_running = not self.training or bn.track_running_stats
        # The cache is for eager inference; compiled graphs fold inline (and
        # autocast casts the weights on every call).
        cacheable = not (torch.compiler.is_compiling() or torch.is_autocast_enabled(input.device.type))
        return _cb.conv_bn_act(
            input, conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean if pass_running else None,
            bn.running_var if pass_running else None, conv.stride, conv.padding, conv.dilation, conv.groups,
            batch_stats, factor, bn.eps, self.act, residual, self.negative_slope,
            folded=self._folded if cacheable else None)

    def extra_repr(self) -> str:
        slope = f", negative_slope={self.negative_slope}" if self.act == "leaky_relu" else ""
        return f"act={self.act!r}{slope}"

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_fold_cache"] = None
        return state


# --- the fusion pass --------------------------------------------------------------------------
@dataclass
class FuseReport:
    fused: list = field(default_factory=list)  # (path of the new block, what it replaced)
    skipped: list = field(default_factory=list)  # (path, why)

    def __str__(self) -> str:
        lines = [f"fuse_conv_bn: {len(self.fused)} fused, {len(self.skipped)} skipped"]
        lines += [f"  fused   {p}: {what}" for p, what in self.fused]
        lines += [f"  skipped {p}: {why}" for p, why in self.skipped]
        return "\n".join(lines)


class _OwnForward(fx.Tracer):
    """Traces one module's own forward: every submodule call stays a call."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


class _SaveOldKeys:
    """state_dict hook of a module that had `conv` and `bn` children and now
    has a ConvBNAct2d at `conv`: saves under the old keys. Hooks are objects
    rather than closures so that fused models still pickle."""

    def __init__(self, conv_name: str, bn_name: str, conv_keys, bn_keys):
        # (old key, new key), relative to the owner.
        self.pairs = ([(f"{conv_name}.{k}", f"{conv_name}.conv.{k}") for k in conv_keys]
                      + [(f"{bn_name}.{k}", f"{conv_name}.bn.{k}") for k in bn_keys])

    def __call__(self, module, state_dict, prefix, local_metadata):
        rename = {prefix + new: prefix + old for old, new in self.pairs}
        items = list(state_dict.items())
        state_dict.clear()
        for k, v in items:
            state_dict[rename.get(k, k)] = v


class _LoadOldKeys(_SaveOldKeys):
    """load_state_dict pre-hook: old keys load into the fused block."""

    def __call__(self, module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                 error_msgs):
        for old, new in self.pairs:
            if prefix + old in state_dict:
                state_dict[prefix + new] = state_dict.pop(prefix + old)


def _has_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks)


def _set(owner: nn.Module, target: str, module: nn.Module) -> None:
    parent, _, name = target.rpartition(".")
    setattr(owner.get_submodule(parent) if parent else owner, name, module)


def _conv_problem(conv: nn.Conv2d) -> Optional[str]:
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r} (ConvBNAct2d pads with zeros)"
    if conv.padding == "same" and any(d * (k - 1) % 2 for d, k in zip(conv.dilation, conv.kernel_size)):
        return "padding='same' with an even kernel span needs asymmetric padding"
    return None


def _fuse_in(owner: nn.Module, path: str, uses: Counter, report: FuseReport) -> None:
    try:
        graph = _OwnForward().trace(owner)
    except Exception as e:  # any failure to trace: leave the module alone, say why
        msg = str(e).splitlines()[0][:120] if str(e) else ""
        report.skipped.append((path or "<model>", f"the forward of {type(owner).__name__} could not be traced by "
                                                  f"torch.fx ({type(e).__name__}: {msg}); its convs are left unfused"))
        return
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    at = lambda t: f"{path}.{t}" if path else t  # noqa: E731
    for node in list(graph.nodes):
        if node.op != "call_module" or type(owner.get_submodule(node.target)) is not nn.Conv2d:
            continue
        conv = owner.get_submodule(node.target)
        users = list(node.users)
        bn_users = [u for u in users if u.op == "call_module" and type(owner.get_submodule(u.target)) in _BN_TYPES]
        if not bn_users:
            report.skipped.append((at(node.target), "not followed by a BatchNorm2d"))
            continue
        bn_node = bn_users[0]
        bn = owner.get_submodule(bn_node.target)
        why = None
        if len(users) != 1:
            why = "its output is also used elsewhere than by the BatchNorm2d"
        elif node.kwargs or len(node.args) != 1 or bn_node.kwargs or bn_node.args != (node,):
            why = "called with extra arguments"
        elif calls[node.target] != 1 or calls[bn_node.target] != 1:
            why = "the conv or the BatchNorm2d is called more than once in the forward"
        elif uses[id(conv)] != 1 or uses[id(bn)] != 1:
            why = "the conv or the BatchNorm2d is shared with another part of the model"
        elif _has_hooks(conv) or _has_hooks(bn):
            why = "the conv or the BatchNorm2d has hooks that a fused block would bypass"
        elif bn.num_features != conv.out_channels:
            why = "BatchNorm2d.num_features differs from the conv's out_channels"
        else:
            why = _conv_problem(conv)
        if why is not None:
            report.skipped.append((at(node.target), f"{node.target} -> {bn_node.target} not fused: {why}"))
            continue
        act, slope, act_node, note = None, 0.01, None, ""
        bn_out = list(bn_node.users)
        if len(bn_out) == 1 and bn_out[0].op == "call_module" and bn_out[0].args == (bn_node,):
            cand = owner.get_submodule(bn_out[0].target)
            spec = act_spec(cand)
            if spec is not None and calls[bn_out[0].target] == 1 and uses[id(cand)] == 1 and not _has_hooks(cand):
                (act, slope), act_node = spec, bn_out[0]
            elif spec is not None:
                note = f"; {bn_out[0].target} left separate (it is also called elsewhere)"
        elif len(bn_out) == 1 and bn_out[0].op == "call_function":
            note = (f"; the following {getattr(bn_out[0].target, '__name__', bn_out[0].target)} stays separate "
                    "(a function call in the forward: fusing it would need a rewrite of the forward)")
        fused = ConvBNAct2d.from_modules(conv, bn, act, slope)
        conv_keys, bn_keys = list(conv.state_dict().keys()), list(bn.state_dict().keys())
        _set(owner, node.target, fused)
        _set(owner, bn_node.target, nn.Identity())
        if act_node is not None:
            _set(owner, act_node.target, nn.Identity())
        names = (node.target, bn_node.target, conv_keys, bn_keys)
        owner.register_state_dict_post_hook(_SaveOldKeys(*names))
        owner.register_load_state_dict_pre_hook(_LoadOldKeys(*names))
        chain = " -> ".join([node.target, bn_node.target] + ([act_node.target] if act_node is not None else []))
        report.fused.append((at(node.target), f"{chain} as ConvBNAct2d(act={act!r}){note}"))


def fuse_conv_bn(model: nn.Module, inplace: bool = False):
    """Replace Conv2d -> BatchNorm2d (-> activation) chains with ConvBNAct2d.

    Each module's own forward is traced with torch.fx (submodule calls kept
    as calls), so nn.Sequential children and attribute-level patterns such as
    a ResNet block's conv1 -> bn1 -> relu are found alike. A chain is fused
    only when that is provably the same computation: the conv's output goes
    to the BatchNorm2d alone, each module is called once and is not shared
    or hooked, and an activation is fused only when it is a module called
    only there. The conv slot then holds the ConvBNAct2d (holding the same
    conv and bn objects), the bn and activation slots an nn.Identity, and
    state_dict hooks keep the model's state_dict keys what they were (old
    checkpoints load, new ones load into the unfused model). Modules whose
    forward does not trace are left alone.

    Returns (model, report); the model is a deep copy unless inplace=True.
    """
    if not inplace:
        model = copy.deepcopy(model)
    report = FuseReport()
    uses = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    for path, module in list(model.named_modules()):
        if isinstance(module, ConvBNAct2d) or not any(type(c) is nn.Conv2d for c in module.children()):
            continue
        _fuse_in(module, path, uses, report)
    return model, report
