"""`python -m benchmarks`: run every benchmarks/bench_<op>.py in one process
and write one CSV + one JSON for the whole run, plus a markdown summary.

    python -m benchmarks                   # all ops, full sweep (CUDA)
    python -m benchmarks --quick           # fewer sizes and reps
    python -m benchmarks --ops activation,norm --dtype bf16
    python -m benchmarks --smoke           # no GPU: tiny sizes, correctness + CPU timings
    python -m benchmarks --ops e2e --quick # end-to-end training only (benchmarks/bench_e2e.py)
    python -m benchmarks.report --readme - # the README's results tables, from committed result files
"""
import argparse
import importlib
import os
import pkgutil
import sys
import time
import traceback

from benchmarks import harness as H
from benchmarks import report


def _bench_modules():
    here = os.path.dirname(os.path.abspath(__file__))
    return sorted(m.name[len("bench_"):] for m in pkgutil.iter_modules([here]) if m.name.startswith("bench_"))


def _bar(done: int, total: int, width: int = 20) -> str:
    filled = width * done // max(total, 1)
    return f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total}"


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    H.add_args(p)
    p.add_argument("--ops", default=None, help=f"comma list of {','.join(_bench_modules())}")
    p.add_argument("--plots", action="store_true", help="also draw plots into OUT/plots (benchmarks/report.py)")
    args = p.parse_args(argv)
    ops = args.ops.split(",") if args.ops else _bench_modules()
    unknown = set(ops) - set(_bench_modules())
    if unknown:
        raise SystemExit(f"unknown ops {sorted(unknown)}; have {_bench_modules()}")
    ctx = H.make_context(args)
    import fastdl  # noqa: F401  (after TRITON_INTERPRET is set by make_context)

    print(f"device {ctx.env['gpu']}  torch {ctx.env['torch']}  triton {ctx.env['triton']}  sha {ctx.env['git_sha']}")
    if ctx.smoke:
        print("smoke run on CPU: correctness checks and CPU wall-clock only; GPU benchmarks need CUDA")
    print("roofline:", ctx.roofline)
    rows, failed = [], []
    stamp = ctx.env["timestamp"].replace(":", "").replace("-", "")
    out_dir = args.out or H.default_out_dir(ctx)
    for i, op in enumerate(ops, 1):
        t0 = time.time()
        print(f"{_bar(i - 1, len(ops))} {op} ...", flush=True)
        try:
            rows += importlib.import_module(f"benchmarks.bench_{op}").run(ctx)
        except Exception:
            failed.append(op)
            traceback.print_exc()
        # Rewritten after every op: a run cut off by a time limit keeps what it measured.
        paths = H.write_results(rows, ctx, out_dir, f"bench-{stamp}")
        print(f"{_bar(i, len(ops))} {op} done in {time.time() - t0:.0f}s", flush=True)
    run = report.load(paths[1])
    with open(os.path.join(out_dir, f"bench-{stamp}.md"), "w") as f:
        f.write(f"# fastdl benchmarks\n\n{ctx.env}\n\nroofline: {ctx.roofline}\n\n```\n{H.summary(rows)}\n```\n\n"
                + report.markdown([run]))
    if args.plots:
        try:
            print(f"{len(report.plots([run], os.path.join(out_dir, 'plots')))} plots in {out_dir}/plots")
        except ImportError:
            print("matplotlib is not installed: no plots (pip install matplotlib)")
    print(H.summary(rows))
    print("wrote", *paths)
    if failed:
        print("benchmarks that raised:", ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
