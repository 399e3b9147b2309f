"""Every Triton kernel against its torch reference, in the interpreter on CPU (fp32).

Run: ``python -m pytest tests/kernels -q`` (TRITON_INTERPRET=1 is set by tests/conftest.py when
there is no CUDA). Forward output and every gradient (``torch.autograd.grad``) are compared on
odd, non-power-of-two and long shapes; see ``conftest.poison_empty`` for the poisoned buffers.
"""

from __future__ import annotations

import cllora_kernels as ck
import pytest
import torch
import torch.nn.functional as F
from cllora_kernels import reference as ref

from .util import assert_close, randn

FP32 = (torch.float32, 2e-5, 2e-5)  # (dtype, atol, rtol)


def _grads(out, inputs, grad_out):
    outs = out if isinstance(out, tuple) else (out,)
    gos = grad_out if isinstance(grad_out, tuple) else (grad_out,)
    return torch.autograd.grad(outs, inputs, gos)


def test_poisoned_allocations():
    assert torch.isnan(torch.empty(3)).all() and torch.isnan(torch.empty_like(torch.ones(2))).all()


def test_dispatch_rule():
    x = torch.randn(3)
    assert ck.get_backend() == "auto" and not ck.use_triton(x)
    with ck.backend("triton"):
        assert ck.use_triton(x)
        with ck.backend("reference"):
            assert not ck.use_triton(x)
    assert ck.get_backend() == "auto"
    with pytest.raises(ValueError):
        ck.set_backend("cuda")


@pytest.mark.parametrize("shape", [(1,), (3, 37, 53), (2, 1031), (5000,)])
def test_swiglu(gen, shape):
    _, atol, rtol = FP32
    g, u = randn(gen, *shape, scale=3.0, grad=True), randn(gen, *shape, grad=True)
    with ck.backend("triton"):
        y = ck.swiglu(g, u)
    y_ref = ref.swiglu(g, u)
    assert_close(y, y_ref, atol, rtol, "y")
    dy = randn(gen, *shape)
    for got, want, name in zip(_grads(y, (g, u), dy), _grads(y_ref, (g, u), dy), "gu", strict=True):
        assert_close(got, want, atol, rtol, f"d{name}")


@pytest.mark.parametrize("shape", [(1, 1, 7), (5, 7, 99), (33, 1000), (3, 2050)])
@pytest.mark.parametrize("weight_grad", [True, False])
def test_rms_norm(gen, shape, weight_grad):
    _, atol, rtol = FP32
    x = randn(gen, *shape, scale=2.0, grad=True)
    w = (1.0 + randn(gen, shape[-1], scale=0.3)).requires_grad_(weight_grad)
    with ck.backend("triton"):
        y = ck.rms_norm(x, w, 1e-6)
    y_ref = ref.rms_norm(x, w, 1e-6)
    assert_close(y, y_ref, atol, rtol, "y")
    dy = randn(gen, *shape)
    inputs = (x, w) if weight_grad else (x,)
    for got, want in zip(_grads(y, inputs, dy), _grads(y_ref, inputs, dy), strict=True):
        assert_close(got, want, 1e-4 if got.dim() == 1 else atol, rtol, "grad")


ROPE_CASES = [  # (B, Hq, Hk, T, D, scaling)
    (1, 1, 1, 1, 2, 1.0),
    (2, 5, 2, 45, 40, 1.3),
    (1, 3, 1, 130, 64, 1.0),
]


@pytest.mark.parametrize("b,hq,hk,t,d,scaling", ROPE_CASES)
def test_rope(gen, b, hq, hk, t, d, scaling):
    rtol = FP32[2]
    q = randn(gen, b, t, hq, d).transpose(1, 2).requires_grad_()  # (B, Hq, T, D) non-contiguous
    k = randn(gen, b, hk, t, d, grad=True)
    # packed: two documents per row, positions restart at 0 at the second one
    cut = max(1, t // 3)
    pos = torch.cat([torch.arange(cut), torch.arange(t - cut)])[None].expand(b, t)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    with ck.backend("triton"):
        out = ck.rope(q, k, pos, inv_freq, scaling)
    out_ref = ref.rope(q, k, pos, inv_freq, scaling)
    for got, want in zip(out, out_ref, strict=True):
        assert_close(got, want, 1e-5 * max(1, t / 10), rtol, "rope")
    go = (randn(gen, *out[0].shape), randn(gen, *out[1].shape))
    for got, want in zip(_grads(out, (q, k), go), _grads(out_ref, (q, k), go), strict=True):
        assert_close(got, want, 1e-5 * max(1, t / 10), rtol, "rope grad")


def test_rope_broadcast_positions(gen):
    q, k = randn(gen, 2, 3, 9, 8), randn(gen, 2, 1, 9, 8)
    pos = torch.arange(9)[None]  # (1, T) as transformers passes it
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 8, 2).float() / 8))
    with ck.backend("triton"):
        out = ck.rope(q, k, pos, inv_freq)
    for got, want in zip(out, ref.rope(q, k, pos.expand(2, 9), inv_freq), strict=True):
        assert_close(got, want, 1e-5, 1e-5, "rope (1, T)")


CE_CASES = [  # (N, H, V, chunk, ignored rows)
    (1, 8, 5, None, []),
    (77, 24, 301, 16, list(range(5, 40))),  # chunks 1 and 2 entirely ignored
    (20, 16, 5000, 8, [0, 19]),  # V > the 4096 vocabulary block: online LSE over two blocks
    (130, 40, 999, 32, list(range(0, 130, 3))),
]


@pytest.mark.parametrize("n,h,v,chunk,ignored", CE_CASES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_linear_cross_entropy(gen, n, h, v, chunk, ignored, reduction):
    hid = randn(gen, n, h, grad=True)
    w = randn(gen, v, h, scale=0.5, grad=reduction == "sum")  # trainable head in half the cases
    t = torch.randint(0, v, (n,), generator=gen)
    t[ignored] = -100
    with ck.backend("triton"):
        loss = ck.linear_cross_entropy(hid, w, t, reduction=reduction, chunk_size=chunk)
    loss_ref = ref.linear_cross_entropy(hid, w, t, reduction=reduction, chunk_size=chunk)
    loss_naive = F.cross_entropy(hid @ w.T, t, reduction=reduction)
    assert_close(loss, loss_naive, 1e-4, 1e-5, "loss")
    assert_close(loss_ref, loss_naive, 1e-4, 1e-5, "loss ref")
    inputs = (hid, w) if w.requires_grad else (hid,)
    grads, grads_ref, grads_naive = (
        torch.autograd.grad(x, inputs) for x in (loss, loss_ref, loss_naive)
    )
    for got, ref_got, want, name in zip(grads, grads_ref, grads_naive, "hW", strict=False):
        assert_close(got, want, 1e-5 if name == "h" else 1e-4, 1e-4, f"d{name}")
        assert_close(ref_got, want, 1e-5 if name == "h" else 1e-4, 1e-4, f"d{name} ref")
    assert grads[0][ignored].abs().max() == 0 if ignored else True


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_linear_cross_entropy_all_ignored(gen, backend):
    hid = randn(gen, 10, 8, grad=True)
    w = randn(gen, 7, 8)
    t = torch.full((10,), -100)
    with ck.backend(backend):
        loss = ck.linear_cross_entropy(hid, w, t, chunk_size=4)
    (g,) = torch.autograd.grad(loss, hid)
    assert loss.item() == 0.0 and g.abs().max() == 0


LORA_CASES = [  # (lead dims, K, N, r, bias)
    ((1,), 16, 16, 1, False),
    ((3, 37), 72, 53, 5, True),
    ((130,), 100, 70, 16, False),
    ((5, 13), 33, 129, 8, True),
]


@pytest.mark.parametrize("lead,k,n,r,bias", LORA_CASES)
def test_lora_linear_dense(gen, lead, k, n, r, bias):
    x = randn(gen, *lead, k, grad=True)
    w = randn(gen, n, k, scale=k**-0.5)
    a, b = randn(gen, r, k, scale=0.2, grad=True), randn(gen, n, r, scale=0.2, grad=True)
    bvec = randn(gen, n) if bias else None
    with ck.backend("triton"):
        y = ck.lora_linear(x, w, a, b, 1.7, bvec)
    y_ref = ref.lora_linear(x, w, a, b, 1.7, bvec)
    assert_close(y, y_ref, 1e-5, 1e-5, "y")
    dy = randn(gen, *y.shape)
    grads, grads_ref = _grads(y, (x, a, b), dy), _grads(y_ref, (x, a, b), dy)
    for got, want, name in zip(grads, grads_ref, "xAB", strict=True):
        assert_close(got, want, 1e-4, 1e-4, f"d{name}")


def test_lora_linear_input_without_grad(gen):
    """x needs no gradient (first layer): the dx kernel is skipped, dA and dB still match."""
    x, w = randn(gen, 2, 9, 20), randn(gen, 24, 20)
    a, b = randn(gen, 4, 20, grad=True), randn(gen, 24, 4, grad=True)
    with ck.backend("triton"):
        y = ck.lora_linear(x, w, a, b, 0.5)
    dy = randn(gen, *y.shape)
    got, want = _grads(y, (a, b), dy), _grads(ref.lora_linear(x, w, a, b, 0.5), (a, b), dy)
    for g1, g2 in zip(got, want, strict=True):
        assert_close(g1, g2, 1e-5, 1e-5, "grad")


def test_lora_linear_frozen_adapter_part(gen):
    """Only B trains (e.g. frozen-A strategies): the Function skips dA and still gives dx, dB."""
    x, w = randn(gen, 9, 20, grad=True), randn(gen, 24, 20)
    a, b = randn(gen, 4, 20), randn(gen, 24, 4, grad=True)
    with ck.backend("triton"):
        y = ck.lora_linear(x, w, a, b, 0.5)
    dy = randn(gen, *y.shape)
    got = _grads(y, (x, b), dy)
    want = _grads(ref.lora_linear(x, w, a, b, 0.5), (x, b), dy)
    for g1, g2 in zip(got, want, strict=True):
        assert_close(g1, g2, 1e-5, 1e-5, "grad")
