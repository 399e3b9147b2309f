"""Pure-torch references of every cllora kernel, with the kernels' signatures.

Usage::

    from cllora_kernels import reference as ref
    y = ref.lora_linear(x, w, lora_A, lora_B, scaling)          # w: tensor or NF4Weight
    loss = ref.linear_cross_entropy(h, lm_head_w, targets)       # chunked, never (N, V) at once
    y = ref.rms_norm(x, weight, eps); y = ref.swiglu(gate, up)
    q, k = ref.rope(q, k, position_ids, inv_freq)

These are the oracles of ``tests/kernels`` and the ``reference`` provider of
``benchmarks/bench_kernels.py``; the dispatch (:mod:`cllora_kernels.dispatch`) runs them on CPU.
All but the cross-entropy are plain differentiable torch code; the cross-entropy is chunked over
tokens (an ``autograd.Function`` computing grad wrt ``hidden`` in the forward pass) so that the CPU
path also saves the (tokens x vocab) logits memory.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .nf4 import NF4Weight, dequantize_nf4

IGNORE_INDEX = -100

# ce_rows(logits (C, V) fp32, targets (C,), ignore_index, grad_scale) -> per-row loss (C,) fp32;
# when grad_scale is not None it overwrites logits with grad_scale * d(loss_row)/d(logits).
CERows = Callable[[torch.Tensor, torch.Tensor, int, float | None], torch.Tensor]


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor | NF4Weight,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x W^T + bias + scaling * (x A^T) B^T``: x (..., K), W (N, K), A (r, K), B (N, r).

    The LoRA branch runs in fp32 and is cast to ``x.dtype`` (the oracle's precision;
    ``cllora.model.lora.LoRALinear`` runs its products in ``x.dtype`` with fp32 accumulation).
    """
    w = dequantize_nf4(weight) if isinstance(weight, NF4Weight) else weight
    y = F.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))  # (..., N)
    update = F.linear(F.linear(x.to(lora_A.dtype), lora_A), lora_B)  # (..., r) -> (..., N)
    return y + (update * scaling).to(y.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``weight * x / sqrt(mean(x^2) + eps)`` over the last dim, normalised in fp32 (Llama's)."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(x.dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` elementwise (the Llama MLP's activation)."""
    return F.silu(gate) * up


def rope_cos_sin(
    position_ids: torch.Tensor, inv_freq: torch.Tensor, attention_scaling: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (B, 1, T, D) fp32 for the rotate-half convention of transformers' Llama."""
    freqs = position_ids[..., None].float() * inv_freq.float()  # (B, T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, D)
    return (emb.cos() * attention_scaling)[:, None], (emb.sin() * attention_scaling)[:, None]


def rope(
    q: torch.Tensor,
    k: torch.Tensor,
    position_ids: torch.Tensor,
    inv_freq: torch.Tensor,
    attention_scaling: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of q (B, Hq, T, D) and k (B, Hk, T, D) at ``position_ids`` (B, T).

    Packed sequences pass positions that restart at 0 for every document. ``inv_freq`` (D/2,) is
    the model's (``model.model.rotary_emb.inv_freq``), so scaled RoPE variants come for free.
    """
    cos, sin = rope_cos_sin(position_ids, inv_freq, attention_scaling)

    def rot(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        rotated = torch.cat((-x2, x1), dim=-1)
        return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)

    return rot(q), rot(k)


def ce_rows_reference(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, grad_scale: float | None
) -> torch.Tensor:
    """Per-row cross-entropy of one chunk (see ``CERows``); ignored rows give 0 loss and 0 grad."""
    valid = targets != ignore_index  # (C,)
    tgt = torch.where(valid, targets, 0).long()  # (C,)
    lse = torch.logsumexp(logits, dim=-1)  # (C,)
    loss = torch.where(valid, lse - logits.gather(1, tgt[:, None])[:, 0], 0.0)
    if grad_scale is not None:
        logits.sub_(lse[:, None]).exp_()  # softmax
        logits[torch.arange(len(tgt), device=logits.device), tgt] -= 1.0
        logits.mul_((valid.float() * grad_scale)[:, None])
    return loss


def default_chunk_size(n_tokens: int, hidden: int, vocab: int) -> int:
    """Tokens per chunk: a power of two making a chunk's logits about as big as ``hidden``."""
    target = max(1, -(-n_tokens // max(1, -(-vocab // hidden))))
    return min(max(16, 1 << (target - 1).bit_length()), max(n_tokens, 1))


def chunked_linear_ce(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int,
    reduction: str,
    chunk_size: int | None,
    ce_rows: CERows,
    need_grad: bool,
    need_grad_w: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Loss (scalar fp32), dL/dhidden (N, H) and dL/dweight (V, H) (None when not needed), one
    token chunk at a time.

    Per chunk: ``logits = h_c W^T`` (C, V) in fp32, ``ce_rows`` turns them into per-row losses
    and, in place, ``dlogits = scale * (softmax - onehot)``, then ``dh_c = dlogits W`` and
    ``dW += dlogits^T h_c`` (fp32 accumulator).
    ``scale`` is 1/n_valid for ``mean`` (loss 0 and zero grads when every token is ignored).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    n_tokens = hidden.shape[0]
    n_valid = int((targets != ignore_index).sum())
    scale = 1.0 / max(n_valid, 1) if reduction == "mean" else 1.0
    chunk = chunk_size or default_chunk_size(n_tokens, hidden.shape[1], weight.shape[0])
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    dh = torch.empty_like(hidden) if need_grad else None
    dw = (
        torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        if need_grad_w
        else None
    )
    need_dlogits = need_grad or need_grad_w
    for start in range(0, n_tokens, chunk):
        h_c = hidden[start : start + chunk]  # (C, H)
        logits = (h_c @ weight.T).float()  # (C, V)
        t_c = targets[start : start + chunk]  # (C,)
        rows = ce_rows(logits, t_c, ignore_index, scale if need_dlogits else None)
        total += rows.sum()
        if dh is not None:
            dh[start : start + chunk] = logits.to(weight.dtype) @ weight  # (C, H)
        if dw is not None:
            dw += logits.T @ h_c.float()  # (V, H)
    return total * scale, dh, None if dw is None else dw.to(weight.dtype)


class ChunkedLinearCE(torch.autograd.Function):
    """Forward: chunked ``CE(h W^T, t)``, storing ``dL/dh`` (the grad is formed in the same pass).
    Backward: ``dh * grad_output`` and, only when W trains, ``dW * grad_output`` (dW accumulated
    over chunks in the forward pass too; a frozen LM head costs nothing). ``ce_rows`` is the
    per-chunk row function: the torch one here, the Triton kernel in linear_cross_entropy.py."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, reduction, chunk_size, ce_rows):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        loss, dh, dw = chunked_linear_ce(
            hidden,
            weight,
            targets,
            ignore_index,
            reduction,
            chunk_size,
            ce_rows,
            need_h,
            need_w,
        )
        ctx.save_for_backward(dh, dw)
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        dh, dw = ctx.saved_tensors
        grad_h = None if dh is None else dh * grad_out.to(dh.dtype)
        grad_w = None if dw is None else dw * grad_out.to(dw.dtype)
        return grad_h, grad_w, None, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Cross-entropy of ``hidden (N, H) @ weight (V, H)^T`` against ``targets (N,)``, never
    materialising more than ``chunk_size`` rows of logits. Mean over non-ignored tokens (0 when
    all are ignored) or sum. ``weight`` gets a gradient only if it requires one."""
    return ChunkedLinearCE.apply(
        hidden, weight, targets, ignore_index, reduction, chunk_size, ce_rows_reference
    )
