"""Kernel micro-benchmarks: one op at a time, forward / backward / full, x = tokens.

Usage::

    python benchmarks/bench_kernels.py                              # every op, default sizes
    python benchmarks/bench_kernels.py --ops rms_norm,linear_cross_entropy --tokens 512,4096
    python benchmarks/bench_kernels.py --providers reference,cllora,liger --reps 20
    python benchmarks/bench_kernels.py --dims llama-3.1-8b --tokens 4096   # 8B shapes (GPU)

Providers: ``reference`` (``cllora_kernels.reference``, the same functions the tests compare
against), ``cllora`` (the Triton kernels, CUDA only), and, only where the package is installed
and a GPU is present, ``liger`` (Liger-Kernel), ``unsloth`` (its fused LoRA MLP/QKV kernels are
not single-op compatible: not wired yet) and ``bnb_peft`` (PEFT LoRA over a bitsandbytes NF4
``Linear4bit``; lora_linear_nf4 only). On a CPU-only machine only ``reference`` runs, and the
script says so.

Rows are appended to one long-format CSV (default ``benchmarks/results/kernels.csv``): timestamp,
git commit, device, op, provider, mode, tokens, dtype, shape, median/p20/p80 ms, peak memory in MB
and what that memory number is: the peak above the level before the inputs were made (so inputs,
saved tensors, outputs and gradients count), ``cuda_peak_allocated_incl_inputs`` from the CUDA
allocator, or on CPUs ``cpu_peak_rss_incl_inputs``, each (op, tokens, provider, mode) in a fresh
process so that the peak RSS is its own.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import cllora_kernels as ck
import torch
from cllora_kernels import reference as ref

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CSV = ROOT / "benchmarks" / "results" / "kernels.csv"
OPS = ("lora_linear", "lora_linear_nf4", "linear_cross_entropy", "rms_norm", "rope", "swiglu")
MODES = ("forward", "backward", "full")
FIELDS = [
    "timestamp", "commit", "device", "op", "provider", "mode", "tokens", "dtype", "shape",
    "ms_median", "ms_p20", "ms_p80", "peak_mem_mb", "mem_kind",
]  # fmt: skip
MEM_KIND = {"cuda": "cuda_peak_allocated_incl_inputs", "cpu": "cpu_peak_rss_incl_inputs"}
# (hidden, MLP, heads, KV heads, head dim, vocab) of real models; --dims picks one.
DIMS = {
    "smollm2-135m": (576, 1536, 9, 3, 64, 49152),
    "llama-3.1-8b": (4096, 14336, 32, 8, 128, 128256),
}
HIDDEN, INTER, HEADS, KV_HEADS, HEAD_DIM, VOCAB = DIMS["smollm2-135m"]
RANK = 16


def set_dims(name: str) -> None:
    """Use the dimensions of ``name`` (a key of :data:`DIMS`) for every case built next."""
    global HIDDEN, INTER, HEADS, KV_HEADS, HEAD_DIM, VOCAB
    if name not in DIMS:
        raise ValueError(f"unknown --dims {name!r}; use one of {sorted(DIMS)}")
    HIDDEN, INTER, HEADS, KV_HEADS, HEAD_DIM, VOCAB = DIMS[name]


# A case: (inputs needing grad, forward callable returning a tensor or tuple, shape label)
Case = tuple[list[torch.Tensor], Callable[[], object], str]


def _rand(*shape: int, dtype: torch.dtype, dev: str, grad: bool = False, scale: float = 1.0):
    t = torch.randn(shape, device=dev).mul_(scale)  # in place: no transient second copy
    return t.to(dtype).requires_grad_(grad)


def make_case(op: str, fns: object, t: int, dtype: torch.dtype, dev: str) -> Case:
    """Fresh inputs for ``op`` at ``t`` tokens; ``fns`` has the op functions (same signatures)."""
    if op in ("lora_linear", "lora_linear_nf4"):
        x = _rand(t, HIDDEN, dtype=dtype, dev=dev, grad=True)
        w = _rand(INTER, HIDDEN, dtype=dtype, dev=dev, scale=HIDDEN**-0.5)
        if op == "lora_linear_nf4":
            import bitsandbytes.functional as bnbf

            w = ck.NF4Weight.from_bnb(
                *bnbf.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
            )
        a = _rand(RANK, HIDDEN, dtype=torch.float32, dev=dev, grad=True, scale=0.05)
        b = _rand(INTER, RANK, dtype=torch.float32, dev=dev, grad=True, scale=0.05)
        return [x, a, b], lambda: fns.lora_linear(x, w, a, b, 2.0), f"{t}x{HIDDEN}->{INTER} r{RANK}"
    if op == "linear_cross_entropy":
        h = _rand(t, HIDDEN, dtype=dtype, dev=dev, grad=True)
        w = _rand(VOCAB, HIDDEN, dtype=dtype, dev=dev, scale=HIDDEN**-0.5)
        tgt = torch.randint(0, VOCAB, (t,), device=dev)
        return [h], lambda: fns.linear_cross_entropy(h, w, tgt), f"{t}x{HIDDEN} V{VOCAB}"
    if op == "rms_norm":
        x = _rand(t, HIDDEN, dtype=dtype, dev=dev, grad=True)
        w = _rand(HIDDEN, dtype=dtype, dev=dev, grad=True)
        return [x, w], lambda: fns.rms_norm(x, w, 1e-5), f"{t}x{HIDDEN}"
    if op == "swiglu":
        g, u = (_rand(t, INTER, dtype=dtype, dev=dev, grad=True) for _ in range(2))
        return [g, u], lambda: fns.swiglu(g, u), f"{t}x{INTER}"
    if op == "rope":
        q = _rand(1, HEADS, t, HEAD_DIM, dtype=dtype, dev=dev, grad=True)
        k = _rand(1, KV_HEADS, t, HEAD_DIM, dtype=dtype, dev=dev, grad=True)
        pos = torch.arange(t, device=dev)[None]
        inv = 1.0 / (10000 ** (torch.arange(0, HEAD_DIM, 2, device=dev).float() / HEAD_DIM))
        return [q, k], lambda: fns.rope(q, k, pos, inv), f"1x{HEADS}/{KV_HEADS}x{t}x{HEAD_DIM}"
    raise ValueError(f"unknown op {op!r}; choose from {OPS}")


def _triton_fns() -> object:
    """The Triton entry points (same signatures as the reference), bypassing the dispatch."""
    from types import SimpleNamespace

    mods = {n: importlib.import_module(f"cllora_kernels.{n}") for n in ("lora_linear",
            "linear_cross_entropy", "rmsnorm", "rope", "swiglu")}  # fmt: skip
    return SimpleNamespace(
        lora_linear=mods["lora_linear"].lora_linear,
        linear_cross_entropy=mods["linear_cross_entropy"].linear_cross_entropy,
        rms_norm=mods["rmsnorm"].rms_norm,
        rope=mods["rope"].rope,
        swiglu=mods["swiglu"].swiglu,
    )


def _liger_case(op: str, t: int, dtype: torch.dtype, dev: str) -> Case | None:
    """Liger-Kernel's functions on the same inputs (None where it has no such op)."""
    from types import SimpleNamespace

    from liger_kernel.ops.rms_norm import LigerRMSNormFunction
    from liger_kernel.ops.swiglu import LigerSiLUMulFunction
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss, liger_rotary_pos_emb

    flce = LigerFusedLinearCrossEntropyLoss()

    def rope(q, k, pos, inv):
        cos, sin = ref.rope_cos_sin(pos, inv)
        return liger_rotary_pos_emb(q, k, cos[:, 0].to(q.dtype), sin[:, 0].to(q.dtype))

    fns = SimpleNamespace(
        rms_norm=lambda x, w, eps: LigerRMSNormFunction.apply(x, w, eps),
        swiglu=lambda g, u: LigerSiLUMulFunction.apply(g, u),
        linear_cross_entropy=lambda h, w, tgt: flce(w, h, tgt),
        rope=rope,
    )
    return make_case(op, fns, t, dtype, dev) if hasattr(fns, op) else None


def _bnb_peft_case(op: str, t: int, dtype: torch.dtype, dev: str) -> Case | None:
    """PEFT LoRA (r=16, no dropout) over a bitsandbytes NF4 ``Linear4bit``, double-quantized."""
    if op != "lora_linear_nf4":
        return None
    import bitsandbytes as bnb
    import peft
    from torch import nn

    class One(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = bnb.nn.Linear4bit(HIDDEN, INTER, bias=False, compute_dtype=dtype,
                                          quant_type="nf4", compress_statistics=True)  # fmt: skip

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.proj(x)

    model = One().to(dev)
    cfg = peft.LoraConfig(r=RANK, lora_alpha=2 * RANK, lora_dropout=0.0, target_modules=["proj"])
    model = peft.get_peft_model(model, cfg)
    x = _rand(t, HIDDEN, dtype=dtype, dev=dev, grad=True)
    params = [p for p in model.parameters() if p.requires_grad]
    return [x, *params], lambda: model(x), f"{t}x{HIDDEN}->{INTER} r{RANK}"


def build_case(provider: str, op: str, t: int, dtype: torch.dtype, dev: str) -> Case | None:
    if provider == "reference":
        return make_case(op, ref, t, dtype, dev)
    if provider == "cllora":
        return make_case(op, _triton_fns(), t, dtype, dev)
    if provider == "liger":
        return _liger_case(op, t, dtype, dev)
    if provider == "bnb_peft":
        return _bnb_peft_case(op, t, dtype, dev)
    return None  # unsloth: its fused LoRA MLP/QKV kernels are not single-op compatible


def _sync(dev: str) -> None:
    if dev == "cuda":
        torch.cuda.synchronize()


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _mem_now_mb(dev: str) -> float:
    """Memory in use now: CUDA allocated, or the process' RSS on CPU (MB)."""
    return torch.cuda.memory_allocated() / 2**20 if dev == "cuda" else _rss_mb()


def _rss_mb() -> float:
    """Resident set size now (MB), from /proc (Linux); 0 elsewhere."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0.0
    return pages * resource.getpagesize() / 2**20


def measure(
    case: Case, mode: str, dev: str, reps: int, warmup: int = 2, base_mb: float | None = None
) -> tuple[list[float], float]:
    """Per-repetition milliseconds of ``mode`` and the peak memory (MB, see module docstring);
    the peak is above ``base_mb`` (default: now), CUDA allocated memory or, on CPU, the process'
    RSS; callers pass the level before the inputs were made, so the peak includes them."""
    inputs, fn, _ = case

    def outputs() -> tuple[torch.Tensor, ...]:
        out = fn()
        return out if isinstance(out, tuple) else (out,)

    def run() -> None:
        if mode == "forward":
            outputs()
            return
        outs = outs_saved if mode == "backward" else outputs()
        torch.autograd.grad(outs, inputs, [torch.ones_like(o) for o in outs], retain_graph=True)

    outs_saved = outputs() if mode == "backward" else None
    for _ in range(warmup):
        run()
    _sync(dev)
    base = _mem_now_mb(dev) if base_mb is None else base_mb
    times: list[float] = []
    for _ in range(reps):
        _sync(dev)
        t0 = time.perf_counter()
        run()
        _sync(dev)
        times.append((time.perf_counter() - t0) * 1e3)
    if dev == "cuda":
        return times, torch.cuda.max_memory_allocated() / 2**20 - base
    return times, max(0.0, _maxrss_mb() - base)


def device_name(dev: str) -> str:
    if dev == "cuda":
        return torch.cuda.get_device_name()
    model = "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {model} ({torch.get_num_threads()} threads)"


def git_commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()

    commit = os.environ.get("CLLORA_COMMIT") or git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + ("+dirty" if git("status", "--porcelain", "--", "kernels") else "")


def available_providers(dev: str) -> list[str]:
    if dev != "cuda":
        return ["reference"]
    found = ["reference", "cllora"]
    for name, module in (("liger", "liger_kernel"), ("unsloth", "unsloth"), ("bnb_peft", "peft")):
        if importlib.util.find_spec(module) is not None:
            found.append(name)
    return found


def append_rows(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        writer.writerows(rows)


def measure_cell(meta: dict, op: str, t: int, provider: str, mode: str, reps: int) -> dict | None:
    """One CSV row (in this process), or None if the provider lacks the op."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[meta["dtype"]]
    torch.manual_seed(0)
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    base_mb = _mem_now_mb(dev)
    case = build_case(provider, op, t, dtype, dev)  # the peak includes the inputs
    if case is None:
        return None
    times, mem = measure(case, mode, dev, reps, base_mb=base_mb)
    q = statistics.quantiles(times, n=5, method="inclusive") if len(times) > 1 else times * 4
    stats = {"ms_median": statistics.median(times), "ms_p20": q[0], "ms_p80": q[3]}
    return {**meta, "op": op, "provider": provider, "mode": mode, "tokens": t, "shape": case[2],
            **{k: round(v, 4) for k, v in stats.items()}, "peak_mem_mb": round(mem, 2),
            "mem_kind": MEM_KIND[dev]}  # fmt: skip


def _dims_name() -> str:
    return next(k for k, v in DIMS.items() if v[0] == HIDDEN and v[5] == VOCAB)


def bench_cell(
    meta: dict, op: str, t: int, provider: str, modes: list[str], reps: int
) -> list[dict]:
    """Rows for one (op, tokens, provider), one per mode. On CPU each mode runs in a fresh
    process so that its peak RSS is its own (the CUDA allocator tracks peaks in-process)."""
    rows = []
    for mode in modes:
        if torch.cuda.is_available():
            row = measure_cell(meta, op, t, provider, mode, reps)
        else:
            cell = json.dumps({"meta": meta, "op": op, "t": t, "provider": provider,
                               "mode": mode, "reps": reps, "dims": _dims_name()})  # fmt: skip
            done = subprocess.run([sys.executable, __file__, "--cell", cell], capture_output=True,
                                  text=True, check=True)  # fmt: skip
            lines = [x for x in done.stdout.splitlines() if x.startswith("ROW ")]
            row = json.loads(lines[-1][4:]) if lines else None
        if row is None:
            continue
        spread = f"[{row['ms_p20']:.3f}, {row['ms_p80']:.3f}]"
        print(f"{op:22s} {provider:10s} {mode:8s} T={t:<6d} {row['ms_median']:10.3f} ms "
              f"{spread}  {row['peak_mem_mb']:8.1f} MB")  # fmt: skip
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ops", default=",".join(OPS))
    p.add_argument("--tokens", default="1024,4096,16384", help="comma-separated token counts")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--providers", default="", help="default: every available one")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None)
    p.add_argument("--dims", default="smollm2-135m", choices=sorted(DIMS),
                   help="model dimensions of the shapes")  # fmt: skip
    p.add_argument("--out", type=Path, default=DEFAULT_CSV)
    p.add_argument("--cell", default=None, help=argparse.SUPPRESS)  # internal: one isolated cell
    args = p.parse_args(argv)
    if args.cell:
        c = json.loads(args.cell)
        set_dims(c.get("dims", "smollm2-135m"))
        row = measure_cell(c["meta"], c["op"], c["t"], c["provider"], c["mode"], c["reps"])
        print("ROW " + json.dumps(row) if row else "ROW-NONE")
        return 0
    set_dims(args.dims)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    available = available_providers(dev)
    providers = [x for x in args.providers.split(",") if x] or available
    if dev != "cuda":
        print("no CUDA device: running the `reference` provider only (the Triton kernels need a "
              "GPU to be timed; the interpreter is for correctness tests)")  # fmt: skip
        providers = ["reference"]
    meta = {
        "timestamp": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "device": device_name(dev),
        "dtype": args.dtype or ("bf16" if dev == "cuda" else "fp32"),
    }
    rows = []
    for op in args.ops.split(","):
        for t in (int(x) for x in args.tokens.split(",")):
            for provider in providers:
                if provider not in available:
                    print(f"skip {provider}: not installed or no GPU")
                    continue
                rows += bench_cell(meta, op, t, provider, args.modes.split(","), args.reps)
    append_rows(args.out, rows)
    print(f"appended {len(rows)} rows to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
