"""The planner: the real training step on fake tensors against real measurements.

- on CPU: the planned peak of a tiny model's step equals torch's memory profiler on the same
  step run for real, and its blocks are allocated and freed in the real step's order;
- on the H200 rows committed in ``benchmarks/results/e2e-cuda-*.csv``: the planned peak within
  +-10% of every 4096-token row, the roofline bound above every measured speed, the max-context
  search where it holds (see ``benchmarks/results/plan-h200.md`` for the row that misses, why);
- the depth extrapolation equals tracing every layer; bad input exits 2 with one line;
- the bytes and launches outside GEMMs and attention of the 8B 4-bit step stay under the
  committed ceiling (a change that grows them fails here).
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from cllora.plan.cli import main
from cllora.plan.gpus import gpu, roofline_s
from cllora.plan.report import find_max_context
from cllora.plan.step import PlanSpec, plan_step

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
H200_E2E = "e2e-cuda-20261126T012719Z.csv"  # commit 44d1b83, 4096 tokens
H200_MAXCTX = {"cllora-4bit": "e2e-cuda-20261126T012926Z.csv",
               "hf-peft-4bit": "e2e-cuda-20261126T012307Z.csv"}  # fmt: skip
# the H200 session ran torch 2.11 (varlen_attn without GQA: K/V repeated) and LoRALinear as of
# 44d1b83 (the fp32 LoRA input); the planner runs those code paths for the comparison
AS_MEASURED = {"lora_path": "legacy", "gqa": "repeat"}
# bytes / launches outside GEMMs and attention of cllora-4bit, llama-3.1-8b, 4096 tokens, the
# current code (4-bit LoRA through QuantLoRAFunction) on torch >= 2.12
# (benchmarks/results/plan-h200.md; 133.2 GB / 4354 before it); 2% slack for rounding
OTHER_CEILING = {"bytes": 102.6e9 * 1.02, "launches": 4130 * 1.02}


def _rows(name: str) -> list[dict]:
    with open(RESULTS / name, newline="") as f:
        return list(csv.DictReader(f))


def _measured(name: str, metric: str) -> dict[str, float]:
    return {r["provider"]: float(r["value"]) for r in _rows(name)
            if r["metric"] == metric and r["workload"] == "fixed"}  # fmt: skip


# ---------------------------------------------------------------- CPU: planned = measured


def _profiled_real_cpu_step(spec: PlanSpec, **profile_kwargs):
    """The torch profiler (memory on) of the step run for real on CPU, as the planner runs it:
    the provider's model built, AdamW warmed, one forward, backward, step and ``zero_grad``."""
    from torch.profiler import ProfilerActivity, profile

    from cllora.bench.step import training_step
    from cllora.plan import step as st

    provider = st.planned_provider(spec.provider)
    build = st._build_cllora if provider.is_cllora else st._build_peft
    model, params = build(spec, st.hf_config(spec.model))
    model.train()
    opt = torch.optim.AdamW(params, lr=1e-4, foreach=False)
    st._warm_optimizer(opt, params)
    raw = st.raw_batch(spec, model.config.vocab_size)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, **profile_kwargs) as prof:
        training_step(provider, model, raw, loss=spec.loss)()  # what `cllora bench` times
        opt.step()
        opt.zero_grad(set_to_none=True)
    return prof


def _real_cpu_step_peak(spec: PlanSpec) -> int:
    """Bytes allocated above the step's start at its peak, run for real on CPU and read off
    torch's memory profiler (every CPU allocation and free of the step, in order)."""
    from torch.profiler._memory_profiler import Action

    prof = _profiled_real_cpu_step(spec, record_shapes=True, with_stack=True)
    current = peak = 0
    for _, action, _, size in prof._memory_profile().timeline:
        current += size if action == Action.CREATE else -size if action == Action.DESTROY else 0
        peak = max(peak, current)
    return peak


@pytest.mark.parametrize("provider", ["cllora", "hf-peft"])
def test_planned_peak_equals_a_real_cpu_step(provider):
    spec = PlanSpec(model="tiny-llama", provider=provider, context=128, dtype="fp32",
                    target="cpu")  # fmt: skip
    planned = plan_step(spec)
    real = _real_cpu_step_peak(spec)
    assert planned.peak_bytes - planned.start_bytes == pytest.approx(real, rel=0.02)


def _sizes_in_order(events: list[tuple[int, int]], smallest: int) -> list[str]:
    """``a<bytes>`` per allocation and ``f<bytes>`` per free of one, for blocks of at least
    ``smallest`` bytes (the scalars and index tensors are not what places the big blocks)."""
    sizes, out = {}, []
    for serial, nbytes in events:
        if nbytes:
            sizes[serial] = nbytes
            out += [f"a{nbytes}"] if nbytes >= smallest else []
        elif serial in sizes and (n := sizes.pop(serial)) >= smallest:
            out.append(f"f{n}")
    return out


def _real_cpu_step_events(spec: PlanSpec) -> list[tuple[int, int]]:
    """Every CPU allocation and free of the step run for real, in order, as ``(serial, bytes)``
    and ``(serial, 0)`` (the profiler's allocator events)."""
    from torch._C._profiler import _EventType

    prof = _profiled_real_cpu_step(spec)

    def walk(nodes):
        for node in nodes:
            yield node
            yield from walk(node.children)

    tree = prof.profiler.kineto_results.experimental_event_tree()
    allocations = sorted((e for e in walk(tree) if e.tag == _EventType.Allocation),
                         key=lambda e: e.start_time_ns)  # fmt: skip
    events, live = [], {}
    for e in allocations:
        f = e.extra_fields
        if f.alloc_size > 0:
            live[f.ptr] = len(events) + 1
            events.append((live[f.ptr], f.alloc_size))
        elif f.ptr in live:
            events.append((live.pop(f.ptr), 0))
    return events


def test_planned_allocations_follow_a_real_cpu_step_in_order():
    """What the allocator model replays: the fake step allocates and frees the blocks a real
    CPU step does, in the same order (the real one also has CPU kernels' own scratch). Autograd
    sums two gradients of one input in place on real tensors and out of place on tensor
    subclasses, fake ones included; the tracker makes up for it (``_in_place_on_real``),
    without which the fake step had one extra block per summed gradient here."""
    import difflib

    from cllora.plan import step as st

    spec = PlanSpec(model="tiny-llama", provider="cllora", context=256, dtype="fp32",
                    target="cpu", extrapolate=False)  # fmt: skip
    trace = st._trace(spec, st.hf_config(spec.model), st.raw_batch(spec, 49152))
    smallest = 256 * 64 * 4  # one (tokens x hidden) fp32 activation
    fake = _sizes_in_order(trace.events[trace.step_start :], smallest)
    real = _sizes_in_order(_real_cpu_step_events(spec), smallest)
    match = difflib.SequenceMatcher(None, fake, real, autojunk=False)
    fake_only = [fake[i] for op, i0, i1, _, _ in match.get_opcodes() if op in ("delete", "replace")
                 for i in range(i0, i1)]  # fmt: skip
    assert len(fake) > 100
    assert len(fake_only) <= 2, fake_only  # the order of the last frees of the step may differ


# ---------------------------------------------------------------- H200 rows


@pytest.mark.parametrize("providers", [("cllora-4bit", "cllora-4bit-nockpt", "cllora"),
                                       ("hf-peft-4bit", "hf-peft")])  # fmt: skip
def test_h200_peak_memory_and_speed_bound(providers):
    peak = _measured(H200_E2E, "peak_mem")
    speed = _measured(H200_E2E, "tokens_per_s")
    card = gpu("h200")
    for provider in providers:
        point = plan_step(PlanSpec(provider=provider, context=4096, **AS_MEASURED))
        assert point.peak_gib == pytest.approx(peak[provider], rel=0.10), provider
        bound = point.tokens / roofline_s(point.parts, card)
        assert speed[provider] < bound, provider


def test_h200_max_context_hf_peft_4bit_within_one_step():
    (measured,) = [int(r["value"]) for r in _rows(H200_MAXCTX["hf-peft-4bit"])
                   if r["metric"] == "max_context"]  # fmt: skip
    spec = PlanSpec(provider="hf-peft-4bit", **AS_MEASURED)
    best, _ = find_max_context(spec, budget_gib=24.0, step=256, hi=4096)
    assert abs(best - measured) <= 256


def test_h200_max_context_cllora_4bit_probes():
    """The search misses here (allocated memory fits, the capped allocator's reserve does not:
    plan-h200.md); what holds: the planned peak of each measured probe within 2%, and the plan
    an upper bound on the measured max context."""
    rows = _rows(H200_MAXCTX["cllora-4bit"])
    probes = {int(r["context"]): float(r["value"]) for r in rows
              if r["workload"] == "max-context-probe" and r["metric"] == "peak_mem"
              and r["provider"] == "cllora-4bit"}  # fmt: skip
    status = {int(r["context"]): r["value"] for r in rows
              if r["workload"] == "max-context-probe" and r["metric"] == "status"
              and r["provider"] == "cllora-4bit"}  # fmt: skip
    (measured,) = [int(r["value"]) for r in rows
                   if r["metric"] == "max_context" and r["provider"] == "cllora-4bit"]  # fmt: skip
    for context in (24576, measured):
        assert status[context] == "ok"
        point = plan_step(PlanSpec(provider="cllora-4bit", context=context, **AS_MEASURED))
        assert point.peak_gib == pytest.approx(probes[context], rel=0.02)
    first_oom = plan_step(PlanSpec(provider="cllora-4bit", context=measured + 256, **AS_MEASURED))
    assert first_oom.peak_gib < 24.0  # the plan calls it fitting: an upper bound


# ---------------------------------------------------------------- the model itself


def test_depth_extrapolation_equals_tracing_every_layer(tmp_path):
    from cllora.model.load import tiny_config

    config = tiny_config("llama", vocab_size=49152)
    config.num_hidden_layers = 5
    config.save_pretrained(tmp_path)
    spec = PlanSpec(model=str(tmp_path), provider="cllora-4bit", context=256)
    fast, full = plan_step(spec), plan_step(PlanSpec(**{**vars(spec), "extrapolate": False}))
    assert abs(fast.peak_bytes - full.peak_bytes) <= 1
    assert fast.launches == full.launches
    assert fast.flops == pytest.approx(full.flops, rel=1e-9)
    assert fast.bytes_moved == pytest.approx(full.bytes_moved, abs=2)
    for category, value in full.memory.items():
        assert abs(fast.memory[category] - value) <= 1, category


def test_a_128k_point_allocates_no_real_memory():
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    point = plan_step(PlanSpec(provider="hf-peft-4bit", context=131072, gqa="native"))
    grown_gib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 2**20
    assert point.peak_gib > 1000 and grown_gib < 1.0  # a planned 2.4 TB step, in this process


def test_bytes_outside_gemms_and_attention_do_not_grow():
    cllora = plan_step(PlanSpec(provider="cllora-4bit", context=4096, gqa="native"))
    peft = plan_step(PlanSpec(provider="hf-peft-4bit", context=4096, gqa="native"))
    assert cllora.other_bytes() <= OTHER_CEILING["bytes"]
    assert cllora.other_launches() <= OTHER_CEILING["launches"]
    assert cllora.other_bytes() < peft.other_bytes()


# ---------------------------------------------------------------- the command line


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--gpu", "v100"], "unknown GPU 'v100'"),
        (["--model", "llama-9b"], "unknown model 'llama-9b'"),
        (["--providers", "unsloth"], "unknown provider 'unsloth'"),
        (["--model", "{empty}"], "holds no config.json"),
        (["--replay-orders", "lowest"], "unknown block order 'lowest'"),
        (["--compare-layouts", "{empty}/none.json"], "needs --find-max-context --replay-allocator"),
    ],
)
def test_bad_input_is_one_line_and_status_2(argv, needle, tmp_path, capsys):
    argv = [a.replace("{empty}", str(tmp_path)) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err


def test_cli_writes_the_benchmark_csv_and_a_plot(tmp_path, capsys):
    out = tmp_path / "plan.csv"
    argv = ["--model", "tiny-llama", "--providers", "cllora,hf-peft", "--contexts", "64,128",
            "--gpu", "l4", "--out", str(out), "--find-max-context", "--budget-gb", "0.05",
            "--max-context-hi", "512", "--max-context-step", "64"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "tok/s bound" in printed and "longest context under 0.05 GiB" in printed
    rows = _rows_at(out)
    assert set(rows[0]) == {"provider", "workload", "context", "batch", "metric", "value",
                            "unit", "device", "dtype", "commit", "timestamp"}  # fmt: skip
    peaks = [r for r in rows if r["metric"] == "peak_mem"]
    assert len(peaks) == 4 and all(float(r["value"]) > 0 for r in peaks)
    assert {r["provider"] for r in rows if r["metric"] == "max_context"} == {"cllora", "hf-peft"}
    assert out.with_suffix(".png").stat().st_size > 0


def _rows_at(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))
