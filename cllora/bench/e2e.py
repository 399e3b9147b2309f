"""End-to-end training-step benchmark per context length: cllora vs transformers + PEFT.

Usage::

    cllora bench --contexts 256,512,1024 --steps 2                          # CPU, small scale
    cllora bench --providers cllora,hf-peft --workloads fixed \\
        --contexts 1024,4096 --model smollm2-135m --dtype bf16 --find-max-context --budget-gb 8
    python -m cllora.bench.e2e --contexts 256,512   # the same command (benchmarks/bench_e2e.py too)

    from cllora.bench.e2e import BenchSpec, run_benchmark    # what `cllora bench` calls
    csv_path = run_benchmark(BenchSpec(contexts=[256, 512]))

One training step = forward + backward + AdamW step over the LoRA parameters (r=16, alpha=32,
``--lora-dropout`` (default 0, as Unsloth's default: the fused LoRA kernel has no dropout, and
cllora falls back to the unfused path with dropout > 0; CSVs before 2026-11-26 used 0.05), every
linear of the decoder), the same model, LoRA config, data and seed for every provider. Every
cell (provider x workload x context) runs in a **fresh process**, so the peak
memory is that cell's own: CUDA max allocated on GPU, peak RSS (``ru_maxrss``, model included) on
CPU. The parent polls the child's RSS and kills it past ``--budget-gb``: an out-of-memory cell is
recorded as ``status=oom``, never a crash.

Providers (:data:`cllora.bench.providers.PROVIDERS`; their step: :mod:`cllora.bench.step`):

- ``cllora``: the model ``cllora run`` builds (:func:`cllora.model.setup.build_model`) with
  ``model.attn=varlen``, ``train.packing=true``, ``train.checkpointing=true`` and the defaults
  ``model.kernels=auto`` (RMSNorm/SwiGLU: Triton on CUDA, lean autograd Functions on CPU) and
  ``train.loss=auto`` (the fused LM-head loss, on target positions only): packed rows (no
  padding), varlen attention, gradient checkpointing per decoder layer.
- ``cllora-nockpt``: the same without checkpointing.
- Every checkpointing ``cllora*`` cell's process starts with page-aligned big CPU buffers
  (``THP_MEM_ALLOC_ENABLE=1``, as ``cllora run`` sets it before importing torch for a
  checkpointed run: glibc's heap then fragments far less, :mod:`cllora.model.cpu_memory`); the
  other cells, baselines included, run in the user's environment as it is.
  ``THP_MEM_ALLOC_ENABLE=0 cllora bench ...`` measures cllora without it;
  ``THP_MEM_ALLOC_ENABLE=1 cllora bench ...`` gives it to every cell.
- ``cllora-lowmem``: ``cllora`` plus ``train.release_memory=true`` (CPU: glibc returns every
  freed buffer to the OS; lowest peak RSS, slower steps: :mod:`cllora.model.cpu_memory`).
- ``cllora-keepattn``: ``cllora`` with ``train.checkpoint_policy=keep_attention`` (the
  recompute skips the attention kernel; one more hidden-size tensor kept per layer).
- ``cllora-offload``: ``cllora`` plus ``train.checkpoint_offload=true`` (CUDA only: each
  checkpointed layer's saved input goes to pinned host memory; less device memory, a copy each
  way per layer).
- ``cllora-4bit`` / ``cllora-4bit-nockpt`` / ``cllora-4bit-keepattn`` /
  ``cllora-4bit-offload``: the same with ``model.quant=nf4`` (double quantization).
- ``hf-peft``: ``transformers`` + ``peft`` LoRA, SDPA, right-padding collator, ``model(...,
  labels=...).loss`` (full logits).
- ``hf-peft-4bit``: the same on a bitsandbytes NF4 base (``BitsAndBytesConfig``).
- ``liger`` / ``liger-4bit``: ``hf-peft`` / ``hf-peft-4bit`` with Liger-Kernel's Triton RMSNorm,
  SwiGLU, RoPE and fused linear cross-entropy applied to the model instance before PEFT wraps it
  (``liger_kernel.transformers``' ``_apply_liger_kernel_to_instance``): what a transformers user
  gets from Liger. CUDA and ``pip install liger-kernel`` only (a clear error otherwise); ratios
  are against ``hf-peft`` / ``hf-peft-4bit``. Unsloth is not a provider: it patches transformers
  and PEFT process-wide on import and ships its own model loader, so its numbers would not come
  from the same model build as the others' (its fused LoRA MLP is what our fused LoRA linear
  and ``cllora.model.lora.DenseLoRAFunction`` compete with).

Workloads: ``fixed`` (every sequence exactly the context length, random tokens: engine speed and
memory) and ``real`` (MedQuAD records formatted with the chat template and cut at the context
length, ``--real-batch`` samples per step: padded to the longest for the baselines, one packed row
for cllora; tokens/s counts real tokens only). ``--find-max-context`` binary-searches, per
provider, the longest ``fixed`` context (a multiple of ``--max-context-step``, default 256) whose
step fits the budget (``--probe-steps`` timed steps after the warm-up; 0 = one step): on CPU
each probe is a fresh process killed past the budget; on CUDA one process per provider builds the
model once, caps the allocator at the budget (``torch.cuda.set_per_process_memory_fraction``)
and catches ``torch.OutOfMemoryError`` per probe.

Presets (``--model llama-3.1-8b`` etc., :mod:`cllora.model.presets`) are random-weight models of
real shapes built on the device; ``hf-peft-4bit`` on a preset quantizes the same bitsandbytes
``Linear4bit`` layers that transformers' ``BitsAndBytesConfig`` loading makes (nothing to load).

Output: a line as each cell starts (provider, context, batch) and one as it ends;
``benchmarks/results/e2e-<device>-<timestamp>.csv`` in long format (provider, workload,
context, batch, metric, value, unit, device, dtype, commit, timestamp) and a PNG next to it
(tokens/s and peak memory against context length in tokens, one line per provider, one column
per workload; a cell that failed is a cross marked ``OOM`` / ``error`` / ``timeout``, its
one-line error printed under the panels).
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import platform
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import cllora
from cllora.bench.cells import BenchSpec, Cell, engine_config, max_context_cuda, run_cell
from cllora.bench.figure import plot
from cllora.bench.providers import NAMES, parse_provider
from cllora.plan.report import commit

FIELDS = ("provider", "workload", "context", "batch", "metric", "value", "unit", "device",
          "dtype", "commit", "timestamp")  # fmt: skip
Log = Callable[[str], object]


# ---------------------------------------------------------------- the parent: cells, CSV, plot


def cell_command(module: str, *args: str) -> list[str]:
    """The command running ``python -m <module> ARGS`` (a cell of the benchmark or the profile)
    in a fresh Python: what an installed cllora runs as well as a checkout."""
    return [sys.executable, "-m", module, *args]


def cell_env(provider: str) -> dict[str, str]:
    """The environment of a cell's process. It imports the cllora this process runs (the
    directory holding the package first on ``PYTHONPATH``, unless it is the environment's own
    site-packages). cllora's checkpointing cells get what ``cllora run`` sets before importing
    torch for a checkpointed run (page-aligned big CPU buffers:
    :func:`cllora.model.cpu_memory.align_large_buffers`, unless the user's environment sets
    ``THP_MEM_ALLOC_ENABLE`` itself); the others, baselines included, run in the user's
    environment as it is."""
    from cllora.model.cpu_memory import align_large_buffers, wants_aligned_buffers

    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1"}
    home = Path(cllora.__file__).resolve().parent.parent
    site = {Path(sysconfig.get_path(k)).resolve() for k in ("purelib", "platlib")}
    if home not in site:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(home), env.get("PYTHONPATH")) if p)
    p = parse_provider(provider)
    if p.is_cllora and wants_aligned_buffers(engine_config(p, BenchSpec())):
        align_large_buffers(env)
    return env


def run_cell_isolated(cell: Cell, budget_gb: float, timeout_s: float = 3600) -> dict:
    """Run a cell in a fresh Python process; status ok / oom / error / timeout."""
    from cllora.model.cpu_memory import rss_gib

    cmd = cell_command("cllora.bench.e2e", "--cell", json.dumps(asdict(cell)))
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cell_env(cell.provider)
    )
    start, peak_seen = time.time(), 0.0
    while proc.poll() is None:
        peak_seen = max(peak_seen, rss_gib(proc.pid))
        if peak_seen > budget_gb or time.time() - start > timeout_s:
            proc.kill()
            proc.wait()
            status = "oom" if peak_seen > budget_gb else "timeout"
            return {"status": status, "peak_mem": peak_seen}
        time.sleep(0.1)
    out, err = proc.communicate()
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        oom = "out of memory" in err.lower() or proc.returncode in (-9, 137)
        return {"status": "oom" if oom else "error", "error": error_line(err)}
    return {"status": "ok", **json.loads(lines[-1])}


def error_line(stderr: str) -> str:
    """The line of a failed child's stderr worth printing: its last non-empty line (the
    exception, ``ModuleNotFoundError: ...``), not the tail of the traceback's path."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "(no stderr)"


def failed_cells(path: Path) -> int:
    """How many cells or max-context searches of a result CSV failed with an error (not OOM)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    failed = [
        r
        for r in rows
        if r["metric"] == "error" or (r["metric"], r["value"]) == ("status", "error")
    ]
    return len({(r["provider"], r["workload"], r["context"]) for r in failed})


def device_name(spec: BenchSpec) -> str:
    """The GPU's name, or ``cpu: <model name>, <n> cores``."""
    if spec.device == "cuda":
        import torch

        return torch.cuda.get_device_name(0)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"cpu: {cpu}, {os.cpu_count()} cores"


def _rows(cell: Cell, res: dict, base: dict) -> list[dict]:
    row = {**base, "provider": cell.provider, "workload": cell.workload,
           "context": cell.context, "batch": cell.batch}  # fmt: skip
    out = [{**row, "metric": "status", "value": res["status"], "unit": ""}]
    if res["status"] != "ok":
        if res.get("error"):
            out.append({**row, "metric": "error", "value": res["error"], "unit": ""})
        return out
    for metric, unit in (("tokens_per_s", "tokens/s"), ("step_s", "s"),
                         ("tokens_per_step", "tokens"), ("load_s", "s")):  # fmt: skip
        out.append({**row, "metric": metric, "value": f"{res[metric]:.4g}", "unit": unit})
    out.append({**row, "metric": "peak_mem", "value": f"{res['peak_mem']:.4g}",
                "unit": res["peak_mem_unit"]})  # fmt: skip
    return out


def _find_max_context_cuda(provider: str, spec: BenchSpec, base: dict, log: Log) -> list[dict]:
    job = json.dumps({"provider": provider, "spec": asdict(spec)})
    cmd = cell_command("cllora.bench.e2e", "--max-context-cell", job)
    done = subprocess.run(cmd, capture_output=True, text=True, env=cell_env(provider))
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("[")]
    row = {**base, "provider": provider, "workload": "fixed", "batch": spec.batch}
    if done.returncode != 0 or not lines:
        log(f"  max-context {provider}: error: {error_line(done.stderr)}")
        return [{**row, "context": "", "metric": "error", "value": error_line(done.stderr),
                 "unit": ""}]  # fmt: skip
    rows, best = [], 0
    for p in json.loads(lines[-1]):
        log(f"  max-context probe {provider} {p['context']}: {p['status']} "
            f"{p['peak_mem']:.1f} GiB")  # fmt: skip
        probe = {**row, "workload": "max-context-probe", "context": p["context"]}
        rows.append({**probe, "metric": "status", "value": p["status"], "unit": ""})
        rows.append({**probe, "metric": "peak_mem", "value": f"{p['peak_mem']:.4g}",
                     "unit": "GiB (cuda max allocated)"})  # fmt: skip
        if "reserved_mem" in p:
            rows.append({**probe, "metric": "reserved_mem", "value": f"{p['reserved_mem']:.4g}",
                         "unit": "GiB (cuda max reserved)"})  # fmt: skip
            rows.append({**probe, "metric": "alloc_retries", "value": p["alloc_retries"],
                         "unit": "since the process started"})  # fmt: skip
        if p["status"] == "ok":
            best = max(best, p["context"])
    rows.append({**row, "context": best, "metric": "max_context", "value": best,
                 "unit": f"tokens under {spec.budget_gb:g} GiB"})  # fmt: skip
    return rows


def find_max_context(provider: str, spec: BenchSpec, base: dict, log: Log) -> list[dict]:
    """Binary search (multiples of ``max_context_step``) for the longest fixed context that fits
    the budget."""
    if spec.device == "cuda":
        return _find_max_context_cuda(provider, spec, base, log)
    unit = spec.max_context_step
    lo, hi, rows = 0, spec.max_context_hi // unit, []
    while lo < hi:
        mid = (lo + hi + 1) // 2
        probe = {**asdict(spec), "steps": spec.probe_steps}
        cell = Cell(provider, "fixed", mid * unit, spec.batch, probe)
        res = run_cell_isolated(cell, spec.budget_gb)
        log(f"  max-context probe {provider} {mid * unit}: {res['status']}")
        rows += [{**r, "workload": "max-context-probe"} for r in _rows(cell, res, base)]
        lo, hi = (mid, hi) if res["status"] == "ok" else (lo, mid - 1)
    rows.append({**base, "provider": provider, "workload": "fixed", "context": lo * unit,
                 "batch": spec.batch, "metric": "max_context", "value": lo * unit,
                 "unit": f"tokens under {spec.budget_gb:g} GiB"})  # fmt: skip
    return rows


def check_providers(names: list[str], device: str) -> None:
    """``ValueError`` (one line) for an unknown provider, a CUDA-only one off CUDA, or Liger
    without liger-kernel installed."""
    for name in names:
        p = parse_provider(name)
        if p.cuda_only and device != "cuda":
            raise ValueError(f"provider {name!r} {p.cuda_only}: --device cuda")
        if p.library == "liger" and importlib.util.find_spec("liger_kernel") is None:
            raise ValueError(f"provider {name!r} needs liger-kernel: pip install liger-kernel")


def run_benchmark(spec: BenchSpec, log: Log = print) -> Path:
    """Run every cell of ``spec`` (each in a fresh process); write the CSV and the PNG."""
    check_providers(spec.providers, spec.device)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    base = {"device": device_name(spec), "dtype": spec.dtype, "commit": commit(),
            "timestamp": stamp}  # fmt: skip
    rows: list[dict] = []
    out = Path(spec.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"e2e-{spec.device}-{stamp}.csv"
    for workload in spec.workloads:
        batch = spec.batch if workload == "fixed" else spec.real_batch
        for context in spec.contexts:
            for provider in spec.providers:  # side by side: providers interleaved per context
                cell = Cell(provider, workload, context, batch, asdict(spec))
                log(f"{workload:5s} {context:6d} {provider:14s} started (batch {batch})")
                res = run_cell_isolated(cell, spec.budget_gb)
                if res["status"] == "ok":
                    what = f"{res['tokens_per_s']:.1f} tok/s {res['peak_mem']:.2f} GiB"
                else:
                    what = error_line(res.get("error", ""))
                log(f"{workload:5s} {context:6d} {provider:14s} {res['status']:7s} {what}")
                rows += _rows(cell, res, base)
                write_csv(path, rows)
    if spec.find_max_context:
        for provider in spec.providers:
            rows += find_max_context(provider, spec, base, log)
            write_csv(path, rows)
    if spec.note:
        rows.append({**base, "provider": "", "workload": "", "context": "", "batch": "",
                     "metric": "note", "value": spec.note, "unit": ""})  # fmt: skip
    write_csv(path, rows)
    plot(path)
    return path


def write_csv(path: Path, rows: list[dict]) -> None:
    """The long-format result CSV (:data:`FIELDS`), rewritten whole after every cell."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)


_HELP = {
    "providers": f"comma-separated providers to compare, of: {', '.join(NAMES)}",
    "workloads": "comma-separated: fixed (random tokens, exactly the context) and/or real "
    "(MedQuAD records cut at the context)",
    "contexts": "comma-separated context lengths in tokens, one cell each",
    "batch": "sequences per step of the fixed workload",
    "real_batch": "samples per step of the real workload (one packed row for cllora)",
    "steps": "timed steps per cell, after one warm-up step (0: the warm-up step only)",
    "probe_steps": "timed steps of each --find-max-context probe on the CPU (0: one step)",
    "seed": "seed of the model's LoRA init and of the data",
    "threads": "torch CPU threads (0: torch's default)",
    "max_context_hi": "--find-max-context: the longest context tried",
    "max_context_step": "--find-max-context: the search's granularity, in tokens",
    "model": "model.name of the cells: the embedded model, tiny-*, a preset (cllora list "
    "models) or a model directory",
    "dtype": "base weights: fp32 or bf16",
    "device": "cpu or cuda",
    "data": "MedQuAD directory of the real workload",
    "out_dir": "where the CSV and its PNG are written",
    "note": "free text kept in the CSV's rows (default: none)",
    "budget_gb": "memory budget in GiB: a cell past it is recorded as status=oom (CPU: killed "
    "past this peak RSS; CUDA: the allocator capped)",
    "lora_dropout": "LoRA dropout (0: the fused LoRA kernel's path)",
    "find_max_context": "binary-search, per provider, the longest fixed context whose step fits "
    "--budget-gb",
}
_EXAMPLES = (
    "cllora bench --contexts 256,512,1024 --steps 2                  # CPU, small scale",
    "cllora bench --providers cllora,hf-peft --workloads fixed --contexts 1024,4096 \\\n"
    "      --dtype bf16 --device cuda --find-max-context --budget-gb 8",
)


def parse_args(
    argv: list[str] | None, ap: argparse.ArgumentParser | None = None, skip: tuple[str, ...] = ()
) -> argparse.Namespace:
    """Parse the benchmark's options (added to ``ap`` if given: :mod:`cllora.bench.profile`
    adds its own and ``skip``s those it does not read)."""
    from cllora.helptext import HelpFormatter, examples

    ap = ap or argparse.ArgumentParser(
        prog="cllora bench",
        description=__doc__.split("\n\n")[0],
        formatter_class=HelpFormatter,
        epilog=examples(*_EXAMPLES),
    )
    d = BenchSpec()

    def ints(s: str) -> list[int]:
        return [int(x) for x in s.split(",") if x]

    def strs(s: str) -> list[str]:
        return [x for x in s.split(",") if x]

    def option(name: str, **kwargs: object) -> None:
        if name not in skip:
            ap.add_argument("--" + name.replace("_", "-"), help=_HELP[name], **kwargs)

    ap.add_argument("--cell", help=argparse.SUPPRESS)
    ap.add_argument("--max-context-cell", help=argparse.SUPPRESS)
    option("providers", type=strs, default=d.providers)
    option("workloads", type=strs, default=d.workloads)
    option("contexts", type=ints, default=d.contexts)
    for name in ("batch", "real_batch", "steps", "probe_steps", "seed", "threads",
                 "max_context_hi", "max_context_step"):  # fmt: skip
        option(name, type=int, default=getattr(d, name))
    for name in ("model", "dtype", "device", "data", "out_dir", "note"):
        option(name, default=getattr(d, name))
    option("budget_gb", type=float, default=d.budget_gb)
    option("lora_dropout", type=float, default=d.lora_dropout)
    option("find_max_context", action="store_true")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """``cllora bench`` (and, with the hidden ``--cell`` / ``--max-context-cell``, one cell of
    it in this process, as :func:`run_cell_isolated` starts it)."""
    args = parse_args(argv)
    if args.cell:
        print(json.dumps(run_cell(Cell(**json.loads(args.cell)))), flush=True)
        return 0
    if args.max_context_cell:
        job = json.loads(args.max_context_cell)
        print(json.dumps(max_context_cuda(job["provider"], BenchSpec(**job["spec"]))), flush=True)
        return 0
    internal = ("cell", "max_context_cell")
    spec = BenchSpec(**{k: v for k, v in vars(args).items() if k not in internal})
    path = run_benchmark(spec)
    print(f"results: {path} and {path.with_suffix('.png')}")
    return exit_status(path)


def exit_status(path: Path) -> int:
    """0, or 1 when a cell failed with an error (an OOM cell is a result, not a failure): the
    CSV keeps every measured cell either way; the error rows hold each failure's message."""
    failed = failed_cells(path)
    if failed:
        print(f"{failed} cell(s) failed with an error: rows metric=error / status=error in {path}",
              file=sys.stderr)  # fmt: skip
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
