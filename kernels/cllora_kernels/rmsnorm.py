"""RMSNorm in Triton: forward, input gradient and (when the weight trains) weight gradient.

Usage::

    from cllora_kernels.rmsnorm import rms_norm
    y = rms_norm(x, weight, eps)      # x (..., H), weight (H,)

Prefer ``cllora_kernels.rms_norm`` (the dispatch). Each program normalises ``BLOCK_M`` whole rows
(H up to a few thousand fits one tile); the forward saves one fp32 ``rstd`` per row; the weight
gradient is reduced from one partial row per program, so no atomics are needed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rmsnorm_fwd(
    x_ptr, w_ptr, y_ptr, rstd_ptr, M, H, eps, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
    cols = tl.arange(0, BLOCK_H)  # (BH,)
    mask = (rows[:, None] < M) & (cols[None, :] < H)
    offs = rows[:, None].to(tl.int64) * H + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # (BM, BH)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / H + eps)  # (BM,)
    w = tl.load(w_ptr + cols, mask=cols < H, other=0.0).to(tl.float32)
    y = x * rstd[:, None] * w[None, :]
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + rows, rstd, mask=rows < M)


@triton.jit
def _rmsnorm_bwd(
    x_ptr, w_ptr, rstd_ptr, dy_ptr, dx_ptr, dw_part_ptr, M, H,
    BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, WEIGHT_GRAD: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_H)
    mask = (rows[:, None] < M) & (cols[None, :] < H)
    offs = rows[:, None].to(tl.int64) * H + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # (BM, BH)
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=cols < H, other=0.0).to(tl.float32)
    rstd = tl.load(rstd_ptr + rows, mask=rows < M, other=0.0)  # (BM,)
    xhat = x * rstd[:, None]
    dyw = dy * w[None, :]
    c = tl.sum(dyw * xhat, axis=1) / H  # (BM,)
    dx = rstd[:, None] * (dyw - xhat * c[:, None])
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    if WEIGHT_GRAD:
        tl.store(dw_part_ptr + pid * H + cols, tl.sum(dy * xhat, axis=0), mask=cols < H)


def _blocks(h: int) -> tuple[int, int]:
    block_h = triton.next_power_of_2(h)
    return max(1, min(16, 4096 // block_h)), block_h


class RMSNormFunction(torch.autograd.Function):
    """Forward: ``r = 1 / sqrt(mean_j x_j^2 + eps)``, ``y = w * x * r`` (fp32 maths).

    Backward with ``xhat = x r``: ``dx = r (dy w - xhat mean_j(dy_j w_j xhat_j))``,
    ``dw = sum_rows dy xhat`` (only when ``w`` requires grad).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()  # (M, H)
        m, h = x2.shape
        y = torch.empty_like(x2)
        rstd = torch.empty(m, dtype=torch.float32, device=x.device)
        bm, bh = _blocks(h)
        _rmsnorm_fwd[(triton.cdiv(m, bm),)](x2, weight, y, rstd, m, h, eps, BLOCK_M=bm, BLOCK_H=bh)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.shape = shape
        return y.reshape(shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, weight, rstd = ctx.saved_tensors
        m, h = x2.shape
        bm, bh = _blocks(h)
        grid = triton.cdiv(m, bm)
        want_dw = ctx.needs_input_grad[1]
        dx = torch.empty_like(x2)
        dw_part = torch.empty((grid if want_dw else 1, h), dtype=torch.float32, device=x2.device)
        dy2 = dy.reshape(m, h).contiguous()
        _rmsnorm_bwd[(grid,)](
            x2, weight, rstd, dy2, dx, dw_part, m, h, BLOCK_M=bm, BLOCK_H=bh, WEIGHT_GRAD=want_dw
        )
        dw = dw_part.sum(0).to(weight.dtype) if want_dw else None
        return dx.reshape(ctx.shape), dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm of ``x (..., H)`` with ``weight (H,)`` (same signature as the reference)."""
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"weight {tuple(weight.shape)} does not match x (..., {x.shape[-1]})")
    return RMSNormFunction.apply(x, weight, eps)
