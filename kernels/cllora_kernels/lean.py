"""Memory-lean pure-torch RMSNorm and SwiGLU: what the dispatch runs off CUDA.

Usage::

    from cllora_kernels import lean
    y = lean.rms_norm(x, weight, eps)       # same values and gradients as reference.rms_norm
    h = lean.swiglu(gate, up)               # same as reference.swiglu

Why: autograd on the plain expressions (``reference``, transformers' modules) keeps more than the
backward needs and sweeps memory more often than it must. ``silu(gate) * up`` keeps ``gate``,
``silu(gate)`` and ``up`` (three (tokens x intermediate) tensors per layer); :class:`SwiGLU` keeps
``gate`` and ``up`` and recomputes the sigmoid in the backward. RMSNorm's ``pow``, ``mean``,
``mul``, ``mul`` chain allocates three (tokens x hidden) tensors in the forward and more in the
backward; :class:`RMSNorm` allocates one forward (the output, scaled in place) and keeps ``x``
and the (tokens,) reciprocal RMS. On a CPU, where memory is the process's RSS and freed
buffers fragment the heap, fewer and smaller allocations are what lowers the peak; the Triton
kernels do the same on CUDA. The maths follow the reference (fp32 normalisation, the output in
``x``'s dtype times ``weight``) and the tests compare the two, forward and backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class RMSNorm(torch.autograd.Function):
    """``weight * (x / sqrt(mean(x^2) + eps)).to(x.dtype)`` keeping ``x`` and rstd (..., 1)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        xf = x.float()
        rstd = torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)  # (..., 1) fp32
        y = (xf * rstd).to(x.dtype)
        out_dtype = torch.result_type(weight, y)
        y = y.mul_(weight) if out_dtype == y.dtype else weight * y
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        xhat = x.float() * rstd  # (..., H) fp32 (a new buffer even for fp32 x)
        grad_w = None
        if ctx.needs_input_grad[1]:
            y = xhat.to(x.dtype).float()  # what multiplied the weight in the forward
            grad_w = (grad.float() * y).reshape(-1, y.shape[-1]).sum(0).to(weight.dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            gw = grad.float() * weight.float()  # (..., H): dL/d(normalised x)
            dot = (gw * xhat).mean(-1, keepdim=True)  # (..., 1)
            gw.sub_(xhat.mul_(dot)).mul_(rstd)  # rstd (gw - xhat mean(gw xhat))
            grad_x = gw.to(x.dtype)
        return grad_x, grad_w, None


class SwiGLU(torch.autograd.Function):
    """``silu(gate) * up`` keeping only ``gate`` and ``up``."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        out = F.silu(gate)
        return out.mul_(up) if out.dtype == torch.result_type(out, up) else out * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        sig = torch.sigmoid(gate)
        grad_up = None
        if ctx.needs_input_grad[1]:
            grad_up = (gate * sig).mul_(grad).to(up.dtype)  # silu(gate) * grad
        grad_gate = None
        if ctx.needs_input_grad[0]:
            # d silu / d gate = sig (1 + gate (1 - sig))
            d = torch.sub(1.0, sig).mul_(gate).add_(1.0).mul_(sig)
            grad_gate = d.mul_(grad).mul_(up).to(gate.dtype)
        return grad_gate, grad_up


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dim (see :class:`RMSNorm`)."""
    return RMSNorm.apply(x, weight, eps)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` (see :class:`SwiGLU`)."""
    return SwiGLU.apply(gate, up)
