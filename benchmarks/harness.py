"""Shared benchmark harness.

Each benchmarks/bench_<op>.py defines `run(ctx) -> list[dict]` and builds its
rows with `measure(...)`. `python -m benchmarks` runs them all and writes one
long-format CSV and one JSON per run; `python -m benchmarks.bench_<op>` runs
one. Every row carries the device, versions, git sha and the command, so a
figure in the README can always be traced to the run that produced it.

Timing: on CUDA, triton.testing.do_bench (L2 flushed between reps, warm-up
first) gives p20/p50/p80 in ms; providers are checked against the reference
provider's output before any timing. Bandwidth is reported against the
device-to-device copy bandwidth measured in the same run (the memory roofline),
and TFLOP/s against a bf16 matmul measured in the same run.

On a machine without CUDA only `--smoke` is meaningful: tiny sizes, the same
correctness checks, CPU wall-clock timings that say nothing about GPU speed.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch._functorch.config

# Backward-only timings replay one graph (retain_graph=True); compiled graphs
# that donate their saved buffers cannot be replayed.
torch._functorch.config.donated_buffer = False

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Relative L2 error allowed between a provider and the reference provider.
REL_L2 = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}


@dataclass
class Context:
    device: str
    quick: bool = False
    smoke: bool = False
    dtypes: tuple = ("bf16", "fp32")
    env: dict = field(default_factory=dict)
    roofline: dict = field(default_factory=dict)

    @property
    def torch_dtypes(self):
        return [DTYPES[d] for d in self.dtypes]


# --- environment -------------------------------------------------------------------
def _git_sha() -> str:
    try:
        sha = subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=ROOT, stderr=subprocess.DEVNULL).decode().strip()
        dirty = subprocess.call(["git", "diff", "--quiet", "HEAD"], cwd=ROOT, stderr=subprocess.DEVNULL)
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment(device: str) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    gpu = torch.cuda.get_device_name() if device == "cuda" else f"cpu ({platform.processor() or platform.machine()})"
    return {
        "gpu": gpu,
        "torch": torch.__version__,
        "cuda": str(torch.version.cuda),
        "triton": triton_version,
        "python": platform.python_version(),
        "git_sha": _git_sha(),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
    }


# --- timing ---------------------------------------------------------------------------------
def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def timeit(fn: Callable[[], Any], device: str, quick: bool = False) -> tuple[float, float, float]:
    """p20, p50, p80 of one call, in ms."""
    if device == "cuda":
        import triton.testing
        q = triton.testing.do_bench(fn, warmup=10 if quick else 25, rep=30 if quick else 100,
                                    quantiles=[0.2, 0.5, 0.8])
        return tuple(float(v) for v in q)
    fn()
    times = []
    for _ in range(3 if quick else 5):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 5], statistics.median(times), times[(4 * len(times)) // 5]


def peak_mb(fn: Callable[[], Any], device: str) -> float | None:
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


# --- rooflines measured in the run --------------------------------------------------------------
def measure_roofline(ctx: Context) -> dict:
    """Device copy bandwidth (GB/s, read + write bytes) and bf16 matmul rate."""
    if ctx.device != "cuda":
        return {"copy_GBps": None, "matmul_bf16_TFLOPs": None}
    n = (1 << 28) if not ctx.quick else (1 << 26)
    src = torch.empty(n, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    _, ms, _ = timeit(lambda: dst.copy_(src), "cuda", ctx.quick)
    copy = 2 * n * 4 / ms / 1e6
    del src, dst
    m = 8192
    a = torch.randn(m, m, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(m, m, dtype=torch.bfloat16, device="cuda")
    _, ms, _ = timeit(lambda: a @ b, "cuda", ctx.quick)
    return {"copy_GBps": copy, "matmul_bf16_TFLOPs": 2 * m**3 / ms / 1e9}


# --- providers ----------------------------------------------------------------------------------------
def fastdl_providers(ctx: Context, op: str, fn: Callable[[], Any], probe: Callable[[], Any] | None = None) -> dict:
    """{"fastdl-cuda": ..., "fastdl-triton": ...} for the backends that can serve
    this call on this device (probe() is called once under each backend)."""
    import fastdl
    out = {}
    backends = ("cuda", "triton") if ctx.device == "cuda" else ("cpu", "triton")
    for backend in backends:
        try:
            with fastdl.use_backend(backend, op=op):
                (probe or fn)()
        except fastdl.BackendUnavailable:
            continue

        def call(backend=backend):
            with fastdl.use_backend(backend, op=op):
                return fn()
        out[f"fastdl-{backend}"] = call
    return out


def compiled(fn: Callable, *args):
    """torch.compile of a reference function, as a provider (warm-up compiles it)."""
    cfn = torch.compile(fn)
    return lambda: cfn(*args)


def _grad_like(out: torch.Tensor) -> torch.Tensor:
    # The same upstream gradient for every provider, so their outputs compare.
    gen = torch.Generator(out.device).manual_seed(1234)
    return torch.randn(out.shape, generator=gen, device=out.device, dtype=out.dtype)


def _differentiable(out) -> list[torch.Tensor]:
    """The tensors of an output (a tensor or a tuple of them) that carry a graph."""
    return [t for t in _flatten(out) if t.requires_grad]


def backward_of(forward: Callable[[], Any], inputs: list[torch.Tensor]) -> Callable[[], Any]:
    """A provider timing only the backward of `forward()` w.r.t. `inputs`."""
    outs = _differentiable(forward())
    grads = [_grad_like(o) for o in outs]
    return lambda: torch.autograd.grad(outs, inputs, grads, retain_graph=True)


def full_of(forward: Callable[[], Any], inputs: list[torch.Tensor]) -> Callable[[], Any]:
    """A provider timing forward + backward (of every differentiable output)."""
    grads = None

    def step():
        nonlocal grads
        outs = _differentiable(forward())
        if grads is None:
            grads = [_grad_like(o) for o in outs]
        return torch.autograd.grad(outs, inputs, grads)
    return step


# --- measuring --------------------------------------------------------------------------------------
def _flatten(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flatten(o)]
    return []


def check_close(name, out, ref, dtype):
    """Relative L2 error per output tensor: elementwise tolerances would flag
    reductions (weight grads) where a low-precision eager reference is the
    less accurate of the two; a real bug is far past these bounds."""
    bound = REL_L2.get(dtype, 1e-4)
    for i, (a, b) in enumerate(zip(_flatten(out), _flatten(ref))):
        if a is None or b is None or b.numel() == 0:
            continue
        err = ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()
        if not err <= bound:  # also catches NaN
            raise AssertionError(f"{name} disagrees with the reference provider on output {i}: "
                                 f"relative L2 error {err:.3g} > {bound:.3g}")


def measure(ctx: Context, op: str, mode: str, dtype: torch.dtype, shape: str, providers: dict,
            *, reference: str = "eager", bytes_moved: float | None = None, flops: float | None = None,
            extra: dict | None = None) -> list[dict]:
    """Check every provider against `reference`, then time each: one row per provider."""
    rows = []
    ref_out = providers[reference]() if reference in providers else None
    for name, fn in providers.items():
        row = {"op": op, "provider": name, "mode": mode, "dtype": str(dtype).replace("torch.", ""),
               "shape": shape, **(extra or {})}
        try:
            out = fn()
            if ref_out is not None and name != reference:
                check_close(name, out, ref_out, dtype)
            del out
            p20, p50, p80 = timeit(fn, ctx.device, ctx.quick)
            row.update(p20_ms=p20, p50_ms=p50, p80_ms=p80, peak_MB=peak_mb(fn, ctx.device), error="")
            if bytes_moved is not None:
                row["GBps"] = bytes_moved / p50 / 1e6
                if ctx.roofline.get("copy_GBps"):
                    row["frac_copy_bw"] = row["GBps"] / ctx.roofline["copy_GBps"]
            if flops is not None:
                row["TFLOPs"] = flops / p50 / 1e9
                if ctx.roofline.get("matmul_bf16_TFLOPs"):
                    row["frac_matmul"] = row["TFLOPs"] / ctx.roofline["matmul_bf16_TFLOPs"]
        except Exception as e:  # a failing provider is a result too: record it, go on
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        row.update(ctx.env)
        rows.append(row)
        if ctx.device == "cuda":
            torch.cuda.empty_cache()
    _add_speedups(rows, reference)
    return rows


def _add_speedups(rows, reference):
    base = {r["provider"]: r.get("p50_ms") for r in rows}
    for r in rows:
        for other in ("eager", "compile"):
            if base.get(other) and r.get("p50_ms"):
                r[f"speedup_vs_{other}"] = base[other] / r["p50_ms"]


# --- output -------------------------------------------------------------------------------------------------
COLUMNS = ["op", "provider", "mode", "dtype", "shape", "p20_ms", "p50_ms", "p80_ms", "GBps", "frac_copy_bw",
           "TFLOPs", "frac_matmul", "speedup_vs_eager", "speedup_vs_compile", "peak_MB", "error",
           "gpu", "torch", "cuda", "triton", "python", "git_sha", "timestamp", "command"]


def write_results(rows: list[dict], ctx: Context, out_dir: str, stem: str) -> tuple[str, str]:
    import csv
    os.makedirs(out_dir, exist_ok=True)
    csv_path = os.path.join(out_dir, f"{stem}.csv")
    json_path = os.path.join(out_dir, f"{stem}.json")
    extra_cols = sorted({k for r in rows for k in r} - set(COLUMNS))
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS + extra_cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    with open(json_path, "w") as f:
        json.dump({"env": ctx.env, "roofline": ctx.roofline, "smoke": ctx.smoke, "rows": rows}, f, indent=1)
    return csv_path, json_path


def summary(rows: list[dict]) -> str:
    """A plain table of p50 and the derived rates, one line per row."""
    lines = [f"{'op/case':18s} {'mode':5s} {'dtype':8s} {'shape':22s} {'provider':16s} {'p50 ms':>9s} "
             f"{'GB/s':>8s} {'TFLOP/s':>8s} {'%copy':>6s} {'x eager':>8s} {'x compile':>9s}"]
    fmt = lambda v, p: "" if v is None else f"{v:.{p}f}"  # noqa: E731
    name = lambda r: f"{r['op']}/{r['case']}"[:18] if r.get("case") else r["op"]  # noqa: E731
    for r in rows:
        if r.get("error"):
            lines.append(f"{name(r):18s} {r['mode']:5s} {r['dtype']:8s} {r['shape'][:22]:22s} "
                         f"{r['provider']:16s} ERROR {r['error'][:60]}")
            continue
        frac = r.get("frac_copy_bw")
        lines.append(f"{name(r):18s} {r['mode']:5s} {r['dtype']:8s} {r['shape'][:22]:22s} {r['provider']:16s} "
                     f"{fmt(r.get('p50_ms'), 4):>9s} {fmt(r.get('GBps'), 0):>8s} {fmt(r.get('TFLOPs'), 1):>8s} "
                     f"{'' if frac is None else f'{100 * frac:.0f}':>6s} {fmt(r.get('speedup_vs_eager'), 2):>8s} "
                     f"{fmt(r.get('speedup_vs_compile'), 2):>9s}")
    return "\n".join(lines)


def make_context(args) -> Context:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.smoke:
        print("fastdl benchmarks: no CUDA device here. The GPU benchmarks need CUDA; running the "
              "CPU-reachable parts instead (--smoke: tiny sizes, correctness checks, CPU wall clock "
              "that says nothing about GPU speed).", flush=True)
        args.smoke = True
    if device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    ctx = Context(device=device, quick=args.quick or args.smoke, smoke=args.smoke,
                  dtypes=tuple(args.dtype.split(",")))
    ctx.env = environment(device)
    ctx.roofline = measure_roofline(ctx)
    return ctx


def add_args(p: argparse.ArgumentParser):
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results/<gpu>/<date>)")
    p.add_argument("--quick", action="store_true", help="fewer sizes and reps")
    p.add_argument("--smoke", action="store_true", help="CPU: tiny sizes, correctness + wall clock only")
    p.add_argument("--dtype", default="bf16,fp32", help="comma list of fp32,fp16,bf16")


def default_out_dir(ctx: Context) -> str:
    gpu = "".join(c if c.isalnum() else "-" for c in ctx.env["gpu"]).strip("-").lower()
    if ctx.smoke:
        return os.path.join(ROOT, "benchmarks", "results", "smoke")
    return os.path.join(ROOT, "benchmarks", "results", gpu, _dt.date.today().isoformat())


def main(run: Callable[[Context], list[dict]], name: str):
    """Entry point of a single bench_<op>.py."""
    p = argparse.ArgumentParser(description=f"fastdl benchmark: {name}")
    add_args(p)
    args = p.parse_args()
    ctx = make_context(args)
    import fastdl  # noqa: F401  (after TRITON_INTERPRET is set)
    rows = run(ctx)
    stamp = ctx.env["timestamp"].replace(":", "").replace("-", "")
    paths = write_results(rows, ctx, args.out or default_out_dir(ctx), f"{name}-{stamp}")
    print(summary(rows))
    print("wrote", *paths)
