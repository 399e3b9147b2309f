"""Causal-LM loss computed only where there are targets: the one LM-loss path of cllora.

Usage::

    from cllora.model.loss import batch_loss_sum, lm_loss_sum, row_loss_sums
    loss_sum, n_tokens = batch_loss_sum(model, batch)     # a padded or a packed batch (a dict)
    (loss_sum / n_tokens).backward()
    loss_sum, n_tokens = lm_loss_sum(model, input_ids, attention_mask, labels)  # the same, padded
    sums, counts = row_loss_sums(model, batch)            # evaluation: per row, under no_grad

Training (plain, chunked, fused; padded or packed) and evaluation all go through
:func:`target_hidden`: the decoder runs once, and only the hidden states at positions whose next
token is a target (``labels != -100``) reach the LM head, so with response-only loss the
prompt's (tokens x vocab) logits are never formed. A batch is padded (``input_ids``,
``attention_mask``, ``labels``: :func:`cllora.model.batching.collate`) or packed (``input_ids``,
``position_ids``, ``cu_seqlens``, ``max_seqlen``, ``labels``:
:mod:`cllora.model.packing`; needs packed attention, :mod:`cllora.model.attention`).
The cross-entropy is summed in fp32; callers divide by the token count (a mean over target
tokens, also across batches and clients when they add sums). Supports the causal-LM families
whose forward is ``lm_head(decoder(...).last_hidden_state)`` (Llama, Qwen2, Mistral, and their
relatives); a model with logit soft-capping is refused rather than trained wrongly.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from cllora.data.formatting import IGNORE_INDEX

# target-logit elements (64 MB in fp32) above which `auto` stops forming all logits at once; on
# CPU also the size of one chunk of the fused path. Chunks of that size, not the kernels'
# default (logits about as big as the hidden states), because on a CPU every chunk re-reads the
# whole (V x H) head: small chunks are slower than plain cross-entropy, chunks of this size are
# not (benchmarks/results/e2e-cpu.md, "After the LoRA, lean-kernel and allocator work").
CHUNKED_LOGITS = 16 * 2**20
EVAL_CHUNK = 2048  # target rows whose logits exist at once in row_loss_sums


def target_hidden(
    model: PreTrainedModel, batch: dict[str, Any]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the decoder on ``batch`` (padded or packed, see the module doc); return
    ``(picked (N, H), targets (N,), mask (B, T-1))``: the hidden states that predict a target,
    those targets, and where they are (:func:`select_targets`)."""
    if getattr(model.config, "final_logit_softcapping", None):
        raise NotImplementedError("models with final_logit_softcapping are not supported yet")
    device = model.get_input_embeddings().weight.device
    kwargs: dict[str, Any] = {"input_ids": batch["input_ids"].to(device), "use_cache": False}
    if "cu_seqlens" in batch:  # packed: attention kept inside each sequence of a row
        cu = batch["cu_seqlens"].to(device)
        kwargs.update(
            position_ids=batch["position_ids"].to(device),
            cu_seq_lens_q=cu, cu_seq_lens_k=cu,
            max_length_q=batch["max_seqlen"], max_length_k=batch["max_seqlen"],
        )  # fmt: skip
    else:
        kwargs["attention_mask"] = batch["attention_mask"].to(device)
    hidden = model.get_decoder()(**kwargs).last_hidden_state  # (B, T, H)
    return select_targets(hidden, batch["labels"].to(hidden.device))


def batch_loss_sum(
    model: PreTrainedModel, batch: dict[str, Any], loss: str = "auto", chunk: int = 0
) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over the target positions of ``batch``, and their count.

    ``loss`` / ``chunk`` (``train.loss`` / ``train.loss_chunk``) pick how the LM-head
    cross-entropy is computed (:func:`head_loss_sum`)."""
    picked, wanted, _ = target_hidden(model, batch)
    if wanted.numel() == 0:
        return picked.sum() * 0.0, 0
    return head_loss_sum(model.get_output_embeddings(), picked, wanted, loss, chunk), wanted.numel()


def lm_loss_sum(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    loss: str = "auto",
    chunk: int = 0,
) -> tuple[torch.Tensor, int]:
    """:func:`batch_loss_sum` of a padded batch given as its three tensors."""
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    return batch_loss_sum(model, batch, loss, chunk)


@torch.no_grad()
def row_loss_sums(model: PreTrainedModel, batch: dict[str, Any]) -> tuple[list, list]:
    """Summed cross-entropy of each row of a padded ``batch`` over its targets, and its target
    count (evaluation; at most :data:`EVAL_CHUNK` target rows of logits exist at once)."""
    picked, wanted, mask = target_hidden(model, batch)
    head = model.get_output_embeddings()
    ce = torch.cat(
        [
            F.cross_entropy(head(picked[s : s + EVAL_CHUNK]).float(), wanted[s : s + EVAL_CHUNK],
                            reduction="none")
            for s in range(0, picked.shape[0], EVAL_CHUNK)
        ]
        or [picked.new_zeros(0, dtype=torch.float32)]
    )  # fmt: skip
    rows = torch.arange(mask.shape[0], device=mask.device).unsqueeze(1).expand_as(mask)[mask]
    sums = torch.zeros(mask.shape[0], device=ce.device).index_add_(0, rows.to(ce.device), ce)
    return sums.tolist(), mask.sum(1).tolist()


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
    ``chunk`` (0: 1024) x V of them at a time, in pure torch on any device
    (``cllora_kernels.reference.linear_cross_entropy``: dL/dhidden formed in the same pass,
    no recomputation in the backward); ``fused`` the
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
    if mode == "chunked":  # the chunked pure-torch path, on any device
        from cllora_kernels.reference import linear_cross_entropy

        return linear_cross_entropy(
            hidden, head.weight, targets, IGNORE_INDEX, "sum", chunk or 1024
        )
    from cllora.model.kernels import fused_lm_loss_sum

    if not chunk and not hidden.is_cuda:
        chunk = _cpu_chunk(head.weight.shape[0])
    return fused_lm_loss_sum(hidden, head.weight, targets, chunk_size=chunk or None)[0]


def _cpu_chunk(vocab: int) -> int:
    """Rows per chunk on CPU: a power of two near ``CHUNKED_LOGITS / vocab`` (>= 16)."""
    rows = max(16, CHUNKED_LOGITS // max(vocab, 1))
    return 1 << (rows.bit_length() - 1)
