"""The training model as a run's config describes it: base, LoRA, and the engine options.

Usage::

    from cllora.model.setup import build_model

    model, tokenizer, engine = build_model(cfg)   # cfg: cllora.config.Config
    engine   # {"device": "cuda:0", "quant": [...], "kernels": {...}, "checkpointing": ...}

Order (each step an explicit call of its own module, so each is usable alone):

1. :func:`cllora.model.load.load_model` on ``model.device`` in ``model.dtype`` (``model.attn=
   varlen`` routes attention through :mod:`cllora.model.attention`);
2. :func:`cllora.model.lora.inject_lora` at the global rank (seeded);
3. ``model.quant`` != none: :func:`cllora.model.quant.quantize_base` (the frozen base linears,
   also those inside the LoRA modules, become 4-bit; compute in the model's dtype);
4. ``train.checkpointing``: :func:`cllora.model.checkpointing.enable_checkpointing`;
5. ``model.kernels``: :func:`cllora.model.kernels.enable_kernels` last, so the fused LoRA
   linear sees the final (possibly NF4) base weight.

``train.release_memory`` (CPU) sets glibc's allocator policy first
(:func:`cllora.model.cpu_memory.release_freed_memory`): it is process-wide and stays set. On a
CPU with glibc, ``engine["cpu_buffers"]`` says whether torch's big buffers are page-aligned
(:func:`cllora.model.cpu_memory.align_large_buffers`, which ``cllora run`` applies to checkpointed
runs before importing torch: about half their peak RSS); a checkpointed run without it logs a
hint.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from cllora.config import Config, ConfigError
from cllora.model.load import load_model, resolve_device, resolve_dtype
from cllora.model.lora import inject_lora
from cllora.text import fields_line

log = logging.getLogger("cllora")


def check_engine(cfg: Config) -> None:
    """Engine settings that are valid alone but not together (a ConfigError before loading)."""
    if cfg.train.packing and cfg.model.attn != "varlen":
        raise ConfigError(
            "train.packing=true needs model.attn=varlen (attention that stays inside each "
            f"packed sample); got model.attn={cfg.model.attn}"
        )
    if cfg.model.attn_backend != "auto" and cfg.model.attn != "varlen":
        raise ConfigError(
            f"model.attn_backend={cfg.model.attn_backend} applies to model.attn=varlen only"
        )
    try:
        resolve_device(cfg.model.device)
    except ValueError as err:
        raise ConfigError(str(err)) from err


def _cpu_buffers(cfg: Config) -> dict[str, str]:
    from cllora.model.cpu_memory import (
        ALIGN_ENV,
        buffers_page_aligned,
        glibc,
        wants_aligned_buffers,
    )

    if glibc() is None:
        return {}
    if buffers_page_aligned():
        return {"cpu_buffers": "page-aligned"}
    if wants_aligned_buffers(cfg):
        log.info(
            "torch's CPU buffers are not page-aligned here, so glibc's heap fragments: set %s=1 "
            "before importing torch (cllora run does for checkpointed runs) for about half the "
            "peak RSS with checkpointing (cllora/model/cpu_memory.py)",
            ALIGN_ENV,
        )
    return {"cpu_buffers": "64-byte aligned"}


def build_model(cfg: Config, global_rank: int | None = None) -> tuple[Any, Any, dict[str, Any]]:
    """(model with LoRA, tokenizer, what was switched on); see the module docstring."""
    check_engine(cfg)
    device = resolve_device(cfg.model.device)
    released = False
    if cfg.train.release_memory and device.type != "cpu":
        log.warning("train.release_memory=true applies to CPU runs; ignored on %s", device)
    elif cfg.train.release_memory:
        from cllora.model.cpu_memory import release_freed_memory

        released = release_freed_memory()
        if not released:
            log.warning("train.release_memory=true needs glibc (Linux); ignored here")
    model, tokenizer = load_model(cfg.model, seed=cfg.seed, device=device)
    torch.manual_seed(cfg.seed)  # LoRA A's initialisation
    lora = cfg.lora
    rank = lora.r if global_rank is None else global_rank
    targets = inject_lora(model, rank, lora.alpha, lora.dropout, lora.target_modules)
    engine: dict[str, Any] = {"device": str(device), "lora_modules": len(targets)}
    if released:
        engine["release_memory"] = True
    if device.type == "cpu":
        engine.update(_cpu_buffers(cfg))
    if cfg.model.quant != "none":
        from cllora.model.quant import quantize_base

        engine["quant"] = cfg.model.quant
        engine["quantized_modules"] = len(
            quantize_base(
                model,
                cfg.model.quant,
                cfg.model.double_quant,
                compute_dtype=resolve_dtype(cfg.model.dtype, device),
            )
        )
    if cfg.train.checkpointing:
        from cllora.model.checkpointing import enable_checkpointing

        keep = cfg.train.checkpoint_policy == "keep_attention"
        enable_checkpointing(
            model, cfg.train.checkpoint_offload, cfg.train.checkpoint_every, keep_attention=keep
        )
        engine["checkpointing"] = f"every {cfg.train.checkpoint_every} layer(s)" + (
            ", attention kept" if keep else ""
        )
    kernels = cfg.model.kernels
    if kernels is True or kernels == "auto":
        from cllora.model.kernels import enable_kernels, kernels_supported

        if not kernels_supported(model) and kernels is True:
            log.warning("model.kernels=%s: no fused kernels for model type %r; left unfused",
                        kernels, getattr(model.config, "model_type", "?"))  # fmt: skip
        # auto: RMSNorm and SwiGLU only (Triton on CUDA, cllora_kernels.lean's autograd
        # Functions on CPU: fewer kept and transient buffers). The fused LoRA linear is correct
        # but so far slower than cuBLAS / bitsandbytes plus two thin matmuls (kernels/README.md,
        # "On a GPU"), so it is used only when asked for (model.kernels=true).
        swapped = enable_kernels(model, lora=kernels is True)
        engine["kernels"] = {k: len(v) for k, v in swapped.items() if v}
    log.info("engine: %s", fields_line(engine))
    return model, tokenizer, engine
