"""Backend choice for every op, in one place.

Backends:
  cuda    hand-written CUDA C++ kernels (CUDA tensors)
  cpu     the C++ CPU kernels of the same ops (CPU tensors)
  triton  Triton kernels (CUDA tensors; CPU tensors under TRITON_INTERPRET=1)
  torch   the reference composite in plain PyTorch (anywhere)
  auto    per op and device: on CUDA the fastest measured backend for that op,
          on CPU the C++ CPU kernel where one exists, else the reference

The choice comes from, in order: a `use_backend` context or `set_backend` call
for that op, the same for all ops, the FASTDL_BACKEND environment variable,
then "auto". An explicitly chosen backend that cannot serve a call raises
BackendUnavailable; `auto` may fall back, warns once per reason, and
`fastdl.info()` lists the fallbacks seen.

Everything `resolve` reads is a plain Python value fixed at import, so
torch.compile traces it without a graph break and guards on the choice.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

BACKENDS = ("auto", "cuda", "cpu", "triton", "torch")


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot serve this call."""


# --- the compiled extension --------------------------------------------------
try:
    from fastdl import _C  # noqa: F401  (loading it registers the C++ ops)

    C_ERROR = None
except ImportError as e:  # not built: a source checkout without `pip install -e .`
    _C = None
    C_ERROR = f"{type(e).__name__}: {e}"

WITH_CUDA = bool(getattr(_C, "with_cuda", 0))
CUDA_ARCHS = getattr(_C, "cuda_archs", "none")

TRITON_FOUND = importlib.util.find_spec("triton") is not None
# Triton reads TRITON_INTERPRET when it is imported; what counts is its value
# when fastdl is imported (tests set it first).
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _has_kernel(qualname: str, key: str) -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(qualname, key)
    except RuntimeError:  # op not registered at all
        return False


@dataclass
class OpInfo:
    name: str
    native_op: str | None  # C++ op holding the cpu/cuda kernels, e.g. "fastdl::bias_act_fwd"
    has_triton: bool
    # auto on CUDA: backends in order of preference, and why this order.
    auto_cuda: tuple[str, ...]
    auto_why: str
    has_cpu: bool = field(init=False)
    has_cuda: bool = field(init=False)

    def __post_init__(self):
        self.has_cpu = bool(self.native_op) and _has_kernel(self.native_op, "CPU")
        self.has_cuda = bool(self.native_op) and _has_kernel(self.native_op, "CUDA")


OPS: dict[str, OpInfo] = {}


def register_op(name: str, native_op: str | None, has_triton: bool,
                auto_cuda: tuple[str, ...] = ("cuda", "triton"),
                auto_why: str = "default order, not yet measured on this GPU") -> OpInfo:
    OPS[name] = OpInfo(name, native_op, has_triton, auto_cuda, auto_why)
    return OPS[name]


# --- the user's choice ---------------------------------------------------------
def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"fastdl: backend must be one of {', '.join(BACKENDS)}; got {name!r}")
    return name


_env = os.environ.get("FASTDL_BACKEND", "auto")
_choice: dict[str | None, str] = {None: _check_name(_env)}  # None: every op


def set_backend(name: str, op: str | None = None) -> None:
    """Use backend `name` for `op` (or for every op) from now on."""
    if op is not None and op not in OPS:
        raise ValueError(f"fastdl: unknown op {op!r}; ops are {', '.join(sorted(OPS))}")
    _choice[op] = _check_name(name)


def get_backend(op: str | None = None) -> str:
    return _choice.get(op, _choice[None])


@contextlib.contextmanager
def use_backend(name: str, op: str | None = None):
    """Context manager form of set_backend."""
    old = _choice.get(op)
    set_backend(name, op)
    try:
        yield
    finally:
        if old is None:
            _choice.pop(op, None)
        else:
            _choice[op] = old


# --- resolution -----------------------------------------------------------------
FALLBACKS: dict[tuple[str, str, str], str] = {}  # (op, device, reason) -> backend used


def _why_not(info: OpInfo, backend: str, device: str) -> str | None:
    """Why `backend` cannot run `info` on `device`, or None if it can."""
    if backend == "torch":
        return None
    if backend in ("cuda", "cpu"):
        if device != backend:
            return f"backend '{backend}' runs on {backend} tensors only, got a {device} tensor"
        if _C is None:
            return f"the fastdl._C extension is not built ({C_ERROR})"
        if backend == "cuda" and not WITH_CUDA:
            return "fastdl._C was built without CUDA (see fastdl.info())"
        if not (info.has_cuda if backend == "cuda" else info.has_cpu):
            return f"{info.name} has no {backend} kernel"
        return None
    if backend == "triton":
        if not info.has_triton:
            return f"{info.name} has no Triton kernel"
        if not TRITON_FOUND:
            return "triton is not installed"
        if device == "cpu" and not TRITON_INTERPRET:
            return "Triton runs CPU tensors only under TRITON_INTERPRET=1"
        if device not in ("cuda", "cpu"):
            return f"Triton cannot run {device} tensors"
        return None
    return f"unknown backend {backend!r}"


def _pick(op: str, dev: str, unsupported: dict[str, str] | None) -> tuple[str, list[str]]:
    info = OPS[op]
    chosen = get_backend(op)
    if chosen != "auto":
        reason = _why_not(info, chosen, dev) or (unsupported or {}).get(chosen)
        if reason is not None:
            raise BackendUnavailable(f"fastdl: {op}: {reason}")
        return chosen, []
    order = info.auto_cuda if dev == "cuda" else ("cpu",)
    skipped = []
    for backend in order:
        reason = _why_not(info, backend, dev) or (unsupported or {}).get(backend)
        if reason is None:
            return backend, skipped
        skipped.append(f"{backend}: {reason}")
    # An op without a CPU kernel runs the reference on CPU by design.
    if dev == "cpu" and _C is not None and not info.has_cpu:
        skipped = []
    return "torch", skipped


def resolve(op: str, device: torch.device, unsupported: dict[str, str] | None = None) -> str:
    """The backend that runs `op` on `device` for this call.

    `unsupported` maps backends that cannot serve this particular call (for
    example an attention head dim a kernel was not built for) to the reason.
    """
    backend, skipped = _pick(op, device.type, unsupported)
    if skipped:
        _note_fallback(op, device.type, "; ".join(skipped), backend)
    return backend


def resolve_quietly(op: str, device: torch.device) -> str:
    """What `resolve` would pick for a plain call, as text, without warning."""
    backend, skipped = _pick(op, device.type, None)
    return f"{backend} (fallback)" if skipped else backend


def _note_fallback(op: str, dev: str, reason: str, backend: str) -> None:
    key = (op, dev, reason)
    if key not in FALLBACKS:
        FALLBACKS[key] = backend
        warnings.warn(f"fastdl: {op} on {dev} falls back to '{backend}' ({reason})",
                      RuntimeWarning, stacklevel=3)


# --- Triton kernels ---------------------------------------------------------------
def load_kernels(module: str):
    """Import fastdl._kernels.<module> (kernels/<module>.py).

    Installed wheels map kernels/ to fastdl._kernels. In a source checkout
    (editable install, or the tree on sys.path) the kernels/ beside this
    fastdl/ is used, so the Python and Triton code always come from one tree.
    """
    checkout = Path(__file__).resolve().parent.parent
    if "fastdl._kernels" not in sys.modules and (checkout / "setup.py").is_file() \
            and (checkout / "kernels" / "__init__.py").is_file():
        path = checkout / "kernels"
        spec = importlib.util.spec_from_file_location(
            "fastdl._kernels", path / "__init__.py", submodule_search_locations=[str(path)])
        mod = importlib.util.module_from_spec(spec)
        sys.modules["fastdl._kernels"] = mod
        spec.loader.exec_module(mod)
    return importlib.import_module(f"fastdl._kernels.{module}")
