"""Attention on packed sequences: one dispatch over flash-attn varlen, torch varlen and SDPA.

Usage::

    from cllora.model.attention import enable_packed_attention, use_backend
    from cllora.model.loss import batch_loss_sum

    enable_packed_attention(model)            # the model's attention now goes through this module
    batch = collate_packed(row)               # cllora.model.packing
    loss_sum, n = batch_loss_sum(model, batch)
    with use_backend("sdpa_mask"):            # override hook: force one path (tests, benchmarks)
        ...

How a transformers model uses it: :func:`enable_packed_attention` registers
:func:`packed_attention_forward` under the name ``"cllora_varlen"`` in transformers'
``AttentionInterface`` (and the FA2-style 2D padding mask in ``AttentionMaskInterface``), then
calls the model's public ``set_attn_implementation``. Llama, Qwen2 and Mistral pass the
decoder's ``**kwargs`` (``position_ids`` and the FlashAttention kwargs ``cu_seq_lens_q``,
``max_length_q``) down to the attention function, so nothing of transformers is patched.

Inside the attention function, for queries (B, Hq, T, D) and keys/values (B, Hkv, T, D):

- ``cu_seq_lens_q`` given, or no padding mask and ``position_ids`` that restart (packed): the
  B*T tokens are one varlen sequence set and go to :func:`varlen_attention`.
- otherwise (ordinary padded batches, evaluation, ``generate()`` with a KV cache): dense SDPA
  with a causal + key-padding mask, the same result as transformers' ``sdpa``.

Backends of :func:`varlen_attention` (``BACKENDS``), chosen by :func:`select_backend` in this order:
``flash_attn`` (the flash-attn package, CUDA, fp16/bf16; the optional ``gpu`` extra),
``torch_varlen`` (``torch.nn.attention.varlen.varlen_attn``, CUDA, fp16/bf16), ``sdpa_segments``
(SDPA once per sample, causal: memory O(max sample^2); the CPU default) and ``sdpa_mask`` (one
SDPA call over the whole row with a block-diagonal causal mask: memory O(T^2); a cross-check).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import inspect
import itertools
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

ATTN_NAME = "cllora_varlen"
BACKENDS = ("flash_attn", "torch_varlen", "sdpa_segments", "sdpa_mask")
_forced: str | None = None


def available_backends(device: torch.device, dtype: torch.dtype) -> list[str]:
    """Backends that can run on this device and dtype, in preference order."""
    names = []
    half = dtype in (torch.float16, torch.bfloat16)
    if device.type == "cuda" and half:
        if importlib.util.find_spec("flash_attn") is not None:
            names.append("flash_attn")
        if importlib.util.find_spec("torch.nn.attention.varlen") is not None:
            names.append("torch_varlen")
    return [*names, "sdpa_segments", "sdpa_mask"]


def select_backend(device: torch.device, dtype: torch.dtype) -> str:
    """The forced backend (see :func:`use_backend`) or the first available one."""
    if _forced is not None:
        return _forced
    return available_backends(device, dtype)[0]


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Force a backend inside the block (``None``: automatic). The override hook for tests."""
    global _forced
    if name is not None and name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; use one of {BACKENDS}")
    previous, _forced = _forced, name
    try:
        yield
    finally:
        _forced = previous


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    scale: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Causal attention within each segment of packed tokens; never across segments.

    q (T, Hq, D), k and v (T, Hkv, D) with Hq a multiple of Hkv (GQA), ``cu_seqlens`` (S+1,)
    int32 segment boundaries with ``cu_seqlens[-1] == T``. Returns (T, Hq, D).
    """
    name = backend or select_backend(q.device, q.dtype)
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    if name == "flash_attn":
        from flash_attn import flash_attn_varlen_func

        return flash_attn_varlen_func(
            q, k, v, cu, cu, max_seqlen, max_seqlen, softmax_scale=scale, causal=True
        )
    if name == "torch_varlen":
        from torch.nn.attention.varlen import varlen_attn

        params = _varlen_params()
        # torch >= 2.12: causal = window (-1, 0), GQA built in; torch 2.9-2.11: is_causal, and
        # the K/V heads repeated for GQA (no enable_gqa there: benchmarks/results/e2e-gpu.md)
        causal = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
        if q.shape[1] != k.shape[1]:
            if "enable_gqa" in params:
                causal["enable_gqa"] = True
            else:
                rep = q.shape[1] // k.shape[1]
                k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        return varlen_attn(q, k, v, cu, cu, max_seqlen, max_seqlen, scale=scale, **causal)
    if name == "sdpa_segments":
        return _sdpa_segments(q, k, v, cu.tolist(), scale)
    if name == "sdpa_mask":
        return _sdpa_block_mask(q, k, v, cu, scale)
    raise ValueError(f"unknown attention backend {name!r}; use one of {BACKENDS}")


@functools.cache
def _varlen_params() -> frozenset[str]:
    """Keyword names of this torch's ``varlen_attn`` (read once: it is called per layer)."""
    from torch.nn.attention.varlen import varlen_attn

    return frozenset(inspect.signature(varlen_attn).parameters)


def _sdpa_segments(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bounds: list[int], scale: float | None
) -> torch.Tensor:
    gqa = q.shape[1] != k.shape[1]
    outs = []
    for s, e in itertools.pairwise(bounds):
        if e == s:
            continue
        qs, ks, vs = (t[s:e].transpose(0, 1)[None] for t in (q, k, v))  # (1, H, L, D)
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=gqa)
        outs.append(o[0].transpose(0, 1))  # (L, Hq, D)
    return torch.cat(outs, 0)


def _sdpa_block_mask(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, scale: float | None
) -> torch.Tensor:
    t = q.shape[0]
    idx = torch.arange(t, device=q.device)
    seg = torch.searchsorted(cu[1:].long(), idx, right=True)  # (T,) segment of each token
    mask = (seg[:, None] == seg[None, :]) & (idx[:, None] >= idx[None, :])  # (T, T)
    qs, ks, vs = (x.transpose(0, 1)[None] for x in (q, k, v))  # (1, H, T, D)
    o = F.scaled_dot_product_attention(
        qs, ks, vs, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )
    return o[0].transpose(0, 1)  # (T, Hq, D)


def cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> tuple[torch.Tensor, int] | None:
    """(cu_seqlens, max_seqlen) of the flattened tokens when ``position_ids`` restart; else None.

    A new segment starts wherever the position does not follow the previous one by 1 (and at
    the start of every row), as transformers' own packed-sequence detection does.
    """
    pos = position_ids.reshape(position_ids.shape[0], -1)  # (B, T)
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    if pos.shape[0] == 1 and int(starts.sum()) == 1:
        return None  # a single ordinary sequence
    flat = torch.nonzero(starts.reshape(-1)).flatten()
    cu = torch.cat([flat, flat.new_tensor([pos.numel()])]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def packed_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: query (B, Hq, Tq, D), key/value (B, Hkv, Tk, D)
    -> (B, Tq, Hq, D). Registered as ``"cllora_varlen"`` by :func:`enable_packed_attention`."""
    b, hq, tq, d = query.shape
    tk = key.shape[2]
    cu, max_len = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
    if cu is None and attention_mask is None and tq == tk and tq > 1:
        pos = kwargs.get("position_ids")
        found = cu_seqlens_from_position_ids(pos) if pos is not None else None
        if found is not None:
            cu, max_len = found
    if cu is not None:
        if max_len is None:
            max_len = int((cu[1:] - cu[:-1]).max())
        q, k, v = (x.transpose(1, 2).reshape(b * tq, x.shape[1], d) for x in (query, key, value))
        out = varlen_attention(q, k, v, cu, int(max_len), scale=scaling)  # (B*T, Hq, D)
        return out.view(b, tq, hq, d), None
    return _dense_sdpa(query, key, value, attention_mask, dropout, scaling), None


def _dense_sdpa(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    pad_mask: torch.Tensor | None,
    dropout: float,
    scaling: float | None,
) -> torch.Tensor:
    """Causal SDPA with an optional 2D key-padding mask (B, Tk); queries are the last Tq keys."""
    tq, tk = query.shape[2], key.shape[2]
    gqa = query.shape[1] != key.shape[1]
    if pad_mask is None:
        out = F.scaled_dot_product_attention(
            query, key, value, dropout_p=dropout, is_causal=tq > 1, scale=scaling, enable_gqa=gqa
        )
    else:
        qi = torch.arange(tk - tq, tk, device=query.device)
        kj = torch.arange(tk, device=query.device)
        mask = (kj[None, :] <= qi[:, None])[None, None] & pad_mask[:, None, None, -tk:].bool()
        mask = mask | ~mask.any(-1, keepdim=True)  # fully masked (pad) rows: avoid NaN
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling, enable_gqa=gqa
        )
    return out.transpose(1, 2).contiguous()  # (B, Tq, Hq, D)


def register_packed_attention() -> None:
    """Register ``"cllora_varlen"`` in transformers' attention and mask registries (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(ATTN_NAME, packed_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, flash_attention_mask)


def enable_packed_attention(model: nn.Module) -> None:
    """Route ``model``'s attention through :func:`packed_attention_forward` (explicit opt-in)."""
    register_packed_attention()
    model.set_attn_implementation(ATTN_NAME)
