"""End-to-end training-step benchmark per context length: cllora vs transformers + PEFT.

Usage::

    python benchmarks/bench_e2e.py --contexts 256,512,1024 --steps 2          # CPU, small scale
    python benchmarks/bench_e2e.py --providers cllora,hf-peft --workloads fixed \\
        --contexts 1024,4096 --model smollm2-135m --dtype bf16 --find-max-context --budget-gb 8

    from benchmarks.bench_e2e import BenchSpec, run_benchmark    # what `cllora bench` calls
    csv_path = run_benchmark(BenchSpec(contexts=[256, 512]))

One training step = forward + backward + AdamW step over the LoRA parameters (r=16, alpha=32,
``--lora-dropout`` (default 0, as Unsloth's default: the fused LoRA kernel has no dropout, and
cllora falls back to the unfused path with dropout > 0; CSVs before 2026-11-26 used 0.05), every
linear of the decoder), the same model, LoRA config, data and seed for every provider. Every
cell (provider x workload x context) runs in a **fresh process**, so the peak
memory is that cell's own: CUDA max allocated on GPU, peak RSS (``ru_maxrss``, model included) on
CPU. The parent polls the child's RSS and kills it past ``--budget-gb``: an out-of-memory cell is
recorded as ``status=oom``, never a crash.

Providers (``PROVIDERS``):

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
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PROVIDERS = ("cllora", "cllora-nockpt", "cllora-keepattn", "cllora-lowmem", "cllora-offload",
             "cllora-4bit", "cllora-4bit-nockpt", "cllora-4bit-keepattn", "cllora-4bit-offload",
             "hf-peft", "hf-peft-4bit", "liger", "liger-4bit")  # fmt: skip
LIGER = ("liger", "liger-4bit")
CUDA_ONLY = (*LIGER, "cllora-offload", "cllora-4bit-offload")
WORKLOADS = ("fixed", "real")
FIELDS = ("provider", "workload", "context", "batch", "metric", "value", "unit", "device",
          "dtype", "commit", "timestamp")  # fmt: skip


@dataclass
class BenchSpec:
    providers: list[str] = field(default_factory=lambda: ["cllora", "hf-peft", "hf-peft-4bit"])
    workloads: list[str] = field(default_factory=lambda: ["fixed", "real"])
    contexts: list[int] = field(default_factory=lambda: [256, 512, 1024])
    batch: int = 1  # sequences per step, fixed workload
    real_batch: int = 4  # samples per step, real workload
    model: str = "smollm2-135m"
    dtype: str = "fp32"
    device: str = "cpu"
    steps: int = 2  # timed steps per cell (after one warm-up step); 0: the warm-up step only
    probe_steps: int = 1  # the same for each --find-max-context probe on CPU
    budget_gb: float = 20.0
    find_max_context: bool = False
    max_context_hi: int = 16384
    max_context_step: int = 256  # the search's granularity (tokens)
    data: str = str(ROOT.parent / "shared" / "data" / "medquad")
    seed: int = 0
    lora_dropout: float = 0.0
    threads: int = 0
    out_dir: str = str(RESULTS)
    note: str = ""


@dataclass
class Cell:
    provider: str
    workload: str
    context: int
    batch: int
    spec: dict


# ---------------------------------------------------------------- one cell, in a child process


def _engine_config(provider: str, spec: BenchSpec):
    """The cllora Config of a ``cllora*`` provider: what ``cllora run`` would build."""
    from cllora.config import Config

    cfg = Config()
    cfg.seed = spec.seed
    cfg.model.name, cfg.model.dtype, cfg.model.device = spec.model, spec.dtype, spec.device
    cfg.model.attn = "varlen"
    cfg.model.quant = "nf4" if "-4bit" in provider else "none"
    cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout = 16, 32.0, spec.lora_dropout
    cfg.train.packing = True
    cfg.train.checkpointing = not provider.endswith("-nockpt")
    cfg.train.release_memory = provider == "cllora-lowmem"
    cfg.train.checkpoint_offload = provider.endswith("-offload")
    if provider.endswith("-keepattn"):
        cfg.train.checkpoint_policy = "keep_attention"
    return cfg


def _build(provider: str, spec: BenchSpec):
    """(model, params) for a provider: the same base weights and LoRA config everywhere."""
    import torch

    from cllora.config import ModelConfig
    from cllora.model.load import load_model, resolve_dtype
    from cllora.model.presets import PRESETS

    dtype = resolve_dtype(spec.dtype, spec.device)
    if provider.startswith("cllora"):
        from cllora.model.lora import lora_parameters
        from cllora.model.setup import build_model

        model, _, _ = build_model(_engine_config(provider, spec))
        return model, lora_parameters(model)
    from peft import LoraConfig, get_peft_model

    four_bit = provider.endswith("-4bit")
    if four_bit and spec.model not in PRESETS:
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        from cllora.model.load import resolve_path

        model = AutoModelForCausalLM.from_pretrained(
            str(resolve_path(spec.model)), dtype=dtype, attn_implementation="sdpa",
            device_map=spec.device, local_files_only=True,
            quantization_config=BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                bnb_4bit_use_double_quant=True,
            ),
        )  # fmt: skip
    else:
        model, _ = load_model(
            ModelConfig(name=spec.model, dtype=spec.dtype), spec.seed, spec.device
        )
        if four_bit:  # a preset has no checkpoint to load through BnB config:
            # the same bitsandbytes Linear4bit layers transformers would make (LM head dense)
            from cllora.model.quant import quantize_base

            quantize_base(model, "nf4", double_quant=True, compute_dtype=dtype)
    if provider in LIGER:
        from liger_kernel.transformers.monkey_patch import _apply_liger_kernel_to_instance

        _apply_liger_kernel_to_instance(model=model)
    torch.manual_seed(spec.seed)
    lcfg = LoraConfig(
        r=16, lora_alpha=32, lora_dropout=spec.lora_dropout, target_modules="all-linear"
    )
    model = get_peft_model(model, lcfg)
    return model, [p for p in model.parameters() if p.requires_grad]


def _batches(cell: Cell, spec: BenchSpec, count: int, vocab: int = 49152) -> list[list]:
    """``count`` steps' worth of Samples (the same for every provider: seeded by spec.seed)."""
    import torch

    from cllora.data.formatting import Sample

    g = torch.Generator().manual_seed(spec.seed)
    if cell.workload == "fixed":
        out = []
        for _ in range(count):
            shape = (cell.batch, cell.context)
            rows = torch.randint(3, min(vocab, 49000), shape, generator=g).tolist()
            out.append([Sample(r, list(r)) for r in rows])
        return out
    from cllora.data.formatting import build_samples
    from cllora.data.readers import read_records
    from cllora.model.load import load_tokenizer

    tok = load_tokenizer(spec.model)
    records = read_records(spec.data)
    order = torch.randperm(len(records), generator=g)[: count * cell.batch * 2].tolist()
    samples, _ = build_samples([records[i] for i in order], tok, max_length=cell.context)
    samples = [s for s in samples if s.num_target_tokens > 0]
    return [samples[i * cell.batch : (i + 1) * cell.batch] for i in range(count)]


def _step_fn(provider: str, model, samples: list, device: str):
    """A closure running forward + backward for one step; its batch is already on ``device``
    (every provider's collation and host-to-device copy stay outside the timed region)."""
    if provider.startswith("cllora"):
        from cllora.model.loss import batch_loss_sum
        from cllora.model.packing import collate_packed, collate_packed_rows

        same = all(len(s.input_ids) == len(samples[0].input_ids) for s in samples)
        # fixed: one row per sequence; real: the step's samples packed into one row
        batch = collate_packed_rows([[s] for s in samples], 0) if same else collate_packed(samples)
        batch = {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}

        def run() -> None:
            loss, n = batch_loss_sum(model, batch, loss="auto")
            (loss / max(n, 1)).backward()

        return run
    from cllora.model.batching import collate

    b = {k: v.to(device) for k, v in collate(samples, pad_id=0).items()}

    def run() -> None:
        model(**b).loss.backward()

    return run


def run_cell(cell: Cell) -> dict:
    """Run one cell in this process; returns its measurements (see the module docstring)."""
    import resource

    import torch

    spec = BenchSpec(**cell.spec)
    if spec.threads:
        torch.set_num_threads(spec.threads)
    t0 = time.perf_counter()
    model, params = _build(cell.provider, spec)
    model.train()
    opt = torch.optim.AdamW(params, lr=1e-4)
    steps = _batches(cell, spec, spec.steps + 1, model.config.vocab_size)
    load_s = time.perf_counter() - t0
    if spec.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, tokens = [], 0
    for i, samples in enumerate(steps):
        run = _step_fn(cell.provider, model, samples, spec.device)
        start = time.perf_counter()
        run()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if spec.device == "cuda":
            torch.cuda.synchronize()
        if i > 0 or spec.steps == 0:  # step 0 is the warm-up (timed only when it is alone)
            times.append(time.perf_counter() - start)
            tokens += sum(len(s.input_ids) for s in samples)
    if spec.device == "cuda":
        peak, unit = torch.cuda.max_memory_allocated() / 2**30, "GiB (cuda max allocated)"
    else:
        peak, unit = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "GiB (peak RSS)"
    return {
        "tokens_per_s": tokens / sum(times),
        "step_s": sum(times) / len(times),
        "tokens_per_step": tokens / len(times),
        "peak_mem": peak,
        "peak_mem_unit": unit,
        "load_s": load_s,
    }


# ---------------------------------------------------------------- the parent: cells, CSV, plot


def cell_env(provider: str) -> dict[str, str]:
    """The environment of a cell's process. cllora's checkpointing cells get what ``cllora
    run`` sets before importing torch for a checkpointed run (page-aligned big CPU buffers:
    :func:`cllora.model.cpu_memory.align_large_buffers`, unless the user's environment sets
    ``THP_MEM_ALLOC_ENABLE`` itself); the others, baselines included, run in the user's
    environment as it is."""
    from cllora.model.cpu_memory import align_large_buffers, wants_aligned_buffers

    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1"}
    if provider.startswith("cllora") and wants_aligned_buffers(
        _engine_config(provider, BenchSpec())
    ):
        align_large_buffers(env)
    return env


def run_cell_isolated(cell: Cell, budget_gb: float, timeout_s: float = 3600) -> dict:
    """Run a cell in a fresh Python process; status ok / oom / error / timeout."""
    from cllora.model.cpu_memory import rss_gib

    cmd = [sys.executable, str(Path(__file__).resolve()), "--cell", json.dumps(asdict(cell))]
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


def _commit() -> str:
    """Short commit of the checkout (``CLLORA_COMMIT`` where the tree travels without .git)."""
    if os.environ.get("CLLORA_COMMIT"):
        return os.environ["CLLORA_COMMIT"]
    try:
        return subprocess.check_output(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True
        ).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _device_name(spec: BenchSpec) -> str:
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


def max_context_cuda(provider: str, spec: BenchSpec) -> list[dict]:
    """In this process: build once, cap the CUDA allocator at the budget, binary-search the
    longest fixed context (multiple of max_context_step) whose training step fits. One dict per
    probe."""
    import torch

    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, spec.budget_gb * 2**30 / total))
    model, params = _build(provider, spec)
    model.train()
    opt = torch.optim.AdamW(params, lr=1e-4)
    unit = spec.max_context_step
    lo, hi, probes = 0, spec.max_context_hi // unit, []
    # the caching allocator's segments after the build, at each failure and after each probe:
    # what `python -m cllora.plan --replay-allocator --compare-layouts FILE` sets the replay
    # against (docs/plan.md)
    layouts = {"provider": provider, "torch": torch.__version__, "build": _layout(), "probes": [],
               "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")}  # fmt: skip
    while lo < hi:
        mid = (lo + hi + 1) // 2
        cell = Cell(provider, "fixed", mid * unit, spec.batch, asdict(spec))
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        try:
            (samples,) = _batches(cell, spec, 1, model.config.vocab_size)
            _step_fn(provider, model, samples, spec.device)()
            opt.step()
            torch.cuda.synchronize()
            status = "ok"
            at_failure = None
        except torch.OutOfMemoryError:
            status, at_failure = "oom", _layout()  # the failed step's tensors still held
        opt.zero_grad(set_to_none=True)
        layouts["probes"].append({"context": mid * unit, "status": status, "after": _layout(),
                                  "at_failure": at_failure})  # fmt: skip
        peak = torch.cuda.max_memory_allocated() / 2**30
        # what the cap bounds, and the allocator's frees-and-retries at it: the quantities
        # cllora.plan.allocator predicts (docs/plan.md: why the 4-bit search misses)
        stats = torch.cuda.memory_stats()
        probes.append({"context": mid * unit, "status": status, "peak_mem": peak,
                       "reserved_mem": torch.cuda.max_memory_reserved() / 2**30,
                       "alloc_retries": stats.get("num_alloc_retries", 0),
                       "step_s": time.perf_counter() - start})  # fmt: skip
        print(f"  max-context probe {provider} {mid * unit}: {status} {peak:.1f} GiB", flush=True)
        lo, hi = (mid, hi) if status == "ok" else (lo, mid - 1)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    path = Path(spec.out_dir) / f"alloc-layout-{provider}-{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(layouts))
    print(f"  allocator layouts: {path}", flush=True)
    return probes


def _layout() -> list[dict]:
    import torch

    from cllora.plan.allocator import compact_snapshot

    return compact_snapshot(torch.cuda.memory_snapshot())


def _find_max_context_cuda(provider: str, spec: BenchSpec, base: dict, log) -> list[dict]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--max-context-cell",
           json.dumps({"provider": provider, "spec": asdict(spec)})]  # fmt: skip
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


def find_max_context(provider: str, spec: BenchSpec, base: dict, log) -> list[dict]:
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


def run_benchmark(spec: BenchSpec, log=print) -> Path:
    """Run every cell of ``spec`` (each in a fresh process); write the CSV and the PNG."""
    for p in spec.providers:
        if p not in PROVIDERS:
            raise ValueError(f"unknown provider {p!r}; use {PROVIDERS}")
        if p in CUDA_ONLY and spec.device != "cuda":
            why = "runs Liger-Kernel's Triton kernels" if p in LIGER else "offloads to host memory"
            raise ValueError(f"provider {p!r} {why}: --device cuda")
        if p in LIGER and importlib.util.find_spec("liger_kernel") is None:
            raise ValueError(f"provider {p!r} needs liger-kernel: pip install liger-kernel")
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    base = {"device": _device_name(spec), "dtype": spec.dtype, "commit": _commit(),
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
                _write_csv(path, rows)
    if spec.find_max_context:
        for provider in spec.providers:
            rows += find_max_context(provider, spec, base, log)
            _write_csv(path, rows)
    if spec.note:
        rows.append({**base, "provider": "", "workload": "", "context": "", "batch": "",
                     "metric": "note", "value": spec.note, "unit": ""})  # fmt: skip
    _write_csv(path, rows)
    plot(path)
    return path


def _write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)


def plot(csv_path: Path) -> Path:
    """The CSV's :func:`figure` as a PNG next to it."""
    import matplotlib.pyplot as plt

    with open(csv_path) as f:
        fig = figure(list(csv.DictReader(f)))
    png = csv_path.with_suffix(".png")
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


def figure(rows: list[dict]):
    """Tokens/s and peak memory against context length (ticks at the contexts measured, in
    tokens), one line per provider, one column per workload. A cell that did not finish is a
    cross at the foot of each panel, marked ``OOM``, ``error`` or ``timeout``; every failed
    cell's one-line error is printed under the panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["workload"] in WORKLOADS and r["context"]]
    workloads = [w for w in WORKLOADS if any(r["workload"] == w for r in rows)]
    fails = _failures(rows)
    fig, axes = plt.subplots(2, max(len(workloads), 1), figsize=(6 * max(len(workloads), 1), 8),
                             squeeze=False)  # fmt: skip
    for j, w in enumerate(workloads):
        contexts = sorted({int(r["context"]) for r in rows if r["workload"] == w})
        for i, (metric, label) in enumerate((("tokens_per_s", "tokens/s"),
                                             ("peak_mem", "peak memory (GiB)"))):  # fmt: skip
            ax = axes[i][j]
            for p in dict.fromkeys(r["provider"] for r in rows):
                pts = sorted(
                    (int(r["context"]), float(r["value"]))
                    for r in rows
                    if (r["workload"], r["provider"], r["metric"]) == (w, p, metric)
                )
                if pts:
                    ax.plot(*zip(*pts, strict=True), marker="o", label=p)
            _mark_failures(ax, [f for f in fails if f["workload"] == w])
            ax.set_xscale("log", base=2)
            ax.set_xticks(contexts, [str(c) for c in contexts])
            ax.minorticks_off()
            ax.set_xlabel("context length (tokens)")
            ax.set_ylabel(label)
            ax.set_title(f"{w}: {label}")
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend()
    notes = [f"{f['provider']} {f['workload']} {f['context']}: {f['status']}"
             + (f": {f['error']}" if f["error"] else "") for f in fails]  # fmt: skip
    if notes:
        fig.text(0.01, 0.005, "\n".join(n[:160] for n in notes), fontsize=7, va="bottom")
    fig.tight_layout(rect=(0, 0.03 * len(notes), 1, 1))
    return fig


def _failures(rows: list[dict]) -> list[dict]:
    """The cells whose status is not ok: provider, workload, context, status, error (or "")."""
    key = lambda r: (r["provider"], r["workload"], r["context"])  # noqa: E731
    errors = {key(r): r["value"] for r in rows if r["metric"] == "error"}
    return [
        {"provider": r["provider"], "workload": r["workload"], "context": int(r["context"]),
         "status": r["value"], "error": errors.get(key(r), "")}
        for r in rows
        if r["metric"] == "status" and r["value"] != "ok"
    ]  # fmt: skip


def _mark_failures(ax, fails: list[dict]) -> None:
    """A cross at each failed cell's context, at the foot of the panel, with the providers that
    failed there and how (one line each)."""
    at: dict[int, list[str]] = {}
    for f in fails:
        status = "OOM" if f["status"] == "oom" else f["status"]
        at.setdefault(f["context"], []).append(f"{f['provider']}: {status}")
    for context, lines in at.items():
        ax.plot([context], [0.04], "x", color="tab:red", ms=9, transform=ax.get_xaxis_transform())
        ax.annotate("\n".join(lines), (context, 0.08), xycoords=ax.get_xaxis_transform(),
                    fontsize=7, color="tab:red", ha="center", va="bottom")  # fmt: skip


_HELP = {
    "providers": f"comma-separated providers to compare, of: {', '.join(PROVIDERS)}",
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


def _parse(
    argv: list[str] | None, ap: argparse.ArgumentParser | None = None, skip: tuple[str, ...] = ()
) -> argparse.Namespace:
    """Parse the benchmark's options (added to ``ap`` if given: ``profile_e2e`` adds its own and
    ``skip``s those it does not read)."""
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
    args = _parse(argv)
    if args.cell:
        sys.path.insert(0, str(ROOT))
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
    return _exit_status(path)


def _exit_status(path: Path) -> int:
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
