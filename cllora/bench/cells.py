"""One benchmark cell, run in this process: build a provider's model, time its training steps.

Usage::

    from cllora.bench.cells import BenchSpec, Cell, run_cell

    spec = BenchSpec(model="tiny-llama", steps=1)
    run_cell(Cell("cllora", "fixed", 64, 1, asdict(spec)))   # tokens_per_s, step_s, peak_mem...

:mod:`cllora.bench.e2e` runs each cell in a fresh process (``python -m cllora.bench.e2e
--cell JSON``) so that its peak memory is its own; :func:`max_context_cuda` is the CUDA
max-context search, one process per provider. What a provider builds and how its step runs:
:mod:`cllora.bench.e2e`'s docstring, :mod:`cllora.bench.providers`, :mod:`cllora.bench.step`.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cllora.bench.providers import Provider, parse_provider
from cllora.bench.step import collate_step, training_step

ROOT = Path(__file__).resolve().parents[2]  # the checkout, when cllora runs from one
# the checkout's results directory; an installed cllora's is under the working directory
RESULTS = (ROOT if (ROOT / "pyproject.toml").is_file() else Path()) / "benchmarks" / "results"


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


def engine_config(provider: Provider, spec: BenchSpec) -> Any:
    """The cllora Config of a ``cllora*`` provider: what ``cllora run`` would build."""
    from cllora.config import Config

    cfg = Config()
    cfg.seed = spec.seed
    cfg.model.name, cfg.model.dtype, cfg.model.device = spec.model, spec.dtype, spec.device
    cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout = 16, 32.0, spec.lora_dropout
    return provider.engine_options(cfg)


def build_provider(provider: Provider, spec: BenchSpec) -> tuple[Any, list]:
    """(model, trainable params) for a provider: the same base weights and LoRA config
    everywhere."""
    if provider.is_cllora:
        from cllora.model.lora import lora_parameters
        from cllora.model.setup import build_model

        model, _, _ = build_model(engine_config(provider, spec))
        return model, lora_parameters(model)
    return _build_peft(provider, spec)


def _peft_base(provider: Provider, spec: BenchSpec) -> Any:
    """The transformers model a ``hf-peft*`` / ``liger*`` provider wraps (4-bit: bitsandbytes
    ``Linear4bit`` layers, loaded through ``BitsAndBytesConfig`` or, for a preset, made as
    transformers would make them: the LM head dense)."""
    from cllora.config import ModelConfig
    from cllora.model.load import load_model, resolve_dtype, resolve_path
    from cllora.model.presets import PRESETS

    dtype = resolve_dtype(spec.dtype, spec.device)
    four_bit = provider.quant != "none"
    if four_bit and spec.model not in PRESETS:
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        return AutoModelForCausalLM.from_pretrained(
            str(resolve_path(spec.model)), dtype=dtype, attn_implementation="sdpa",
            device_map=spec.device, local_files_only=True,
            quantization_config=BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type=provider.quant,
                bnb_4bit_compute_dtype=dtype, bnb_4bit_use_double_quant=True,
            ),
        )  # fmt: skip
    model, _ = load_model(ModelConfig(name=spec.model, dtype=spec.dtype), spec.seed, spec.device)
    if four_bit:
        from cllora.model.quant import quantize_base

        quantize_base(model, provider.quant, double_quant=True, compute_dtype=dtype)
    return model


def _build_peft(provider: Provider, spec: BenchSpec) -> tuple[Any, list]:
    import torch
    from peft import LoraConfig, get_peft_model

    model = _peft_base(provider, spec)
    if provider.library == "liger":
        from liger_kernel.transformers.monkey_patch import _apply_liger_kernel_to_instance

        _apply_liger_kernel_to_instance(model=model)
    torch.manual_seed(spec.seed)
    lcfg = LoraConfig(
        r=16, lora_alpha=32, lora_dropout=spec.lora_dropout, target_modules="all-linear"
    )
    model = get_peft_model(model, lcfg)
    return model, [p for p in model.parameters() if p.requires_grad]


def batches(cell: Cell, spec: BenchSpec, count: int, vocab: int = 49152) -> list[list]:
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


def device_step(provider: Provider, model: Any, samples: list, device: str) -> Any:
    """:func:`cllora.bench.step.training_step` on ``samples`` collated and copied to
    ``device`` (outside the closure: every provider's collation and copy stay untimed)."""
    batch = collate_step(provider, samples)
    batch = {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
    return training_step(provider, model, batch)


def run_cell(cell: Cell) -> dict:
    """Run one cell in this process; returns its measurements (see :mod:`cllora.bench.e2e`)."""
    import torch

    spec = BenchSpec(**cell.spec)
    provider = parse_provider(cell.provider)
    if spec.threads:
        torch.set_num_threads(spec.threads)
    t0 = time.perf_counter()
    model, params = build_provider(provider, spec)
    model.train()
    opt = torch.optim.AdamW(params, lr=1e-4)
    steps = batches(cell, spec, spec.steps + 1, model.config.vocab_size)
    load_s = time.perf_counter() - t0
    if spec.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, tokens = [], 0
    for i, samples in enumerate(steps):
        run = device_step(provider, model, samples, spec.device)
        start = time.perf_counter()
        run()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if spec.device == "cuda":
            torch.cuda.synchronize()
        if i > 0 or spec.steps == 0:  # step 0 is the warm-up (timed only when it is alone)
            times.append(time.perf_counter() - start)
            tokens += sum(len(s.input_ids) for s in samples)
    peak, unit = _peak_memory(spec.device)
    return {
        "tokens_per_s": tokens / sum(times),
        "step_s": sum(times) / len(times),
        "tokens_per_step": tokens / len(times),
        "peak_mem": peak,
        "peak_mem_unit": unit,
        "load_s": load_s,
    }


def _peak_memory(device: str) -> tuple[float, str]:
    """This process's peak memory in GiB and what it is: CUDA max allocated, or peak RSS."""
    import resource

    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30, "GiB (cuda max allocated)"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "GiB (peak RSS)"


def max_context_cuda(name: str, spec: BenchSpec) -> list[dict]:
    """In this process: build once, cap the CUDA allocator at the budget, binary-search the
    longest fixed context (multiple of max_context_step) whose training step fits. One dict per
    probe; the allocator's layouts go to ``alloc-layout-<provider>-<stamp>.json``."""
    import torch

    provider = parse_provider(name)
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, spec.budget_gb * 2**30 / total))
    model, params = build_provider(provider, spec)
    model.train()
    opt = torch.optim.AdamW(params, lr=1e-4)
    unit = spec.max_context_step
    lo, hi, probes = 0, spec.max_context_hi // unit, []
    # the caching allocator's segments after the build, at each failure and after each probe:
    # what `python -m cllora.plan --replay-allocator --compare-layouts FILE` sets the replay
    # against (docs/plan.md)
    layouts = {"provider": name, "torch": torch.__version__, "build": _layout(), "probes": [],
               "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")}  # fmt: skip
    while lo < hi:
        mid = (lo + hi + 1) // 2
        probe = _cuda_probe(provider, model, opt, Cell(name, "fixed", mid * unit, spec.batch,
                                                       asdict(spec)), spec)  # fmt: skip
        layouts["probes"].append(probe.pop("layouts"))
        probes.append(probe)
        print(f"  max-context probe {name} {mid * unit}: {probe['status']} "
              f"{probe['peak_mem']:.1f} GiB", flush=True)  # fmt: skip
        lo, hi = (mid, hi) if probe["status"] == "ok" else (lo, mid - 1)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    path = Path(spec.out_dir) / f"alloc-layout-{name}-{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(layouts))
    print(f"  allocator layouts: {path}", flush=True)
    return probes


def _cuda_probe(provider: Provider, model: Any, opt: Any, cell: Cell, spec: BenchSpec) -> dict:
    """One step of ``cell`` under the capped allocator: status (ok / oom), peaks, retries, and
    the allocator's layouts after it (and at the failure)."""
    import torch

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    try:
        (samples,) = batches(cell, spec, 1, model.config.vocab_size)
        device_step(provider, model, samples, spec.device)()
        opt.step()
        torch.cuda.synchronize()
        status, at_failure = "ok", None
    except torch.OutOfMemoryError:
        status, at_failure = "oom", _layout()  # the failed step's tensors still held
    opt.zero_grad(set_to_none=True)
    layouts = {"context": cell.context, "status": status, "after": _layout(),
               "at_failure": at_failure}  # fmt: skip
    # what the cap bounds, and the allocator's frees-and-retries at it: the quantities
    # cllora.plan.allocator predicts (docs/plan.md: why the 4-bit search misses)
    stats = torch.cuda.memory_stats()
    return {"context": cell.context, "status": status,
            "peak_mem": torch.cuda.max_memory_allocated() / 2**30,
            "reserved_mem": torch.cuda.max_memory_reserved() / 2**30,
            "alloc_retries": stats.get("num_alloc_retries", 0),
            "step_s": time.perf_counter() - start, "layouts": layouts}  # fmt: skip


def _layout() -> list[dict]:
    import torch

    from cllora.plan.allocator import compact_snapshot

    return compact_snapshot(torch.cuda.memory_snapshot())
