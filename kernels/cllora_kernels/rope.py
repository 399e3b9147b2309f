"""Rotary position embedding in Triton, with angles computed in-kernel from ``position_ids``.

Usage::

    from cllora_kernels.rope import rope
    q, k = rope(q, k, position_ids, inv_freq)   # q (B, Hq, T, D), k (B, Hk, T, D), ids (B, T)

Prefer ``cllora_kernels.rope`` (the dispatch). Positions come per token, so packed sequences
(positions restarting at 0 for every document) need nothing special; no cos/sin cache is built.
Convention: transformers' Llama "rotate half" (pairs ``(i, i + D/2)`` share frequency ``i``).
Inputs may be non-contiguous (e.g. ``view(B, T, H, D).transpose(1, 2)``): strides are passed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rope_kernel(
    x_ptr, pos_ptr, freq_ptr, out_ptr, H, T, HALF,
    sxb, sxh, sxt, sxd, spb, spt, scaling, sign,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    ts = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)  # (BT,)
    ds = tl.arange(0, BLOCK_D)  # (BD,) index into the first half
    tmask = ts < T
    mask = tmask[:, None] & (ds[None, :] < HALF)
    pos = tl.load(pos_ptr + b * spb + ts * spt, mask=tmask, other=0).to(tl.float32)
    inv = tl.load(freq_ptr + ds, mask=ds < HALF, other=0.0).to(tl.float32)
    ang = pos[:, None] * inv[None, :]  # (BT, BD)
    cos = tl.cos(ang) * scaling
    sin = tl.sin(ang) * scaling * sign  # sign = -1 rotates backwards (the gradient)
    d_model = 2 * HALF
    for h in range(H):
        base = x_ptr + b.to(tl.int64) * sxb + h * sxh + ts[:, None].to(tl.int64) * sxt
        x1 = tl.load(base + ds[None, :] * sxd, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(base + (ds[None, :] + HALF) * sxd, mask=mask, other=0.0).to(tl.float32)
        o = out_ptr + ((b.to(tl.int64) * H + h) * T + ts[:, None]) * d_model
        y1 = (x1 * cos - x2 * sin).to(out_ptr.dtype.element_ty)
        y2 = (x2 * cos + x1 * sin).to(out_ptr.dtype.element_ty)
        tl.store(o + ds[None, :], y1, mask=mask)
        tl.store(o + ds[None, :] + HALF, y2, mask=mask)


def rope_apply(
    x: torch.Tensor, pos: torch.Tensor, inv_freq: torch.Tensor, scaling: float, sign: float
) -> torch.Tensor:
    """Rotate ``x`` (B, H, T, D) by ``sign * pos * inv_freq``; returns a contiguous tensor."""
    b, h, t, d = x.shape
    half = d // 2
    out = torch.empty((b, h, t, d), dtype=x.dtype, device=x.device)
    block_t = min(64, triton.next_power_of_2(t))
    grid = (b, triton.cdiv(t, block_t))
    _rope_kernel[grid](
        x, pos, inv_freq, out, h, t, half, *x.stride(), pos.stride(0), pos.stride(1),
        scaling, sign, BLOCK_T=block_t, BLOCK_D=triton.next_power_of_2(half),
    )  # fmt: skip
    return out


class RoPEFunction(torch.autograd.Function):
    """Forward, per pair ``(x1, x2) = (x[i], x[i + D/2])`` and angle ``a = pos * inv_freq[i]``
    (cos and sin scaled by ``attention_scaling`` s): ``y1 = s(x1 cos a - x2 sin a)``,
    ``y2 = s(x2 cos a + x1 sin a)``. Backward is the transposed rotation (angle ``-a``):
    ``dx1 = s(dy1 cos a + dy2 sin a)``, ``dx2 = s(dy2 cos a - dy1 sin a)``. Nothing is saved
    but the positions; cos/sin are recomputed."""

    @staticmethod
    def forward(ctx, q, k, position_ids, inv_freq, scaling):
        pos = position_ids.expand(q.shape[0], q.shape[2])  # (B, T), may have stride 0
        inv = inv_freq.float().contiguous()
        ctx.save_for_backward(pos, inv)
        ctx.scaling = scaling
        return rope_apply(q, pos, inv, scaling, 1.0), rope_apply(k, pos, inv, scaling, 1.0)

    @staticmethod
    def backward(ctx, dq, dk):
        pos, inv = ctx.saved_tensors
        dq_in = None if dq is None else rope_apply(dq, pos, inv, ctx.scaling, -1.0)
        dk_in = None if dk is None else rope_apply(dk, pos, inv, ctx.scaling, -1.0)
        return dq_in, dk_in, None, None, None


def rope(
    q: torch.Tensor,
    k: torch.Tensor,
    position_ids: torch.Tensor,
    inv_freq: torch.Tensor,
    attention_scaling: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE of q (B, Hq, T, D) and k (B, Hk, T, D) at ``position_ids`` (B, T) or (1, T)."""
    if q.shape[-1] % 2 or q.shape[-1] != k.shape[-1] or inv_freq.numel() != q.shape[-1] // 2:
        raise ValueError(f"bad RoPE shapes q {tuple(q.shape)} k {tuple(k.shape)} inv_freq "
                         f"{tuple(inv_freq.shape)}")  # fmt: skip
    return RoPEFunction.apply(q, k, position_ids, inv_freq, float(attention_scaling))
