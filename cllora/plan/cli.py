"""``cllora plan``: a training step's GPU memory, FLOPs, bytes and roofline time, on the CPU.

Usage::

    python -m cllora.plan --model llama-3.1-8b --providers cllora-4bit,hf-peft-4bit \\
        --contexts 4096,32768 --gpu rtx4090
    python -m cllora.plan --model path/to/model_dir --contexts 8192 --gpu l40s --find-max-context
    python -m cllora.plan --contexts 1024,2048,4096,8192,16384,32768,65536,131072 \\
        --out benchmarks/results/plan-h200.csv          # + plan-h200.png

    from cllora.plan.cli import main
    main(["--contexts", "4096", "--gpu", "h100"])     # 0 on success, 2 on bad input

The model is a preset (``cllora.model.presets``), a tiny-* test model or a directory holding a
``config.json`` (no weights are read). Every point runs the real training step of each provider
on fake tensors (``cllora.plan.step``): nothing is allocated for real, a point takes seconds.
``--find-max-context`` binary-searches the longest context whose predicted peak fits
``--budget-gb`` (default: the GPU's memory) in multiples of ``--max-context-step``, as
``cllora bench --find-max-context`` does on a GPU; ``--replay-allocator`` also
replays the benchmark's whole search as it runs on CUDA, in one process through the capped
caching-allocator model (:mod:`cllora.plan.search`: the model built once, every layer traced,
minutes per probe for an 8B model), which accounts for the cached, fragmented segments a capped
allocator cannot return; give ``--max-context-hi`` and ``--max-context-step`` as the benchmark
got them, they fix its probes. ``--replay-orders oldest,newest,random:1`` replays it once per
order of equal-size free blocks (CUDA's addresses, unknown here; the answer moves with them);
``--compare-layouts alloc-layout-PROVIDER-STAMP.json`` (written by that benchmark on CUDA) sets
the replay's segments against CUDA's after the build, at each failure and after each probe.
Bad input (an unknown GPU, model or provider, a directory without
``config.json``) prints one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from pathlib import Path

from cllora.helptext import HelpFormatter, examples
from cllora.plan.allocator import segment_ranker
from cllora.plan.gpus import GPUS, gpu
from cllora.plan.report import csv_rows, find_max_context, kinds_table, plot, table, write_csv
from cllora.plan.search import compare_layouts, replay_search
from cllora.plan.step import (
    GQA_MODES,
    LORA_PATHS,
    PROVIDERS,
    PlanError,
    PlanSpec,
    plan_step,
    planned_provider,
)


def _ints(s: str) -> list[int]:
    try:
        return [int(x) for x in s.split(",") if x]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from err


def _strs(s: str) -> list[str]:
    return [x for x in s.split(",") if x]


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="cllora plan",
        description=__doc__.split("\n\n")[0].replace("``", ""),
        formatter_class=HelpFormatter,
        epilog=examples(
            "cllora plan --providers cllora-4bit,hf-peft-4bit --contexts 4096,32768 --gpu h100",
            "cllora plan --model path/to/model_dir --contexts 8192 --gpu l40s --find-max-context",
        ),
    )
    ap.add_argument("--model", default="llama-3.1-8b", help="preset, tiny-*, or a model directory")
    ap.add_argument("--providers", type=_strs, default=["cllora-4bit", "hf-peft-4bit"],
                    help=f"comma-separated: {', '.join(PROVIDERS)}")  # fmt: skip
    ap.add_argument("--contexts", type=_ints, default=[4096],
                    help="comma-separated context lengths in tokens")  # fmt: skip
    ap.add_argument("--batch", type=int, default=1, help="sequences per step")
    ap.add_argument("--gpu", default="h200", help=f"one of {', '.join(GPUS)}")
    ap.add_argument(
        "--budget-gb", type=float, default=None, help="memory budget in GiB (default: the GPU's)"
    )
    ap.add_argument(
        "--find-max-context",
        action="store_true",
        help="binary-search the longest context whose predicted peak fits the budget",
    )
    ap.add_argument(
        "--max-context-step",
        type=int,
        default=256,
        help="--find-max-context: the search's granularity, in tokens",
    )
    ap.add_argument("--max-context-hi", type=int, default=131072,
                    help="--find-max-context: the longest context tried")  # fmt: skip
    ap.add_argument("--replay-allocator", action="store_true",
                    help="with --find-max-context: also replay the benchmark's search in one "
                         "process through the capped caching-allocator model (full depth, "
                         "minutes per probe for an 8B model)")  # fmt: skip
    ap.add_argument("--replay-orders", type=_strs, default=["oldest"],
                    help="with --replay-allocator: comma-separated orders of equal-size free "
                         "blocks, one replay each (oldest, newest, random:SEED)")  # fmt: skip
    ap.add_argument("--compare-layouts", default=None, metavar="JSON",
                    help="with --replay-allocator: set the replay's allocator segments, stage "
                         "by stage, against the alloc-layout-*.json bench_e2e.py wrote on CUDA "
                         "(one provider; default: no comparison)")  # fmt: skip
    ap.add_argument(
        "--dtype",
        default="bf16",
        choices=("bf16", "fp32"),
        help="dtype of the base weights and activations",
    )
    ap.add_argument("--lora-r", type=int, default=16, help="LoRA rank")
    ap.add_argument("--quant", default=None, choices=("none", "nf4", "fp4"),
                    help="the provider's base precision (default: the provider's)")  # fmt: skip
    ap.add_argument("--checkpointing", default=None, choices=("true", "false"),
                    help="override the provider's checkpointing (cllora providers; default: the "
                         "provider's)")  # fmt: skip
    ap.add_argument(
        "--checkpoint-policy",
        default=None,
        choices=("full", "keep_attention"),
        help="train.checkpoint_policy of cllora providers (default: the provider's)",
    )
    ap.add_argument(
        "--kernels",
        default="auto",
        choices=("auto", "false"),
        help="model.kernels of cllora providers",
    )
    ap.add_argument(
        "--loss",
        default="auto",
        choices=("auto", "plain", "chunked", "fused"),
        help="train.loss of cllora providers",
    )
    ap.add_argument("--gqa", default="auto", choices=("auto", *GQA_MODES),
                    help="varlen K/V heads: repeat (torch <= 2.11), native (>= 2.12), auto: "
                         "what this torch does")  # fmt: skip
    ap.add_argument(
        "--lora-path",
        default="current",
        choices=LORA_PATHS,
        help="legacy: LoRALinear.forward of commit 44d1b83 (the H200 runs)",
    )
    ap.add_argument(
        "--target",
        default="cuda",
        choices=("cuda", "cpu"),
        help="whose code paths run (cpu: for comparing with a CPU run)",
    )
    ap.add_argument(
        "--no-extrapolate",
        action="store_true",
        help="trace every decoder layer instead of 2 and 3 (slower, same result)",
    )
    ap.add_argument("--kinds", action="store_true", help="also print bytes/launches per kind")
    ap.add_argument(
        "--out",
        default=None,
        help="CSV path, a PNG written next to it (default: none, the table only)",
    )
    return ap


def _auto_gqa() -> str:
    """What cllora does with GQA on this torch's ``varlen_attn``."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return "native"
    return "native" if "enable_gqa" in inspect.signature(varlen_attn).parameters else "repeat"


def _spec(args: argparse.Namespace, provider: str, context: int) -> PlanSpec:
    ckpt = None if args.checkpointing is None else args.checkpointing == "true"
    return PlanSpec(
        model=args.model, provider=provider, context=context, batch=args.batch, dtype=args.dtype,
        target=args.target, gqa=_auto_gqa() if args.gqa == "auto" else args.gqa,
        lora_r=args.lora_r, quant=args.quant, checkpointing=ckpt,
        checkpoint_policy=args.checkpoint_policy, kernels=args.kernels, loss=args.loss,
        extrapolate=not args.no_extrapolate, lora_path=args.lora_path,
    )  # fmt: skip


def _check(args: argparse.Namespace) -> None:
    from cllora.plan.step import hf_config

    gpu(args.gpu)
    for p in args.providers:
        planned_provider(p)
    if not args.contexts or min(args.contexts) < 8:
        raise PlanError("--contexts: give context lengths of at least 8 tokens")
    hf_config(args.model)
    if args.compare_layouts:
        if not (args.replay_allocator and args.find_max_context) or len(args.providers) != 1:
            raise PlanError("--compare-layouts needs --find-max-context --replay-allocator and "
                            "the one provider the layouts file was measured with")  # fmt: skip
        # read once, here: a bad file fails before minutes of planning
        args.measured_layouts = _measured_layouts(args.compare_layouts)
    for order in args.replay_orders:
        try:
            segment_ranker(order)
        except ValueError as err:
            raise PlanError(f"--replay-orders: {err}") from err


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    card = gpu(args.gpu)
    budget = args.budget_gb if args.budget_gb is not None else card.memory_gib
    points = []
    for context in args.contexts:
        for provider in args.providers:
            point = plan_step(_spec(args, provider, context))
            points.append(point)
            print(f"planned {provider} {context}: {point.peak_gib:.2f} GiB ({point.plan_s:.1f} s)",
                  file=sys.stderr, flush=True)  # fmt: skip
    print(f"{args.model} on {card.name} (predicted; bf16 peak {card.bf16_tflops:g} TFLOP/s, "
          f"{card.bandwidth_gbs:g} GB/s)")  # fmt: skip
    print(table(points, card))
    if args.kinds:
        print()
        print(kinds_table(points, card))
    best = {}
    if args.find_max_context:
        print(f"\nlongest context under {budget:g} GiB (multiples of {args.max_context_step}):")
        for provider in args.providers:
            spec = _spec(args, provider, args.max_context_step)
            ctx, _ = find_max_context(
                spec, budget, args.max_context_step, args.max_context_hi, log=_log
            )
            best[provider] = (ctx, budget)
            line = f"  {provider:22s} {ctx}"
            layouts: dict | None = {} if args.compare_layouts else None
            if args.replay_allocator:
                found = []
                hi, step = args.max_context_hi, args.max_context_step
                for i, order in enumerate(args.replay_orders):
                    record = layouts if i == 0 else None  # the first order's is compared
                    replayed, _ = replay_search(spec, budget, hi, step, _log, record, order)
                    several = len(args.replay_orders) > 1
                    found.append(f"{replayed} ({order})" if several else str(replayed))
                line += f"  (allocator replay: {', '.join(found)})"
            print(line)
            if layouts is not None:
                print("\n".join(compare_layouts(args.measured_layouts, layouts)))
    if args.out:
        path = write_csv(args.out, csv_rows(points, card, best))
        png = plot(path, budget)
        print(f"results: {path} and {png}")
    return 0


def _measured_layouts(path: str) -> dict:
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise PlanError(f"cannot read the allocator layouts {path}: {err}") from err
    if not isinstance(record, dict) or "build" not in record:
        raise PlanError(f"{path} is not an alloc-layout-*.json of benchmarks/bench_e2e.py")
    return record


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and plan; 2 with a one-line message on bad input."""
    args = _parser().parse_args(argv)
    try:
        _check(args)
        return run(args)
    except PlanError as err:
        print(f"cllora plan: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
