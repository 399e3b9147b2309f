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

IGNORE_INDEX = -100
CHUNKED_LOGITS = 64 * 2**20  # target-logit elements (256 MB in fp32) above which we chunk


def lm_loss_sum(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over target positions, and the number of targets."""
    if getattr(model.config, "final_logit_softcapping", None):
        raise NotImplementedError("models with final_logit_softcapping are not supported yet")
    hidden = model.get_decoder()(
        input_ids=input_ids, attention_mask=attention_mask, use_cache=False
    ).last_hidden_state  # (B, T, H)
    targets = labels[:, 1:]  # (B, T-1): position t predicts token t+1
    mask = targets != IGNORE_INDEX
    n = int(mask.sum())
    if n == 0:
        return hidden.sum() * 0.0, 0
    picked = hidden[:, :-1][mask]  # (N, H)
    head = model.get_output_embeddings()
    if head.bias is None and (picked.is_cuda or n * head.weight.shape[0] > CHUNKED_LOGITS):
        from cllora.model.kernels import fused_lm_loss_sum

        return fused_lm_loss_sum(picked, head.weight, targets[mask])
    logits = head(picked).float()  # (N, V)
    return F.cross_entropy(logits, targets[mask], reduction="sum"), n
