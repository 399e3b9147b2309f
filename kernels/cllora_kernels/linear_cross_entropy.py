"""Fused linear cross-entropy: the LM-head loss without the full (tokens x vocab) logits.

Usage::

    from cllora_kernels.linear_cross_entropy import linear_cross_entropy
    loss = linear_cross_entropy(h, lm_head_weight, targets)   # h (N, H), W (V, H), targets (N,)
    loss.backward()                                           # dL/dh was computed in the forward

Prefer ``cllora_kernels.linear_cross_entropy`` (the dispatch). Tokens are processed in chunks of
``chunk_size`` rows: ``logits_c = h_c W^T`` (C, V) by cuBLAS, then one Triton program per row
runs an online log-sum-exp over vocabulary blocks (running max ``m`` and rescaled sum ``s``:
``s <- s exp(m - m') + sum exp(z - m')``), picks the target logit, and in a second sweep
overwrites the logits with ``scale * (softmax - onehot)``; ``dh_c = dlogits_c W`` follows at once.
Peak extra memory is one (C, V) fp32 chunk plus dL/dh (N, H); the chunk driver is shared with
the reference (:func:`cllora_kernels.reference.chunked_linear_ce`). ``ignore_index`` rows give 0
loss and 0 gradient; ``mean`` divides by the non-ignored count (loss 0 if there is none).
When the LM-head weight trains, ``dW += dlogits_c^T h_c`` is accumulated in the same pass (fp32);
in LoRA training it is frozen and that work is skipped.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import IGNORE_INDEX, ChunkedLinearCE


@triton.jit
def _ce_rows_kernel(
    z_ptr, t_ptr, loss_ptr, V, stride_z, ignore_index, scale,
    WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    z_row = z_ptr + row.to(tl.int64) * stride_z
    target = tl.load(t_ptr + row).to(tl.int32)
    valid = target != ignore_index
    cols = tl.arange(0, BLOCK_V)
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    z_t = tl.zeros((), tl.float32)
    for v0 in range(0, V, BLOCK_V):  # sweep 1: online log-sum-exp and the target logit
        v = v0 + cols
        z = tl.load(z_row + v, mask=v < V, other=float("-inf")).to(tl.float32)  # (BV,)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
        z_t += tl.sum(tl.where(v == target, z, 0.0), axis=0)
    lse = m + tl.log(s)
    tl.store(loss_ptr + row, tl.where(valid, lse - z_t, 0.0))
    if WRITE_GRAD:
        g_scale = tl.where(valid, scale, 0.0)
        for v0 in range(0, V, BLOCK_V):  # sweep 2: dlogits = scale (softmax - onehot), in place
            v = v0 + cols
            z = tl.load(z_row + v, mask=v < V, other=0.0).to(tl.float32)
            g = tl.exp(z - lse) - tl.where(v == target, 1.0, 0.0)
            tl.store(z_row + v, g * g_scale, mask=v < V)


def ce_rows_triton(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, grad_scale: float | None
) -> torch.Tensor:
    """Per-row CE of one chunk ``logits (C, V)`` fp32 (grad written in place when asked)."""
    c, v = logits.shape
    loss = torch.empty(c, dtype=torch.float32, device=logits.device)
    if c == 0:
        return loss
    _ce_rows_kernel[(c,)](
        logits, targets.contiguous(), loss, v, logits.stride(0), ignore_index,
        0.0 if grad_scale is None else grad_scale,
        WRITE_GRAD=grad_scale is not None, BLOCK_V=min(4096, triton.next_power_of_2(v)),
    )  # fmt: skip
    return loss


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """``CE(hidden (N, H) @ weight (V, H)^T, targets (N,))``, mean over non-ignored or sum."""
    return ChunkedLinearCE.apply(
        hidden, weight, targets, ignore_index, reduction, chunk_size, ce_rows_triton
    )
