"""Causal-LM loss computed only where there are targets.

Usage::

    from cllora.model.loss import lm_loss_sum
    loss_sum, n_tokens = lm_loss_sum(model, input_ids, attention_mask, labels)
    (loss_sum / n_tokens).backward()

The decoder runs once; the LM head is applied only to positions whose next token is a target
(``labels != -100``), so with response-only loss the prompt's (tokens x vocab) logits are never
formed. The cross-entropy is summed in fp32; callers divide by the token count (a mean over
target tokens, also across batches and clients when they add sums). Supports the causal-LM
families whose forward is ``lm_head(decoder(...).last_hidden_state)`` (Llama, Qwen2, Mistral,
and their relatives); a model with logit soft-capping is refused rather than trained wrongly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from cllora.data.formatting import IGNORE_INDEX

# target-logit elements (64 MB in fp32) above which `auto` stops forming all logits at once; on
# CPU also the size of one chunk of the fused path. Chunks of that size, not the kernels'
# default (logits about as big as the hidden states: 16-32 rows here), because on a CPU every
# chunk re-reads the whole (V x H) head: measured on 2 cores, SmolLM2-135M's head, 4096 tokens,
# forward + backward: 16-32-row chunks 1.5-2.2x slower than plain, 256-row chunks 0.85x of it.
CHUNKED_LOGITS = 16 * 2**20


def lm_loss_sum(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    loss: str = "auto",
    chunk: int = 0,
) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over target positions, and the number of targets.

    The inputs are moved to the model's device; ``loss`` / ``chunk`` pick how the LM-head
    cross-entropy is computed (:func:`head_loss_sum`)."""
    if getattr(model.config, "final_logit_softcapping", None):
        raise NotImplementedError("models with final_logit_softcapping are not supported yet")
    device = model.get_output_embeddings().weight.device
    input_ids, attention_mask, labels = (t.to(device) for t in (input_ids, attention_mask, labels))
    hidden = model.get_decoder()(
        input_ids=input_ids, attention_mask=attention_mask, use_cache=False
    ).last_hidden_state  # (B, T, H)
    picked, wanted, _ = select_targets(hidden, labels)
    if wanted.numel() == 0:
        return hidden.sum() * 0.0, 0
    return head_loss_sum(model.get_output_embeddings(), picked, wanted, loss, chunk), wanted.numel()


def select_targets(
    hidden: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The hidden states that predict a target and those targets: ``(picked (N, H), targets
    (N,), mask (B, T-1))`` from ``hidden (B, T, H)`` and ``labels (B, T)`` (position t predicts
    token t+1; ``IGNORE_INDEX`` labels are left out)."""
    targets = labels[:, 1:]  # (B, T-1)
    mask = targets != IGNORE_INDEX
    return hidden[:, :-1][mask], targets[mask], mask


LOSS_MODES = ("auto", "plain", "chunked", "fused")


def head_loss_sum(
    head: torch.nn.Module,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    mode: str = "auto",
    chunk: int = 0,
) -> torch.Tensor:
    """Summed fp32 cross-entropy of ``head(hidden (N, H))`` against ``targets (N,)``.

    ``mode`` (``train.loss``): ``plain`` forms the (N, V) logits; ``chunked`` at most
    ``chunk`` (0: 1024) x V of them at a time (:mod:`cllora.model.chunked_loss`); ``fused`` the
    Triton kernel on CUDA, its chunked reference on CPU (``chunk`` 0: automatic, see
    :data:`CHUNKED_LOGITS`); ``auto`` =
    fused on CUDA or past :data:`CHUNKED_LOGITS` logits, plain otherwise. A head with a bias
    always runs ``plain``.
    """
    if mode not in LOSS_MODES:
        raise ValueError(f"unknown loss mode {mode!r}; use one of {LOSS_MODES}")
    if mode == "auto":
        big = hidden.shape[0] * head.weight.shape[0] > CHUNKED_LOGITS
        mode = "fused" if hidden.is_cuda or big else "plain"
    if head.bias is not None or mode == "plain":
        return F.cross_entropy(head(hidden).float(), targets, reduction="sum")
    if mode == "chunked":
        from cllora.model.chunked_loss import chunked_lm_loss_sum

        return chunked_lm_loss_sum(hidden, head.weight, targets, chunk or 1024)
    from cllora.model.kernels import fused_lm_loss_sum

    if not chunk and not hidden.is_cuda:
        chunk = _cpu_chunk(head.weight.shape[0])
    return fused_lm_loss_sum(hidden, head.weight, targets, chunk_size=chunk or None)[0]


def _cpu_chunk(vocab: int) -> int:
    """Rows per chunk on CPU: a power of two near ``CHUNKED_LOGITS / vocab`` (>= 16)."""
    rows = max(16, CHUNKED_LOGITS // max(vocab, 1))
    return 1 << (rows.bit_length() - 1)
