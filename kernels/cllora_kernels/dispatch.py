"""The one place that picks Triton or the torch reference for every op.

Usage::

    import cllora_kernels as ck
    y = ck.lora_linear(x, w, A, B, scaling)  # Triton when all tensors are on CUDA, else reference
    with ck.backend("triton"):               # tests: force Triton (CPU needs TRITON_INTERPRET=1
        y = ck.rms_norm(x, w, 1e-6)          # set before the kernel modules are imported)
    ck.set_backend("reference")                 # or globally ("auto" restores the default)

Rule: ``auto`` uses Triton iff every tensor argument is a CUDA tensor, the torch path otherwise:
the reference, except RMSNorm and SwiGLU, which run :mod:`cllora_kernels.lean` (the same maths
as autograd Functions that keep fewer tensors: what a CPU run gains from ``model.kernels``).
``reference`` forces the plain references everywhere. Nothing here touches a GPU driver:
launching is what needs one (or ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from . import lean, reference
from .nf4 import NF4Weight

_BACKENDS = ("auto", "triton", "reference")
_backend = "auto"


def set_backend(name: str) -> None:
    """Force ``"triton"`` or ``"reference"`` for every op, or ``"auto"`` (CUDA -> Triton)."""
    global _backend
    if name not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {name!r}")
    _backend = name


def get_backend() -> str:
    return _backend


@contextmanager
def backend(name: str) -> Iterator[None]:
    """Context manager version of :func:`set_backend` (restores the previous choice)."""
    previous = _backend
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def use_triton(*tensors: Any) -> bool:
    """Whether the next op on these tensors runs the Triton kernel."""
    if _backend != "auto":
        return _backend == "triton"
    devices = [t.device for t in tensors if isinstance(t, torch.Tensor)]
    devices += [t.device for t in tensors if isinstance(t, NF4Weight)]
    return bool(devices) and all(d.type == "cuda" for d in devices)


def _op(name: str) -> Any:
    return importlib.import_module(f"{__package__}.{name}")


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor | NF4Weight,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x W^T + bias + scaling (x A^T) B^T`` (see :mod:`cllora_kernels.lora_linear`)."""
    if use_triton(x, weight, lora_A, lora_B):
        return _op("lora_linear").lora_linear(x, weight, lora_A, lora_B, scaling, bias)
    return reference.lora_linear(x, weight, lora_A, lora_B, scaling, bias)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = reference.IGNORE_INDEX,
    reduction: str = "mean",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Chunked ``CE(hidden W^T, targets)`` (see :mod:`cllora_kernels.linear_cross_entropy`)."""
    if use_triton(hidden, weight, targets):
        fn = _op("linear_cross_entropy").linear_cross_entropy
        return fn(hidden, weight, targets, ignore_index, reduction, chunk_size)
    return reference.linear_cross_entropy(
        hidden, weight, targets, ignore_index, reduction, chunk_size
    )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dim (see :mod:`cllora_kernels.rmsnorm`)."""
    if use_triton(x, weight):
        return _op("rmsnorm").rms_norm(x, weight, eps)
    if _backend == "reference":
        return reference.rms_norm(x, weight, eps)
    return lean.rms_norm(x, weight, eps)


def rope(
    q: torch.Tensor,
    k: torch.Tensor,
    position_ids: torch.Tensor,
    inv_freq: torch.Tensor,
    attention_scaling: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding at ``position_ids`` (see :mod:`cllora_kernels.rope`)."""
    if use_triton(q, k, position_ids, inv_freq):
        return _op("rope").rope(q, k, position_ids, inv_freq, attention_scaling)
    return reference.rope(q, k, position_ids, inv_freq, attention_scaling)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` (see :mod:`cllora_kernels.swiglu`)."""
    if use_triton(gate, up):
        return _op("swiglu").swiglu(gate, up)
    if _backend == "reference":
        return reference.swiglu(gate, up)
    return lean.swiglu(gate, up)
