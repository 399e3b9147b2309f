"""Gradient (activation) checkpointing per decoder layer, with optional CPU offload on CUDA.

Usage::

    from cllora.model.checkpointing import enable_checkpointing, disable_checkpointing

    enable_checkpointing(model)                    # every decoder layer recomputed in backward
    enable_checkpointing(model, offload=True)      # CUDA: saved layer inputs go to pinned host RAM
    enable_checkpointing(model, every_n_layers=2)  # half the layers: trade memory back for speed
    enable_checkpointing(model, keep_attention=True)  # the recompute skips the attention kernel
    disable_checkpointing(model)

This is transformers' own ``activation_checkpointing_enable`` (every Llama/Qwen2/Mistral decoder
layer is a ``GradientCheckpointingLayer``) with non-reentrant ``torch.utils.checkpoint``, which
works with our :class:`~cllora.model.lora.LoRALinear` without making the inputs require grad.
Checkpointing is active only in ``model.train()`` mode; evaluation and ``generate()`` are
unaffected. Offload wraps each layer's checkpoint in ``torch.autograd.graph.save_on_cpu`` and
is ignored without CUDA (on CPU the activations already live in host memory). Gradients equal
those without checkpointing (tested).

``keep_attention=True`` (``train.checkpoint_policy=keep_attention``) is selective checkpointing
(``torch.utils.checkpoint.create_selective_checkpoint_contexts``): the outputs of the attention
kernel (the attention output and its log-sum-exp, see :data:`ATTENTION_OPS`) are kept from the
forward, and everything else of the layer is recomputed. The recompute then runs the cheap
projections, norms and RoPE but never the quadratic attention forward again; the price is one
more (tokens x heads x head_dim) tensor per layer, the size of the layer input (kept on the
device even with offload). Gradients are those of full checkpointing (tested).
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts
from transformers import PreTrainedModel

# Substrings of the names of the operators whose outputs `keep_attention` keeps: the fused
# attention kernels SDPA dispatches to (CPU flash, CUDA flash / memory-efficient / cuDNN), the
# kernels under torch's varlen attention and flash-attn's custom ops. SDPA's math fallback is a
# composite of matmuls and a softmax, never seen as one operator here: it is recomputed.
ATTENTION_OPS = (
    "scaled_dot_product_flash_attention",
    "scaled_dot_product_efficient_attention",
    "scaled_dot_product_cudnn_attention",
    "aten._flash_attention_forward",
    "aten._efficient_attention_forward",
    "torch_attn._varlen_attn",
    "flash_attn._flash_attn",
)


def keeps_output(op: object) -> bool:
    """Whether ``keep_attention`` keeps this operator's outputs (a forward attention kernel)."""
    name = str(op)
    return "backward" not in name and any(k in name for k in ATTENTION_OPS)


def _keep_attention_policy(ctx: object, op: object, *args: object, **kwargs: object):
    if keeps_output(op):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def enable_checkpointing(
    model: PreTrainedModel,
    offload: bool = False,
    every_n_layers: int = 1,
    keep_attention: bool = False,
) -> None:
    """Checkpoint every ``every_n_layers``-th decoder layer; ``offload`` only acts on CUDA;
    ``keep_attention`` keeps the attention kernels' outputs instead of recomputing them."""
    if every_n_layers < 1:
        raise ValueError(f"every_n_layers must be >= 1, got {every_n_layers}")
    on_cuda = next(model.parameters()).device.type == "cuda"
    if offload and not on_cuda:
        warnings.warn("checkpoint offload needs CUDA; ignored on CPU", stacklevel=2)
    kwargs: dict = {"use_reentrant": False}
    if keep_attention:
        kwargs["context_fn"] = functools.partial(
            create_selective_checkpoint_contexts, _keep_attention_policy
        )
    model.activation_checkpointing_enable(
        activation_checkpointing_kwargs=kwargs,
        every_n_layers=every_n_layers,
        offload=offload and on_cuda and torch.cuda.is_available(),
    )


def disable_checkpointing(model: PreTrainedModel) -> None:
    """Keep every activation again (the default)."""
    model.activation_checkpointing_disable()


def is_checkpointing(model: PreTrainedModel) -> bool:
    """Whether any decoder layer is checkpointed."""
    return any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
