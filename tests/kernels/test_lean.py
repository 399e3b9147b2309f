"""The memory-lean CPU RMSNorm / SwiGLU (``cllora_kernels.lean``) against the references,
forward and backward, fp32 and bf16; and what each one keeps for the backward."""

from __future__ import annotations

import cllora_kernels as ck
import pytest
import torch
from cllora_kernels import lean
from cllora_kernels import reference as ref

from .util import assert_close, randn

TOL = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (3e-2, 3e-2)}


def _grads(out, inputs, grad_out):
    return torch.autograd.grad(out, inputs, grad_out)


def _saved_bytes(fn, *args) -> int:
    """Bytes of the distinct storages autograd keeps for the backward of ``fn(*args)``."""
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    inputs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
    return sum(n for p, n in seen.items() if p not in inputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1, 7), (3, 37, 99), (2, 1031)])
def test_swiglu_lean(gen, dtype, shape):
    atol, rtol = TOL[dtype]
    g = randn(gen, *shape, scale=3.0, grad=True, dtype=dtype)
    u = randn(gen, *shape, grad=True, dtype=dtype)
    y, y_ref = lean.swiglu(g, u), ref.swiglu(g, u)
    assert y.dtype == y_ref.dtype
    assert_close(y, y_ref, atol, rtol, "y")
    dy = randn(gen, *shape, dtype=dtype)
    for got, want in zip(_grads(y, (g, u), dy), _grads(y_ref, (g, u), dy), strict=True):
        assert_close(got, want, atol, rtol, "grad")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1, 7), (5, 7, 99), (3, 2050)])
@pytest.mark.parametrize("weight_grad", [True, False])
def test_rms_norm_lean(gen, dtype, shape, weight_grad):
    atol, rtol = TOL[dtype]
    x = randn(gen, *shape, scale=2.0, grad=True, dtype=dtype)
    w = (1.0 + randn(gen, shape[-1], scale=0.3)).to(dtype).requires_grad_(weight_grad)
    y, y_ref = lean.rms_norm(x, w, 1e-6), ref.rms_norm(x, w, 1e-6)
    assert y.dtype == y_ref.dtype
    assert_close(y, y_ref, atol, rtol, "y")
    dy = randn(gen, *shape, dtype=dtype)
    inputs = (x, w) if weight_grad else (x,)
    for got, want in zip(_grads(y, inputs, dy), _grads(y_ref, inputs, dy), strict=True):
        # the weight grad sums over every row: its error grows with the row count
        assert_close(got, want, atol * (50 if got.dim() == 1 else 1), rtol, "grad")


def test_rms_norm_lean_fp32_weight_bf16_input(gen):
    """transformers keeps the norm weight fp32 in some set-ups: the product promotes to fp32."""
    x = randn(gen, 4, 33, grad=True, dtype=torch.bfloat16)
    w = 1.0 + randn(gen, 33, scale=0.3)
    y, y_ref = lean.rms_norm(x, w, 1e-5), ref.rms_norm(x, w, 1e-5)
    assert y.dtype == y_ref.dtype == torch.float32
    assert_close(y, y_ref, 1e-2, 1e-2, "y")
    dy = randn(gen, 4, 33)
    assert_close(_grads(y, (x,), dy)[0], _grads(y_ref, (x,), dy)[0], 3e-2, 3e-2, "dx")


def test_lean_keeps_less(gen):
    """SwiGLU keeps gate and up only (the reference also keeps silu(gate)); RMSNorm keeps x and
    the (rows,) rstd, never a (rows x hidden) temporary (the reference keeps the normalised x
    when the weight trains; with a frozen weight both keep x and rstd: RMSNorm's gain is the
    transient buffers, not what is kept)."""
    g, u = randn(gen, 64, 256, grad=True), randn(gen, 64, 256, grad=True)
    assert _saved_bytes(lean.swiglu, g, u) == 0  # only its inputs
    assert _saved_bytes(ref.swiglu, g, u) >= 64 * 256 * 4
    x, w = randn(gen, 64, 256, grad=True), randn(gen, 256, grad=True)
    assert _saved_bytes(lean.rms_norm, x, w, 1e-6) <= 64 * 4
    assert _saved_bytes(ref.rms_norm, x, w, 1e-6) >= 64 * 256 * 4


def test_dispatch_runs_lean_off_cuda(gen):
    x, w = randn(gen, 3, 8, grad=True), randn(gen, 8)
    assert type(ck.rms_norm(x, w).grad_fn).__name__.startswith("RMSNorm")
    assert type(ck.swiglu(x, x).grad_fn).__name__.startswith("SwiGLU")
    with ck.backend("reference"):
        assert not type(ck.rms_norm(x, w).grad_fn).__name__.startswith("RMSNorm")
        assert not type(ck.swiglu(x, x).grad_fn).__name__.startswith("SwiGLU")
