"""Where a training step's time goes, per context length, and how it grows (``cllora profile``).

Usage::

    cllora profile --contexts 256,512,1024,2048                       # CPU, SmolLM2-135M
    cllora profile --device cuda --dtype bf16 --model llama-3.1-8b \\
        --provider cllora-4bit --contexts 1024,2048,4096,8192
    python -m cllora.bench.profile --contexts 512,1024   # the same (benchmarks/profile_e2e.py too)

    from cllora.bench.cells import BenchSpec
    from cllora.bench.profile import run_profile

    csv_path = run_profile(BenchSpec(contexts=[512, 1024]), provider="cllora")

For each context length, in a fresh process (the ``fixed`` workload and the providers of
:mod:`cllora.bench.e2e`): one warm-up step, ``--steps`` timed steps without the profiler (the
step time), then one step under ``torch.profiler`` whose trace is written as Chrome-trace JSON
(open it in https://ui.perfetto.dev or TensorBoard) and whose operators are put in categories:

- ``attention``: SDPA / flash / varlen attention kernels and their backward;
- ``base_matmul`` and ``lora_matmul``: matrix products (dense, or bitsandbytes 4-bit), told
  apart by shape: a product with a dimension equal to the LoRA rank (16) is LoRA's (so avoid a
  context length of exactly 16 tokens, whose base products would read as LoRA's);
- ``loss``: the LM-head product and the cross-entropy (ours: chunked, fused; or torch's);
- ``norm_act``: RMSNorm, SiLU/SwiGLU, RoPE, elementwise products and casts of activations;
- ``optimizer``: AdamW's step; ``other``: everything else (copies, indexing, launch overhead).

Times are operator *self* times (device time on CUDA, CPU time on CPU), so nothing is counted
twice; the categories are then scaled to the measured (unprofiled) step time and written to the
long-format CSV of the benchmark (``metric`` = ``time_<category>``, unit ``s/step``) together with
``step_s``. A least-squares cost model ``step_s = a + b T + c T^2`` over the context lengths T (3
or more) is written as rows ``fit_a``/``fit_b``/``fit_c`` and printed with the share of the
quadratic term at the longest context, and a PNG shows the categories as stacked bars against
context length with the fitted curve.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from cllora.bench.cells import BenchSpec, Cell, batches, build_provider, device_step
from cllora.bench.e2e import (
    cell_command,
    cell_env,
    device_name,
    error_line,
    exit_status,
    parse_args,
    write_csv,
)
from cllora.bench.providers import NAMES, parse_provider
from cllora.plan.report import commit

CATEGORIES = ("attention", "base_matmul", "lora_matmul", "loss", "norm_act", "optimizer", "other")
_MATMUL = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::matmul", "aten::linear",
           "aten::baddbmm")  # fmt: skip
_KEYS = {
    "attention": ("attention", "attn", "flash", "varlen", "sdpa", "_efficient_attention"),
    "loss": (
        "cross_entropy",
        "nll_loss",
        "log_softmax",
        "logsumexp",
        "_ce_rows",
        "ce_rows",
        "linearcrossentropy",
        "chunkedlinear",
    ),
    "optimizer": ("optimizer", "adam", "_foreach", "_fused_adamw"),
    "base_matmul": (
        "matmul_4bit",
        "gemm_4bit",
        "dequantize",
        "gemv",
        "bitsandbytes",
        "cublas",
        "gemm",
        "_lora_fwd",
        "_lora_bwd",
    ),
    "norm_act": (
        "rms",
        "norm",
        "silu",
        "swiglu",
        "rope",
        "rotary",
        "aten::mul",
        "aten::add",
        "aten::pow",
        "aten::rsqrt",
        "aten::mean",
        "aten::neg",
        "aten::cat",
        "aten::to",
        "aten::_to_copy",
        "aten::sigmoid",
    ),
}


def categorize(name: str, shapes: list, rank: int, vocab: int = -1) -> str:
    """The category of one profiled operator (see the module docstring): a matrix product with
    a dimension equal to the LoRA ``rank`` is LoRA's, one with the ``vocab`` dimension is the
    LM head's (``loss``)."""
    low = name.lower()
    for cat in ("attention", "loss", "optimizer"):
        if any(k in low for k in _KEYS[cat]):
            return cat
    if name in _MATMUL or any(k in low for k in _KEYS["base_matmul"]):
        dims = [d for s in shapes or [] if isinstance(s, list | tuple) for d in s]
        if vocab in dims:
            return "loss"
        return "lora_matmul" if rank in dims else "base_matmul"
    if any(k in low for k in _KEYS["norm_act"]):
        return "norm_act"
    return "other"


def profile_cell(cell: Cell, trace_path: str) -> dict:
    """In this process: time ``steps`` steps, then profile one; categories scaled to the step."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    spec = BenchSpec(**cell.spec)
    if spec.threads:
        torch.set_num_threads(spec.threads)
    provider = parse_provider(cell.provider)
    model, params = build_provider(provider, spec)
    model.train()
    opt = torch.optim.AdamW(params, lr=1e-4)
    steps = batches(cell, spec, spec.steps + 2, model.config.vocab_size)
    cuda = spec.device == "cuda"

    def step(samples: list) -> None:
        device_step(provider, model, samples, spec.device)()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()

    step(steps[0])
    times = []
    for samples in steps[1:-1]:
        start = time.perf_counter()
        step(samples)
        times.append(time.perf_counter() - start)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities, record_shapes=True) as prof:
        step(steps[-1])
    prof.export_chrome_trace(trace_path)
    totals = dict.fromkeys(CATEGORIES, 0.0)
    for ev in prof.key_averages(group_by_input_shape=True):
        self_us = ev.self_device_time_total if cuda else ev.self_cpu_time_total
        if self_us > 0:
            totals[categorize(ev.key, ev.input_shapes, 16, model.config.vocab_size)] += self_us
    step_s = sum(times) / len(times)
    profiled = sum(totals.values()) or 1.0
    return {"step_s": step_s, **{f"time_{k}": step_s * v / profiled for k, v in totals.items()}}


def fit_cost_model(contexts: list[int], step_s: list[float]) -> tuple[float, float, float]:
    """Least-squares ``a + b T + c T^2`` through (context, step time) with a, b, c >= 0 (a
    negative cost means noise, not physics): the best fit over the subsets of the three terms
    whose unconstrained solution is non-negative. Needs 3+ points for all three terms."""
    import itertools

    import numpy as np

    t = np.asarray(contexts, dtype=float)
    y = np.asarray(step_s, dtype=float)
    columns = np.stack([np.ones_like(t), t, t * t], axis=1)
    best, best_err = (float(y.mean()), 0.0, 0.0), float("inf")
    for k in (1, 2, 3):
        for terms in itertools.combinations(range(3), k):
            coef, *_ = np.linalg.lstsq(columns[:, terms], y, rcond=None)
            if (coef < 0).any():
                continue
            err = float(((columns[:, terms] @ coef - y) ** 2).sum())
            if err < best_err:
                full = [0.0, 0.0, 0.0]
                for i, v in zip(terms, coef, strict=True):
                    full[i] = float(v)
                best, best_err = (full[0], full[1], full[2]), err
    return best


def run_profile(
    spec: BenchSpec, provider: str = "cllora", log: Callable[[str], object] = print
) -> Path:
    """Profile every context of ``spec`` (fresh process each); CSV, traces and PNG; CSV path."""
    parse_provider(provider)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out = Path(spec.out_dir)
    traces = out / f"profile-{spec.device}-{stamp}"
    traces.mkdir(parents=True, exist_ok=True)
    base = {
        "device": device_name(spec),
        "dtype": spec.dtype,
        "commit": commit(),
        "timestamp": stamp,
        "provider": provider,
        "workload": "fixed",
        "batch": spec.batch,
    }
    rows: list[dict] = []
    path = out / f"profile-{spec.device}-{stamp}.csv"
    done: list[tuple[int, float]] = []
    for context in spec.contexts:
        cell = Cell(provider, "fixed", context, spec.batch, asdict(spec))
        trace = traces / f"trace-{context}.json"
        cmd = cell_command("cllora.bench.profile", "--cell", json.dumps(asdict(cell)),
                           "--trace", str(trace))  # fmt: skip
        res = subprocess.run(cmd, capture_output=True, text=True, env=cell_env(provider))
        lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
        if res.returncode != 0 or not lines:
            err = res.stderr.strip()[-300:]
            oom = "out of memory" in err.lower() or res.returncode in (-9, 137)
            log(f"{context:6d} {'oom' if oom else 'error'}: {error_line(res.stderr)}")
            status = {**base, "context": context, "metric": "status", "unit": ""}
            rows.append({**status, "value": "oom" if oom else "error"})
            if not oom:
                rows.append({**status, "metric": "error", "value": error_line(res.stderr)})
            write_csv(path, rows)
            continue
        m = json.loads(lines[-1])
        done.append((context, m["step_s"]))
        parts = "  ".join(f"{k[5:]} {m[k] * 1e3:.0f}" for k in m if k.startswith("time_"))
        log(f"{context:6d} step {m['step_s'] * 1e3:8.1f} ms  ({parts} ms)  trace {trace}")
        for k, v in m.items():
            rows.append(
                {
                    **base,
                    "context": context,
                    "metric": k,
                    "value": f"{v:.5g}",
                    "unit": "s/step" if k.startswith("time_") else "s",
                }
            )
        write_csv(path, rows)
    if len(done) >= 3:
        a, b, c = fit_cost_model(*zip(*done, strict=True))
        longest = max(t for t, _ in done)
        share = c * longest**2 / (a + b * longest + c * longest**2)
        log(
            f"cost model: step_s = {a:.4g} + {b:.4g} T + {c:.4g} T^2 "
            f"(quadratic term {share:.0%} of the step at T={longest})"
        )
        for name, value in (("fit_a", a), ("fit_b", b), ("fit_c", c)):
            rows.append(
                {
                    **base,
                    "context": "",
                    "metric": name,
                    "value": f"{value:.6g}",
                    "unit": "s, s/token, s/token^2",
                }
            )
    write_csv(path, rows)
    plot_profile(path)
    return path


def plot_profile(csv_path: Path) -> Path:
    """Stacked bars of the categories against context length, plus the fitted cost curve."""
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    contexts = sorted({int(r["context"]) for r in rows if r["metric"] == "step_s"})
    fig, ax = plt.subplots(figsize=(8, 5))
    xs = np.arange(len(contexts))
    bottom = np.zeros(len(contexts))
    for cat in CATEGORIES:
        vals = np.array(
            [
                next(
                    (
                        float(r["value"])
                        for r in rows
                        if r["metric"] == f"time_{cat}" and int(r["context"] or 0) == t
                    ),
                    0.0,
                )
                for t in contexts
            ]
        )
        ax.bar(xs, vals, bottom=bottom, label=cat)
        bottom += vals
    fit = {r["metric"]: float(r["value"]) for r in rows if r["metric"].startswith("fit_")}
    if len(fit) == 3:
        t = np.asarray(contexts, dtype=float)
        ax.plot(
            xs,
            fit["fit_a"] + fit["fit_b"] * t + fit["fit_c"] * t * t,
            "k--",
            marker="o",
            label="a + bT + cT² fit",
        )
    ax.set_xticks(xs, [str(t) for t in contexts])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("seconds per training step")
    title = rows[0]["provider"] + " on " + rows[0]["device"] if rows else ""
    ax.set_title(f"Where a step's time goes: {title}")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    png = csv_path.with_suffix(".png")
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


def main(argv: list[str] | None = None) -> int:
    """``cllora profile`` (and, with the hidden ``--cell``, one context of it in this process)."""
    from cllora.helptext import HelpFormatter, examples

    ap = argparse.ArgumentParser(
        prog="cllora profile",
        description=__doc__.split("\n\n")[0].replace("``", ""),
        formatter_class=HelpFormatter,
        epilog=examples(
            "cllora profile --contexts 512,1024,2048                       # CPU, SmolLM2-135M",
            "cllora profile --device cuda --dtype bf16 --model llama-3.1-8b \\\n"
            "      --provider cllora-4bit --contexts 1024,2048,4096,8192",
        ),
    )
    ap.add_argument("--trace", default=None, help=argparse.SUPPRESS)
    ap.add_argument(
        "--provider",
        default="cllora",
        choices=NAMES,
        metavar="PROVIDER",
        help=f"the provider profiled, of: {', '.join(NAMES)}",
    )
    unread = (
        "providers",
        "workloads",
        "real_batch",
        "probe_steps",
        "data",
        "budget_gb",
        "find_max_context",
        "max_context_hi",
        "max_context_step",
    )  # the fixed workload only
    args = parse_args(argv, ap, skip=unread)
    if args.cell:
        print(json.dumps(profile_cell(Cell(**json.loads(args.cell)), args.trace)), flush=True)
        return 0
    internal = ("cell", "max_context_cell", "trace", "provider")
    spec = BenchSpec(**{k: v for k, v in vars(args).items() if k not in internal})
    path = run_profile(spec, args.provider)
    print(f"results: {path}, {path.with_suffix('.png')} and traces in {path.with_suffix('')}")
    return exit_status(path)


if __name__ == "__main__":
    raise SystemExit(main())
