"""Gradient (activation) checkpointing per decoder layer, with optional CPU offload on CUDA.

Usage::

    from cllora.model.checkpointing import enable_checkpointing, disable_checkpointing

    enable_checkpointing(model)                    # every decoder layer recomputed in backward
    enable_checkpointing(model, offload=True)      # CUDA: saved layer inputs go to pinned host RAM
    enable_checkpointing(model, every_n_layers=2)  # half the layers: trade memory back for speed
    disable_checkpointing(model)

This is transformers' own ``activation_checkpointing_enable`` (every Llama/Qwen2/Mistral decoder
layer is a ``GradientCheckpointingLayer``) with non-reentrant ``torch.utils.checkpoint``, which
works with our :class:`~cllora.model.lora.LoRALinear` without making the inputs require grad.
Checkpointing is active only in ``model.train()`` mode; evaluation and ``generate()`` are
unaffected. Offload wraps each layer's checkpoint in ``torch.autograd.graph.save_on_cpu`` and
is ignored without CUDA (on CPU the activations already live in host memory). Gradients equal
those without checkpointing (tested).
"""

from __future__ import annotations

import warnings

import torch
from transformers import PreTrainedModel


def enable_checkpointing(
    model: PreTrainedModel, offload: bool = False, every_n_layers: int = 1
) -> None:
    """Checkpoint every ``every_n_layers``-th decoder layer; ``offload`` only acts on CUDA."""
    if every_n_layers < 1:
        raise ValueError(f"every_n_layers must be >= 1, got {every_n_layers}")
    on_cuda = next(model.parameters()).device.type == "cuda"
    if offload and not on_cuda:
        warnings.warn("checkpoint offload needs CUDA; ignored on CPU", stacklevel=2)
    model.activation_checkpointing_enable(
        activation_checkpointing_kwargs={"use_reentrant": False},
        every_n_layers=every_n_layers,
        offload=offload and on_cuda and torch.cuda.is_available(),
    )


def disable_checkpointing(model: PreTrainedModel) -> None:
    """Keep every activation again (the default)."""
    model.activation_checkpointing_disable()


def is_checkpointing(model: PreTrainedModel) -> bool:
    """Whether any decoder layer is checkpointed."""
    return any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
