"""End-to-end training: each model trained with plain PyTorch and with fastdl
(fastdl.patch + fastdl.optim.AdamW), each also under torch.compile, from the
same initial weights on the same batches.

Providers (one row each per model):
  eager           torch model, torch.optim.AdamW (torch's default implementation)
  fastdl          fastdl.patch(model) + fastdl.optim.AdamW
  compile         torch.compile(model) + torch.optim.AdamW
  fastdl+compile  torch.compile(fastdl.patch(model)) + fastdl.optim.AdamW
Rows: step time p20/p50/p80 (ms, after warm-up, so compilation is excluded),
steps/s, tokens/s or images/s, peak memory of the training run (its copy of
the weights, gradients, optimizer state, activations), and the loss curve of the first
LOSS_STEPS steps with its largest difference from eager's; a difference past
the dtype's tolerance makes the row an error.

Models: the course's (benchmarks/models.py: MLP, CNN, SimpleResNet, UNet, GPT
from its SelfAttention), a ResNet-50 (timm when installed, else ours; on CUDA
channels_last), and, when transformers is installed, GPT-2 small, BERT-base,
ViT-base and a LLaMA-style model built from configs with random weights.
The first dtype of --dtype sets the precision: bf16/fp16 are autocast over
fp32 weights, fp32 is plain fp32. --quick keeps the models the README's bars
are about (GPT-2 small, ResNet-50) and the course GPT; --smoke runs tiny
versions of every model for a few steps on CPU (compile only for the MLP).

    python -m benchmarks.bench_e2e [--quick] [--models gpt2,resnet50] [--dtype bf16]
                                   [--patch-ops activation,norm,attention]   (ablations)
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as TF
from torch import nn

from benchmarks import harness as H
from benchmarks import models as M

OP = "e2e"
LOSS_STEPS = 50
# Largest |loss - eager loss| / |eager loss| accepted over the first LOSS_STEPS
# steps: one rounding per kernel changes the trajectory a little, more in
# half precision.
LOSS_RTOL = {"float32": 5e-3, "bfloat16": 5e-2, "float16": 5e-2}
PROVIDERS = ("eager", "fastdl", "compile", "fastdl+compile")
HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
HAS_TIMM = importlib.util.find_spec("timm") is not None


@dataclass
class Workload:
    name: str
    build: Callable[[], nn.Module]
    # (generator, device) -> one batch: model inputs (a tensor or a dict) and targets
    batch: Callable[[torch.Generator, str], tuple]
    loss: Callable[[nn.Module, object, object], torch.Tensor]
    unit: str  # what items/s counts: tokens or images (samples for the MLP)
    per_step: int
    shape: str
    channels_last: bool = False
    lr: float = 3e-4
    notes: list = field(default_factory=list)


# --- losses ------------------------------------------------------------------------------
def _ce(model, x, y):
    return TF.cross_entropy(model(x), y)


def _lm(model, x, y):
    return TF.cross_entropy(model(x).flatten(0, 1).float(), y.flatten())


def _mse(model, x, y):
    return TF.mse_loss(model(x).float(), y)


def _hf(model, x, y):
    return model(**x).loss


# --- batches ------------------------------------------------------------------------------
def _images(n, c, hw, classes):
    def make(gen, dev):
        return (torch.randn(n, c, hw, hw, generator=gen, device=dev),
                torch.randint(0, classes, (n,), generator=gen, device=dev))
    return make


def _tokens(n, t, vocab):
    def make(gen, dev):
        seq = torch.randint(0, vocab, (n, t + 1), generator=gen, device=dev)
        return seq[:, :-1], seq[:, 1:]
    return make


def _hf_tokens(n, t, vocab, with_mask=False):
    def make(gen, dev):
        ids = torch.randint(0, vocab, (n, t), generator=gen, device=dev)
        x = {"input_ids": ids, "labels": ids}
        if with_mask:
            x["attention_mask"] = torch.ones_like(ids)
        return x, None
    return make


def _hf_images(n, hw, classes):
    def make(gen, dev):
        return {"pixel_values": torch.randn(n, 3, hw, hw, generator=gen, device=dev),
                "labels": torch.randint(0, classes, (n,), generator=gen, device=dev)}, None
    return make


def _masks(n, c, hw):
    def make(gen, dev):
        return (torch.randn(n, c, hw, hw, generator=gen, device=dev),
                torch.rand(n, 1, hw, hw, generator=gen, device=dev))
    return make


# --- the models ---------------------------------------------------------------------------
def _resnet50() -> nn.Module:
    if HAS_TIMM:
        import timm
        return timm.create_model("resnet50", pretrained=False, num_classes=1000)
    return M.ResNet50()


RESNET50_NOTE = "timm resnet50" if HAS_TIMM else "benchmarks.models.ResNet50 (timm not installed)"


def _hf_workloads(tiny: bool) -> list[Workload]:
    import transformers as T
    no_dropout = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    bert_like = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    if tiny:
        gpt2 = T.GPT2Config(vocab_size=512, n_positions=64, n_embd=64, n_layer=2, n_head=4, **no_dropout)
        bert = T.BertConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=128, max_position_embeddings=64, **bert_like)
        vit = T.ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=128, num_labels=10, **bert_like)
        llama = T.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        b, t, img = 2, 32, 2
    else:
        gpt2 = T.GPT2Config(**no_dropout)  # GPT-2 small: 124M
        bert = T.BertConfig(**bert_like)   # BERT-base: 110M
        vit = T.ViTConfig(num_labels=1000, **bert_like)  # ViT-B/16, 224
        # LLaMA-style, ~0.4B: RMSNorm, SwiGLU MLP, rotary positions, grouped-query attention
        llama = T.LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=16,
                              num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=2048)
        b, t, img = 8, 1024, 64
    for cfg in (gpt2, bert, vit, llama):
        cfg.use_cache = False
    bert_t, bert_b = (t, b) if tiny else (512, 16)
    hw = vit.image_size
    return [
        Workload("gpt2", lambda: T.GPT2LMHeadModel(gpt2), _hf_tokens(b, t, gpt2.vocab_size), _hf, "tokens", b * t,
                 f"b{b} s{t}", lr=3e-4),
        Workload("bert", lambda: T.BertForMaskedLM(bert), _hf_tokens(bert_b, bert_t, bert.vocab_size, True), _hf,
                 "tokens", bert_b * bert_t, f"b{bert_b} s{bert_t}", lr=1e-4),
        Workload("vit", lambda: T.ViTForImageClassification(vit), _hf_images(img, hw, vit.num_labels), _hf, "images",
                 img, f"b{img} {hw}x{hw}", lr=1e-4),
        Workload("llama", lambda: T.LlamaForCausalLM(llama), _hf_tokens(b, t, llama.vocab_size), _hf, "tokens",
                 b * t, f"b{b} s{t}", lr=3e-4),
    ]


def workloads(ctx: H.Context) -> list[Workload]:
    """Smoke: tiny versions of everything. Full: the README's bar models first
    (GPT-2 small, ResNet-50), then the course's, then the other transformers."""
    hf = _hf_workloads(tiny=ctx.smoke) if HAS_TRANSFORMERS else []
    if ctx.smoke:
        return [
            Workload("mlp", lambda: M.MLP(784, 64, 10), _images(16, 1, 28, 10), _ce, "samples", 16, "b16 784"),
            Workload("cnn", lambda: M.CNN(width=8), _images(8, 1, 28, 10), _ce, "images", 8, "b8 28x28"),
            Workload("resnet", lambda: M.SimpleResNet(width=16, blocks=1), _images(4, 3, 32, 10), _ce, "images", 4,
                     "b4 32x32"),
            Workload("unet", lambda: M.UNet(3, 1, width=8), _masks(2, 3, 32), _mse, "images", 2, "b2 32x32"),
            Workload("gpt", lambda: M.GPT(256, 64, 4, 2, 64), _tokens(4, 32, 256), _lm, "tokens", 128, "b4 s32"),
            Workload("resnet50", lambda: M.ResNet50(num_classes=10, base=8, layers=(1, 1, 1, 1)),
                     _images(2, 3, 64, 10), _ce, "images", 2, "b2 64x64 (tiny)"),
        ] + hf
    course = [
        Workload("resnet50", _resnet50, _images(128, 3, 224, 1000), _ce, "images", 128, "b128 224x224",
                 channels_last=ctx.device == "cuda", lr=1e-3, notes=[RESNET50_NOTE]),
        Workload("gpt", lambda: M.GPT(8192, 512, 8, 8, 512), _tokens(16, 512, 8192), _lm, "tokens", 16 * 512,
                 "b16 s512 d512 L8"),
        Workload("mlp", lambda: M.MLP(784, 256, 10), _images(4096, 1, 28, 10), _ce, "samples", 4096, "b4096 784",
                 lr=1e-3),
        Workload("cnn", lambda: M.CNN(), _images(512, 1, 28, 10), _ce, "images", 512, "b512 28x28", lr=1e-3),
        Workload("resnet", lambda: M.SimpleResNet(), _images(256, 3, 32, 10), _ce, "images", 256, "b256 32x32",
                 lr=1e-3),
        Workload("unet", lambda: M.UNet(3, 1), _masks(16, 3, 128), _mse, "images", 16, "b16 128x128", lr=1e-3),
    ]
    out = hf[:1] + course + hf[1:]
    if ctx.quick:
        out = [w for w in out if w.name in ("gpt2", "resnet50", "gpt")]
    return out


# --- one training run ----------------------------------------------------------------------------
def _optimizer(provider: str, params, lr: float):
    import fastdl
    if provider.startswith("fastdl") and hasattr(fastdl.optim, "AdamW"):
        return fastdl.optim.AdamW(params, lr=lr, weight_decay=0.01), "fastdl.optim.AdamW"
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.01), "torch.optim.AdamW"


def _timer(device):
    if device == "cuda":
        def mark():
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return mark, lambda a, b: a.elapsed_time(b)
    return time.perf_counter, lambda a, b: (b - a) * 1e3


def train(ctx: H.Context, w: Workload, provider: str, base: nn.Module, batches: list, steps: int,
          dtype: torch.dtype, patch_ops="all") -> dict:
    """Train a copy of `base` for `steps` steps; losses, step times, peak memory."""
    import fastdl
    dev = ctx.device
    if dev == "cuda":
        # peak_MB: what this run adds to what is already held (the shared `base` and batches)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        held = torch.cuda.memory_allocated()
    model = copy.deepcopy(base)
    info = {}
    if provider.startswith("fastdl"):
        counts = fastdl.patch(model, ops=patch_ops).counts()
        info["patched"] = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
    opt, info["optimizer"] = _optimizer(provider, model.parameters(), w.lr)
    if provider.endswith("compile"):
        torch._dynamo.reset()  # each compiled run starts from an empty cache, within its recompile limit
        model = torch.compile(model)
    autocast = (torch.autocast(dev, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext())
    mark, elapsed = _timer(dev)
    losses, marks = [], []
    for i in range(steps):
        x, y = batches[i % len(batches)]
        start = mark()
        with autocast:
            loss = w.loss(model, x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        marks.append((start, mark()))
        losses.append(loss.detach())
    if dev == "cuda":
        torch.cuda.synchronize()
        info["peak_MB"] = (torch.cuda.max_memory_allocated() - held) / 2**20
    info["losses"] = [float(v) for v in torch.stack(losses).float().cpu()]
    info["step_ms"] = [elapsed(a, b) for a, b in marks]
    del model, opt
    return info


def run(ctx: H.Context, models: set[str] | None = None, patch_ops="all",
        checkpoint: Callable[[list], None] | None = None) -> list[dict]:
    """models: names to run (default all); patch_ops: fastdl.patch's ops (for
    ablations); checkpoint(rows) is called after each model, so a run cut
    short by a time limit keeps what it measured."""
    dtype = ctx.torch_dtypes[0]
    dtype_name = str(dtype).replace("torch.", "")
    steps = 4 if ctx.smoke else LOSS_STEPS + 10
    warmup = 1 if ctx.smoke else 10
    rows = []
    if not HAS_TRANSFORMERS:
        print("e2e: transformers is not installed: GPT-2, BERT, ViT and LLaMA-style models skipped", flush=True)
    for w in workloads(ctx):
        if models is not None and w.name not in models:
            continue
        providers = PROVIDERS if not ctx.smoke or w.name == "mlp" else ("eager", "fastdl")
        torch.manual_seed(0)
        try:
            base = w.build().to(ctx.device)
            if w.channels_last:
                base = base.to(memory_format=torch.channels_last)
            gen = torch.Generator(ctx.device).manual_seed(1)
            batches = [w.batch(gen, ctx.device) for _ in range(4)]  # cycled: the loss has something to learn
            if w.channels_last:
                batches = [(x.contiguous(memory_format=torch.channels_last), y) for x, y in batches]
        except Exception as e:  # a model that cannot be built here is a result too
            rows.append(_row(ctx, w, "eager", dtype_name, error=f"build: {type(e).__name__}: {e}"[:200]))
            continue
        results = {}
        for provider in providers:
            print(f"  e2e {w.name} {provider} ...", flush=True)
            t0 = time.time()
            try:
                results[provider] = train(ctx, w, provider, base, batches, steps, dtype, patch_ops)
            except Exception as e:  # record, go on with the other providers
                rows.append(_row(ctx, w, provider, dtype_name,
                                 error=f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"))
            else:
                rows.append(_row(ctx, w, provider, dtype_name, results[provider], results.get("eager"), warmup))
            print(f"  e2e {w.name} {provider} done in {time.time() - t0:.0f}s", flush=True)
            if ctx.device == "cuda":
                torch.cuda.empty_cache()
        _speedups([r for r in rows if r["case"] == w.name])
        del base, batches
        if checkpoint is not None:
            checkpoint(rows)
    return rows


def _row(ctx, w: Workload, provider: str, dtype_name: str, res: dict | None = None, eager: dict | None = None,
         warmup: int = 0, error: str = "") -> dict:
    row = {"op": OP, "case": w.name, "provider": provider, "mode": "train", "dtype": dtype_name, "shape": w.shape,
           "unit": w.unit, "note": "; ".join(w.notes), "error": error, **ctx.env}
    if res is None:
        return row
    times = sorted(res["step_ms"][warmup:])
    p50 = statistics.median(times)
    row.update(p20_ms=times[len(times) // 5], p50_ms=p50, p80_ms=times[(4 * len(times)) // 5],
               steps_per_s=1e3 / p50, items_per_s=w.per_step * 1e3 / p50, peak_MB=res.get("peak_MB"),
               optimizer=res["optimizer"], patched=res.get("patched", ""),
               loss_first=res["losses"][0], loss_last=res["losses"][-1],
               loss_curve=";".join(f"{v:.5g}" for v in res["losses"][:LOSS_STEPS]))
    if eager is not None:
        n = min(LOSS_STEPS, len(res["losses"]))
        diffs = [abs(a - b) for a, b in zip(res["losses"][:n], eager["losses"][:n])]
        rel = max(d / max(abs(b), 1e-12) for d, b in zip(diffs, eager["losses"][:n]))
        row.update(max_loss_diff=max(diffs), max_loss_rel_diff=rel, loss_rtol=LOSS_RTOL[dtype_name])
        if not rel <= LOSS_RTOL[dtype_name]:
            row["error"] = (f"loss curve differs from eager's by {rel:.3g} (relative) within the first {n} steps, "
                            f"more than {LOSS_RTOL[dtype_name]}")
    return row


def _speedups(rows: list[dict]) -> None:
    """Speedups over eager and compile, and peak memory relative to eager's."""
    base = {r["provider"]: r for r in rows}
    for r in rows:
        for other in ("eager", "compile"):
            if base.get(other, {}).get("p50_ms") and r.get("p50_ms"):
                r[f"speedup_vs_{other}"] = base[other]["p50_ms"] / r["p50_ms"]
        if base.get("eager", {}).get("peak_MB") and r.get("peak_MB"):
            r["memory_vs_eager"] = r["peak_MB"] / base["eager"]["peak_MB"]


def summary(rows: list[dict]) -> str:
    lines = [f"{'model':9s} {'shape':18s} {'provider':15s} {'ms/step':>9s} {'items/s':>11s} {'x eager':>8s} "
             f"{'x compile':>9s} {'peak MB':>9s} {'dloss rel':>10s}"]
    for r in rows:
        if r.get("p50_ms") is None:
            lines.append(f"{r['case']:9s} {r['shape'][:18]:18s} {r['provider']:15s} ERROR {r['error'][:80]}")
            continue
        f = lambda k, spec: "" if r.get(k) is None else format(r[k], spec)  # noqa: E731
        lines.append(f"{r['case']:9s} {r['shape'][:18]:18s} {r['provider']:15s} {f('p50_ms', '.2f'):>9s} "
                     f"{f('items_per_s', '.0f'):>11s} {f('speedup_vs_eager', '.2f'):>8s} "
                     f"{f('speedup_vs_compile', '.2f'):>9s} {f('peak_MB', '.0f'):>9s} "
                     f"{f('max_loss_rel_diff', '.2e'):>10s}" + (f"  ERROR {r['error'][:60]}" if r["error"] else ""))
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description="fastdl end-to-end training benchmark")
    H.add_args(p)
    p.add_argument("--models", default=None, help="comma list of model names (default: all)")
    p.add_argument("--patch-ops", default="all", help="fastdl.patch families, comma list (default: all)")
    args = p.parse_args()
    ctx = H.make_context(args)
    import fastdl  # noqa: F401  (after TRITON_INTERPRET is set)
    stamp = ctx.env["timestamp"].replace(":", "").replace("-", "")
    out = args.out or H.default_out_dir(ctx)
    rows = run(ctx, set(args.models.split(",")) if args.models else None,
               "all" if args.patch_ops == "all" else args.patch_ops.split(","),
               checkpoint=lambda rows: H.write_results(rows, ctx, out, f"{OP}-{stamp}"))
    paths = H.write_results(rows, ctx, out, f"{OP}-{stamp}")
    print(summary(rows))
    print("wrote", *paths)


if __name__ == "__main__":
    main()
