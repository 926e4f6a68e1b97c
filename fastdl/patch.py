"""fastdl.patch: put fastdl's modules into an existing model, one instance at a time.

    report = fastdl.patch(model)                     # every family fastdl has
    report = fastdl.patch(model, ops=["activation", "norm"])
    print(report)                                    # what was swapped, what was skipped and why

Nothing in torch or in any library is changed: each module of the model whose
exact class fastdl replaces gets a new instance of the fastdl subclass holding
the same parameter and buffer objects (so the state_dict keys and tensors, an
optimizer built earlier, DDP's gradient hooks and registered module hooks all
stay valid), set on its parent in place of the old one.

Where the replacements come from:
  * every fastdl.nn submodule that exports `REPLACES` ({torch class: fastdl
    subclass}); the family is the file's stem (conv_block's is "conv_bn"), so
    an op family added later takes part without touching this file;
  * pairs inside an nn.Sequential, fused into the first module of the pair
    while the second slot becomes an nn.Identity (no state, so the state_dict
    keys stay the same): `Linear, activation` (family "linear_act") becomes a
    fastdl.nn.LinearAct holding the same weight and bias, whose bias add runs
    inside the activation kernel; `BatchNorm2d, activation` (family
    "batchnorm") becomes a fastdl.nn.BatchNormAct2d;
  * Conv2d -> BatchNorm2d (-> activation) chains (family "conv_bn"), found by
    tracing each module's forward, become fastdl.nn.ConvBNAct2d blocks through
    fastdl.nn.fuse_conv_bn (the state_dict keeps its keys through state_dict
    hooks; named_parameters gains ".conv"/".bn" levels);
  * Hugging Face transformers models (only when transformers is already
    imported): its GELU/SiLU activation modules and Llama-style RMSNorm map to
    fastdl's modules, and the model's attention implementation is set to
    "fastdl" (fastdl.nn.register_transformers_attention).

A module is left alone, and the report says why, when its class is a subclass
of a replaced class (its methods may differ), or when nothing in fastdl
replaces it yet. Functional calls in a forward (F.relu(x)) are out of reach.

torch.compile'd models (OptimizedModule) and DistributedDataParallel models
are patched through the module they wrap; patch before wrapping when you can,
so the compiled graph and DDP see the final modules from the first step.
"""
from __future__ import annotations

import copy
import importlib
import pkgutil
import sys
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Union

from torch import nn

FAMILIES = ("activation", "norm", "batchnorm", "conv_bn", "attention", "linear_act")
# fastdl.nn file stem -> family name, where the two differ.
_FAMILY_OF_FILE = {"conv_block": "conv_bn"}
# torch modules a fastdl family is meant to cover: when the family is selected
# but fastdl.nn has no replacement for one (its op not there yet), the report
# says so.
_TORCH_FAMILY = {
    nn.GELU: "activation", nn.ReLU: "activation", nn.LeakyReLU: "activation", nn.SiLU: "activation",
    nn.Sigmoid: "activation", nn.Tanh: "activation",
    nn.LayerNorm: "norm", nn.RMSNorm: "norm",
    nn.BatchNorm1d: "batchnorm", nn.BatchNorm2d: "batchnorm",
    nn.MultiheadAttention: "attention",
}
# torch.nn modules whose kind fastdl works on (activations, norms, attention):
# one of these with no replacement is listed as skipped, so the report shows
# what is left unfused in the model.
_TORCH_KIND_FILES = ("torch.nn.modules.activation", "torch.nn.modules.normalization",
                     "torch.nn.modules.batchnorm", "torch.nn.modules.instancenorm")

# Llama-style RMSNorm classes of transformers, all computing
# weight * (x_fp32 * rsqrt(mean(x_fp32^2) + variance_epsilon)).to(x.dtype).
_HF_RMSNORMS = (("llama", "LlamaRMSNorm"), ("mistral", "MistralRMSNorm"), ("qwen2", "Qwen2RMSNorm"))


@dataclass
class Entry:
    family: str
    path: str
    before: str
    after: str = ""
    why: str = ""


@dataclass
class PatchReport:
    """What fastdl.patch did. `model` is the patched model (the argument itself
    when inplace=True, else the patched copy)."""
    model: nn.Module
    swapped: list[Entry] = field(default_factory=list)
    skipped: list[Entry] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """Swaps per family."""
        out: dict[str, int] = {}
        for e in self.swapped:
            out[e.family] = out.get(e.family, 0) + 1
        return out

    def __str__(self) -> str:
        """One line per kind of change (n modules, their paths abbreviated);
        the full lists are `swapped` and `skipped`."""
        lines = [f"fastdl.patch: {len(self.swapped)} swapped, {len(self.skipped)} skipped"]
        if self.swapped:
            lines += _table(["family", "n", "was", "now", "modules"],
                            _grouped(self.swapped, lambda e: (e.family, e.before, e.after)))
        if self.skipped:
            lines += ["skipped:"] + _table(["family", "n", "class", "why", "modules"],
                                           _grouped(self.skipped, lambda e: (e.family, e.before, e.why)))
        return "\n".join(lines)

    __repr__ = __str__


def _grouped(entries: list[Entry], key: Callable[[Entry], tuple]) -> list[tuple]:
    groups: dict[tuple, list[str]] = {}
    for e in entries:
        groups.setdefault(key(e), []).append(e.path)
    rows = []
    for (family, a, b), paths in groups.items():
        shown = ", ".join(paths[:3]) + (f", ... ({len(paths) - 3} more)" if len(paths) > 3 else "")
        rows.append((family, len(paths), a, b, shown))
    return rows


def _table(header: list[str], rows: list[tuple]) -> list[str]:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    fmt = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return [fmt(header), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]


# --- the replacement tables ------------------------------------------------------------
Builder = Callable[[nn.Module], nn.Module]


def _swap_class(old: nn.Module, cls: type) -> nn.Module:
    """A new `cls` instance sharing old's parameters, buffers, children and
    hooks. `cls` subclasses type(old) and adds no state of its own, or offers
    `from_torch(module)` to build itself."""
    if hasattr(cls, "from_torch"):
        return cls.from_torch(old)
    new = cls.__new__(cls)
    # Copy the containers (parameter/buffer/module/hook dicts), not what they
    # hold: the tensors stay the very same objects.
    new.__dict__.update({k: (v.copy() if isinstance(v, (dict, set)) else v) for k, v in old.__dict__.items()})
    return new


def _nn_tables(ops: set[str]) -> tuple[dict[type, tuple[str, Builder]], list[Entry]]:
    """{torch class: (family, builder)} from every fastdl.nn submodule's REPLACES."""
    import fastdl.nn
    rules: dict[type, tuple[str, Builder]] = {}
    problems = []
    for info in pkgutil.iter_modules(fastdl.nn.__path__):
        family = _FAMILY_OF_FILE.get(info.name, info.name)
        if family not in ops:
            continue
        try:
            mod = importlib.import_module(f"fastdl.nn.{info.name}")
        except ImportError as e:  # an op still being written: report it, patch the rest
            problems.append(Entry(family, "", f"fastdl.nn.{info.name}", why=f"import failed: {e}"))
            continue
        for src, dst in getattr(mod, "REPLACES", {}).items():
            rules[src] = (family, lambda old, dst=dst: _swap_class(old, dst))
    return rules, problems


def _hf_tables(ops: set[str]) -> dict[type, tuple[str, Builder]]:
    """transformers' own activation / RMSNorm classes. Read only when
    transformers is already imported (a transformers model is in play), so
    patching a plain model never imports it."""
    rules: dict[type, tuple[str, Builder]] = {}
    hf_act = sys.modules.get("transformers.activations")
    import fastdl.nn as fnn
    if hf_act is not None and "activation" in ops:
        # erf GELU (GELUActivation, incl. its python variant), the tanh
        # approximation written three ways, and SiLU: all math bias_act has.
        for name, build in (("GELUActivation", lambda m: fnn.GELU()),
                            ("GELUTanh", lambda m: fnn.GELU(approximate="tanh")),
                            ("NewGELUActivation", lambda m: fnn.GELU(approximate="tanh")),
                            ("FastGELUActivation", lambda m: fnn.GELU(approximate="tanh")),
                            ("SiLUActivation", lambda m: fnn.SiLU())):
            if hasattr(hf_act, name):
                rules[getattr(hf_act, name)] = ("activation", build)
    rmsnorm = getattr(fnn, "RMSNorm", None)
    if rmsnorm is not None and "norm" in ops:
        for model, name in _HF_RMSNORMS:
            mod = sys.modules.get(f"transformers.models.{model}.modeling_{model}")
            if mod is not None and hasattr(mod, name):
                rules[getattr(mod, name)] = ("norm", lambda m: _rmsnorm_from_hf(m, rmsnorm))
    return rules


def _rmsnorm_from_hf(old: nn.Module, cls: type) -> nn.Module:
    new = cls(old.weight.shape, eps=old.variance_epsilon, device="meta")
    new.weight = old.weight  # the same Parameter object: state_dict key "weight" unchanged
    return new


# --- Sequential patterns ------------------------------------------------------------------
# Each takes the children of an nn.Sequential and an index i; when children i,
# i + 1 match, it returns the module for slot i (same parameters, same
# state_dict keys) that also computes child i + 1, whose slot then gets an
# nn.Identity, and the text for the report.
def _act_after(children: list[nn.Module], i: int, first: tuple[type, ...]) -> Optional[tuple[str, float]]:
    from fastdl.nn.linear_act import act_spec
    if type(children[i]) not in first or _has_hooks(children[i]) or _has_hooks(children[i + 1]):
        return None
    return act_spec(children[i + 1])


def _linear_act(children: list[nn.Module], i: int) -> Optional[tuple[nn.Module, str]]:
    """Linear (with bias) + activation -> LinearAct: the bias add moves into the activation."""
    from fastdl.nn.linear_act import LinearAct
    spec = _act_after(children, i, (nn.Linear,))
    if spec is None or children[i].bias is None:
        return None
    fused = _swap_class(children[i], LinearAct)
    fused.act, fused.negative_slope = spec
    return fused, "fastdl.nn.LinearAct + Identity"


def _bn_act(children: list[nn.Module], i: int) -> Optional[tuple[nn.Module, str]]:
    """BatchNorm2d + activation -> BatchNormAct2d: one pass normalizes and activates."""
    import fastdl.nn as fnn
    if not hasattr(fnn, "BatchNormAct2d"):
        return None
    spec = _act_after(children, i, (nn.BatchNorm2d, fnn.BatchNorm2d))
    if spec is None:
        return None
    fused = _swap_class(children[i], fnn.BatchNormAct2d)
    fused.act, fused.negative_slope = spec
    return fused, "fastdl.nn.BatchNormAct2d + Identity"


_PATTERNS = (("linear_act", _linear_act), ("batchnorm", _bn_act))


def _has_hooks(m: nn.Module) -> bool:
    return any(getattr(m, k) for k in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                                       "_backward_pre_hooks"))


# --- transformers attention ------------------------------------------------------------------
def _hf_set_attention(model: nn.Module, path: str) -> Entry:
    import fastdl.nn as fnn
    before = str(getattr(model.config, "_attn_implementation", None))
    if not hasattr(fnn, "register_transformers_attention"):
        return Entry("attention", path or "(model)", type(model).__name__,
                     why="fastdl.nn.register_transformers_attention is not available yet")
    if not hasattr(model, "set_attn_implementation") or not fnn.register_transformers_attention():
        return Entry("attention", path or "(model)", type(model).__name__,
                     why="this transformers version has no AttentionInterface / set_attn_implementation")
    try:
        model.set_attn_implementation("fastdl")
    except (ValueError, KeyError) as e:
        return Entry("attention", path or "(model)", type(model).__name__, why=str(e).splitlines()[0])
    if model.config._attn_implementation != "fastdl":
        return Entry("attention", path or "(model)", type(model).__name__,
                     why="the model does not dispatch attention through transformers' AttentionInterface")
    return Entry("attention", path or "(model)", type(model).__name__,
                 after=f"attn_implementation {before} -> fastdl")


def _is_hf_model(m: nn.Module) -> bool:
    tf = sys.modules.get("transformers")
    return tf is not None and isinstance(m, getattr(tf, "PreTrainedModel", ()))


# --- the walk ------------------------------------------------------------------------------
class _Patcher:
    def __init__(self, ops: set[str], report: PatchReport):
        self.ops, self.report = ops, report
        self.rules, problems = _nn_tables(ops)
        self.rules.update(_hf_tables(ops))
        report.skipped += problems
        self.done: dict[int, nn.Module] = {}  # id(old) -> replacement, for modules shared by two parents
        self.hf_done = False

    def _replacement(self, child: nn.Module, path: str) -> Optional[nn.Module]:
        kind = type(child)
        if kind in self.rules:
            family, build = self.rules[kind]
            if _has_hooks(child) and kind.__module__.startswith("transformers"):
                # transformers modules are rebuilt, not re-classed: their hooks would be lost.
                self._skip(family, path, child, "has hooks registered, which a rebuilt module would lose")
                return None
            new = build(child)
            new.train(child.training)
            self.report.swapped.append(Entry(family, path, kind.__name__, f"fastdl.nn.{type(new).__name__}"))
            return new
        if kind.__module__.startswith("fastdl."):
            return None
        base = next((src for src in self.rules if isinstance(child, src)), None)
        if base is not None:
            self._skip(self.rules[base][0], path, child,
                       f"a subclass of {base.__module__}.{base.__name__}, not the class itself: left as is")
            return None
        family = next((f for src, f in _TORCH_FAMILY.items() if isinstance(child, src)), None)
        if family is not None:
            if family in self.ops:
                self._skip(family, path, child, f"fastdl.nn has no replacement for {kind.__name__} yet")
        elif self.all_ops and kind.__module__ in _TORCH_KIND_FILES:
            self._skip("-", path, child, "no fastdl kernel for this module")
        return None

    def _skip(self, family: str, path: str, module: nn.Module, why: str) -> None:
        self.report.skipped.append(Entry(family, path, type(module).__name__, why=why))

    def _patterns(self, seq: nn.Sequential, prefix: str) -> None:
        names = list(seq._modules)
        i = 0
        while i + 1 < len(names):
            children = [seq._modules[n] for n in names]
            for family, pattern in _PATTERNS:
                fused = pattern(children, i) if family in self.ops else None
                if fused is not None:
                    break
            if fused is None:
                i += 1
                continue
            first, second = children[i], children[i + 1]
            setattr(seq, names[i], fused[0])
            setattr(seq, names[i + 1], nn.Identity())
            self.report.swapped.append(Entry(
                family, f"{prefix}{names[i]} + {prefix}{names[i + 1]}",
                f"{type(first).__name__} + {type(second).__name__} ({fused[0].act})", fused[1]))
            i += 2

    def visit(self, module: nn.Module, prefix: str) -> None:
        if _is_hf_model(module) and not self.hf_done:
            # set_attn_implementation reaches every submodel: once, at the outermost one.
            self.hf_done = True
            if "attention" in self.ops:
                entry = _hf_set_attention(module, prefix.rstrip("."))
                (self.report.swapped if entry.after else self.report.skipped).append(entry)
        if type(module) is nn.Sequential:
            self._patterns(module, prefix)
        for name, child in list(module._modules.items()):
            if child is None:
                continue
            path = prefix + name
            if id(child) in self.done:
                new = self.done[id(child)]
            else:
                new = self._replacement(child, path)
                self.done[id(child)] = new if new is not None else child
                if not type(child).__module__.startswith("fastdl."):
                    # A fastdl module's children hold its parameters; its forward is fastdl's already.
                    self.visit(new if new is not None else child, path + ".")
            if new is not None and new is not child:
                setattr(module, name, new)

    @property
    def all_ops(self) -> bool:
        return self.ops >= set(FAMILIES)


def _unwrap(model: nn.Module) -> nn.Module:
    """The module a torch.compile / DistributedDataParallel wrapper runs."""
    from torch._dynamo.eval_frame import OptimizedModule
    from torch.nn.parallel import DistributedDataParallel
    while isinstance(model, (OptimizedModule, DistributedDataParallel)):
        model = model._orig_mod if isinstance(model, OptimizedModule) else model.module
    return model


def patch(model: nn.Module, ops: Union[str, Iterable[str]] = "all", inplace: bool = True) -> PatchReport:
    """Swap `model`'s modules for fastdl's, instance by instance.

    ops: "all" or some of "activation", "norm", "batchnorm", "conv_bn",
        "attention", "linear_act" (the families; one whose fastdl module does
        not exist yet swaps nothing and the report says so).
    inplace: patch `model` itself (default), or a deep copy (then `model` must
        be a plain module, not a torch.compile / DDP wrapper).
    Returns a PatchReport; its `model` is the patched model, and it prints as
    a table of what was swapped and what was skipped and why.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastdl.patch: model must be a torch.nn.Module, got {type(model).__name__}")
    if ops == "all":
        selected = set(FAMILIES)
    else:
        selected = {ops} if isinstance(ops, str) else set(ops)
        unknown = selected - set(FAMILIES)
        if unknown:
            raise ValueError(f"fastdl.patch: unknown ops {sorted(unknown)}; choose from {', '.join(FAMILIES)} "
                             f"or 'all'")
    inner = _unwrap(model)
    if not inplace:
        if inner is not model:
            raise ValueError("fastdl.patch: inplace=False needs a plain nn.Module, got a "
                             f"{type(model).__name__} wrapper; patch before wrapping, or use inplace=True")
        model = inner = copy.deepcopy(model)
    report = PatchReport(model)
    patcher = _Patcher(selected, report)
    if type(inner) in patcher.rules:
        report.skipped.append(Entry(patcher.rules[type(inner)][0], "(model)", type(inner).__name__,
                                    why="the model is itself one replaceable module, with no parent to "
                                        "hold a replacement: use the fastdl.nn module directly"))
    if "conv_bn" in selected:
        _fuse_conv_bn(inner, report)
    patcher.visit(inner, "")
    return report


def _fuse_conv_bn(model: nn.Module, report: PatchReport) -> None:
    """Conv2d -> BatchNorm2d (-> activation) chains, found by tracing each
    module's forward, become ConvBNAct2d blocks (fastdl.nn.fuse_conv_bn; its
    state_dict hooks keep the old keys). Runs before the one-for-one swaps,
    which would otherwise turn the BatchNorm2d into fastdl's first."""
    import fastdl.nn as fnn
    if not hasattr(fnn, "fuse_conv_bn"):
        if any(type(m) is nn.Conv2d for m in model.modules()):
            report.skipped.append(Entry("conv_bn", "(model)", type(model).__name__,
                                        why="fastdl.nn.fuse_conv_bn is not available yet"))
        return
    _, fused = fnn.fuse_conv_bn(model, inplace=True)
    blocks = dict(model.named_modules())
    for path, _ in fused.fused:
        act = blocks[path].act
        report.swapped.append(Entry("conv_bn", path, "Conv2d -> BatchNorm2d" + (f" -> {act}" if act else ""),
                                    f"fastdl.nn.ConvBNAct2d (act={act})"))
    for path, why in fused.skipped:
        if why != "not followed by a BatchNorm2d":  # a plain conv is no candidate: not worth a line
            report.skipped.append(Entry("conv_bn", path, "Conv2d", why=why))
