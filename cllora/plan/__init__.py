"""Plan a training step's GPU cost on the CPU: peak memory by category, FLOPs, bytes, launches,
roofline time, the longest context under a budget, for cllora and the hf-peft baselines.

Usage::

    python -m cllora.plan --model llama-3.1-8b --contexts 4096,32768 --gpu l40s --find-max-context

    from cllora.plan.step import PlanSpec, plan_step
    from cllora.plan.gpus import gpu, roofline_s

    point = plan_step(PlanSpec(model="llama-3.1-8b", provider="cllora-4bit", context=32768))
    point.peak_gib, point.tokens / roofline_s(point.parts, gpu("h100"))

Modules: :mod:`cllora.plan.tracker` (the dispatch mode that follows storages, FLOPs and bytes),
:mod:`cllora.plan.step` (the real step on fake tensors), :mod:`cllora.plan.gpus` (cards and the
roofline), :mod:`cllora.plan.report` (table, CSV, plot, max-context search),
:mod:`cllora.plan.cli`. Results and the comparison with the H200 measurements:
``benchmarks/results/plan-h200.md`` and ``docs/plan.md``.
"""
