"""bitsandbytes' 4-bit weights (NF4 and FP4) decoded exactly as bitsandbytes encodes them.

Usage::

    import bitsandbytes.functional as bnbf
    from cllora_kernels.nf4 import NF4Weight, dequantize_bnb_4bit, dequantize_nf4

    packed, state = bnbf.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
    w_hat = dequantize_bnb_4bit(packed, state)   # (N, K) in state.dtype; NF4 or FP4, any blocksize
    nf4 = NF4Weight.from_bnb(packed, state)      # also: NF4Weight.from_bnb(linear4bit.weight)
    w_hat = dequantize_nf4(nf4)                  # the same weight, from the kernels' NF4 view

Layout (the encoding of ``bitsandbytes.functional.quantize_4bit``, 0.4x-0.50, read from its
``functional.py`` and backends): the weight (N, K) is flattened row-major; element ``i`` belongs
to block ``i // blocksize`` (blocks straddle rows when ``K % blocksize != 0``; the last block may
be partial) and its 4-bit code is the high nibble of byte ``i // 2`` when ``i`` is even and the
low nibble when ``i`` is odd. The value is ``code[c] * absmax[i // blocksize]``, computed in fp32
and then cast to the weight's dtype, with ``code`` the 16-entry table of the quantization type
(``NF4_LEVELS`` for NF4, ``quant_state.code`` in general). With double quantization
(``compress_statistics=True``) ``absmax`` itself is stored as uint8 codes into a 256-entry 8-bit
dynamic map: ``absmax[b] = code2[qabsmax[b]] * absmax2[b // blocksize2] + offset``.

Why cllora decodes this itself: bitsandbytes' own decoder does not always agree with its encoder.
From 0.49 on, its native CPU ``dequantize_4bit`` (and so ``matmul_4bit`` on CPU, which decodes with
it) indexes the block scales within each row, which mis-scales blocks that straddle row boundaries
(for many shapes with ``K % blocksize != 0``). :func:`dequantize_bnb_4bit` follows the flat encoding
above and is the decoder cllora trusts: ``cllora.model.quant`` checks bitsandbytes' decoder against
it once per layer and computes with this one wherever the two disagree. ``dequantize_nf4``
(references and tests of the Triton kernel, whose tiles decode the same layout) shares its decoding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# The 16 NF4 levels (QLoRA, Dettmers et al. 2023): quantiles of N(0, 1) normalised to [-1, 1],
# with an exact zero. Same numbers as bitsandbytes' table (values of the published data type).
NF4_LEVELS: tuple[float, ...] = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)


@dataclass
class NF4Weight:
    """A packed NF4 weight of logical shape (N, K) (``shape``), output dtype ``dtype``.

    ``packed`` (N*K/2,) uint8; ``absmax`` (n_blocks,) fp32 when not nested, else uint8 codes with
    ``code2`` (256,) fp32, ``absmax2`` (n_blocks2,) fp32, ``blocksize2`` and ``offset``.
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    shape: tuple[int, int]
    blocksize: int
    dtype: torch.dtype
    code2: torch.Tensor | None = None
    absmax2: torch.Tensor | None = None
    blocksize2: int = 256
    offset: float = 0.0

    @property
    def nested(self) -> bool:
        return self.code2 is not None

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @classmethod
    def from_bnb(cls, packed: torch.Tensor, quant_state: object | None = None) -> NF4Weight:
        """Wrap a bitsandbytes NF4 tensor (``Params4bit`` or the output of ``quantize_4bit``).

        No copy: the fields view bitsandbytes' own buffers. Raises for FP4 or 3-D+ weights.
        """
        qs = quant_state if quant_state is not None else getattr(packed, "quant_state", None)
        if qs is None:
            raise ValueError("no bitsandbytes quant_state: pass it or a Params4bit weight")
        if qs.quant_type != "nf4":
            raise ValueError(f"only NF4 is supported, got quant_type={qs.quant_type!r}")
        if len(qs.shape) != 2:
            raise ValueError(f"expected a 2-D weight, got shape {tuple(qs.shape)}")
        flat = packed.reshape(-1)
        if flat.dtype != torch.uint8:
            flat = flat.view(torch.uint8)
        shape = (int(qs.shape[0]), int(qs.shape[1]))
        if qs.nested:
            return cls(
                packed=flat,
                absmax=qs.absmax.reshape(-1),
                shape=shape,
                blocksize=int(qs.blocksize),
                dtype=qs.dtype,
                code2=qs.state2.code.float(),
                absmax2=qs.state2.absmax.float().reshape(-1),
                blocksize2=int(qs.state2.blocksize),
                offset=float(qs.offset),
            )
        return cls(flat, qs.absmax.float().reshape(-1), shape, int(qs.blocksize), qs.dtype)


def _nested_scales(
    qabsmax: torch.Tensor,
    code2: torch.Tensor,
    absmax2: torch.Tensor,
    blocksize2: int,
    offset: float | torch.Tensor,
) -> torch.Tensor:
    """Undo the double quantization: ``code2[qabsmax[b]] * absmax2[b // blocksize2] + offset``
    (fp32, one entry per 4-bit block; the per-block work is small beside the weight's)."""
    second = absmax2.float().reshape(-1).repeat_interleave(blocksize2)[: qabsmax.numel()]
    return code2.float()[qabsmax.reshape(-1).int()] * second + offset


def block_absmax(w: NF4Weight) -> torch.Tensor:
    """Per-block scales (n_blocks,) fp32, undoing the double quantization if any."""
    if not w.nested:
        return w.absmax.float()
    return _nested_scales(w.absmax, w.code2, w.absmax2, w.blocksize2, w.offset)


def _decode_flat(
    packed: torch.Tensor,
    scales: torch.Tensor,
    table: torch.Tensor,
    shape: tuple[int, ...],
    blocksize: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The decoding itself: ``table[code_i] * scales[i // blocksize]`` in fp32, cast to ``dtype``.

    ``packed`` (P,) uint8 holds two codes a byte (high nibble first); ``scales`` (n_blocks,)
    fp32. One (n_blocks, blocksize) fp32 buffer is written by a 256-entry byte -> (high, low)
    table lookup, the tail of the last partial block zeroed, and each row (one block) scaled
    in place by its block's scale; no per-element scale tensor is made.
    """
    numel = math.prod(shape)
    n_bytes, n_blocks = packed.numel(), scales.numel()
    if n_bytes != (numel + 1) // 2 or n_blocks != -(-numel // blocksize):
        raise ValueError(
            f"{n_bytes} bytes and {n_blocks} block scales do not fit shape {tuple(shape)} "
            f"with blocksize {blocksize}"
        )
    table = table.to(device=packed.device, dtype=torch.float32).reshape(16)
    pairs = torch.stack([table.repeat_interleave(16), table.repeat(16)], dim=1)  # (256, 2)
    flat = torch.empty(n_blocks * blocksize, dtype=torch.float32, device=packed.device)
    torch.index_select(pairs, 0, packed.int(), out=flat[: 2 * n_bytes].view(n_bytes, 2))
    flat[2 * n_bytes :].zero_()  # padding of the last partial block (blocksize is even)
    flat.view(n_blocks, blocksize).mul_(scales.to(flat.device).reshape(n_blocks, 1))
    return flat[:numel].view(shape).to(dtype)


def dequantize_nf4(w: NF4Weight) -> torch.Tensor:
    """The full (N, K) weight in ``w.dtype`` (materialised: references and tests only)."""
    table = torch.tensor(NF4_LEVELS, dtype=torch.float32, device=w.device)
    return _decode_flat(w.packed, block_absmax(w), table, w.shape, w.blocksize, w.dtype)


def dequantize_bnb_4bit(
    packed: torch.Tensor, quant_state: object, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Decode a bitsandbytes 4-bit weight exactly as ``quantize_4bit`` encoded it.

    ``packed``: the packed tensor (``Params4bit`` data or ``quantize_4bit``'s output, any
    storage dtype); ``quant_state``: its ``QuantState`` (NF4 or FP4, nested or not, any
    blocksize). Returns a tensor of ``quant_state.shape`` on ``packed``'s device in ``dtype``
    (default ``quant_state.dtype``), computed in fp32 and then cast, as bitsandbytes does. Use
    it instead of ``bitsandbytes.functional.dequantize_4bit`` wherever that may be wrong (see
    the module docstring). Raises for bitsandbytes' CPU inference layout, whose bytes are
    repacked.
    """
    qs = quant_state
    if getattr(qs, "packing_format_for_cpu", False):
        raise ValueError("weight is in bitsandbytes' CPU inference layout (repacked bytes)")
    if qs.code is None:
        raise ValueError("quant_state has no code table")
    flat = packed.reshape(-1)
    if flat.dtype != torch.uint8:
        flat = flat.view(torch.uint8)
    if qs.nested:
        s2 = qs.state2
        scales = _nested_scales(qs.absmax, s2.code, s2.absmax, int(s2.blocksize), qs.offset)
    else:
        scales = qs.absmax.float().reshape(-1)
    shape = tuple(int(d) for d in qs.shape)
    return _decode_flat(flat, scales, qs.code, shape, int(qs.blocksize), dtype or qs.dtype)
