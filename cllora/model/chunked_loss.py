"""Chunked linear cross-entropy: the LM-head loss without ever forming (N x V) logits.

Usage::

    from cllora.model.chunked_loss import chunked_lm_loss_sum

    loss_sum = chunked_lm_loss_sum(hidden, lm_head.weight, targets, chunk=1024)  # scalar fp32
    (loss_sum / n).backward()          # grads for hidden (and weight if it requires grad)

``hidden`` (N, H) are the decoder states at positions that have a target, ``weight`` (V, H) the LM
head, ``targets`` (N,) token ids (rows whose target is -100 add nothing). The result equals
``F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="sum")``, but at most
(chunk x V) logits exist at any time, in the forward and in the backward: the pure-torch path
for CPU (the Triton fused version lives in ``cllora_kernels``).

Maths (per row i, logits ``z = h_i W^T`` upcast to fp32, ``lse = log sum_v exp z_v``)::

    forward:   loss = sum_i (lse_i - z_{i, y_i})
    backward:  dz = g * (softmax(z) - onehot(y))      (g: the incoming scalar gradient)
               dh = dz W          dW = dz^T h

The forward keeps only ``lse`` (N,) besides its inputs; the backward recomputes each chunk's
logits from ``h`` and ``W`` (one extra (chunk x H x V) matmul per chunk, the price of the memory).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cllora.data.formatting import IGNORE_INDEX


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``hidden @ weight.T`` against ``targets``, chunk by chunk."""

    @staticmethod
    def forward(
        ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int
    ) -> torch.Tensor:
        n = hidden.shape[0]
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)  # (N,)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for s in range(0, n, chunk):
            z = F.linear(hidden[s : s + chunk], weight).float()  # (c, V)
            y = targets[s : s + chunk]
            valid = y != IGNORE_INDEX
            lse_c = torch.logsumexp(z, dim=-1)  # (c,)
            picked = z.gather(1, y.clamp_min(0)[:, None])[:, 0]  # (c,)
            total += ((lse_c - picked) * valid).sum()
            lse[s : s + chunk] = lse_c
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk = chunk
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        hidden, weight, targets, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        grad_w = grad_w if need_w else None
        g = grad_out.float()
        for s in range(0, hidden.shape[0], ctx.chunk):
            h = hidden[s : s + ctx.chunk]  # (c, H)
            y = targets[s : s + ctx.chunk]
            z = F.linear(h, weight).float()  # (c, V)
            dz = torch.exp(z - lse[s : s + ctx.chunk, None])  # softmax (c, V)
            valid = y != IGNORE_INDEX
            rows = torch.arange(len(y), device=y.device)
            dz[rows, y.clamp_min(0)] -= 1.0
            dz *= (g * valid)[:, None]
            if need_h:
                grad_h[s : s + ctx.chunk] = (dz.to(weight.dtype) @ weight).to(hidden.dtype)
            if need_w:
                grad_w += dz.t() @ h.float()  # (V, H)
        if need_w:
            grad_w = grad_w.to(weight.dtype)
        return grad_h, grad_w, None, None


def chunked_lm_loss_sum(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int = 1024
) -> torch.Tensor:
    """Summed next-token cross-entropy (fp32 scalar); see the module docstring."""
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(
            f"expected hidden (N, H) and targets (N,), got {tuple(hidden.shape)} and "
            f"{tuple(targets.shape)}"
        )
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    return ChunkedLinearCrossEntropy.apply(hidden, weight, targets, chunk)
