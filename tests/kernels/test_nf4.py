"""The exact 4-bit decoder (``cllora_kernels.nf4.dequantize_bnb_4bit``, shared by
``dequantize_nf4``) against bitsandbytes' encoder, and the NF4 Triton path against it.

bitsandbytes' own decoder is not the oracle: from 0.49 on its native CPU ``dequantize_4bit``
mis-scales blocks that straddle rows. The oracles are (1) the encoder: ``quantize_4bit`` of the
decoded weight gives back the packed bytes and the block scales bit for bit, and (2) the format's
maths written out element by element, with bitsandbytes' own 8-bit ``dequantize_blockwise`` for
the nested scales. bitsandbytes' 4-bit decoder is compared only on shapes whose rows hold whole
blocks, where every version decodes right (``tests/model/test_quant.py`` detects the bug itself).
The Triton kernel decodes the packed weight inside the tile loop."""

from __future__ import annotations

import cllora_kernels as ck
import pytest
import torch
import torch.nn.functional as F
from cllora_kernels import NF4Weight, dequantize_bnb_4bit, dequantize_nf4

from .util import assert_close, randn

bnbf = pytest.importorskip("bitsandbytes.functional")

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # every blocksize quantize_4bit accepts

NF4_CASES = [  # (N, K, blocksize, double quant); blocks straddle rows when K % blocksize != 0
    (53, 72, 64, False),
    (53, 72, 64, True),
    (67, 130, 128, True),
    (16, 16, 32, False),
]


def _shapes(blocksize: int) -> list[tuple[int, int]]:
    """Blocks straddling rows with a partial last block; one partial block (K < blocksize);
    more than 256 blocks at the small blocksizes (two blocks of nested scales)."""
    return [(3, blocksize + blocksize // 2 + 2), (5, 6), (67, 130)]


def _quantize(w: torch.Tensor, blocksize: int, nested: bool, quant_type: str = "nf4"):
    return bnbf.quantize_4bit(
        w, blocksize=blocksize, compress_statistics=nested, quant_type=quant_type
    )


def _scales(state) -> torch.Tensor:
    """Block scales by bitsandbytes' own arithmetic (its 8-bit decoder for nested ones)."""
    if not state.nested:
        return state.absmax.float()
    return bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset


def _codes(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """4-bit codes in element order: high nibble of byte i // 2 for even i, low for odd."""
    flat = packed.reshape(-1).view(torch.uint8).long()
    i = torch.arange(numel)
    return torch.where(i % 2 == 0, flat[i // 2] >> 4, flat[i // 2] & 0xF)


@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True])
def test_decoded_weight_reencodes_bit_for_bit(gen, blocksize, quant_type, nested):
    """Oracle 1: re-encoding the decoded weight (fp32, not nested) reproduces the 4-bit codes and
    the block scales. FP4 has two codes of value zero (0 and 8) and bitsandbytes writes either
    for values that round to zero: those compare as one."""
    for n, k in _shapes(blocksize):
        packed, state = _quantize(randn(gen, n, k), blocksize, nested, quant_type)
        w_hat = dequantize_bnb_4bit(packed, state)
        assert w_hat.shape == (n, k) and w_hat.dtype == torch.float32
        packed2, state2 = _quantize(w_hat, blocksize, False, quant_type)
        assert torch.equal(state2.absmax, _scales(state)), (n, k)
        codes, codes2 = _codes(packed, n * k), _codes(packed2, n * k)
        zero = state.code[codes] == 0
        assert torch.equal(state.code[codes2] == 0, zero), (n, k)
        assert torch.equal(codes[~zero], codes2[~zero]), (n, k)


@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decoded_weight_is_the_format_maths(gen, blocksize, quant_type, nested, dtype):
    """Oracle 2: element i is ``code[nibble i] * scale[i // blocksize]`` (fp32, then cast), the
    nested scales ``dequantize_blockwise(qabsmax, state2) + offset``; NF4 views decode the same."""
    for n, k in _shapes(blocksize):
        packed, state = _quantize(randn(gen, n, k, dtype=dtype), blocksize, nested, quant_type)
        block = torch.arange(n * k) // blocksize
        fp32 = (state.code[_codes(packed, n * k)] * _scales(state)[block]).view(n, k)
        want = fp32.to(dtype)
        got = dequantize_bnb_4bit(packed, state)
        assert got.dtype == dtype and torch.equal(got, want), (n, k)
        assert torch.equal(dequantize_bnb_4bit(packed, state, dtype=torch.float32), fp32)
        if quant_type == "nf4":
            assert torch.equal(dequantize_nf4(NF4Weight.from_bnb(packed, state)), want)


@pytest.mark.parametrize("blocksize", [32, 64, 4096])
@pytest.mark.parametrize("nested", [False, True])
def test_bitsandbytes_decoder_agrees_where_rows_hold_whole_blocks(gen, blocksize, nested):
    """Where K is a multiple of the blocksize no block straddles a row: bitsandbytes' decoder
    (right there in every version) and the exact one agree bit for bit."""
    packed, state = _quantize(randn(gen, 5, 2 * blocksize), blocksize, nested)
    assert torch.equal(bnbf.dequantize_4bit(packed, state), dequantize_bnb_4bit(packed, state))


@pytest.mark.parametrize("n,k,blocksize,nested", NF4_CASES)
def test_nf4_view_fields(gen, n, k, blocksize, nested):
    packed, state = _quantize(randn(gen, n, k), blocksize, nested)
    nf4 = NF4Weight.from_bnb(packed, state)
    assert nf4.nested == nested and nf4.shape == (n, k) and nf4.blocksize == blocksize
    assert torch.equal(dequantize_nf4(nf4), dequantize_bnb_4bit(packed, state))


@pytest.mark.parametrize("n,k,blocksize,nested", NF4_CASES)
@pytest.mark.parametrize("bias", [False, True])
def test_lora_linear_nf4_vs_exact_decoding(gen, n, k, blocksize, nested, bias):
    packed, state = _quantize(randn(gen, n, k, scale=k**-0.5), blocksize, nested)
    w_ref = dequantize_bnb_4bit(packed, state)  # (N, K) fp32, as bitsandbytes encoded it
    r, s = 6, 2.0
    x = randn(gen, 3, 11, k, grad=True)
    a, b = randn(gen, r, k, scale=0.2, grad=True), randn(gen, n, r, scale=0.2, grad=True)
    bvec = randn(gen, n) if bias else None
    with ck.backend("triton"):
        y = ck.lora_linear(x, NF4Weight.from_bnb(packed, state), a, b, s, bvec)
    y_ref = F.linear(x, w_ref, bvec) + s * (x @ a.T) @ b.T
    assert_close(y, y_ref, 1e-5, 1e-5, "y")
    dy = randn(gen, *y.shape)
    grads = torch.autograd.grad(y, (x, a, b), dy)
    grads_ref = torch.autograd.grad(y_ref, (x, a, b), dy)
    for got, want, name in zip(grads, grads_ref, "xAB", strict=True):
        assert_close(got, want, 1e-4, 1e-4, f"d{name}")


def test_from_linear4bit_params(gen):
    """``NF4Weight.from_bnb(layer.weight)`` reads a ``bnb.nn.Linear4bit``'s Params4bit."""
    bnb = pytest.importorskip("bitsandbytes")
    layer = torch.nn.Linear(40, 24)
    q = bnb.nn.Linear4bit(40, 24, quant_type="nf4", compress_statistics=True)
    q.load_state_dict(layer.state_dict())
    q = q.to("cpu")  # quantizes (bitsandbytes' CPU backend)
    x = randn(gen, 5, 40)
    expected = F.linear(x, dequantize_bnb_4bit(q.weight, q.weight.quant_state), q.bias).detach()
    nf4 = NF4Weight.from_bnb(q.weight)
    a, b = randn(gen, 2, 40), torch.zeros(24, 2)
    with ck.backend("triton"), torch.no_grad():
        y = ck.lora_linear(x, nf4, a, b, 1.0, q.bias)
    assert_close(y, expected, 1e-4, 1e-4, "Linear4bit")


def test_refusals(gen):
    packed, state = bnbf.quantize_4bit(randn(gen, 8, 8), quant_type="fp4")
    with pytest.raises(ValueError, match="NF4"):
        NF4Weight.from_bnb(packed, state)
    with pytest.raises(ValueError, match="do not fit"):
        dequantize_bnb_4bit(packed[:-1], state)
