"""NF4-packed weights as bitsandbytes stores them, and their pure-torch dequantization.

Usage::

    import bitsandbytes.functional as bnbf
    from cllora_kernels.nf4 import NF4Weight, dequantize_nf4

    packed, state = bnbf.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
    nf4 = NF4Weight.from_bnb(packed, state)      # also: NF4Weight.from_bnb(linear4bit.weight)
    w_hat = dequantize_nf4(nf4)                  # (N, K) in nf4.dtype, for references and tests

Layout (bitsandbytes 0.4x-0.50, checked against its ``functional.py`` and CPU backend): the weight
(N, K) is flattened row-major; element ``i`` belongs to block ``i // blocksize`` and its 4-bit code
is the high nibble of byte ``i // 2`` when ``i`` is even and the low nibble when ``i`` is odd. The
value is ``NF4_CODE[code] * absmax[i // blocksize]``. With double quantization
(``compress_statistics=True``) ``absmax`` itself is stored as uint8 codes into a 256-entry 8-bit
dynamic map: ``absmax[b] = code2[qabsmax[b]] * absmax2[b // blocksize2] + offset``.
"""

from __future__ import annotations

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


def block_absmax(w: NF4Weight) -> torch.Tensor:
    """Per-block scales (n_blocks,) fp32, undoing the double quantization if any."""
    if not w.nested:
        return w.absmax.float()
    blocks = torch.arange(w.absmax.numel(), device=w.device) // w.blocksize2
    return w.code2[w.absmax.long()] * w.absmax2[blocks] + w.offset


def dequantize_nf4(w: NF4Weight) -> torch.Tensor:
    """The full (N, K) weight in ``w.dtype`` (materialised: references and tests only)."""
    n, k = w.shape
    codes = torch.stack([w.packed >> 4, w.packed & 0xF], dim=-1).reshape(-1)[: n * k]  # (N*K,)
    levels = torch.tensor(NF4_LEVELS, device=w.device)
    scale = block_absmax(w).repeat_interleave(w.blocksize)[: n * k]  # (N*K,)
    return (levels[codes.long()] * scale).reshape(n, k).to(w.dtype)
