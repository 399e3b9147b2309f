"""Compiled Triton kernels on a GPU: bf16 (and tf32-matmul fp32) at larger shapes, against the
torch references evaluated in fp32 on the same (rounded) inputs.

Run on a CUDA machine: ``python -m pytest tests/kernels -m gpu -q``. Skipped without CUDA (the
interpreter tests in the other files cover the same kernels on CPU in fp32). Tolerances follow
what Liger-Kernel and Unsloth use for bf16: elementwise ops ``atol=rtol=2e-2``; matmul-shaped
outputs a relative Frobenius error below 2e-2 (bf16) or 5e-3 (fp32 with tf32 ``tl.dot``).
"""

from __future__ import annotations

import cllora_kernels as ck
import pytest
import torch
from cllora_kernels import reference as ref

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
DTYPES = [(torch.bfloat16, 2e-2), (torch.float32, 5e-3)]  # (dtype, relative error bound)


def _rand(*shape: int, dtype: torch.dtype, scale: float = 1.0, grad: bool = True) -> torch.Tensor:
    return (torch.randn(shape, device="cuda") * scale).to(dtype).requires_grad_(grad)


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().float().requires_grad_(t.requires_grad)


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    assert not torch.isnan(got).any()
    return float((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-12))


def _check(out, out_ref, inputs, inputs_ref, bound: float) -> None:
    outs = out if isinstance(out, tuple) else (out,)
    outs_ref = out_ref if isinstance(out_ref, tuple) else (out_ref,)
    for o, r in zip(outs, outs_ref, strict=True):
        assert _rel(o, r) < bound
    gos = [torch.randn_like(o) for o in outs]
    grads = torch.autograd.grad(outs, inputs, gos)
    grads_ref = torch.autograd.grad(outs_ref, inputs_ref, [g.float() for g in gos])
    for g, r in zip(grads, grads_ref, strict=True):
        assert _rel(g, r) < bound


@pytest.mark.parametrize("dtype,bound", DTYPES)
@pytest.mark.parametrize("m,k,n,r", [(4093, 2048, 5632, 16), (1000, 576, 1536, 8)])
def test_lora_linear_gpu(dtype, bound, m, k, n, r):
    x, w = _rand(m, k, dtype=dtype), _rand(n, k, dtype=dtype, scale=k**-0.5, grad=False)
    a, b = (
        _rand(r, k, dtype=torch.float32, scale=0.05),
        _rand(n, r, dtype=torch.float32, scale=0.05),
    )
    xr = _f32(x)
    out = ck.lora_linear(x, w, a, b, 2.0)
    out_ref = ref.lora_linear(xr, w.float(), a, b, 2.0)
    _check(out, out_ref, (x, a, b), (xr, a, b), bound)


@pytest.mark.parametrize("nested", [False, True])
def test_lora_linear_nf4_gpu(nested):
    bnbf = pytest.importorskip("bitsandbytes.functional")
    k, n = 2048, 1536
    packed, state = bnbf.quantize_4bit(
        torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k**-0.5,
        quant_type="nf4",
        compress_statistics=nested,
    )
    w = bnbf.dequantize_4bit(packed, state).float()
    x = _rand(2047, k, dtype=torch.bfloat16)
    a, b = _rand(16, k, dtype=torch.float32, scale=0.05), _rand(n, 16, dtype=torch.float32)
    xr = _f32(x)
    out = ck.lora_linear(x, ck.NF4Weight.from_bnb(packed, state), a, b, 2.0)
    _check(out, ref.lora_linear(xr, w, a, b, 2.0), (x, a, b), (xr, a, b), 2e-2)


@pytest.mark.parametrize("dtype,bound", DTYPES)
def test_linear_cross_entropy_gpu(dtype, bound):
    n, h, v = 4099, 576, 49152
    hid, w = _rand(n, h, dtype=dtype), _rand(v, h, dtype=dtype, scale=h**-0.5, grad=False)
    t = torch.randint(0, v, (n,), device="cuda")
    t[::7] = -100
    hr = _f32(hid)
    loss = ck.linear_cross_entropy(hid, w, t)
    loss_ref = torch.nn.functional.cross_entropy(hr @ w.float().T, t)
    assert abs(loss.item() - loss_ref.item()) < bound * loss_ref.item()
    (g,), (g_ref,) = torch.autograd.grad(loss, hid), torch.autograd.grad(loss_ref, hr)
    assert _rel(g, g_ref) < bound


@pytest.mark.parametrize("dtype,bound", DTYPES)
def test_rms_norm_swiglu_rope_gpu(dtype, bound):
    x, wn = _rand(8191, 2048, dtype=dtype), _rand(2048, dtype=dtype)
    xr, wr = _f32(x), _f32(wn)
    _check(ck.rms_norm(x, wn, 1e-5), ref.rms_norm(xr, wr, 1e-5), (x, wn), (xr, wr), bound)
    g, u = _rand(4097, 5632, dtype=dtype), _rand(4097, 5632, dtype=dtype)
    gr, ur = _f32(g), _f32(u)
    _check(ck.swiglu(g, u), ref.swiglu(gr, ur), (g, u), (gr, ur), bound)
    q, k = _rand(2, 4100, 32, 64, dtype=dtype).transpose(1, 2), _rand(2, 8, 4100, 64, dtype=dtype)
    pos = torch.cat([torch.arange(1000), torch.arange(3100)]).cuda()[None].expand(2, -1)
    inv = 1.0 / (500000 ** (torch.arange(0, 64, 2, device="cuda").float() / 64))
    qr, kr = _f32(q), _f32(k)
    _check(ck.rope(q, k, pos, inv), ref.rope(qr, kr, pos, inv), (q, k), (qr, kr), bound)


@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_enable_kernels_model_gpu(quant):
    """A bf16 tiny Llama with LoRA on CUDA: the Triton path (enable_kernels + fused loss) gives
    the loss and LoRA gradients of the unfused path (bitsandbytes' matmul_4bit under nf4)."""
    from cllora.config import ModelConfig
    from cllora.model.kernels import enable_kernels
    from cllora.model.load import load_model
    from cllora.model.lora import inject_lora, lora_parameters
    from cllora.model.loss import lm_loss_sum

    model, _ = load_model(ModelConfig(name="tiny-llama", dtype="bf16"), seed=0, device="cuda")
    torch.manual_seed(0)
    inject_lora(model, r=8, alpha=16)
    params = lora_parameters(model)
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.05)
    if quant == "nf4":
        from cllora.model.quant import quantize_base

        quantize_base(model, "nf4", compute_dtype=torch.bfloat16)
    ids = torch.randint(3, 49000, (2, 333), device="cuda")
    mask = torch.ones_like(ids)
    labels = ids.clone()
    labels[:, :50] = -100

    def run(loss: str) -> tuple[float, list[torch.Tensor]]:
        total, n = lm_loss_sum(model, ids, mask, labels, loss=loss)
        return float(total / n), torch.autograd.grad(total / n, params)

    loss_ref, grads_ref = run("plain")
    swapped = enable_kernels(model)
    assert swapped["lora_linear"] and swapped["rms_norm"] and swapped["swiglu_mlp"]
    loss, grads = run("fused")
    assert abs(loss - loss_ref) < 2e-2 * abs(loss_ref)
    for g, r in zip(grads, grads_ref, strict=True):
        assert _rel(g, r) < 5e-2
