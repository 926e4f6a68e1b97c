"""fastdl.info(): versions, GPU, what was built, and which backend each op
uses on each device and why (also `python -m fastdl.info`)."""
from __future__ import annotations

import platform
import sys

import torch

from fastdl import _backend


def _versions() -> list[tuple[str, str]]:
    import fastdl

    rows = [("fastdl", fastdl.__version__), ("python", platform.python_version()),
            ("torch", torch.__version__), ("torch CUDA", str(torch.version.cuda))]
    try:
        import triton

        rows.append(("triton", triton.__version__ + (" (interpreter)" if _backend.TRITON_INTERPRET else "")))
    except ImportError:
        rows.append(("triton", "not installed"))
    if torch.cuda.is_available():
        cap = torch.cuda.get_device_capability()
        rows.append(("GPU", f"{torch.cuda.get_device_name()} (sm_{cap[0]}{cap[1]})"))
    else:
        rows.append(("GPU", "none visible"))
    if _backend._C is None:
        rows.append(("fastdl._C", f"NOT BUILT: {_backend.C_ERROR}"))
    elif _backend.WITH_CUDA:
        rows.append(("fastdl._C", f"CUDA kernels for {_backend.CUDA_ARCHS} + CPU kernels"))
    else:
        rows.append(("fastdl._C", "CPU kernels only (built without CUDA)"))
    return rows


def _describe(op: str, device: str) -> str:
    try:
        return _backend.resolve_quietly(op, torch.device(device))
    except _backend.BackendUnavailable as e:
        return f"unavailable: {e}"


def info(file=None) -> None:
    """Print versions, build, per-op backends and fallbacks seen."""
    out = file or sys.stdout
    for k, v in _versions():
        print(f"{k:12s} {v}", file=out)
    print(f"\nbackend setting: {_backend.get_backend()} (per op: "
          f"{ {k: v for k, v in _backend._choice.items() if k} or 'none'})", file=out)
    print(f"{'op':12s} {'cpu':28s} {'cuda':28s} auto on CUDA", file=out)
    for name, op in sorted(_backend.OPS.items()):
        print(f"{name:12s} {_describe(name, 'cpu'):28s} {_describe(name, 'cuda'):28s} {op.auto_why}", file=out)
    if _backend.FALLBACKS:
        print("\nfallbacks seen (auto):", file=out)
        for (op, dev, reason), used in _backend.FALLBACKS.items():
            print(f"  {op} on {dev} -> {used}: {reason}", file=out)
