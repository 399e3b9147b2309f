"""Common training GPUs and the roofline time of a traced step on them.

Usage::

    from cllora.plan.gpus import GPUS, gpu, roofline_s

    card = gpu("h200")            # GPU(name="H200", memory_gib=..., bf16_tflops=..., ...)
    seconds = roofline_s(point.parts, card)   # point: cllora.plan.step.PlanPoint

Each card: the memory torch reports as usable (``torch.cuda.get_device_properties(0)
.total_memory``, GiB), the dense bf16 tensor-core peak with fp32 accumulation (vendor data
sheets, no sparsity) and the memory bandwidth. The roofline time of a step is the sum over its
kernels of ``max(flops / peak, bytes / bandwidth)``: each kernel is bound by compute or by
memory traffic, never faster; launch latency, synchronisation and imperfect kernels come on
top, so the tokens/s it gives is an upper bound. ``launch_floor_s`` adds a fixed cost per
launch (``LAUNCH_S``) to the roofline, a second, less optimistic bound.
"""

from __future__ import annotations

from dataclasses import dataclass

from cllora.plan.step import PlanError
from cllora.plan.tracker import OpRecord

LAUNCH_S = 4e-6  # seconds: a typical CUDA kernel launch + scheduling gap in eager PyTorch


@dataclass(frozen=True)
class GPU:
    key: str
    name: str
    memory_gib: float
    bf16_tflops: float  # dense, fp32 accumulation
    bandwidth_gbs: float  # GB/s (10^9 bytes)


GPUS: dict[str, GPU] = {g.key: g for g in (
    GPU("h100", "H100 SXM 80GB", 79.1, 989.4, 3350.0),
    GPU("h200", "H200 141GB", 139.8, 989.4, 4800.0),
    GPU("a100", "A100 SXM 80GB", 79.1, 312.0, 2039.0),
    GPU("l40s", "L40S 48GB", 44.4, 362.1, 864.0),
    GPU("l4", "L4 24GB", 22.0, 121.0, 300.0),
    GPU("rtx4090", "RTX 4090 24GB", 23.6, 165.2, 1008.0),
)}  # fmt: skip


def gpu(key: str) -> GPU:
    """The card named ``key`` (case-insensitive: h100, h200, a100, l40s, l4, rtx4090)."""
    card = GPUS.get(key.lower().replace("-", "").replace(" ", ""))
    if card is None:
        raise PlanError(f"unknown GPU {key!r}; use one of {', '.join(GPUS)}")
    return card


def op_seconds(op: OpRecord, card: GPU) -> float:
    """Roofline time of one kernel: compute-bound or bandwidth-bound, whichever is slower."""
    return max(op.flops / (card.bf16_tflops * 1e12), op.bytes / (card.bandwidth_gbs * 1e9))


def roofline_s(parts: list[tuple[float, list[OpRecord]]], card: GPU) -> float:
    """Roofline time of a step given as weighted operator lists (``PlanPoint.parts``)."""
    return sum(w * sum(op_seconds(op, card) for op in ops) for w, ops in parts)


def roofline_by_kind(parts: list[tuple[float, list[OpRecord]]], card: GPU) -> dict[str, float]:
    """The roofline time split by operator kind (gemm, attention, copy, cast, ...)."""
    out: dict[str, float] = {}
    for w, ops in parts:
        for op in ops:
            out[op.kind] = out.get(op.kind, 0.0) + w * op_seconds(op, card)
    return out


def launch_floor_s(parts: list[tuple[float, list[OpRecord]]], card: GPU) -> float:
    """``roofline_s`` plus :data:`LAUNCH_S` per kernel launch."""
    launches = sum(w * sum(op.launches for op in ops) for w, ops in parts)
    return roofline_s(parts, card) + launches * LAUNCH_S
