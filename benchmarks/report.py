"""Markdown, plots and the README's results tables, from result files only.

    python -m benchmarks.report [RESULTS ...] [--out DIR] [--plots] [--readme FILE|-]

RESULTS are .json files written by the harness, or folders holding them
(default: the newest folder under benchmarks/results/ other than smoke/).
  --out DIR      write report.md (every row, per op) and, with --plots, PNGs there
  --plots        per op/case/mode/dtype: GB/s (or TFLOP/s) against problem size,
                 one line per provider, the roofline measured in the same run
                 drawn across; per end-to-end model: the loss curves of every
                 provider and a throughput bar chart
  --readme FILE  the README's results section (markdown) to FILE, or - for
                 stdout: for each GPU the newest run, a table per op and one
                 for end-to-end training with the issue's bars checked, each
                 linked to the raw file it came from. CPU smoke runs are never
                 in it. The README's tables are pasted from this, never typed.
"""
from __future__ import annotations

import argparse
import csv
import glob
import json
import math
import os
import re
import sys
from collections import defaultdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")

# The issue's end-to-end bars (H100, bf16 autocast): (model, what, threshold).
BARS = [
    ("gpt2", "fastdl tokens/s vs eager", lambda rows: _ratio(rows, "fastdl", "eager"), 1.25),
    ("gpt2", "best fastdl tokens/s vs torch.compile",
     lambda rows: max(filter(None, (_ratio(rows, p, "compile") for p in ("fastdl", "fastdl+compile"))), default=None),
     1.0),
    ("gpt2", "fastdl peak memory vs eager (at most)", lambda rows: _mem(rows, "fastdl"), 1.0),
    ("resnet50", "fastdl images/s vs eager", lambda rows: _ratio(rows, "fastdl", "eager"), 1.15),
]


# --- loading -----------------------------------------------------------------------------------------
def _number(v):
    if v in ("", None):
        return None
    try:
        return float(v)
    except ValueError:
        return v


def load(path: str) -> dict:
    """{"env", "roofline", "rows", "path"} of one .json (or .csv) result file."""
    if path.endswith(".json"):
        with open(path) as f:
            data = json.load(f)
    else:
        with open(path, newline="") as f:
            rows = [{k: _number(v) if k not in ("shape", "git_sha") else v for k, v in r.items()}
                    for r in csv.DictReader(f)]
        env = {k: rows[0].get(k) for k in ("gpu", "torch", "cuda", "triton", "git_sha", "timestamp")} if rows else {}
        data = {"env": env, "roofline": {}, "rows": rows}
    data["path"] = path
    for r in data["rows"]:
        r.setdefault("error", "")
        r["error"] = r["error"] or ""
    return data


def find(paths: list[str]) -> list[str]:
    """Result files named by `paths` (files, or folders searched for .json)."""
    out = []
    for p in paths:
        if os.path.isdir(p):
            out += sorted(glob.glob(os.path.join(p, "**", "*.json"), recursive=True))
        else:
            out.append(p)
    return out


def newest_run_dir() -> str | None:
    dirs = [d for d in glob.glob(os.path.join(RESULTS, "*", "*")) if os.path.isdir(d)
            and os.path.relpath(d, RESULTS).split(os.sep)[0] != "smoke"]
    return max(dirs, key=os.path.getmtime) if dirs else None


# --- helpers --------------------------------------------------------------------------------------------
def size_of(shape: str) -> int:
    """Problem size from a shape label: the product of the integers in it."""
    nums = [int(n) for n in re.findall(r"\d+", str(shape))]
    return math.prod(nums) if nums else 0


def _fmt(v, spec=".2f"):
    return "" if v is None or v == "" else format(v, spec) if isinstance(v, (int, float)) else str(v)


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _key(r):
    return (r["op"], r.get("case") or "", r["mode"], r["dtype"])


def _ratio(rows, provider, base):
    by = {r["provider"]: r for r in rows if r.get("p50_ms")}
    return by[base]["p50_ms"] / by[provider]["p50_ms"] if provider in by and base in by else None


def _mem(rows, provider):
    by = {r["provider"]: r for r in rows if r.get("peak_MB")}
    return by[provider]["peak_MB"] / by["eager"]["peak_MB"] if provider in by and "eager" in by else None


def _rate(r):
    """(value, unit) of the row's rate: GB/s, TFLOP/s, or items/s for end-to-end rows."""
    for k, unit in (("GBps", "GB/s"), ("TFLOPs", "TFLOP/s"), ("items_per_s", f"{r.get('unit', 'items')}/s")):
        if r.get(k) is not None:
            return r[k], unit
    return None, ""


# --- the full markdown report ---------------------------------------------------------------------------
def markdown(runs: list[dict]) -> str:
    out = ["# fastdl benchmark report", ""]
    for run in runs:
        env, roof = run["env"], run.get("roofline") or {}
        out += [f"## {env.get('gpu')} — `{os.path.relpath(run['path'], ROOT)}`", "",
                f"torch {env.get('torch')}, CUDA {env.get('cuda')}, triton {env.get('triton')}, "
                f"git {str(env.get('git_sha'))[:12]}, {env.get('timestamp')}", ""]
        if run.get("smoke"):
            out += ["Smoke run on CPU: correctness and wall clock only, no GPU performance.", ""]
        if roof.get("copy_GBps"):
            out += [f"Rooflines measured in this run: copy {roof['copy_GBps']:.0f} GB/s, "
                    f"bf16 matmul {roof.get('matmul_bf16_TFLOPs') or 0:.0f} TFLOP/s.", ""]
        by_op = defaultdict(list)
        for r in run["rows"]:
            by_op[r["op"]].append(r)
        for op, rows in by_op.items():
            out += [f"### {op}", "", e2e_table(rows) if op == "e2e" else op_table(rows), ""]
            errors = [r for r in rows if r["error"]]
            if errors:
                out += ["Errors:", ""] + [f"- {r.get('case') or op} {r['mode']} {r['dtype']} {r['shape']} "
                                          f"{r['provider']}: {r['error']}" for r in errors] + [""]
    return "\n".join(out)


def op_table(rows: list[dict]) -> str:
    body = []
    for r in rows:
        rate, unit = _rate(r)
        frac = r.get("frac_copy_bw") if r.get("frac_copy_bw") is not None else r.get("frac_matmul")
        body.append([r.get("case") or "", r["mode"], r["dtype"], r["shape"], r["provider"],
                     _fmt(r.get("p50_ms"), ".4f"), f"{_fmt(rate, '.1f')} {unit}" if rate is not None else "",
                     _fmt(None if frac is None else 100 * frac, ".0f"), _fmt(r.get("speedup_vs_eager")),
                     _fmt(r.get("speedup_vs_compile")), _fmt(r.get("peak_MB"), ".1f"),
                     "error" if r["error"] else ""])
    return _table(["case", "mode", "dtype", "shape", "provider", "p50 ms", "rate", "% roofline", "x eager",
                   "x compile", "peak MB", ""], body)


def e2e_table(rows: list[dict]) -> str:
    body = [[r.get("case"), r["shape"], r["dtype"], r["provider"], _fmt(r.get("p50_ms")),
             f"{_fmt(r.get('items_per_s'), '.0f')} {r.get('unit', '')}/s" if r.get("items_per_s") else "",
             _fmt(r.get("speedup_vs_eager")), _fmt(r.get("speedup_vs_compile")), _fmt(r.get("peak_MB"), ".0f"),
             _fmt(r.get("memory_vs_eager")), _fmt(r.get("max_loss_rel_diff"), ".1e"),
             "error" if r["error"] else ""] for r in rows]
    return _table(["model", "shape", "dtype", "provider", "ms/step", "throughput", "x eager", "x compile",
                   "peak MB", "mem vs eager", "max loss diff (rel, 50 steps)", ""], body)


# --- plots -------------------------------------------------------------------------------------------------------
def plots(runs: list[dict], out_dir: str) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for run in runs:
        roof = run.get("roofline") or {}
        tag = re.sub(r"[^a-z0-9]+", "-", str(run["env"].get("gpu")).lower()).strip("-")
        groups = defaultdict(list)
        for r in run["rows"]:
            if r["op"] != "e2e" and not r["error"] and _rate(r)[0] is not None:
                groups[_key(r)].append(r)
        for (op, case, mode, dtype), rows in sorted(groups.items()):
            unit = _rate(rows[0])[1]
            fig, ax = plt.subplots(figsize=(6, 4))
            for provider in dict.fromkeys(r["provider"] for r in rows):
                pts = sorted((size_of(r["shape"]), _rate(r)[0]) for r in rows if r["provider"] == provider)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=provider)
            line = roof.get("copy_GBps") if unit == "GB/s" else roof.get("matmul_bf16_TFLOPs")
            if line:
                ax.axhline(line, color="k", linestyle="--", linewidth=1,
                           label="copy bandwidth" if unit == "GB/s" else "bf16 matmul")
            ax.set_xscale("log", base=2)
            ax.set(xlabel="problem size (product of the shape)", ylabel=unit,
                   title=f"{op}{'/' + case if case else ''} {mode} {dtype} — {run['env'].get('gpu')}")
            ax.legend(fontsize=8)
            written.append(_save(fig, out_dir, f"{tag}-{op}-{case or 'all'}-{mode}-{dtype}.png"))
            plt.close(fig)
        models = defaultdict(list)
        for r in run["rows"]:
            if r["op"] == "e2e":
                models[(r["case"], r["dtype"])].append(r)
        for (model, dtype), rows in sorted(models.items()):
            fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
            for r in rows:
                if r.get("loss_curve"):
                    curve = [float(v) for v in str(r["loss_curve"]).split(";")]
                    left.plot(range(len(curve)), curve, label=r["provider"])
            left.set(xlabel="step", ylabel="loss", title=f"{model} {dtype}: loss, same seed and batches")
            left.legend(fontsize=8)
            ok = [r for r in rows if r.get("items_per_s")]
            right.bar([r["provider"] for r in ok], [r["items_per_s"] for r in ok])
            right.set(ylabel=f"{ok[0].get('unit', 'items') if ok else 'items'}/s", title=f"{model} throughput")
            right.tick_params(axis="x", labelrotation=20)
            fig.tight_layout()
            written.append(_save(fig, out_dir, f"{tag}-e2e-{model}-{dtype}.png"))
            plt.close(fig)
    return written


def _save(fig, out_dir, name):
    path = os.path.join(out_dir, name)
    fig.savefig(path, dpi=110)
    return path


# --- the README's results section -----------------------------------------------------------------------------------
def readme(runs: list[dict]) -> str:
    """Per GPU, and per op the newest run that measured it: a table of the ops
    (for each case/mode/dtype, its largest shape and the fastest fastdl
    provider there) and the end-to-end table with the bars, each pointing to
    its raw file. Deterministic for the same files."""
    gpu_runs = [r for r in runs if not str(r["env"].get("gpu", "cpu")).startswith("cpu") and not r.get("smoke")]
    if not gpu_runs:
        return ("**No GPU results are committed yet.** This section is generated by "
                "`python -m benchmarks.report --readme -` from the files under `benchmarks/results/`.\n")
    latest: dict[str, dict[str, dict]] = defaultdict(dict)  # gpu -> op -> newest run with that op
    for run in sorted(gpu_runs, key=lambda r: (str(r["env"].get("timestamp")), r["path"])):
        for op in {r["op"] for r in run["rows"]}:
            latest[run["env"]["gpu"]][op] = run
    out = ["<!-- generated by `python -m benchmarks.report --readme`; do not edit by hand -->", ""]
    for gpu, by_op in sorted(latest.items()):
        out += [f"### {gpu}", ""]
        ops = sorted(op for op in by_op if op != "e2e")
        if ops:
            out += [_readme_ops([r for op in ops for r in by_op[op]["rows"] if r["op"] == op]), "",
                    "Sources: " + "; ".join(f"{op}: {_source(by_op[op])}" for op in ops), ""]
        if "e2e" in by_op:
            run = by_op["e2e"]
            rows = [r for r in run["rows"] if r["op"] == "e2e"]
            out += ["End-to-end training (ms per step after warm-up; the loss curves of the first 50 steps "
                    "compared with eager's):", "", _readme_e2e(rows), "", _readme_bars(rows), "",
                    f"Source: {_source(run)}", ""]
    return "\n".join(out)


def _source(run: dict) -> str:
    env, roof = run["env"], run.get("roofline") or {}
    link = os.path.relpath(run["path"], ROOT)
    text = (f"[{os.path.basename(link)}]({link}) (torch {env.get('torch')}, CUDA {env.get('cuda')}, triton "
            f"{env.get('triton')}, git `{str(env.get('git_sha'))[:12]}`, {str(env.get('timestamp'))[:10]}")
    if roof.get("copy_GBps"):
        text += (f"; measured copy bandwidth {roof['copy_GBps']:.0f} GB/s, bf16 matmul "
                 f"{roof.get('matmul_bf16_TFLOPs') or 0:.0f} TFLOP/s")
    return text + ")"


def _readme_ops(rows: list[dict]) -> str:
    groups = defaultdict(list)
    for r in rows:
        groups[_key(r)].append(r)
    body = []
    for (op, case, mode, dtype), rs in sorted(groups.items()):
        biggest = max(size_of(r["shape"]) for r in rs)
        at = [r for r in rs if size_of(r["shape"]) == biggest]
        ours = [r for r in at if r["provider"].startswith("fastdl") and r.get("p50_ms") and not r["error"]]
        if not ours:
            failed = next((r for r in at if r["provider"].startswith("fastdl")), None)
            body.append([op, case, mode, dtype, at[0]["shape"], "none ran", "", "", "", "",
                         failed["error"][:60] if failed else "no fastdl provider"])
            continue
        best = min(ours, key=lambda r: r["p50_ms"])
        rate, unit = _rate(best)
        frac = best.get("frac_copy_bw") if best.get("frac_copy_bw") is not None else best.get("frac_matmul")
        body.append([op, case, mode, dtype, best["shape"], best["provider"], _fmt(best["p50_ms"], ".4f"),
                     f"{_fmt(rate, '.0f')} {unit}" + (f" ({100 * frac:.0f}%)" if frac is not None else ""),
                     _fmt(best.get("speedup_vs_eager")), _fmt(best.get("speedup_vs_compile")), ""])
    return _table(["op", "case", "mode", "dtype", "shape (largest)", "fastest fastdl", "p50 ms",
                   "rate (% of roofline)", "x eager", "x compile", "note"], body)


def _readme_e2e(rows: list[dict]) -> str:
    body = [[r["case"], r["shape"], r["dtype"], r["provider"], _fmt(r.get("p50_ms")),
             f"{_fmt(r.get('items_per_s'), '.0f')} {r.get('unit', '')}/s" if r.get("items_per_s") else "",
             _fmt(r.get("speedup_vs_eager")), _fmt(r.get("speedup_vs_compile")), _fmt(r.get("peak_MB"), ".0f"),
             _fmt(r.get("max_loss_rel_diff"), ".1e"), r["error"][:60]] for r in rows]
    return _table(["model", "shape", "dtype", "provider", "ms/step", "throughput", "x eager", "x compile",
                   "peak MB", "max loss diff", "error"], body)


def _readme_bars(rows: list[dict]) -> str:
    by_model = defaultdict(list)
    for r in rows:
        by_model[r["case"]].append(r)
    body = []
    for model, what, measure, bar in BARS:
        if model not in by_model:
            continue
        value = measure(by_model[model])
        at_most = "(at most)" in what
        met = None if value is None else (value <= bar if at_most else value >= bar)
        body.append([model, what, f"{'≤' if at_most else '≥'} {bar}", _fmt(value),
                     "not measured" if met is None else "met" if met else "**not met**"])
    return _table(["model", "bar", "target", "measured", ""], body) if body else ""


# --- command line ---------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="*", help="result .json files or folders (default: the newest run folder)")
    p.add_argument("--out", default=None, help="folder for report.md and plots")
    p.add_argument("--plots", action="store_true", help="also draw PNG plots into --out")
    p.add_argument("--readme", default=None, metavar="FILE", help="write the README results section ('-': stdout)")
    args = p.parse_args(argv)
    paths = args.results or ([newest_run_dir()] if newest_run_dir() else [])
    if args.readme and not args.results:
        paths = [RESULTS]  # the README covers every GPU: each one's newest run
    files = find(paths)
    # one run = one file; a suite run's bench-*.json already holds its per-op rows
    runs = [load(f) for f in files]
    if not runs:
        print("no result files found", file=sys.stderr)
        return 1
    if args.readme:
        text = readme(runs)
        if args.readme == "-":
            print(text)
        else:
            with open(args.readme, "w") as f:
                f.write(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "report.md"), "w") as f:
            f.write(markdown(runs))
        if args.plots:
            try:
                made = plots(runs, args.out)
            except ImportError:
                print("matplotlib is not installed: no plots (pip install matplotlib)", file=sys.stderr)
            else:
                print(f"{len(made)} plots in {args.out}")
        print("wrote", os.path.join(args.out, "report.md"))
    if not args.out and not args.readme:
        print(markdown(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
