"""The NF4 path against bitsandbytes itself: weights quantized by ``bitsandbytes.functional
.quantize_4bit`` (with and without double quantization), compared with its ``dequantize_4bit``
followed by a matmul. The Triton kernel decodes the packed weight inside the tile loop."""

from __future__ import annotations

import cllora_kernels as ck
import pytest
import torch
import torch.nn.functional as F
from cllora_kernels import NF4Weight, dequantize_nf4

from .util import assert_close, randn

bnbf = pytest.importorskip("bitsandbytes.functional")

NF4_CASES = [  # (N, K, blocksize, double quant); blocks straddle rows when K % blocksize != 0
    (53, 72, 64, False),
    (53, 72, 64, True),
    (67, 130, 128, True),
    (16, 16, 32, False),
]


def _quantize(w: torch.Tensor, blocksize: int, nested: bool) -> tuple[torch.Tensor, object]:
    return bnbf.quantize_4bit(w, blocksize=blocksize, compress_statistics=nested, quant_type="nf4")


@pytest.mark.parametrize("n,k,blocksize,nested", NF4_CASES)
def test_dequantize_matches_bitsandbytes(gen, n, k, blocksize, nested):
    packed, state = _quantize(randn(gen, n, k), blocksize, nested)
    nf4 = NF4Weight.from_bnb(packed, state)
    assert nf4.nested == nested and nf4.shape == (n, k)
    assert torch.equal(dequantize_nf4(nf4), bnbf.dequantize_4bit(packed, state))


@pytest.mark.parametrize("n,k,blocksize,nested", NF4_CASES)
@pytest.mark.parametrize("bias", [False, True])
def test_lora_linear_nf4_vs_bitsandbytes(gen, n, k, blocksize, nested, bias):
    packed, state = _quantize(randn(gen, n, k, scale=k**-0.5), blocksize, nested)
    w_bnb = bnbf.dequantize_4bit(packed, state)  # (N, K) fp32, bitsandbytes' own decoding
    r, s = 6, 2.0
    x = randn(gen, 3, 11, k, grad=True)
    a, b = randn(gen, r, k, scale=0.2, grad=True), randn(gen, n, r, scale=0.2, grad=True)
    bvec = randn(gen, n) if bias else None
    with ck.backend("triton"):
        y = ck.lora_linear(x, NF4Weight.from_bnb(packed, state), a, b, s, bvec)
    y_ref = F.linear(x, w_bnb, bvec) + s * (x @ a.T) @ b.T
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
    with torch.no_grad():
        expected = q(x)
    nf4 = NF4Weight.from_bnb(q.weight)
    a, b = randn(gen, 2, 40), torch.zeros(24, 2)
    with ck.backend("triton"), torch.no_grad():
        y = ck.lora_linear(x, nf4, a, b, 1.0, q.bias)
    assert_close(y, expected, 1e-4, 1e-4, "Linear4bit")


def test_fp4_refused(gen):
    packed, state = bnbf.quantize_4bit(randn(gen, 8, 8), quant_type="fp4")
    with pytest.raises(ValueError, match="NF4"):
        NF4Weight.from_bnb(packed, state)
