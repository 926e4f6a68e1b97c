"""benchmarks/report.py on synthetic result files: the README section (GPU runs
only, newest run per op, the bars judged), the markdown report and the plots."""
import importlib.util
import json

import pytest

from benchmarks import report

ENV = {"gpu": "NVIDIA H100 80GB HBM3", "torch": "2.11.0", "cuda": "12.8", "triton": "3.6.0",
       "git_sha": "0123456789abcdef", "timestamp": "2026-11-25T10:00:00+00:00"}


def _op_row(provider, shape, p50, gbps, **kw):
    return {"op": "activation", "case": "gelu", "provider": provider, "mode": "fwd", "dtype": "bfloat16",
            "shape": shape, "p50_ms": p50, "GBps": gbps, "frac_copy_bw": gbps / 3000, "error": "", **kw}


def _e2e_row(model, provider, p50, peak, err=""):
    return {"op": "e2e", "case": model, "provider": provider, "mode": "train", "dtype": "bfloat16",
            "shape": "b8 s1024", "unit": "tokens", "p50_ms": p50, "items_per_s": 8192e3 / p50, "peak_MB": peak,
            "max_loss_rel_diff": 1e-3, "loss_curve": "10;9.5;9", "error": err}


def _write(path, env, rows, smoke=False):
    path.write_text(json.dumps({"env": env, "roofline": {"copy_GBps": 3000.0, "matmul_bf16_TFLOPs": 700.0},
                                "smoke": smoke, "rows": rows}))
    return str(path)


@pytest.fixture
def results(tmp_path):
    old = _write(tmp_path / "old.json", {**ENV, "timestamp": "2026-11-01T00:00:00+00:00"},
                 [_op_row("fastdl-cuda", "4096x4096", 9.0, 10.0)])
    new = _write(tmp_path / "bench.json", ENV, [
        _op_row("eager", "256x4096", 0.02, 400.0), _op_row("eager", "4096x4096", 0.1, 1340.0),
        _op_row("fastdl-cuda", "4096x4096", 0.05, 2680.0, speedup_vs_eager=2.0),
        _op_row("fastdl-triton", "4096x4096", 0.06, 2230.0, speedup_vs_eager=1.67)])
    e2e = _write(tmp_path / "e2e.json", ENV, [
        _e2e_row("gpt2", "eager", 100.0, 2000.0), _e2e_row("gpt2", "compile", 85.0, 1800.0),
        _e2e_row("gpt2", "fastdl", 80.0, 2100.0), _e2e_row("gpt2", "fastdl+compile", 70.0, 1700.0),
        _e2e_row("resnet50", "eager", 100.0, 9000.0), _e2e_row("resnet50", "fastdl", 95.0, 8000.0)])
    smoke = _write(tmp_path / "smoke.json", {**ENV, "gpu": "cpu (x86_64)"},
                   [_op_row("fastdl-cpu", "64x256", 1.0, 1.0)], smoke=True)
    return [old, new, e2e, smoke]


def test_readme_section(results):
    text = report.readme([report.load(p) for p in results])
    assert "cpu (x86_64)" not in text and "### NVIDIA H100 80GB HBM3" in text
    # newest run for the op, its largest shape, the fastest fastdl provider there
    assert "| activation | gelu | fwd | bfloat16 | 4096x4096 | fastdl-cuda | 0.0500 | 2680 GB/s (89%) | 2.00 |" in text
    assert "old.json" not in text and "[bench.json](" in text and "[e2e.json](" in text
    # bars: gpt2 1.25x eager (1.25 exactly: met), best fastdl vs compile 85/70, memory 2100/2000 (not met),
    # resnet50 100/95 = 1.05 < 1.15
    assert "| gpt2 | fastdl tokens/s vs eager | ≥ 1.25 | 1.25 | met |" in text
    assert "| gpt2 | best fastdl tokens/s vs torch.compile | ≥ 1.0 | 1.21 | met |" in text
    assert "| gpt2 | fastdl peak memory vs eager (at most) | ≤ 1.0 | 1.05 | **not met** |" in text
    assert "| resnet50 | fastdl images/s vs eager | ≥ 1.15 | 1.05 | **not met** |" in text
    assert report.readme([report.load(p) for p in results]) == text  # deterministic


def test_readme_without_gpu_results(results):
    assert report.readme([report.load(results[-1])]).startswith("**No GPU results are committed yet.**")


def test_markdown_lists_every_row_and_errors(results, tmp_path):
    bad = _write(tmp_path / "bad.json", ENV, [_e2e_row("gpt", "fastdl", 1.0, 1.0, err="loss curve differs")])
    text = report.markdown([report.load(p) for p in results + [bad]])
    assert text.count("| gelu | fwd | bfloat16 |") == 6
    assert "- gpt train bfloat16 b8 s1024 fastdl: loss curve differs" in text


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="matplotlib is not installed")
def test_plots(results, tmp_path):
    made = report.plots([report.load(p) for p in results[1:3]], str(tmp_path / "plots"))
    names = sorted(p.rsplit("/", 1)[1] for p in made)
    assert names == ["nvidia-h100-80gb-hbm3-activation-gelu-fwd-bfloat16.png",
                     "nvidia-h100-80gb-hbm3-e2e-gpt2-bfloat16.png", "nvidia-h100-80gb-hbm3-e2e-resnet50-bfloat16.png"]
